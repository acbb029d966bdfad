"""Shared pytest setup: the real-data location and visible skips."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def data_root() -> Path:
    """Real chest X-ray data: $AFIRE_DATA, else ../shared/data beside the repository."""
    return Path(os.environ.get("AFIRE_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def kermany_dir() -> Path:
    d = data_root() / "kermany_native"
    if not (d / "labels.csv").exists():
        pytest.skip(f"real data not found at {d} (set AFIRE_DATA to the shared data folder)")
    return d
