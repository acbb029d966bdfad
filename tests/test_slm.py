"""Synthetic Lesion Masks (csrc/core/slm.c) against NumPy re-implementations of csrc/core/slm.h's rules."""
import glob
import os
import subprocess
import sys

import numpy as np
import pytest

from afire._C import slm

S224 = 224


# ---------------------------------------------------------------- NumPy references
def otsu_np(img):
    """Otsu as slm.h defines it: class 0 = values <= t, ties -> smallest t."""
    h = np.bincount(img.ravel(), minlength=256).astype(np.int64)
    n = int(h.sum())
    v = np.arange(256, dtype=np.int64)
    n0 = np.cumsum(h)[:255]
    s0 = np.cumsum(v * h)[:255]
    n1, s1 = n - n0, int((v * h).sum()) - s0
    ok = (n0 > 0) & (n1 > 0)
    if not ok.any():
        return int(img.max())
    diff = (s0 * n1 - s1 * n0).astype(np.float64)
    denom = np.where(ok, n0, 1).astype(np.float64) * np.where(ok, n1, 1).astype(np.float64)
    score = np.where(ok, diff * diff / denom, -np.inf)
    return int(np.argmax(score))


def between_class_variance(img, t):
    """Textbook w0 w1 (mu0 - mu1)^2 for the split {<= t}, {> t} (independent formula)."""
    x = img.ravel().astype(np.float64)
    a, b = x[x <= t], x[x > t]
    if a.size == 0 or b.size == 0:
        return -1.0
    return a.size / x.size * b.size / x.size * (a.mean() - b.mean()) ** 2


def bilinear_np(a, H, W):
    """Half-pixel-centre bilinear resize, edge clamped, float64."""
    ch, cw = a.shape
    a = a.astype(np.float64)

    def axis(n_out, n_in):
        s = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        i0 = np.floor(s).astype(int)
        return i0, np.minimum(i0 + 1, n_in - 1), s - i0

    y0, y1, fy = axis(H, ch)
    x0, x1, fx = axis(W, cw)
    top = (1 - fx) * a[y0][:, x0] + fx * a[y0][:, x1]
    bot = (1 - fx) * a[y1][:, x0] + fx * a[y1][:, x1]
    return (1 - fy)[:, None] * top + fy[:, None] * bot


def falloff_np(W, H, gamma2=0.5, strength=0.5):
    u = (np.arange(W) + 0.5 - W / 2) / (W / 2)
    v = (np.arange(H) + 0.5 - H / 2) / (H / 2)
    d = np.exp(-(u[None, :] ** 2 + v[:, None] ** 2) / gamma2)
    if d.max() == d.min():
        return np.full_like(d, strength)
    return (d - d.min()) / (d.max() - d.min()) * strength


def mask_np(x, lesions, gamma2=0.5, strength=0.5):
    """M from the drawn lesions; also the per-pixel number of lesions covering it."""
    S = x.shape[0]
    M = np.zeros((S, S), np.int64)
    cover = np.zeros((S, S), np.int64)
    for (x0, y0, W, H, cx0, cy0, cw, ch) in lesions:
        eta = bilinear_np(x[cy0:cy0 + ch, cx0:cx0 + cw], H, W)
        val = np.minimum(np.floor(eta * falloff_np(W, H, gamma2, strength) + 0.5), 255)
        M[y0:y0 + H, x0:x0 + W] = np.minimum(M[y0:y0 + H, x0:x0 + W] + val.astype(np.int64), 255)
        cover[y0:y0 + H, x0:x0 + W] += 1
    return M, cover


def tokens_np(M, P, rule):
    S = M.shape[0]
    G = S // P
    patches = M.astype(np.float64).reshape(G, P, G, P).transpose(0, 2, 1, 3).reshape(G * G, P * P)
    if rule == "released":
        return (patches > 0).any(1).astype(np.uint8)
    return (patches.mean(1) > M.mean()).astype(np.uint8)


