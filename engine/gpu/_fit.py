"""Refusing at submit a GPU request this machine can never serve, with the reason."""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import InputError
from ._discovery import inventory
from ._sched import GpuRequest, Topology

__all__ = ["check_fits"]


def check_fits(request: GpuRequest, environ: Mapping[str, str] | None = None) -> None:
    """Raise unless this machine's GPUs (NVML or declared virtual ones) could ever serve ``request``.

    Raises:
        InputError: no GPUs at all, or never enough that match (e.g. "needs 2 GPUs; this machine has 1").
    """
    found = inventory(environ)
    if not found.gpus:
        raise InputError(f"the run asks for {request.count} GPU(s) but this machine has none ({found.reason})",
                         hint="run with gpus=0, or declare virtual GPUs for development (DOCKYARD_GPUS=N)")
    reason = request.fits_ever(Topology.from_dict(found.topology_dict()))
    if reason:
        raise InputError(f"the run can never start here: {reason}", hint="ask for fewer GPUs or relax the filters")
