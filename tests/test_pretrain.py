"""`afire pretrain`: logs, checkpoints, exact resume, Ctrl-C, non-finite loss, bad data, report."""
import csv
import json
import os
import signal

import numpy as np
import pytest
from _util import phantom_like, small_cfg
from PIL import Image

from afire import AFiRe
from afire.cli import main
from afire.data import ShardDataset, phantom_records, prepare
from afire.pretrain import LOG_COLUMNS, STAT_COLUMNS, DataError, pretrain, read_log
from afire.report import plot_losses

N_IMG = 16  # 4 batches of 4 -> 4 steps per epoch, 8 steps in 2 epochs


@pytest.fixture(scope="module")
def images():
    return phantom_like(N_IMG, s=32, seed=3)


def run(out, images, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("report", False)
    return pretrain(kw.pop("cfg", small_cfg()), data=images, out=str(out), **kw)


def ckpts(out):
    return sorted(os.listdir(os.path.join(out, "checkpoints")))


def test_cli_tiny_run_writes_everything(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["pretrain", "--preset", "test", "--epochs", "1", "--phantoms", "12",
               "--out", str(out), "--quiet", "--log-every", "1", "batch_size=4"])
    assert rc == 0
    o, e = capsys.readouterr()
    assert "done: 3/3 steps (complete)" in o and "report:" in o
    # base_lr 5e-4 at batch 4: a peak of 7.8e-06, which the run points out
    assert "note: peak learning rate 7.8e-06" in e and "base_lr=0.064 at this batch" in e
    for f in ("last.safetensors", "backbone.safetensors", "log.jsonl", "log.csv",
              "config.json", "report/report.json", "report/report.md", "report/losses.png",
              "report/samples.png"):
        assert (out / f).is_file(), f
    m = AFiRe.load(out / "last.safetensors")
    assert m.step == 3 and m.cfg.preset == "test" and m.cfg.batch_size == 4
    meta = AFiRe.read_metadata(out / "last.safetensors")
    assert meta["epoch"] == "1" and meta["batch_in_epoch"] == "0"
    assert meta["data_fingerprint"].startswith("phantom:12:32:")
    # a second run into the same directory is refused unless asked for
    rc = main(["pretrain", "--preset", "test", "--epochs", "1", "--phantoms", "12",
               "--out", str(out), "--quiet", "batch_size=4"])
    assert rc == 2 and "already holds a run" in capsys.readouterr().err


def test_log_columns_jsonl_and_csv_agree(tmp_path, images):
    s = run(tmp_path, images, log_every=3)
    rows = read_log(tmp_path / "log.jsonl")
    assert [r["step"] for r in rows] == [0, 3, 6, 7]  # every 3rd step and the last one
    assert all(list(r) == list(LOG_COLUMNS) for r in rows)
    with open(tmp_path / "log.csv", newline="") as f:
        table = list(csv.reader(f))
    assert tuple(table[0]) == LOG_COLUMNS and len(table) == len(rows) + 1
    for r, line in zip(rows, table[1:]):
        for c, v in zip(LOG_COLUMNS, line):
            assert float(v) == pytest.approx(float(r[c]), rel=1e-12), c
    assert [r["epoch"] for r in rows] == [0, 0, 1, 1]
    assert [r["batch"] for r in rows] == [0, 3, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["images"] == 4 for r in rows)
    assert s["steps"] == 8 and s["images_seen"] == 32 and s["stopped"] == "complete"
    assert s["final"]["step"] == 7


def test_resume_is_bit_identical(tmp_path, images):
    a, b = tmp_path / "a", tmp_path / "b"
    run(a, images, log_every=2)
    s1 = run(b, images, log_every=2, max_steps=3)        # stops inside epoch 0
    assert s1["stopped"] == "max_steps" and s1["steps"] == 3
    meta = AFiRe.read_metadata(b / "last.safetensors")
    assert (meta["epoch"], meta["batch_in_epoch"], meta["step"]) == ("0", "3", "3")
    s2 = pretrain(None, data=images, out=str(b), resume=True, progress=False, report=False,
                  log_every=2)
    assert s2["resumed_from"] == 3 and s2["steps"] == 8
    ra, rb = read_log(a / "log.jsonl"), read_log(b / "log.jsonl")
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [0, 2, 4, 6, 7]
    for x, y in zip(ra, rb):
        assert {c: x[c] for c in STAT_COLUMNS} == {c: y[c] for c in STAT_COLUMNS}
    ta = AFiRe.load(a / "last.safetensors").state_tensors()
    tb = AFiRe.load(b / "last.safetensors").state_tensors()
    assert all(np.array_equal(ta[k], tb[k]) for k in ta)
    # resuming a finished run trains nothing and keeps the log
    s3 = pretrain(None, data=images, out=str(b), resume=True, progress=False, report=False,
                  log_every=2)
    assert s3["steps_this_run"] == 0 and len(read_log(b / "log.jsonl")) == 5


def test_resume_refuses_other_data_or_config(tmp_path, images):
    run(tmp_path, images, max_steps=2)
    with pytest.raises(ValueError, match="data differs"):
        pretrain(None, data=images[::-1].copy(), out=str(tmp_path), resume=True,
                 progress=False, report=False)
    with pytest.raises(ValueError, match="base_lr"):
        pretrain(small_cfg(base_lr=1e-3), data=images, out=str(tmp_path), resume=True,
                 progress=False, report=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        pretrain(None, data=images, out=str(tmp_path / "none"), resume=True, progress=False)


def test_ctrl_c_saves_a_loadable_checkpoint(tmp_path, images):
    def hook(row):
        if row["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the handler only sets a flag

    # what SIGINT was before: Python's default, or SIG_IGN when started as a background job
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, images, log_every=1, callback=hook)
    m = AFiRe.load(tmp_path / "last.safetensors")
    assert m.step == 3  # the step in flight finished, then the loop stopped
    assert AFiRe.read_metadata(tmp_path / "last.safetensors")["batch_in_epoch"] == "3"
    assert signal.getsignal(signal.SIGINT) == before  # restored to what it was
    s = pretrain(None, data=images, out=str(tmp_path), resume=True, progress=False,
                 report=False, log_every=1)
    assert s["steps"] == 8 and [r["step"] for r in read_log(tmp_path / "log.jsonl")] == \
        list(range(8))


def test_cli_interrupt_exit_code_130(tmp_path, capsys, monkeypatch):
    orig = AFiRe.train_step

    def step_then_interrupt(self, batch):
        out = orig(self, batch)
        if self.step == 2:
            raise KeyboardInterrupt  # as if Ctrl-C were pressed twice
        return out

    monkeypatch.setattr(AFiRe, "train_step", step_then_interrupt)
    out = tmp_path / "run"
    rc = main(["pretrain", "--preset", "test", "--epochs", "1", "--phantoms", "16", "--quiet",
               "--out", str(out), "batch_size=4"])
    assert rc == 130
    assert f"--out {out} --resume" in capsys.readouterr().err
    # the interrupted step had already updated the model: it counts as consumed
    assert AFiRe.load(out / "last.safetensors").step == 2
    assert AFiRe.read_metadata(out / "last.safetensors")["batch_in_epoch"] == "2"


def test_non_finite_loss_stops_without_checkpoint(tmp_path, images, capsys):
    cfg = small_cfg(base_lr=1e12, warmup_epochs=0)
    with pytest.raises(FloatingPointError, match="non-finite .* at step 1.*without writing"):
        run(tmp_path, images, cfg=cfg, ckpt_every=1)
    assert ckpts(tmp_path) == ["step_00000001.safetensors"]
    assert AFiRe.load(tmp_path / "last.safetensors").step == 1
    rc = main(["pretrain", "--preset", "test", "--epochs", "2", "--phantoms", "16", "--quiet",
               "--out", str(tmp_path / "cli"), "batch_size=4", "base_lr=1e12",
               "warmup_epochs=0"])
    assert rc == 3 and "no checkpoint had been written yet" in capsys.readouterr().err
    assert not (tmp_path / "cli" / "last.safetensors").exists()


@pytest.fixture
def shards(tmp_path):
    root = str(tmp_path / "prep")
    prepare("16", root, fmt="phantom", size=32, workers=1, shard_size=4, progress=False,
            records=phantom_records(16, seed=1))
    return root


def test_prepared_dir_and_bad_shard_skipped(tmp_path, shards):
    bad = os.path.join(shards, "shard_00002.npy")
    ds = ShardDataset(shards, split="train", abnormal=0)  # what pretrain reads
    nb = len(ds) // 4
    in_bad = np.array([r["shard"] == 2 for r in ds.records])
    assert nb >= 3 and in_bad.any()
    later = [(0, b) for b in range(2, nb)] + [(1, b) for b in range(nb)]  # after the removal
    lost = [int(in_bad[ds.epoch_order(0, e)[4 * b:4 * b + 4]].sum()) for e, b in later]

    def hook(row):
        if row["step"] == 1:
            os.remove(bad)

    s = pretrain(small_cfg(), data=shards, out=str(tmp_path / "run"), progress=False,
                 report=False, log_every=1, callback=hook)
    assert list(s["bad_files"]) == [bad] and "disappeared" in s["bad_files"][bad]
    assert f"{len(ds)} normal images" in s["data"] and "split train" in s["data"]
    assert s["images_seen"] == 2 * nb * 4 - sum(lost) < 2 * nb * 4
    assert s["steps"] == 2 * nb - sum(n == 4 for n in lost)
    rows = read_log(tmp_path / "run" / "log.jsonl")
    assert [r["images"] for r in rows[2:]] == [4 - n for n in lost if n < 4]


def test_truncated_shard_stops_cleanly(tmp_path, shards):
    bad = os.path.join(shards, "shard_00001.npy")

    def hook(row):
        if row["step"] == 0:
            with open(bad, "r+b") as f:
                f.truncate(200)

    out = tmp_path / "run"
    with pytest.raises(DataError, match="shard_00001.npy: file size changed.*resume") as e:
        pretrain(small_cfg(), data=shards, out=str(out), progress=False, report=False,
                 on_bad_data="stop", callback=hook)
    assert e.value.path == bad
    m = AFiRe.load(out / "last.safetensors")  # the stop left a checkpoint to resume from
    assert 1 <= m.step < 8


def test_keep_last_k(tmp_path, images):
    run(tmp_path, images, ckpt_every=1, keep_last=2)
    assert ckpts(tmp_path) == ["step_00000007.safetensors", "step_00000008.safetensors"]
    last = (tmp_path / "last.safetensors").read_bytes()
    assert last == (tmp_path / "checkpoints" / "step_00000008.safetensors").read_bytes()
    assert not list(tmp_path.glob("*.tmp"))


def is_png(path):
    with Image.open(path) as im:
        im.verify()
        return im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def test_report_files(tmp_path, images):
    s = run(tmp_path, images, report=True, log_every=1)
    r = s["report"]
    assert is_png(r["losses_png"]) and is_png(r["samples_png"])
    with Image.open(r["samples_png"]) as im:
        assert im.size[1] > 4 * 32  # one row per sample image (4)
    info = json.loads(open(r["json"]).read())
    assert info["run"]["steps"] == 8 and info["final_logged"]["step"] == 7
    assert "anomaly" not in info  # the phantom check runs only for phantom-trained models
    assert len(info["samples"]["mse_vs_x"]) == 4
    md = open(r["markdown"]).read()
    assert "losses.png" in md and "samples.png" in md
    # the fallback without matplotlib draws with Pillow
    assert plot_losses(read_log(tmp_path / "log.jsonl"), str(tmp_path / "p.png"),
                       backend="pillow") == "pillow"
    assert is_png(tmp_path / "p.png")


def test_argument_checks(tmp_path, images):
    with pytest.raises(ValueError, match="on_bad_data"):
        run(tmp_path, images, on_bad_data="ignore")
    with pytest.raises(ValueError, match="keep_last"):
        run(tmp_path, images, keep_last=0)
    with pytest.raises(ValueError, match="fewer than one batch"):
        run(tmp_path, images[:3])
    with pytest.raises(ValueError, match=r"shape \(N, 32, 32\)"):
        run(tmp_path, images[:, :16])
    with pytest.raises(ValueError, match="config is required"):
        pretrain(None, data=images, out=str(tmp_path))


def test_tensorboard_missing_is_reported(tmp_path, images, capsys, monkeypatch):
    import sys

    for name in ("tensorboardX", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)  # import now raises ImportError
    s = run(tmp_path, images, tensorboard=True, max_steps=2)
    assert s["steps"] == 2 and "pip install tensorboard" in capsys.readouterr().err
    assert not (tmp_path / "tb").exists()


def test_cli_without_preset_is_the_demo(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = main(["pretrain", "--max-steps", "2", "--phantoms", "32", "--quiet", "--no-report"])
    o, e = capsys.readouterr()
    assert rc == 0 and "done: 2/80 steps (max_steps)" in o and "peak learning rate" not in e
    m = AFiRe.load(tmp_path / "runs" / "afire-demo" / "last.safetensors")
    assert (m.cfg.preset, m.cfg.img_size, m.cfg.epochs, m.step) == ("test", 64, 40, 2)
    # --resume alone picks the run up with the checkpoint's config
    rc = main(["pretrain", "--resume", "--max-steps", "3", "--phantoms", "32", "--quiet",
               "--no-report"])
    assert rc == 0 and AFiRe.load(tmp_path / "runs/afire-demo/last.safetensors").step == 3
