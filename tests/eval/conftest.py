"""The evaluation suite runs only when asked for (``pytest -m eval``): it takes minutes."""
import pytest


def pytest_collection_modifyitems(config, items):
    if "eval" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="evaluation suite (minutes): run with `pytest -m eval`")
    for item in items:
        if "eval" in item.keywords:
            item.add_marker(skip)
