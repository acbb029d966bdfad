"""Evaluation protocols of the paper (METHOD §6, §8): linear probe, fine-tuning, segmentation,
anomaly detection; metrics (NumPy only) and figures (matplotlib, the ``viz`` extra).

Each protocol takes a checkpoint path (or an ``AFiRe`` model) and data (a prepared
directory, the shared-data layout ``labels.csv`` + images, or a dict of arrays), computes
in C (``AFiRe`` and ``afire._C.downstream``) and returns a results dict; with ``out=DIR``
it also writes ``DIR/results.json`` (every metric, the protocol's settings, data counts),
``DIR/arrays.npz`` where there are per-image outputs, and figures.
"""
from . import metrics
from .anomaly import anomaly
from .common import EvalData, load_data, load_model, random_init
from .finetune import finetune
from .linear_probe import linear_probe
from .segment import segment

__all__ = ["metrics", "anomaly", "finetune", "linear_probe", "segment", "EvalData",
           "load_data", "load_model", "random_init"]
