#!/usr/bin/env bash
# Bounded fuzzing: libFuzzer (clang, ASan+UBSan) on the C safetensors reader and JSON
# parser, atheris on the Python parsers (torch unpickler, shards/manifest, image decoding).
#
#   .ci/fuzz.sh                 # FUZZ_SECONDS per target (default 45; 6 targets ~ 5 min)
#   FUZZ_SECONDS=600 .ci/fuzz.sh
#
# Works on copies of the committed seed corpora (tests/fuzz/corpus) in a temporary
# directory; a crash is copied to $FUZZ_OUT (default build/fuzz/findings), the script
# fails, and the input should be committed under tests/fuzz/regressions/<target>/ with
# the fix (tests/test_robustness_fuzz_regressions.py replays those on every test run).
# Needs: clang with libclang_rt.fuzzer, and a Python where afire is built and numpy,
# scipy-openblas32, Pillow and pydicom import: $PYTHON, else the activated venv's, else
# ./.venv's (the one .ci/run makes), else python3 (.ci/python.sh); the script says which
# and stops with a clear message when something is missing. atheris is pip-installed into
# that Python when it is a venv (as in .ci/run); a Python that is not a venv is left alone
# and gets build/fuzz/venv, made from that same Python with its site-packages visible.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=.ci/python.sh
. .ci/python.sh
ci_pick_python "$PWD"
# before the C targets, so that a missing dependency stops the script at once
ci_require numpy scipy_openblas32 PIL pydicom afire._C
SECONDS_PER_TARGET=${FUZZ_SECONDS:-45}
OUT=${FUZZ_OUT:-build/fuzz/findings}
BIN=build/fuzz
CLANG=${CLANG:-$(command -v clang-14 || command -v clang)}
mkdir -p "$BIN" "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
status=0

# ---- C targets: csrc/core/safetensors.c + json.c + error.c, no Python involved
for t in safetensors json; do
  "$CLANG" -g -O1 -std=c11 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
    -Icsrc/core "tests/fuzz/fuzz_$t.c" csrc/core/safetensors.c csrc/core/json.c csrc/core/error.c -o "$BIN/fuzz_$t"
  mkdir -p "$WORK/$t"
  cp tests/fuzz/corpus/$t/* "$WORK/$t/"
  [ -d tests/fuzz/regressions/$t ] && cp tests/fuzz/regressions/$t/* "$WORK/$t/"
  dict=(); [ -f tests/fuzz/$t.dict ] && dict=(-dict=tests/fuzz/$t.dict)
  echo "== libFuzzer $t: ${SECONDS_PER_TARGET}s"
  if ! "$BIN/fuzz_$t" "${dict[@]}" -max_total_time="$SECONDS_PER_TARGET" -max_len=4096 \
        -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$OUT/$t-" \
        "$WORK/$t" > "$WORK/$t.log" 2>&1; then
    status=1; tail -40 "$WORK/$t.log"
  fi
  grep -E "stat::number_of_executed_units|Done" "$WORK/$t.log" || true
done

# ---- Python targets (atheris), in $PYTHON or a venv that sees exactly its packages
FUZZ_PY=$PYTHON
if ! "$PYTHON" -c "import sys; sys.exit(sys.prefix == sys.base_prefix)"; then
  # not a venv: --system-site-packages from this same interpreter sees its packages
  VENV=$BIN/venv
  want=$("$PYTHON" -c "import sys; print(sys.prefix, sys.version)")
  if [ ! -x "$VENV/bin/python" ] || \
     [ "$("$VENV/bin/python" -c "import sys; print(sys.base_prefix, sys.version)" 2>/dev/null)" != "$want" ]; then
    "$PYTHON" -m venv --clear --system-site-packages "$VENV"
  fi
  FUZZ_PY=$VENV/bin/python
fi
if ! "$FUZZ_PY" -c "import atheris" 2>/dev/null; then
  echo "== pip install atheris into $FUZZ_PY"
  "$FUZZ_PY" -m pip install -q atheris
fi
PYTHON=$FUZZ_PY ci_require atheris numpy scipy_openblas32 PIL pydicom afire._C
for t in torch_pkl torch_zip shards image; do
  mkdir -p "$WORK/py_$t"
  cp tests/fuzz/corpus/$t/* "$WORK/py_$t/"
  [ -d tests/fuzz/regressions/$t ] && cp tests/fuzz/regressions/$t/* "$WORK/py_$t/"
  echo "== atheris $t: ${SECONDS_PER_TARGET}s"
  if ! "$FUZZ_PY" tests/fuzz/pyfuzz.py "$t" -max_total_time="$SECONDS_PER_TARGET" \
        -max_len=8192 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$OUT/$t-" "$WORK/py_$t" > "$WORK/py_$t.log" 2>&1; then
    status=1; tail -40 "$WORK/py_$t.log"
  fi
  grep -E "stat::number_of_executed_units" "$WORK/py_$t.log" || true
done
[ "$status" = 0 ] && echo "fuzz: no findings" || echo "fuzz: FINDINGS in $OUT"
exit $status
