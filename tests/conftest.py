"""Shared fixtures: the offline micro pipelines (built once per session) and an offline environment."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(items):
    """Slow tests first (stable order otherwise): with several workers (`make test` runs two), a minutes-long
    test started last would finish alone while the other worker idles."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def micro_sd():
    from slimsd.models.micro import build_micro

    return build_micro("micro-sd")


@pytest.fixture(scope="session")
def micro_sdxl():
    from slimsd.models.micro import build_micro

    return build_micro("micro-sdxl")
