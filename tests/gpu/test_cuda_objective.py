"""GPU twins of the SLM and the objective (afire.cuda) against the CPU (afire._C), same inputs.

The CPU functions are themselves checked against independent NumPy references in
tests/test_slm.py and tests/test_objective.py; here the GPU must reproduce the CPU:
  - SLM: BIT-IDENTICAL x', masks and token labels (every config);
  - prototypes_update and recon_loss's gradient: the same operations in the same order,
    compared at rtol 1e-6 (identical in practice);
  - Sinkhorn: rtol 1e-5, atol 1e-7 per entry (double sums in another order);
  - losses: rel 2e-5 (+ abs 1e-6); gradients: max|GPU - CPU| <= 1e-4 * max|CPU| + 1e-6
    (the CPU accumulates some gradient terms in float32, the GPU in double);
  - anomaly score: rtol 1e-12 (double throughout);
  - determinism: two GPU runs are bit-identical.
Skipped with a visible reason when the build has no CUDA backend or no GPU is visible.
"""
import numpy as np
import pytest

from afire import _C
from afire import cuda

from _util import phantom_like

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("gpu")]
slm = _C.slm
obj = _C.objective


def assert_grad_close(got, want, rel=1e-4, atol=1e-6):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape
    err = np.abs(got - want).max()
    assert err <= rel * np.abs(want).max() + atol, f"grad max err {err:.3g}"


