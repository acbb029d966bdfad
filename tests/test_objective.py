"""afire._C.objective against an independent float64 NumPy implementation.

The NumPy references below are written straight from METHOD.md §3-§4, §6 and the paper's
Eq. 12, 14-16, 20, 51 (plain loops, f = exp(-H/tau) evaluated directly in float64, no
log-space tricks), so they share no structure with the C code. Gradients of the C core are
compared with central finite differences of these references in float64.

Tolerances (the C core stores float32):
  losses: rtol 2e-5 (+ atol 1e-6); gradients: |C - FD| <= 2e-4 * max|FD| + 1e-6;
  Sinkhorn: rtol 1e-5, atol 1e-7 per entry; row sums 1 within 1e-5.
"""
import numpy as np
import pytest

from afire._C import objective as obj

# ----------------------------------------------------------------------------------------
# Independent NumPy references (float64)


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def cross_entropy(p, r):
    """H(p, r) = -sum_k p_k log r_k."""
    return -np.sum(p * np.log(r))


def f_sim(p, r, tau):
    """f(p, r) = exp(-H(p, r) / tau) (METHOD §4, sign-corrected)."""
    return np.exp(-cross_entropy(p, r) / tau)


def ref_paper(s, C, abn, tau_s=0.1, tau=0.1):
    s = np.asarray(s, np.float64)
    B, L, _ = s.shape
    q = softmax(s / tau_s)
    c = np.asarray(C, np.float64)
    c = np.maximum(c / c.sum(1, keepdims=True), 1e-12)
    stru = []
    for i in range(B):
        for j in range(L):
            if abn[i, j]:
                continue
            num = f_sim(q[i, j], c[j], tau)
            den = sum(f_sim(q[i, j], c[m], tau) for m in range(L))
            stru.append(-np.log(num / den))
    cate = []
    for j in range(L):
        normal = [b for b in range(B) if not abn[b, j]]
        abnormal = [b for b in range(B) if abn[b, j]]
        for i in normal:
            others = [b for b in normal if b != i]
            if not others:  # pos == 0: not an anchor
                continue
            pos = sum(f_sim(q[i, j], q[b, j], tau) for b in others)
            neg = sum(f_sim(q[i, j], q[b, j], tau) for b in abnormal)
            neg += sum(f_sim(q[b, j], c[j], tau) for b in abnormal)
            cate.append(-np.log(pos / (pos + neg)))
    l_stru = np.mean(stru) if stru else 0.0
    l_cate = np.mean(cate) if cate else 0.0
    return l_stru, l_cate


def ref_sinkhorn(logits, eps, iters):
    Q = np.exp((logits - logits.max()) / eps)
    Q = Q / Q.sum()
    N, K = Q.shape
    for _ in range(iters):
        Q = Q / Q.sum(0, keepdims=True) / K
        Q = Q / Q.sum(1, keepdims=True) / N
    return Q / Q.sum(1, keepdims=True)


def ref_released(s, C, abn, y, x, tau_s=0.1, eps=0.05, iters=3):
    s = np.asarray(s, np.float64)
    B, L, _ = s.shape
    P = ref_sinkhorn(np.asarray(C, np.float64), eps, iters)
    terms = []
    for i in range(B):
        for j in range(L):
            if not abn[i, j]:
                logq = np.log(softmax(s[i, j] / tau_s))
                terms.append(-np.sum(P[j] * logq))
    l_cst = np.mean(terms) if terms else 0.0
    d = np.asarray(y, np.float64) - np.asarray(x, np.float64)
    return l_cst, np.mean(d * d)


def ref_recon(y, x, abn, w_abn):
    B, L, PPC = y.shape
    total = 0.0
    for i in range(B):
        for j in range(L):
            d = np.asarray(y[i, j], np.float64) - np.asarray(x[i, j], np.float64)
            total += (w_abn if abn[i, j] else 1.0) * np.dot(d, d) / PPC
    return total / (B * L)


def central_fd(fun, v, h):
    """d fun / d v by central differences, v float64 (copied)."""
    v = np.array(v, np.float64)
    g = np.zeros_like(v)
    for idx in np.ndindex(v.shape):
        old = v[idx]
        v[idx] = old + h
        fp = fun(v)
        v[idx] = old - h
        fm = fun(v)
        v[idx] = old
        g[idx] = (fp - fm) / (2 * h)
    return g


