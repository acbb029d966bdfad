"""What `import afire` sets for OpenMP before the C core loads (afire/__init__.py): a bounded
spin (GOMP_SPINCOUNT=100000) unless the user chose a wait policy or a spin count."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHOW = ("import os, afire; print(os.environ.get('OMP_WAIT_POLICY'), "
        "os.environ.get('GOMP_SPINCOUNT'))")


def _after_import(**env):
    base = {k: v for k, v in os.environ.items()
            if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    base.update(env, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", SHOW], env=base, capture_output=True,
                         text=True, timeout=120, check=True)
    return out.stdout.split()


@pytest.mark.parametrize("env,want", [
    ({}, ["None", "100000"]),
    ({"OMP_WAIT_POLICY": "passive"}, ["passive", "None"]),
    ({"OMP_WAIT_POLICY": "active"}, ["active", "None"]),
    ({"GOMP_SPINCOUNT": "5"}, ["None", "5"]),
])
def test_spin_default_and_user_choice_wins(env, want):
    assert _after_import(**env) == want
