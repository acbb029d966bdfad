"""GPU twins (afire.cuda) against their CPU twins (afire._C.ops), same inputs.

Every call goes host -> device -> host through the shared context, whose GEMMs are exact
fp32 (TF32 off), so the only differences are summation order and libm:
  - elementwise ops (gelu, residual, patchify, adamw):   rtol 1e-5, atol 1e-6
  - row reductions (layernorm, softmax, l2norm):         rtol 1e-5, atol 1e-5
  - GEMM-based ops (linear, attention, wn_linear):       rtol 1e-4, atol 1e-5 * max|ref|
Skipped with a visible reason when the build has no CUDA backend or no GPU is visible.
"""
import numpy as np
import pytest

from afire import _C

from afire import cuda  # noqa: E402

ops = _C.ops
pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("gpu")]


RNG = np.random.default_rng(20250301)


def randn(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def close(a, b, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               rtol=rtol, atol=atol)


def close_gemm(a, b):
    b = np.asarray(b, np.float64)
    close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(b).max())))


def close_all(got, ref, check=close):
    got = got if isinstance(got, tuple) else (got,)
    ref = ref if isinstance(ref, tuple) else (ref,)
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        if r is None:
            assert g is None
        else:
            assert g.shape == r.shape and g.dtype == np.float32
            check(g, r)


# ---------------------------------------------------------------- rng


def test_rand_uniform_bit_identical_to_cpu():
    for seed, stream, offset, n in [(0, 0, 0, 1), (7, 3, 5, 10001), (2**63 + 1, 2**40, 2**33, 4099)]:
        g = cuda.rand_uniform(n, seed=seed, stream=stream, offset=offset)
        c = _C.rng.uniform(n, seed=seed, stream=stream, offset=offset)
        assert g.dtype == np.float32 and g.shape == (n,)
        assert np.array_equal(g.view(np.uint32), c.view(np.uint32))


# ---------------------------------------------------------------- linear


