#!/usr/bin/env bash
# On a GPU machine: the CUDA tests under compute-sanitizer's memcheck, racecheck and initcheck
# (after benchmarks/gpu_check.sh has built lca in place), checking lca's kernels (names lca_*), not
# the framework's.  The test that provokes a CUDA error on purpose is left out.  Prints summaries.
set -uo pipefail
OUT=${OUT:-/tmp/lca-out}; mkdir -p "$OUT"
export LCA_POISON_OUTPUTS=1
for tool in memcheck racecheck initcheck; do
  compute-sanitizer --tool "$tool" --error-exitcode 9 --target-processes all --kernel-name kns=lca_ \
    python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "not failure" > "$OUT/sanitize-$tool.log" 2>&1
  echo "$tool: exit $? | $(grep -E 'ERROR SUMMARY|passed|failed' "$OUT/sanitize-$tool.log" | tail -2 | tr '\n' ' ')"
done
