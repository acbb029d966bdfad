"""Configuration: model sizes, the AFiRe objective, schedules. Validated at construction.

Defaults follow docs/METHOD.md; every place where the paper and the authors' released code
differ is an option here (`objective`, `token_rule`, `slm_size`, `warmup_epochs`, ...).

`precision` picks the arithmetic of the GPU trainer: "bf16" (default, the fast path: bf16
GEMM operands with fp32 accumulation, fp32 master weights, optimiser state, LayerNorm, softmax
and losses) or "fp32" (exact fp32 GEMMs, TF32 off: the path checked against the CPU). The CPU
trainer always computes in fp32 and ignores this field.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

# name: (img_size, patch, D, depth, heads, decoder D, decoder depth, decoder heads)
PRESETS: dict[str, tuple[int, int, int, int, int, int, int, int]] = {
    "vit_base": (224, 16, 768, 12, 12, 512, 8, 16),
    "vit_small": (224, 16, 384, 12, 6, 256, 4, 8),
    "vit_tiny": (224, 16, 192, 12, 3, 128, 2, 4),
    "test": (32, 8, 32, 2, 2, 32, 1, 2),
}


_INT_MAX = 2**31 - 1       # the C core reads every int field as a C int
_MAX_DIM = 65536           # the C core's bound on any single activation dimension
_MAX_LESIONS = 64          # AF_SLM_MAX_LESIONS (csrc/core/slm.h)
# int fields: inclusive [lo, hi]
_INT_RANGES: dict[str, tuple[int, int]] = {
    "img_size": (1, _INT_MAX), "patch_size": (1, _INT_MAX), "embed_dim": (4, _INT_MAX),
    "depth": (1, _INT_MAX), "num_heads": (1, _INT_MAX), "mlp_ratio": (1, _INT_MAX),
    "decoder_dim": (4, _INT_MAX), "decoder_depth": (1, _INT_MAX),
    "decoder_heads": (1, _INT_MAX), "num_prototypes": (2, _MAX_DIM),
    "head_hidden": (1, _MAX_DIM), "head_bottleneck": (1, _MAX_DIM), "slm_crop": (1, _INT_MAX),
    "sinkhorn_iters": (1, 10000), "teacher_temp_warmup_epochs": (0, _INT_MAX),
    "batch_size": (1, _INT_MAX), "epochs": (1, _INT_MAX), "warmup_epochs": (0, _INT_MAX),
    "freeze_last_layer_epochs": (0, _INT_MAX), "seed": (0, _INT_MAX),
}
# float fields: (lo, lo_open, hi, hi_open); every float must also be finite
_INF = math.inf
_FLOAT_RANGES: dict[str, tuple[float, bool, float, bool]] = {
    "slm_gamma2": (0.0, True, _INF, True), "slm_strength": (0.0, False, 1.0, False),
    "tau_student": (0.0, True, _INF, True), "tau_similarity": (0.0, True, _INF, True),
    "sinkhorn_eps": (0.0, True, _INF, True), "teacher_temp": (0.0, True, _INF, True),
    "teacher_temp_final": (0.0, True, _INF, True), "proto_momentum": (0.0, False, 1.0, False),
    "w_stru": (0.0, False, _INF, True), "w_cate": (0.0, False, _INF, True),
    "w_recon": (0.0, False, _INF, True), "w_abnormal": (0.0, False, _INF, True),
    "base_lr": (0.0, True, _INF, True), "min_lr": (0.0, False, _INF, True),
    "weight_decay": (0.0, False, _INF, True), "weight_decay_end": (0.0, False, _INF, True),
    "ema_momentum": (0.0, False, 1.0, False), "clip_grad": (0.0, False, _INF, True),
    "adam_eps": (0.0, True, _INF, True),
}
_CHOICES: dict[str, tuple[str, ...]] = {
    "token_rule": ("paper", "released"), "objective": ("paper", "released"),
    "stru_target": ("prototype", "teacher_token"),
    "clip_mode": ("per_tensor", "global"), "precision": ("bf16", "fp32"),
}


def _range_words(lo: float, lo_open: bool, hi: float, hi_open: bool) -> str:
    if hi == _INF:
        return f"{'>' if lo_open else '>='} {lo:g}"
    return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def _show(v: Any, limit: int = 60) -> str:
    """repr(v) cut to `limit` characters, so a hostile value cannot flood a message."""
    try:
        r = repr(v)
    except ValueError:  # an int past Python's str-conversion digit limit
        r = "<an integer with too many digits>"
    return r if len(r) <= limit else r[:limit - 3] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _coerce(name: str, typ: Any, v: Any) -> Any:
    """`v` as the plain Python type the field declares; TypeError naming the field."""
    typ = str(typ)  # annotations are strings here (from __future__ import annotations)
    if typ == "int":
        if not _is_int(v):
            raise TypeError(f"Config: {name}={_show(v)}: must be an int, got {type(v).__name__}")
        return int(v)
    if typ == "float":
        if not isinstance(v, numbers.Real) or isinstance(v, bool):
            raise TypeError(f"Config: {name}={_show(v)}: must be a number, got {type(v).__name__}")
        return float(v)
    if typ == "bool":
        if not isinstance(v, (bool, np.bool_)):
            raise TypeError(f"Config: {name}={_show(v)}: must be True or False")
        return bool(v)
    if typ == "str":
        if not isinstance(v, str):
            raise TypeError(f"Config: {name}={_show(v)}: must be a str, got {type(v).__name__}")
        return v
    if typ.startswith("tuple["):
        item = "int" if "int" in typ else "float"
        if isinstance(v, (str, bytes)) or not hasattr(v, "__len__") or len(v) != 2:
            raise TypeError(f"Config: {name}={_show(v)}: must be a pair of {item}s")
        return tuple(_coerce(f"{name}[{i}]", item, x) for i, x in enumerate(v))
    if typ.startswith("dict"):
        if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
            raise TypeError(f"Config: {name}={_show(v)}: must be a dict with str keys")
        try:
            json.dumps(v)
        except (TypeError, ValueError) as e:
            raise TypeError(f"Config: {name}={_show(v)}: must hold JSON values only "
                            f"({e})") from None
        return v
    return v


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _parse_override(key: str, typ: Any, raw: str) -> Any:
    """One command-line value as the field's type; ValueError naming `key` on failure."""
    typ = str(typ)

    def bad(what: str) -> ValueError:
        shown = raw if len(raw) <= 60 else raw[:57] + "..."
        return ValueError(f"{key}={shown}: must be {what}")

    def number(text: str, kind: str) -> Any:
        t = text.strip()
        if kind == "int":
            try:
                return int(t)
            except ValueError:
                if t.lstrip("+-").isdigit():  # past Python's digit limit for int()
                    raise bad("an integer < 2^31") from None
                try:
                    f = float(t)  # 1e3, 64.0
                except ValueError:
                    raise bad("an integer") from None
                if not f.is_integer():
                    raise bad("an integer") from None
                return int(f)
        try:
            return float(t)  # also inf / nan: the range check then names the field
        except ValueError:
            raise bad("a number") from None

    if typ in ("int", "float"):
        return number(raw, typ)
    if typ == "bool":
        low = raw.lower()
        if low in _TRUE or low in _FALSE:
            return low in _TRUE
        raise bad("true or false")
    if typ == "str":
        if len(raw) >= 2 and raw[0] == raw[-1] == '"':
            try:
                return json.loads(raw)
            except json.JSONDecodeError:
                pass
        return raw
    if typ.startswith("tuple["):
        kind = "int" if "int" in typ else "float"
        text = raw[1:-1] if raw[:1] in "[(" and raw[-1:] in "])" else raw
        parts = text.split(",")
        if len(parts) != 2 or not all(p.strip() for p in parts):
            raise bad(f"a pair of {kind}s such as 8,16 or [8,16]")
        return tuple(number(p, kind) for p in parts)
    if typ.startswith("dict"):
        try:
            val = json.loads(raw)
        except json.JSONDecodeError as e:
            raise bad(f"a JSON object ({e})") from None
        if not isinstance(val, dict):
            raise bad("a JSON object")
        return val
    return raw


