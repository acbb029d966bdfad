"""The CPU twins of the fast bf16 GPU path's op-table rows (afire._C.ops: linear_forward_bf16,
linear_backward_bf16, residual_layernorm_forward, layernorm_backward_residual,
gelu_*_bf16, sdpa_forward, sdpa_backward) are the fp32 references the GPU kernels are
compared with in tests/gpu/test_cuda_fast.py: here they are checked against NumPy and the
plain fp32 ops they compose."""
import numpy as np

from afire import _C

ops = _C.ops
rng = np.random.default_rng(7)


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def test_sdpa_twins_are_attention_with_its_log_sum_exp():
    B, T, D, H = 2, 9, 12, 3
    qkv = randn(B, T, 3 * D)
    out, lse = ops.sdpa_forward(qkv, H)
    ref_out, att = ops.attention_forward(qkv, H)
    np.testing.assert_array_equal(out, ref_out)
    q, k = (qkv[..., i * D:(i + 1) * D].reshape(B, T, H, D // H).astype(np.float64)
            for i in range(2))
    s = np.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(D // H)
    m = s.max(-1, keepdims=True)
    want = (m + np.log(np.exp(s - m).sum(-1, keepdims=True)))[..., 0]
    np.testing.assert_allclose(lse, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.exp(s - want[..., None]), att, rtol=1e-5, atol=1e-6)
    dout = randn(B, T, D)
    (dqkv,) = ops.sdpa_backward(dout, qkv, out, lse, H)
    np.testing.assert_array_equal(dqkv, ops.attention_backward(dout, qkv, att, H)[0])


def test_residual_layernorm_twins():
    a, b, w, bias = randn(5, 16), randn(5, 16), randn(16), randn(16)
    res, out, mean, rstd = ops.residual_layernorm_forward(a, w, bias, 1e-5, b=b)
    np.testing.assert_array_equal(res, a + b)
    for got, want in zip((out, mean, rstd), ops.layernorm_forward(a + b, w, bias, 1e-5)):
        np.testing.assert_array_equal(got, want)
    res, out, _, _ = ops.residual_layernorm_forward(a, w, bias)
    np.testing.assert_array_equal(res, a)
    np.testing.assert_array_equal(out, ops.layernorm_forward(a, w, bias)[0])
    g, dres = randn(5, 16), randn(5, 16)
    dx, dw, db, dx_h = ops.layernorm_backward_residual(g, a, w, mean, rstd, dres=dres)
    rdx, rdw, rdb = ops.layernorm_backward(g, a, w, mean, rstd)
    np.testing.assert_array_equal(dx, rdx + dres)
    np.testing.assert_array_equal(dx_h, dx)
    np.testing.assert_array_equal(dw, rdw)
    np.testing.assert_array_equal(db, rdb)


def test_bf16_named_twins_are_the_fp32_ops():
    x, w, b, g = randn(7, 5), randn(3, 5), randn(3), randn(7, 3)
    np.testing.assert_array_equal(ops.linear_forward_bf16(x, w, b), ops.linear_forward(x, w, b))
    for got, want in zip(ops.linear_backward_bf16(g, x, w), ops.linear_backward(g, x, w)):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(ops.gelu_forward_bf16(x), ops.gelu_forward(x))
    dy = randn(7, 5)
    np.testing.assert_array_equal(ops.gelu_backward_bf16(dy, x)[0], ops.gelu_backward(dy, x)[0])
