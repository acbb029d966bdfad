"""Figures of the evaluation protocols (PNG). Needs matplotlib (the ``viz`` extra); t-SNE
also needs openTSNE or scikit-learn.

Every function writes one file and returns its path; with ``path=None`` it writes nothing
and returns the matplotlib ``Figure`` instead (shown inline by Jupyter, or saved later with
``fig.savefig``). ``return_figure=True`` with a path does both: it writes the file and
returns the Figure.

Figures are made with ``matplotlib.figure.Figure``, not pyplot: the pyplot backend (an
inline one in Jupyter, a GUI one on a desktop) is never changed, and no figure is left
open in pyplot's list."""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

import numpy as np

VIZ_HINT = "install the viz extra: pip install 'afire[viz]'"


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(f"figures need matplotlib ({VIZ_HINT})") from None
    if "ipykernel" in sys.modules:
        _inline_display(Figure)
    return Figure


def _inline_display(figure_class) -> None:
    """In a Jupyter kernel: show a returned Figure as an image. The inline backend sets
    this up only once pyplot draws, and these figures are made outside pyplot; a format
    the user chose (``%config InlineBackend.figure_formats``) is kept."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is None or not hasattr(shell, "kernel"):
        return
    formatters = shell.display_formatter.formatters
    for mime in ("image/png", "image/svg+xml", "image/jpeg", "application/pdf"):
        try:
            formatters[mime].lookup_by_type(figure_class)
            return
        except (KeyError, AttributeError):
            continue
    from IPython.core.pylabtools import select_figure_formats

    select_figure_formats(shell, {"png"})


def _figure(rows: int = 1, cols: int = 1, figsize=(4.6, 4.4), squeeze: bool = True):
    """(Figure, axes) as ``plt.subplots`` makes them, outside pyplot."""
    fig = _figure_class()(figsize=figsize)
    return fig, fig.subplots(rows, cols, squeeze=squeeze)


def _save(fig, path, return_figure: bool = False):
    """Write ``fig`` to ``path`` (unless None); return the path, or the Figure itself when
    ``path`` is None or ``return_figure``."""
    if path is not None:
        path = os.fspath(path)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig if path is None or return_figure else path


def roc_figure(curves: Mapping[str, tuple], path=None, title: str = "ROC",
               return_figure: bool = False):
    """ROC curves. ``curves``: {label: (fpr, tpr, auc)}; the AUC goes in the legend."""
    fig, ax = _figure(figsize=(4.6, 4.4))
    for label, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, lw=1.6, label=f"{label} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="0.6", lw=1)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false-positive rate",
           ylabel="true-positive rate", title=title)
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path, return_figure)


def tsne_embed(features: np.ndarray, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """2-D t-SNE of [N, D] features (openTSNE if installed, else scikit-learn)."""
    x = np.asarray(features, np.float64)
    perp = float(min(perplexity, max(2.0, (len(x) - 1) / 3.0)))
    try:
        from openTSNE import TSNE as OTSNE

        return np.asarray(OTSNE(perplexity=perp, random_state=seed, n_jobs=1).fit(x))
    except ImportError:
        pass
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        raise ImportError(f"t-SNE needs openTSNE or scikit-learn ({VIZ_HINT})") from None
    return TSNE(n_components=2, perplexity=perp, random_state=seed, init="pca").fit_transform(x)


def tsne_figure(features: np.ndarray, labels: Sequence, path=None, title: str = "t-SNE",
                seed: int = 0, class_names: Mapping | None = None,
                return_figure: bool = False):
    """Scatter of a t-SNE of the features, one colour per label value (paper Fig. 5)."""
    _figure_class()                 # matplotlib missing: say so before the t-SNE runs
    emb = tsne_embed(features, seed=seed)
    labels = np.asarray(labels)
    fig, ax = _figure(figsize=(4.8, 4.4))
    for k, v in enumerate(np.unique(labels)):
        sel = labels == v
        name = class_names.get(v, v) if class_names else v
        ax.scatter(emb[sel, 0], emb[sel, 1], s=9, alpha=0.75, color=f"C{k}",
                   label=f"{name} ({int(sel.sum())})")
    ax.set(title=title, xticks=[], yticks=[])
    ax.legend(fontsize=8, markerscale=1.5)
    return _save(fig, path, return_figure)


def _upsample(m: np.ndarray, size: int) -> np.ndarray:
    """[g, g] -> [size, size] by pixel repetition (a token's value covers its patch)."""
    r = size // m.shape[0]
    return np.kron(m, np.ones((r, r)))


def _image_grid(b: int):
    """A figure with b axes (at most 4 a row), every axis frame off; (fig, flat axes)."""
    cols = min(b, 4)
    rows = -(-b // cols)
    fig, axes = _figure(rows, cols, figsize=(2.3 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    return fig, axes.ravel()


def overlay_figure(images: np.ndarray, maps: np.ndarray, path=None,
                   titles: Sequence[str] | None = None, title: str = "", alpha: float = 0.45,
                   cmap: str = "jet", scale: str = "per_image",
                   colorbar_label: str | None = None, return_figure: bool = False):
    """Images with per-token maps ([B, g, g], e.g. Grad-CAM or restoration errors) laid
    over them, with a colour bar. ``scale="per_image"``: each map spans its own [min, max]
    (the bar reads 0 = the image's minimum, 1 = its maximum; for maps with no unit such as
    Grad-CAM); ``"shared"``: one scale in the maps' own units for every image (from the
    smallest to the largest value shown), so that images compare."""
    if scale not in ("per_image", "shared"):
        raise ValueError(f"scale must be 'per_image' or 'shared', got {scale!r}")
    b = len(images)
    maps = np.asarray(maps, np.float64)
    fig, axes = _image_grid(b)
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    if scale == "shared":
        lo, hi = float(maps.min()), float(maps.max())
        hi = hi if hi > lo else lo + 1e-12
    for i in range(b):
        ax = axes[i]
        m = maps[i]
        if scale == "per_image":
            m = (m - m.min()) / (m.max() - m.min() + 1e-12)
            vmin, vmax = 0.0, 1.0
        else:
            vmin, vmax = lo, hi
        ax.imshow(images[i], cmap="gray", vmin=0, vmax=255)
        ax.imshow(_upsample(m, images.shape[-1]), cmap=cmap, alpha=alpha, vmin=vmin, vmax=vmax)
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
    norm = Normalize(0.0, 1.0) if scale == "per_image" else Normalize(lo, hi)
    label = colorbar_label or ("relative, per image (0 = its minimum, 1 = its maximum)"
                               if scale == "per_image" else "map value")
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=colormaps[cmap]),
                       ax=list(axes), shrink=0.8, fraction=0.04, pad=0.02)
    bar.set_label(label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path, return_figure)


def grid_figure(columns: Mapping[str, np.ndarray], path=None, title: str = "",
                row_titles: Sequence[str] | None = None, return_figure: bool = False):
    """A grid, one column per entry of ``columns`` ({name: [B, S, S] images}), one row per
    image. uint8 inputs are shown on 0..255, float ones on their own range (per column,
    shared across rows so rows compare)."""
    names = list(columns)
    b = len(next(iter(columns.values())))
    fig, axes = _figure(b, len(names), figsize=(2.0 * len(names), 2.0 * b), squeeze=False)
    for j, name in enumerate(names):
        col = np.asarray(columns[name])
        if col.dtype == np.uint8:
            lo, hi = 0, 255
        else:
            lo, hi = np.percentile(col, 1), np.percentile(col, 99)
        for i in range(b):
            ax = axes[i, j]
            ax.imshow(col[i], cmap="gray", vmin=lo, vmax=hi)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=8)
            if j == 0 and row_titles is not None:
                ax.set_ylabel(row_titles[i], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path, return_figure)


def mask_figure(images: np.ndarray, truth: np.ndarray, pred: np.ndarray, path=None,
                title: str = "", titles: Sequence[str] | None = None,
                return_figure: bool = False):
    """Segmentation: image, ground-truth contour (green) and predicted mask (red)."""
    b = len(images)
    fig, axes = _image_grid(b)
    for i in range(b):
        ax = axes[i]
        ax.imshow(images[i], cmap="gray", vmin=0, vmax=255)
        p = np.ma.masked_where(pred[i] < 0.5, np.zeros_like(pred[i], float))  # red
        ax.imshow(p, cmap="autumn", alpha=0.45, vmin=0, vmax=1)
        if truth[i].any():
            ax.contour(truth[i].astype(float), levels=[0.5], colors="lime", linewidths=0.9)
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path, return_figure)