@dataclass
class Config:
    # --- networks (METHOD §2, §7)
    preset: str = "vit_base"
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 1
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: int = 4
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    num_prototypes: int = 256          # K
    head_hidden: int = 1024
    head_bottleneck: int = 256
    per_position_last_layer: bool = True
    per_position_mask_token: bool = True
    learned_pos_embed: bool = False
    # --- synthetic lesion masks (METHOD §1)
    slm_lesions: tuple[int, int] = (1, 4)
    slm_size: tuple[int, int] = (16, 64)       # released code: (16, 128)
    slm_crop: int = 60
    slm_gamma2: float = 0.5
    slm_strength: float = 0.5
    token_rule: str = "paper"                  # or "released"
    # --- objective (METHOD §3, §4)
    objective: str = "paper"                   # or "released"
    tau_student: float = 0.1
    tau_similarity: float = 0.1
    sinkhorn_iters: int = 3
    sinkhorn_eps: float = 0.05                 # released objective's fixed epsilon
    teacher_temp: float = 0.04                 # paper: warms up to teacher_temp_final
    teacher_temp_final: float = 0.07
    teacher_temp_warmup_epochs: int = 30
    proto_momentum: float = 0.75
    # Target of the structure term. "prototype": Eq. 12 of the paper (default). NOT IN THE
    # PAPER, "teacher_token": each normal student token against the teacher's distributions
    # at the same position in every image of the batch, its own image's the positive (an
    # InfoNCE over images, f of Eq. 12; objective.h af_stru_token_loss): Eq. 12's prototypes
    # depend on the position only, so the position embedding solves it (docs/RESULTS.md,
    # structure consistency §5). Paper objective only.
    stru_target: str = "prototype"
    w_stru: float = 1.0
    w_cate: float = 1.0
    w_recon: float = 1.0
    w_abnormal: float = 2.0
    # --- optimisation (METHOD §5)
    batch_size: int = 64
    epochs: int = 400
    base_lr: float = 5e-4                      # scaled by batch_size / 256
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    ema_momentum: float = 0.996
    clip_grad: float = 3.0
    clip_mode: str = "per_tensor"              # or "global"
    freeze_last_layer_epochs: int = 1
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    seed: int = 0
    # --- arithmetic of the GPU trainer (the CPU always runs fp32 and ignores it)
    precision: str = "bf16"                    # or "fp32"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def preset_config(cls, name: str, **overrides: Any) -> "Config":
        """A named model size (vit_base, vit_small, vit_tiny, test) with optional overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        s, p, d, depth, h, dd, ddepth, dh = PRESETS[name]
        base = dict(preset=name, img_size=s, patch_size=p, embed_dim=d, depth=depth,
                    num_heads=h, decoder_dim=dd, decoder_depth=ddepth, decoder_heads=dh)
        if name == "test":
            base.update(num_prototypes=16, head_hidden=32, head_bottleneck=16,
                        slm_size=(4, 16), slm_crop=16, batch_size=4)
        base.update(overrides)
        return cls(**base)

    # the documented spelling in ARCHITECTURE.md
    preset_of = preset_config

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def lr(self) -> float:
        """Peak learning rate: base_lr * batch_size / 256 (METHOD §5)."""
        return self.base_lr * self.batch_size / 256

    def validate(self) -> None:
        """Check every field (type, finiteness, range) and the cross-field rules; raise
        TypeError/ValueError naming the field. ints/floats given as other numeric types and
        pairs given as lists are normalised in place (so the C trainer reads plain values)."""
        for f in fields(self):
            setattr(self, f.name, _coerce(f.name, f.type, getattr(self, f.name)))

        def need(cond: bool, name: str, what: str) -> None:
            if not cond:
                raise ValueError(f"Config: {name}={_show(getattr(self, name))}: {what}")

        for name, (lo, hi) in _INT_RANGES.items():
            v = getattr(self, name)
            need(lo <= v <= hi, name, f"must be an integer in [{lo}, {hi}]" if hi < _INT_MAX
                 else f"must be an integer >= {lo}" if v < lo else "must be < 2^31 (a C int)")
        for name, (lo, lo_open, hi, hi_open) in _FLOAT_RANGES.items():
            v = getattr(self, name)
            ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (
                v < hi if hi_open else v <= hi)
            need(ok, name, f"must be a finite number {_range_words(lo, lo_open, hi, hi_open)}")
        for name, choices in _CHOICES.items():
            need(getattr(self, name) in choices, name,
                 "must be " + " or ".join(repr(c) for c in choices))
        need(self.in_chans in (1, 3), "in_chans", "must be 1 (grayscale) or 3")
        need(all(math.isfinite(b) and 0.0 <= b < 1.0 for b in self.adam_betas), "adam_betas",
             "both betas must be finite numbers in [0, 1)")

        # cross-field rules (METHOD §1-§2 and the C core's size limits)
        need(self.img_size % self.patch_size == 0, "img_size",
             f"must be divisible by patch_size {self.patch_size}")
        grid = self.img_size // self.patch_size
        need(grid * grid <= _MAX_DIM, "img_size", f"gives {grid * grid} patches of side "
             f"{self.patch_size}; at most {_MAX_DIM} are supported")
        need(self.patch_size ** 2 * self.in_chans <= _MAX_DIM, "patch_size",
             f"patch_size^2 * in_chans must be <= {_MAX_DIM}")
        for dim, heads in (("embed_dim", "num_heads"), ("decoder_dim", "decoder_heads")):
            need(getattr(self, dim) % getattr(self, heads) == 0, dim,
                 f"must be divisible by {heads} {getattr(self, heads)}")
            need(getattr(self, dim) % 4 == 0, dim,
                 "must be divisible by 4 (2-D sin-cos position embedding)")
        need(self.mlp_ratio * max(self.embed_dim, self.decoder_dim) <= _MAX_DIM, "mlp_ratio",
             f"mlp_ratio * max(embed_dim, decoder_dim) must be <= {_MAX_DIM}")
        lo, hi = self.slm_lesions
        need(1 <= lo <= hi <= _MAX_LESIONS, "slm_lesions",
             f"need integers 1 <= lo <= hi <= {_MAX_LESIONS}")
        lo, hi = self.slm_size
        need(1 <= lo <= hi, "slm_size", "need integers 1 <= lo <= hi")
        need(hi <= self.img_size, "slm_size",
             f"the largest lesion side must be <= img_size {self.img_size}")
        need(self.slm_crop <= self.img_size, "slm_crop", f"must be <= img_size {self.img_size}")
        need(self.stru_target == "prototype" or self.objective == "paper", "stru_target",
             "'teacher_token' replaces Eq. 12 of the paper objective; the released objective "
             "has no such term (use 'prototype')")

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)

    def with_overrides(self, items: list[str]) -> "Config":
        """Apply command-line ``key=value`` strings, each value parsed to the field's type
        (numbers, ``true``/``false``, pairs as ``8,16`` or ``[8,16]``, JSON for ``extra``).
        Raises ValueError naming the key, e.g. ``base_lr=inf: must be a finite number > 0``."""
        if isinstance(items, str):
            raise TypeError("with_overrides takes a list of 'key=value' strings, got one str")
        known = {f.name: f for f in fields(self)}
        changes: dict[str, Any] = {}
        for item in items:
            if not isinstance(item, str) or "=" not in item:
                raise ValueError(f"override {item!r} must look like key=value")
            key, raw = item.split("=", 1)
            key = key.strip()
            if key not in known:
                raise ValueError(f"unknown config key {key!r}; known keys: "
                                 f"{', '.join(sorted(known))}")
            changes[key] = _parse_override(key, known[key].type, raw.strip())
        try:
            return self.replace(**changes)
        except TypeError as e:  # a command-line value is a bad value, not a bad type
            raise ValueError(str(e)) from None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        known = {f.name: f for f in fields(cls)}
        unknown = set(d) - set(known)
        if unknown:
            raise ValueError(f"Config: unknown keys {sorted(unknown)}")
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        return cls(**kw)

    @classmethod
    def from_json(cls, s: str) -> "Config":
        return cls.from_dict(json.loads(s))

    def _repr_html_(self) -> str:
        """Jupyter's view: a one-line summary and every field, overrides in bold."""
        from .display import config_html

        try:
            preset = Config.preset_config(self.preset).to_dict() if self.preset in PRESETS \
                else None
        except (TypeError, ValueError):
            preset = None
        return config_html(self, preset)
