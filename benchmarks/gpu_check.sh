#!/usr/bin/env bash
# One device call: build lca there (its Python differs from ours), run the whole test suite
# (the GPU tests included) and the GPU benchmark.  Logs and RESULTS.md go to $OUT.
#   run on the device:  bash benchmarks/gpu_check.sh [bench args...]
set -uo pipefail
OUT=${OUT:-/tmp/lca-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 LCA_CUDA=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
t0=$(date +%s)
python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
grep -E "spill|error" "$OUT/build.log" | sort | uniq -c | head
python3 -c "import lca; print('HAS_CUDA', lca.HAS_CUDA)"
python3 -m pytest -q -p no:cacheprovider tests -x 2>&1 | tee "$OUT/tests.log" | tail -15
LCA_COMMIT=${LCA_COMMIT:-unknown} python3 benchmarks/bench_prefill.py "$@" 2>&1 | tee "$OUT/bench.log"
cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