def assert_grad_close(got, want, rel=2e-4, atol=1e-6):
    scale = np.abs(want).max()
    err = np.abs(np.asarray(got, np.float64) - want).max()
    assert err <= rel * scale + atol, f"grad max err {err:.3g} vs scale {scale:.3g}"


# ----------------------------------------------------------------------------------------
# Inputs


def make_inputs(rng, B, L, K):
    s = rng.uniform(-1, 1, (B, L, K)).astype(np.float32)  # cosine similarities
    C = softmax(rng.normal(0, 2, (L, K))).astype(np.float32)
    return s, C


B_, L_, K_ = 3, 4, 5
LABELS = {
    "mixed": np.array([[0, 1, 0, 0], [1, 0, 0, 1], [0, 0, 1, 0]], np.uint8),
    "all_normal": np.zeros((B_, L_), np.uint8),
    "all_abnormal": np.ones((B_, L_), np.uint8),
    # position 0: no normal token; position 3: no abnormal; image 2: no abnormal token;
    # position 1: a single normal token (not an anchor)
    "edge_positions": np.array([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]], np.uint8),
    "one_normal_token": np.array([[1, 1, 1, 1], [1, 0, 1, 1], [1, 1, 1, 1]], np.uint8),
}


# ----------------------------------------------------------------------------------------
# Paper objective


@pytest.mark.parametrize("name", sorted(LABELS))
def test_paper_loss_matches_numpy_and_fd(name):
    rng = np.random.default_rng(1)
    abn = LABELS[name]
    s, C = make_inputs(rng, B_, L_, K_)
    l_stru, l_cate, ds_stru, ds_cate = obj.paper_loss(s, C, abn)
    r_stru, r_cate = ref_paper(s, C, abn)
    assert np.isfinite([l_stru, l_cate]).all()
    assert l_stru == pytest.approx(r_stru, rel=2e-5, abs=1e-6)
    assert l_cate == pytest.approx(r_cate, rel=2e-5, abs=1e-6)
    fd_stru = central_fd(lambda v: ref_paper(v, C, abn)[0], s, 1e-5)
    fd_cate = central_fd(lambda v: ref_paper(v, C, abn)[1], s, 1e-5)
    assert_grad_close(ds_stru, fd_stru)
    assert_grad_close(ds_cate, fd_cate)
    if name == "all_abnormal":  # no normal token: both terms 0, zero grads
        assert l_stru == 0.0 and l_cate == 0.0
        assert not ds_stru.any() and not ds_cate.any()
    if name in ("all_normal", "one_normal_token"):  # neg = 0 or no anchor: L_cate = 0
        assert l_cate == 0.0 and np.abs(ds_cate).max() < 1e-6
    if name == "mixed":
        assert l_stru > 0 and l_cate > 0 and np.abs(ds_cate).max() > 1e-3


def test_paper_loss_batch_of_one():
    rng = np.random.default_rng(2)
    s, C = make_inputs(rng, 1, 6, 4)
    abn = np.array([[0, 1, 0, 0, 1, 0]], np.uint8)
    l_stru, l_cate, ds_stru, ds_cate = obj.paper_loss(s, C, abn)
    assert l_stru == pytest.approx(ref_paper(s, C, abn)[0], rel=2e-5)
    assert l_cate == 0.0 and not ds_cate.any()  # no pair of normal tokens anywhere
    assert_grad_close(ds_stru, central_fd(lambda v: ref_paper(v, C, abn)[0], s, 1e-5))


def test_paper_loss_float32_underflow_of_f():
    """Sharp distributions: f = exp(-H/tau) ~ 1e-100, below float32 range; C works in log
    space and must stay finite and match the float64 reference."""
    rng = np.random.default_rng(3)
    B, L, K = 4, 3, 6
    s = np.where(rng.random((B, L, K)) < 0.2, 1.0, -1.0).astype(np.float32)
    C = softmax(rng.normal(0, 4, (L, K))).astype(np.float32)
    C[0, 1] = 0.0  # a zero prototype entry: clamped to 1e-12 before the log
    abn = np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0], [0, 0, 0]], np.uint8)
    q = softmax(s.astype(np.float64) / 0.1)
    assert f_sim(q[0, 0], q[1, 0], 0.1) < 1e-45  # f itself is below float32
    l_stru, l_cate, ds_stru, ds_cate = obj.paper_loss(s, C, abn, tau=0.1)
    r_stru, r_cate = ref_paper(s, C, abn)
    assert np.isfinite(ds_stru).all() and np.isfinite(ds_cate).all()
    assert l_stru == pytest.approx(r_stru, rel=2e-5)
    assert l_cate == pytest.approx(r_cate, rel=2e-5)
    assert_grad_close(ds_cate, central_fd(lambda v: ref_paper(v, C, abn)[1], s, 1e-5))


