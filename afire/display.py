"""How afire's objects show themselves in Jupyter (``_repr_html_``) and as plain text.

:class:`EvalResults` (what the ``afire.evaluate`` protocols return) and
:class:`PretrainSummary` (what ``afire.pretrain`` returns) are dicts (every key as before)
that render as small tables; ``Config`` and ``AFiRe`` get theirs from :func:`config_html`
and :func:`model_html`. Every string shown is HTML-escaped; large entries (arrays, the
evaluation's images, models) are left out of the tables.
"""
from __future__ import annotations

import html
import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

_STYLE = ("<style>.afire-t td,.afire-t th{text-align:left;padding:1px 8px;"
          "vertical-align:top}</style>")


def _esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def fmt(v: Any, digits: int = 4) -> str:
    """A value as short text: floats to ``digits`` significant places, NaN/None as n/a,
    mean/std dicts as ``mean ± std (n=k)``, short lists inline."""
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, numbers.Integral):
        return str(int(v))
    if isinstance(v, numbers.Real):
        f = float(v)
        return "n/a" if math.isnan(f) else f"{f:.{digits}g}"
    if isinstance(v, Mapping) and {"mean", "std"} <= set(v):
        n = v.get("n")
        return f"{fmt(v['mean'])} ± {fmt(v['std'], 2)}" + (f" (n={n})" if n is not None else "")
    if isinstance(v, (list, tuple)):
        parts = [fmt(x, digits) for x in v[:8]]
        return "[" + ", ".join(parts) + (", ...]" if len(v) > 8 else "]")
    if isinstance(v, Mapping):
        return ", ".join(f"{k}={fmt(x, digits)}" for k, x in v.items())
    return str(v)


def flat_rows(d: Mapping, prefix: str = "") -> list[tuple[str, str]]:
    """Nested metrics as (name, text) rows: ``squid / acc``; mean/std dicts stay one row."""
    rows: list[tuple[str, str]] = []
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping) and v and not ({"mean", "std"} <= set(v)):
            rows += flat_rows(v, name + " / ")
        else:
            rows.append((name, fmt(v)))
    return rows


def table(rows: Iterable[tuple[Any, Any]], head: tuple[str, str] | None = None) -> str:
    """An HTML table of (name, value) rows, both escaped."""
    h = (f"<tr><th>{_esc(head[0])}</th><th>{_esc(head[1])}</th></tr>" if head else "")
    body = "".join(f"<tr><td>{_esc(a)}</td><td>{_esc(b)}</td></tr>" for a, b in rows)
    return f'<table class="afire-t">{h}{body}</table>'


def _section(title: str, inner: str) -> str:
    return f"<p><b>{_esc(title)}</b></p>{inner}" if inner else ""


def _text_rows(rows: Iterable[tuple[Any, Any]]) -> str:
    rows = list(rows)
    w = max((len(str(a)) for a, _ in rows), default=0)
    return "\n".join(f"  {str(a):<{w}}  {b}" for a, b in rows)


# ---------------------------------------------------------------- evaluation results
# entries too large or not meant for a table (still in the dict)
_HIDDEN = ("arrays", "pool", "model", "sets", "folds", "runs", "adaptation")


