"""The bf16 fast path of the GPU trainer (Config.precision="bf16") against its exact fp32 path
(precision="fp32", itself checked against the CPU in test_cuda_trainer.py), `test` preset.
Same seed => same initialisation, the same synthetic lesions and the same batches.

bf16 rounds every GEMM operand of the linear layers and attention (8 significant bits,
relative rounding error <= 2^-9); accumulation, LayerNorm, softmax, the weight-normalised
last layer, losses, master weights and the optimiser stay fp32. A float64 PyTorch emulation
of exactly that rounding on the `test` networks gave rms errors of 0.3% of the output scale
(tokens, restoration) and 8.5e-4 on the head logits, so the tolerances below leave a margin
of about 10x:
  - one step (no update): loss, l_stru, l_cate, l_cst, l_recon within rel 2e-2 of fp32;
    grad norm within rel 5e-2; the SLM is bit-identical (abnormal_fraction equal)
  - gradients: cosine similarity with fp32 > 0.99 for each network's whole gradient, median
    over its tensors > 0.98; all finite; and not bit-equal (the bf16 path did run)
  - 50 steps (config of the fp32 curve test): loss rel gap < 2e-2 at step 0, < 5e-2 at every
    step, < 2e-2 on average; every loss and the final state finite
  - encode / restore of the same weights: |bf16 - fp32| <= 3e-2 (max|fp32| + |fp32|);
    anomaly log score rel 2e-2
  - two bf16 runs: bit-identical (losses, state, encodings)
Every test runs twice: on the bf16 reference path and on the fast bf16 path
(AFIRE_CUDA_FAST=1, cuda/fast.cuh: bf16 activations, cuBLASLt, cuDNN SDPA or our attention),
with the same tolerances; tests/gpu/test_cuda_fast.py checks the fast path's kernels.
Skipped with a visible reason when the build has no CUDA backend or no GPU is visible (the
Config checks at the top run everywhere).
"""
import numpy as np
import pytest

from _util import assert_runs_bit_identical, phantom_like, small_cfg
from afire import AFiRe, Config

pytestmark = pytest.mark.gpu

NETS = ("encoder", "head", "decoder")


@pytest.fixture(autouse=True, params=["reference", "fast"])
def bf16_path(request, monkeypatch):
    """The GPU trainers of a test are made on this bf16 path (read when a model is created)."""
    if request.param == "fast":
        monkeypatch.setenv("AFIRE_CUDA_FAST", "1")
    else:
        monkeypatch.delenv("AFIRE_CUDA_FAST", raising=False)
    return request.param
LOSSES = ("loss", "l_stru", "l_cate", "l_cst", "l_recon")


def test_config_precision_field():
    assert Config().precision == "bf16"
    assert small_cfg(precision="fp32").precision == "fp32"
    with pytest.raises(ValueError, match="precision"):
        Config(precision="fp16")
    c = Config.from_json(small_cfg(precision="fp32").to_json())
    assert c.precision == "fp32"


def test_cpu_ignores_precision():
    x = phantom_like(4, seed=3)
    a = AFiRe(small_cfg(precision="bf16"), device="cpu", steps_per_epoch=2)
    b = AFiRe(small_cfg(precision="fp32"), device="cpu", steps_per_epoch=2)
    assert a._t.gradients(x) == b._t.gradients(x)


def pair(**kw):
    """(fp32, bf16) GPU models from the same configuration and seed."""
    return (AFiRe(small_cfg(precision="fp32", **kw), device="cuda", steps_per_epoch=2),
            AFiRe(small_cfg(precision="bf16", **kw), device="cuda", steps_per_epoch=2))