def test_paper_loss_temperatures():
    rng = np.random.default_rng(4)
    s, C = make_inputs(rng, B_, L_, K_)
    abn = LABELS["mixed"]
    l_stru, l_cate, _, ds_cate = obj.paper_loss(s, C, abn, tau_s=0.2, tau=0.5)
    r_stru, r_cate = ref_paper(s, C, abn, tau_s=0.2, tau=0.5)
    assert l_stru == pytest.approx(r_stru, rel=2e-5)
    assert l_cate == pytest.approx(r_cate, rel=2e-5)
    fd = central_fd(lambda v: ref_paper(v, C, abn, 0.2, 0.5)[1], s, 1e-5)
    assert_grad_close(ds_cate, fd)


def test_paper_loss_accepts_bool_labels_and_is_deterministic():
    rng = np.random.default_rng(5)
    s, C = make_inputs(rng, B_, L_, K_)
    a = obj.paper_loss(s, C, LABELS["mixed"])
    b = obj.paper_loss(s, C, LABELS["mixed"].astype(bool))
    assert a[:2] == b[:2]
    np.testing.assert_array_equal(a[2], b[2])
    np.testing.assert_array_equal(a[3], b[3])


# ----------------------------------------------------------------------------------------
# Structure term against the teacher's tokens (not in the paper: stru_target="teacher_token")


def ref_stru_token(s, qt, abn, tau_s=0.1, tau=0.1):
    """For each normal token (i, j): -log[f(q_ij, t_ij) / sum_b f(q_ij, t_bj)], t = the
    teacher rows renormalised and clamped to 1e-12; mean over normal tokens (0 if none)."""
    s = np.asarray(s, np.float64)
    B, L, _ = s.shape
    q = softmax(s / tau_s)
    t = np.asarray(qt, np.float64)
    t = np.maximum(t / t.sum(-1, keepdims=True), 1e-12)
    terms = []
    for i in range(B):
        for j in range(L):
            if abn[i, j]:
                continue
            num = f_sim(q[i, j], t[i, j], tau)
            den = sum(f_sim(q[i, j], t[b, j], tau) for b in range(B))
            terms.append(-np.log(num / den))
    return np.mean(terms) if terms else 0.0


def make_teacher(rng, B, L, K, sharp=1.0):
    return softmax(rng.normal(0, sharp, (B, L, K))).astype(np.float32)


@pytest.mark.parametrize("name", sorted(LABELS))
def test_stru_token_loss_matches_numpy_and_fd(name):
    rng = np.random.default_rng(21)
    abn = LABELS[name]
    s, _ = make_inputs(rng, B_, L_, K_)
    qt = make_teacher(rng, B_, L_, K_)
    l_stru, ds = obj.stru_token_loss(s, qt, abn)
    assert l_stru == pytest.approx(ref_stru_token(s, qt, abn), rel=2e-5, abs=1e-6)
    assert_grad_close(ds, central_fd(lambda v: ref_stru_token(v, qt, abn), s, 1e-5))
    if name == "all_abnormal":
        assert l_stru == 0.0 and not ds.any()
    else:
        assert l_stru > 0 and np.abs(ds).max() > 1e-3
    # abnormal student tokens get no gradient (they are not anchors)
    assert not ds[abn.astype(bool)].any()


def test_stru_token_loss_temperatures_and_unnormalised_teacher():
    rng = np.random.default_rng(22)
    s, _ = make_inputs(rng, B_, L_, K_)
    qt = make_teacher(rng, B_, L_, K_, sharp=3.0)
    qt[0, 1, 2] = 0.0                   # a zero entry: clamped to 1e-12 before the log
    qt *= rng.uniform(0.5, 2.0, (B_, L_, 1)).astype(np.float32)   # rows renormalised
    abn = LABELS["mixed"]
    l_stru, ds = obj.stru_token_loss(s, qt, abn, tau_s=0.2, tau=0.5)
    assert l_stru == pytest.approx(ref_stru_token(s, qt, abn, 0.2, 0.5), rel=2e-5)
    assert_grad_close(ds, central_fd(lambda v: ref_stru_token(v, qt, abn, 0.2, 0.5), s, 1e-5))