# ---------------------------------------------------------------- test images
def xray_like(rng, S=S224):
    """Two bright lung-like ellipses on a dark background plus noise: a bimodal histogram."""
    yy, xx = np.mgrid[0:S, 0:S] / S
    img = 40 + 15 * rng.standard_normal((S, S))
    for cx in (0.3, 0.7):
        inside = ((xx - cx) / 0.17) ** 2 + ((yy - 0.5) / 0.33) ** 2 < 1
        img[inside] += 120 + 10 * rng.standard_normal(inside.sum())
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(7)
    return np.stack([xray_like(rng) for _ in range(6)])


# ---------------------------------------------------------------- Otsu
def test_otsu_matches_numpy_on_random_and_bimodal():
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (64, 64), dtype=np.uint8) for _ in range(5)]
    imgs += [rng.integers(10, 20, (50, 30), dtype=np.uint8)]
    imgs += [xray_like(rng) for _ in range(3)]
    for img in imgs:
        t = slm.otsu_threshold(img)
        assert t == otsu_np(img)
        # t maximises the textbook between-class variance (independent formula)
        best = max(between_class_variance(img, u) for u in range(256))
        assert between_class_variance(img, t) == pytest.approx(best, rel=1e-12)


def test_otsu_separates_bimodal_and_breaks_ties_low():
    img = np.array([[0, 0, 200, 200]], np.uint8)
    assert slm.otsu_threshold(img) == 0  # every t in [0, 199] gives the same split
    img = np.array([[30, 30, 31, 200, 210]], np.uint8)
    t = slm.otsu_threshold(img)
    assert 31 <= t < 200


@pytest.mark.parametrize("value", [0, 77, 255])
def test_otsu_constant_image_has_empty_foreground(value):
    img = np.full((8, 8), value, np.uint8)
    t = slm.otsu_threshold(img)
    assert t == value
    assert not (img > t).any()


# ---------------------------------------------------------------- lesion draws
def test_lesion_counts_sizes_and_placement(batch):
    counts, sizes = set(), set()
    for idx in range(300):
        les = slm.slm_lesions(batch[idx % 6], 123, step=5, index=idx)
        counts.add(len(les))
        for (x0, y0, W, H, cx0, cy0, cw, ch) in les:
            assert 16 <= W <= 64 and 16 <= H <= 64
            assert 0 <= x0 and x0 + W <= S224 and 0 <= y0 and y0 + H <= S224
            assert 1 <= cw <= 60 and 1 <= ch <= 60
            assert 0 <= cx0 and cx0 + cw <= S224 and 0 <= cy0 and cy0 + ch <= S224
            sizes.update((W, H))
    assert counts == {1, 2, 3, 4}
    assert min(sizes) <= 18 and max(sizes) >= 62  # the whole range is used


def test_released_size_range_option(batch):
    seen = []
    for idx in range(100):
        for les in slm.slm_lesions(batch[0], 1, index=idx, size_min=16, size_max=128):
            W, H = les[2], les[3]
            assert 16 <= W <= 128 and 16 <= H <= 128
            seen += [W, H]
    assert max(seen) > 64


def test_texture_crop_is_centred_on_a_foreground_pixel(batch):
    x = batch[1]
    t = slm.otsu_threshold(x)
    centres = set()
    for idx in range(60):
        for (_, _, _, _, cx0, cy0, cw, ch) in slm.slm_lesions(x, 9, index=idx):
            # undo the clipping of the 60-wide box [c - 30, c + 30)
            cx = cx0 + 30 if cx0 > 0 else cx0 + cw - 30
            cy = cy0 + 30 if cy0 > 0 else cy0 + ch - 30
            assert x[cy, cx] > t
            centres.add((cx, cy))
    assert len(centres) > 30  # a fresh random region per lesion


