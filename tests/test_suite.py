"""The test suite's own machinery, as `make test` runs it."""

from __future__ import annotations

import pytest


@pytest.mark.xdist_group("processes")
def test_xdist_groups_take_effect(request):
    """`make test` relies on `--dist loadgroup` sending each `xdist_group`'s tests to one worker (the multi-process
    tests one after another). pytest 9.2 with pytest-xdist 3.8 ignored the groups without a word: xdist tags a
    grouped test by rewriting ``item._nodeid``, which pytest 9 no longer reads (hence `pytest<9`)."""
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("runs under `pytest -n N --dist loadgroup` (make test)")
    assert request.node.nodeid.endswith("@processes"), request.node.nodeid
