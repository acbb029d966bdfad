"""afire._C.downstream.Classifier and Segmenter on the `test` preset.

Forward passes are checked against NumPy heads applied to the tokens of the pre-training
encoder (afire.AFiRe.encode with the same weights), head gradients against NumPy analytic
backward passes (float64), encoder gradients against central finite differences."""
import numpy as np
import pytest

import afire
from afire._C import downstream as ds
from afire._C import phantom

S, P, D, G = 32, 8, 32, 4
L = G * G


@pytest.fixture(scope="module")
def cfg():
    return afire.Config.preset_config("test").to_dict()


@pytest.fixture(scope="module")
def ref_model():
    return afire.AFiRe(afire.Config.preset_config("test"), steps_per_epoch=1)


def images(n, seed=0):
    return phantom.generate(n, size=S, seed=seed, p_abnormal=0.5)


def tokens_of(ref_model, encoder_params, x):
    """Tokens [B,T,D] of the pre-training encoder loaded with `encoder_params`."""
    ref_model._t.buffers()["student.encoder"][:] = encoder_params
    return ref_model.encode(x, branch="student").astype(np.float64)


def np_bce(z, y):
    ok = ~np.isnan(y)
    zz, yy = z[ok], y[ok]
    return float(np.mean(np.maximum(zz, 0) - zz * yy + np.log1p(np.exp(-np.abs(zz)))))


def head_forward(tok, h, eps=1e-6):
    pooled = tok[:, 1:].mean(1)
    mu = pooled.mean(1, keepdims=True)
    r = 1.0 / np.sqrt(pooled.var(1, keepdims=True) + eps)
    xh = (pooled - mu) * r
    n = xh * h["norm_w"] + h["norm_b"]
    return n @ h["fc_w"].T.astype(np.float64) + h["fc_b"], (pooled, xh, r, n)


def head_backward(dz, cache, h):
    pooled, xh, r, n = cache
    g = {"fc_w": dz.T @ n, "fc_b": dz.sum(0)}
    dn = dz @ h["fc_w"].astype(np.float64)
    g["norm_w"] = (dn * xh).sum(0)
    g["norm_b"] = dn.sum(0)
    dxh = dn * h["norm_w"]
    dpooled = r * (dxh - dxh.mean(1, keepdims=True) - xh * (dxh * xh).mean(1, keepdims=True))
    return g, dpooled


def fd_check(model, run_loss, names, eps=1e-2, n_each=2):
    """Central differences on the entries of largest gradient in each named tensor."""
    table = {e["name"]: e for e in model.param_table()}
    params, grads = model.encoder_params(), model.encoder_grads().copy()
    checked = 0
    for name in names:
        e = table[name]
        size = int(np.prod(e["shape"]))
        g = grads[e["offset"]:e["offset"] + size]
        for k in np.argsort(-np.abs(g))[:n_each]:
            i = e["offset"] + int(k)
            old = params[i]
            params[i] = old + eps
            lp = run_loss()
            params[i] = old - eps
            lm = run_loss()
            params[i] = old
            fd = (lp - lm) / (2 * eps)
            assert abs(fd - grads[i]) <= 0.05 * abs(grads[i]) + 2e-4, (name, k, fd, grads[i])
            checked += 1
    return checked


ENC_NAMES = ["cls_token", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight",
             "blocks.1.mlp.fc2.bias", "blocks.1.norm1.weight", "norm.weight", "norm.bias"]


# ------------------------------------------------------------------ Classifier

def test_classifier_table_matches_pretraining_and_forward(cfg, ref_model):
    c = ds.Classifier(cfg, 3, 4, seed=2)
    tab = c.param_table()
    ref = ref_model._t.param_table("encoder")
    assert [(e["name"], e["offset"], tuple(e["shape"])) for e in tab] == \
        [(e["name"], e["offset"], tuple(e["shape"])) for e in ref]
    assert c.encoder_params().size == ref_model._t.buffers()["student.encoder"].size
    h = c.head_params()
    assert h["fc_w"].shape == (3, D) and h["norm_w"].shape == (D,)
    assert (h["norm_w"] == 1).all() and (h["fc_b"] == 0).all() and 0.005 < h["fc_w"].std() < 0.05
    h["norm_b"][:] = np.linspace(-1, 1, D)  # writable views
    x = images(6)["images"]  # 6 > batch 4: predict runs in chunks
    z = c.predict(x)
    tok = tokens_of(ref_model, c.encoder_params(), x)
    want, _ = head_forward(tok, {k: v.astype(np.float64) for k, v in c.head_params().items()})
    np.testing.assert_allclose(z, want, rtol=1e-4, atol=1e-4)
    # a teacher encoder copied in by name gives the teacher's tokens
    teacher = ref_model._t.buffers()["teacher.encoder"]
    c.encoder_params()[:] = teacher
    np.testing.assert_allclose(tokens_of(ref_model, c.encoder_params(), x),
                               ref_model.encode(x, branch="teacher"), rtol=1e-6, atol=1e-6)


