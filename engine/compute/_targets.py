"""The implicit compute target and its capacity (light: the facade imports it on every submit)."""

from __future__ import annotations

import os

__all__ = ["LOCAL_COMPUTE", "default_max_nodes"]

#: The compute target every workspace has: this machine, up to ``DOCKYARD_LOCAL_MAX_RUNS`` runs at once.
LOCAL_COMPUTE = "local"


def default_max_nodes() -> int:
    """Runs the implicit ``local`` compute target executes at once (``DOCKYARD_LOCAL_MAX_RUNS``)."""
    raw = os.environ.get("DOCKYARD_LOCAL_MAX_RUNS")
    return max(1, int(raw)) if raw and raw.isdigit() else max(1, os.cpu_count() or 1)
