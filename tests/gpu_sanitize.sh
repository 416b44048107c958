#!/usr/bin/env bash
# On a GPU machine: the CUDA tests under compute-sanitizer's memcheck, racecheck and initcheck
# (after benchmarks/gpu_check.sh has built lca in place).  The test that provokes a CUDA error on
# purpose is left out.  Every kernel is instrumented (filtering with --kernel-name hides the
# framework's writes from initcheck, which then misreports, and crashed racecheck here); the
# summary counts the reports that name lca's kernels (lca_*) apart from all reports.
set -uo pipefail
OUT=${OUT:-/tmp/lca-out}; mkdir -p "$OUT"
export LCA_POISON_OUTPUTS=1
for tool in memcheck racecheck initcheck; do
  compute-sanitizer --tool "$tool" --print-limit 1000 --target-processes all \
    python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "not failure" > "$OUT/sanitize-$tool.log" 2>&1
  echo "$tool: pytest exit $? | reports in lca kernels: $(grep -c 'at .*lca::lca_' "$OUT/sanitize-$tool.log")" \
       "| $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|passed|failed' "$OUT/sanitize-$tool.log" | tail -2 | tr '\n' ' ')"
done
