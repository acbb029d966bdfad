"""AFiRe's public surface beside training: synthetic_lesions (the SLM the step uses) and the
step setter."""
import numpy as np
import pytest
from _util import op_in_fresh_process, phantom_like, small_cfg

from afire import AFiRe, _C
from afire.model import synthetic_lesions

# SLM settings away from the C defaults, so that a setting the model forgot to pass shows
SLM = dict(slm_lesions=(2, 5), slm_size=(3, 12), slm_crop=10, slm_gamma2=0.3,
           slm_strength=0.8)


def model(seed=7, **kw):
    return AFiRe(small_cfg(seed=seed, **{**SLM, **kw}), steps_per_epoch=2)


@pytest.mark.parametrize("rule", ["paper", "released"])
def test_synthetic_lesions_is_slm_generate_with_the_models_settings(rule):
    m = model(token_rule=rule)
    x = phantom_like(3, seed=1)
    got = m.synthetic_lesions(x, step=5, first_index=2)
    # written out here, not through afire's own mapping of Config to C keywords
    want = _C.slm.slm_generate(x, 7, 5, 2, patch=8, lesions_min=2, lesions_max=5,
                               size_min=3, size_max=12, crop_max=10, gamma2=0.3,
                               strength=0.8, token_rule=rule)
    assert len(got) == 3
    for g, w, shape in zip(got, want, [(3, 32, 32), (3, 32, 32), (3, m.num_patches)]):
        assert g.dtype == np.uint8 and g.shape == shape
        np.testing.assert_array_equal(g, w)
    xp, mask, tok = got
    assert (xp[mask == 0] == x[mask == 0]).all() and mask.any() and tok.any()
    # the module-level form (no model needed) is the same function
    for g, w in zip(synthetic_lesions(m.cfg, x, 5, 2), got):
        np.testing.assert_array_equal(g, w)


def test_synthetic_lesions_are_what_the_training_step_draws():
    m = model()
    batches = [phantom_like(4, seed=10 + s) for s in range(4)]
    fractions = []
    for x in batches:
        tok = m.synthetic_lesions(x, m.step)[2]
        fractions.append(tok.mean())
        assert m.train_step(x)["abnormal_fraction"] == fractions[-1]
    assert len(set(fractions)) > 1          # the comparison can tell steps apart
    m.step = 9                              # and after moving along the schedule
    x = batches[0]
    assert m.train_step(x)["abnormal_fraction"] == m.synthetic_lesions(x, 9)[2].mean()


def test_synthetic_lesions_are_deterministic():
    m = model()
    x = phantom_like(4, seed=3)
    a, b = m.synthetic_lesions(x, 3), m.synthetic_lesions(x.copy(), 3)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    # a function of (seed, step, image index): a sub-batch at its offset draws the same
    part = m.synthetic_lesions(x[2:], 3, first_index=2)
    for u, v in zip(a, part):
        np.testing.assert_array_equal(u[2:], v)
    assert not np.array_equal(a[1], m.synthetic_lesions(x, 4)[1])
    assert not np.array_equal(a[1], m.synthetic_lesions(x, 3, seed=8)[1])
    np.testing.assert_array_equal(m.synthetic_lesions(x[0], 3)[1][0], a[1][0])  # one image
    assert m.step == 0                      # drawing trains nothing


@pytest.mark.parametrize("kw, name", [
    (dict(step=-1), "step"), (dict(step=True), "step"), (dict(step=1.0), "step"),
    (dict(step=0, first_index=-2), "first_index"), (dict(step=0, seed=-1), "seed")])
def test_synthetic_lesions_rejects_bad_counters(kw, name):
    with pytest.raises(ValueError, match=f"^{name} must be an int >= 0"):
        model().synthetic_lesions(phantom_like(1), **kw)


def test_synthetic_lesions_rejects_bad_images():
    m = model()
    with pytest.raises(TypeError, match="uint8"):
        m.synthetic_lesions(phantom_like(2).astype(np.float32), 0)
    with pytest.raises(ValueError, match=r"\(B, 32, 32\)"):
        m.synthetic_lesions(np.zeros((2, 32, 16), np.uint8), 0)


def test_step_setter_moves_the_schedules():
    a, b = model(), model()
    x = phantom_like(4)
    ref = [a.train_step(x) for _ in range(4)][-1]
    b.step = 3
    assert b.step == 3
    got = b.train_step(x)
    assert got["step"] == 3 and b.step == 4
    for k in ("lr", "weight_decay", "ema_momentum", "teacher_temp", "last_layer_frozen",
              "abnormal_fraction"):
        assert got[k] == ref[k], k


@pytest.mark.parametrize("bad", [-1, 2.0, True, "3", None])
def test_step_setter_validates(bad):
    m = model()
    m.step = 2
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        m.step = bad
    assert m.step == 2


# ------------------------------------------------------------------ inference-only models

