"""Synthetic chest radiographs from the C generator (``afire._C.phantom``)."""
from __future__ import annotations

import numpy as np

from .. import _C

LESION_KINDS = ("none", "nodule", "consolidation", "effusion")
ORGAN_LABELS = ("background", "lung", "heart", "mediastinum", "abdomen", "soft_tissue")


def phantom_dataset(
    n: int,
    size: int = 224,
    seed: int = 0,
    first_subject: int = 0,
    lesion: str | None = None,
    p_abnormal: float | None = None,
) -> dict[str, np.ndarray]:
    """Generate ``n`` synthetic frontal chest radiographs.

    Subject ``first_subject + i`` is a pure function of ``(seed, subject)``: asking for the
    same subject in another call, batch or order gives the same image.

    Args:
        n: number of images.
        size: image side S in pixels (8..4096).
        seed: generator seed.
        first_subject: subject id of the first image.
        lesion: ``None``, ``"nodule"``, ``"consolidation"``, ``"effusion"`` or ``"random"``.
        p_abnormal: probability that an image carries a lesion. ``None`` means 1 when
            ``lesion`` is given and 0 otherwise; ``p_abnormal > 0`` with ``lesion=None``
            draws a random kind per abnormal image.

    Returns:
        dict with ``images``, ``lesion_masks``, ``organ_labels`` (uint8 [n, S, S]) and
        ``labels`` (int32 [n]: 0 normal, 1 nodule, 2 consolidation, 3 effusion). Organ
        label values index :data:`ORGAN_LABELS`.
    """
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if seed < 0 or first_subject < 0:
        raise ValueError(f"seed and first_subject must be >= 0, got {seed}, {first_subject}")
    return _C.phantom.generate(int(n), size=int(size), seed=int(seed),
                               first_subject=int(first_subject), lesion=lesion,
                               p_abnormal=p_abnormal)
