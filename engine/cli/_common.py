"""What the ``dockyard run`` command prints, written once for the two places that print it: the
click command in this process, and the agent's front door on behalf of a client (no click here)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import DockyardError

if TYPE_CHECKING:  # pragma: no cover
    from .. import Run, Workspace

__all__ = ["detached_line", "finish_run", "fmt", "run_by_id", "submitted_line", "workspace_named"]

Write = Callable[[str], None]


def workspace_named(name: str | None, *, cwd: str | None = None, home: Path | None = None) -> Workspace:
    """The workspace ``--workspace`` names, else the one config.json above ``cwd`` names, else ``default``."""
    from .. import Workspace

    if name:
        return Workspace(name, home=home)
    try:
        found = Workspace.from_config(cwd)
    except DockyardError:
        return Workspace("default", home=home)
    return found


def run_by_id(run_id: str, name: str | None) -> Run:
    """The run ``run_id``: in the workspace ``name`` (or the one config.json names), else — when
    no workspace was named — in whichever workspace of the home holds it (run ids are unique).

    Raises:
        RunNotFound: no workspace of the home has it (the hint says which workspaces were looked in).
    """
    from .. import Workspace
    from .._home import workspace_folders
    from ..errors import RunNotFound

    ws = workspace_named(name)
    try:
        return ws.get_run(run_id)
    except RunNotFound:
        if name:
            raise
    looked = []
    for folder in workspace_folders(ws.home):
        if folder.name == ws.name:
            continue
        looked.append(folder.name)
        other = Workspace(folder.name, home=ws.home)
        try:
            return other.get_run(run_id)
        except RunNotFound:
            continue
        except DockyardError:
            continue  # a damaged store elsewhere must not hide the run (doctor reports it)
    searched = ", ".join([ws.name, *looked])
    raise RunNotFound(f"no run with id {run_id!r} in any workspace of {ws.home}",
                      hint=f"looked in: {searched}; list runs with `dockyard runs ls --workspace NAME`")


def fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def submitted_line(run_id: str) -> str:
    return f"submitted {run_id}; follow it with `dockyard runs logs -f {run_id}`\n"


def detached_line(run_id: str) -> str:
    return f"\ndetached from {run_id}; it keeps running (dockyard runs logs -f {run_id})\n"


def finish_run(run: Run, as_json: bool, out: Write, err: Write) -> int:
    """After a run ended: its JSON document, or its metrics and why it did not complete.

    Returns the command's exit code: 0 when the run Completed, else 1.
    """
    doc = run.to_json()
    if as_json:
        out(json.dumps(doc) + "\n")
    else:
        for name, values in doc["metrics"].items():
            out(f"{name:<20} {fmt(values[-1])}  ({len(values)} value{'s' if len(values) != 1 else ''})\n")
        if doc["status"] != "Completed":
            err(f"{run.id} {doc['status']}: {doc['reason']}\n")
    return 0 if doc["status"] == "Completed" else 1


def resolve(cwd: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(cwd, path)
