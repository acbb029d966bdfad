"""``afire evaluate linear-probe|finetune|segment|anomaly --checkpoint CKPT --data DIR``."""
from __future__ import annotations

import argparse
import json
import sys


def _target(s: str):
    return s if s in ("abnormal", "findings") else [t for t in s.split(",") if t]


def _fractions(values: list[float]) -> list[float]:
    for v in values:
        if not 0 < v <= 100:
            raise argparse.ArgumentTypeError(f"label fractions are percentages in (0, 100], "
                                             f"got {v}")
    return [v / 100.0 for v in values]


def _common(p) -> None:
    p.add_argument("--checkpoint", required=True, help="afire checkpoint (.safetensors)")
    p.add_argument("--data", required=True,
                   help="prepared dir (afire prepare) or shared-data dir (labels.csv + images)")
    p.add_argument("--test-data", default=None,
                   help="separate test set (default: a patient-wise split of --data)")
    p.add_argument("--out", default=None, help="output dir (default: eval-<protocol>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--random-init", action="store_true",
                   help="baseline: the checkpoint's configuration with freshly initialised "
                        "weights")
    p.add_argument("--no-figures", action="store_true", help="write results.json only")
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda or cuda:N: where the encoder computes features and the "
                        "anomaly adaptation trains (finetune/segment train on the CPU)")


def _training(p, epochs: int, batch: int, lr: float, folds: int) -> None:
    p.add_argument("--label-fraction", type=float, nargs="+", default=[100.0],
                   help="percent of the training labels to use, e.g. 1 10 100 (default 100)")
    p.add_argument("--folds", type=int, default=folds,
                   help=f"patient-wise folds (1 = one hold-out; default {folds})")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--patience", type=int, default=10,
                   help="early stopping: epochs without validation gain (10)")
    p.add_argument("--freeze-encoder", action="store_true")
    p.add_argument("--no-augment", action="store_true")


def add_parser(sub) -> None:
    """Register ``evaluate`` on the ``afire`` sub-command parser."""
    ev = sub.add_parser("evaluate", help="downstream evaluation of a checkpoint",
                        description="Evaluation protocols of the paper (METHOD §6). Each "
                                    "writes results.json (+ arrays.npz, figures) to --out.")
    ps = ev.add_subparsers(dest="protocol", metavar="PROTOCOL")
    ps.required = True

    p = ps.add_parser("linear-probe", help="frozen encoder, GAP features, linear classifier")
    _common(p)
    p.add_argument("--target", type=_target, default="abnormal",
                   help="'abnormal', 'findings' or comma-separated finding names")
    p.add_argument("--folds", type=int, default=1, help="patient-wise folds (1 = hold-out)")
    p.add_argument("--test-fraction", type=float, default=0.3)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--batch", type=int, default=256)
    p.set_defaults(func=_run, proto="linear_probe")

    p = ps.add_parser("finetune", help="fine-tune a classifier (label fractions, k-fold)")
    _common(p)
    p.add_argument("--target", type=_target, default="abnormal",
                   help="'abnormal', 'findings' or comma-separated finding names")
    _training(p, epochs=100, batch=128, lr=2e-4, folds=5)
    p.set_defaults(func=_run, proto="finetune")

    p = ps.add_parser("segment", help="fine-tune a segmenter (Dice)")
    _common(p)
    p.add_argument("--mask", default="lesion",
                   help="'lesion' (SIIM / phantom lesion masks) or a phantom organ name")
    _training(p, epochs=50, batch=32, lr=1e-4, folds=1)
    p.set_defaults(func=_run, proto="segment")

    p = ps.add_parser("anomaly", help="anomaly detection (adapt on normals, Eq. 51)")
    _common(p)
    p.add_argument("--adapt-epochs", type=float, default=10.0,
                   help="adaptation passes over the normal training images (10)")
    p.add_argument("--adapt-steps", type=int, default=None, help="overrides --adapt-epochs")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--test-fraction", type=float, default=0.3)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--heatmaps", type=int, default=8, help="test images in heatmaps.png")
    p.set_defaults(func=_run, proto="anomaly")


def _kwargs(a) -> dict:
    kw = dict(test_data=a.test_data, seed=a.seed, figures=not a.no_figures)
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
                  heatmaps=a.heatmaps)
    return kw


def _run(a) -> int:
    from . import anomaly, finetune, linear_probe, segment
    from .common import load_model, random_init

    try:
        kw = _kwargs(a)
    except argparse.ArgumentTypeError as e:
        raise ValueError(str(e)) from None
    model = load_model(a.checkpoint, device=a.device)
    if a.random_init:
        model = random_init(model, seed=a.seed)
    out = a.out or f"eval-{a.proto.replace('_', '-')}"
    fn = {"linear_probe": linear_probe, "finetune": finetune, "segment": segment,
          "anomaly": anomaly}[a.proto]
    res = fn(model, a.data, out=out, **kw)
    print(f"afire evaluate {a.proto.replace('_', '-')}: results in {out}/results.json")
    from .common import json_safe
    json.dump(json_safe(res["metrics"]), sys.stdout, indent=1)
    print()
    for f in res.get("figures", []):
        print(f"figure: {f}")
    return 0