class EvalResults(dict):
    """An evaluation protocol's results: the same dict as before (``results["metrics"]``,
    ``results["arrays"]`` ...), shown in Jupyter as tables of the metrics (thresholds
    included), the protocol and its settings, the data counts, notes and figure files.
    ``repr`` is a short text summary instead of every array."""

    def _metric_rows(self) -> list[tuple[str, str]]:
        rows = flat_rows(self.get("metrics", {}))
        return [(k, v) for k, v in rows if not k.endswith(" / label")]

    def _labels(self) -> list[tuple[str, str]]:
        """The metrics' own descriptions (e.g. which threshold an ACC uses)."""
        m = self.get("metrics", {})
        return [(k, v["label"]) for k, v in m.items() if isinstance(v, Mapping) and "label" in v]

    def _encoder(self) -> str:
        e = self.get("encoder") or {}
        if e.get("init_seed") is not None:       # the random baseline
            return f"{e.get('weights', 'random init')} (init_seed {e['init_seed']})"
        text = f"trained weights (step {e.get('pretrain_step', '?')})"
        return text + (f" of {e['checkpoint']}" if e.get("checkpoint") else "")

    def _counts(self) -> list[tuple[str, str]]:
        return [(k, fmt(v)) for k, v in (self.get("counts") or {}).items()]

    def __repr__(self) -> str:
        lines = [f"EvalResults({self.get('protocol', '?')}): {self._encoder()}"]
        rows = self._metric_rows()
        if rows:
            lines.append(_text_rows(rows))
        if self.get("figures"):
            lines.append("  figures: " + ", ".join(str(f) for f in self["figures"]))
        lines.append(f"  keys: {', '.join(self)}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        settings = self.get("settings") or {}
        parts = [_STYLE, f"<p><b>{_esc(self.get('protocol', 'evaluation'))}</b>: "
                 f"{_esc(self.get('description', ''))}<br>encoder: {_esc(self._encoder())}</p>",
                 table(self._metric_rows(), ("metric", "value"))]
        labels = self._labels()
        if labels:
            parts.append(_section("what the metrics mean", table(labels)))
        parts.append(_section("settings", table((k, fmt(v)) for k, v in settings.items())))
        parts.append(_section("images", table(self._counts())))
        notes = self.get("notes") or []
        if notes:
            parts.append(_section("notes", "<ul>" + "".join(f"<li>{_esc(n)}</li>"
                                                           for n in notes) + "</ul>"))
        figs = self.get("figures") or []
        if figs:
            parts.append(_section("figures", "<ul>" + "".join(f"<li>{_esc(f)}</li>"
                                                             for f in figs) + "</ul>"))
        return "".join(parts)


# ---------------------------------------------------------------- pre-training summary
_LOSSES = ("loss", "l_stru", "l_cate", "l_recon")


class PretrainSummary(dict):
    """What ``afire.pretrain`` returns: the same dict (``summary["steps"]``,
    ``summary["final"]`` ...), shown as a table of the run, its final losses and files."""

    def _rows(self) -> list[tuple[str, str]]:
        s = self
        rows = [("run", s.get("out")),
                ("preset / device", f"{s.get('preset')} / {s.get('device')}"),
                ("data", s.get("data")),
                ("steps", f"{s.get('steps')}/{s.get('total_steps')} ({s.get('stopped')}), "
                          f"{s.get('steps_this_run')} this run"
                          + (f", resumed from {s['resumed_from']}"
                             if s.get("resumed_from") is not None else "")),
                ("time", f"{fmt(s.get('seconds'))} s this run, {fmt(s.get('images_per_s'))} "
                         f"img/s ({s.get('images_seen')} images seen)")]
        final = s.get("final") or {}
        if final:
            rows.append((f"final losses (step {final.get('step')})",
                         ", ".join(f"{k} {fmt(final[k])}" for k in _LOSSES if k in final)))
        for k in ("checkpoint", "backbone", "report"):
            if s.get(k):
                rows.append((k, s[k]))
        if s.get("bad_files"):
            rows.append(("bad files", ", ".join(s["bad_files"])))
        return [(a, "" if b is None else b) for a, b in rows]

    def __repr__(self) -> str:
        return "PretrainSummary\n" + _text_rows(self._rows())

    def _repr_html_(self) -> str:
        return _STYLE + "<p><b>afire pretrain</b></p>" + table(self._rows())


# ---------------------------------------------------------------- Config and AFiRe
def config_html(cfg, base: Mapping | None = None) -> str:
    """A Config as a table: each field with its value; those that differ from ``base``
    (the preset's own defaults, as a dict) in bold: the overrides."""
    d = cfg.to_dict()
    rows = []
    for k, v in d.items():
        changed = base is not None and base.get(k) != v
        name, val = _esc(k), _esc(fmt(v))
        if changed:
            name, val = f"<b>{name}</b>", f"<b>{val}</b>"
        rows.append(f"<tr><td>{name}</td><td>{val}</td></tr>")
    head = (f"<p><b>afire.Config</b> preset {_esc(cfg.preset)}: {cfg.img_size} px, patch "
            f"{cfg.patch_size}, D={cfg.embed_dim}, depth {cfg.depth}, {cfg.objective} "
            f"objective; batch {cfg.batch_size}, peak lr {cfg.lr:.3g}"
            + (" (bold: differs from the preset)" if base is not None else "") + "</p>")
    return (_STYLE + head + "<details><summary>all fields</summary>"
            f'<table class="afire-t">{"".join(rows)}</table></details>')


def model_rows(model) -> list[tuple[str, str]]:
    c = model.cfg
    n = model.parameter_counts()
    return [("preset", f"{c.preset} ({c.img_size} px, patch {c.patch_size}, D={c.embed_dim}, "
                       f"depth {c.depth}, {c.num_heads} heads)"),
            ("parameters", f"{sum(n.values()):,} (" + ", ".join(f"{k} {v:,}" for k, v in
                                                                 n.items()) + ")"),
            ("step", f"{model.step} ({model.steps_per_epoch} steps/epoch x {c.epochs} epochs)"),
            ("device", model.device), ("batch capacity", str(model.batch_capacity))]


def model_html(model) -> str:
    return _STYLE + "<p><b>afire.AFiRe</b></p>" + table(model_rows(model))
