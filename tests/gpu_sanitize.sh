#!/usr/bin/env bash
# On a GPU machine: the CUDA tests under compute-sanitizer's memcheck, racecheck and initcheck
# (after benchmarks/gpu_check.sh has built lca in place).  Prints each tool's summary line.
set -uo pipefail
OUT=${OUT:-/tmp/lca-out}; mkdir -p "$OUT"
export LCA_POISON_OUTPUTS=1
for tool in memcheck racecheck initcheck; do
  compute-sanitizer --tool "$tool" --error-exitcode 9 --target-processes all \
    python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -x > "$OUT/sanitize-$tool.log" 2>&1
  echo "$tool: exit $? | $(grep -E 'ERROR SUMMARY|passed|failed' "$OUT/sanitize-$tool.log" | tail -2 | tr '\n' ' ')"
done