def test_inference_model_matches_the_training_model(tmp_path):
    m = model()
    x = phantom_like(3, seed=2)
    m.train_step(phantom_like(4, seed=1))
    m.save(tmp_path / "c.safetensors")
    i = AFiRe.load(tmp_path / "c.safetensors", inference=True)
    assert i.inference and "inference=True" in repr(i)
    for branch in ("teacher", "student"):
        np.testing.assert_array_equal(i.encode(x, branch), m.encode(x, branch))
    np.testing.assert_array_equal(i.restore(x), m.restore(x))
    mask = np.zeros((3, m.num_patches), np.uint8)
    mask[:, ::3] = 1
    np.testing.assert_array_equal(i.restore(x, mask), m.restore(x, mask))
    np.testing.assert_array_equal(i.anomaly_score(x), m.anomaly_score(x))
    # only what those need: no head, gradients or moments
    nets = {k.rsplit(".", 1)[0].split(".")[0] + "." + k.split(".")[1]
            for k in i.state_tensors() if k != "prototypes"}
    assert nets == {"student.encoder", "teacher.encoder", "student.decoder"}
    with pytest.raises(ValueError, match="inference"):
        i.train_step(x)
    with pytest.raises(ValueError, match="inference"):
        i.save(tmp_path / "d.safetensors")
    with pytest.raises(TypeError, match="inference"):
        AFiRe(small_cfg(), inference="yes")


def test_inference_model_batches_and_imports():
    cfg = small_cfg(batch_size=2)
    i = AFiRe(cfg, inference=True)
    t = AFiRe(cfg)
    x = phantom_like(5, seed=4)  # more than the capacity: encode splits it
    np.testing.assert_array_equal(i.encode(x, "student"), t.encode(x, "student"))
    # named weights go into an inference model too (its views are the C buffers)
    i2 = AFiRe(small_cfg(seed=9, batch_size=2), inference=True)
    i2.set_state_tensors(t.state_tensors(), skip_prefixes=("teacher.", "student.decoder",
                                                           "prototypes"))
    np.testing.assert_array_equal(i2.encode(x, "student"), t.encode(x, "student"))


def test_cpu_precision_argument():
    with pytest.raises(ValueError, match="precision"):
        AFiRe(small_cfg(), precision="fp16")
    assert AFiRe(small_cfg()).precision == "fp32"  # the CPU default, whatever cfg.precision


# ------------------------------------------------------------------ precision="bf16" on the CPU

def test_cpu_bf16_step_tracks_fp32():
    """bf16 GEMM operands (fp32 sums, master weights, norms, softmax, losses) against the fp32
    reference, same seed and data: the stated tolerances hold over a few steps."""
    cfg = small_cfg(seed=3)
    a, b = AFiRe(cfg, steps_per_epoch=2), AFiRe(cfg, steps_per_epoch=2, precision="bf16")
    assert b.precision == "bf16" and "precision='bf16'" in repr(b)
    for i in range(3):
        x = phantom_like(4, seed=10 + i)
        ra, rb = a.train_step(x), b.train_step(x)
        assert abs(rb["loss"] - ra["loss"]) <= 0.02 * abs(ra["loss"]), (i, ra, rb)
        assert abs(rb["grad_norm"] - ra["grad_norm"]) <= 0.1 * ra["grad_norm"], (i, ra, rb)
    x = phantom_like(3, seed=20)
    ta, tb = a.encode(x), b.encode(x)
    assert np.abs(tb - ta).max() <= 0.05 * np.abs(ta).max()
    # deterministic: the same run twice is bit-identical
    c = AFiRe(cfg, steps_per_epoch=2, precision="bf16")
    for i in range(3):
        c.train_step(phantom_like(4, seed=10 + i))
    np.testing.assert_array_equal(c.encode(x), tb)


def test_cpu_bf16_inference_model(tmp_path):
    m = AFiRe(small_cfg(seed=4), steps_per_epoch=2)
    m.train_step(phantom_like(4, seed=1))
    m.save(tmp_path / "c.safetensors")
    i = AFiRe.load(tmp_path / "c.safetensors", inference=True, precision="bf16")
    x = phantom_like(3, seed=2)
    t, ti = m.encode(x), i.encode(x)
    assert np.abs(ti - t).max() <= 0.05 * np.abs(t).max()


def test_cpu_bf16_portable_backend(tmp_path):
    """The fallback for CPUs without AMX (forced here in a fresh process) computes the same
    bf16-input products as this process's backend; only the fp32 summation order differs."""
    r = np.random.default_rng(0)
    x, w = r.standard_normal((50, 70), np.float32), r.standard_normal((30, 70), np.float32)
    y, backend = op_in_fresh_process(tmp_path, "cpu_linear_forward_bf16", [x, w],
                                     {"AFIRE_BF16_BACKEND": "portable"}, "bf16")
    assert backend == "portable"
    np.testing.assert_allclose(y, _C.ops.cpu_linear_forward_bf16(x, w), rtol=1e-5, atol=1e-5)