def test_stru_token_loss_position_cannot_solve_it():
    """The point of the variant: a student that outputs one distribution per position
    (the same for every image) cannot go below log(B) on teacher tokens that differ across
    images, while Eq. 12 with the batch-mean prototypes is nearly solved by it."""
    rng = np.random.default_rng(23)
    B, L, K = 8, 4, 6
    qt = make_teacher(rng, B, L, K, sharp=3.0)
    abn = np.zeros((B, L), np.uint8)
    # the per-position optimum of Eq. 12: sharp on each position's own prototype argmax
    protos = qt.mean(0)
    pos_only = np.broadcast_to(np.where(
        np.arange(K) == protos.argmax(1)[:, None], 1.0, -1.0), (B, L, K)).astype(np.float32)
    l_paper, _, _, _ = obj.paper_loss(np.ascontiguousarray(pos_only), protos, abn)
    l_token, _ = obj.stru_token_loss(np.ascontiguousarray(pos_only), qt, abn)
    assert l_token >= np.log(B) - 1e-4      # all candidates tie or worse: no information
    # the teacher's own tokens as the student's output: far below log(B)
    own = (0.1 * np.log(qt)).astype(np.float32)
    l_own, _ = obj.stru_token_loss(own, qt, abn)
    assert l_own < 0.5 * np.log(B)
    # the same teacher rows at every image: every candidate ties, loss exactly log(B)
    same = np.ascontiguousarray(np.broadcast_to(qt[:1], qt.shape))
    l_same, ds_same = obj.stru_token_loss(own, same, abn)
    assert l_same == pytest.approx(np.log(B), rel=1e-6)
    assert np.abs(ds_same).max() < 1e-5     # ... and no gradient
    assert l_paper < l_token


def test_stru_token_loss_batch_of_one_is_zero():
    rng = np.random.default_rng(24)
    s, _ = make_inputs(rng, 1, 5, 4)
    qt = make_teacher(rng, 1, 5, 4)
    l_stru, ds = obj.stru_token_loss(s, qt, np.zeros((1, 5), np.uint8))
    assert l_stru == 0.0 and np.abs(ds).max() < 1e-7


def test_stru_token_loss_validation():
    rng = np.random.default_rng(25)
    s, _ = make_inputs(rng, B_, L_, K_)
    qt = make_teacher(rng, B_, L_, K_)
    abn = LABELS["mixed"]
    with pytest.raises(ValueError, match="qt"):
        obj.stru_token_loss(s, qt[:, :, :4], abn)
    with pytest.raises(ValueError, match="qt"):
        obj.stru_token_loss(s, -qt, abn)
    zero = qt.copy()
    zero[1, 2] = 0.0
    with pytest.raises(ValueError, match="qt"):
        obj.stru_token_loss(s, zero, abn)
    with pytest.raises(ValueError, match="tau"):
        obj.stru_token_loss(s, qt, abn, tau=0.0)


# ----------------------------------------------------------------------------------------
# Restoration loss (Eq. 20)


@pytest.mark.parametrize("name", ["mixed", "all_normal", "all_abnormal"])
def test_recon_loss(name):
    rng = np.random.default_rng(6)
    abn = LABELS[name]
    y = rng.normal(size=(B_, L_, 7)).astype(np.float32)
    x = rng.normal(size=(B_, L_, 7)).astype(np.float32)
    loss, dy = obj.recon_loss(y, x, abn, 2.0)
    assert loss == pytest.approx(ref_recon(y, x, abn, 2.0), rel=1e-6)
    assert_grad_close(dy, central_fd(lambda v: ref_recon(v, x, abn, 2.0), y, 1e-6))
    # analytic: 2 w (y - x) / (B L PPC)
    w = np.where(abn, 2.0, 1.0)[..., None]
    np.testing.assert_allclose(dy, 2 * w * (y - x) / y.size, rtol=1e-6, atol=1e-9)


def test_recon_loss_weight_one_is_mse():
    rng = np.random.default_rng(7)
    y = rng.normal(size=(2, 3, 4)).astype(np.float32)
    x = rng.normal(size=(2, 3, 4)).astype(np.float32)
    loss, _ = obj.recon_loss(y, x, LABELS["mixed"][:2, :3], w_abn=1.0)
    assert loss == pytest.approx(np.mean((y.astype(np.float64) - x) ** 2), rel=1e-6)


