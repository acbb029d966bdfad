"""Data: the synthetic phantom, dataset readers, ``prepare`` to shards, the shard loader."""
from .image import load_gray, minmax_to_uint8, resize_square
from .loader import DataError, ShardDataset
from .phantom import LESION_KINDS, ORGAN_LABELS, phantom_dataset
from .prepare import phantom_records, prepare
from .readers import (
    CHEXPERT_FINDINGS,
    FORMATS,
    NIH_FINDINGS,
    Record,
    decode_rle,
    group_split,
    read_chexpert,
    read_dataset,
    read_folder,
    read_kermany,
    read_mimic,
    read_nih,
    read_shared,
    read_siim,
)

__all__ = [
    "LESION_KINDS", "ORGAN_LABELS", "phantom_dataset", "ShardDataset", "DataError", "prepare",
    "phantom_records", "Record", "FORMATS", "NIH_FINDINGS", "CHEXPERT_FINDINGS", "decode_rle",
    "group_split", "read_dataset", "read_folder", "read_kermany", "read_nih", "read_chexpert",
    "read_mimic", "read_siim", "read_shared", "load_gray", "minmax_to_uint8", "resize_square",
]
