"""Config.stru_target (not in the paper): the structure term against the teacher's own tokens.

"teacher_token" replaces Eq. 12 in the trainer by afire._C.objective.stru_token_loss (its
NumPy reference and finite differences are in test_objective.py). Here: the config field
(validation, JSON and checkpoint round trip, the C reader's default for older configs), and
the trainer wiring: with w_stru = 0 the two targets train bit-identically (only the
structure term is swapped), the reported l_stru is the new term and the step's gradient is
its gradient (finite differences of the reported loss). Several ranks: test_dist_mpi.py.
"""
import json

import numpy as np
import pytest

from _util import phantom_like, small_cfg
from afire import AFiRe, Config, _C


def test_config_field_default_validation_and_round_trip():
    assert Config().stru_target == "prototype"              # the paper's Eq. 12
    c = small_cfg(stru_target="teacher_token")
    assert Config.from_json(c.to_json()).stru_target == "teacher_token"
    assert c.with_overrides(["stru_target=prototype"]).stru_target == "prototype"
    with pytest.raises(ValueError, match="stru_target"):
        small_cfg(stru_target="position")
    with pytest.raises(ValueError, match="stru_target.*released"):
        small_cfg(stru_target="teacher_token", objective="released")
    # a configuration written before the field existed reads as the paper's target
    d = small_cfg().to_dict()
    del d["stru_target"]
    assert Config.from_dict(d).stru_target == "prototype"


def test_c_reader_default_and_refusals():
    d = small_cfg().to_dict()
    del d["stru_target"]
    _C.trainer.Trainer(d, 4, 2)                             # older dicts: prototype
    bad = dict(d, stru_target="teacher")
    with pytest.raises(ValueError, match="stru_target"):
        _C.trainer.Trainer(bad, 4, 2)
    # the C checks refuse what Config refuses, for callers that bypass it
    both = dict(d, stru_target="teacher_token", objective="released")
    with pytest.raises(ValueError, match="stru_target"):
        _C.trainer.Trainer(both, 4, 2)


def test_checkpoint_keeps_the_target(tmp_path):
    m = AFiRe(small_cfg(stru_target="teacher_token"), steps_per_epoch=2)
    m.train_step(phantom_like(4))
    m.save(tmp_path / "m.safetensors")
    back = AFiRe.load(tmp_path / "m.safetensors")
    assert back.cfg.stru_target == "teacher_token"
    x = phantom_like(4, seed=1)
    assert back.train_step(x) == m.train_step(x)


def _run(steps=3, **kw):
    m = AFiRe(small_cfg(seed=2, **kw), steps_per_epoch=2)
    return [m.train_step(phantom_like(4, seed=i)) for i in range(steps)], m


def test_only_the_structure_term_changes():
    a, ma = _run(w_stru=0.0)
    b, mb = _run(w_stru=0.0, stru_target="teacher_token")
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k not in ("l_stru", "l_cst", "loss")} == \
            {k: v for k, v in rb.items() if k not in ("l_stru", "l_cst", "loss")}
        assert ra["l_stru"] != rb["l_stru"]
    ta, tb = ma.state_tensors(), mb.state_tensors()
    for k in ta:
        np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)
    # with weight: the runs part, and the new term is an InfoNCE over B = 4 images
    c, _ = _run(stru_target="teacher_token")
    p, _ = _run()
    assert c[0]["l_cate"] == p[0]["l_cate"] and c[0]["l_recon"] == p[0]["l_recon"]
    assert c[-1]["loss"] != p[-1]["loss"]
    assert all(0.0 < r["l_stru"] for r in c)
    assert c[0]["loss"] == pytest.approx(c[0]["l_stru"] + c[0]["l_cate"] + c[0]["l_recon"],
                                         rel=1e-6)


def test_reported_term_matches_the_objective_function():
    """l_stru of a step = stru_token_loss(student logits, teacher Sinkhorn rows, labels),
    recomputed with the diagnostic mirror of benchmarks/diagnose_stru.py."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import diagnose_stru as D

    cfg = small_cfg(stru_target="teacher_token", seed=4)
    m = AFiRe(cfg, steps_per_epoch=2)
    x = phantom_like(4, seed=3)
    st = m._t.gradients(x)
    net = D.head_mirror(cfg)
    B, K = len(x), cfg.num_prototypes
    t = D.head_logits(m, net, x, "teacher")
    L = t.shape[1]
    qt = np.asarray(_C.objective.sinkhorn_knopp(np.ascontiguousarray(t.reshape(B * L, K)),
                                                eps=cfg.teacher_temp,
                                                iters=cfg.sinkhorn_iters)).reshape(B, L, K)
    xp, abn = D.slm(cfg, x, seed=cfg.seed, step=0)
    s = np.ascontiguousarray(D.head_logits(m, net, xp, "student"))
    want, _ = _C.objective.stru_token_loss(s, qt, abn, tau_s=cfg.tau_student,
                                           tau=cfg.tau_similarity)
    assert st["l_stru"] == pytest.approx(want, rel=1e-4)


def test_step_gradient_of_the_new_term_matches_finite_differences():
    """Only the new term (w_cate = w_recon = 0): the student gradient of the step against
    central differences of the reported loss (the teacher targets do not move with the
    student's parameters)."""
    cfg = small_cfg(clip_grad=0.0, epochs=1, w_cate=0.0, w_recon=0.0,
                    stru_target="teacher_token")
    m = AFiRe(cfg, steps_per_epoch=1)
    x = phantom_like(4)
    for name, t in m.state_tensors().items():   # as test_trainer: a locally linear head
        if name.startswith("student.head.mlp.") and name.endswith("weight"):
            t *= 12
    base = m._t.gradients(x)
    assert base["l_stru"] > 0 and base["loss"] == pytest.approx(base["l_stru"], rel=1e-6)
    bufs = m._t.buffers()
    for net in ("encoder", "head"):
        params, grads = bufs[f"student.{net}"], bufs[f"grad.{net}"].copy()
        assert np.abs(grads).max() > 0
        for i in np.argsort(-np.abs(grads))[:6]:
            old = params[i]
            h = 3e-3 * max(1.0, abs(float(old)))
            params[i] = old + h
            lp = m._t.gradients(x)["loss"]
            params[i] = old - h
            lm = m._t.gradients(x)["loss"]
            params[i] = old
            assert (lp - lm) / (2 * h) == pytest.approx(grads[i], rel=5e-2, abs=2e-3), (net, i)


def test_json_of_the_config_names_the_field():
    assert json.loads(small_cfg().to_json())["stru_target"] == "prototype"
