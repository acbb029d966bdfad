"""``afire evaluate linear-probe|finetune|segment|anomaly --checkpoint CKPT --data DIR``."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .linear_probe import PROBE_RECIPE

# files a protocol writes into --out (removed first by --overwrite, so nothing stale stays)
OUTPUT_FILES = ("results.json", "arrays.npz", "roc.png", "tsne.png", "heatmaps.png",
                "heatmaps_scores.png",
                "restorations.png", "gradcam.png", "segmentation.png")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless the help already states it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.required:
            return text
        return super()._get_help_string(action)


def _target(s: str):
    return s if s in ("abnormal", "findings") else [t for t in s.split(",") if t]


def _fractions(values: list[float]) -> list[float]:
    for v in values:
        if not 0 < v <= 100:
            raise argparse.ArgumentTypeError(f"label fractions are percentages in (0, 100], "
                                             f"got {v}")
    return [v / 100.0 for v in values]


def _removed_seed(_value: str):
    raise argparse.ArgumentTypeError("--seed was split in two: --split-seed (patient-wise "
                                     "splits, the protocol's training) and --init-seed (the "
                                     "--random-init encoder)")


def _common(p, proto: str, val: bool) -> None:
    p.add_argument("--checkpoint", required=True, help="afire checkpoint (.safetensors)")
    p.add_argument("--data", required=True,
                   help="prepared dir (afire prepare) or shared-data dir (labels.csv + "
                        "images); without --test-data the protocol splits it patient-wise")
    p.add_argument("--test-data", default=None,
                   help="separate test set; --data then only trains (default: none, a "
                        "patient-wise split of --data's evaluation pool)")
    if val:
        p.add_argument("--val-data", default=None,
                       help="separate validation set (threshold choice / early stopping) "
                            "instead of a patient-wise split (default: none)")
    p.add_argument("--split", default="auto",
                   help="which recorded splits of a directory the test images come from: "
                        "'auto' = every split except 'train' (the split afire pretrain "
                        "trains on) when there is one, else all; or names, e.g. 'test' or "
                        "'test,val'; 'all' needs --allow-train-split (default: auto)")
    p.add_argument("--allow-train-split", action="store_true",
                   help="let --split include split 'train' (warned; images identified as the "
                        "checkpoint's pre-training images are still left out)")
    p.add_argument("--exclude", default=None, metavar="FILE",
                   help="never test on these images: a manifest.jsonl, a prepared dir or a "
                        "text file with one path a line (default: none)")
    p.add_argument("--out", default=f"eval-{proto}",
                   help="output dir; refused if it holds a results.json, see --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results (and figures) already in --out")
    p.add_argument("--split-seed", type=int, default=0,
                   help="seed of the patient-wise splits and of the protocol's own training "
                        "(independent of --init-seed)")
    p.add_argument("--seed", type=_removed_seed, default=None, help=argparse.SUPPRESS)
    p.add_argument("--random-init", action="store_true",
                   help="baseline: the checkpoint's configuration with freshly initialised "
                        "weights, tested on the same images as the checkpoint")
    p.add_argument("--init-seed", type=int, default=None,
                   help="seed of the --random-init weights (default: 0; needs --random-init)")
    p.add_argument("--no-figures", action="store_true", help="write results.json only")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda or cuda:N: where the encoder computes features and the "
                        "anomaly adaptation trains (finetune/segment train on the CPU)")


def _training(p, epochs: int, batch: int, lr: float, folds: int) -> None:
    p.add_argument("--label-fraction", type=float, nargs="+", default=[100.0],
                   help="percent of the training labels to use, e.g. 1 10 100")
    p.add_argument("--folds", type=int, default=folds,
                   help="patient-wise folds (1 = one hold-out)")
    p.add_argument("--test-fraction", type=float, default=0.2,
                   help="fraction of the groups held out for testing when --folds 1")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="fraction of the training groups that validates (without --val-data)")
    p.add_argument("--epochs", type=int, default=epochs, help="maximum epochs")
    p.add_argument("--batch", type=int, default=batch, help="batch size")
    p.add_argument("--lr", type=float, default=lr, help="peak learning rate (AdamW, cosine)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    p.add_argument("--patience", type=int, default=10,
                   help="early stopping: epochs without validation gain")
    p.add_argument("--freeze-encoder", action="store_true",
                   help="train the head only")
    p.add_argument("--no-augment", action="store_true",
                   help="no random resized crop / flip / rotation")


def add_parser(sub) -> None:
    """Register ``evaluate`` on the ``afire`` sub-command parser."""
    ev = sub.add_parser("evaluate", help="downstream evaluation of a checkpoint",
                        description="Evaluation protocols of the paper (METHOD §6). Each "
                                    "writes results.json (+ arrays.npz, figures) to --out. "
                                    "Test images never include the checkpoint's own "
                                    "pre-training images, nor (by default) a prepared "
                                    "directory's 'train' split.")
    ps = ev.add_subparsers(dest="protocol", metavar="PROTOCOL")
    ps.required = True

    p = ps.add_parser("linear-probe", help="frozen encoder, GAP features, linear classifier",
                      formatter_class=_Help)
    _common(p, "linear-probe", val=False)
    p.add_argument("--target", type=_target, default="abnormal",
                   help="'abnormal', 'findings' or comma-separated finding names")
    p.add_argument("--folds", type=int, default=PROBE_RECIPE["folds"],
                   help="patient-wise folds (1 = one hold-out)")
    p.add_argument("--test-fraction", type=float, default=PROBE_RECIPE["test_fraction"],
                   help="fraction of the groups held out for testing when --folds 1")
    p.add_argument("--epochs", type=int, default=PROBE_RECIPE["epochs"], help="probe epochs")
    p.add_argument("--lr", type=float, default=PROBE_RECIPE["lr"], help="probe learning rate")
    p.add_argument("--weight-decay", type=float, default=PROBE_RECIPE["weight_decay"],
                   help="probe weight decay")
    p.add_argument("--batch", type=int, default=PROBE_RECIPE["batch"], help="probe batch size")
    p.set_defaults(func=_run, proto="linear_probe")

    p = ps.add_parser("finetune", help="fine-tune a classifier (label fractions, k-fold)",
                      formatter_class=_Help)
    _common(p, "finetune", val=True)
    p.add_argument("--target", type=_target, default="abnormal",
                   help="'abnormal', 'findings' or comma-separated finding names")
    _training(p, epochs=100, batch=128, lr=2e-4, folds=5)
    p.set_defaults(func=_run, proto="finetune")

    p = ps.add_parser("segment", help="fine-tune a segmenter (Dice)", formatter_class=_Help)
    _common(p, "segment", val=True)
    p.add_argument("--mask", default="lesion",
                   help="'lesion' (SIIM / phantom lesion masks) or a phantom organ name")
    _training(p, epochs=50, batch=32, lr=1e-4, folds=1)
    p.set_defaults(func=_run, proto="segment")

    p = ps.add_parser("anomaly", help="anomaly detection (adapt on normals, then score)",
                      formatter_class=_Help)
    _common(p, "anomaly", val=True)
    from ..model import ANOMALY_SCORES
    from .anomaly import DEFAULT_SCORE
    p.add_argument("--score", default=DEFAULT_SCORE, choices=list(ANOMALY_SCORES),
                   help="the score whose AUC and thresholds are reported first (every score "
                        "and the blur / image std / pixel PCA baselines are reported too): "
                        + "; ".join(f"{k}: {'the paper' if paper else 'not in the paper'}"
                                    for k, (paper, _) in ANOMALY_SCORES.items())
                        + f" (default: {DEFAULT_SCORE}, chosen on validation splits; "
                          "docs/RESULTS.md)")
    p.add_argument("--adapt-epochs", type=float, default=10.0,
                   help="adaptation passes over the normal training images")
    p.add_argument("--adapt-steps", type=int, default=None,
                   help="adaptation steps; overrides --adapt-epochs (default: from "
                        "--adapt-epochs)")
    p.add_argument("--lr", type=float, default=1e-4, help="adaptation learning rate (Adam)")
    p.add_argument("--batch", type=int, default=64, help="adaptation batch size")
    p.add_argument("--test-fraction", type=float, default=0.3,
                   help="fraction of the groups held out for testing")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="fraction of the groups that chooses the threshold (without "
                        "--val-data)")
    p.add_argument("--heatmaps", type=int, default=8, help="test images in heatmaps.png")
    p.set_defaults(func=_run, proto="anomaly")


def _kwargs(a) -> dict:
    if a.init_seed is not None and not a.random_init:
        raise ValueError("--init-seed only applies with --random-init")
    kw = dict(test_data=a.test_data, split_seed=a.split_seed, figures=not a.no_figures,
              progress=not a.quiet,
              split=a.split, allow_train_split=a.allow_train_split, exclude=a.exclude,
              device=a.device, init_seed=(a.init_seed or 0) if a.random_init else None)
    if getattr(a, "val_data", None) is not None:
        kw["val_data"] = a.val_data
    if a.proto == "linear_probe":
        kw.update(target=a.target, folds=a.folds, test_fraction=a.test_fraction,
                  epochs=a.epochs, lr=a.lr, weight_decay=a.weight_decay, batch=a.batch)
    elif a.proto in ("finetune", "segment"):
        kw.update(label_fractions=_fractions(a.label_fraction), folds=a.folds,
                  test_fraction=a.test_fraction, val_fraction=a.val_fraction,
                  epochs=a.epochs, batch=a.batch, lr=a.lr, weight_decay=a.weight_decay,
                  patience=a.patience, freeze_encoder=a.freeze_encoder,
                  augment=not a.no_augment)
        if a.proto == "finetune":
            kw["target"] = a.target
        else:
            kw["mask"] = a.mask
    else:
        kw.update(adapt_epochs=a.adapt_epochs, adapt_steps=a.adapt_steps, lr=a.lr,
                  batch=a.batch, test_fraction=a.test_fraction, val_fraction=a.val_fraction,
                  heatmaps=a.heatmaps, score=a.score)
    return kw


def _check_out(out: str, overwrite: bool) -> None:
    """Refuse to replace earlier results unless --overwrite; with it, remove them first."""
    res = os.path.join(out, "results.json")
    if os.path.exists(res) and not overwrite:
        raise ValueError(f"{res} already exists (an earlier evaluation); pass --overwrite to "
                         "replace it, or choose another --out")
    if overwrite:
        for f in OUTPUT_FILES:
            p = os.path.join(out, f)
            if os.path.isfile(p):
                os.remove(p)


def _run(a) -> int:
    from . import anomaly, finetune, linear_probe, segment
    from .common import json_safe

    try:
        kw = _kwargs(a)
    except argparse.ArgumentTypeError as e:
        raise ValueError(str(e)) from None
    if not os.path.exists(a.checkpoint):
        raise FileNotFoundError(f"checkpoint {a.checkpoint} not found")
    _check_out(a.out, a.overwrite)
    name = a.proto.replace("_", "-")

    def say(text: str) -> None:
        print(f"afire evaluate {name}: {text}", file=sys.stderr)

    fn = {"linear_probe": linear_probe, "finetune": finetune, "segment": segment,
          "anomaly": anomaly}[a.proto]
    res = fn(a.checkpoint, a.data, out=a.out, say=say, **kw)
    print(f"afire evaluate {name}: results in {os.path.join(a.out, 'results.json')}")
    json.dump(json_safe(res["metrics"]), sys.stdout, indent=1)
    print()
    for f in res.get("figures", []):
        print(f"figure: {f}")
    return 0
