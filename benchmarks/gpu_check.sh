#!/usr/bin/env bash
# One device call: build lca there (its Python differs from ours), then stages in priority
# order, each under its own time limit, each logging to $OUT/<stage>.log (at most 8 files come
# back).  Benchmarks append to benchmarks/RESULTS.md, copied to $OUT at the end.
#   bash benchmarks/gpu_check.sh [stage ...]     stages: tests prefill decode decvar flex mla
#                                                variants bwd ncu
#   (decvar: the Hopper decode partial's variants ws, wsc and v3 at 128K, B = 64, H = 16, one
#    process each (a hung variant cannot hide the others), ~40 s each (filling the cache);
#    their tests: LCA_TESTS="tests/test_cache.py -k gpu")
#   LCA_TESTS="tests/..."  the test files (default: every file with GPU tests; LCA_TESTS=tests
#                          for the whole suite)
set -uo pipefail
OUT=${OUT:-/tmp/lca-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 LCA_CUDA=1 LCA_COMMIT=${LCA_COMMIT:-unknown}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
t0=$(date +%s)
python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"; grep -c "spill" "$OUT/build.log"
python3 -c "import lca; print('HAS_CUDA', lca.HAS_CUDA)"

GPU_TESTS="tests/test_cuda.py tests/test_cuda_mla.py tests/test_cuda_bwd.py tests/test_cache.py
  tests/test_torch.py tests/test_mla_prefill.py tests/test_cuda_gqa_wgmma.py tests/test_interop.py
  tests/test_attend_grad.py tests/test_cuda_attend_grad.py tests/test_cuda_bwd_dkdv.py
  tests/test_cuda_bwd_wgmma.py"

stage() {   # name, seconds, command...
  local name=$1 secs=$2; shift 2
  local s=$(date +%s)
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc, $(( $(date +%s) - s )) s"
  grep -vE "Warning|warn\(|^\s*$" "$OUT/$name.log" | tail -n ${LCA_TAIL:-25}
}
for st in "${@:-tests prefill}"; do
  case $st in
    tests)   stage tests ${LCA_TEST_SECS:-260} python3 -m pytest -q -p no:cacheprovider ${LCA_TESTS:-$GPU_TESTS} ;;
    prefill) stage prefill 150 python3 benchmarks/bench_prefill.py --lengths 8192 32768 65536 131072 \
               --reps 3 --backward --no-flex ;;
    decode)  stage decode 90 python3 benchmarks/bench_decode.py --reps 20 ;;
    decvar)  for v in ws wsc v3; do
               stage decvar-$v 60 env LCA_DECODE_VARIANT=$v python3 benchmarks/bench_decode.py \
                 --reps 20 --no-dense --no-append --rows 131072:64:16
             done ;;
    flex)    stage flex 150 python3 benchmarks/bench_prefill.py --lengths 131072 --reps 3 \
               --backward ;;
    bwd)     stage bwd 150 env PYTHONPATH=. bash -c "python3 benchmarks/bench_backward.py --L 32768 131072 --reps 5 \
               --profile; LCA_CUDA_DISABLE=wgmma python3 benchmarks/bench_backward.py --L 32768 --reps 5" ;;
    mla)     stage mla 60 python3 benchmarks/bench_mla.py --lengths 32768 131072 --reps 3 ;;
    variants) stage variants_tests 90 python3 -m pytest -q -x -p no:cacheprovider \
                tests/test_cuda_gqa_wgmma.py -k tuning_variants
              stage variants 60 python3 benchmarks/bench_gqa_variants.py ;;
    ncu)     stage ncu 200 ncu --clock-control none \
               -k regex:'gqa_wgmma|dkdv|bwd_dq|dq_kernel|dec_partial' -c 4 \
               --section SpeedOfLight --section ComputeWorkloadAnalysis \
               --section MemoryWorkloadAnalysis --section SchedulerStats --section WarpStateStats \
               --section Occupancy --section LaunchStats --section InstructionStats \
               python3 benchmarks/ncu_kernels.py ;;
  esac
done
cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