def same_outputs(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        if isinstance(u, np.ndarray):
            assert u.dtype == v.dtype and u.shape == v.shape
            assert np.array_equal(u.view(np.uint8), v.view(np.uint8))
        else:
            assert u == v or (u != u and v != v)


# ---------------------------------------------------------------- SLM


def xray_like(rng, S):
    """Two bright lung-like ellipses on a dark background plus noise (bimodal)."""
    yy, xx = np.mgrid[0:S, 0:S] / S
    img = 40 + 15 * rng.standard_normal((S, S))
    for cx in (0.3, 0.7):
        inside = ((xx - cx) / 0.17) ** 2 + ((yy - 0.5) / 0.33) ** 2 < 1
        img[inside] += 120 + 10 * rng.standard_normal(inside.sum())
    return np.clip(img, 0, 255).astype(np.uint8)


def slm_both(images, seed, **kw):
    c = slm.slm_generate(images, seed, **kw)
    g = cuda.slm_generate(images, seed, **kw)
    for name, u, v in zip(("x_prime", "masks", "token_labels"), c, g):
        assert v.dtype == np.uint8 and v.shape == u.shape, name
        diff = np.argwhere(u != v)
        assert diff.size == 0, f"{name}: {len(diff)} entries differ, first at {diff[:3].tolist()}"
    return c


RNG = np.random.default_rng(20250302)
IMAGES = {
    "random_32": RNG.integers(0, 256, (8, 32, 32), dtype=np.uint8),
    "phantom_32": phantom_like(8, s=32, seed=3),
    "xray_224": np.stack([xray_like(RNG, 224) for _ in range(6)]),
    "random_224": RNG.integers(0, 256, (3, 224, 224), dtype=np.uint8),
    "phantom_224": phantom_like(4, s=224, seed=4),
}


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_slm_bit_identical_default_config(name):
    x = IMAGES[name]
    P = 8 if x.shape[1] == 32 else 16
    for seed, step, first in [(0, 0, 0), (42, 3, 100), (2**63 + 5, 2**32 + 7, 2**24 + 9)]:
        xp, m, lab = slm_both(x, seed, step=step, first_index=first, patch=P)
    assert m.max() > 0 and lab.any()  # lesions were drawn


def test_slm_bit_identical_released_config():
    x = IMAGES["xray_224"][:3]
    slm_both(x, 7, step=1, patch=16, size_min=16, size_max=128, token_rule="released",
             region_rule="largest")
    slm_both(IMAGES["phantom_32"], 8, patch=8, region_rule="largest")
    slm_both(IMAGES["random_32"], 9, patch=4, token_rule="released")


@pytest.mark.parametrize("kw", [dict(gamma2=0.1, strength=1.0), dict(gamma2=3.0, strength=0.25),
                                dict(lesions_min=10, lesions_max=64, crop_max=7),
                                dict(lesions_min=0, lesions_max=0), dict(strength=0.0),
                                dict(size_min=1, size_max=3, crop_max=1)])
def test_slm_bit_identical_options(kw):
    slm_both(IMAGES["xray_224"][:2], 11, step=5, patch=16, **kw)
    slm_both(IMAGES["phantom_32"], 12, patch=8, **kw)


@pytest.mark.parametrize("value", [0, 1, 128, 255])
def test_slm_constant_images(value):
    x = np.full((4, 32, 32), value, np.uint8)
    xp, m, lab = slm_both(x, 13, patch=8)
    if value == 0:
        assert m.max() == 0 and not lab.any()
    slm_both(np.full((2, 224, 224), value, np.uint8), 14, patch=16, region_rule="largest")


@pytest.mark.parametrize("S,P", [(1, 1), (2, 1), (6, 3), (32, 32), (48, 16)])
def test_slm_small_and_odd_sizes(S, P):
    slm_both(RNG.integers(0, 256, (5, S, S), dtype=np.uint8), 15, patch=P)


def test_slm_batch_independence_and_determinism():
    x = IMAGES["xray_224"]
    full = cuda.slm_generate(x, 21, step=2, first_index=50)
    again = cuda.slm_generate(x, 21, step=2, first_index=50)
    same_outputs(full, again)
    part = cuda.slm_generate(x[2:4], 21, step=2, first_index=52)
    for u, v in zip(full, part):
        assert np.array_equal(u[2:4], v)
    empty = cuda.slm_generate(x[:0], 21)
    assert empty[0].shape == (0, 224, 224) and empty[2].shape == (0, 196)


def test_slm_validation_matches_cpu():
    x = IMAGES["random_32"]
    for kw, exc in [(dict(patch=5), ValueError), (dict(gamma2=-1.0), ValueError),
                    (dict(token_rule="x"), ValueError), (dict(lesions_max=65), ValueError)]:
        with pytest.raises(exc):
            slm.slm_generate(x, 1, **kw)
        with pytest.raises(exc):
            cuda.slm_generate(x, 1, **kw)
    with pytest.raises(TypeError):
        cuda.slm_generate(x.astype(np.int16), 1, patch=8)
    with pytest.raises(ValueError, match="square"):
        cuda.slm_generate(x[:, :, :16], 1, patch=8)


# ---------------------------------------------------------------- objective inputs


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def make_inputs(rng, B, L, K):
    s = rng.uniform(-1, 1, (B, L, K)).astype(np.float32)
    C = softmax(rng.normal(0, 2, (L, K))).astype(np.float32)
    return s, C


B_, L_, K_ = 3, 4, 5
LABELS = {  # the edge cases of tests/test_objective.py
    "mixed": np.array([[0, 1, 0, 0], [1, 0, 0, 1], [0, 0, 1, 0]], np.uint8),
    "all_normal": np.zeros((B_, L_), np.uint8),
    "all_abnormal": np.ones((B_, L_), np.uint8),
    "edge_positions": np.array([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]], np.uint8),
    "one_normal_token": np.array([[1, 1, 1, 1], [1, 0, 1, 1], [1, 1, 1, 1]], np.uint8),
}


def paper_cases():
    """(name, s, C, abn): the edge cases, plus sizes that exercise every loop of the kernels
    (B > 32 lanes, K > 128 threads, L > 32, sharp distributions, zero prototype entries)."""
    rng = np.random.default_rng(31)
    out = []
    for name in sorted(LABELS):
        s, C = make_inputs(rng, B_, L_, K_)
        out.append((name, s, C, LABELS[name]))
    s, C = make_inputs(rng, 1, 6, 4)
    out.append(("batch_of_one", s, C, np.array([[0, 1, 0, 0, 1, 0]], np.uint8)))
    s = np.where(rng.random((4, 3, 6)) < 0.2, 1.0, -1.0).astype(np.float32)
    C = softmax(rng.normal(0, 4, (3, 6))).astype(np.float32)
    C[0, 1] = 0.0
    out.append(("underflow", s, C, np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0], [0, 0, 0]],
                                            np.uint8)))
    s, C = make_inputs(rng, 8, 16, 32)
    out.append(("medium", s, C, (rng.random((8, 16)) < 0.3).astype(np.uint8)))
    s, C = make_inputs(rng, 40, 9, 300)
    out.append(("wide", s, C, (rng.random((40, 9)) < 0.25).astype(np.uint8)))
    s, C = make_inputs(rng, 5, 49, 20)
    out.append(("long", s, C, (rng.random((5, 49)) < 0.5).astype(np.uint8)))
    return out


