"""Reading foreign ViT encoder weights (timm, DINO, MAE, the released AFiRe code) without torch."""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from . import _C

# Wrapper keys seen in published checkpoints, tried in this order (DINO/AFiRe: teacher).
_CONTAINERS = ("teacher", "model", "state_dict", "student", "module")
_PREFIXES = ("module.", "backbone.", "encoder.", "model.")


def _flatten(d: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: v for k, v in d.items() if isinstance(v, np.ndarray)}


def _pick_state(obj: Any, path: str) -> dict[str, np.ndarray]:
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    if any(isinstance(v, np.ndarray) for v in obj.values()) and "patch_embed.proj.weight" in \
            {_strip(k) for k in obj}:
        return _flatten(obj)
    for key in _CONTAINERS:
        if isinstance(obj.get(key), dict):
            return _pick_state(obj[key], path)
    sd = _flatten(obj)
    if not sd:
        raise ValueError(f"{path}: no tensors found (top-level keys: {sorted(obj)[:8]})")
    return sd


def _strip(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
    return name


def load_encoder_state(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """timm-named encoder tensors from a .safetensors or PyTorch .pth/.pt file."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        raw: Any = _C.io.load_safetensors(path)[0]
    else:
        from .torch_pickle import load_torch_checkpoint

        raw = load_torch_checkpoint(path)
    sd = {_strip(k): v for k, v in _pick_state(raw, path).items()}
    return {k: v for k, v in sd.items() if not k.startswith(("head.", "decoder", "fc_norm"))
            and k != "mask_token"}
