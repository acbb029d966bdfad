"""Data: the synthetic phantom, dataset readers, ``prepare`` to shards, the shard loader."""
from .phantom import LESION_KINDS, ORGAN_LABELS, phantom_dataset

__all__ = ["LESION_KINDS", "ORGAN_LABELS", "phantom_dataset"]
