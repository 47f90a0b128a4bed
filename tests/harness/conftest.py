"""Fixtures of the harness tests. `micro_world` builds the real micro world once per test session (~2-5 min)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def micro_world(tmp_path_factory):
    """The default micro world (seed 0, default sizes), built from nothing into a session temp folder."""
    from harness.micro import build_micro_world

    return build_micro_world(tmp_path_factory.mktemp("micro") / "world", seed=0, progress=False)
