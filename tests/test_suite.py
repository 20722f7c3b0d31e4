"""The test suite's own machinery, as `make test` runs it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest


@pytest.mark.xdist_group("processes")
def test_xdist_groups_take_effect(request):
    """`make test` relies on `--dist loadgroup` sending each `xdist_group`'s tests to one worker (the multi-process
    tests one after another). pytest 9.2 with pytest-xdist 3.8 ignored the groups without a word: xdist tags a
    grouped test by rewriting ``item._nodeid``, which pytest 9 no longer reads (hence `pytest<9`)."""
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("runs under `pytest -n N --dist loadgroup` (make test)")
    assert request.node.nodeid.endswith("@processes"), request.node.nodeid


SKIPPING = """
import pytest

def test_passes():
    pass

def test_a_tool_is_missing():
    pytest.skip("needs a tool")

@pytest.mark.gpu
def test_on_a_gpu():
    pytest.skip("no CUDA")

@pytest.mark.xfail(reason="known")
def test_known_bug():
    assert False
"""


def outcomes(tmp_path, env: dict) -> dict[str, str]:
    """Run the suite's conftest (copied) over SKIPPING in a fresh pytest; test name -> outcome."""
    shutil.copy(Path(__file__).parent / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_skipping.py").write_text(SKIPPING)
    (tmp_path / "test_whole_module.py").write_text("import pytest\npytest.importorskip('no_such_module')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "SLIMSD_NO_SKIPS")} | env
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rA",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:xdist",
            "--continue-on-collection-errors",
            f"--junitxml={tmp_path / 'report.xml'}",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    found = {}
    for case in ElementTree.parse(tmp_path / "report.xml").iter("testcase"):
        kinds = {child.tag: child.get("type", "") for child in case}
        outcome = (
            "XFAIL"
            if kinds.get("skipped") == "pytest.xfail"
            else "SKIPPED"
            if "skipped" in kinds
            else "PASSED"
        )
        outcome = "FAILED" if "failure" in kinds else "ERROR" if "error" in kinds else outcome
        found[case.get("name") or case.get("classname")] = outcome
    assert found, proc.stdout
    return found


def test_a_skip_fails_under_make_test_and_on_ci_unless_it_is_a_gpu_test_without_cuda(tmp_path):
    import torch

    gpu = "FAILED" if torch.cuda.is_available() else "SKIPPED"  # a GPU machine must run the gpu tests
    strict = {"test_passes": "PASSED", "test_a_tool_is_missing": "FAILED", "test_on_a_gpu": gpu}
    strict |= {"test_known_bug": "XFAIL", "test_whole_module": "ERROR"}
    for env in ({"SLIMSD_NO_SKIPS": "1"}, {"CI": "true"}):
        assert outcomes(tmp_path, env) == strict, env
    loose = strict | {
        "test_a_tool_is_missing": "SKIPPED",
        "test_on_a_gpu": "SKIPPED",
        "test_whole_module": "SKIPPED",
    }
    assert outcomes(tmp_path, {}) == loose  # a developer's plain pytest run may skip