PAPER = paper_cases()


# ---------------------------------------------------------------- paper loss


@pytest.mark.parametrize("case", PAPER, ids=[c[0] for c in PAPER])
def test_paper_loss_matches_cpu(case):
    name, s, C, abn = case
    for tau_s, tau in [(0.1, 0.1), (0.2, 0.5)]:
        c = obj.paper_loss(s, C, abn, tau_s, tau)
        g = cuda.paper_loss(s, C, abn, tau_s, tau)
        assert g[0] == pytest.approx(c[0], rel=2e-5, abs=1e-6)
        assert g[1] == pytest.approx(c[1], rel=2e-5, abs=1e-6)
        assert np.isfinite(g[2]).all() and np.isfinite(g[3]).all()
        assert_grad_close(g[2], c[2])
        assert_grad_close(g[3], c[3])
        if not c[3].any():  # no anchor: exactly nothing
            assert g[1] == 0.0 and not g[3].any()
        if not c[2].any():
            assert g[0] == 0.0 and not g[2].any()


def test_paper_loss_combined_weighted_accumulates():
    """The trainer's call: one buffer for both gradients, weights, accumulation (+=)."""
    for name, s, C, abn in PAPER[:3] + PAPER[-3:]:
        rng = np.random.default_rng(7)
        ds0 = rng.normal(size=s.shape).astype(np.float32)
        c = obj.paper_loss(s, C, abn)
        g = cuda.paper_loss(s, C, abn, w_stru=0.7, w_cate=1.3, combined=True, ds=ds0)
        assert g[3] is None
        want = ds0.astype(np.float64) + 0.7 * c[2] + 1.3 * c[3]
        assert_grad_close(g[2], want)
        assert g[0] == pytest.approx(c[0], rel=2e-5, abs=1e-6)  # losses stay unweighted
        assert g[1] == pytest.approx(c[1], rel=2e-5, abs=1e-6)


def test_paper_loss_deterministic_and_bool_labels():
    name, s, C, abn = PAPER[-2]
    a = cuda.paper_loss(s, C, abn)
    b = cuda.paper_loss(s, C, abn.astype(bool))
    same_outputs(a, b)


# ---------------------------------------------------------------- recon loss


@pytest.mark.parametrize("name", ["mixed", "all_normal", "all_abnormal"])
def test_recon_loss_matches_cpu(name):
    rng = np.random.default_rng(41)
    abn = LABELS[name]
    y = rng.normal(size=(B_, L_, 7)).astype(np.float32)
    x = rng.normal(size=(B_, L_, 7)).astype(np.float32)
    for w_abn in (2.0, 1.0, 0.0):
        lc, dc = obj.recon_loss(y, x, abn, w_abn)
        lg, dg = cuda.recon_loss(y, x, abn, w_abn)
        assert lg == pytest.approx(lc, rel=1e-6, abs=1e-12)
        np.testing.assert_allclose(dg, dc, rtol=1e-6, atol=0)


def test_recon_loss_large_and_weighted():
    rng = np.random.default_rng(42)
    y = rng.normal(size=(6, 196, 768)).astype(np.float32)
    x = rng.normal(size=(6, 196, 768)).astype(np.float32)
    abn = (rng.random((6, 196)) < 0.2).astype(np.uint8)
    lc, dc = obj.recon_loss(y, x, abn)
    lg, dg = cuda.recon_loss(y, x, abn, weight=0.5)
    assert lg == pytest.approx(lc, rel=1e-6)
    np.testing.assert_allclose(dg, 0.5 * dc, rtol=1e-6, atol=0)
    same_outputs(cuda.recon_loss(y, x, abn), cuda.recon_loss(y, x, abn))


