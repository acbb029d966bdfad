#!/usr/bin/env bash
# The unit suite under AddressSanitizer + UndefinedBehaviorSanitizer, then the valgrind
# memcheck run of tools/valgrind_check.py. Builds in a temporary copy of the tree, so the
# normal build (afire/_C*.so, build/) of this checkout is never touched.
#
#   .ci/sanitize.sh            # ASan/UBSan suite + valgrind
#   SKIP_VALGRIND=1 .ci/sanitize.sh
#
# The extension is loaded into an uninstrumented CPython, so the sanitizer runtimes are
# preloaded; detect_leaks=0 because CPython keeps allocations alive at exit by design.
#
# Python: $PYTHON, else the activated venv's, else ./.venv's (the one .ci/run makes), else
# python3 (.ci/python.sh). Builds and tests need numpy + scipy-openblas32 (headers and
# libraries for the extension), setuptools, pytest and hypothesis importable from it; the
# script says which interpreter it uses and stops with a clear message when they are not.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$PWD
# shellcheck source=.ci/python.sh
. "$SRC/.ci/python.sh"
ci_pick_python "$SRC"
ci_require numpy scipy_openblas32 setuptools pytest hypothesis
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# tracked + untracked-but-not-ignored files: exactly what a checkout has, minus build output
git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C "$WORK"
cd "$WORK"

echo "== build (AFIRE_SANITIZE=1 AFIRE_CUDA=0) in $WORK"
AFIRE_SANITIZE=1 AFIRE_CUDA=0 "$PYTHON" setup.py -q build_ext --inplace > build.log 2>&1 \
  || { tail -50 build.log; exit 1; }
grep -E "warning:|error:" build.log | grep -v "_POSIX_C_SOURCE" || true

ASAN_LIB=$(gcc -print-file-name=libasan.so)
UBSAN_LIB=$(gcc -print-file-name=libubsan.so)
# allocator_may_return_null=1: a huge request returns NULL (as glibc does) so the
# out-of-memory paths run instead of ASan aborting the process
export ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export PYTHONPATH=$WORK
# the suite must load the instrumented copy, not this checkout's (or an editable install's) build
LD_PRELOAD="$ASAN_LIB $UBSAN_LIB" "$PYTHON" -c "import afire._C as c, sys; print('   afire._C:', c.__file__); sys.exit(not c.__file__.startswith('$WORK/'))" \
  || { echo "the sanitized afire._C is not the one imported"; exit 1; }
# tests/test_networks_torch.py: PyTorch's own libraries are not ASan-clean and take minutes
# to load instrumented; the torch comparisons run in the normal suite.
echo "== unit suite under ASan + UBSan"
t0=$(date +%s)
mkdir -p "$SRC/build"
LOG=$SRC/build/sanitize.log
set +e
LD_PRELOAD="$ASAN_LIB $UBSAN_LIB" "$PYTHON" -m pytest -q -p no:cacheprovider tests \
  --ignore=tests/test_networks_torch.py -m "not slow and not gpu" ${SANITIZE_PYTEST_ARGS:-} \
  > "$LOG" 2>&1
rc=$?
set -e
grep -E -A30 "ERROR: AddressSanitizer|runtime error:" "$LOG" | head -60 || true
tail -8 "$LOG"
echo "   ($(( $(date +%s) - t0 )) s; full log: build/sanitize.log)"
[ "$rc" = 0 ] || { echo "sanitized suite FAILED (exit $rc)"; exit "$rc"; }

if [ "${SKIP_VALGRIND:-0}" != 1 ]; then
  echo "== valgrind memcheck (normal -O3 build of the copy)"
  rm -f afire/_C*.so && rm -rf build
  AFIRE_CUDA=0 "$PYTHON" setup.py -q build_ext --inplace > build2.log 2>&1 || { tail -50 build2.log; exit 1; }
  t0=$(date +%s)
  "$PYTHON" tools/valgrind_check.py
  echo "   ($(( $(date +%s) - t0 )) s)"
fi
