"""The GPU training step (afire._C_cuda.cuda.Trainer behind AFiRe(device="cuda")) against the
CPU trainer, on the `test` preset (same seed => same initialisation and the same SLM).

Both run exact fp32 (the GPU comparisons pin Config.precision="fp32", whose GPU GEMMs have
TF32 off; the bf16 fast path is checked against this fp32 path in test_cuda_bf16.py); the
differences are summation order, libm and FMA contraction. Tolerances:
  - losses and grad norm of one step:        rel 1e-4
  - every gradient tensor (after clipping):   |gpu - cpu| <= 1e-3 * max|cpu tensor| + 1e-3 |cpu|
  - parameters after one AdamW step:          atol 2.5 * lr (a near-zero gradient may flip sign:
                                              Adam's first step moves by ~lr * sign(g)),
                                              moments as gradients with 3e-3 (v is quadratic)
  - 50 steps: loss at step 0 rel 1e-4, every step rel 5e-2, mean relative gap < 1e-2
  - encode / restore: 1e-4 * max|cpu| + 1e-4 |cpu|; anomaly log score rel 1e-4
  - two GPU runs: bit-identical; save on GPU -> load on CPU: bit-identical tensors.
Skipped with a visible reason when the build has no CUDA backend or no GPU is visible.
"""
import numpy as np
import pytest

from _util import assert_runs_bit_identical, phantom_like, small_cfg
from afire import AFiRe

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("gpu")]

NETS = ("encoder", "head", "decoder")


def pair(**kw):
    cfg = small_cfg(precision="fp32", **kw)
    return AFiRe(cfg, device="cpu", steps_per_epoch=2), AFiRe(cfg, device="cuda", steps_per_epoch=2)


def close_scaled(gpu, cpu, rel, name):
    cpu = np.asarray(cpu, np.float64)
    gpu = np.asarray(gpu, np.float64)
    tol = rel * max(float(np.abs(cpu).max()), 1e-30) + rel * np.abs(cpu)
    bad = np.abs(gpu - cpu) > tol
    assert not bad.any(), (f"{name}: {bad.sum()} of {bad.size} differ, max |diff| "
                           f"{np.abs(gpu - cpu).max():.3g}, max |cpu| {np.abs(cpu).max():.3g}")


def per_tensor(model, flat, net):
    for p in model._t.param_table(net):
        n = int(np.prod(p["shape"]))
        yield p["name"], flat[p["offset"]:p["offset"] + n]


def test_same_seed_same_init():
    c, g = pair()
    tc, tg = c.state_tensors(), g.state_tensors()
    assert tc.keys() == tg.keys()
    for k in tc:
        np.testing.assert_array_equal(tc[k], tg[k], err_msg=k)


@pytest.mark.parametrize("objective", ["paper", "released"])
@pytest.mark.parametrize("clip_mode", ["per_tensor", "global"])
def test_one_step_losses_and_every_gradient_match_cpu(objective, clip_mode):
    c, g = pair(objective=objective, clip_mode=clip_mode)
    x = phantom_like(4, seed=1)
    sc, sg = c._t.gradients(x), g._t.gradients(x)
    assert sg["abnormal_fraction"] == sc["abnormal_fraction"]  # the SLM is bit-identical
    for k in ("loss", "l_stru", "l_cate", "l_cst", "l_recon", "grad_norm"):
        assert sg[k] == pytest.approx(sc[k], rel=1e-4, abs=1e-7), k
    for k in ("lr", "weight_decay", "ema_momentum", "teacher_temp", "last_layer_frozen", "step"):
        assert sg[k] == sc[k], k
    bc, bg = c._t.buffers(), g._t.buffers()
    for net in NETS:
        for (name, gc), (_, gg) in zip(per_tensor(c, bc[f"grad.{net}"], net),
                                       per_tensor(g, bg[f"grad.{net}"], net)):
            close_scaled(gg, gc, 1e-3, f"grad.{net}.{name}")
    # gradients() changes no state
    assert g.step == 0 and not g._t.prototypes_set


def test_one_update_matches_cpu():
    c, g = pair(warmup_epochs=0, base_lr=0.05)
    x = phantom_like(4, seed=2)
    sc, sg = c.train_step(x), g.train_step(x)
    assert sg["loss"] == pytest.approx(sc["loss"], rel=1e-4)
    assert g.step == c.step == 1 and g._t.prototypes_set
    lr = sc["lr"]
    assert lr > 0
    tc, tg = c.state_tensors(), g.state_tensors()
    for k in tc:
        a, b = np.asarray(tg[k], np.float64), np.asarray(tc[k], np.float64)
        if k.startswith(("student.", "teacher.")):
            np.testing.assert_allclose(a, b, rtol=0, atol=2.5 * lr, err_msg=k)
        elif k.startswith("adam_"):
            close_scaled(a, b, 3e-3, k)
        else:  # prototypes
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=k)


