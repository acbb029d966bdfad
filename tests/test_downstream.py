"""afire._C.downstream: BCE and segmentation losses, the linear probe, augmentation.

References are independent NumPy re-implementations in float64; gradients are also
checked against central finite differences of the NumPy losses."""
import numpy as np
import pytest

from afire._C import downstream as ds


def np_bce(z, y):
    """Mean BCE-with-logits over non-NaN targets (float64)."""
    z = np.asarray(z, np.float64)
    y = np.asarray(y, np.float64)
    ok = ~np.isnan(y)
    if not ok.any():
        return 0.0
    zz, yy = z[ok], y[ok]
    return float(np.mean(np.maximum(zz, 0) - zz * yy + np.log1p(np.exp(-np.abs(zz)))))


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


def fd_grad(f, x, eps=1e-4):
    x = np.array(x, np.float64)
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += eps
        xm[i] -= eps
        g[i] = (f(xp) - f(xm)) / (2 * eps)
    return g


# ------------------------------------------------------------------ BCE

def test_bce_matches_numpy_and_ignores_nan():
    rng = np.random.default_rng(0)
    z = (rng.normal(size=(6, 3)) * 4).astype(np.float32)
    y = (rng.random((6, 3)) > 0.5).astype(np.float32)
    y[1, 2] = y[4, 0] = np.nan
    loss, g = ds.bce_with_logits(z, y)
    assert loss == pytest.approx(np_bce(z, y), rel=1e-6)
    assert g[1, 2] == 0 and g[4, 0] == 0
    ok = ~np.isnan(y)
    want = np.where(ok, (sigmoid(z) - np.nan_to_num(y)) / ok.sum(), 0)
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)
    # finite differences of the NumPy loss
    fd = fd_grad(lambda zz: np_bce(zz, y), z)
    np.testing.assert_allclose(g, fd, rtol=1e-4, atol=1e-7)
    # a NaN target's logit does not matter at all
    z2 = z.copy()
    z2[1, 2] = 1e4
    assert ds.bce_with_logits(z2, y)[0] == loss


def test_bce_edge_cases():
    z = np.array([[100.0, -100.0]], np.float32)
    loss, _ = ds.bce_with_logits(z, np.array([[1.0, 0.0]], np.float32))
    assert 0 <= loss < 1e-30 or loss == pytest.approx(0.0, abs=1e-30)
    loss, g = ds.bce_with_logits(z, np.full((1, 2), np.nan, np.float32))
    assert loss == 0.0 and not g.any()
    with pytest.raises(ValueError, match="targets"):
        ds.bce_with_logits(z, np.array([[2.0, 0.0]], np.float32))
    with pytest.raises(TypeError, match="targets"):
        ds.bce_with_logits(z, np.zeros((1, 2)))
    with pytest.raises(ValueError, match="targets"):
        ds.bce_with_logits(z, np.zeros((1, 3), np.float32))


# ------------------------------------------------------------------ segmentation loss

def np_seg_loss(z, m, smooth=1.0):
    z = np.asarray(z, np.float64)
    m = np.asarray(m, np.float64)
    B = z.shape[0]
    bce = np.mean(np.maximum(z, 0) - z * m + np.log1p(np.exp(-np.abs(z))))
    p = sigmoid(z).reshape(B, -1)
    y = m.reshape(B, -1)
    dice = (2 * (p * y).sum(1) + smooth) / (p.sum(1) + y.sum(1) + smooth)
    return bce + 1 - dice.mean(), bce, 1 - dice.mean()