def cosine(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def close_scaled(got, ref, rel, name):
    ref = np.asarray(ref, np.float64)
    got = np.asarray(got, np.float64)
    assert np.isfinite(got).all(), f"{name}: non-finite values"
    tol = rel * max(float(np.abs(ref).max()), 1e-30) + rel * np.abs(ref)
    bad = np.abs(got - ref) > tol
    assert not bad.any(), (f"{name}: {bad.sum()} of {bad.size} differ, max |diff| "
                           f"{np.abs(got - ref).max():.3g}, max |ref| {np.abs(ref).max():.3g}")


@pytest.mark.usefixtures("gpu")
@pytest.mark.parametrize("objective", ["paper", "released"])
def test_one_step_losses_and_gradients_match_fp32(objective):
    f, h = pair(objective=objective)
    x = phantom_like(4, seed=1)
    sf, sh = f._t.gradients(x), h._t.gradients(x)
    assert sh["abnormal_fraction"] == sf["abnormal_fraction"]
    for k in LOSSES:
        assert np.isfinite(sh[k]), k
        # relative 2e-2 of the term, or 2e-3 of the total: a term near zero (L_stru ~1e-3 on
        # this tiny model) moves by bf16 rounding of the logits (~1e-3 rms) in absolute terms
        assert sh[k] == pytest.approx(sf[k], rel=2e-2, abs=2e-3 * max(1.0, abs(sf["loss"]))), k
    assert sh["grad_norm"] == pytest.approx(sf["grad_norm"], rel=5e-2)
    bf, bh = f._t.buffers(), h._t.buffers()
    for net in NETS:
        gf, gh = bf[f"grad.{net}"], bh[f"grad.{net}"]
        assert np.isfinite(gh).all(), net
        assert not np.array_equal(gf, gh), f"{net}: bf16 gradient equals fp32 bit for bit"
        assert cosine(gh, gf) > 0.99, (net, cosine(gh, gf))
        cos = {}
        for p in h._t.param_table(net):
            o, n = p["offset"], int(np.prod(p["shape"]))
            if np.linalg.norm(gf[o:o + n]) > 0:
                cos[p["name"]] = cosine(gh[o:o + n], gf[o:o + n])
        assert np.median(list(cos.values())) > 0.98, (net, cos)
    assert h.step == 0 and not h._t.prototypes_set


@pytest.mark.usefixtures("gpu")
def test_fifty_bf16_steps_track_the_fp32_loss_curve():
    f, h = pair(epochs=10, warmup_epochs=1)
    lf, lh = [], []
    for i in range(50):
        x = phantom_like(4, seed=100 + i)
        lf.append(f.train_step(x)["loss"])
        lh.append(h.train_step(x)["loss"])
    lf, lh = np.array(lf), np.array(lh)
    assert np.isfinite(lh).all()
    rel = np.abs(lh - lf) / np.abs(lf)
    assert rel[0] < 2e-2, rel
    assert rel.max() < 5e-2, rel
    assert rel.mean() < 2e-2, rel
    for k, v in h.state_tensors().items():
        assert np.isfinite(v).all(), k


@pytest.mark.usefixtures("gpu")
def test_bf16_inference_matches_fp32():
    f, h = pair()
    h._t.load_buffers({k: v for k, v in f._t.buffers().items() if not k.startswith("grad.")})
    x = phantom_like(4, seed=9)
    for branch in ("teacher", "student"):
        close_scaled(h.encode(x, branch), f.encode(x, branch), 3e-2, f"encode {branch}")
    close_scaled(h.restore(x), f.restore(x), 3e-2, "restore")
    np.testing.assert_allclose(h.anomaly_log_score(x), f.anomaly_log_score(x), rtol=2e-2)


@pytest.mark.usefixtures("gpu")
def test_bf16_sees_uploaded_weights():
    # the bf16 weight copies follow every change of the fp32 master weights (load_buffers)
    f, h = pair()
    x = phantom_like(2, seed=4)
    before = h.encode(x, "student")
    v = h._t.buffers()["student.encoder"]
    h._t.load_buffers({"student.encoder": (v * 1.5).astype(np.float32)})
    after = h.encode(x, "student")
    assert not np.allclose(after, before, atol=1e-3)
    f._t.load_buffers({"student.encoder": (v * 1.5).astype(np.float32)})
    close_scaled(after, f.encode(x, "student"), 3e-2, "encode after upload")


@pytest.mark.usefixtures("gpu")
def test_two_bf16_runs_are_bit_identical():
    assert_runs_bit_identical(device="cuda", precision="bf16")


@pytest.mark.usefixtures("gpu")
def test_bf16_vit_shapes_run_and_stay_finite():
    # head dims, decoder width != encoder width, 3 input channels: every GEMM shape path
    cfg = small_cfg(precision="bf16", in_chans=3, decoder_dim=48, decoder_heads=3,
                    per_position_last_layer=False, per_position_mask_token=False)
    m = AFiRe(cfg, device="cuda", steps_per_epoch=2)
    for i in range(3):
        out = m.train_step(phantom_like(4, seed=i))
        assert np.isfinite(out["loss"]) and np.isfinite(out["grad_norm"])
