"""The GPU twins of the anomaly scores (cuda/anomaly.cu) against the CPU (csrc/core/anomaly.c),
through the op table's host-level entry points, and the AFiRe methods of a GPU model against
those of a CPU model with the same weights."""
import numpy as np
import pytest

from _util import phantom_like, small_cfg
from afire import AFiRe, _C, cuda
from afire.model import ANOMALY_SCORES

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("gpu")]

rng = np.random.default_rng(0)
f32 = np.float32


def twins(name, *args, **kw):
    return getattr(_C.anomaly, name)(*args, **kw), getattr(cuda.backend(), name)(*args, **kw)


def test_token_error_and_position_zscores():
    y, x = rng.normal(size=(4, 9, 12)).astype(f32), rng.normal(size=(4, 9, 12)).astype(f32)
    mask = (rng.random((4, 9)) < 0.5).astype(np.uint8)
    err0 = rng.random((4, 9)).astype(f32)
    for args in ((y, x), (y, x, mask, err0)):
        c, g = twins("token_error", *args)
        np.testing.assert_allclose(g, c, rtol=1e-6)
    num, den = rng.random((7, 9)).astype(f32), rng.random((7, 9)).astype(f32)
    (cm, cs), (gm, gs) = twins("position_stats", num, den, eps=1e-3)
    np.testing.assert_allclose(gm, cm, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gs, cs, rtol=1e-5)
    (cs_, cmap), (gs_, gmap) = twins("position_zscore", num[:3], cm, cs, den[:3], eps=1e-3)
    np.testing.assert_allclose(gmap, cmap, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gs_, cs_, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pooled", [False, True])
def test_gaussians(pooled):
    ref = rng.normal(size=(40, 10, 24)).astype(f32)
    (cm, cp), (gm, gp) = twins("gauss_fit", ref, pooled=pooled, shrinkage=0.1)
    np.testing.assert_allclose(gm, cm, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gp, cp, rtol=1e-4, atol=1e-4 * np.abs(cp).max())
    x = rng.normal(size=(5, 10, 24)).astype(f32)
    (cs, cmap), (gs, gmap) = twins("gauss_score", x, cm, cp, pooled=pooled)
    np.testing.assert_allclose(gmap, cmap, rtol=1e-5)
    np.testing.assert_allclose(gs, cs, rtol=1e-5)
    with pytest.raises(ValueError, match="not positive definite"):
        cuda.backend().gauss_fit(ref[:5], shrinkage=0.0)


@pytest.mark.parametrize("k", [1, 4])
def test_nearest_neighbours(k):
    ref = rng.normal(size=(30, 17, 16)).astype(f32)
    x = rng.normal(size=(6, 17, 16)).astype(f32)
    (cs, cmap), (gs, gmap) = twins("knn_score", x, ref, k=k)
    np.testing.assert_allclose(gmap, cmap, rtol=1e-6)
    np.testing.assert_allclose(gs, cs, rtol=1e-6)


def test_model_scores_on_the_gpu_match_the_cpu():
    cfg = small_cfg(precision="fp32")
    cpu = AFiRe(cfg, steps_per_epoch=4, batch_size=8)
    gpu = AFiRe(cfg, device="cuda", steps_per_epoch=4, batch_size=8)
    for i in range(3):
        x = phantom_like(4, seed=i)
        cpu.train_step(x)
        gpu.train_step(x)
    normals, x = phantom_like(8, seed=20), phantom_like(5, seed=30)
    rc, rg = cpu.anomaly_reference(normals, k=2), gpu.anomaly_reference(normals, k=2)
    sc = cpu.anomaly_scores(x, list(ANOMALY_SCORES), rc)
    sg = gpu.anomaly_scores(x, list(ANOMALY_SCORES), rg)
    for kind in ANOMALY_SCORES:
        np.testing.assert_allclose(sg[kind][0], sc[kind][0], rtol=2e-3, atol=2e-3, err_msg=kind)
        np.testing.assert_allclose(sg[kind][1], sc[kind][1], rtol=2e-3, atol=2e-3, err_msg=kind)
