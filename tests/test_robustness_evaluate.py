"""Evaluation never tests on what the model pre-trained on, and fails clearly on data it
cannot evaluate.

The central check runs the README's workflow on one folder (``afire prepare`` ->
``afire pretrain --data DIR`` -> every ``afire evaluate`` protocol on DIR) and proves,
by manifest path AND by pixel bytes, that no image scored in any test (or validation) set
is an image pre-training read. "What pre-training read" is established twice, neither
time through afire.evaluate: by recording every batch `afire pretrain` actually reads,
and by the documented rule (the normal images of split "train") applied to the raw
manifest.jsonl and shard .npy files.
"""
import argparse
import csv
import importlib
import inspect
import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from PIL import Image

from afire import AFiRe, Config, _C
from afire.cli import build_parser, main
from afire.data import ShardDataset, phantom_dataset
from afire.evaluate import (PROBE_RECIPE, EvaluationNote, anomaly, finetune, linear_probe,
                            load_data, segment)

HAS_DOWNSTREAM = hasattr(getattr(_C, "downstream", None), "linear_probe_fit")
needs_c = pytest.mark.skipif(not HAS_DOWNSTREAM,
                             reason="afire._C.downstream kernels not in this build")
PRETRAIN = importlib.import_module("afire.pretrain")   # the module (afire.pretrain is a function)
SIZE = 32


# ---------------------------------------------------------------- independent readers
def raw_prepared(root: Path):
    """(manifest rows, uint8 images) read with json and np.load only."""
    rows = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()
            if line.strip()]
    shards = {}
    imgs = []
    for r in rows:
        k = r["shard"]
        if k not in shards:
            shards[k] = np.load(root / f"shard_{k:05d}.npy")
        imgs.append(shards[k][r["row"]])
    return rows, np.stack(imgs)


def pretrain_set_by_rule(root: Path):
    """The README's rule: the NORMAL images of split "train" (all normals without one)."""
    rows, imgs = raw_prepared(root)
    has_train = any(r["split"] == "train" for r in rows)
    keep = [i for i, r in enumerate(rows) if r["abnormal"] == 0
            and (r["split"] == "train" or not has_train)]
    return {rows[i]["path"] for i in keep}, imgs[keep]


def assert_no_leak(paths, images, pre_paths, pre_images, what):
    assert len(images) > 0, f"{what}: nothing was scored"
    if paths is not None:
        assert len(paths) == len(images)
        shared = set(map(str, paths)) & set(pre_paths)
        assert not shared, f"{what}: pre-training images by path: {sorted(shared)[:3]}"
    pre = {x.tobytes() for x in pre_images}
    dup = [i for i, x in enumerate(images) if x.tobytes() in pre]
    assert not dup, f"{what}: {len(dup)} scored image(s) are pre-training pixels"


def prepare_phantoms(root: Path, n: int = 120, p: float = 0.5) -> Path:
    assert main(["prepare", str(n), str(root), "--format", "phantom", "--size", str(SIZE),
                 "--p-abnormal", str(p), "--quiet", "--workers", "1"]) == 0
    return root


def small_config(**kw):
    return Config.preset_config("test", img_size=SIZE, batch_size=8, **kw)


@pytest.fixture(scope="module")
def one_folder(tmp_path_factory):
    """prepare -> pretrain on one folder; (dir, checkpoint, images pretrain really read)."""
    tmp = tmp_path_factory.mktemp("one_folder")
    root = prepare_phantoms(tmp / "ph")
    seen = []
    original = ShardDataset.read

    def recording_read(self, idx, on_bad="raise"):
        out = original(self, idx, on_bad)
        seen.append(np.array(out[0], copy=True))
        return out

    with mock.patch.object(ShardDataset, "read", recording_read):
        PRETRAIN.pretrain(small_config(), data=str(root), out=str(tmp / "run"), max_steps=2,
                          report=False, progress=False)
    seen = np.concatenate(seen)
    assert len(seen) == 16                     # 2 steps x batch 8
    return root, tmp / "run" / "last.safetensors", seen


