"""Test tiers: tests/unit needs nothing; tests marked ``engine`` need a real Docker Engine.

Where no engine answers, engine tests skip with the reason printed, unless
``DOCKYARD_REQUIRE_ENGINE=1`` (set by the README's test command, hence in CI): then they FAIL,
so a broken engine set-up can never pass as "skipped".
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # shipped test helpers: `from helpers import ...`


def _engine_problem() -> str | None:
    from dockyard.dockerd import EngineClient
    from dockyard.errors import DockyardError

    try:
        EngineClient.from_env().ping()
    except DockyardError as exc:
        return str(exc)
    return None


_PROBLEM: list[str | None] = []


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("engine") is None:
        return
    if not _PROBLEM:
        _PROBLEM.append(_engine_problem())
    problem = _PROBLEM[0]
    if problem is None:
        return
    if os.environ.get("DOCKYARD_REQUIRE_ENGINE") == "1":
        pytest.fail(f"DOCKYARD_REQUIRE_ENGINE=1 but no engine: {problem}", pytrace=False)
    pytest.skip(f"no Docker Engine here ({problem}); run ./scripts/test to set one up")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private DOCKYARD_HOME for one test."""
    path = tmp_path / "home"
    monkeypatch.setenv("DOCKYARD_HOME", str(path))
    return path


@pytest.fixture
def workspace(home: Path):
    """A workspace of its own under a private home; the home's agent is stopped afterwards."""
    from dockyard import Workspace
    from dockyard.compute import stop_agent

    yield Workspace(f"w{uuid.uuid4().hex[:6]}", home=home)
    stop_agent(home)


@pytest.fixture
def engine_resources():
    """Track images/containers a test makes; remove them afterwards even when the test fails."""
    from helpers.engine import EngineResources

    res = EngineResources(prefix=f"dockyard-test-{uuid.uuid4().hex[:8]}")
    try:
        yield res
    finally:
        res.cleanup()
