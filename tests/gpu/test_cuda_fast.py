"""The fast bf16 path of the GPU trainer (AFIRE_CUDA_FAST=1, cuda/fast.cuh): each new kernel
against its CPU twin (the fp32 reference, afire._C.ops) and against a NumPy emulation of the
same bf16 rounding; then whole models against the fp32 path and the bf16 reference path.

Kernel tolerances (bf16 has 8 significant bits: rounding to nearest is within 2^-9 relative):
  - emulated reference = the kernel's bf16 inputs in float64; only fp32 accumulation and the
    rounding of a bf16 output remain: |got - ref| <= 2^-7 |ref| + 1e-5 max|ref| (2^-8 for a
    bias added after an unfused bf16 GEMM output: two roundings);
  - CPU twin (fp32 inputs, never rounded): the input rounding adds ~2^-8 relative per product,
    ~4e-3 rms of the output scale for K-term sums, max ~4x that: |got - ref| <= 3e-2 max|ref|
    (GEMMs, attention), 2^-7 |ref| + 1e-6 for the elementwise GELU on bf16-exact inputs;
  - fp32 outputs of reductions on bf16-exact inputs (residual add, LayerNorm statistics,
    LayerNorm backward, weight gradients): as the fp32 ops in test_cuda_ops.py, rtol 1e-5
    and atol 1e-5 (1e-4 x scale for sums over many rows); the residual add is bit-exact;
  - the bf16 copy of the LayerNorm backward's fp32 output is exactly its rounding;
  - attention: our kernel and cuDNN's against the float64 emulation within 2e-2 max|ref| (the
    probabilities and dS are rounded to bf16 before their GEMMs), lse within 1e-3 (1 + |lse|).
Model tolerances: those of test_cuda_bf16.py (which had ~10x margin over a float64 emulation of
the reference bf16 path); the fast path adds the rounding of GELU inputs and of each branch
output before its residual add, expected to stay within 2x the bf16 error. Reruns must be
bit-identical, as everywhere.

Every test here needs a GPU and skips with a visible reason without one.
"""
import numpy as np
import pytest

from _util import assert_runs_bit_identical, phantom_like, small_cfg
from afire import AFiRe, Config, _C, cuda

ops = _C.ops
pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("gpu")]
RNG = np.random.default_rng(20260517)
NETS = ("encoder", "head", "decoder")
LOSSES = ("loss", "l_stru", "l_cate", "l_cst", "l_recon")