def test_largest_region_option():
    x = np.zeros((128, 128), np.uint8)
    x[10:20, 10:20] = 200  # small bright blob
    x[60:100, 70:110] = 220  # large bright blob, bbox centre (89, 79)
    les = slm.slm_lesions(x, 3, index=0, region_rule="largest", lesions_min=4, lesions_max=4)
    assert len(les) == 4
    for (_, _, _, _, cx0, cy0, cw, ch) in les:
        assert (cx0, cy0, cw, ch) == (89 - 30, 79 - 30, 60, 60)
    xp, m, lab = slm.slm_generate(x[None], 3, region_rule="largest")
    ref, _ = mask_np(x, slm.slm_lesions(x, 3, region_rule="largest"))
    assert np.abs(m[0].astype(int) - ref).max() <= 4


def test_size_range_rule_for_small_images():
    assert slm.size_range(224) == (16, 64)
    assert slm.size_range(224, size_max=128) == (16, 128)
    assert slm.size_range(32) == (16, 32)
    assert slm.size_range(16) == (8, 16)
    assert slm.size_range(8) == (4, 8)
    assert slm.size_range(1) == (1, 1)


@pytest.mark.parametrize("S,P", [(32, 8), (16, 4), (8, 8), (4, 2)])
def test_small_images_lesions_fit(S, P):
    rng = np.random.default_rng(S)
    x = rng.integers(0, 256, (3, S, S), dtype=np.uint8)
    lo, hi = slm.size_range(S)
    for idx in range(50):
        for (x0, y0, W, H, *_c) in slm.slm_lesions(x[idx % 3], 4, index=idx):
            assert lo <= W <= hi and lo <= H <= hi
            assert x0 >= 0 and y0 >= 0 and x0 + W <= S and y0 + H <= S
    xp, m, lab = slm.slm_generate(x, 4, patch=P)
    assert lab.shape == (3, (S // P) ** 2)
    check_invariants(x, xp, m)


# ---------------------------------------------------------------- the mask and x'
def check_invariants(x, xp, m):
    zero = m == 0
    assert np.array_equal(xp[zero], x[zero])
    expect = np.minimum(x.astype(int) + m, 255)
    assert np.array_equal(xp.astype(int), expect)


def test_mask_matches_numpy_and_x_prime_exact(batch):
    xp, m, lab = slm.slm_generate(batch, 42, step=3, first_index=100)
    assert xp.dtype == m.dtype == lab.dtype == np.uint8
    assert lab.shape == (6, 196)
    check_invariants(batch, xp, m)
    for b in range(6):
        les = slm.slm_lesions(batch[b], 42, step=3, index=100 + b)
        ref, cover = mask_np(batch[b], les)
        diff = np.abs(m[b].astype(int) - ref)
        assert (diff <= cover).all()  # at most one rounding step per lesion
        assert (diff == 0).mean() > 0.99
        assert (m[b][cover == 0] == 0).all()  # nothing outside the lesion boxes
        assert m[b].max() > 0
        assert m[b].max() <= 255 * 0.5 * len(les) + 1


def test_saturation_instead_of_wrap():
    x = np.full((1, 64, 64), 250, np.uint8)
    cfg = dict(lesions_min=64, lesions_max=64, size_min=60, size_max=64, strength=1.0)
    xp, m, lab = slm.slm_generate(x, 1, patch=8, **cfg)
    assert m.max() == 255 and (xp[0][m[0] >= 5] == 255).all() and (m == 255).mean() > 0.5
    check_invariants(x, xp, m)
    les = slm.slm_lesions(x[0], 1, **cfg)
    ref, cover = mask_np(x[0], les, strength=1.0)
    assert (np.abs(m[0].astype(int) - ref) <= cover).all()


def test_strength_and_gamma_options(batch):
    x = batch[:2]
    _, m_half, _ = slm.slm_generate(x, 5)
    _, m_full, _ = slm.slm_generate(x, 5, strength=1.0, gamma2=0.25)
    for b in range(2):
        les = slm.slm_lesions(x[b], 5, index=b)
        ref, cover = mask_np(x[b], les, gamma2=0.25, strength=1.0)
        assert (np.abs(m_full[b].astype(int) - ref) <= cover).all()
    assert m_full.max() > m_half.max()
    _, m0, lab0 = slm.slm_generate(x, 5, strength=0.0)
    assert m0.max() == 0 and lab0.max() == 0


# ---------------------------------------------------------------- token labels
@pytest.mark.parametrize("rule", ["paper", "released"])
def test_token_labels_match_numpy(batch, rule):
    _, m, lab = slm.slm_generate(batch, 11, step=1, token_rule=rule)
    for b in range(len(batch)):
        assert np.array_equal(lab[b], tokens_np(m[b], 16, rule))
    assert lab.sum() > 0


def test_token_rules_differ_and_paper_is_subset(batch):
    _, m1, paper = slm.slm_generate(batch, 11)
    _, m2, released = slm.slm_generate(batch, 11, token_rule="released")
    assert np.array_equal(m1, m2)  # the rule changes labels only
    assert (paper <= released).all()  # a patch above the mean has a nonzero pixel
    assert released.sum() > paper.sum()


def test_token_labels_small_patch():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (2, 32, 32), dtype=np.uint8)
    for rule in ("paper", "released"):
        _, m, lab = slm.slm_generate(x, 2, patch=8, token_rule=rule)
        assert lab.shape == (2, 16)
        for b in range(2):
            assert np.array_equal(lab[b], tokens_np(m[b], 8, rule))


# ---------------------------------------------------------------- determinism
def test_determinism_and_batch_independence(batch):
    a = slm.slm_generate(batch, 99, step=7, first_index=50)
    b = slm.slm_generate(batch, 99, step=7, first_index=50)
    for u, v in zip(a, b):
        assert np.array_equal(u, v)
    c = slm.slm_generate(batch, 99, step=8, first_index=50)
    assert not np.array_equal(a[1], c[1])
    d = slm.slm_generate(batch, 100, step=7, first_index=50)
    assert not np.array_equal(a[1], d[1])
    # image 3 alone, or in a different batch, at the same global index
    e = slm.slm_generate(batch[3:4], 99, step=7, first_index=53)
    assert np.array_equal(e[1][0], a[1][3]) and np.array_equal(e[2][0], a[2][3])
    f = slm.slm_generate(batch[[5, 3]], 99, step=7, first_index=52)
    assert np.array_equal(f[1][1], a[1][3])
    assert not np.array_equal(f[1][0], a[1][2])  # same index, different image content


def test_thread_count_does_not_change_masks(tmp_path, batch):
    np.save(tmp_path / "x.npy", batch)
    code = ("import sys, numpy as np; from afire._C import slm; "
            "x = np.load(sys.argv[1]); _, m, l = slm.slm_generate(x, 8, step=2); "
            "np.save(sys.argv[2], m)")
    outs = []
    for threads in ("1", "3"):
        out = tmp_path / f"m{threads}.npy"
        env = dict(os.environ, OMP_NUM_THREADS=threads)
        subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.npy"), str(out)],
                       env=env, check=True)
        outs.append(np.load(out))
    assert np.array_equal(outs[0], outs[1])
    _, m, _ = slm.slm_generate(batch, 8, step=2)
    assert np.array_equal(outs[0], m)


