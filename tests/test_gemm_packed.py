"""afire's packed AVX-512 GEMM (csrc/ops/gemm_packed.c) against NumPy and against OpenBLAS.

The kernel runs the linear layers' forward and input-gradient products (af_sgemm with op(A) = A
and the row-tile kernels of fused.c) where the CPU has AVX-512; AFIRE_SGEMM=openblas turns it
off. Shapes cover every remainder of its 12-row and 32-column blocks, and both seeds of C
(beta 0: whatever C held is ignored; beta 1: the bias rows are kept).
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from _util import op_in_fresh_process

from afire import _C

ops = _C.ops
PACKED = _C.build_info()["sgemm"] == "avx512-packed"


def _rand(r, *shape):
    return r.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("N,IC,OC", [(16, 64, 256), (37, 70, 33), (257, 192, 576),
                                     (100, 31, 1), (64, 3, 97), (300, 768, 50)])
def test_linear_forward_and_input_gradient_match_numpy(N, IC, OC):
    r = np.random.default_rng(N * 7 + OC)
    x, w, b, dout = _rand(r, N, IC), _rand(r, OC, IC), _rand(r, OC), _rand(r, N, OC)
    y = ops.linear_forward(x, w, b)
    ref = x.astype(np.float64) @ w.T.astype(np.float64) + b
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.sqrt(IC))
    dinp = ops.linear_backward(dout, x, w)[0]
    np.testing.assert_allclose(dinp, dout.astype(np.float64) @ w, rtol=1e-5,
                               atol=1e-5 * np.sqrt(OC))


@pytest.mark.parametrize("N,IC,OC", [(300, 70, 33), (1000, 192, 576), (129, 31, 13),
                                     (4100, 40, 24)])
def test_weight_and_bias_gradients_match_numpy(N, IC, OC):
    """dW = dout^T x runs on the unpacked A^T B kernel (K = N rows, cut in blocks of 128)."""
    r = np.random.default_rng(N + IC)
    x, w, dout = _rand(r, N, IC), _rand(r, OC, IC), _rand(r, N, OC)
    dinp, dw, db = ops.linear_backward(dout, x, w)
    np.testing.assert_allclose(dw, dout.T.astype(np.float64) @ x, rtol=1e-5,
                               atol=2e-5 * np.sqrt(N))
    np.testing.assert_allclose(db, dout.sum(0, dtype=np.float64), rtol=1e-5,
                               atol=2e-5 * np.sqrt(N))
    np.testing.assert_allclose(dinp, dout.astype(np.float64) @ w, rtol=1e-5,
                               atol=1e-5 * np.sqrt(OC))


def test_gradients_do_not_depend_on_the_thread_count():
    code = ("import hashlib, numpy as np; from afire._C import ops; "
            "r = np.random.default_rng(1); f = lambda *s: r.standard_normal(s).astype(np.float32); "
            "x, w, dout = f(3000, 96), f(200, 96), f(3000, 200); "
            "print(*[hashlib.md5(a.tobytes()).hexdigest() for a in "
            "ops.linear_backward(dout, x, w) + (ops.linear_forward(x, w),)])")
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=120, env=dict(os.environ, OMP_NUM_THREADS=str(t))).stdout
            for t in (1, 2)]
    assert outs[0] and outs[0] == outs[1]


def test_mlp_forward_matches_numpy_and_is_deterministic():
    r = np.random.default_rng(3)
    N, D, H = 301, 40, 160
    x, w1, b1, w2, b2, res = (_rand(r, N, D), _rand(r, H, D) * .2, _rand(r, H),
                              _rand(r, D, H) * .1, _rand(r, D), _rand(r, N, D))
    out = ops.mlp_forward(x, w1, b1, w2, b2, res)
    h = x.astype(np.float64) @ w1.T + b1
    from math import erf
    g = h * 0.5 * (1 + np.vectorize(erf)(h / np.sqrt(2)))
    ref = g @ w2.T + b2 + res
    got = out[-1] if isinstance(out, tuple) else out
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    again = ops.mlp_forward(x, w1, b1, w2, b2, res)
    again = again[-1] if isinstance(again, tuple) else again
    assert np.array_equal(got, again)


def test_openblas_fallback_agrees(tmp_path):
    r = np.random.default_rng(0)
    x, w, b = _rand(r, 250, 96), _rand(r, 130, 96), _rand(r, 130)
    y, kernel = op_in_fresh_process(tmp_path, "linear_forward", [x, w, b],
                                    {"AFIRE_SGEMM": "openblas"}, "sgemm")
    assert kernel == "openblas"
    np.testing.assert_allclose(y, ops.linear_forward(x, w, b), rtol=1e-5, atol=1e-4)


def test_build_info_reports_the_kernel():
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    has = " avx512f" in flags
    if os.environ.get("AFIRE_SGEMM") == "openblas":
        assert not PACKED
    elif sys.platform.startswith("linux") and os.uname().machine == "x86_64":
        assert PACKED == has