def test_classifier_gradients_head_analytic_encoder_fd(cfg, ref_model):
    c = ds.Classifier(cfg, 3, 4, seed=3)
    h = c.head_params()
    h["fc_w"][:] = np.random.default_rng(0).normal(0, 1.0, h["fc_w"].shape)  # large gradients
    d = images(4, seed=1)
    x = d["images"]
    y = np.stack([d["labels"] > 0, d["labels"] == 1, d["labels"] == 3], 1).astype(np.float32)
    y[0, 1] = y[2, 2] = np.nan
    loss = c.gradients(x, y)
    tok = tokens_of(ref_model, c.encoder_params(), x)
    h64 = {k: v.astype(np.float64) for k, v in c.head_params().items()}
    z, cache = head_forward(tok, h64)
    assert loss == pytest.approx(np_bce(z, y), rel=1e-5)
    ok = ~np.isnan(y)
    dz = np.where(ok, (1 / (1 + np.exp(-z)) - np.nan_to_num(y)) / ok.sum(), 0)
    want, _ = head_backward(dz, cache, h64)
    got = c.head_grads()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-6, err_msg=k)
    # encoder gradient through GAP + LN + Linear vs finite differences of the NumPy loss
    n = fd_check(c, lambda: np_bce(c.predict(x).astype(np.float64), y), ENC_NAMES)
    assert n == 2 * len(ENC_NAMES)


def test_classifier_nan_targets_ignored(cfg):
    c = ds.Classifier(cfg, 2, 4, seed=4)
    x = images(4, seed=2)["images"]
    y = np.array([[1, np.nan], [0, np.nan], [1, np.nan], [np.nan, np.nan]], np.float32)
    c.gradients(x, y)
    g = c.head_grads()
    assert not g["fc_w"][1].any() and g["fc_b"][1] == 0 and g["fc_w"][0].any()
    # a missing target's logit has no effect on the loss
    y2 = y.copy()
    y2[:, 1] = 1.0
    l_nan = c.gradients(x, y)
    l_all = c.gradients(x, y2)
    z = c.predict(x).astype(np.float64)
    assert l_nan == pytest.approx(np_bce(z[:3, :1], y[:3, :1]), rel=1e-5)
    assert l_all != pytest.approx(l_nan)
    # all missing: zero loss, zero gradients, a step changes only what weight decay touches
    assert c.gradients(x, np.full((4, 2), np.nan, np.float32)) == 0.0
    assert not c.encoder_grads().any()


def test_classifier_step_adamw_groups_and_freeze(cfg):
    c = ds.Classifier(cfg, 2, 4, seed=5, freeze_encoder=True)
    x = images(4, seed=3)["images"]
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], np.float32)
    enc0 = c.encoder_params().copy()
    h0 = {k: v.copy() for k, v in c.head_params().items()}
    c.head_params()["fc_b"][:] = h0["fc_b"] = np.array([0.3, -0.2], np.float32)
    c.gradients(x, y)
    g = {k: v.copy() for k, v in c.head_grads().items()}
    lr, wd = 1e-2, 0.5
    c.train_step(x, y, lr, wd, 0, augment=False)
    np.testing.assert_array_equal(c.encoder_params(), enc0)  # frozen
    h1 = c.head_params()
    for k in h0:  # first AdamW step: p (1 - lr wd [matrices only]) - lr g / (|g| + eps)
        decay = wd if k == "fc_w" else 0.0
        want = h0[k] * (1 - lr * decay) - lr * g[k] / (np.abs(g[k]) + 1e-8)
        np.testing.assert_allclose(h1[k], want, rtol=1e-5, atol=1e-7, err_msg=k)
    # unfrozen: the encoder moves, except the fixed sin-cos position embedding
    u = ds.Classifier(cfg, 2, 4, seed=5)
    e0 = u.encoder_params().copy()
    u.train_step(x, y, 1e-3, 0.05, 0)
    tab = {e["name"]: e for e in u.param_table()}
    pe = tab["pos_embed"]
    sl = slice(pe["offset"], pe["offset"] + int(np.prod(pe["shape"])))
    np.testing.assert_array_equal(u.encoder_params()[sl], e0[sl])
    assert not np.array_equal(u.encoder_params(), e0)


