#!/usr/bin/env bash
# CI step: memory safety of the CPU extension.  Builds lca._C a second time, with gcc's
# AddressSanitizer + UndefinedBehaviorSanitizer (LCA_SANITIZE=1, CPU engine only), into
# build/asan/, and runs under it, with libasan preloaded into the interpreter:
#   1. the test suite (all but the notebook, whose kernel is a fresh interpreter);
#   2. the committed fuzz corpus (tests/fuzz/corpus) through the fuzz target's replay mode;
#   3. the leak tests again with LeakSanitizer on, failing on any leak whose allocation stack
#      passes through lca's C code (Python's own leaks at exit are not ours to judge).
# Undefined behaviour aborts at once (-fno-sanitize-recover); a heap error aborts too.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=$ROOT/build/asan
t0=$SECONDS

rm -rf "$OUT/lca"
mkdir -p "$OUT/lca"
LCA_CUDA=0 LCA_SANITIZE=1 python3 setup.py -q build_ext --force --build-lib "$OUT" \
    --build-temp "$ROOT/build/asan-tmp" > "$ROOT/build/asan-build.log" 2>&1 ||
    { tail -40 "$ROOT/build/asan-build.log"; exit 1; }
cp lca/*.py "$OUT/lca/"
echo "sanitize: built $(ls "$OUT"/lca/_C*.so) in $((SECONDS - t0)) s"

LIBASAN=$(gcc -print-file-name=libasan.so)
[ -f "$LIBASAN" ] || { echo "sanitize: no libasan ($LIBASAN)"; exit 1; }
# libstdc++ preloaded after libasan: ASan resolves the real __cxa_throw at start-up, and the
# python binary does not link libstdc++, so without this the first C++ exception thrown by an
# uninstrumented library (torch, in tests/test_torch.py) aborts with "CHECK failed:
# asan_interceptors.cpp ... real___cxa_throw".
export LD_PRELOAD="$LIBASAN $(gcc -print-file-name=libstdc++.so.6)"
export PYTHONMALLOC=malloc            # Python's objects and NumPy's buffers get red zones too
ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1:detect_stack_use_after_return=1
export ASAN_OPTIONS=$ASAN_OPTIONS:strict_string_checks=1:check_initialization_order=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export LCA_LEAK_ROUNDS=${LCA_LEAK_ROUNDS:-60} LCA_HYPOTHESIS_EXAMPLES=${LCA_HYPOTHESIS_EXAMPLES:-25}

cd "$OUT"                             # so that `import lca` is this build
python3 - <<'EOF'
import lca, lca._C
f = lca._C.__file__
assert "/build/asan/" in f, f"sanitize: imported {f}, not the sanitized build"
print(f"sanitize: running against {f}")
EOF

python3 -m pytest -q -p no:cacheprovider "$ROOT/tests" --ignore="$ROOT/tests/test_notebook.py"
PYTHONPATH=$OUT python3 "$ROOT/tests/fuzz/fuzz_lca.py" --replay "$ROOT/tests/fuzz/corpus"

# LeakSanitizer over the leak tests; reports that reach lca's code fail the step
LOG=$ROOT/build/lsan
rm -f "$LOG".*
ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=1:log_path=$LOG LSAN_OPTIONS=exitcode=0 \
    python3 -m pytest -q -p no:cacheprovider "$ROOT/tests/test_leaks.py" \
        "$ROOT/tests/test_matrix.py" -k "leak or heap or binding or param" > /dev/null
ours=$(cat "$LOG".* 2>/dev/null | grep -c -E "csrc/|_C\.cpython" || true)
reports=$(cat "$LOG".* 2>/dev/null | grep -c "^Direct leak\|^Indirect leak" || true)
echo "sanitize: LeakSanitizer: $reports leak reports at exit, $ours with a frame in lca's C code"
if [ "$ours" != 0 ]; then
    grep -h -B2 -A12 -E "csrc/|_C\.cpython" "$LOG".* | head -80
    exit 1
fi
echo "sanitize: done in $((SECONDS - t0)) s"