def leak_sets(root, seen):
    rule_paths, rule_imgs = pretrain_set_by_rule(root)
    # what it read is part of what the rule says it trains on (checks the rule itself)
    rule_bytes = {x.tobytes() for x in rule_imgs}
    assert all(x.tobytes() in rule_bytes for x in seen)
    return rule_paths, np.concatenate([rule_imgs, seen])


# ---------------------------------------------------------------- the README workflow
@needs_c
def test_prepare_pretrain_evaluate_on_one_folder_never_tests_on_pretraining_images(
        one_folder, tmp_path):
    root, ck, seen = one_folder
    pre_paths, pre_imgs = leak_sets(root, seen)
    lp = linear_probe(ck, root, folds=2, epochs=5, say=lambda t: None)
    pool = lp["pool"]
    scored = pool.subset(lp["arrays"]["rows"])
    assert_no_leak(scored.paths, scored.images, pre_paths, pre_imgs, "linear probe")
    assert set(scored.splits) == {"test"}
    assert lp["data"]["pretrain"]["status"] == "identified"
    assert lp["data"]["pretrain"]["images"] == len(pre_paths)

    an = anomaly(ck, root, adapt_steps=2, batch=8, say=lambda t: None)
    for part in ("test", "val"):
        s = an["sets"][part]
        if s is not None and len(s):
            assert_no_leak(s.paths, s.images, pre_paths, pre_imgs, f"anomaly {part}")

    ft = finetune(ck, root, folds=2, epochs=1, batch=8, say=lambda t: None)
    sg = segment(ck, root, epochs=1, batch=8, say=lambda t: None)
    for name, r in (("finetune", ft), ("segment", sg)):
        for key, rows in r["arrays"].items():
            if key.endswith(("_test", "_val")):
                part = r["pool"].subset(rows)
                if len(part):
                    assert_no_leak(part.paths, part.images, pre_paths, pre_imgs,
                                   f"{name} {key}")

    # the same through the CLI, read back from results.json / arrays.npz
    for proto, extra in (("linear-probe", ["--folds", "2", "--epochs", "5"]),
                         ("anomaly", ["--adapt-steps", "2", "--batch", "8"])):
        out = tmp_path / proto
        assert main(["evaluate", proto, "--checkpoint", str(ck), "--data", str(root),
                     "--out", str(out), "--no-figures"] + extra) == 0
        arr = np.load(out / ("arrays.npz"))
        paths = arr["paths"] if proto == "linear-probe" else arr["test_paths"]
        assert len(paths) and not set(paths.tolist()) & pre_paths
        res = json.loads((out / "results.json").read_text())
        assert res["data"]["pretrain"]["status"] == "identified"
        assert res["data"]["pool"]["splits_used"] == ["test"]


@needs_c
def test_the_train_split_is_refused_and_identified_images_go_even_when_allowed(one_folder):
    root, ck, seen = one_folder
    pre_paths, pre_imgs = leak_sets(root, seen)
    with pytest.raises(ValueError, match="allow_train_split"):
        linear_probe(ck, root, split="all", folds=2, epochs=2, say=lambda t: None)
    with pytest.raises(ValueError, match="records the splits"):
        linear_probe(ck, root, split="validation", folds=2, epochs=2, say=lambda t: None)
    notes = []
    r = linear_probe(ck, root, split="all", allow_train_split=True, folds=2, epochs=2,
                     say=notes.append)
    scored = r["pool"].subset(r["arrays"]["rows"])
    assert "train" in set(scored.splits)                     # the train split is used ...
    assert_no_leak(scored.paths, scored.images, pre_paths, pre_imgs, "split=all")  # ... not those
    assert r["data"]["pool"]["excluded_pretrain"] == len(pre_paths)
    assert any("include split 'train'" in n for n in notes)
    assert any("pre-trained on" in n for n in r["notes"])


