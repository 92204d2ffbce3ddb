"""dockyard: build-and-run engine for ML training jobs.

Top-level names are imported lazily (PEP 562): ``import dockyard`` costs only the standard
library, so the CLI's fast paths and code running inside training containers stay light.
"""

from __future__ import annotations

from ._lazy import lazy_exports

# Not `from typing import …`: typing alone costs ~10 ms, more than a whole cache hit.
TYPE_CHECKING = False

__version__ = "0.1.0"

# public name -> the private module that defines it
_EXPORTS = {
    "Environment": "._environment",
    "ContainerRegistry": "._environment",
    "DockerSection": "._environment",
    "PythonSection": "._environment",
    "DEFAULT_BASE_IMAGE": "._environment",
    "DockyardError": ".errors",
    # Azure ML's workflow names, also under dockyard.core.
    "Workspace": "._workflow",
    "Experiment": "._workflow",
    "ScriptRunConfig": "._workflow",
    "ComputeTarget": "._workflow",
    "Run": "._run",
}

__all__ = sorted([*_EXPORTS, "__version__"])

if TYPE_CHECKING:  # pragma: no cover
    from ._environment import DEFAULT_BASE_IMAGE, ContainerRegistry, DockerSection, Environment, PythonSection
    from ._run import Run
    from ._workflow import ComputeTarget, Experiment, ScriptRunConfig, Workspace
    from .errors import DockyardError


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
