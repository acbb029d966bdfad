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
# Needs: clang with libclang_rt.fuzzer, python3 with numpy/Pillow/pydicom; atheris is
# installed into a venv here (build/fuzz/venv, system site-packages visible).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET=${FUZZ_SECONDS:-45}
OUT=${FUZZ_OUT:-build/fuzz/findings}
BIN=build/fuzz
CLANG=${CLANG:-$(command -v clang-14 || command -v clang)}
mkdir -p "$BIN" "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
status=0

# ---- C targets: csrc/safetensors.c + json.c + error.c, no Python involved
for t in safetensors json; do
  "$CLANG" -g -O1 -std=c11 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
    -Icsrc "tests/fuzz/fuzz_$t.c" csrc/safetensors.c csrc/json.c csrc/error.c -o "$BIN/fuzz_$t"
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

# ---- Python targets (atheris): the extension must be built (python3 setup.py build_ext -i)
VENV=$BIN/venv
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv --system-site-packages "$VENV"
fi
"$VENV/bin/python" -c "import atheris" 2>/dev/null || "$VENV/bin/pip" install -q atheris
"$VENV/bin/python" -c "import afire._C" || { echo "build afire._C first"; exit 1; }
for t in torch_pkl torch_zip shards image; do
  mkdir -p "$WORK/py_$t"
  cp tests/fuzz/corpus/$t/* "$WORK/py_$t/"
  [ -d tests/fuzz/regressions/$t ] && cp tests/fuzz/regressions/$t/* "$WORK/py_$t/"
  echo "== atheris $t: ${SECONDS_PER_TARGET}s"
  if ! "$VENV/bin/python" tests/fuzz/pyfuzz.py "$t" -max_total_time="$SECONDS_PER_TARGET" \
        -max_len=8192 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$OUT/$t-" "$WORK/py_$t" > "$WORK/py_$t.log" 2>&1; then
    status=1; tail -40 "$WORK/py_$t.log"
  fi
  grep -E "stat::number_of_executed_units" "$WORK/py_$t.log" || true
done
[ "$status" = 0 ] && echo "fuzz: no findings" || echo "fuzz: FINDINGS in $OUT"
exit $status