@needs_c
def test_the_same_directory_as_test_data_is_the_official_train_test_protocol(one_folder):
    root, ck, seen = one_folder
    pre_paths, pre_imgs = leak_sets(root, seen)
    r = linear_probe(ck, root, test_data=root, epochs=5, say=lambda t: None)
    rows, _ = raw_prepared(root)
    test_paths = {x["path"] for x in rows if x["split"] == "test"}
    assert set(r["arrays"]["paths"].tolist()) == test_paths        # all of, only, the test split
    assert r["data"]["train"]["dropped_also_in_test_or_val"] == len(test_paths)
    assert r["counts"]["train"]["images"] == len(rows) - len(test_paths)
    scored = r["pool"]
    assert_no_leak(scored.paths, scored.images, pre_paths, pre_imgs, "given test")


@needs_c
def test_builtin_phantom_pretraining_is_recognised_by_pixels(tmp_path):
    """`afire pretrain` without --data trains on built-in phantoms that are pixel-identical
    to the normal images `afire prepare N --format phantom` writes for the same seed."""
    PRETRAIN.pretrain(small_config(), data=40, out=str(tmp_path / "run"), max_steps=1,
                      report=False, progress=False)
    ck = tmp_path / "run" / "last.safetensors"
    root = prepare_phantoms(tmp_path / "ph", n=80)
    pre = phantom_dataset(40, size=SIZE, seed=0)["images"]
    _, imgs = raw_prepared(root)
    overlap = sum(x.tobytes() in {p.tobytes() for p in pre} for x in imgs)
    assert overlap > 5                                 # the leak this test is about exists
    r = linear_probe(ck, root, folds=2, epochs=2, say=lambda t: None)
    scored = r["pool"].subset(r["arrays"]["rows"])
    assert_no_leak(None, scored.images, set(), pre, "phantom pre-training")
    assert r["data"]["pool"]["excluded_pretrain"] > 0


