"""Run-directory hygiene of `afire pretrain`: --overwrite deletes only afire's files,
last.safetensors is independent of the step files, and a resume that falls back past a
corrupt checkpoint never lets pruning keep the corrupt one over a good one."""
import os

import pytest
from _util import phantom_like, small_cfg

from afire import AFiRe
from afire.pretrain import pretrain


@pytest.fixture(scope="module")
def images():
    return phantom_like(16, s=32, seed=3)  # 4 steps per epoch at batch 4


def run(out, images, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("report", False)
    return pretrain(kw.pop("cfg", small_cfg()), data=images, out=str(out), **kw)


def test_overwrite_deletes_only_what_afire_wrote(tmp_path, images):
    out = tmp_path / "run"
    run(out, images, report=True, ckpt_every=1)
    notes = [out / "notes.txt", out / "checkpoints" / "notes.txt", out / "report" / "mine.md",
             out / "checkpoints" / "my_best.safetensors"]
    for p in notes:
        p.write_text("the user's own file")
    run(out, images, overwrite=True, max_steps=1)
    for p in notes:
        assert p.read_text() == "the user's own file", p
    # the old run's files are gone: only step 1's checkpoint exists now
    assert sorted(f for f in os.listdir(out / "checkpoints") if f.startswith("step_")) == \
        ["step_00000001.safetensors"]
    assert not (out / "report" / "losses.png").exists()
    assert AFiRe.load(out / "last.safetensors").step == 1


def test_overwrite_removes_empty_folders(tmp_path, images):
    out = tmp_path / "run"
    run(out, images, report=True)
    run(out, images, overwrite=True, max_steps=1, report=False)
    assert not (out / "report").exists()


def test_last_is_an_independent_copy(tmp_path, images):
    run(tmp_path, images)
    last = tmp_path / "last.safetensors"
    step = tmp_path / "checkpoints" / "step_00000008.safetensors"
    assert last.read_bytes() == step.read_bytes()
    assert os.stat(last).st_ino != os.stat(step).st_ino and os.stat(step).st_nlink == 1
    with open(step, "r+b") as f:
        f.truncate(100)
    assert AFiRe.load(last).step == 8


def truncate(p):
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) // 2)


def test_resume_past_corrupt_checkpoints_keeps_the_good_ones(tmp_path, images, capsys):
    # steps 0..5 with a checkpoint every 2 steps and at the epoch end (4): step_4 and step_6
    run(tmp_path, images, max_steps=6, ckpt_every=2, keep_last=2)
    d = tmp_path / "checkpoints"
    assert sorted(os.listdir(d)) == ["step_00000004.safetensors", "step_00000006.safetensors"]
    truncate(d / "step_00000006.safetensors")
    truncate(tmp_path / "last.safetensors")
    # resume falls back to step 4, runs one step and checkpoints step 5
    s = run(tmp_path, images, cfg=None, resume=True, max_steps=5, ckpt_every=2, keep_last=2)
    assert s["resumed_from"] == 4 and s["steps"] == 5
    err = capsys.readouterr().err
    assert "renamed to" in err and "step_00000006.safetensors.corrupt" in err
    steps = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
    # before the fix keep-last kept the corrupt step_6 and pruned the good step_4
    assert steps == ["step_00000004.safetensors", "step_00000005.safetensors"]
    for f in steps:
        AFiRe.read_metadata(d / f)  # every kept checkpoint validates
    assert AFiRe.load(tmp_path / "last.safetensors").step == 5
    assert (d / "step_00000006.safetensors.corrupt").exists()


def test_final_losses_are_the_last_step_not_the_last_logged(tmp_path, images):
    s = run(tmp_path, images, max_steps=5, log_every=10)
    assert s["final"]["step"] == 4


def test_phantom_anomaly_check_only_for_phantom_runs(tmp_path, images):
    s = pretrain(small_cfg(), data=8, out=str(tmp_path / "ph"), progress=False, max_steps=1)
    assert 0.0 <= s["report"]["anomaly"]["auc"] <= 1.0
    s = run(tmp_path / "arr", images, report=True, max_steps=1)
    assert "anomaly" not in s["report"]


def test_cli_overrides_after_options(tmp_path, capsys):
    from afire.cli import main

    out = tmp_path / "run"
    rc = main(["pretrain", "--preset", "test", "--phantoms", "8", "--max-steps", "1", "--quiet",
               "--out", str(out), "batch_size=4", "--no-report", "base_lr=1e-3", "seed=7"])
    assert rc == 0, capsys.readouterr().err
    cfg = AFiRe.load(out / "last.safetensors").cfg
    assert (cfg.batch_size, cfg.base_lr, cfg.seed) == (4, 1e-3, 7)
    with pytest.raises(SystemExit):
        main(["pretrain", "--out", str(out), "--bogus-flag"])