# ---------------------------------------------------------------- released loss


def released_cases():
    rng = np.random.default_rng(51)
    out = []
    for name in ("mixed", "all_abnormal", "edge_positions", "all_normal"):
        s, _ = make_inputs(rng, B_, L_, K_)
        C = rng.uniform(-1, 1, (L_, K_)).astype(np.float32)
        y = rng.normal(size=(B_, L_, 6)).astype(np.float32)
        x = rng.normal(size=(B_, L_, 6)).astype(np.float32)
        out.append((name, s, C, LABELS[name], y, x))
    B, L, K, Q = 16, 49, 64, 48
    s, _ = make_inputs(rng, B, L, K)
    C = rng.uniform(-1, 1, (L, K)).astype(np.float32)
    abn = (rng.random((B, L)) < 0.3).astype(np.uint8)
    out.append(("medium", s, C, abn, rng.normal(size=(B, L, Q)).astype(np.float32),
                rng.normal(size=(B, L, Q)).astype(np.float32)))
    return out


RELEASED = released_cases()


@pytest.mark.parametrize("case", RELEASED, ids=[c[0] for c in RELEASED])
def test_released_loss_matches_cpu(case):
    name, s, C, abn, y, x = case
    for tau_s, eps, iters in [(0.1, 0.05, 3), (0.2, 0.5, 0)]:
        c = obj.released_loss(s, C, abn, y, x, tau_s, eps, iters)
        g = cuda.released_loss(s, C, abn, y, x, tau_s, eps, iters)
        assert g[0] == pytest.approx(c[0], rel=2e-5, abs=1e-6)
        assert g[1] == pytest.approx(c[1], rel=1e-6)
        assert_grad_close(g[2], c[2])
        np.testing.assert_allclose(g[3], c[3], rtol=1e-6, atol=0)
        if name == "all_abnormal":
            assert g[0] == 0.0 and not g[2].any()
    same_outputs(cuda.released_loss(s, C, abn, y, x), cuda.released_loss(s, C, abn, y, x))


# ---------------------------------------------------------------- Sinkhorn, prototypes


@pytest.mark.parametrize("N,K,eps,iters", [(12, 5, 0.05, 3), (7, 9, 0.5, 1), (5, 3, 0.1, 0),
                                           (40, 8, 0.5, 200), (3000, 70, 0.05, 3),
                                           (1, 1, 0.05, 3), (33, 257, 0.05, 3)])
def test_sinkhorn_matches_cpu(N, K, eps, iters):
    rng = np.random.default_rng(61)
    logits = rng.uniform(-1, 1, (N, K)).astype(np.float32)
    c = obj.sinkhorn_knopp(logits, eps, iters)
    g = cuda.sinkhorn_knopp(logits, eps, iters)
    np.testing.assert_allclose(g, c, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g.sum(1), 1.0, atol=1e-5)
    same_outputs((g,), (cuda.sinkhorn_knopp(logits, eps, iters),))


def test_sinkhorn_underflowing_rows():
    logits = np.array([[0.0, 0.0], [-10.0, -10.0], [-100.0, 0.0]], np.float32)
    c = obj.sinkhorn_knopp(logits, 0.05, 3)
    g = cuda.sinkhorn_knopp(logits, 0.05, 3)
    assert np.isfinite(g).all()
    np.testing.assert_allclose(g, c, rtol=1e-5, atol=1e-7)


def test_prototypes_update_matches_cpu():
    rng = np.random.default_rng(71)
    for B, L, K in [(4, 3, 5), (64, 196, 256)]:
        src = rng.random((B, L, K)).astype(np.float32)
        C0 = rng.random((L, K)).astype(np.float32)
        for m, overwrite in [(0.75, False), (0.0, False), (1.0, False), (0.9, True)]:
            c, g = C0.copy(), C0.copy()
            assert obj.prototypes_update(c, src, m, overwrite) is None
            assert cuda.prototypes_update(g, src, m, overwrite) is None
            np.testing.assert_allclose(g, c, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="C"):
        cuda.prototypes_update(np.zeros((5, 3), np.float32).T, np.zeros((2, 3, 5), np.float32))


