#!/usr/bin/env bash
# CI step: coverage-guided fuzzing of lca's argument parsing and shape checking, for a bounded
# time (LCA_FUZZ_SECONDS, default 120).  The target is tests/fuzz/fuzz_lca.py (atheris, which
# runs libFuzzer): Python coverage of lca/*.py, and native coverage of lca._C, which is built
# here a third time with clang (LCA_SANITIZE=fuzz: coverage counters, undefined behaviour as a
# trap) into build/fuzz/.  It starts from the committed corpus (tests/fuzz/corpus) and writes
# what it finds to a scratch folder, never into the repository.  Every input it found is then
# replayed under the AddressSanitizer build of .ci/sanitize.sh (build/asan/), when present.
# A crash, trap, hang or oracle failure fails the step and prints the input (base64).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SECONDS_BUDGET=${LCA_FUZZ_SECONDS:-120}
t0=$SECONDS

python3 -m pip install -q "atheris==3.0.0"
probe() { echo 'int main(void){return 0;}' | clang -fopenmp -x c - -o /dev/null 2>/dev/null; }
if ! probe; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang libomp-dev
fi

OUT=$ROOT/build/fuzz
rm -rf "$OUT/lca"
mkdir -p "$OUT/lca"
CC=clang LDSHARED="clang -shared" LCA_CUDA=0 LCA_SANITIZE=fuzz python3 setup.py -q build_ext \
    --force --build-lib "$OUT" --build-temp "$ROOT/build/fuzz-tmp" \
    > "$ROOT/build/fuzz-build.log" 2>&1 ||
    { tail -40 "$ROOT/build/fuzz-build.log"; exit 1; }
cp lca/*.py "$OUT/lca/"
echo "fuzz: built $(ls "$OUT"/lca/_C*.so) in $((SECONDS - t0)) s"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/new"
set +e
(cd "$WORK" && PYTHONPATH=$OUT OMP_NUM_THREADS=1 python3 "$ROOT/tests/fuzz/fuzz_lca.py" \
    -max_total_time="$SECONDS_BUDGET" -timeout=60 -rss_limit_mb=4096 -print_final_stats=1 \
    -artifact_prefix="$WORK/" "$WORK/new" "$ROOT/tests/fuzz/corpus") > "$WORK/log" 2>&1
rc=$?
set -e
grep -E "^(fuzzing|INFO: seed|#[0-9]+[[:space:]]+(INITED|DONE))" "$WORK/log" || true
grep -E "^(Done|stat::)" "$WORK/log" || true
if [ "$rc" != 0 ]; then
    echo "fuzz: FAILED (libFuzzer exit $rc)"
    grep -v "^INFO: Instrumenting" "$WORK/log" | tail -60
    for f in "$WORK"/crash-* "$WORK"/timeout-* "$WORK"/oom-*; do
        [ -f "$f" ] && echo "fuzz: input $(basename "$f"): $(base64 -w0 "$f")"
    done
    exit 1
fi
runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$WORK/log")
echo "fuzz: $runs executions in $SECONDS_BUDGET s, $(ls "$WORK/new" | wc -l) new inputs, no finding"

if [ -d "$ROOT/build/asan/lca" ] && [ "$(ls "$WORK/new" | wc -l)" != 0 ]; then
    (cd "$ROOT/build/asan" && export PYTHONPATH=$ROOT/build/asan PYTHONMALLOC=malloc \
        LD_PRELOAD=$(gcc -print-file-name=libasan.so) \
        ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1 \
        UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 &&
        python3 "$ROOT/tests/fuzz/fuzz_lca.py" --replay "$WORK/new")
fi
echo "fuzz: done in $((SECONDS - t0)) s"