# ----------------------------------------------------------------------------------------
# Released objective


@pytest.mark.parametrize("name", ["mixed", "all_abnormal", "edge_positions"])
def test_released_loss(name):
    rng = np.random.default_rng(8)
    abn = LABELS[name]
    s, _ = make_inputs(rng, B_, L_, K_)
    C = rng.uniform(-1, 1, (L_, K_)).astype(np.float32)  # released: averaged raw logits
    y = rng.normal(size=(B_, L_, 6)).astype(np.float32)
    x = rng.normal(size=(B_, L_, 6)).astype(np.float32)
    l_cst, l_recon, ds, dy = obj.released_loss(s, C, abn, y, x)
    r_cst, r_recon = ref_released(s, C, abn, y, x)
    assert l_cst == pytest.approx(r_cst, rel=2e-5, abs=1e-6)
    assert l_recon == pytest.approx(r_recon, rel=1e-6)
    assert_grad_close(ds, central_fd(lambda v: ref_released(v, C, abn, y, x)[0], s, 1e-5))
    assert_grad_close(dy, central_fd(lambda v: ref_released(s, C, abn, v, x)[1], y, 1e-6))
    if name == "all_abnormal":
        assert l_cst == 0.0 and not ds.any()


# ----------------------------------------------------------------------------------------
# Sinkhorn-Knopp and prototypes