def test_classifier_training_reduces_loss_on_phantoms(cfg):
    d = images(16, seed=4)
    x, y = d["images"], (d["labels"] > 0).astype(np.float32)[:, None]
    c = ds.Classifier(cfg, 1, 16, seed=0)
    before = np_bce(c.predict(x).astype(np.float64), y)
    losses = [c.train_step(x, y, 1e-3, 0.0, s, augment=(s % 2 == 0)) for s in range(30)]
    after = np_bce(c.predict(x).astype(np.float64), y)
    assert np.isfinite(losses).all()
    assert after < 0.85 * before


def test_classifier_determinism_and_augment_flag(cfg):
    x = images(4, seed=5)["images"]
    y = np.array([[1], [0], [1], [0]], np.float32)
    a, b = ds.Classifier(cfg, 1, 4, seed=7), ds.Classifier(cfg, 1, 4, seed=7)
    la = [a.train_step(x, y, 1e-3, 0.05, s) for s in range(2)]
    lb = [b.train_step(x, y, 1e-3, 0.05, s) for s in range(2)]
    assert la == lb
    np.testing.assert_array_equal(a.encoder_params(), b.encoder_params())
    # augmentation changes the batch the step sees; without it the loss is predict's loss
    no_aug = a.gradients(x, y, augment=False)
    assert no_aug == pytest.approx(np_bce(a.predict(x).astype(np.float64), y), rel=1e-5)
    assert a.gradients(x, y, augment=True, step=3) != pytest.approx(no_aug, rel=1e-9)


def test_classifier_gradcam(cfg):
    c = ds.Classifier(cfg, 2, 4, seed=8)
    c.head_params()["fc_w"][:] = np.random.default_rng(1).normal(0, 1, (2, D))
    x = images(6, seed=6)["images"]
    cam = c.gradcam(x, 1)
    assert cam.shape == (6, G, G) and cam.dtype == np.float32
    assert cam.min() >= 0 and cam.max() <= 1
    for m in cam:  # each map is either normalised to a max of 1 or all zero
        assert m.max() == pytest.approx(1.0) or not m.any()
    assert (cam.reshape(6, -1).max(1) == 1).sum() >= 3
    np.testing.assert_allclose(c.gradcam(x[4:5], 1)[0], cam[4], rtol=1e-5, atol=1e-6)
    assert not np.allclose(c.gradcam(x, 0), cam)
    with pytest.raises(ValueError, match="class_index"):
        c.gradcam(x, 2)


def test_classifier_validation(cfg):
    with pytest.raises(ValueError, match="num_classes"):
        ds.Classifier(cfg, 0, 4)
    with pytest.raises(ValueError, match="batch"):
        ds.Classifier(cfg, 1, 0)
    bad = dict(cfg)
    del bad["embed_dim"]
    with pytest.raises(KeyError, match="embed_dim"):
        ds.Classifier(bad, 1, 4)
    with pytest.raises(ValueError, match="crop_scale"):
        ds.Classifier(cfg, 1, 4, crop_scale=(0.5, 2.0))
    c = ds.Classifier(cfg, 2, 4)
    x = images(4)["images"]
    y = np.zeros((4, 2), np.float32)
    with pytest.raises(ValueError, match="images"):
        c.train_step(images(5)["images"], np.zeros((5, 2), np.float32), 1e-3, 0.0, 0)
    with pytest.raises(ValueError, match="images"):
        c.predict(np.zeros((2, 16, 16), np.uint8))
    with pytest.raises(TypeError, match="targets"):
        c.train_step(x, y.astype(np.float64), 1e-3, 0.0, 0)
    with pytest.raises(ValueError, match="targets"):
        c.train_step(x, np.zeros((4, 3), np.float32), 1e-3, 0.0, 0)
    with pytest.raises(ValueError, match="targets"):
        c.train_step(x, y + 2, 1e-3, 0.0, 0)
    with pytest.raises(ValueError, match="lr"):
        c.train_step(x, y, float("nan"), 0.0, 0)
    with pytest.raises(ValueError, match="step"):
        c.train_step(x, y, 1e-3, 0.0, -1)
    assert c.predict(x[:0]).shape == (0, 2)


# ------------------------------------------------------------------ Segmenter