# ---------------------------------------------------------------- edge cases
def test_constant_image_uses_whole_image_as_texture():
    x = np.full((1, 64, 64), 100, np.uint8)
    xp, m, lab = slm.slm_generate(x, 1, patch=16)
    les = slm.slm_lesions(x[0], 1)
    ref, cover = mask_np(x[0], les)
    assert m.max() > 0 and (np.abs(m[0].astype(int) - ref) <= cover).all()
    check_invariants(x, xp, m)


def test_black_image_gives_no_lesion_pixel():
    x = np.zeros((2, 64, 64), np.uint8)
    for rule in ("paper", "released"):
        xp, m, lab = slm.slm_generate(x, 1, patch=16, token_rule=rule)
        assert m.max() == 0 and lab.max() == 0 and np.array_equal(xp, x)


def test_zero_lesions_option(batch):
    for rule in ("paper", "released"):
        xp, m, lab = slm.slm_generate(batch[:2], 1, lesions_min=0, lesions_max=0, token_rule=rule)
        assert m.max() == 0 and lab.max() == 0 and np.array_equal(xp, batch[:2])
        assert slm.slm_lesions(batch[0], 1, lesions_min=0, lesions_max=0) == []


def test_single_image_and_empty_batch(batch):
    xp, m, lab = slm.slm_generate(batch[:1], 0)
    assert xp.shape == (1, 224, 224) and lab.shape == (1, 196)
    check_invariants(batch[:1], xp, m)
    xp, m, lab = slm.slm_generate(np.zeros((0, 32, 32), np.uint8), 0, patch=8)
    assert xp.shape == (0, 32, 32) and lab.shape == (0, 16)