@pytest.mark.parametrize("N,K,eps,iters", [(12, 5, 0.05, 3), (7, 9, 0.5, 1), (5, 3, 0.1, 0)])
def test_sinkhorn_matches_numpy(N, K, eps, iters):
    rng = np.random.default_rng(9)
    logits = rng.uniform(-1, 1, (N, K)).astype(np.float32)
    q = obj.sinkhorn_knopp(logits, eps, iters)
    want = ref_sinkhorn(logits.astype(np.float64), eps, iters)
    np.testing.assert_allclose(q, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(q.sum(1), 1.0, atol=1e-5)


def test_sinkhorn_marginals_converge():
    rng = np.random.default_rng(10)
    N, K = 40, 8
    q = obj.sinkhorn_knopp(rng.uniform(-1, 1, (N, K)).astype(np.float32), 0.5, 200)
    np.testing.assert_allclose(q.sum(1), 1.0, atol=1e-5)  # rows: distributions
    np.testing.assert_allclose(q.sum(0), N / K, rtol=1e-4)  # classes balanced
    # and with the defaults (3 iterations) the columns are already far more balanced
    # than the plain softmax
    logits = rng.uniform(-1, 1, (N, K)).astype(np.float32)
    q3 = obj.sinkhorn_knopp(logits)
    sm = softmax(logits.astype(np.float64) / 0.05)
    assert np.std(q3.sum(0)) < 0.5 * np.std(sm.sum(0))


def test_sinkhorn_underflowing_row_is_nan_free():
    logits = np.array([[0.0, 0.0], [-10.0, -10.0]], np.float32)  # row 1: exp(-200) -> 0
    q = obj.sinkhorn_knopp(logits, 0.05, 3)
    assert np.isfinite(q).all()
    np.testing.assert_allclose(q.sum(1), 1.0, atol=1e-6)


def test_prototypes_update():
    rng = np.random.default_rng(11)
    src = rng.random((4, 3, 5)).astype(np.float32)
    C0 = rng.random((3, 5)).astype(np.float32)
    C = C0.copy()
    assert obj.prototypes_update(C, src, 0.75, False) is None
    qbar = src.astype(np.float64).mean(0)
    np.testing.assert_allclose(C, 0.75 * C0 + 0.25 * qbar, rtol=1e-6)
    obj.prototypes_update(C, src, 0.75, overwrite=True)
    np.testing.assert_allclose(C, qbar, rtol=1e-6)
    C2 = C0.copy()
    obj.prototypes_update(C2, src, m=1.0)
    np.testing.assert_array_equal(C2, C0)


def test_prototypes_update_rejects_copies():
    C = np.zeros((5, 3), np.float32).T  # not C-contiguous: an update would be lost
    with pytest.raises(ValueError, match="C"):
        obj.prototypes_update(C, np.zeros((2, 3, 5), np.float32))
    with pytest.raises(ValueError, match="m"):
        obj.prototypes_update(np.zeros((3, 5), np.float32), np.zeros((2, 3, 5), np.float32),
                              m=1.5)


# ----------------------------------------------------------------------------------------
# Anomaly score (Eq. 51)


def test_anomaly_score_matches_numpy():
    rng = np.random.default_rng(12)
    y = rng.normal(0, 0.3, (3, 6, 4)).astype(np.float32)
    x = rng.normal(0, 0.3, (3, 6, 4)).astype(np.float32)
    score, log_score, err = obj.anomaly_score(y, x)
    e = ((y.astype(np.float64) - x) ** 2).sum(-1)
    A = 1.0 / np.mean(np.exp(e), axis=1)  # Eq. 51
    np.testing.assert_allclose(err, e, rtol=1e-12)
    np.testing.assert_allclose(score, 1.0 / A, rtol=1e-12)
    np.testing.assert_allclose(log_score, np.log(1.0 / A), rtol=1e-12)
    assert score.dtype == np.float64 and err.shape == (3, 6)
    # identical restoration -> e = 0 -> score exactly 1 (the minimum)
    s0, l0, e0 = obj.anomaly_score(x, x)
    assert (s0 == 1.0).all() and (l0 == 0.0).all() and not e0.any()


def test_anomaly_score_huge_errors():
    L, PPC = 5, 4
    y = np.zeros((3, L, PPC), np.float32)
    x = np.zeros((3, L, PPC), np.float32)
    x[0, 2, :] = 10.0  # one token with e = 400: exp(400) fits float64
    x[1, 3, :] = 15.0  # one token with e = 900: 1/A overflows float64
    x[2, :, :] = 1e20  # every token with e = 4e40
    score, log_score, err = obj.anomaly_score(y, x)
    assert np.isfinite(log_score).all()
    assert log_score[0] == pytest.approx(400 - np.log(L), rel=1e-12)
    assert log_score[1] == pytest.approx(900 - np.log(L), rel=1e-12)
    assert log_score[2] == pytest.approx(4e40, rel=1e-6)
    assert score[0] == pytest.approx(np.exp(400.0) / L, rel=1e-9)
    assert np.isinf(score[1]) and np.isinf(score[2])
    assert err[2, 0] == pytest.approx(4e40, rel=1e-6)
    assert np.all(np.diff(log_score) > 0)  # ranking by log_score stays strict


# ----------------------------------------------------------------------------------------
# Argument validation


def test_validation_errors():
    rng = np.random.default_rng(13)
    s, C = make_inputs(rng, B_, L_, K_)
    abn = LABELS["mixed"]
    with pytest.raises(TypeError, match="s"):
        obj.paper_loss(s.astype(np.float64), C, abn)
    with pytest.raises(TypeError, match="abn"):
        obj.paper_loss(s, C, abn.astype(np.int32))
    bad = abn.copy()
    bad[0, 0] = 2
    with pytest.raises(ValueError, match="abn"):
        obj.paper_loss(s, C, bad)
    with pytest.raises(ValueError, match="abn"):
        obj.paper_loss(s, C, abn[:, :3])
    with pytest.raises(ValueError, match="C"):
        obj.paper_loss(s, C[:, :4], abn)
    with pytest.raises(ValueError, match="C"):
        obj.paper_loss(s, -C, abn)
    nan = s.copy()
    nan[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="s"):
        obj.paper_loss(nan, C, abn)
    with pytest.raises(ValueError, match="tau"):
        obj.paper_loss(s, C, abn, tau=0.0)
    y = np.zeros((B_, L_, 4), np.float32)
    with pytest.raises(ValueError, match="x"):
        obj.recon_loss(y, np.zeros((B_, L_, 5), np.float32), abn)
    with pytest.raises(ValueError, match="y"):
        obj.released_loss(s, C, abn, np.zeros((B_, 2, 4), np.float32),
                          np.zeros((B_, 2, 4), np.float32))
    with pytest.raises(ValueError, match="eps"):
        obj.sinkhorn_knopp(C, eps=-1.0)
    with pytest.raises(ValueError, match="logits"):
        obj.sinkhorn_knopp(np.full((2, 2), np.inf, np.float32))
    with pytest.raises(ValueError, match="y"):
        obj.anomaly_score(np.full((1, 2, 2), np.nan, np.float32), np.zeros((1, 2, 2), np.float32))


def test_float_values_appear_in_error_messages():
    """Messages that quote a float are formatted (PyErr_Format alone cannot print %g)."""
    C = np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError, match=r"m must be in \[0, 1\], got 2"):
        obj.prototypes_update(C, np.zeros((1, 2, 2), np.float32), m=2.0)