def _shared_layout(root: Path, n: int, split: str | None, seed: int = 0) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        name = f"im{seed}_{i:03d}.png"
        img = rng.integers(0, 255, (SIZE + 8, SIZE), dtype=np.uint8)
        img[:, : SIZE // 2] //= 1 + (i % 2)          # abnormal ones are darker on one side
        Image.fromarray(img).save(root / name)
        row = {"filename": name, "label": "pneumonia" if i % 2 else "normal",
               "abnormal": i % 2, "group_id": f"s{seed}p{i // 2}"}
        if split:
            row["split"] = split
        rows.append(row)
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root


@needs_c
def test_a_single_split_folder_evaluated_on_itself_fails_clearly(tmp_path, capsys):
    """Every record in split "train": pre-training takes all its normals, the pool keeps
    only what it did not read (the abnormal images) -> a clear error, not inflated scores;
    a separate test set works."""
    src = _shared_layout(tmp_path / "src", 24, "train")
    root = tmp_path / "prep"
    assert main(["prepare", str(src), str(root), "--format", "shared", "--size", str(SIZE),
                 "--quiet", "--workers", "1"]) == 0
    PRETRAIN.pretrain(small_config(), data=str(root), out=str(tmp_path / "run"), max_steps=1,
                      report=False, progress=False)
    ck = tmp_path / "run" / "last.safetensors"
    with pytest.raises(ValueError, match="normal and abnormal"):
        linear_probe(ck, root, folds=2, epochs=2, say=lambda t: None)
    assert main(["evaluate", "anomaly", "--checkpoint", str(ck), "--data", str(root),
                 "--adapt-steps", "1", "--out", str(tmp_path / "a"), "--no-figures"]) == 2
    assert "anomaly detection needs labelled normal and abnormal" in capsys.readouterr().err
    other = _shared_layout(tmp_path / "other", 20, "test", seed=1)
    r = linear_probe(ck, root, test_data=other, epochs=2, say=lambda t: None)
    assert r["counts"]["test"]["images"] == 20
    # the shared-layout source of the prepared folder is recognised by its paths too
    with pytest.raises(ValueError, match="normal and abnormal"):
        linear_probe(ck, src, folds=2, epochs=2, say=lambda t: None)


@needs_c
def test_a_changed_directory_cannot_be_tested_on(tmp_path):
    """The checkpoint names a single-split directory, but what `afire pretrain` reads there
    no longer matches its fingerprint (re-prepared since): the pre-training images cannot be
    told apart, so it is refused unless explicitly allowed (then warned about)."""
    src = _shared_layout(tmp_path / "src", 24, "train")
    root = tmp_path / "prep"
    assert main(["prepare", str(src), str(root), "--format", "shared", "--size", str(SIZE),
                 "--quiet", "--workers", "1"]) == 0
    fake = tmp_path / "changed.safetensors"
    AFiRe(small_config(), steps_per_epoch=2).save(fake, extra_metadata={
        "data_fingerprint": "shards:" + "0" * 32,
        "data_desc": f"12 normal images of {root} (split train)"})
    with pytest.raises(ValueError, match="cannot be told apart"):
        linear_probe(fake, root, folds=2, epochs=2, say=lambda t: None)
    notes = []
    r = linear_probe(fake, root, allow_train_split=True, folds=2, epochs=2, say=notes.append)
    assert r["data"]["pretrain"]["status"] == "changed"
    assert any("cannot be checked" in n for n in notes)


@needs_c
def test_exclude_list_and_val_data(one_folder, tmp_path):
    root, ck, _ = one_folder
    rows, _ = raw_prepared(root)
    test_rows = [x for x in rows if x["split"] == "test"]
    listed = tmp_path / "exclude.txt"
    listed.write_text("\n".join(x["path"] for x in test_rows[:5]) + "\n")
    r = linear_probe(ck, root, exclude=listed, folds=2, epochs=2, say=lambda t: None)
    assert not {x["path"] for x in test_rows[:5]} & set(r["arrays"]["paths"].tolist())
    assert r["data"]["pool"]["excluded_listed"] == 5
    with pytest.raises(FileNotFoundError):
        linear_probe(ck, root, exclude=tmp_path / "missing.txt", say=lambda t: None)
    # --val-data: validation is that set, never a split of the pool
    val = _shared_layout(tmp_path / "val", 12, "test", seed=2)
    a = anomaly(ck, root, val_data=val, adapt_steps=1, batch=8, say=lambda t: None)
    assert a["settings"]["validation"] == "given" and len(a["arrays"]["val_rows"]) == 0
    assert a["counts"]["val"]["images"] == 12
    assert set(a["arrays"]["val_paths"].tolist()) == {str(val / f"im2_{i:03d}.png")
                                                      for i in range(12)}
    f = finetune(ck, root, val_data=val, folds=2, epochs=1, batch=8, say=lambda t: None)
    vrows = f["arrays"]["f1_k0_val"]
    assert len(vrows) == 12 and (f["arrays"]["f1_k1_val"] == vrows).all()
    assert set(f["pool"].paths[vrows].tolist()) == set(a["arrays"]["val_paths"].tolist())


@needs_c
def test_duplicate_pixels_never_straddle_folds(tmp_path):
    model = AFiRe(small_config(), steps_per_epoch=2)
    d = phantom_dataset(40, size=SIZE, seed=4, p_abnormal=0.5)
    x, y = d["images"].copy(), (d["labels"] > 0).astype(int)
    for a, b in ((0, 21), (3, 30), (7, 12)):          # copies under another patient id
        x[b], y[b] = x[a], y[a]
    r = linear_probe(model, {"images": x, "abnormal": y, "groups": np.arange(40)}, folds=4,
                     epochs=2, say=lambda t: None)
    fold = np.empty(40, int)
    fold[r["arrays"]["rows"]] = r["arrays"]["fold"]
    for a, b in ((0, 21), (3, 30), (7, 12)):
        assert fold[a] == fold[b]
    assert r["data"]["pool"]["duplicate_groups_merged"] == 3


# ---------------------------------------------------------------- clear errors
@needs_c
def test_unlabelled_and_empty_data_fail_with_what_is_missing(tmp_path):
    model = AFiRe(small_config(), steps_per_epoch=2)
    x = phantom_dataset(12, size=SIZE, seed=1)["images"]
    with pytest.raises(ValueError, match="linear probe needs labels"):
        linear_probe(model, {"images": x}, folds=2, say=lambda t: None)
    with pytest.raises(ValueError, match="fine-tuning .* needs labels"):
        finetune(model, {"images": x}, folds=2, epochs=1, say=lambda t: None)
    with pytest.raises(ValueError, match="needs labelled normal and abnormal"):
        anomaly(model, {"images": x}, adapt_steps=0, say=lambda t: None)
    with pytest.raises(ValueError, match="no images"):
        linear_probe(model, {"images": np.zeros((0, SIZE, SIZE), np.uint8)},
                     say=lambda t: None)
    # images read from files with no label: their empty lesion masks are unknown, not empty
    # (SIIM's unlabelled 'test' split), so a Dice of 1 is never reported for them
    with pytest.raises(ValueError, match="known lesion mask"):
        segment(model, {"images": x, "lesion_masks": np.zeros_like(x),
                        "paths": [f"f{i}.png" for i in range(len(x))]}, epochs=1,
                say=lambda t: None)
    # an unlabelled folder preparation, through the CLI
    for i in range(6):
        Image.fromarray(x[i]).save(tmp_path / f"f{i}.png")
    assert main(["prepare", str(tmp_path), str(tmp_path / "prep"), "--format", "folder",
                 "--size", str(SIZE), "--quiet", "--workers", "1"]) == 0
    ck = tmp_path / "ck.safetensors"
    model.save(ck)
    assert main(["evaluate", "linear-probe", "--checkpoint", str(ck), "--data",
                 str(tmp_path / "prep"), "--out", str(tmp_path / "o")]) == 2


@needs_c
def test_a_checkpoint_at_another_size_says_it_resizes(tmp_path, capsys):
    model = AFiRe(small_config(), steps_per_epoch=2)
    d = phantom_dataset(30, size=16, seed=2, p_abnormal=0.5)
    with pytest.warns(EvaluationNote, match="16x16 px, evaluation runs at 32x32"):
        r = linear_probe(model, d, folds=2, epochs=2)
    assert any("resizing" in n for n in r["notes"])


# ---------------------------------------------------------------- CLI
def _evaluate_parsers():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    ev = sub.choices["evaluate"]
    evsub = next(a for a in ev._actions if isinstance(a, argparse._SubParsersAction))
    return evsub.choices


def test_every_evaluate_option_has_help_showing_its_default():
    for name, p in _evaluate_parsers().items():
        fmt = p.formatter_class(prog=name)
        for a in p._actions:
            if isinstance(a, argparse._HelpAction) or a.help == argparse.SUPPRESS:
                continue
            if a.required:
                assert a.help, (name, a.dest)
                continue
            text = fmt._get_help_string(a)
            assert a.help and "default" in text.lower(), (name, a.dest, text)
    help_text = _evaluate_parsers()["linear-probe"].format_help()
    assert f"(default: {PROBE_RECIPE['epochs']})" in help_text


def test_cli_probe_defaults_are_the_eval_suite_recipe():
    a = _evaluate_parsers()["linear-probe"].parse_args(["--checkpoint", "c", "--data", "d"])
    sig = inspect.signature(linear_probe).parameters
    for k, v in PROBE_RECIPE.items():
        assert getattr(a, k) == v == sig[k].default, k
    src = (Path(__file__).parent / "eval" / "test_eval_real.py").read_text()
    assert "PROBE_RECIPE" in src          # the suite states the recipe it runs


@needs_c
def test_cli_out_is_never_silently_overwritten(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    model = AFiRe(small_config(), steps_per_epoch=2)
    ck = tmp_path / "ck.safetensors"
    model.save(ck)
    root = prepare_phantoms(tmp_path / "ph", n=200)
    cmd = ["evaluate", "anomaly", "--checkpoint", str(ck), "--data", str(root),
           "--adapt-steps", "1", "--batch", "8", "--no-figures"]
    assert main(cmd) == 0
    first = (tmp_path / "eval-anomaly" / "results.json").read_text()
    assert main(cmd) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "eval-anomaly" / "results.json").read_text() == first
    assert main(cmd + ["--overwrite", "--split-seed", "3"]) == 0
    res = json.loads((tmp_path / "eval-anomaly" / "results.json").read_text())
    assert res["settings"]["split_seed"] == 3


@needs_c
def test_cli_init_seed_and_split_seed_are_independent(tmp_path, capsys):
    model = AFiRe(small_config(), steps_per_epoch=2)
    ck = tmp_path / "ck.safetensors"
    model.save(ck)
    root = prepare_phantoms(tmp_path / "ph", n=150)

    def run(name, *extra):
        out = tmp_path / name
        assert main(["evaluate", "linear-probe", "--checkpoint", str(ck), "--data", str(root),
                     "--folds", "2", "--epochs", "5", "--out", str(out), "--no-figures",
                     *extra]) == 0
        arr = np.load(out / "arrays.npz")
        return json.loads((out / "results.json").read_text()), arr

    r1, a1 = run("i1s0", "--random-init", "--init-seed", "1", "--split-seed", "0")
    r2, a2 = run("i2s0", "--random-init", "--init-seed", "2", "--split-seed", "0")
    r3, a3 = run("i1s5", "--random-init", "--init-seed", "1", "--split-seed", "5")
    assert r1["encoder"]["init_seed"] == 1 and r1["settings"]["split_seed"] == 0
    assert r2["encoder"]["weights"].startswith("random init")
    # another init seed: the same folds, another encoder
    np.testing.assert_array_equal(a1["paths"], a2["paths"])
    np.testing.assert_array_equal(a1["fold"], a2["fold"])
    assert not np.array_equal(a1["logits"], a2["logits"])
    # another split seed: other folds, the same encoder (same init seed)
    f1 = dict(zip(a1["paths"].tolist(), a1["fold"].tolist()))
    f3 = dict(zip(a3["paths"].tolist(), a3["fold"].tolist()))
    assert f1.keys() == f3.keys() and f1 != f3
    assert main(["evaluate", "linear-probe", "--checkpoint", str(ck), "--data", str(root),
                 "--init-seed", "3", "--out", str(tmp_path / "x")]) == 2
    assert "--random-init" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", "linear-probe", "--checkpoint", str(ck), "--data", str(root),
              "--seed", "3"])
    assert "--split-seed" in capsys.readouterr().err


