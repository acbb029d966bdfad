"""benchmarks/diagnose_stru.py: its measures against hand-computed values, and its views
into the model (head mirror, per-term gradients) against the trainer itself."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

import afire
from afire import _C

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "diagnose_stru.py"
_spec = importlib.util.spec_from_file_location("diagnose_stru", _PATH)
ds = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ds)


def h2(*p):
    return -sum(x * math.log2(x) for x in p if x > 0)


# ---------------------------------------------------------------- information measures
def test_assignment_information_hand_example():
    # 2 images x 2 positions, K = 2: position 0 is class 0 in both images, position 1 is
    # class 1 in image 0 and class 0 in image 1.
    r = ds.assignment_information(np.array([[0, 1], [0, 0]]), K=2)
    assert r["H_class"] == pytest.approx(h2(0.75, 0.25))
    assert r["H_class_given_position"] == pytest.approx(0.5)        # (0 + 1) / 2
    assert r["I_class_position"] == pytest.approx(h2(0.75, 0.25) - 0.5)
    assert r["I_class_image_given_position"] == pytest.approx(0.5)
    assert r["I_class_image"] == pytest.approx(h2(0.75, 0.25) - 0.5)  # images: 1 and 0 bits
    assert r["modal_share"] == pytest.approx(0.75)
    assert r["classes_used"] == 2


def test_assignment_information_extremes():
    N, L = 7, 8
    by_position = np.tile(np.arange(L), (N, 1))           # class = position
    r = ds.assignment_information(by_position, K=L)
    assert r["I_class_position"] == pytest.approx(3.0)     # log2 8
    assert r["I_class_image_given_position"] == pytest.approx(0.0)
    assert r["modal_share"] == 1.0
    by_image = np.tile(np.arange(N)[:, None], (1, L))      # class = image
    r = ds.assignment_information(by_image, K=N)
    assert r["I_class_position"] == pytest.approx(0.0, abs=1e-12)
    assert r["I_class_image_given_position"] == pytest.approx(math.log2(N))


def test_soft_information_matches_hard_for_one_hot_and_is_zero_for_uniform():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 4, size=(6, 5))
    q = np.eye(4)[a]
    hard, soft = ds.assignment_information(a, 4), ds.soft_information(q)
    assert soft["I_class_position"] == pytest.approx(hard["I_class_position"])
    assert soft["I_class_image_given_position"] == pytest.approx(
        hard["I_class_image_given_position"])
    u = ds.soft_information(np.full((3, 4, 5), 0.2))
    assert u["H_class"] == pytest.approx(math.log2(5))
    assert u["I_class_position"] == pytest.approx(0.0, abs=1e-12)
    assert u["I_class_image_given_position"] == pytest.approx(0.0, abs=1e-12)


def test_feature_measures():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 6))
    rot, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    assert ds.linear_cka(x, 3.0 * x @ rot + 5.0) == pytest.approx(1.0)   # invariances
    assert ds.linear_cka(x, rng.normal(size=(50, 6))) < 0.5
    f = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # pairs: (1,2) 0, (1,3) 1/sqrt2, (2,3) 1/sqrt2
    assert ds.mean_pairwise_cosine(f) == pytest.approx(2 / math.sqrt(2) / 3)
    assert ds.effective_rank(np.outer(rng.normal(size=20), rng.normal(size=4))) == \
        pytest.approx(1.0, abs=1e-6)
    pos = rng.normal(size=(1, 9, 4))
    assert ds.position_share(np.repeat(pos, 5, axis=0)) == pytest.approx(1.0)
    assert ds.position_share(rng.normal(size=(400, 9, 4))) < 0.05


# ---------------------------------------------------------------- model views
@pytest.fixture(scope="module")
def phantoms():
    return _C.phantom.generate(8, 32, seed=3)["images"]


def _model(**kw):
    cfg = afire.Config.preset_config("test", batch_size=8, epochs=2, **kw)
    return afire.AFiRe(cfg, steps_per_epoch=4)


@pytest.mark.parametrize("per_position", [True, False])
def test_head_mirror_reproduces_the_trainer(phantoms, per_position):
    """Teacher logits -> Sinkhorn -> batch mean = the prototypes the step sets (epoch 0
    overwrites them); student logits on x' with those prototypes = the step's losses."""
    m = _model(per_position_last_layer=per_position)
    cfg = m.cfg
    net = ds.head_mirror(cfg)
    for _ in range(2):   # the second step checks trained (non-initial) weights too
        t = ds.head_logits(m, net, phantoms, "teacher")
        B, L, K = t.shape
        xp, abn = ds.slm(cfg, phantoms, seed=cfg.seed, step=m.step)
        s = ds.head_logits(m, net, xp, "student")
        stats = m.train_step(phantoms)
        q = np.asarray(_C.objective.sinkhorn_knopp(t.reshape(B * L, K),
                                                   eps=stats["teacher_temp"],
                                                   iters=cfg.sinkhorn_iters))
        protos = np.ascontiguousarray(m.state_tensors()["prototypes"])
        np.testing.assert_allclose(q.reshape(B, L, K).mean(0), protos, atol=1e-6)
        ls, lc = ds.paper_losses(cfg, s, protos, abn, batch=B)
        assert ls == pytest.approx(stats["l_stru"], rel=1e-5)
        assert lc == pytest.approx(stats["l_cate"], rel=1e-5)


def test_term_gradients_add_up_to_the_step_gradient(phantoms):
    m = _model(clip_grad=0.0)
    m.train_step(phantoms)
    g = ds.term_gradients(m, phantoms)
    m._t.gradients(phantoms)   # the full objective at the same state and step
    full = m._t.buffers()["grad.encoder"].astype(np.float64)
    total = g["stru"] + g["cate"] + g["recon"]
    np.testing.assert_allclose(total, full, atol=1e-5 * np.abs(full).max())
    assert all(np.linalg.norm(v) > 0 for v in g.values())


def test_diagnose_runs_and_position_only_predictors_are_content_free(phantoms):
    m = _model()
    net = ds.head_mirror(m.cfg)
    for _ in range(3):
        m.train_step(phantoms)
    r = ds.diagnose(m, net, phantoms, seed=0, teacher_temp=0.04,
                    init_features=np.random.default_rng(0).normal(size=(8, 32)), batch=4)
    for key in ("l_stru_model", "l_stru_posmean", "l_stru_blank", "l_stru_shuffled",
                "l_cate_model", "l_cate_shuffled"):
        assert np.isfinite(r[key]) and r[key] >= 0, key
    t = r["teacher"]
    assert t["I_class_position"] + t["I_class_image_given_position"] == \
        pytest.approx(t["H_class"])
    assert 0.0 <= r["features"]["cka_to_init"] <= 1.0


def test_pixel_r2_is_one_for_tokens_that_are_the_pixels_and_low_for_noise():
    rng = np.random.default_rng(2)
    n, g, p = 80, 2, 8
    imgs = rng.integers(0, 256, size=(n, 16, 16), dtype=np.uint8)
    pix = imgs.reshape(n, g, p, g, p).transpose(0, 1, 3, 2, 4).reshape(n, g * g, p * p)
    assert ds.pixel_r2(pix.astype(np.float64), imgs, p, ridge=1e-9) == pytest.approx(1.0)
    assert ds.pixel_r2(rng.normal(size=(n, 4, 8)), imgs, p) < 0.1


def test_mean_ci_and_paired_tables(tmp_path):
    m = ds.mean_ci([1.0, 2.0, 3.0])
    assert m["mean"] == 2.0 and m["std"] == pytest.approx(1.0)
    assert m["ci95"] == pytest.approx([2 - 4.303 / math.sqrt(3), 2 + 4.303 / math.sqrt(3)])
    assert ds.mean_ci([0.5])["ci95"] is None

    def run(variant, seed, auc):
        c = {"l_stru_model": 0.1, "l_stru_posmean": 0.05, "l_stru_blank": 0.2,
             "l_cate_model": 0.1, "l_cate_shuffled": 0.3, "train": {"l_recon": 0.1},
             "teacher": {"I_class_position": 3.0, "I_class_image_given_position": 1.0,
                         "soft": {"I_class_position": 2.0,
                                  "I_class_image_given_position": 0.1}},
             "features": {"cka_to_init": 0.9, "mean_pairwise_cosine": 0.95,
                          "effective_rank": 10.0, "pixel_r2_teacher_tokens": 0.9},
             "gradients": {"norm_stru": 1.0, "norm_cate": 1.0, "norm_recon": 1.0},
             "probe_auc": auc, "step": 0}
        return {"variant": variant, "seed": seed, "checkpoints": [c],
                "first_step_l_stru_below_0.01": None,
                "probe": {"pretrained": {"mean_auc": {"mean": auc}}}}
    runs = [run("paper", 0, 0.90), run("paper", 1, 0.80), run("x", 0, 0.95), run("x", 1, 0.84)]
    assert ds.paired_probe(runs, "x")["mean"] == pytest.approx(0.045)
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"runs": runs}))
    text = ds.tables([str(f)])
    assert "| x | 0,1 | 0.895" in text and "+0.045" in text
    assert "paper, seeds 0,1, per checkpoint" in text