# ---------------------------------------------------------------- anomaly score


def test_anomaly_score_matches_cpu():
    rng = np.random.default_rng(81)
    for B, L, PPC in [(3, 6, 4), (5, 196, 768), (2, 1, 1), (1, 37, 33)]:
        y = rng.normal(0, 0.3, (B, L, PPC)).astype(np.float32)
        x = rng.normal(0, 0.3, (B, L, PPC)).astype(np.float32)
        c = obj.anomaly_score(y, x)
        g = cuda.anomaly_score(y, x)
        for u, v in zip(c, g):
            assert v.dtype == np.float64 and v.shape == u.shape
            np.testing.assert_allclose(v, u, rtol=1e-12)
        same_outputs(g, cuda.anomaly_score(y, x))
    s0, l0, e0 = cuda.anomaly_score(x, x)
    assert (s0 == 1.0).all() and (l0 == 0.0).all() and not e0.any()


def test_anomaly_score_huge_errors():
    L, PPC = 5, 4
    y = np.zeros((3, L, PPC), np.float32)
    x = np.zeros((3, L, PPC), np.float32)
    x[0, 2, :] = 10.0
    x[1, 3, :] = 15.0
    x[2, :, :] = 1e20
    c = obj.anomaly_score(y, x)
    score, log_score, err = cuda.anomaly_score(y, x)
    assert np.isfinite(log_score).all()
    np.testing.assert_allclose(log_score, c[1], rtol=1e-12)
    np.testing.assert_allclose(err, c[2], rtol=1e-12)
    assert score[0] == pytest.approx(c[0][0], rel=1e-9)
    assert np.isinf(score[1]) and np.isinf(score[2])


# ---------------------------------------------------------------- validation


def test_validation_errors_match_cpu():
    rng = np.random.default_rng(91)
    s, C = make_inputs(rng, B_, L_, K_)
    abn = LABELS["mixed"]
    bad = abn.copy()
    bad[0, 0] = 2
    nan = s.copy()
    nan[1, 2, 3] = np.nan
    y = np.zeros((B_, L_, 4), np.float32)
    calls = [
        (TypeError, "s", "paper_loss", (s.astype(np.float64), C, abn), {}),
        (TypeError, "abn", "paper_loss", (s, C, abn.astype(np.int32)), {}),
        (ValueError, "abn", "paper_loss", (s, C, bad), {}),
        (ValueError, "abn", "paper_loss", (s, C, abn[:, :3]), {}),
        (ValueError, "C", "paper_loss", (s, C[:, :4], abn), {}),
        (ValueError, "C", "paper_loss", (s, -C, abn), {}),
        (ValueError, "C", "paper_loss", (s, np.zeros_like(C), abn), {}),
        (ValueError, "s", "paper_loss", (nan, C, abn), {}),
        (ValueError, "tau", "paper_loss", (s, C, abn), {"tau": 0.0}),
        (ValueError, "x", "recon_loss", (y, np.zeros((B_, L_, 5), np.float32), abn), {}),
        (ValueError, "y", "released_loss", (s, C, abn, np.zeros((B_, 2, 4), np.float32),
                                            np.zeros((B_, 2, 4), np.float32)), {}),
        (ValueError, "eps", "sinkhorn_knopp", (C,), {"eps": -1.0}),
        (ValueError, "logits", "sinkhorn_knopp", (np.full((2, 2), np.inf, np.float32),), {}),
        (ValueError, "y", "anomaly_score", (np.full((1, 2, 2), np.nan, np.float32),
                                            np.zeros((1, 2, 2), np.float32)), {}),
    ]
    for exc, match, fn, args, kw in calls:
        with pytest.raises(exc, match=match):
            getattr(obj, fn)(*args, **kw)
        with pytest.raises(exc, match=match):
            getattr(cuda, fn)(*args, **kw)