@pytest.mark.parametrize("N,C,OC", [(1, 1, 1), (67, 96, 130), (394, 192, 576)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear(N, C, OC, bias):
    x, w, dout = randn(N, C), randn(OC, C, scale=0.1), randn(N, OC)
    b = randn(OC) if bias else None
    close_all(cuda.linear_forward(x, w, b), ops.linear_forward(x, w, b), close_gemm)
    close_all(cuda.linear_backward(dout, x, w, has_bias=bias),
              ops.linear_backward(dout, x, w, has_bias=bias), close_gemm)


def test_linear_is_exact_fp32_not_tf32():
    # TF32 keeps 10 mantissa bits (relative error ~1e-3); exact fp32 stays ~1e-6 here.
    x, w = randn(64, 1024), randn(256, 1024)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    got = cuda.linear_forward(x, w)
    assert np.abs(got - ref).max() <= 2e-5 * np.abs(ref).max()


def test_linear_backward_deterministic():
    x, w, dout = randn(300, 128), randn(200, 128), randn(300, 200)
    a = cuda.linear_backward(dout, x, w)
    b = cuda.linear_backward(dout, x, w)
    for u, v in zip(a, b):
        assert np.array_equal(u, v)


# ---------------------------------------------------------------- layernorm


@pytest.mark.parametrize("N,C", [(1, 5), (37, 769), (130, 192)])
def test_layernorm(N, C):
    x = randn(N, C, scale=3.0) + 2.0
    w, b, dout = randn(C), randn(C), randn(N, C)
    got = cuda.layernorm_forward(x, w, b, eps=1e-6)
    ref = ops.layernorm_forward(x, w, b, eps=1e-6)
    close_all(got, ref, lambda g, r: close(g, r, atol=1e-5))
    _, mean, rstd = ref
    close_all(cuda.layernorm_backward(dout, x, w, mean, rstd),
              ops.layernorm_backward(dout, x, w, mean, rstd),
              lambda g, r: close(g, r, rtol=1e-4, atol=1e-4))


# ---------------------------------------------------------------- elementwise


@pytest.mark.parametrize("shape", [(1,), (3, 5, 7), (2, 197, 96)])
def test_gelu(shape):
    x, dout = randn(*shape, scale=3.0), randn(*shape)
    close_all(cuda.gelu_forward(x), ops.gelu_forward(x))
    close_all(cuda.gelu_backward(dout, x), ops.gelu_backward(dout, x))


def test_residual():
    a, b, dout = randn(4, 33, 10), randn(4, 33, 10), randn(4, 33, 10)
    close_all(cuda.residual_forward(a, b), ops.residual_forward(a, b))
    close_all(cuda.residual_backward(dout), ops.residual_backward(dout))


# ---------------------------------------------------------------- softmax


@pytest.mark.parametrize("N,C", [(1, 1), (9, 31), (50, 197), (3, 1000)])
def test_softmax(N, C):
    x, dout = randn(N, C, scale=4.0), randn(N, C)
    got, ref = cuda.softmax_forward(x), ops.softmax_forward(x)
    close_all(got, ref, lambda g, r: close(g, r, atol=1e-6))
    close_all(cuda.softmax_backward(dout, ref), ops.softmax_backward(dout, ref),
              lambda g, r: close(g, r, atol=1e-5))


# ---------------------------------------------------------------- attention


@pytest.mark.parametrize("B,T,D,H", [(1, 1, 8, 1), (2, 17, 48, 4), (2, 197, 192, 3)])
def test_attention(B, T, D, H):
    qkv, dout = randn(B, T, 3 * D), randn(B, T, D)
    got = cuda.attention_forward(qkv, H)
    ref = ops.attention_forward(qkv, H)
    close_all(got, ref, close_gemm)
    att = ref[1]
    close_all(cuda.attention_backward(dout, qkv, att, H), ops.attention_backward(dout, qkv, att, H),
              close_gemm)


def test_attention_backward_deterministic():
    qkv, dout = randn(2, 40, 96), randn(2, 40, 32)
    _, att = cuda.attention_forward(qkv, 2)
    (a,) = cuda.attention_backward(dout, qkv, att, 2)
    (b,) = cuda.attention_backward(dout, qkv, att, 2)
    assert np.array_equal(a, b)


# ---------------------------------------------------------------- patchify


@pytest.mark.parametrize("B,C,S,P", [(1, 1, 4, 4), (2, 3, 16, 4), (2, 1, 32, 16)])
@pytest.mark.parametrize("order", [0, 1])
def test_patchify(B, C, S, P, order):
    img = randn(B, C, S, S)
    patches = cuda.patchify_forward(img, P, order)
    assert np.array_equal(patches, ops.patchify_forward(img, P, order))  # pure data movement
    dp = randn(*patches.shape)
    (dimg,) = cuda.patchify_backward(dp, C, S, P, order)
    assert np.array_equal(dimg, ops.patchify_backward(dp, C, S, P, order)[0])
    assert np.array_equal(cuda.unpatchify(patches, C, S, P, order), img)


# ---------------------------------------------------------------- l2norm


def test_l2norm():
    x, dout = randn(33, 70), randn(33, 70)
    x[3] = 0.0  # zero row: the clamped branch (norm <= eps)
    got = cuda.l2norm_forward(x, eps=1e-12)
    ref = ops.l2norm_forward(x, eps=1e-12)
    close_all(got, ref, lambda g, r: close(g, r, atol=1e-6))
    norm = ref[1]
    close_all(cuda.l2norm_backward(dout, x, norm, eps=1e-6), ops.l2norm_backward(dout, x, norm, eps=1e-6),
              lambda g, r: close(g, r, rtol=1e-4, atol=1e-5))


# ---------------------------------------------------------------- wn_linear


@pytest.mark.parametrize("N,C,K", [(1, 3, 2), (65, 256, 300)])
def test_wn_linear(N, C, K):
    x, v, dout = randn(N, C), randn(K, C), randn(N, K)
    got = cuda.wn_linear_forward(x, v)
    ref = ops.wn_linear_forward(x, v)
    close_all(got, ref, close_gemm)
    _, w_eff, vnorm = ref
    close_all(cuda.wn_linear_backward(dout, x, w_eff, vnorm),
              ops.wn_linear_backward(dout, x, w_eff, vnorm), close_gemm)


# ---------------------------------------------------------------- adamw


def test_adamw_several_steps():
    n = 5000
    p_c = randn(n)
    p_g = p_c.copy()
    m_c, v_c = np.zeros(n, np.float32), np.zeros(n, np.float32)
    m_g, v_g = m_c.copy(), v_c.copy()
    for t in range(1, 6):
        g = randn(n)
        kw = dict(lr=1e-2, t=t, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.05)
        assert ops.adamw_update(p_c, g, m_c, v_c, **kw) is None
        assert cuda.adamw_update(p_g, g, m_g, v_g, **kw) is None
    close(m_g, m_c)
    close(v_g, v_c)
    close(p_g, p_c, atol=1e-6)


# ---------------------------------------------------------------- errors after the device


def test_errors_are_python_exceptions():
    with pytest.raises(TypeError):
        cuda.linear_forward(np.zeros((2, 3)), np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match="weight"):
        cuda.linear_forward(np.zeros((2, 3), np.float32), np.zeros((4, 5), np.float32))
    with pytest.raises(ValueError, match="H=5"):
        cuda.attention_forward(np.zeros((1, 2, 12), np.float32), 5)


# ---------------------------------------------------------------- timing entry points


def test_time_entry_points_small():
    r = cuda.time_linear(64, 32, 48, warmup=1, iters=2)
    assert set(r) == {"forward_ms", "backward_ms"} and r["forward_ms"] > 0 and r["backward_ms"] > 0
    r = cuda.time_attention(2, 9, 16, 2, warmup=1, iters=2)
    assert r["forward_ms"] > 0 and r["backward_ms"] > 0
