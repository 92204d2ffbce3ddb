"""Where dockyard keeps its state on this machine: the *home* and what lives in it.

"home" always means this folder (``$DOCKYARD_HOME``); a workspace's own folder is a
*workspace folder* (``<home>/workspaces/<name>``), never a home::

    <home>/index.db            the image index (dockyard.cache)
    <home>/gpus.db             GPU leases, shared by every workspace
    <home>/snapshots/          content-addressed source snapshots, shared
    <home>/agent.lock|pid|log  the one agent of this machine
    <home>/workspaces/<name>/  runs.db and runs/<run id>/ of one workspace
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["WORKSPACES", "dockyard_home", "index_path", "workspace_folders"]

#: The folder of workspaces inside a home.
WORKSPACES = "workspaces"


def dockyard_home() -> Path:
    """``$DOCKYARD_HOME``, else ``~/.local/share/dockyard`` (not created here)."""
    raw = os.environ.get("DOCKYARD_HOME")
    return Path(raw).expanduser() if raw else Path.home() / ".local" / "share" / "dockyard"


def index_path(home: Path | None = None) -> Path:
    """The SQLite image index inside a home."""
    return (home or dockyard_home()) / "index.db"


def workspace_folders(home: Path) -> list[Path]:
    """Every workspace folder under ``home`` that holds a run store, by name."""
    root = Path(home) / WORKSPACES
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return []
    return [root / name for name in names if os.path.exists(root / name / "runs.db")]
