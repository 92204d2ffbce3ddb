"""What a run's container is started with, written once for every backend that starts one (this
machine's, and a cluster node's): its variables, mounts, GPUs and limits."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from .._environment import Environment
from ..launch import BindMount, LaunchSpec
from ..runs import CONTAINER_LIB, CONTAINER_WORK, Distribution, RunFolder, RunRuntime

__all__ = ["container_spec", "library_dir", "pythonpath", "rank_command", "rank_variables", "run_variables"]


def library_dir() -> Path:
    """dockyard's own package folder, mounted read-only into containers for the in-run API."""
    # resolve(): an editable install is a tree of symlinks; the container needs the real folder.
    return Path(__file__).resolve().parent.parent


def pythonpath(library: str, env: Environment) -> str:
    """dockyard's in-run API first, then whatever the environment itself puts on PYTHONPATH."""
    declared = env.environment_variables.get("PYTHONPATH", "")
    return os.pathsep.join(p for p in (library, declared) if p)


def run_variables(run_id: str, experiment: str, env: Environment, runtime: RunRuntime) -> dict[str, str]:
    """The variables every run gets, container or process."""
    variables = {
        **env.environment_variables,
        **runtime.variables,
        "DOCKYARD_RUN_ID": run_id,
        "DOCKYARD_EXPERIMENT": experiment,
        "PYTHONUNBUFFERED": "1",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
    }
    if runtime.datasets:  # Run.get_context().input_datasets reads them
        variables["DOCKYARD_INPUT_DATASETS"] = json.dumps(dict(runtime.datasets))
    return variables


def rank_command(argv: Sequence[str], spread: Distribution, node_rank: int) -> tuple[str, ...]:
    """One node's command of a distributed run: ``dockyard._ranks`` starts its processes (one per
    local rank, each line prefixed with its rank) with the same interpreter."""
    return (argv[0], "-m", "dockyard._ranks", str(spread.per_node), str(node_rank), "--", *argv)


def rank_variables(spread: Distribution, node_rank: int, master_addr: str, master_port: int | str) -> dict[str, str]:
    """What every process of one node of a distributed run reads (``RANK`` and ``LOCAL_RANK`` are
    set per process by ``dockyard._ranks``)."""
    return {"MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port), "WORLD_SIZE": str(spread.world_size),
            "NODE_RANK": str(node_rank), "NODE_COUNT": str(spread.nodes), "DOCKYARD_DISTRIBUTED": spread.kind,
            **({"DOCKYARD_DIST_BACKEND": spread.backend} if spread.backend else {})}


def container_spec(
    run_id: str, experiment: str, argv: Sequence[str], env: Environment, runtime: RunRuntime, folder: RunFolder,
    *, image: str, gpus: Sequence[str], virtual: bool, labels: Mapping[str, str], launch_id: str = "",
    variables: Mapping[str, str] | None = None, network: str | None = None,
) -> LaunchSpec:
    """A run's container: its folder mounted, the GPUs by UUID (never CUDA_VISIBLE_DEVICES: Docker
    renumbers from 0), metrics and the in-run API wired up.

    ``launch_id`` names the container (``dockyard-<launch_id>``; default the run's id: one rank of a
    distributed run has its own); ``variables`` come on top (a rank's); ``network`` is Docker's
    network mode (``host`` for the ranks of a distributed run, as NCCL jobs use)."""
    extra = dict(variables or {})
    variables = run_variables(run_id, experiment, env, runtime)
    variables.update(extra)
    variables.update({
        # NVIDIA's runtime reads NVIDIA_VISIBLE_DEVICES; "void" gives a CPU-only run no GPU.
        "NVIDIA_VISIBLE_DEVICES": ",".join(gpus) if gpus else "void",
        "PYTHONPATH": pythonpath(CONTAINER_LIB, env),
        "DOCKYARD_METRICS_FILE": folder.container_metrics,
    })
    mounts = tuple(BindMount(src, dst, ro) for src, dst, ro in folder.container_mounts(library_dir()))
    mounts += tuple(BindMount(m.source, m.target, m.read_only) for m in runtime.mounts)
    return LaunchSpec(
        launch_id or run_id, tuple(argv), variables, CONTAINER_WORK, folder.container_log, image=image, mounts=mounts,
        labels=dict(labels), device_ids=tuple(gpus) if gpus and not virtual else (),
        shm_size=runtime.shm_size, ulimits=tuple((u.name, u.soft, u.hard) for u in runtime.ulimits),
        ipc_mode=runtime.ipc, network_mode=network,
    )
