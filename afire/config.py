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
from dataclasses import dataclass, field, fields
from typing import Any

# name: (img_size, patch, D, depth, heads, decoder D, decoder depth, decoder heads)
PRESETS: dict[str, tuple[int, int, int, int, int, int, int, int]] = {
    "vit_base": (224, 16, 768, 12, 12, 512, 8, 16),
    "vit_small": (224, 16, 384, 12, 6, 256, 4, 8),
    "vit_tiny": (224, 16, 192, 12, 3, 128, 2, 4),
    "test": (32, 8, 32, 2, 2, 32, 1, 2),
}


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
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"Config: {msg}")

        for f in fields(self):
            v = getattr(self, f.name)
            if f.type in ("int", int) and (not isinstance(v, int) or isinstance(v, bool)):
                raise TypeError(f"Config.{f.name} must be an int, got {v!r}")
        need(self.img_size > 0 and self.patch_size > 0, "img_size and patch_size must be > 0")
        need(self.img_size % self.patch_size == 0,
             f"img_size {self.img_size} must be divisible by patch_size {self.patch_size}")
        need(self.in_chans in (1, 3), f"in_chans must be 1 or 3, got {self.in_chans}")
        need(self.embed_dim % self.num_heads == 0, "embed_dim must be divisible by num_heads")
        need(self.embed_dim % 4 == 0, "embed_dim must be divisible by 4 (sin-cos embedding)")
        need(self.decoder_dim % self.decoder_heads == 0,
             "decoder_dim must be divisible by decoder_heads")
        need(self.decoder_dim % 4 == 0, "decoder_dim must be divisible by 4")
        need(self.depth >= 1 and self.decoder_depth >= 1, "depth and decoder_depth must be >= 1")
        need(self.num_prototypes >= 2, "num_prototypes must be >= 2")
        lo, hi = self.slm_lesions
        need(1 <= lo <= hi, f"slm_lesions must satisfy 1 <= lo <= hi, got {self.slm_lesions}")
        lo, hi = self.slm_size
        need(1 <= lo <= hi, f"slm_size must satisfy 1 <= lo <= hi, got {self.slm_size}")
        need(self.token_rule in ("paper", "released"), "token_rule must be 'paper' or 'released'")
        need(self.objective in ("paper", "released"), "objective must be 'paper' or 'released'")
        need(self.clip_mode in ("per_tensor", "global"),
             "clip_mode must be 'per_tensor' or 'global'")
        need(self.precision in ("bf16", "fp32"),
             f"precision must be 'bf16' or 'fp32', got {self.precision!r}")
        need(self.batch_size >= 1, "batch_size must be >= 1")
        need(self.epochs >= 1, "epochs must be >= 1")
        need(0.0 <= self.ema_momentum <= 1.0, "ema_momentum must be in [0, 1]")
        need(0.0 <= self.proto_momentum <= 1.0, "proto_momentum must be in [0, 1]")
        for name in ("tau_student", "tau_similarity", "sinkhorn_eps", "teacher_temp",
                     "teacher_temp_final", "adam_eps"):
            need(getattr(self, name) > 0, f"{name} must be > 0")
        for name in ("w_stru", "w_cate", "w_recon", "w_abnormal", "base_lr", "min_lr",
                     "weight_decay", "weight_decay_end", "clip_grad"):
            v = getattr(self, name)
            need(v == v and v >= 0, f"{name} must be >= 0 and not NaN, got {v}")

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)

    def with_overrides(self, items: list[str]) -> "Config":
        """Apply command-line `key=value` strings (values parsed as JSON when possible)."""
        known = {f.name: f for f in fields(self)}
        changes: dict[str, Any] = {}
        for item in items:
            if "=" not in item:
                raise ValueError(f"override {item!r} must look like key=value")
            key, raw = item.split("=", 1)
            if key not in known:
                raise ValueError(f"unknown config key {key!r}")
            try:
                val: Any = json.loads(raw)
            except json.JSONDecodeError:
                val = raw
            cur = getattr(self, key)
            if isinstance(cur, tuple):
                val = tuple(val)
            elif isinstance(cur, float) and isinstance(val, int):
                val = float(val)
            changes[key] = val
        return self.replace(**changes)

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
