"""The anomaly scores beside Eq. 51 (csrc/core/anomaly.c through afire._C.anomaly, and the
AFiRe methods on top): each kernel against an independent NumPy computation, the refusals,
and the model-level scores against the same NumPy math on the model's own encodings and
restorations."""
import numpy as np
import pytest

from _util import phantom_like, small_cfg
from afire import AFiRe, _C
from afire.model import ANOMALY_SCORES, AnomalyReference

A = _C.anomaly
f32 = np.float32
rng = np.random.default_rng(0)


def np_masks(G, stride, block):
    r, c = np.meshgrid(np.arange(G), np.arange(G), indexing="ij")
    which = ((r // block) % stride) * stride + (c // block) % stride
    return np.stack([(which == m).ravel() for m in range(stride * stride)]).astype(np.uint8)


@pytest.mark.parametrize("G,stride,block", [(4, 2, 1), (8, 2, 2), (7, 3, 1), (6, 1, 1)])
def test_inpaint_masks_hide_every_token_exactly_once(G, stride, block):
    m = A.inpaint_masks(G, stride=stride, block=block)
    assert m.dtype == np.uint8 and m.shape == (stride * stride, G * G)
    np.testing.assert_array_equal(m, np_masks(G, stride, block))
    np.testing.assert_array_equal(m.sum(0), 1)
    assert (m.sum(1) > 0).all()


def test_token_error_fills_only_the_masked_tokens():
    y, x = rng.normal(size=(3, 5, 7)).astype(f32), rng.normal(size=(3, 5, 7)).astype(f32)
    want = ((y.astype(np.float64) - x) ** 2).mean(-1)
    np.testing.assert_allclose(A.token_error(y, x), want, rtol=1e-6)
    mask = (rng.random((3, 5)) < 0.5).astype(np.uint8)
    base = np.full((3, 5), -1.0, f32)
    got = A.token_error(y, x, mask, base)
    np.testing.assert_allclose(got, np.where(mask, want, -1.0), rtol=1e-6)
    assert (base == -1).all()      # err0 is copied, not written


def test_position_zscores_match_numpy():
    num, den = rng.random((6, 4)).astype(f32), rng.random((6, 4)).astype(f32)
    eps = 1e-3
    v = np.log(num.astype(np.float64) + eps) - np.log(den.astype(np.float64) + eps)
    mean, std = A.position_stats(num, den, eps=eps)
    np.testing.assert_allclose(mean, v.mean(0), rtol=1e-5)
    np.testing.assert_allclose(std, v.std(0, ddof=1), rtol=1e-5)
    mean1, std1 = A.position_stats(num, eps=eps)
    np.testing.assert_allclose(mean1, np.log(num + eps).mean(0), rtol=1e-5)
    b_num, b_den = rng.random((3, 4)).astype(f32), rng.random((3, 4)).astype(f32)
    score, zmap = A.position_zscore(b_num, mean, std, b_den, eps=eps)
    vb = np.log(b_num.astype(np.float64) + eps) - np.log(b_den.astype(np.float64) + eps)
    z = (vb - mean) / std
    np.testing.assert_allclose(zmap, z, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(score, zmap.astype(np.float64).mean(1), rtol=1e-12)
    assert score.dtype == np.float64


def np_gauss(tokens, pooled, shrinkage):
    z = tokens[:, 1:].astype(np.float64)
    z = z.mean(1, keepdims=True) if pooled else z
    means, precs = [], []
    for g in range(z.shape[1]):
        c = np.cov(z[:, g].T)
        s = max(np.trace(c) / len(c), 1e-12)
        precs.append(np.linalg.inv((1 - shrinkage) * c + shrinkage * s * np.eye(len(c))))
        means.append(z[:, g].mean(0))
    return np.stack(means), np.stack(precs)


@pytest.mark.parametrize("pooled", [False, True])
def test_gaussian_fit_and_score_match_numpy(pooled):
    ref = rng.normal(size=(12, 5, 6)).astype(f32)
    mean, prec = A.gauss_fit(ref, pooled=pooled, shrinkage=0.2)
    G = 1 if pooled else 4
    assert mean.shape == (G, 6) and prec.shape == (G, 6, 6)
    m_np, p_np = np_gauss(ref, pooled, 0.2)
    np.testing.assert_allclose(mean, m_np, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(prec, p_np, rtol=1e-4, atol=1e-5)
    x = rng.normal(size=(3, 5, 6)).astype(f32)
    score, dmap = A.gauss_score(x, mean, prec, pooled=pooled)
    z = x[:, 1:].astype(np.float64)
    z = z.mean(1, keepdims=True) if pooled else z
    d = z - mean.astype(np.float64)
    want = np.einsum("bgd,gde,bge->bg", d, prec.astype(np.float64), d)
    np.testing.assert_allclose(dmap, want, rtol=1e-5)
    np.testing.assert_allclose(score, dmap.astype(np.float64).mean(1), rtol=1e-12)
    # zero shrinkage with fewer images than dimensions: singular, refused
    with pytest.raises(ValueError, match="not positive definite"):
        A.gauss_fit(ref[:4], shrinkage=0.0)


@pytest.mark.parametrize("k", [1, 3])
def test_knn_matches_numpy(k):
    ref = rng.normal(size=(9, 5, 4)).astype(f32)
    x = rng.normal(size=(2, 5, 4)).astype(f32)
    score, dmap = A.knn_score(x, ref, k=k)
    d = ((x[:, None, 1:].astype(np.float64) - ref[None, :, 1:]) ** 2).sum(-1)   # [B,N,L]
    want = np.sort(d, axis=1)[:, :k].mean(1)
    np.testing.assert_allclose(dmap, want, rtol=1e-6)
    np.testing.assert_allclose(score, dmap.astype(np.float64).mean(1), rtol=1e-12)
    # a reference image scores 0 against itself
    assert A.knn_score(ref[:2], ref, k=1)[0].max() == 0.0


BAD = [
    ("inpaint_masks", (2,), {"stride": 3}),
    ("inpaint_masks", (0,), {}),
    ("token_error", (np.zeros((2, 3, 4), f32), np.zeros((2, 3, 5), f32)), {}),
    ("token_error", (np.zeros((2, 3, 4), f32),) * 2 + (np.full((2, 3), 2, np.uint8),), {}),
    ("position_stats", (np.zeros((1, 3), f32),), {}),
    ("position_stats", (-np.ones((2, 3), f32),), {}),
    ("position_stats", (np.ones((2, 3), f32),), {"eps": 0.0}),
    ("position_zscore", (np.ones((2, 3), f32), np.zeros(3, f32), np.zeros(3, f32)), {}),
    ("position_zscore", (np.ones((2, 3), f32), np.zeros(4, f32), np.ones(4, f32)), {}),
    ("gauss_fit", (np.zeros((1, 3, 2), f32),), {}),
    ("gauss_fit", (np.zeros((3, 1, 2), f32),), {}),
    ("gauss_fit", (np.full((3, 3, 2), np.nan, f32),), {}),
    ("gauss_fit", (np.zeros((3, 3, 2), f32),), {"shrinkage": 1.5}),
    ("gauss_score", (np.zeros((2, 3, 2), f32), np.zeros((2, 2), f32),
                     np.zeros((2, 2, 2), f32)), {"pooled": True}),
    ("gauss_score", (np.zeros((2, 3, 2), f32), np.zeros((1, 2), f32),
                     np.zeros((1, 2, 2), f32)), {}),
    ("knn_score", (np.zeros((2, 3, 2), f32), np.zeros((4, 3, 2), f32)), {"k": 5}),
    ("knn_score", (np.zeros((2, 3, 2), f32), np.zeros((4, 3, 3), f32)), {}),
    ("knn_score", (np.zeros((2, 3, 2), f32), np.full((4, 3, 2), np.inf, f32)), {}),
]


@pytest.mark.parametrize("name,args,kw", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_is_refused_with_a_message(name, args, kw):
    with pytest.raises((TypeError, ValueError)) as e:
        getattr(A, name)(*args, **kw)
    assert str(e.value)


# ---------------------------------------------------------------- through the model
@pytest.fixture(scope="module")
def model():
    m = AFiRe(small_cfg(seed=3), steps_per_epoch=4, batch_size=8)
    for i in range(4):
        m.train_step(phantom_like(4, seed=i))
    return m


def test_errors_of_the_model_match_its_restorations(model):
    x = phantom_like(5, seed=11)
    pred, target = model._t.restore(x)
    np.testing.assert_allclose(model.restoration_errors(x),
                               ((pred.astype(np.float64) - target) ** 2).mean(-1), rtol=1e-5)
    # Eq. 51's per-token map sums over the Q values of a patch: the same errors times Q
    _, eq51_map = model.anomaly_score(x, return_map=True)
    np.testing.assert_allclose(eq51_map.reshape(5, -1) / model.patch_values,
                               model.restoration_errors(x), rtol=1e-4)
    g = model.cfg.img_size // model.cfg.patch_size
    err = model.inpaint_errors(x, stride=2)
    want = np.zeros_like(err)
    for m in np_masks(g, 2, 1):
        mm = np.broadcast_to(m, (5, g * g)).astype(np.uint8)
        p, t = model._t.restore(x, np.ascontiguousarray(mm))
        e = ((p.astype(np.float64) - t) ** 2).mean(-1)
        want[:, m == 1] = e[:, m == 1]
    np.testing.assert_allclose(err, want, rtol=1e-5)


def test_model_scores_match_numpy_on_its_own_features(model):
    normals, x = phantom_like(8, seed=20), phantom_like(3, seed=30)
    ref = model.anomaly_reference(normals, k=2, shrinkage=0.3)
    assert isinstance(ref, AnomalyReference) and ref.n_images == 8
    out = model.anomaly_scores(x, list(ANOMALY_SCORES), ref)
    assert set(out) == set(ANOMALY_SCORES)
    g = model.cfg.img_size // model.cfg.patch_size
    for kind, (s, m) in out.items():
        assert s.shape == (3,) and s.dtype == np.float64 and np.isfinite(s).all(), kind
        assert m.shape == ((3, 1, 1) if kind == "feature_distance" else (3, g, g)), kind
    eps = 1e-4
    ta, tx = model.encode(normals)[:, 1:], model.encode(x)[:, 1:]
    d = ((tx[:, None] - ta[None]) ** 2).sum(-1)
    np.testing.assert_allclose(out["token_knn"][0], np.sort(d, 1)[:, :2].mean(1).mean(1),
                               rtol=1e-5)
    va, vx = model.restoration_errors(normals), model.restoration_errors(x)
    ia, ix = model.inpaint_errors(normals), model.inpaint_errors(x)
    for kind, (a, b) in {"restore_z": (np.log(va + eps), np.log(vx + eps)),
                         "inpaint_z": (np.log(ia + eps), np.log(ix + eps)),
                         "inpaint_ratio_z": (np.log(ia + eps) - np.log(va + eps),
                                             np.log(ix + eps) - np.log(vx + eps))}.items():
        want = ((b - a.mean(0)) / a.std(0, ddof=1)).mean(1)
        np.testing.assert_allclose(out[kind][0], want, rtol=1e-3, atol=1e-4, err_msg=kind)
    np.testing.assert_allclose(out["inpaint"][0], ix.mean(1), rtol=1e-6)
    np.testing.assert_allclose(out["eq51"][0], model.anomaly_log_score(x))
    for kind, pooled in (("token_gauss", False), ("feature_distance", True)):
        mean, prec = np_gauss(np.concatenate([np.zeros_like(ta[:, :1]), ta], 1), pooled, 0.3)
        z = tx.astype(np.float64).mean(1, keepdims=True) if pooled else tx.astype(np.float64)
        dd = z - mean
        want = np.einsum("bgd,gde,bge->bg", dd, prec, dd).mean(1)
        np.testing.assert_allclose(out[kind][0], want, rtol=1e-3, err_msg=kind)
    # one kind at a time: the same numbers
    s, m = model.anomaly_scores(x, "token_knn", ref)
    np.testing.assert_array_equal(s, out["token_knn"][0])


def test_model_scores_refuse_unknown_kinds_and_missing_references(model):
    x = phantom_like(2, seed=1)
    with pytest.raises(ValueError, match="unknown anomaly score"):
        model.anomaly_scores(x, "blur")
    with pytest.raises(ValueError, match="need a reference"):
        model.anomaly_scores(x, "token_knn")
    ref = model.anomaly_reference(phantom_like(3), kinds=["restore_z"])
    with pytest.raises(ValueError, match="need a reference"):
        model.anomaly_scores(x, ["restore_z", "token_gauss"], ref)
    with pytest.raises(ValueError, match="at least 2 normal"):
        model.anomaly_reference(phantom_like(1))
    assert model.anomaly_scores(x, "eq51")[0].shape == (2,)


def test_scores_do_not_depend_on_the_chunking(model, monkeypatch):
    import afire.model as am

    ref = model.anomaly_reference(phantom_like(6), k=2)
    x = phantom_like(20, seed=3)
    a = model.anomaly_scores(x, list(ANOMALY_SCORES), ref)
    whole = am._in_chunks
    monkeypatch.setattr(am, "_in_chunks",
                        lambda fn, per, chunk=256, **kw: whole(fn, per, chunk=7, **kw))
    b = model.anomaly_scores(x, list(ANOMALY_SCORES), ref)
    for k in a:
        np.testing.assert_array_equal(a[k][0], b[k][0], err_msg=k)
        np.testing.assert_array_equal(a[k][1], b[k][1], err_msg=k)