def test_evaluate_figures_have_colour_bars(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from afire.evaluate import figures as F

    figs = []
    real_save = F._save

    def keep(fig, path, *args):
        figs.append(fig)
        return real_save(fig, path, *args)

    monkeypatch.setattr(F, "_save", keep)
    x = phantom_dataset(3, size=SIZE, seed=0)["images"]
    m = np.random.default_rng(0).random((3, 4, 4)) * 7.0
    F.overlay_figure(x, m, tmp_path / "a.png", scale="shared", colorbar_label="err")
    F.overlay_figure(x, m, tmp_path / "b.png")
    shared, per_image = figs
    bars = [ax for ax in shared.axes if ax.get_ylabel() == "err"]
    assert len(bars) == 1
    lo, hi = bars[0].get_ylim()
    assert lo == pytest.approx(m.min()) and hi == pytest.approx(m.max())
    assert any("per image" in ax.get_ylabel() for ax in per_image.axes)
    with pytest.raises(ValueError, match="scale"):
        F.overlay_figure(x, m, tmp_path / "c.png", scale="global")


def test_load_data_never_returns_an_empty_set(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        load_data({"images": np.zeros((0, 8, 8), np.uint8)})
    (tmp_path / "labels.csv").write_text("filename,label,abnormal,group_id\n")
    with pytest.raises(ValueError, match="no readable image"):
        load_data(tmp_path, 16)
