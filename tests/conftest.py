"""Shared fixtures: the offline micro pipelines (built once per session) and an offline environment."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def micro_sd():
    from slimsd.models.micro import build_micro

    return build_micro("micro-sd")


@pytest.fixture(scope="session")
def micro_sdxl():
    from slimsd.models.micro import build_micro

    return build_micro("micro-sdxl")
