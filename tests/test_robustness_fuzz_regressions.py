"""Every saved fuzz input (seed corpora and the crashes the fuzzers found, tests/fuzz/) is
replayed through its target on each test run, so a fixed finding stays fixed. The fuzzers
themselves run in .ci/fuzz.sh."""
import os
import sys

import pytest

from afire import _C

FUZZ = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuzz")
sys.path.insert(0, FUZZ)
import pyfuzz  # noqa: E402


def inputs(target):
    out = []
    for kind in ("corpus", "regressions"):
        d = os.path.join(FUZZ, kind, target)
        if os.path.isdir(d):
            out += [os.path.join(d, f) for f in sorted(os.listdir(d))]
    return out


@pytest.mark.parametrize("target", sorted(pyfuzz.TARGETS))
def test_python_targets_replay_cleanly(target):
    files = inputs(target)
    assert files, f"no saved inputs for {target}"
    assert pyfuzz.replay(pyfuzz.TARGETS[target], files) == len(files)


def _load(path):
    try:
        _C.io.load_safetensors(path)
    except ValueError as e:
        assert "safetensors" in str(e)


@pytest.mark.parametrize("target", ["safetensors", "json"])
def test_c_parser_inputs_load_or_raise_value_error(target, tmp_path):
    files = inputs(target)
    assert files
    for f in files:
        data = open(f, "rb").read()
        if target == "json":  # the JSON parser is reached through a safetensors header
            data = len(data).to_bytes(8, "little") + data
            p = tmp_path / "j.safetensors"
            p.write_bytes(data)
            f = str(p)
        _load(f)
