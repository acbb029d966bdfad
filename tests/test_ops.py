"""afire._C.ops against independent NumPy references (float64), finite differences, edges.

Every C kernel is fp32; references run in float64. Finite differences are taken on the
float64 NumPy forward (central, h=1e-6) and compared with the C backward.
"""
import math

import numpy as np
import pytest

from afire._C import ops

RNG = np.random.default_rng(1234)
erf = np.vectorize(math.erf)


def randn(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def f64(x):
    return np.asarray(x, dtype=np.float64)


def close(a, b, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(f64(a), f64(b), rtol=rtol, atol=atol)


def fd_grad(f, x, dout, h=1e-6):
    """d/dx sum(f(x) * dout) by central differences, x float64."""
    x = f64(x).copy()
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + h
        fp = np.sum(f(x) * dout)
        x[i] = old - h
        fm = np.sum(f(x) * dout)
        x[i] = old
        g[i] = (fp - fm) / (2 * h)
    return g


# ------------------------------------------------------------------ references (float64)

def ref_layernorm(x, w, b, eps):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + eps) * w + b


def ref_gelu(x):
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def ref_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def ref_attention(qkv, H):
    B, T, D3 = qkv.shape
    D = D3 // 3
    hd = D // H
    q, k, v = (qkv[:, :, s * D:(s + 1) * D].reshape(B, T, H, hd).transpose(0, 2, 1, 3)
               for s in range(3))
    att = ref_softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd))
    out = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, D)
    return out, att


def ref_attention_backward(dout, qkv, H):
    B, T, D3 = qkv.shape
    D = D3 // 3
    hd = D // H
    split = [qkv[:, :, s * D:(s + 1) * D].reshape(B, T, H, hd).transpose(0, 2, 1, 3)
             for s in range(3)]
    q, k, v = split
    _, att = ref_attention(qkv, H)
    dy = dout.reshape(B, T, H, hd).transpose(0, 2, 1, 3)
    dv = att.transpose(0, 1, 3, 2) @ dy
    datt = dy @ v.transpose(0, 1, 3, 2)
    # softmax Jacobian applied row by row
    ds = np.einsum("bhij,bhijk->bhik", datt,
                   np.einsum("bhij,jk->bhijk", att, np.eye(T))
                   - np.einsum("bhij,bhik->bhijk", att, att))
    ds /= math.sqrt(hd)
    dq = ds @ k
    dk = ds.transpose(0, 1, 3, 2) @ q
    return np.concatenate([g.transpose(0, 2, 1, 3).reshape(B, T, D) for g in (dq, dk, dv)], -1)


def mae_patchify(img, P):
    """MAE's patchify for C channels: (B,C,S,S) -> (B, L, P*P*C), inner order (p, q, c)."""
    B, C, S, _ = img.shape
    h = S // P
    x = img.reshape(B, C, h, P, h, P)
    x = np.einsum("nchpwq->nhwpqc", x)
    return x.reshape(B, h * h, P * P * C)


def conv_patchify(img, P):
    """Flattening of a stride-P PxP convolution's input windows, inner order (c, p, q)."""
    B, C, S, _ = img.shape
    h = S // P
    x = img.reshape(B, C, h, P, h, P).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(B, h * h, C * P * P)