def test_segmentation_loss_and_gradient():
    rng = np.random.default_rng(1)
    z = (rng.normal(size=(3, 5, 5)) * 2).astype(np.float32)
    m = (rng.random((3, 5, 5)) > 0.6).astype(np.uint8)
    m[2] = 0  # an image without foreground
    loss, bce, dice, g = ds.segmentation_loss(z, m)
    want = np_seg_loss(z, m)
    assert loss == pytest.approx(want[0], rel=1e-6)
    assert bce == pytest.approx(want[1], rel=1e-6)
    assert dice == pytest.approx(want[2], rel=1e-6)
    fd = fd_grad(lambda zz: np_seg_loss(zz, m)[0], z)
    np.testing.assert_allclose(g, fd, rtol=1e-4, atol=1e-7)
    # the smoothing constant is an argument
    l2 = ds.segmentation_loss(z, m, smooth=0.5)[0]
    assert l2 == pytest.approx(np_seg_loss(z, m, 0.5)[0], rel=1e-6)
    with pytest.raises(ValueError, match="masks"):
        ds.segmentation_loss(z, np.full((3, 5, 5), 2, np.uint8))
    with pytest.raises(ValueError, match="masks"):
        ds.segmentation_loss(z, np.zeros((3, 5, 4), np.uint8))


# ------------------------------------------------------------------ linear probe

def separable(n, d, seed, flip=0.0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=d)
    x = rng.normal(size=(n, d)) * rng.uniform(0.5, 3, size=d) + rng.normal(size=d) * 5
    y = ((x - x.mean(0)) @ w > 0).astype(np.float32)
    return x.astype(np.float32), y[:, None]


