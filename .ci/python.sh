# shellcheck shell=bash
# Sourced by .ci/sanitize.sh and .ci/fuzz.sh: which Python they run, and a clear failure
# when afire's dependencies are not importable from it.
#
# The interpreter, first that applies:
#   $PYTHON                      set by the caller (.ci/run passes its .venv's python)
#   $VIRTUAL_ENV/bin/python      an activated venv
#   <repo>/.venv/bin/python      the venv .ci/run makes
#   python3 on PATH              last resort
# Never a venv made with --system-site-packages from some other python: that sees the
# BASE interpreter's packages, not the ones .ci/run installed, and so only works on a
# machine where they were once installed into the base Python by hand.

ci_pick_python() {  # $1 = repository root; sets PYTHON (absolute), prints it
  local root=$1
  if [ -n "${PYTHON:-}" ]; then
    case "$PYTHON" in
      */*) PYTHON=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON") ;;
      *) PYTHON=$(command -v "$PYTHON") || { echo "PYTHON=$PYTHON: not found on PATH" >&2; return 1; } ;;
    esac
  elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
    PYTHON=$VIRTUAL_ENV/bin/python
  elif [ -x "$root/.venv/bin/python" ]; then
    PYTHON=$root/.venv/bin/python
  else
    PYTHON=$(command -v python3) || { echo "no python3 on PATH" >&2; return 1; }
  fi
  [ -x "$PYTHON" ] || { echo "PYTHON=$PYTHON is not an executable" >&2; return 1; }
  export PYTHON
  echo "== python: $PYTHON ($("$PYTHON" -c 'import sys; print("Python", sys.version.split()[0], "prefix", sys.prefix)'))"
}

ci_require() {  # module names that must import from $PYTHON (run from the directory given by the caller)
  local missing
  missing=$("$PYTHON" - "$@" <<'EOF'
import importlib, sys
bad = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as e:  # ImportError, or an extension that fails to load
        bad.append(f"{name} ({type(e).__name__}: {e})")
print("\n".join(bad))
EOF
) || { echo "$PYTHON does not run" >&2; return 1; }
  if [ -n "$missing" ]; then
    echo "ERROR: not importable from $PYTHON:" >&2
    echo "$missing" | sed 's/^/  /' >&2
    echo "  Run .ci/run (it makes .venv with afire's deps), or activate a venv where" \
         "'pip install -e \".[test]\"' was run, or set PYTHON=/path/to/that/python." >&2
    return 1
  fi
}