def test_fifty_steps_track_the_cpu_loss_curve():
    c, g = pair(epochs=10, warmup_epochs=1)
    lc, lg = [], []
    for i in range(50):
        x = phantom_like(4, seed=100 + i)
        lc.append(c.train_step(x)["loss"])
        lg.append(g.train_step(x)["loss"])
    lc, lg = np.array(lc), np.array(lg)
    rel = np.abs(lg - lc) / np.abs(lc)
    assert rel[0] < 1e-4
    assert rel.max() < 5e-2, rel
    assert rel.mean() < 1e-2, rel


def test_two_gpu_runs_are_bit_identical():
    assert_runs_bit_identical(device="cuda", precision="fp32")


def test_inference_matches_cpu(tmp_path):
    c = AFiRe(small_cfg(precision="fp32"), device="cpu", steps_per_epoch=2)
    for i in range(3):
        c.train_step(phantom_like(4, seed=i))
    c.save(tmp_path / "m.safetensors")
    g = AFiRe.load(tmp_path / "m.safetensors", device="cuda")  # upload path, fp32 from the config
    assert g.cfg.precision == "fp32"
    assert g.step == 3
    x = phantom_like(6, seed=9)  # 6 > capacity 4: two batches, the second partial
    for branch in ("teacher", "student"):
        close_scaled(g.encode(x, branch), c.encode(x, branch), 1e-4, f"encode {branch}")
    close_scaled(g.restore(x), c.restore(x), 1e-4, "restore")
    mask = np.zeros((6, 16), np.uint8)
    mask[:, 3:7] = 1
    close_scaled(g.restore(x, mask), c.restore(x, mask), 1e-4, "restore masked")
    np.testing.assert_allclose(g.anomaly_log_score(x), c.anomaly_log_score(x), rtol=1e-4)
    sg, mg = g.anomaly_score(x, return_map=True)
    sc, mc = c.anomaly_score(x, return_map=True)
    np.testing.assert_allclose(np.log(sg), np.log(sc), rtol=1e-4, atol=1e-4)
    close_scaled(mg, mc, 1e-4, "anomaly map")


def test_save_on_gpu_load_on_cpu_and_gpu(tmp_path):
    g = AFiRe(small_cfg(), device="cuda", steps_per_epoch=2)
    for i in range(3):
        g.train_step(phantom_like(4, seed=i))
    g.save(tmp_path / "g.safetensors")
    ref = g.state_tensors()
    for device in ("cpu", "cuda"):
        m = AFiRe.load(tmp_path / "g.safetensors", device=device)
        assert m.step == 3 and m._t.prototypes_set
        got = m.state_tensors()
        assert got.keys() == ref.keys()
        for k in ref:
            np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{device}: {k}")
    # the state_tensors of a GPU model are copies: writing to them changes nothing there
    views = g.state_tensors()
    views["student.encoder.cls_token"][...] = 7.0
    assert not (g.state_tensors()["student.encoder.cls_token"] == 7.0).any()


def test_nonfinite_step_is_refused_and_leaves_state_untouched():
    g = AFiRe(small_cfg(), device="cuda", steps_per_epoch=2)
    g.train_step(phantom_like(4, seed=0))
    bufs = g._t.buffers()
    v = bufs["student.head"].copy()
    v[-10:] = np.nan  # inside the last layer: the logits, hence the loss, become NaN
    g._t.load_buffers({"student.head": v})
    before = {k: a.copy() for k, a in g._t.buffers().items() if not k.startswith("grad.")}
    with pytest.raises(FloatingPointError, match="not updated"):
        g.train_step(phantom_like(4, seed=1))
    after = g._t.buffers()
    assert g.step == 1
    for k, a in before.items():
        assert np.array_equal(a.view(np.uint32), after[k].view(np.uint32)), k


def test_bad_inputs_are_clear_errors():
    g = AFiRe(small_cfg(), device="cuda", steps_per_epoch=2)
    with pytest.raises(TypeError, match="uint8"):
        g.train_step(np.zeros((4, 32, 32), np.float32))
    with pytest.raises(ValueError, match="capacity"):
        g.train_step(np.zeros((5, 32, 32), np.uint8))
    with pytest.raises(KeyError, match="unknown buffer"):
        g._t.load_buffers({"student.nothing": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="expected"):
        g._t.load_buffers({"prototypes": np.zeros(3, np.float32)})
    with pytest.raises(TypeError):
        g._t.load_buffers({"prototypes": np.zeros(256, np.float64)})


def test_teacher_token_target_is_refused_not_ignored():
    # the CUDA trainer computes Eq. 12 only: it must say so rather than train it silently
    with pytest.raises(ValueError, match="teacher_token.*CPU"):
        AFiRe(small_cfg(precision="fp32", stru_target="teacher_token"), device="cuda")