def test_probe_loss_gradient_matches_finite_differences():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(12, 4)).astype(np.float32) * 3 + 1
    Y = (rng.random((12, 2)) > 0.5).astype(np.float32)
    Y[3, 1] = np.nan
    W = rng.normal(size=(2, 4)).astype(np.float32)
    b = rng.normal(size=2).astype(np.float32)
    mean = X.mean(0).astype(np.float32)
    std = X.std(0).astype(np.float32)
    loss, dW, db = ds.linear_probe_loss(X, Y, W, b, mean, std)
    Xs = (X.astype(np.float64) - mean) / std

    def f(Wb):
        return np_bce(Xs @ Wb[:, :4].T + Wb[:, 4], Y)

    Wb = np.concatenate([W, b[:, None]], 1).astype(np.float64)
    assert loss == pytest.approx(f(Wb), rel=1e-5)
    fd = fd_grad(f, Wb)
    np.testing.assert_allclose(dW, fd[:, :4], rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(db, fd[:, 4], rtol=1e-3, atol=1e-6)


def test_probe_fit_separable_data_vs_numpy_logistic_regression():
    X, y = separable(400, 6, seed=3)
    Xtr, ytr, Xte, yte = X[:300], y[:300], X[300:], y[300:]
    r = ds.linear_probe_fit(Xtr, ytr, epochs=60, lr=0.05, weight_decay=0.0, batch=32, seed=1)
    assert r["weight"].shape == (1, 6) and r["bias"].shape == (1,)
    assert r["loss"].shape == (60,)
    np.testing.assert_allclose(r["mean"], Xtr.astype(np.float64).mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(r["std"], Xtr.astype(np.float64).std(0), rtol=1e-5)
    loss = r["loss"]
    assert loss[-1] < 0.5 * loss[0] and loss[0] < np.log(2)
    assert np.mean(np.diff(loss) <= 1e-4) > 0.8  # mostly decreasing
    # the recorded loss is the training-set loss at the returned parameters
    z = ds.linear_probe_predict(Xtr, r["weight"], r["bias"], r["mean"], r["std"])
    assert loss[-1] == pytest.approx(np_bce(z, ytr), rel=1e-4)
    acc_tr = np.mean((z > 0) == (ytr > 0.5))
    zte = ds.linear_probe_predict(Xte, r["weight"], r["bias"], r["mean"], r["std"])
    acc_te = np.mean((zte > 0) == (yte > 0.5))
    assert acc_tr > 0.97 and acc_te > 0.93
    # an independent NumPy logistic regression (full-batch gradient descent) agrees
    Xs = (Xtr - Xtr.mean(0)) / Xtr.std(0)
    Xs_te = (Xte - Xtr.mean(0)) / Xtr.std(0)
    w, b = np.zeros(6), 0.0
    for _ in range(2000):
        p = sigmoid(Xs @ w + b)
        w -= 0.5 * Xs.T @ (p - ytr[:, 0]) / len(Xs)
        b -= 0.5 * np.mean(p - ytr[:, 0])
    agree = np.mean((Xs_te @ w + b > 0) == (zte[:, 0] > 0))
    assert agree > 0.95
    cos = np.dot(w, r["weight"][0]) / np.linalg.norm(w) / np.linalg.norm(r["weight"][0])
    assert cos > 0.9


def test_probe_one_full_batch_epoch_is_one_adamw_step():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(20, 3)).astype(np.float32)
    Y = (rng.random((20, 2)) > 0.5).astype(np.float32)
    Y[:5, 1] = np.nan
    lr, wd = 0.01, 0.1
    r = ds.linear_probe_fit(X, Y, epochs=1, lr=lr, weight_decay=wd, batch=20)
    zero_w, zero_b = np.zeros((2, 3), np.float32), np.zeros(2, np.float32)
    _, gW, gb = ds.linear_probe_loss(X, Y, zero_w, zero_b, r["mean"], r["std"])
    # from zero: decay does nothing, Adam's first step is -lr g / (|g| + eps)
    np.testing.assert_allclose(r["weight"], -lr * gW / (np.abs(gW) + 1e-8), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(r["bias"], -lr * gb / (np.abs(gb) + 1e-8), rtol=1e-5, atol=1e-9)


def test_probe_multiclass_nan_determinism_and_validation():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(60, 5)).astype(np.float32)
    Y = np.stack([X[:, 0] > 0, X[:, 1] < 0, X[:, 2] > 0.5], 1).astype(np.float32)
    Y[rng.random(Y.shape) < 0.2] = np.nan
    a = ds.linear_probe_fit(X, Y, epochs=5, batch=8, seed=3, lr=0.02)
    b = ds.linear_probe_fit(X, Y, epochs=5, batch=8, seed=3, lr=0.02)
    c = ds.linear_probe_fit(X, Y, epochs=5, batch=8, seed=4, lr=0.02)
    np.testing.assert_array_equal(a["weight"], b["weight"])
    assert not np.array_equal(a["weight"], c["weight"])
    assert a["weight"].shape == (3, 5) and a["loss"][-1] < a["loss"][0]
    z = ds.linear_probe_predict(X, a["weight"], a["bias"], a["mean"], a["std"])
    want = ((X - a["mean"]) / a["std"]).astype(np.float64) @ a["weight"].T.astype(np.float64) + a["bias"]
    np.testing.assert_allclose(z, want, rtol=1e-4, atol=1e-5)
    # 1-D labels are one class; a constant feature gets std 1
    X2 = X.copy()
    X2[:, 4] = 3.0
    r = ds.linear_probe_fit(X2, Y[:, 0].copy(), epochs=2)
    assert r["weight"].shape == (1, 5) and r["std"][4] == 1.0 and np.isfinite(r["weight"]).all()
    with pytest.raises(TypeError, match="features"):
        ds.linear_probe_fit(X.astype(np.float64), Y)
    with pytest.raises(ValueError, match="labels"):
        ds.linear_probe_fit(X, Y[:10])
    with pytest.raises(ValueError, match="features"):
        bad = X.copy()
        bad[0, 0] = np.nan
        ds.linear_probe_fit(bad, Y)
    with pytest.raises(ValueError, match="epochs"):
        ds.linear_probe_fit(X, Y, epochs=0)
    with pytest.raises(ValueError, match="targets"):
        ds.linear_probe_fit(X, Y * 3)
    with pytest.raises(ValueError, match="std"):
        ds.linear_probe_predict(X, a["weight"], a["bias"], a["mean"], np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="weight"):
        ds.linear_probe_predict(X, a["weight"][:, :4], a["bias"], a["mean"], a["std"])


# ------------------------------------------------------------------ augmentation

def rand_images(n, s=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, s, s), dtype=np.uint8)


def test_augment_identity_when_disabled_and_deterministic():
    x = rand_images(5)
    out = ds.augment(x, 7, 3, crop_scale=(1.0, 1.0), flip=False, max_rotation=0.0)
    np.testing.assert_array_equal(out, x)
    a = ds.augment(x, 7, 3)
    b = ds.augment(x, 7, 3)
    c = ds.augment(x, 7, 4)
    d = ds.augment(x, 8, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, d)
    # image b's geometry depends only on (seed, step, b): a sub-batch gives the same images
    np.testing.assert_array_equal(ds.augment(x[:2], 7, 3), a[:2])
    assert a.dtype == np.uint8 and a.shape == x.shape


