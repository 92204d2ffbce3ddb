"""Where dockyard keeps its state on this machine."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["dockyard_home", "index_path"]


def dockyard_home() -> Path:
    """``$DOCKYARD_HOME``, else ``~/.local/share/dockyard`` (not created here)."""
    raw = os.environ.get("DOCKYARD_HOME")
    return Path(raw).expanduser() if raw else Path.home() / ".local" / "share" / "dockyard"


def index_path(home: Path | None = None) -> Path:
    """The SQLite image index inside a home."""
    return (home or dockyard_home()) / "index.db"