def test_input_validation():
    x = np.zeros((1, 32, 32), np.uint8)
    with pytest.raises(TypeError, match="images"):
        slm.slm_generate(x.astype(np.float32), 0)
    with pytest.raises(TypeError, match="images"):
        slm.slm_generate([[[0]]], 0)
    with pytest.raises(ValueError, match="images"):
        slm.slm_generate(x[0], 0)
    with pytest.raises(ValueError, match="square"):
        slm.slm_generate(np.zeros((1, 32, 16), np.uint8), 0, patch=8)
    with pytest.raises(ValueError, match="patch"):
        slm.slm_generate(x, 0, patch=5)
    with pytest.raises(ValueError, match="patch"):
        slm.slm_generate(x, 0, patch=0)
    with pytest.raises(OverflowError):
        slm.slm_generate(x, -1, patch=8)
    bad = [dict(lesions_min=3, lesions_max=2), dict(lesions_max=65), dict(lesions_min=-1),
           dict(size_min=0), dict(size_min=40, size_max=20), dict(crop_max=0),
           dict(gamma2=0.0), dict(gamma2=float("nan")), dict(strength=1.5),
           dict(strength=-0.1), dict(token_rule="any"), dict(region_rule="biggest")]
    for cfg in bad:
        with pytest.raises(ValueError, match=next(iter(cfg)).split("_")[0]):
            slm.slm_generate(x, 0, patch=8, **cfg)
    with pytest.raises(TypeError):
        slm.slm_generate(x, 0, 0, 0, 8, 1)  # config is keyword-only
    with pytest.raises(TypeError, match="image"):
        slm.otsu_threshold(np.zeros(4, np.int32))
    with pytest.raises(ValueError, match="pixels"):
        slm.otsu_threshold(np.zeros(0, np.uint8))
    with pytest.raises(ValueError, match="square"):
        slm.slm_lesions(np.zeros((4, 5), np.uint8), 0)


def test_default_config():
    c = slm.default_config()
    assert c == dict(lesions_min=1, lesions_max=4, size_min=16, size_max=64, crop_max=60,
                     gamma2=0.5, strength=0.5, token_rule="paper", region_rule="random")


# ---------------------------------------------------------------- real data
def data_dir():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.environ.get("AFIRE_DATA", os.path.join(here, "..", "shared", "data"))


def test_real_normal_xrays():
    files = sorted(glob.glob(os.path.join(data_dir(), "kermany_native", "images", "*.png")))
    if not files:
        pytest.skip(f"no real images under {data_dir()}/kermany_native/images "
                    "(set AFIRE_DATA to the shared data folder)")
    from PIL import Image

    imgs = []
    for f in files[:4]:
        im = Image.open(f).convert("L").resize((224, 224), Image.BILINEAR)
        imgs.append(np.asarray(im, np.uint8))
    x = np.stack(imgs)
    for img in x:
        assert slm.otsu_threshold(img) == otsu_np(img)
    for region in ("random", "largest"):
        xp, m, lab = slm.slm_generate(x, 2024, step=1, region_rule=region)
        check_invariants(x, xp, m)
        for b in range(len(x)):
            les = slm.slm_lesions(x[b], 2024, step=1, index=b, region_rule=region)
            ref, cover = mask_np(x[b], les)
            assert (np.abs(m[b].astype(int) - ref) <= cover).all()
            assert np.array_equal(lab[b], tokens_np(m[b], 16, "paper"))
            assert 1 <= lab[b].sum() < 196