def seg_forward(tok, w, b):
    plog = tok[:, 1:] @ w.T.astype(np.float64) + b  # [B, L, P*P]
    Bn = tok.shape[0]
    return plog.reshape(Bn, G, G, P, P).transpose(0, 1, 3, 2, 4).reshape(Bn, S, S), plog


def np_seg_loss(z, m, smooth=1.0):
    Bn = z.shape[0]
    bce = np.mean(np.maximum(z, 0) - z * m + np.log1p(np.exp(-np.abs(z))))
    p = (1 / (1 + np.exp(-z))).reshape(Bn, -1)
    y = m.reshape(Bn, -1).astype(np.float64)
    dice = (2 * (p * y).sum(1) + smooth) / (p.sum(1) + y.sum(1) + smooth)
    return bce + 1 - dice.mean()


def test_segmenter_forward_and_gradients(cfg, ref_model):
    s = ds.Segmenter(cfg, 4, seed=1)
    h = s.head_params()
    assert h["weight"].shape == (P * P, D) and h["bias"].shape == (P * P,)
    assert s.param_table()[0]["name"] == "cls_token"
    d = images(6, seed=7)
    x, m = d["images"], d["lesion_masks"]
    assert m.max() == 1
    prob = s.predict(x)
    tok = tokens_of(ref_model, s.encoder_params(), x)
    z, plog = seg_forward(tok, h["weight"], h["bias"].astype(np.float64))
    np.testing.assert_allclose(prob, 1 / (1 + np.exp(-z)), rtol=1e-4, atol=1e-5)
    # head gradients vs NumPy's (segmentation_loss gives d loss / d logits)
    x4, m4 = x[:4], m[:4]
    out = s.gradients(x4, m4)
    z4 = z[:4]
    loss, bce, dice, dz = ds.segmentation_loss(z4.astype(np.float32), m4)
    assert out["loss"] == pytest.approx(np_seg_loss(z4, m4), rel=1e-4)
    assert out["bce"] == pytest.approx(bce, rel=1e-4) and out["dice_loss"] == pytest.approx(dice, rel=1e-4)
    dplog = dz.astype(np.float64).reshape(4, G, P, G, P).transpose(0, 1, 3, 2, 4).reshape(4, L, P * P)
    g = s.head_grads()
    np.testing.assert_allclose(g["weight"], np.einsum("blq,bld->qd", dplog, tok[:4, 1:]),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g["bias"], dplog.sum((0, 1)), rtol=1e-4, atol=1e-6)

    def run_loss():
        pz = s.predict(x4).astype(np.float64)
        return np_seg_loss(np.log(pz) - np.log1p(-pz), m4)

    assert fd_check(s, run_loss, ENC_NAMES) == 2 * len(ENC_NAMES)


def test_segmenter_training_reduces_loss_and_freeze(cfg):
    d = images(16, seed=8)
    x, m = d["images"], d["lesion_masks"]
    s = ds.Segmenter(cfg, 16, seed=0)
    first = s.gradients(x, m)["loss"]
    outs = [s.train_step(x, m, 3e-3, 0.0, k, augment=(k % 2 == 0)) for k in range(30)]
    assert set(outs[0]) == {"loss", "bce", "dice_loss"}
    last = s.gradients(x, m)
    assert last["loss"] < 0.8 * first and last["bce"] < outs[0]["bce"]
    f = ds.Segmenter(cfg, 4, freeze_encoder=True)
    e0 = f.encoder_params().copy()
    w0 = f.head_params()["weight"].copy()
    f.train_step(x[:4], m[:4], 1e-2, 0.0, 0)
    np.testing.assert_array_equal(f.encoder_params(), e0)
    assert not np.array_equal(f.head_params()["weight"], w0)
    assert not f.encoder_grads().any()


def test_segmenter_validation(cfg):
    s = ds.Segmenter(cfg, 2)
    x = images(2)["images"]
    with pytest.raises(ValueError, match="masks"):
        s.train_step(x, np.full((2, S, S), 2, np.uint8), 1e-3, 0.0, 0)
    with pytest.raises(ValueError, match="masks"):
        s.train_step(x, np.zeros((1, S, S), np.uint8), 1e-3, 0.0, 0)
    with pytest.raises(TypeError, match="masks"):
        s.train_step(x, np.zeros((2, S, S), np.float32), 1e-3, 0.0, 0)
    with pytest.raises(ValueError, match="smooth"):
        ds.Segmenter(cfg, 2, smooth=0.0)
    assert ds.Segmenter(cfg, 2, smooth=0.5).dims["smooth"] == 0.5
    assert s.predict(images(5)["images"]).shape == (5, S, S)