def randn(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def bf16(x):
    """Round float32 to bf16 (nearest even), returned as float32."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32)


def close_rel(got, ref, rel, name="", scale_atol=1e-5):
    ref = np.asarray(ref, np.float64)
    got = np.asarray(got, np.float64)
    assert got.shape == ref.shape, (name, got.shape, ref.shape)
    assert np.isfinite(got).all(), f"{name}: non-finite values"
    tol = rel * np.abs(ref) + scale_atol * max(float(np.abs(ref).max()), 1e-30)
    bad = np.abs(got - ref) > tol
    assert not bad.any(), (f"{name}: {bad.sum()} of {bad.size} differ, max |diff| "
                           f"{np.abs(got - ref).max():.3g}, max |ref| {np.abs(ref).max():.3g}")


def close_scaled(got, ref, rel, name=""):
    close_rel(got, ref, 0.0, name, scale_atol=rel)


# ---------------------------------------------------------------- cuBLASLt linear


SHAPES = [(1, 8, 8), (67, 96, 130), (394, 192, 576), (256, 64, 3072)]


@pytest.mark.parametrize("N,C,OC", SHAPES)
@pytest.mark.parametrize("out_f32", [False, True])
@pytest.mark.parametrize("epilogue", [True, False])
def test_linear_forward_bf16(N, C, OC, out_f32, epilogue):
    x, w, b = randn(N, C), randn(OC, C, scale=0.1), randn(OC)
    got = cuda.linear_forward_bf16(x, w, b, out_f32=out_f32, epilogue=epilogue)
    bias = b if out_f32 else bf16(b)
    xw = bf16(x).astype(np.float64) @ bf16(w).astype(np.float64).T
    ref = xw + bias
    rel = 2.0 ** -7 if out_f32 or epilogue else 2.0 ** -6  # unfused: rounded, +bias, rounded
    close_rel(got, ref, rel, "vs emulation", scale_atol=1e-5 + (0 if out_f32 else 2.0 ** -8))
    close_scaled(got, ops.linear_forward(x, w, b), 3e-2, "vs CPU twin")
    got0 = cuda.linear_forward_bf16(x, w, None, out_f32=out_f32, epilogue=epilogue)
    close_rel(got0, xw, 2.0 ** -7, "no bias", scale_atol=1e-5)


@pytest.mark.parametrize("N,C,OC", SHAPES)
@pytest.mark.parametrize("dinp_f32", [False, True])
@pytest.mark.parametrize("epilogue", [True, False])
def test_linear_backward_bf16(N, C, OC, dinp_f32, epilogue):
    g, x, w = randn(N, OC), randn(N, C), randn(OC, C, scale=0.1)
    dx, dw, db = cuda.linear_backward_bf16(g, x, w, dinp_f32=dinp_f32, epilogue=epilogue)
    g64, x64, w64 = (bf16(a).astype(np.float64) for a in (g, x, w))
    close_rel(dx, g64 @ w64, 2.0 ** -7 if not dinp_f32 else 1e-5, "dinp", scale_atol=1e-5)
    close_rel(dw, g64.T @ x64, 1e-5, "dweight", scale_atol=1e-4)
    close_rel(db, g64.sum(0), 1e-5, "dbias (bf16 dout summed in fp32)", scale_atol=1e-4)
    ref = ops.linear_backward(g, x, w)
    for got, want, name in zip((dx, dw, db), ref, ("dinp", "dweight", "dbias")):
        close_scaled(got, want, 3e-2, f"{name} vs CPU twin")
    _, dw2, db2 = cuda.linear_backward_bf16(g, x, w, has_bias=False, epilogue=epilogue)
    assert db2 is None
    np.testing.assert_array_equal(dw2, dw)


def test_linear_bias_gradient_epilogue_and_column_sum_agree():
    g, x, w = randn(1000, 384), randn(1000, 96), randn(384, 96)
    _, _, db1 = cuda.linear_backward_bf16(g, x, w, epilogue=True)
    _, _, db0 = cuda.linear_backward_bf16(g, x, w, epilogue=False)
    close_rel(db1, db0, 1e-5, "BGRADB vs our column sum", scale_atol=1e-5)
    _, _, again = cuda.linear_backward_bf16(g, x, w, epilogue=False)
    np.testing.assert_array_equal(again, db0)  # fixed order: bit-identical


# ---------------------------------------------------------------- LayerNorm


WIDTHS = [32, 48, 100, 192, 384, 512, 768, 1000]


@pytest.mark.parametrize("W", WIDTHS)
@pytest.mark.parametrize("out_f32", [False, True])
def test_residual_layernorm_forward(W, out_f32):
    N = 301
    a, b = randn(N, W, scale=3.0) + 1.5, bf16(randn(N, W))  # b already bf16: its rounding is exact
    w, bias = randn(W) + 1.0, randn(W)
    res, out, mean, rstd = cuda.residual_layernorm_forward(a, w, bias, 1e-6, b=b, out_f32=out_f32)
    ref = ops.residual_layernorm_forward(a, w, bias, 1e-6, b=b)
    np.testing.assert_array_equal(res, a + b)
    np.testing.assert_allclose(mean, ref[2], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rstd, ref[3], rtol=1e-5, atol=1e-5)
    if out_f32:
        np.testing.assert_allclose(out, ref[1], rtol=1e-5, atol=1e-5)
    else:
        close_rel(out, ref[1], 2.0 ** -8, "bf16 out", scale_atol=1e-5)
    res0, out0, _, _ = cuda.residual_layernorm_forward(a, w, bias, 1e-5, out_f32=True)
    np.testing.assert_array_equal(res0, a)
    np.testing.assert_allclose(out0, ops.layernorm_forward(a, w, bias, 1e-5)[0], rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("W", WIDTHS)
@pytest.mark.parametrize("N", [5, 1031, 3000])
@pytest.mark.parametrize("dout_f32", [False, True])
def test_layernorm_backward_residual(W, N, dout_f32):
    x, w = randn(N, W, scale=2.0), randn(W) + 1.0
    _, mean, rstd = ops.layernorm_forward(x, w, randn(W), 1e-6)
    g, dres = bf16(randn(N, W)), randn(N, W)
    dx, dw, db, dx_h = cuda.layernorm_backward_residual(g, x, w, mean, rstd, dres=dres,
                                                        dout_f32=dout_f32)
    rdx, rdw, rdb, _ = ops.layernorm_backward_residual(g, x, w, mean, rstd, dres=dres)
    np.testing.assert_allclose(dx, rdx, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(rdx).max()))
    np.testing.assert_allclose(dw, rdw, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(rdw).max()))
    np.testing.assert_allclose(db, rdb, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(rdb).max()))
    np.testing.assert_array_equal(dx_h, bf16(dx))
    again = cuda.layernorm_backward_residual(g, x, w, mean, rstd, dres=dres, dout_f32=dout_f32)
    for a, b in zip(again, (dx, dw, db, dx_h)):
        np.testing.assert_array_equal(a, b)  # the block partials are summed in a fixed order
    dx0, _, _, _ = cuda.layernorm_backward_residual(g, x, w, mean, rstd, dout_f32=dout_f32)
    np.testing.assert_allclose(dx0, ops.layernorm_backward(g, x, w, mean, rstd)[0], rtol=1e-4,
                               atol=1e-4 * max(1.0, np.abs(rdx).max()))


# ---------------------------------------------------------------- GELU


@pytest.mark.parametrize("n", [1, 7, 4096, 100001])
def test_gelu_bf16(n):
    x, g = bf16(randn(n, scale=3.0)), bf16(randn(n))
    close_rel(cuda.gelu_forward_bf16(x), ops.gelu_forward(x), 2.0 ** -7, "forward",
              scale_atol=1e-6)
    close_rel(cuda.gelu_backward_bf16(g, x)[0], ops.gelu_backward(g, x)[0], 2.0 ** -7,
              "backward", scale_atol=1e-6)


# ---------------------------------------------------------------- attention


ATT = [(2, 17, 32, 2), (3, 50, 96, 6), (2, 197, 128, 2), (1, 197, 768, 12)]


def emulate_attention(qkv, dout, H):
    """float64 attention on bf16-rounded qkv and dout: out, lse, dqkv."""
    B, T, D3 = qkv.shape
    D = D3 // 3
    hd = D // H
    q, k, v = (bf16(qkv[..., i * D:(i + 1) * D]).astype(np.float64)
               .reshape(B, T, H, hd).transpose(0, 2, 1, 3) for i in range(3))
    s = q @ k.transpose(0, 1, 3, 2) * np.float64(np.float32(1.0) / np.sqrt(np.float32(hd)))
    m = s.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(s - m).sum(-1, keepdims=True)))[..., 0]
    p = np.exp(s - lse[..., None])
    o = p @ v
    g = bf16(dout).astype(np.float64).reshape(B, T, H, hd).transpose(0, 2, 1, 3)
    dv = p.transpose(0, 1, 3, 2) @ g
    dp = g @ v.transpose(0, 1, 3, 2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    scale = 1.0 / np.sqrt(hd)
    dq, dk = ds @ k * scale, ds.transpose(0, 1, 3, 2) @ q * scale
    merge = [a.transpose(0, 2, 1, 3).reshape(B, T, D) for a in (dq, dk, dv)]
    return o.transpose(0, 2, 1, 3).reshape(B, T, D), lse, np.concatenate(merge, -1)


def check_attention(fwd, bwd, B, T, D, H):
    """fwd / bwd: the backend of each direction (1 cuDNN, 2 ours)."""
    qkv, dout = randn(B, T, 3 * D), randn(B, T, D)
    out, lse = cuda.sdpa_forward(qkv, H, backend=fwd)
    o_ref, lse_ref, dqkv_ref = emulate_attention(qkv, dout, H)
    close_scaled(out, o_ref, 2e-2, "out vs emulation")
    close_rel(lse, lse_ref, 1e-3, "lse vs emulation", scale_atol=1e-3)
    cpu_out, cpu_lse = ops.sdpa_forward(qkv, H)
    close_scaled(out, cpu_out, 3e-2, "out vs CPU twin")
    # the backward may run on the other backend's forward (either direction can fall back
    # alone), so the statistics must mean the same on both sides
    (dqkv,) = cuda.sdpa_backward(dout, qkv, out, lse, H, backend=bwd)
    close_scaled(dqkv, dqkv_ref, 2e-2, "dqkv vs emulation")
    close_scaled(dqkv, ops.sdpa_backward(dout, qkv, cpu_out, cpu_lse, H)[0], 3e-2,
                 "dqkv vs CPU twin")
    (again,) = cuda.sdpa_backward(dout, qkv, out, lse, H, backend=bwd)
    np.testing.assert_array_equal(again, dqkv)  # deterministic
    assert np.array_equal(cuda.sdpa_forward(qkv, H, backend=fwd)[0], out)


@pytest.mark.parametrize("B,T,D,H", ATT)
def test_sdpa_our_kernel(B, T, D, H):
    check_attention(2, 2, B, T, D, H)


def cudnn_or_skip(direction, B, T, D, H):
    try:
        if direction == "forward":
            cuda.sdpa_forward(randn(B, T, 3 * D), H, backend=1)
        else:
            cuda.sdpa_backward(randn(B, T, D), randn(B, T, 3 * D), randn(B, T, D),
                               randn(B, H, T), H, backend=1)
    except RuntimeError as e:
        if "unavailable" in str(e):
            pytest.skip(f"cuDNN fused SDPA {direction} not usable here: {e}")
        raise


@pytest.mark.parametrize("B,T,D,H", ATT)
def test_sdpa_cudnn_forward(B, T, D, H):
    cudnn_or_skip("forward", B, T, D, H)
    check_attention(1, 2, B, T, D, H)


@pytest.mark.parametrize("B,T,D,H", ATT)
def test_sdpa_cudnn_backward(B, T, D, H):
    cudnn_or_skip("backward", B, T, D, H)
    check_attention(2, 1, B, T, D, H)


@pytest.mark.parametrize("B,T,D,H", ATT)
def test_sdpa_cudnn_both_directions(B, T, D, H):
    cudnn_or_skip("forward", B, T, D, H)
    cudnn_or_skip("backward", B, T, D, H)
    check_attention(1, 1, B, T, D, H)


def test_sdpa_auto_falls_back_where_cudnn_cannot():
    # hd = 4 is no multiple of 8: cuDNN is never asked, the result is our kernel's
    qkv = randn(2, 9, 3 * 8)
    o_auto, lse_auto = cuda.sdpa_forward(qkv, 2, backend=0)
    o_ours, lse_ours = cuda.sdpa_forward(qkv, 2, backend=2)
    np.testing.assert_array_equal(o_auto, o_ours)
    np.testing.assert_array_equal(lse_auto, lse_ours)
    with pytest.raises(RuntimeError, match="unavailable"):  # head dim 4, or no cuDNN at all
        cuda.sdpa_forward(qkv, 2, backend=1)
    assert "our kernel" in cuda.fast_path_status()


# ---------------------------------------------------------------- whole models


def fast_model(monkeypatch, sdpa="auto", epilogue="1", **kw):
    monkeypatch.setenv("AFIRE_CUDA_FAST", "1")
    monkeypatch.setenv("AFIRE_CUDA_SDPA", sdpa)
    monkeypatch.setenv("AFIRE_CUDA_LT_EPILOGUE", epilogue)
    m = AFiRe(small_cfg(precision="bf16", **kw), device="cuda", steps_per_epoch=2)
    for v in ("AFIRE_CUDA_FAST", "AFIRE_CUDA_SDPA", "AFIRE_CUDA_LT_EPILOGUE"):
        monkeypatch.delenv(v)
    return m


def plain_model(monkeypatch, precision, **kw):
    monkeypatch.delenv("AFIRE_CUDA_FAST", raising=False)
    return AFiRe(small_cfg(precision=precision, **kw), device="cuda", steps_per_epoch=2)


def cosine(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("objective", ["paper", "released"])
@pytest.mark.parametrize("sdpa", ["auto", "ours"])
def test_fast_step_matches_fp32(monkeypatch, objective, sdpa):
    f = plain_model(monkeypatch, "fp32", objective=objective)
    h = fast_model(monkeypatch, sdpa=sdpa, objective=objective)
    x = phantom_like(4, seed=1)
    sf, sh = f._t.gradients(x), h._t.gradients(x)
    assert sh["abnormal_fraction"] == sf["abnormal_fraction"]
    for k in LOSSES:
        assert np.isfinite(sh[k]), k
        assert sh[k] == pytest.approx(sf[k], rel=2e-2, abs=2e-3 * max(1.0, abs(sf["loss"]))), k
    assert sh["grad_norm"] == pytest.approx(sf["grad_norm"], rel=5e-2)
    bf, bh = f._t.buffers(), h._t.buffers()
    for net in NETS:
        gf, gh = bf[f"grad.{net}"], bh[f"grad.{net}"]
        assert np.isfinite(gh).all(), net
        assert cosine(gh, gf) > 0.99, (net, cosine(gh, gf))
        cos = {}
        for p in h._t.param_table(net):
            o, n = p["offset"], int(np.prod(p["shape"]))
            if np.linalg.norm(gf[o:o + n]) > 0:
                cos[p["name"]] = cosine(gh[o:o + n], gf[o:o + n])
        assert np.median(list(cos.values())) > 0.98, (net, cos)


def test_fast_step_matches_the_bf16_reference_path(monkeypatch):
    r = plain_model(monkeypatch, "bf16")
    h = fast_model(monkeypatch)
    x = phantom_like(4, seed=2)
    sr, sh = r._t.gradients(x), h._t.gradients(x)
    for k in LOSSES:
        assert sh[k] == pytest.approx(sr[k], rel=2e-2, abs=2e-3 * max(1.0, abs(sr["loss"]))), k
    br, bh = r._t.buffers(), h._t.buffers()
    for net in NETS:
        assert cosine(bh[f"grad.{net}"], br[f"grad.{net}"]) > 0.99, net


@pytest.mark.parametrize("sdpa,epilogue", [("ours", "1"), ("auto", "0")])
def test_fast_variants_agree(monkeypatch, sdpa, epilogue):
    # the attention fallback and the unfused epilogues compute the same step
    a = fast_model(monkeypatch)
    b = fast_model(monkeypatch, sdpa=sdpa, epilogue=epilogue)
    x = phantom_like(4, seed=3)
    sa, sb = a._t.gradients(x), b._t.gradients(x)
    for k in LOSSES:
        assert sb[k] == pytest.approx(sa[k], rel=1e-2, abs=1e-3), k
    ga, gb = a._t.buffers(), b._t.buffers()
    for net in NETS:
        assert cosine(gb[f"grad.{net}"], ga[f"grad.{net}"]) > 0.995, net


def test_fast_fifty_steps_track_the_fp32_loss_curve(monkeypatch):
    f = plain_model(monkeypatch, "fp32", epochs=10, warmup_epochs=1)
    h = fast_model(monkeypatch, epochs=10, warmup_epochs=1)
    lf, lh = [], []
    for i in range(50):
        x = phantom_like(4, seed=100 + i)
        lf.append(f.train_step(x)["loss"])
        lh.append(h.train_step(x)["loss"])
    lf, lh = np.array(lf), np.array(lh)
    rel = np.abs(lh - lf) / np.abs(lf)
    assert np.isfinite(lh).all()
    assert rel[0] < 2e-2 and rel.max() < 5e-2 and rel.mean() < 2e-2, rel
    for k, v in h.state_tensors().items():
        assert np.isfinite(v).all(), k


def test_fast_inference_matches_fp32(monkeypatch):
    f = plain_model(monkeypatch, "fp32")
    h = fast_model(monkeypatch)
    h._t.load_buffers({k: v for k, v in f._t.buffers().items() if not k.startswith("grad.")})
    x = phantom_like(4, seed=9)
    for branch in ("teacher", "student"):
        close_scaled(h.encode(x, branch), f.encode(x, branch), 3e-2, f"encode {branch}")
    close_scaled(h.restore(x), f.restore(x), 3e-2, "restore")
    np.testing.assert_allclose(h.anomaly_log_score(x), f.anomaly_log_score(x), rtol=2e-2)
    # a training step in between does not change what inference sees
    before = h.encode(x, "teacher")
    h._t.gradients(phantom_like(4, seed=10))
    np.testing.assert_array_equal(h.encode(x, "teacher"), before)


def test_fast_two_runs_are_bit_identical(monkeypatch):
    monkeypatch.setenv("AFIRE_CUDA_FAST", "1")
    assert_runs_bit_identical(device="cuda", precision="bf16")


@pytest.mark.parametrize("kw", [
    dict(in_chans=3, decoder_dim=48, decoder_heads=3, per_position_last_layer=False,
         per_position_mask_token=False),
    dict(learned_pos_embed=True, clip_mode="global"),
])
def test_fast_shapes_run_and_stay_finite(monkeypatch, kw):
    m = fast_model(monkeypatch, **kw)
    for i in range(3):
        out = m.train_step(phantom_like(4, seed=i))
        assert np.isfinite(out["loss"]) and np.isfinite(out["grad_norm"])
    batch = m.encode(phantom_like(3, seed=7), "student")  # a smaller batch than the capacity
    assert np.isfinite(batch).all() and batch.shape[0] == 3


def used_bytes():
    free, total = cuda.memory_info()
    return total - free


def test_fast_inference_allocates_no_training_state(monkeypatch):
    cfg = dict(batch_size=16)
    monkeypatch.setenv("AFIRE_CUDA_FAST", "1")
    m = AFiRe(Config.preset_config("vit_tiny", precision="bf16", **cfg), device="cuda",
              steps_per_epoch=10)
    x = phantom_like(16, s=224, seed=1)
    m.restore(x)  # first use of every shape: cuBLAS / cuDNN handles, plans, workspaces
    m.encode(x, "teacher")
    a = used_bytes()
    m.encode(x, "student")
    m.encode(x, "teacher")
    m.restore(x)
    m.anomaly_log_score(x)
    b = used_bytes()
    m.train_step(x)
    c = used_bytes()
    assert b - a < 16 << 20, f"inference grew device memory by {(b - a) / 2**20:.1f} MiB"
    assert c - b > 64 << 20, f"the first step allocated only {(c - b) / 2**20:.1f} MiB"


def test_fast_uses_less_memory_than_the_reference_path(monkeypatch):
    def grown(fast):
        if fast:
            monkeypatch.setenv("AFIRE_CUDA_FAST", "1")
        else:
            monkeypatch.delenv("AFIRE_CUDA_FAST", raising=False)
        before = used_bytes()
        m = AFiRe(Config.preset_config("vit_tiny", precision="bf16", batch_size=16),
                  device="cuda", steps_per_epoch=10)
        m.train_step(phantom_like(16, s=224, seed=1))
        used = used_bytes() - before
        del m
        return used
    ref, fast = grown(False), grown(True)
    assert fast < 0.8 * ref, (fast / 2**20, ref / 2**20)


def test_fast_path_status_says_what_ran(monkeypatch):
    m = fast_model(monkeypatch)
    m.train_step(phantom_like(4, seed=1))
    s = cuda.fast_path_status()
    assert "cuBLASLt" in s and "forward:" in s and "backward:" in s
    assert "not used yet" not in s, s
