"""Evaluation protocols of the paper (METHOD §6, §8): linear probe, fine-tuning, segmentation,
anomaly detection; metrics (NumPy only) and figures (matplotlib, the ``viz`` extra).

Each protocol takes a checkpoint path (or an ``AFiRe`` model) and data (a prepared
directory, the shared-data layout ``labels.csv`` + images, or a dict of arrays), computes
in C (``AFiRe`` and ``afire._C.downstream``) and returns a results dict; with ``out=DIR``
it also writes ``DIR/results.json`` (every metric, the protocol's settings, which images
were used and why, data counts), ``DIR/arrays.npz`` where there are per-image outputs, and
figures.

Test images never include the images the checkpoint pre-trained on, and by default come
from a directory's non-"train" splits only (:mod:`.selection` states the rule).
"""
from . import metrics
from .anomaly import anomaly
from .common import EvalData, EvaluationNote, load_data, load_model, random_init
from .finetune import finetune
from .linear_probe import PROBE_RECIPE, linear_probe
from .segment import segment
from .selection import pretrain_provenance, resolve_inputs

__all__ = ["metrics", "anomaly", "finetune", "linear_probe", "segment", "EvalData",
           "EvaluationNote", "PROBE_RECIPE", "load_data", "load_model", "random_init",
           "pretrain_provenance", "resolve_inputs"]
