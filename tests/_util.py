"""Helpers shared by the model tests (imported as a plain module: tests/ is on sys.path)."""
import numpy as np

from afire import Config


def phantom_like(n, s=32, seed=0):
    """Cheap chest-like test images: bright body, two darker lungs, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:s, 0:s] / s
    imgs = []
    for _ in range(n):
        body = 170 + 40 * np.exp(-((xx - 0.5) ** 2) / 0.2)
        for cx in (0.3, 0.7):
            body -= 90 * np.exp(-(((xx - cx) / 0.12) ** 2 + ((yy - 0.5) / 0.25) ** 2))
        img = body + rng.normal(0, 6, (s, s))
        imgs.append(np.clip(img, 0, 255))
    return np.stack(imgs).astype(np.uint8)


def small_cfg(**kw):
    base = dict(epochs=2, warmup_epochs=1, batch_size=4)
    base.update(kw)
    return Config.preset_config("test", **base)
