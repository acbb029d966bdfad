"""Synthetic chest-like uint8 images for the benchmarks (NumPy only: the torch workers and
the afire drivers both import it)."""
import numpy as np


def chest_like(n: int, s: int, seed: int) -> np.ndarray:
    """[n, s, s] uint8: a bright body, two darker lungs, Gaussian noise (sd 6), as
    tests/_util.phantom_like."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:s, 0:s] / s
    body = 170 + 40 * np.exp(-((xx - 0.5) ** 2) / 0.2)
    for cx in (0.3, 0.7):
        body = body - 90 * np.exp(-(((xx - cx) / 0.12) ** 2 + ((yy - 0.5) / 0.25) ** 2))
    imgs = body[None] + rng.normal(0, 6, (n, s, s))
    return np.clip(imgs, 0, 255).astype(np.uint8)
