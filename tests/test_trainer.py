"""The one-call training step: determinism, schedules, edge cases, finite differences."""
import numpy as np
import pytest

import afire
from _util import phantom_like, small_cfg
from afire import AFiRe


def test_step_reports_everything():
    m = AFiRe(small_cfg(), steps_per_epoch=3)
    out = m.train_step(phantom_like(4))
    for key in ("loss", "l_stru", "l_cate", "l_cst", "l_recon", "lr", "weight_decay",
                "ema_momentum", "teacher_temp", "grad_norm", "abnormal_fraction"):
        assert np.isfinite(out[key]), key
    assert out["step"] == 0 and m.step == 1
    assert out["lr"] == 0.0  # linear warm-up starts at 0 (METHOD §5)
    assert out["weight_decay"] == pytest.approx(0.04)
    assert out["ema_momentum"] == pytest.approx(0.996)
    assert out["teacher_temp"] == pytest.approx(0.04)
    assert out["last_layer_frozen"] is True
    assert 0.0 < out["abnormal_fraction"] < 1.0
    assert out["loss"] == pytest.approx(out["l_stru"] + out["l_cate"] + out["l_recon"], rel=1e-6)


def test_schedules_follow_method():
    cfg = small_cfg(epochs=4, warmup_epochs=1)
    m = AFiRe(cfg, steps_per_epoch=2)
    rows = [m.train_step(phantom_like(4, seed=i)) for i in range(8)]
    peak = cfg.lr
    assert rows[1]["lr"] == pytest.approx(peak / 2, rel=1e-6)
    assert rows[2]["lr"] == pytest.approx(peak, rel=1e-6)
    assert rows[-1]["lr"] < rows[3]["lr"]
    assert all(r["last_layer_frozen"] for r in rows[:2]) and not rows[2]["last_layer_frozen"]
    wds = [r["weight_decay"] for r in rows]
    assert wds == sorted(wds) and wds[-1] < 0.4
    emas = [r["ema_momentum"] for r in rows]
    assert emas == sorted(emas) and emas[-1] < 1.0


def test_two_runs_same_seed_are_bit_identical():
    def run(seed):
        m = AFiRe(small_cfg(seed=seed), steps_per_epoch=2)
        return [m.train_step(phantom_like(4, seed=i)) for i in range(4)], m
    a, ma = run(3)
    b, mb = run(3)
    for ra, rb in zip(a, b):
        assert ra == rb
    np.testing.assert_array_equal(ma.encode(phantom_like(2)), mb.encode(phantom_like(2)))
    c, _ = run(4)
    assert c[0]["loss"] != a[0]["loss"]


@pytest.mark.parametrize("objective", ["paper", "released"])
def test_edge_cases_never_nan(objective):
    m = AFiRe(small_cfg(objective=objective), steps_per_epoch=2)
    one = m.train_step(phantom_like(1))                          # B = 1
    black = m.train_step(np.zeros((4, 32, 32), np.uint8))        # no lesion can show
    flat = m.train_step(np.full((4, 32, 32), 255, np.uint8))     # saturated: M cannot add
    for out in (one, black, flat):
        assert all(np.isfinite(v) for k, v in out.items() if k != "last_layer_frozen")
    assert black["abnormal_fraction"] == 0.0


def test_ablations_switch_terms_off():
    m = AFiRe(small_cfg(w_stru=0.0, w_cate=0.0), steps_per_epoch=2)
    out = m.train_step(phantom_like(4))
    assert out["loss"] == pytest.approx(out["l_recon"], rel=1e-6)
    head_grad = m._t.buffers()["grad.head"]
    assert not head_grad.any()  # no consistency term: the head gets no gradient


def test_bad_inputs_are_clear_errors():
    m = AFiRe(small_cfg(), steps_per_epoch=2)
    with pytest.raises(TypeError, match="uint8"):
        m.train_step(np.zeros((4, 32, 32), np.float32))
    with pytest.raises(ValueError, match="shape"):
        m.train_step(np.zeros((4, 32, 31), np.uint8))
    with pytest.raises(ValueError, match="capacity"):
        m.train_step(np.zeros((5, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="branch"):
        m.encode(phantom_like(1), branch="both")
    if not afire.cuda_available():  # with a GPU this builds the CUDA trainer (tests/gpu)
        with pytest.raises(RuntimeError, match="CUDA"):
            AFiRe(small_cfg(), device="cuda")


def test_step_gradients_match_finite_differences():
    """Full step (SLM, teacher, prototypes, student, head, decoder, losses) vs central
    differences of the reported loss, on the largest-gradient entries of every network."""
    cfg = small_cfg(clip_grad=0.0, epochs=1)
    m = AFiRe(cfg, steps_per_epoch=1)
    x = phantom_like(4)
    # At init the head's bottleneck output is ~1e-3 long, so its L2 normalisation turns a
    # finite-difference step into a rotation: scale the head MLP to make the loss locally
    # linear over the step (the gradients are checked, not the init).
    for name, t in m.state_tensors().items():
        if name.startswith("student.head.mlp.") and name.endswith("weight"):
            t *= 12
    m._t.gradients(x)
    bufs = m._t.buffers()
    for net in ("encoder", "head", "decoder"):
        params, grads = bufs[f"student.{net}"], bufs[f"grad.{net}"].copy()
        idx = np.argsort(-np.abs(grads))[:6]
        for i in idx:
            old = params[i]
            h = 3e-3 * max(1.0, abs(float(old)))
            params[i] = old + h
            lp = m._t.gradients(x)["loss"]
            params[i] = old - h
            lm = m._t.gradients(x)["loss"]
            params[i] = old
            fd = (lp - lm) / (2 * h)
            assert fd == pytest.approx(grads[i], rel=5e-2, abs=2e-3), (net, i)


def test_divergence_is_a_floating_point_error_and_changes_nothing():
    m = AFiRe(small_cfg(base_lr=1e30, warmup_epochs=0, clip_grad=0.0), steps_per_epoch=2)
    x = phantom_like(4)
    m.train_step(x)  # the absurd lr blows the weights up
    before = {k: v.copy() for k, v in m.state_tensors().items()}
    step = m.step
    with pytest.raises(FloatingPointError, match="not updated"):
        m.train_step(x)
    assert m.step == step
    for k, v in m.state_tensors().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
