#!/usr/bin/env bash
# One device call: build lca there (its Python differs from ours), run the tests given by
# LCA_TESTS (default: the whole suite, GPU tests included) and the GPU benchmarks.  Logs and
# RESULTS.md go to $OUT.
#   run on the device:  [LCA_TESTS="tests/test_cuda.py"] [LCA_BENCH="prefill decode"] \
#                       bash benchmarks/gpu_check.sh [bench_prefill args...]
set -uo pipefail
OUT=${OUT:-/tmp/lca-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 LCA_CUDA=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
t0=$(date +%s)
python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
grep -E "spill|error" "$OUT/build.log" | sort | uniq -c | head
python3 -c "import lca; print('HAS_CUDA', lca.HAS_CUDA)"
python3 -m pytest -q -p no:cacheprovider ${LCA_TESTS:-tests} 2>&1 | tee "$OUT/tests.log" | tail -15
for b in ${LCA_BENCH:-prefill}; do
  if [ "$b" = prefill ]; then
    LCA_COMMIT=${LCA_COMMIT:-unknown} python3 benchmarks/bench_prefill.py "$@" 2>&1 | tee "$OUT/bench_prefill.log"
  else
    LCA_COMMIT=${LCA_COMMIT:-unknown} python3 benchmarks/bench_$b.py 2>&1 | tee "$OUT/bench_$b.log"
  fi
done
cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