def mae_sincos(D, G, cls):
    """A NumPy port of MAE's get_2d_sincos_pos_embed (util/pos_embed.py)."""
    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000 ** omega
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gh = np.arange(G, dtype=np.float32)
    gw = np.arange(G, dtype=np.float32)
    grid = np.stack(np.meshgrid(gw, gh), axis=0).reshape(2, 1, G, G)
    emb = np.concatenate([one_d(D // 2, grid[0]), one_d(D // 2, grid[1])], axis=1)
    if cls:
        emb = np.concatenate([np.zeros((1, D)), emb], axis=0)
    return emb


# ------------------------------------------------------------------ linear

@pytest.mark.parametrize("N,C,OC", [(7, 5, 3), (1, 4, 6), (33, 70, 65)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear(N, C, OC, with_bias):
    x, w, b = randn(N, C), randn(OC, C), randn(OC)
    out = ops.linear_forward(x, w, b if with_bias else None)
    ref = f64(x) @ f64(w).T + (f64(b) if with_bias else 0)
    assert out.shape == (N, OC) and out.dtype == np.float32
    close(out, ref, rtol=1e-5, atol=1e-5)
    dy = randn(N, OC)
    dx, dw, db = ops.linear_backward(dy, x, w, has_bias=with_bias)
    close(dx, f64(dy) @ f64(w), atol=1e-4)
    close(dw, f64(dy).T @ f64(x), atol=1e-4)
    if with_bias:
        close(db, f64(dy).sum(0), atol=1e-4)
    else:
        assert db is None


def test_linear_fd():
    x, w, b, dy = randn(3, 4), randn(2, 4), randn(2), randn(3, 2)
    dx, dw, db = ops.linear_backward(dy, x, w)
    close(dx, fd_grad(lambda t: t @ f64(w).T + b, x, dy), atol=1e-5)
    close(dw, fd_grad(lambda t: f64(x) @ t.T + b, w, dy), atol=1e-5)
    close(db, fd_grad(lambda t: f64(x) @ f64(w).T + t, b, dy), atol=1e-5)


# ------------------------------------------------------------------ layernorm

@pytest.mark.parametrize("N,C", [(6, 8), (1, 5), (200, 192)])
def test_layernorm(N, C):
    x = randn(N, C) * 3 + 2
    w, b = randn(C), randn(C)
    out, mean, rstd = ops.layernorm_forward(x, w, b, eps=1e-6)
    close(out, ref_layernorm(f64(x), f64(w), f64(b), 1e-6), atol=2e-5, rtol=1e-4)
    close(mean, f64(x).mean(1), atol=1e-5)
    close(rstd, 1 / np.sqrt(f64(x).var(1) + 1e-6), rtol=1e-4)
    dy = randn(N, C)
    dx, dw, db = ops.layernorm_backward(dy, x, w, mean, rstd)
    # analytic: xhat = (x-m) r; dx = r (g - mean g - xhat mean(g xhat)), g = dy w
    X = f64(x)
    r = 1 / np.sqrt(X.var(1, keepdims=True) + 1e-6)
    xhat = (X - X.mean(1, keepdims=True)) * r
    g = f64(dy) * f64(w)
    close(dx, r * (g - g.mean(1, keepdims=True) - xhat * (g * xhat).mean(1, keepdims=True)),
          atol=1e-4, rtol=1e-4)
    close(dw, (f64(dy) * xhat).sum(0), atol=1e-4, rtol=1e-4)
    close(db, f64(dy).sum(0), atol=1e-4)


def test_layernorm_fd():
    x, w, b, dy = randn(3, 5), randn(5), randn(5), randn(3, 5)
    eps = 1e-5
    _, mean, rstd = ops.layernorm_forward(x, w, b, eps=eps)
    dx, dw, db = ops.layernorm_backward(dy, x, w, mean, rstd)
    close(dx, fd_grad(lambda t: ref_layernorm(t, f64(w), f64(b), eps), x, dy), atol=1e-4)
    close(dw, fd_grad(lambda t: ref_layernorm(f64(x), t, f64(b), eps), w, dy), atol=1e-4)
    close(db, fd_grad(lambda t: ref_layernorm(f64(x), f64(w), t, eps), b, dy), atol=1e-4)


# ------------------------------------------------------------------ gelu, softmax, residual

@pytest.mark.parametrize("shape", [(1,), (3, 4, 5), (70000,)])
def test_gelu(shape):
    x = randn(*shape, scale=3.0)
    close(ops.gelu_forward(x), ref_gelu(f64(x)), atol=1e-6, rtol=1e-5)
    dy = randn(*shape)
    (dx,) = ops.gelu_backward(dy, x)
    X = f64(x)
    ref = f64(dy) * (0.5 * (1 + erf(X / math.sqrt(2))) + X * np.exp(-X * X / 2) / math.sqrt(2 * math.pi))
    close(dx, ref, atol=1e-5, rtol=1e-5)


def test_gelu_fd():
    x, dy = randn(2, 3, scale=2.0), randn(2, 3)
    (dx,) = ops.gelu_backward(dy, x)
    close(dx, fd_grad(ref_gelu, x, dy), atol=1e-5)


@pytest.mark.parametrize("N,C", [(5, 7), (1, 1), (40, 1000)])
def test_softmax(N, C):
    x = randn(N, C, scale=4.0) + 500.0  # large offset: must not overflow
    y = ops.softmax_forward(x)
    close(y, ref_softmax(f64(x)), atol=1e-6, rtol=1e-4)
    close(y.sum(1), np.ones(N), atol=1e-5)
    dy = randn(N, C)
    (dx,) = ops.softmax_backward(dy, y)
    Y = f64(y)
    jac = np.einsum("ij,jk->ijk", Y, np.eye(C)) - np.einsum("ij,ik->ijk", Y, Y)
    close(dx, np.einsum("ij,ijk->ik", f64(dy), jac), atol=1e-5, rtol=1e-4)


def test_softmax_fd():
    x, dy = randn(3, 4), randn(3, 4)
    (dx,) = ops.softmax_backward(dy, ops.softmax_forward(x))
    close(dx, fd_grad(ref_softmax, x, dy), atol=1e-5)


def test_residual():
    a, b, dy = randn(4, 3, 2), randn(4, 3, 2), randn(4, 3, 2)
    close(ops.residual_forward(a, b), f64(a) + f64(b), atol=1e-6)
    da, db = ops.residual_backward(dy)
    np.testing.assert_array_equal(da, dy)
    np.testing.assert_array_equal(db, dy)
    assert da is not db


# ------------------------------------------------------------------ attention

@pytest.mark.parametrize("B,T,D,H", [(2, 5, 12, 3), (1, 1, 8, 2), (2, 17, 32, 4), (1, 50, 64, 1)])
def test_attention(B, T, D, H):
    qkv = randn(B, T, 3 * D)
    out, att = ops.attention_forward(qkv, H)
    rout, ratt = ref_attention(f64(qkv), H)
    assert out.shape == (B, T, D) and att.shape == (B, H, T, T)
    close(out, rout, atol=1e-5, rtol=1e-4)
    close(att, ratt, atol=1e-6, rtol=1e-4)
    dy = randn(B, T, D)
    (dqkv,) = ops.attention_backward(dy, qkv, att, H)
    close(dqkv, ref_attention_backward(f64(dy), f64(qkv), H), atol=1e-4, rtol=1e-4)


def test_attention_fd():
    B, T, D, H = 1, 3, 4, 2
    qkv, dy = randn(B, T, 3 * D), randn(B, T, D)
    _, att = ops.attention_forward(qkv, H)
    (dqkv,) = ops.attention_backward(dy, qkv, att, H)
    close(dqkv, fd_grad(lambda t: ref_attention(t, H)[0], qkv, dy), atol=1e-4)


def test_attention_deterministic_and_exact_gradients():
    qkv, dy = randn(3, 20, 48), randn(3, 20, 16)
    out1, att1 = ops.attention_forward(qkv, 4)
    out2, att2 = ops.attention_forward(qkv, 4)
    np.testing.assert_array_equal(out1, out2)
    g1 = ops.attention_backward(dy, qkv, att1, 4)[0]
    g2 = ops.attention_backward(dy, qkv, att1, 4)[0]
    np.testing.assert_array_equal(g1, g2)  # fresh zeros every call: no accumulation leak


def test_attention_one_token():
    # T = 1: attention weight 1, output = v, gradients flow to v only
    qkv, dy = randn(2, 1, 6), randn(2, 1, 2)
    out, att = ops.attention_forward(qkv, 2)
    np.testing.assert_array_equal(att, np.ones((2, 2, 1, 1), np.float32))
    close(out, qkv[:, :, 4:], atol=1e-7)
    (dqkv,) = ops.attention_backward(dy, qkv, att, 2)
    close(dqkv[:, :, :4], np.zeros((2, 1, 4)), atol=1e-7)
    close(dqkv[:, :, 4:], dy, atol=1e-7)


@pytest.mark.parametrize("B,T,D,H", [(2, 5, 8, 2), (1, 70, 16, 4), (3, 1, 6, 2), (1, 131, 8, 1)])
def test_attention_fused(B, T, D, H):
    # the CPU model's attention: no T x T saved; same outputs and gradients as the T x T op,
    # bit for bit (the backward recomputes the forward's probabilities exactly)
    qkv, dy = randn(B, T, 3 * D), randn(B, T, D)
    out, stats = ops.attention_fused_forward(qkv, H)
    assert out.shape == (B, T, D) and stats.shape == (B, H, T, 2)
    rout, ratt = ref_attention(f64(qkv), H)
    close(out, rout, atol=1e-5, rtol=1e-4)
    s = np.einsum("bthi,bshi->bhts", f64(qkv[..., :D]).reshape(B, T, H, -1),
                  f64(qkv[..., D:2 * D]).reshape(B, T, H, -1)) / math.sqrt(D // H)
    close(stats[..., 0], s.max(-1), atol=1e-5, rtol=1e-5)
    close(stats[..., 1], 1.0 / np.exp(s - s.max(-1, keepdims=True)).sum(-1), rtol=1e-5)
    (dqkv,) = ops.attention_fused_backward(dy, qkv, stats, H)
    close(dqkv, ref_attention_backward(f64(dy), f64(qkv), H), atol=1e-4, rtol=1e-4)
    out_tt, att = ops.attention_forward(qkv, H)
    np.testing.assert_array_equal(out, out_tt)
    np.testing.assert_array_equal(dqkv, ops.attention_backward(dy, qkv, att, H)[0])


def test_attention_fused_fd():
    B, T, D, H = 1, 3, 4, 2
    qkv, dy = randn(B, T, 3 * D), randn(B, T, D)
    _, stats = ops.attention_fused_forward(qkv, H)
    (dqkv,) = ops.attention_fused_backward(dy, qkv, stats, H)
    close(dqkv, fd_grad(lambda t: ref_attention(t, H)[0], qkv, dy), atol=1e-4)


# ------------------------------------------------------------------ patchify

@pytest.mark.parametrize("B,C,S,P", [(2, 3, 8, 4), (1, 1, 6, 2), (2, 2, 4, 4), (1, 3, 5, 1)])
def test_patchify_orders(B, C, S, P):
    img = randn(B, C, S, S)
    pqc = ops.patchify_forward(img, P, ops.PATCH_PQC)
    cpq = ops.patchify_forward(img, P, order=ops.PATCH_CPQ)
    np.testing.assert_array_equal(pqc, mae_patchify(img, P))
    np.testing.assert_array_equal(cpq, conv_patchify(img, P))
    if C == 1:
        np.testing.assert_array_equal(pqc, cpq)
    for order, pt in ((ops.PATCH_PQC, pqc), (ops.PATCH_CPQ, cpq)):
        np.testing.assert_array_equal(ops.unpatchify(pt, C, S, P, order), img)
        # patchify is a permutation: its adjoint (the backward) is the inverse
        (dimg,) = ops.patchify_backward(pt, C, S, P, order)
        np.testing.assert_array_equal(dimg, img)


def test_patchify_conv_equivalence():
    # CPQ patches @ conv weight flattened [D, C*P*P] == stride-P convolution
    B, C, S, P, D = 1, 2, 8, 4, 3
    img, w = randn(B, C, S, S), randn(D, C, P, P)
    out = ops.patchify_forward(img, P, ops.PATCH_CPQ) @ w.reshape(D, -1).T
    G = S // P
    for gy in range(G):
        for gx in range(G):
            win = f64(img[0, :, gy * P:(gy + 1) * P, gx * P:(gx + 1) * P])
            close(out[0, gy * G + gx], np.einsum("cpq,dcpq->d", win, f64(w)), atol=1e-5)


# ------------------------------------------------------------------ sincos

@pytest.mark.parametrize("D,G,cls", [(16, 4, True), (8, 3, False), (768, 14, True), (4, 1, False)])
def test_sincos(D, G, cls):
    out = ops.sincos_2d_embed(D, G, cls=cls)
    ref = mae_sincos(D, G, cls)
    assert out.shape == ref.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, ref.astype(np.float32), rtol=0, atol=1e-6)
    if cls:
        assert not out[0].any()
    # first D/2 channels vary along columns (j), not rows (i)
    r = 1 if cls else 0
    if G > 1:
        np.testing.assert_array_equal(out[r + 0, : D // 2], out[r + G, : D // 2])  # (0,0) vs (1,0)


# ------------------------------------------------------------------ l2norm

def ref_l2norm(x, eps):
    n = np.sqrt((x * x).sum(-1, keepdims=True))
    return x / np.maximum(n, eps)


def test_l2norm():
    x = randn(9, 6)
    x[3] = 0.0  # zero row: denominator clamps to eps
    out, norm = ops.l2norm_forward(x, eps=1e-12)
    close(out, ref_l2norm(f64(x), 1e-12), atol=1e-6)
    close(norm, np.linalg.norm(f64(x), axis=1), rtol=1e-6)
    dy = randn(9, 6)
    (dx,) = ops.l2norm_backward(dy, x, norm, eps=1e-12)
    X, DY = f64(x), f64(dy)
    n = np.linalg.norm(X, axis=1, keepdims=True)
    ref = np.where(n > 1e-12, (DY - X * (X * DY).sum(1, keepdims=True) / np.maximum(n, 1e-12) ** 2)
                   / np.maximum(n, 1e-12), DY / 1e-12)
    close(dx[[0, 1, 2, 4, 5, 6, 7, 8]], ref[[0, 1, 2, 4, 5, 6, 7, 8]], atol=1e-5, rtol=1e-4)
    close(dx[3], ref[3], rtol=1e-6)


def test_l2norm_fd():
    x, dy = randn(2, 4), randn(2, 4)
    eps = 1e-6
    _, norm = ops.l2norm_forward(x, eps=eps)
    (dx,) = ops.l2norm_backward(dy, x, norm, eps=eps)
    close(dx, fd_grad(lambda t: ref_l2norm(t, eps), x, dy), atol=1e-4)


# ------------------------------------------------------------------ wn_linear

def ref_wn(x, v):
    return x @ (v / np.linalg.norm(v, axis=1, keepdims=True)).T


@pytest.mark.parametrize("N,C,K", [(5, 4, 3), (1, 6, 1), (64, 32, 40)])
def test_wn_linear(N, C, K):
    x, v = randn(N, C), randn(K, C, scale=2.0)
    out, w_eff, vnorm = ops.wn_linear_forward(x, v)
    close(out, ref_wn(f64(x), f64(v)), atol=1e-5, rtol=1e-5)
    close(vnorm, np.linalg.norm(f64(v), axis=1), rtol=1e-6)
    close(np.linalg.norm(f64(w_eff), axis=1), np.ones(K), atol=1e-6)
    dy = randn(N, K)
    dx, dv = ops.wn_linear_backward(dy, x, w_eff, vnorm)
    V = f64(v)
    nrm = np.linalg.norm(V, axis=1, keepdims=True)
    W = V / nrm
    Gw = f64(dy).T @ f64(x)
    close(dx, f64(dy) @ W, atol=1e-4, rtol=1e-4)
    close(dv, (Gw - W * (W * Gw).sum(1, keepdims=True)) / nrm, atol=1e-4, rtol=1e-4)


def test_wn_linear_fd():
    x, v, dy = randn(3, 4), randn(2, 4), randn(3, 2)
    _, w_eff, vnorm = ops.wn_linear_forward(x, v)
    dx, dv = ops.wn_linear_backward(dy, x, w_eff, vnorm)
    close(dx, fd_grad(lambda t: ref_wn(t, f64(v)), x, dy), atol=1e-5)
    close(dv, fd_grad(lambda t: ref_wn(f64(x), t), v, dy), atol=1e-5)


def test_wn_linear_lowmem_path_accumulates():
    # the allocation-free path (taken when malloc fails) must equal dv0 + the main path's dv
    x, v, dy = randn(7, 5), randn(4, 5), randn(7, 4)
    _, w_eff, vnorm = ops.wn_linear_forward(x, v)
    _, dv = ops.wn_linear_backward(dy, x, w_eff, vnorm)
    dv0 = randn(4, 5)
    close(ops._wn_linear_backward_dv_lowmem(dv0, dy, x, w_eff, vnorm), f64(dv0) + f64(dv),
          atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ adamw

def test_adamw_matches_torch_semantics():
    n = 50
    p, m, v = randn(n), np.zeros(n, np.float32), np.zeros(n, np.float32)
    P, M, V = f64(p), np.zeros(n), np.zeros(n)
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.999, 1e-8, 0.05
    for t in range(1, 8):
        g = randn(n)
        ops.adamw_update(p, g, m, v, lr=lr, t=t, beta1=b1, beta2=b2, eps=eps, weight_decay=wd)
        G = f64(g)
        P *= 1 - lr * wd
        M = b1 * M + (1 - b1) * G
        V = b2 * V + (1 - b2) * G * G
        P -= (lr / (1 - b1 ** t)) * M / (np.sqrt(V) / math.sqrt(1 - b2 ** t) + eps)
    close(m, M, atol=1e-6, rtol=1e-5)
    close(v, V, atol=1e-7, rtol=1e-5)
    close(p, P, atol=1e-5, rtol=1e-5)


def test_adamw_large_and_first_step():
    # first Adam step moves each weight by lr * g / (|g| + eps): ~lr * sign(g); this also
    # runs the OpenMP path (n > 2^15)
    n = 100000
    p, g = randn(n, scale=0.01), randn(n)
    p0 = p.copy()
    m, v = np.zeros_like(p), np.zeros_like(p)
    ops.adamw_update(p, g, m, v, lr=1e-3, t=1)
    G = f64(g)
    close(p0 - p, 1e-3 * G / (np.abs(G) + 1e-8), atol=2e-9, rtol=1e-5)


def test_adamw_inplace_requirements():
    p, g = randn(4, 4), randn(4, 4)
    m, v = np.zeros_like(p), np.zeros_like(p)
    with pytest.raises(ValueError, match="params"):
        ops.adamw_update(p.T, g, m, v, lr=1e-3, t=1)  # non-contiguous: cannot update in place
    with pytest.raises(TypeError, match="m"):
        ops.adamw_update(p, g, m.astype(np.float64), v, lr=1e-3, t=1)
    ro = v.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="v"):
        ops.adamw_update(p, g, m, ro, lr=1e-3, t=1)
    with pytest.raises(ValueError, match="t"):
        ops.adamw_update(p, g, m, v, lr=1e-3, t=0)
    with pytest.raises(ValueError, match="grads"):
        ops.adamw_update(p, g[:2], m, v, lr=1e-3, t=1)
    # a non-contiguous gradient is fine (read only)
    g2 = np.asfortranarray(g)
    p2, m2, v2 = p.copy(), m.copy(), v.copy()
    ops.adamw_update(p, g, m, v, lr=1e-3, t=1)
    ops.adamw_update(p2, g2, m2, v2, lr=1e-3, t=1)
    np.testing.assert_array_equal(p, p2)


# ------------------------------------------------------------------ argument checking

def test_noncontiguous_inputs_match_contiguous():
    big = randn(6, 20)
    x = big[:, ::2]  # strided view, (6, 10)
    w = randn(10, 4).T  # transposed view, (4, 10)
    assert not x.flags.c_contiguous and not w.flags.c_contiguous
    np.testing.assert_array_equal(ops.linear_forward(x, w), ops.linear_forward(x.copy(), w.copy()))
    np.testing.assert_array_equal(ops.gelu_forward(x), ops.gelu_forward(x.copy()))
    qkv = randn(2, 5, 24).transpose(1, 0, 2)  # (5, 2, 24) view
    np.testing.assert_array_equal(ops.attention_forward(qkv, 2)[0],
                                  ops.attention_forward(qkv.copy(), 2)[0])


def test_wrong_dtype_is_typeerror():
    x64 = np.zeros((3, 4))
    with pytest.raises(TypeError, match="inp"):
        ops.linear_forward(x64, randn(2, 4))
    with pytest.raises(TypeError, match="weight"):
        ops.layernorm_forward(randn(3, 4), np.ones(4), randn(4))
    with pytest.raises(TypeError, match="qkv"):
        ops.attention_forward([[[0.0] * 6]], 2)
    with pytest.raises(TypeError, match="img"):
        ops.patchify_forward(np.zeros((1, 1, 4, 4), np.uint8), 2)


def test_wrong_shape_is_valueerror():
    with pytest.raises(ValueError, match="weight"):
        ops.linear_forward(randn(3, 4), randn(2, 5))
    with pytest.raises(ValueError, match="bias"):
        ops.linear_forward(randn(3, 4), randn(2, 4), randn(3))
    with pytest.raises(ValueError, match="inp"):
        ops.linear_forward(randn(3, 4, 1), randn(2, 4))
    with pytest.raises(ValueError, match="dout"):
        ops.linear_backward(randn(3, 3), randn(3, 4), randn(2, 4))
    with pytest.raises(ValueError, match="mean"):
        ops.layernorm_backward(randn(3, 4), randn(3, 4), randn(4), randn(2), randn(3))
    with pytest.raises(ValueError, match="divide"):
        ops.attention_forward(randn(1, 2, 15), 2)  # D=5, H=2
    with pytest.raises(ValueError, match="3\\*D"):
        ops.attention_forward(randn(1, 2, 16), 2)
    with pytest.raises(ValueError, match="H"):
        ops.attention_forward(randn(1, 2, 12), 0)
    with pytest.raises(ValueError, match="att"):
        ops.attention_backward(randn(1, 2, 4), randn(1, 2, 12), randn(1, 2, 2, 3), 2)
    with pytest.raises(ValueError, match="divide"):
        ops.patchify_forward(randn(1, 1, 6, 6), 4)
    with pytest.raises(ValueError, match="img"):
        ops.patchify_forward(randn(1, 1, 6, 4), 2)
    with pytest.raises(ValueError, match="patches"):
        ops.unpatchify(randn(1, 4, 8), 1, 4, 2)  # needs P*P*C = 4
    with pytest.raises(ValueError, match="order"):
        ops.patchify_forward(randn(1, 1, 4, 4), 2, order=2)
    with pytest.raises(ValueError, match="divisible by 4"):
        ops.sincos_2d_embed(6, 2)
    with pytest.raises(ValueError, match="G"):
        ops.sincos_2d_embed(8, 0)
    with pytest.raises(ValueError, match="non-empty"):
        ops.softmax_forward(np.zeros((0, 3), np.float32))
    with pytest.raises(ValueError, match="b"):
        ops.residual_forward(randn(2, 3), randn(3, 2))
    with pytest.raises(ValueError, match="row 1"):
        v = randn(3, 4)
        v[1] = 0
        ops.wn_linear_forward(randn(2, 4), v)
    with pytest.raises(ValueError, match="eps"):
        ops.layernorm_forward(randn(2, 3), randn(3), randn(3), eps=-1.0)


def test_results_do_not_depend_on_thread_count():
    # GEMMs are split over OpenMP threads without splitting the K reduction, and every other
    # reduction has a fixed order: the bits must not change with OMP_NUM_THREADS
    import os
    import subprocess
    import sys
    code = (
        "import hashlib, numpy as np\n"
        "from afire._C import ops\n"
        "r = np.random.default_rng(5)\n"
        "x = r.standard_normal((400, 96), dtype=np.float32)\n"
        "w = r.standard_normal((130, 96), dtype=np.float32)\n"
        "dy = r.standard_normal((400, 130), dtype=np.float32)\n"
        "q = r.standard_normal((2, 40, 48), dtype=np.float32)\n"
        "o, a = ops.attention_forward(q, 4)\n"
        "ts = [ops.linear_forward(x, w, w[:, 0].copy()), *ops.linear_backward(dy, x, w), o,\n"
        "      ops.attention_backward(o, q, a, 4)[0], *ops.layernorm_forward(x, w[0], w[1]),\n"
        "      *ops.layernorm_backward(x, x, w[0], x[:, 0].copy(), x[:, 1].copy())]\n"
        "print(hashlib.sha256(b''.join(t.tobytes() for t in ts)).hexdigest())\n")
    digests = set()
    for n in ("1", "2", "3"):
        env = dict(os.environ, OMP_NUM_THREADS=n)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True)
        digests.add(out.stdout.strip())
    assert len(digests) == 1


def test_gelu_wide_range_accuracy():
    # the vectorised normal CDF must hold over the whole float range, both tails included
    x = np.linspace(-12, 12, 4801).astype(np.float32)
    X = f64(x)
    ref = 0.5 * X * np.array([math.erfc(-v / math.sqrt(2)) for v in X])
    g = f64(ops.gelu_forward(x))
    np.testing.assert_allclose(g, ref, rtol=2e-5, atol=1e-6)
    big = np.abs(ref) > 1e-3
    assert np.max(np.abs(g - ref)[big] / np.abs(ref[big])) < 3e-6
    lo, hi = ops.gelu_forward(np.array([-200.0, 200.0], np.float32))
    assert abs(lo) < 1e-30 and hi == 200.0


# ------------------------------------------------------------------ bf16 GEMMs (precision="bf16")

def bf16_round(x):
    """x rounded to bfloat16 (nearest even), as float64."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.astype(np.uint32).view(np.float32).astype(np.float64)


@pytest.mark.parametrize("N,C,OC", [(1, 1, 1), (3, 5, 7), (70, 33, 65), (197, 64, 96)])
def test_linear_bf16_is_the_product_of_bf16_inputs(N, C, OC):
    # exact products of the bf16-rounded inputs, summed in fp32: within fp32 rounding of the
    # float64 product of the same rounded inputs (K <= 197 terms)
    x, w, b, dy = randn(N, C), randn(OC, C), randn(OC), randn(N, OC)
    out = ops.cpu_linear_forward_bf16(x, w, b)
    close(out, bf16_round(x) @ bf16_round(w).T + b, rtol=1e-5, atol=1e-5)
    dinp, dw, db = ops.cpu_linear_backward_bf16(dy, x, w)
    close(dinp, bf16_round(dy) @ bf16_round(w), rtol=1e-5, atol=1e-5)
    close(dw, bf16_round(dy).T @ bf16_round(x), rtol=1e-5, atol=1e-5)
    close(db, f64(dy).sum(0), rtol=1e-6, atol=1e-5)
    # against fp32: bf16 has 8 significant bits (relative rounding 2^-9 per operand)
    ref = f64(x) @ f64(w).T + b
    assert np.abs(out - ref).max() <= 2e-2 * np.abs(ref).max()
    close(ops.matmul_bf16(x, w.T.copy()), bf16_round(x) @ bf16_round(w).T, rtol=1e-5, atol=1e-5)


def test_linear_bf16_rounds_to_nearest_even():
    # 1 + 2^-8 is a tie between bf16 1 and 1 + 2^-7: nearest even is 1; 1 + 3 * 2^-8 -> 1 + 2^-6
    x = np.array([[1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8]], np.float32)
    w = np.eye(2, dtype=np.float32)
    np.testing.assert_array_equal(ops.cpu_linear_forward_bf16(x, w), [[1.0, 1 + 2.0 ** -6]])


# ------------------------------------------------------------------ fused row-tile kernels

def ref_layernorm_dx(dy, x, w, eps):
    """Input gradient of LayerNorm (float64)."""
    m = x.mean(-1, keepdims=True)
    s = 1.0 / np.sqrt(((x - m) ** 2).mean(-1, keepdims=True) + eps)
    xh, g = (x - m) * s, dy * w
    return s * (g - g.mean(-1, keepdims=True) - xh * (g * xh).mean(-1, keepdims=True))


def ref_gelu_grad(x):
    return 0.5 * (1.0 + erf(x / math.sqrt(2.0))) + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


# N spans one tile, several, and a ragged last tile (tiles are 64-256 rows)
@pytest.mark.parametrize("N", [1, 70, 600])
def test_fused_block_kernels(N):
    C, OC, HC, eps = 24, 40, 96, 1e-6
    x, lw, lb = randn(N, C), 1 + randn(C, scale=0.1), randn(C, scale=0.1)
    w, b = randn(OC, C, scale=0.2), randn(OC)
    y, mean, rstd, out = ops.layernorm_linear_forward(x, lw, lb, w, b, eps)
    ry = ref_layernorm(f64(x), f64(lw), f64(lb), eps)
    close(y, ry, atol=1e-5)
    close(out, ry @ f64(w).T + b, atol=1e-4, rtol=1e-4)
    # composed ops give the same rows (the fused kernel only changes where they run)
    np.testing.assert_array_equal(y, ops.layernorm_forward(x, lw, lb, eps)[0])

    res, lw2, lb2 = randn(N, OC), 1 + randn(OC, scale=0.1), randn(OC, scale=0.1)
    r, y2, m2, s2 = ops.linear_residual_layernorm_forward(x, w, b, res, lw2, lb2, eps)
    rr = f64(x) @ f64(w).T + b + res
    close(r, rr, atol=1e-4, rtol=1e-4)
    close(y2, ref_layernorm(f64(r), f64(lw2), f64(lb2), eps), atol=1e-5)

    w1, b1, w2, b2 = randn(HC, C, scale=0.2), randn(HC), randn(C, HC, scale=0.1), randn(C)
    h, g, o = ops.mlp_forward(x, w1, b1, w2, b2, x)
    rh = f64(x) @ f64(w1).T + b1
    close(h, rh, atol=1e-4, rtol=1e-4)
    close(g, ref_gelu(f64(h)), atol=1e-5, rtol=1e-5)
    close(o, f64(g) @ f64(w2).T + b2 + x, atol=1e-4, rtol=1e-4)
    _, _, o0 = ops.mlp_forward(x, w1, b1, w2, b2)  # no residual
    close(o0, f64(g) @ f64(w2).T + b2, atol=1e-4, rtol=1e-4)

    dout = randn(N, C)
    dh, g2 = ops.mlp_backward_data(dout, h, w2)
    np.testing.assert_array_equal(g2, g)  # the recomputed activation is the forward's
    close(dh, (f64(dout) @ f64(w2)) * ref_gelu_grad(f64(h)), atol=1e-4, rtol=1e-4)

    dr = randn(N, OC)
    dx, dy = ops.linear_layernorm_backward_data(dr, w, x, lw, mean, rstd, res[:, :C].copy())
    close(dy, f64(dr) @ f64(w), atol=1e-4, rtol=1e-4)
    close(dx, ref_layernorm_dx(f64(dy), f64(x), f64(lw), eps) + res[:, :C], atol=1e-4,
          rtol=1e-4)
    dx0, _ = ops.linear_layernorm_backward_data(dr, w, x, lw, mean, rstd)
    close(dx0, dx - res[:, :C], atol=1e-5)


def test_fused_kernels_thread_count_invariant():
    """Tiles depend on N only: the same bits with 1 and 2 threads (fresh processes)."""
    import os
    import subprocess
    import sys
    code = ("import hashlib, numpy as np; from afire._C import ops; "
            "r = np.random.default_rng(0); f = lambda *s: r.standard_normal(s).astype(np.float32); "
            "x, w1, b1, w2, b2 = f(1200, 64), f(256, 64), f(256), f(64, 256), f(64); "
            "h, g, o = ops.mlp_forward(x, w1, b1, w2, b2, x); "
            "md5 = lambda a: hashlib.md5(a.tobytes()).hexdigest(); "
            "print(md5(o), md5(ops.mlp_backward_data(o, h, w2)[0]))")
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=dict(os.environ, OMP_NUM_THREADS=str(t))).stdout
            for t in (1, 2)]
    assert outs[0] and outs[0] == outs[1]
