"""Shared fixtures: the offline micro pipelines (built once per session) and an offline environment."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def expected_seconds(item) -> float:
    """`@pytest.mark.slow(seconds=N)`: about how long a test takes alone on the 2-core dev machine; other slow
    tests count as 10 s, fast ones as 0."""
    slow = item.get_closest_marker("slow")
    return 0.0 if slow is None else slow.kwargs.get("seconds", 10.0)


def pytest_collection_modifyitems(items):
    """Longest tests first (stable order otherwise): with several workers (`make test` runs two, each handed the
    next test when it is free), a minutes-long test started last would finish alone while the other idles.
    `make test` runs with `--dist loadgroup`: the tests marked `xdist_group("processes")` (each starts two
    training processes) go to one worker, one after another, so that at most two ranks share the cores with the
    other worker's test (a ZeRO test takes ~60 s alone and ~140 s beside the demo's claim test). The groups need
    pytest < 9 (tests/test_suite.py)."""
    items.sort(key=lambda item: -expected_seconds(item))


@pytest.fixture(params=["fp32", "bf16"])
def cpu_default(request, monkeypatch):
    """Runs a dtype-sensitive test under both CPU defaults (SLIMSD_CPU_DTYPE), whatever this CPU's own: an
    AVX2-only machine checks the bf16 path too (slowly, emulated), a bf16 machine the fp32 one."""
    monkeypatch.setenv("SLIMSD_CPU_DTYPE", request.param)
    return request.param


@pytest.fixture(scope="session")
def micro_sd():
    from slimsd.models.micro import build_micro

    return build_micro("micro-sd")


@pytest.fixture(scope="session")
def micro_sdxl():
    from slimsd.models.micro import build_micro

    return build_micro("micro-sdxl")


# --- A skipped test is not a passing test ----------------------------------------------------------------------
# Under `make test` (SLIMSD_NO_SKIPS=1) and on CI (CI=true) a skip fails the test, with its reason, so that a
# missing DeepSpeed, Chromium or Playwright cannot turn CI green with the tests that need them not run. The one
# allowed skip: a `gpu`-marked test on a machine without CUDA (or with fewer GPUs than its `gpu(count=N)`).
# (Self-contained: its own hooks, no shared state.)


def _skips_fail() -> bool:
    return os.environ.get("SLIMSD_NO_SKIPS") == "1" or os.environ.get("CI", "").lower() == "true"


def _skip_allowed(item) -> bool:
    """A `gpu` test on a machine with fewer CUDA devices than it needs (`gpu(count=N)`, default 1)."""
    marker = None if item is None else item.get_closest_marker("gpu")
    if marker is None:
        return False
    import torch

    return torch.cuda.device_count() < marker.kwargs.get("count", 1)


def _fail_the_skip(report, item) -> None:
    if report.skipped and not hasattr(report, "wasxfail") and _skips_fail() and not _skip_allowed(item):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (
            f"skipped, and a skip is a failure under make test / CI (only gpu tests may skip without CUDA): "
            f"{reason}"
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_the_skip(outcome.get_result(), item)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_the_skip(outcome.get_result(), None)  # a whole module skipped (importorskip at import)