def test_augment_flip_only():
    x = rand_images(16, seed=1)
    out = ds.augment(x, 0, 0, crop_scale=(1, 1), flip=True, max_rotation=0)
    flipped = 0
    for i in range(16):
        if np.array_equal(out[i], x[i, :, ::-1]):
            flipped += 1
        else:
            np.testing.assert_array_equal(out[i], x[i])
    assert 2 <= flipped <= 14


def test_augment_crop_is_a_bilinear_resize_of_a_window():
    """scale 0.5625, ratio 1 on 32 px: a 24 x 24 window resized to 32 x 32 (half-pixel centres)."""
    S, w = 32, 24
    x = rand_images(3, seed=2)
    out = ds.augment(x, 5, 0, crop_scale=(0.5625, 0.5625), crop_ratio=(1, 1), flip=False,
                     max_rotation=0)

    def resize(win):
        c = (np.arange(S) + 0.5) * w / S - 0.5
        c = np.clip(c, 0, w - 1)
        i0 = np.floor(c).astype(int)
        i1 = np.minimum(i0 + 1, w - 1)
        f = c - i0
        win = win.astype(np.float64)
        rows = win[i0] * (1 - f)[:, None] + win[i1] * f[:, None]
        return rows[:, i0] * (1 - f) + rows[:, i1] * f

    for i in range(3):
        best = min(
            (np.abs(np.floor(resize(x[i, t:t + w, c:c + w]) + 0.5) - out[i]).max(), t, c)
            for t in range(S - w + 1) for c in range(S - w + 1))
        assert best[0] <= 1  # one window reproduces the output (rounding aside)


def test_augment_masks_follow_images_and_rotation_fills_zero():
    S = 32
    yy, xx = np.mgrid[0:S, 0:S]
    masks = np.stack([((yy - 8 - 3 * k) ** 2 + (xx - 20 + 2 * k) ** 2 < 40) for k in range(6)])
    masks = masks.astype(np.uint8)
    imgs = (masks * 200 + 30).astype(np.uint8)
    a, m = ds.augment(imgs, 11, 2, masks=masks, max_rotation=20.0)
    assert set(np.unique(m)) <= {0, 1} and m.sum() > 0
    inside = a > 115  # the bright disc after resampling
    agree = np.mean(inside == (m == 1))
    assert agree > 0.97
    # rotated corners are outside the source: 0 in both
    const = np.full((8, S, S), 100, np.uint8)
    c, cm = ds.augment(const, 1, 0, masks=np.ones_like(const), crop_scale=(1, 1), flip=False,
                       max_rotation=30)
    assert (c[:, 0, 0] == 0).sum() + (c[:, 0, -1] == 0).sum() > 0
    np.testing.assert_array_equal(c == 0, cm == 0)
    assert (c[:, S // 2, S // 2] == 100).all()


def test_augment_validation():
    x = rand_images(2)
    with pytest.raises(ValueError, match="crop_scale"):
        ds.augment(x, 0, 0, crop_scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="crop_scale"):
        ds.augment(x, 0, 0, crop_scale=(0.9, 0.8))
    with pytest.raises(TypeError, match="crop_ratio"):
        ds.augment(x, 0, 0, crop_ratio=3)
    with pytest.raises(ValueError, match="max_rotation"):
        ds.augment(x, 0, 0, max_rotation=200)
    with pytest.raises(TypeError, match="images"):
        ds.augment(x.astype(np.float32), 0, 0)
    with pytest.raises(ValueError, match="masks"):
        ds.augment(x, 0, 0, masks=np.zeros((2, 32, 31), np.uint8))
    with pytest.raises(ValueError, match="step"):
        ds.augment(x, 0, -1)
    assert ds.augment(x[:0], 0, 0).shape == (0, 32, 32)
