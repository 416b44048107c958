#!/usr/bin/env bash
# On a GPU machine: CUDA tests under compute-sanitizer's memcheck, racecheck, synccheck and
# initcheck (after benchmarks/gpu_check.sh has built lca in place).  LCA_SANITIZE_TESTS picks
# the tests (default tests/test_cuda.py; e.g. "tests/test_cuda_gqa_wgmma.py -k tuning_variants"
# for the Hopper forward's producer/consumer variants, "tests/test_cache.py -k gpu" for the
# decode kernels: a -k there replaces the default one); LCA_SANITIZE_TOOLS the tools.  The test
# that provokes a CUDA error on purpose is left out.  Every kernel is instrumented (filtering
# with --kernel-name hides the framework's writes from initcheck, which then misreports, and
# crashed racecheck here); the summary counts the reports that name lca's kernels
# (lca::...lca_*) apart from all reports.
# LCA_SANITIZER replaces the compute-sanitizer command (a stand-in to check the arguments).
set -uo pipefail
OUT=${OUT:-/tmp/lca-out}; mkdir -p "$OUT"
export LCA_POISON_OUTPUTS=1
# LCA_SANITIZE_TESTS is parsed with the shell's quoting, so a -k expression with spaces can be
# quoted inside it: LCA_SANITIZE_TESTS="tests/test_cuda_mla.py -k 'wgmma and bfloat16'"
eval "set -- ${LCA_SANITIZE_TESTS:-tests/test_cuda.py}"
for tool in ${LCA_SANITIZE_TOOLS:-memcheck racecheck synccheck initcheck}; do
  ${LCA_SANITIZER:-compute-sanitizer} --tool "$tool" --print-limit 1000 --target-processes all \
    python3 -m pytest -q -p no:cacheprovider -k "not failure" "$@" \
    > "$OUT/sanitize-$tool.log" 2>&1
  echo "$tool: pytest exit $? | reports in lca kernels:" \
       "$(grep -cE 'at .*lca::([a-z0-9_]+::)*lca_' "$OUT/sanitize-$tool.log")" \
       "| $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|passed|failed' "$OUT/sanitize-$tool.log" | tail -2 | tr '\n' ' ')"
done
