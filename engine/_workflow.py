"""Azure ML SDK v1's workflow objects, mapped onto this machine.

``Workspace`` is a folder of runs under the dockyard home (images and snapshots are shared by all
workspaces), ``Experiment.submit`` snapshots the source directory and queues a run for the agent,
and a compute target is a name with ``max_nodes`` = how many of its runs may execute at once.
Porting Azure ML code is replacing ``azureml`` by ``dockyard`` in the imports. One agent per
dockyard home serves every workspace under it (``dockyard.compute``).
"""

from __future__ import annotations

import json
import os
import re
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._azure_only import AzureNames, instance_getattr
from ._environment import Environment
from ._home import WORKSPACES, dockyard_home, workspace_folders
from ._runtime import (
    DockerConfiguration,
    check_mount,
    distribution_of,
    parse_docker_arguments,
    parse_mount,
    parse_shm_size,
)
from .compute import LOCAL_COMPUTE
from .errors import ComputeTargetException, InputError
from .runs import DATASETS_ROOT, LOCAL_KIND, RunRuntime, RunStatus, new_run_id

if TYPE_CHECKING:  # pragma: no cover
    from ._env_registry import EnvironmentRegistry
    from ._run import Run
    from .build import CacheRegistry
    from .runs import RunStore

__all__ = [
    "AmlCompute",
    "ComputeTarget",
    "ComputeTargetException",
    "Experiment",
    "RayCompute",
    "ScriptRunConfig",
    "Workspace",
]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# A workspace name is a folder's name (``workspaces/<name>``): one path component, at most 255
# bytes on the usual file systems (names are ASCII, so characters are bytes). A compute target's
# name is only stored, never a path; it keeps the same limit.
_NAME_MAX = 255
# A run id, ``<experiment>_<unix seconds>_<8 hex>``, is a folder's name too (``runs/<run id>``):
# an experiment's name may use only what the rest of the id leaves (10-digit seconds until 2286).
_RUN_ID_TAIL = len(new_run_id("x")) - len("x")
_EXPERIMENT_MAX = _NAME_MAX - _RUN_ID_TAIL


def _check_name(kind: str, name: object, limit: int = _NAME_MAX) -> str:
    if isinstance(name, str) and len(name) > limit:
        why = {
            "experiment": f"its run ids '<experiment>_<unix seconds>_<8 hex>' name folders of at most {_NAME_MAX} bytes",
            "workspace": f"it names a folder of at most {_NAME_MAX} bytes",
        }.get(kind, "")
        raise InputError(
            f"{kind} name {name[:40]!r}… is {len(name)} characters long; the limit is {limit}",
            hint=f"use at most {limit} characters" + (f": {why}" if why else ""),
        )
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise InputError(
            f"{kind} name {name!r} is not valid",
            hint="use letters, digits, '_', '-' or '.', starting with a letter or digit (no '/' or '..')",
        )
    return name


def _check_cluster_run(compute: str, container: bool, runtime: RunRuntime, env: Environment) -> None:
    """What a run on a cluster cannot have: this machine's paths (its nodes share no filesystem).

    Raises:
        InputError: a local process run, a mount or dataset of a host path, or a build context.
    """
    if not container:
        raise InputError(f"runs on the cluster target {compute!r} run in containers",
                         hint="leave docker enabled (use_docker=False runs only on this machine's `local` target)")
    if runtime.mounts or runtime.datasets:
        raise InputError(f"the cluster target {compute!r} cannot mount this machine's paths into a run",
                         hint="put the data where every node reads it (object storage, a shared volume named "
                         "the same on each node), or run on `local`")
    if env.docker.build_context is not None:
        raise InputError(f"a build context folder is on this machine; the cluster target {compute!r} builds on its nodes",
                         hint="give the Dockerfile as text (docker.base_dockerfile) with no COPY of local files, "
                         "or a base image; or run on `local`")


def _check_distribution(compute: str, runtime: RunRuntime, cluster: Any) -> None:
    """A distributed run needs as many nodes as it spans: one, or a cluster target's ``max_nodes``.

    Raises:
        InputError: more nodes than the target has.
    """
    spread = runtime.distributed
    if spread is None or spread.nodes == 1:
        return
    if cluster is None:
        raise InputError(f"node_count {spread.nodes} needs a cluster: the target {compute!r} is this machine",
                         hint="attach a Ray cluster (dockyard compute attach ray NAME --address …) and run there, "
                              "or use node_count=1 (its processes then share this machine)")
    if spread.nodes > cluster.max_nodes:
        raise InputError(f"node_count {spread.nodes} is more than the {cluster.max_nodes} node(s) the target "
                         f"{compute!r} may use at once (its max_nodes)",
                         hint="lower node_count, or attach the target again with a larger --max-nodes")


def _cache_registry_setting(value: object, where: str) -> CacheRegistry | None:
    """A workspace's ``cache_registry`` setting, checked (None and ``""``: none).

    Raises:
        InputError: not ``REG/REPO`` or a ``{"address", "username", "password_env"}`` object.
    """
    if value is None or value == "":
        return None
    from .build import CacheRegistry

    if isinstance(value, CacheRegistry):
        return value
    return CacheRegistry.from_setting(value, where)


class Workspace(metaclass=AzureNames):
    """A local workspace: a folder of runs under the dockyard home.

    Args:
        name: the workspace name (Azure's ``workspace_name``).
        home: the dockyard home (default ``$DOCKYARD_HOME`` or ``~/.local/share/dockyard``).
        cache_registry: the workspace's shared image cache: ``"REG/REPO"``, a
            :class:`dockyard.build.CacheRegistry`, or the config file's ``cache_registry`` object
            (``{"address", "username", "password_env"}``); ``DOCKYARD_CACHE_REGISTRY`` overrides it.
        subscription_id, resource_group, **kwargs: Azure-only; accepted and ignored.

    Attributes:
        home: the dockyard home (images, snapshots, GPU leases and the agent are shared by its workspaces).
        directory: this workspace's folder (``<home>/workspaces/<name>``: its run store and runs).
        cache_registry: the workspace's own shared cache setting (None: none).
    """

    __getattr__ = instance_getattr('Workspace')

    def __init__(self, name: str = "default", home: str | os.PathLike[str] | None = None,
                 subscription_id: str | None = None, resource_group: str | None = None,
                 cache_registry: str | dict[str, Any] | CacheRegistry | None = None, **kwargs: Any) -> None:
        self.name = _check_name("workspace", name)
        self.home = Path(home).expanduser() if home is not None else dockyard_home()
        self.directory = self.home / WORKSPACES / self.name
        self._runs: RunStore | None = None
        self.cache_registry = _cache_registry_setting(cache_registry, "Workspace(cache_registry=...)")

    def __repr__(self) -> str:
        return f"Workspace.create(name={self.name!r}, home={str(self.home)!r})"
    @classmethod
    def from_config(cls, path: str | os.PathLike[str] | None = None, _file_name: str | None = None) -> Workspace:
        """Find ``config.json`` (or ``.dockyard/config.json``, ``.azureml/config.json``) by walking
        up from ``path`` (default: the current directory), like Azure ML.

        An Azure ML ``config.json`` works as is: ``workspace_name`` names the local workspace and
        ``subscription_id``/``resource_group`` are ignored. A dockyard config may add ``home``
        (relative to the file) and ``cache_registry`` (the shared image cache, see ``__init__``).

        Raises:
            InputError: no config file found, or it is not valid JSON.
        """
        found = cls.find(path, _file_name)
        if found is None:
            start = Path(path or Path.cwd()).resolve()
            raise InputError(
                f"no config.json found in {start} or any folder above it",
                hint='write {"workspace_name": "my-workspace"} to config.json (an Azure ML config.json works too)',
            )
        return found

    @classmethod
    def find(cls, path: str | os.PathLike[str] | None = None, _file_name: str | None = None) -> Workspace | None:
        """The workspace the ``config.json`` above ``path`` names (see :meth:`from_config`), or
        None when there is no such file.

        Raises:
            InputError: a config file was found but is not valid.
        """
        start = Path(path or Path.cwd()).resolve()
        names = [_file_name] if _file_name else ["config.json"]
        candidates: list[Path] = []
        if start.is_file():
            candidates = [start]
        else:
            for folder in (start, *start.parents):
                for sub in ("", ".dockyard", ".azureml"):
                    candidates += [folder / sub / n for n in names]
        for candidate in candidates:
            if candidate.is_file():
                try:
                    data = json.loads(candidate.read_text())
                except (ValueError, OSError) as exc:
                    raise InputError(f"{candidate} is not a valid workspace config: {exc}") from exc
                if not isinstance(data, dict):
                    raise InputError(f"{candidate} must hold a JSON object")
                name = data.get("workspace_name") or data.get("name") or "default"
                home = data.get("home")
                home_path = (candidate.parent / home) if home else None
                shared = _cache_registry_setting(data.get("cache_registry"), f"{candidate}: field cache_registry")
                return cls(name, home=home_path, cache_registry=shared)
        return None

    def write_config(self, path: str | os.PathLike[str] = ".", file_name: str = "config.json") -> Path:
        """Write a config.json naming this workspace (``from_config`` finds it)."""
        target = Path(path) / file_name
        data: dict[str, Any] = {"workspace_name": self.name}
        shared = self.cache_registry
        if shared is not None:  # the names of the credentials only, never a password
            data["cache_registry"] = {"address": str(shared), "username": shared.username,
                                      "password_env": shared.password_env}
        target.write_text(json.dumps(data) + "\n")
        return target

    def shared_cache(self) -> CacheRegistry | None:
        """The shared image cache this workspace's builds use: ``DOCKYARD_CACHE_REGISTRY`` (with
        its credential variables) when set, else :attr:`cache_registry`.

        Raises:
            InputError: ``DOCKYARD_CACHE_REGISTRY`` is not ``REG/REPO``.
        """
        from .build import resolve_cache_registry

        return resolve_cache_registry(None, self.cache_registry)

    @property
    def compute_targets(self) -> dict[str, ComputeTarget]:
        """Every compute target of the workspace, by name (``local`` always exists)."""
        found = {c.name: ComputeTarget._from_record(self, c.name) for c in self.store.computes()}
        found.setdefault(LOCAL_COMPUTE, ComputeTarget._from_record(self, LOCAL_COMPUTE))
        return found

    @property
    def environment_registry(self) -> EnvironmentRegistry:
        """The workspace's registered environments (what ``env.register(ws)`` and
        ``Environment.get``/``list`` use)."""
        from ._env_registry import EnvironmentRegistry

        return EnvironmentRegistry(self)

    _environments = environment_registry

    @property
    def environments(self) -> dict[str, Environment]:
        """name -> the latest registered version of each environment (Azure's ``ws.environments``)."""
        return self._environments.list()

    @property
    def experiments(self) -> dict[str, Experiment]:
        """name -> every experiment that has runs (Azure's ``ws.experiments``)."""
        return {name: Experiment(self, name) for name in self.store.experiments()}

    @property
    def store(self) -> RunStore:
        """This workspace's run store (:class:`dockyard.runs.RunStore`), opened once."""
        if self._runs is None:
            from .runs import RunStore

            self._runs = RunStore(self.directory)
        return self._runs

    def get_runs(self, experiment: str | None = None, limit: int = 100, statuses: Iterable[str] = ()) -> list[Run]:
        """The workspace's runs, newest first, of ``experiment`` and ``statuses`` when given (an
        agent is revived if runs are left unfollowed)."""
        from ._run import Run

        self.wake_agent()
        found = self.store.list(experiment=experiment, statuses=tuple(statuses), limit=limit)
        return [Run(Experiment(self, r.experiment), r.id) for r in found]

    def get_run(self, run_id: str) -> Run:
        """One run by id (an agent is revived if runs are left unfollowed).

        Raises:
            RunNotFound: the workspace has no such run.
        """
        from ._run import Run

        self.wake_agent()
        return Run(Experiment(self, self.store.get(run_id).experiment), run_id)

    def remove_run(self, run_id: str) -> None:
        """Forget a finished run of this workspace: its row, metrics and folder.

        Raises:
            RunNotFound: no such run.
            InputError: the run has not finished.
        """
        self.store.remove(run_id)

    def collect_snapshots(self) -> tuple[int, int]:
        """Remove the home's snapshots no run of any workspace names any more (older than an hour:
        a submit writes its snapshot just before its run). Returns (snapshots, bytes freed)."""
        from .runs import RunStore, SnapshotStore

        keep: set[str] = set()
        for folder in workspace_folders(self.home):
            store = self.store if folder == self.directory else RunStore(folder)
            try:
                keep |= store.snapshot_ids()
            finally:
                if store is not self.store:
                    store.close()
        return SnapshotStore(self.home / "snapshots").collect(keep)

    def wake_agent(self) -> None:
        """Start the machine's agent if runs are unfinished and no agent follows them (it was
        killed): someone is always awake while a run is unfinished."""
        from .compute import wake_agent

        wake_agent(self.home)


class AmlCompute:
    """Azure ML's cluster configuration, mapped onto this machine: only ``max_nodes`` matters."""

    class _Config:
        # kind: the compute backend that runs the target's runs (``local``: this machine).
        kind = LOCAL_KIND

        def __init__(self, max_nodes: int, vm_size: str | None) -> None:
            self.max_nodes = max_nodes
            self.vm_size = vm_size or ""

    @staticmethod
    def provisioning_configuration(vm_size: str | None = None, max_nodes: int = 1, min_nodes: int = 0,
                                   **kwargs: Any) -> AmlCompute._Config:
        """``max_nodes`` = how many runs on this target may execute at once. ``vm_size`` and the
        other cloud-only arguments are accepted with one warning (they pick Azure hardware)."""
        if not isinstance(max_nodes, int) or isinstance(max_nodes, bool) or max_nodes < 1:
            raise ComputeTargetException(f"max_nodes must be an integer >= 1, got {max_nodes!r}")
        ignored = [k for k, v in {"vm_size": vm_size, "min_nodes": min_nodes or None, **kwargs}.items() if v]
        if ignored:
            warnings.warn(
                f"dockyard runs on this machine: {', '.join(ignored)} (cloud-only) are ignored; "
                "max_nodes is how many runs of this target execute at once",
                stacklevel=2,
            )
        return AmlCompute._Config(max_nodes, vm_size)


class RayCompute:
    """An existing Ray cluster as a compute target (attached, as Azure ML attaches remote compute).

    Each run becomes one Ray actor that reserves the run's GPUs on a node and drives that node's
    Docker Engine. ``max_nodes`` keeps its meaning: how many runs of the target execute at once.
    """

    class _AttachConfig:
        kind = "ray"

        def __init__(self, address: str, max_nodes: int, settings: dict[str, str]) -> None:
            self.address = address
            self.max_nodes = max_nodes
            self.vm_size = ""
            self.settings = settings

    @staticmethod
    def attach_configuration(address: str, *, max_nodes: int = 1, auth_token_file: str | None = None,
                             auth_token_env: str | None = None) -> RayCompute._AttachConfig:
        """Where the cluster is and where its token is read from (never the token itself).

        Args:
            address: the cluster's GCS address ``host:port`` (the submitting machine is a node of
                it, maybe with no resources), or ``ray://host:10001`` (Ray Client).
            max_nodes: runs of this target that execute at once.
            auth_token_file: a file holding the cluster's token (``RAY_AUTH_MODE=token`` clusters).
            auth_token_env: the *name* of a variable holding the token, in the agent's environment.

        Raises:
            ComputeTargetException: a bad address, count or token reference.
        """
        if not isinstance(max_nodes, int) or isinstance(max_nodes, bool) or max_nodes < 1:
            raise ComputeTargetException(f"max_nodes must be an integer >= 1, got {max_nodes!r}")
        text = address.strip() if isinstance(address, str) else ""
        bare = text.removeprefix("ray://")
        host, _, port = bare.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in bare or "@" in bare:
            raise ComputeTargetException(
                f"Ray address {address!r} is not host:port or ray://host:port",
                hint="e.g. --address 10.0.0.5:6379 (the head's GCS port) or ray://10.0.0.5:10001")
        if auth_token_file and auth_token_env:
            raise ComputeTargetException("give auth_token_file or auth_token_env, not both")
        settings = {"address": text}
        if auth_token_file:
            path = Path(auth_token_file).expanduser()
            if not path.is_file():
                raise ComputeTargetException(f"the token file {path} does not exist",
                                             hint="e.g. `ray get-auth-token --generate` writes ~/.ray/auth_token")
            settings["auth_token_file"] = str(path.resolve())
        if auth_token_env:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", auth_token_env):
                raise ComputeTargetException("auth_token_env must be the NAME of a variable",
                                             hint="e.g. auth_token_env='RAY_TOKEN'")
            settings["auth_token_env"] = auth_token_env
        return RayCompute._AttachConfig(text, max_nodes, settings)


class ComputeTarget:
    """A named compute target (Azure ML's ``ComputeTarget``).

    Raises:
        ComputeTargetException: ``ComputeTarget(workspace=ws, name=...)`` of a target that does not exist.
    """

    def __init__(self, workspace: Workspace, name: str) -> None:
        self.workspace = workspace
        self.name = _check_name("compute target", name)
        if name != LOCAL_COMPUTE and workspace.store.compute(name) is None:
            raise ComputeTargetException(
                f"compute target {name!r} does not exist in workspace {workspace.name!r}",
                hint="create it with ComputeTarget.create(ws, name, AmlCompute.provisioning_configuration(max_nodes=N))",
            )

    @classmethod
    def _from_record(cls, workspace: Workspace, name: str) -> ComputeTarget:
        target = cls.__new__(cls)
        target.workspace, target.name = workspace, name
        return target

    @staticmethod
    def list(workspace: Workspace) -> list[ComputeTarget]:
        """Every compute target of the workspace (``local`` always among them), by name."""
        return [workspace.compute_targets[name] for name in sorted(workspace.compute_targets)]

    @staticmethod
    def create(workspace: Workspace, name: str, provisioning_configuration: AmlCompute._Config) -> ComputeTarget:
        """Create (or update) a compute target; ready at once (no cloud provisioning)."""
        _check_name("compute target", name)
        workspace.store.put_compute(name, provisioning_configuration.max_nodes, provisioning_configuration.vm_size,
                                    kind=provisioning_configuration.kind)
        return ComputeTarget._from_record(workspace, name)

    @staticmethod
    def attach(workspace: Workspace, name: str, attach_configuration: RayCompute._AttachConfig) -> ComputeTarget:
        """Attach an existing cluster under ``name`` (or update it); its reachability and token
        are checked now, so a wrong address or token is one clear error here, not at the first run.

        Raises:
            ComputeTargetException: the cluster cannot be reached or refused the token.
        """
        _check_name("compute target", name)
        if name == LOCAL_COMPUTE:
            raise ComputeTargetException(f"{LOCAL_COMPUTE!r} is this machine; attach the cluster under another name")
        from .compute import check_cluster

        check_cluster(attach_configuration.settings)
        workspace.store.put_compute(name, attach_configuration.max_nodes, kind=attach_configuration.kind,
                                    settings=attach_configuration.settings)
        return ComputeTarget._from_record(workspace, name)

    @property
    def kind(self) -> str:
        found = self.workspace.store.compute(self.name)
        return found.kind if found else LOCAL_KIND

    @property
    def address(self) -> str | None:
        """A cluster's address (None for this machine's targets)."""
        found = self.workspace.store.compute(self.name)
        return found.settings.get("address") if found else None

    @property
    def max_nodes(self) -> int:
        from .compute import default_max_nodes

        found = self.workspace.store.compute(self.name)
        return found.max_nodes if found else default_max_nodes()

    def wait_for_completion(self, show_output: bool = False, **kwargs: Any) -> None:
        """Provisioning is instant here; prints the state like Azure ML when ``show_output``."""
        if show_output:
            print(f"Provisioning operation finished, operation \"Succeeded\" ({self.name}, max_nodes={self.max_nodes})")

    def get_status(self) -> _ComputeStatus:
        """Current node usage: running runs count as busy nodes."""
        unfinished = [r for r in self.workspace.store.unfinished() if r.compute == self.name]
        running = sum(1 for r in unfinished if r.status == RunStatus.RUNNING)
        queued = len(unfinished) - running
        return _ComputeStatus(self.name, self.max_nodes, running, queued)

    def delete(self) -> None:
        raise ComputeTargetException("deleting compute targets is not supported yet")

    def __repr__(self) -> str:
        return f"ComputeTarget(name={self.name!r}, max_nodes={self.max_nodes})"


class _ComputeStatus:
    def __init__(self, name: str, max_nodes: int, running: int, queued: int) -> None:
        self.name, self.max_nodes, self.running, self.queued = name, max_nodes, running, queued

    def serialize(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "provisioningState": "Succeeded",
            "currentNodeCount": self.running,
            "targetNodeCount": self.max_nodes,
            "nodeStateCounts": {"runningNodeCount": self.running, "idleNodeCount": self.max_nodes - self.running},
            "scaleSettings": {"minNodeCount": 0, "maxNodeCount": self.max_nodes},
            "queuedRuns": self.queued,
        }


class ScriptRunConfig:
    """What to run: a script in a source directory, in an environment, on a compute target.

    Azure ML's arguments, plus dockyard's own keywords: ``gpus``, ``gpu_memory_mib``, ``gpu_name``,
    ``priority`` (the GPU request) and ``mounts`` (``"HOST:CONTAINER[:ro|rw]"`` strings). Datasets
    (``ds.as_named_input(name).as_mount()``) in ``arguments`` become the path the data is at.
    Azure-only arguments that mean nothing here are accepted with a warning; unknown ones are an
    error.
    """

    def __init__(self, source_directory: str | os.PathLike[str] = ".", script: str | None = None,
                 arguments: Iterable[object] | None = None, run_config: Any = None, _telemetry_values: Any = None,
                 compute_target: ComputeTarget | str | None = None, environment: Environment | None = None,
                 distributed_job_config: Any = None, resume_from: Any = None,
                 max_run_duration_seconds: int | None = None, command: Any = None,
                 docker_runtime_config: DockerConfiguration | None = None, *, gpus: int = 0,
                 gpu_memory_mib: int = 0, gpu_name: str | None = None, priority: int = 0,
                 mounts: Iterable[str] = (), **kwargs: Any) -> None:
        if kwargs:
            raise InputError(f"ScriptRunConfig got unknown arguments: {', '.join(sorted(kwargs))}",
                             hint="see help(ScriptRunConfig) for what it takes")
        ignored = [name for name, value in (("run_config", run_config), ("resume_from", resume_from),
                                            ("command", command)) if value is not None]
        if ignored:
            warnings.warn(f"ScriptRunConfig: {', '.join(ignored)} (Azure ML only) are ignored here", stacklevel=2)
        self.source_directory = str(source_directory)
        # dockyard's own: GPUs wanted (0 = CPU only), their minimum memory and name, queue priority.
        # max_run_duration_seconds (Azure's) is the time limit the scheduler backfills with.
        self.gpus = gpus
        self.gpu_memory_mib = gpu_memory_mib
        self.gpu_name = gpu_name
        self.priority = priority
        self.script = script
        self.arguments = list(arguments or [])  # datasets stay objects until submit places them
        self.compute_target = compute_target
        self.environment = environment
        self.max_run_duration_seconds = max_run_duration_seconds
        self.docker_runtime_config = docker_runtime_config
        self.mounts = [str(m) for m in mounts]
        # PyTorchConfiguration / MpiConfiguration: one container per node, the processes in each.
        self.distributed_job_config = distributed_job_config

    def _runtime(self, env: Environment, container: bool) -> tuple[list[str], RunRuntime]:
        """The script's arguments (datasets replaced by their paths) and the container's setup.

        Raises:
            InputError: a dataset or mount path that does not exist or may not be mounted, a dataset
                name used twice, a docker argument dockyard does not pass, a bad size.
        """
        from ._data import DatasetConsumptionConfig, FileDataset

        docker = self.docker_runtime_config
        given = parse_docker_arguments([*env.docker.arguments, *(docker.arguments if docker else [])])
        mounts = [*given["mounts"], *(parse_mount(m) for m in self.mounts)]
        datasets: dict[str, str] = {}
        arguments: list[str] = []
        for value in self.arguments:
            if isinstance(value, FileDataset):
                value = value.as_mount()
            if not isinstance(value, DatasetConsumptionConfig):
                arguments.append(str(value))
                continue
            name = value.name or f"input_{len(datasets) + 1}"
            if name in datasets:
                raise InputError(f"dataset name {name!r} is used twice in one run",
                                 hint="give each dataset its own name with as_named_input(name)")
            source = Path(value.dataset.path)
            target = value.path_on_compute or f"{DATASETS_ROOT}/{name}"
            if source.is_file() and not value.path_on_compute:
                target = f"{target}/{source.name}"
            mount = check_mount(source, target, True, what=f"dataset {name!r}")
            mounts.append(mount)
            datasets[name] = mount.target if container else mount.source
            arguments.append(datasets[name])
        seen: set[str] = set()
        for mount in mounts:
            if mount.target in seen:
                raise InputError(f"two mounts share the container path {mount.target}", hint="give each its own path")
            seen.add(mount.target)
        shm = given["shm_size"] or parse_shm_size(
            (docker.shm_size if docker and docker.shm_size is not None else env.docker.shm_size), "shm_size")
        runtime = RunRuntime(mounts=tuple(mounts) if container else (), shm_size=shm, ulimits=tuple(given["ulimits"]),
                             ipc=given["ipc"], variables=given["variables"], datasets=datasets,
                             distributed=distribution_of(self.distributed_job_config))
        return arguments, runtime

    def _validate(self) -> tuple[Path, str]:
        source = Path(self.source_directory).expanduser()
        if not source.is_dir():
            raise InputError(f"source directory {self.source_directory!r} does not exist",
                             hint="pass the folder that holds your training script")
        if not self.script:
            raise InputError("ScriptRunConfig needs a script", hint="e.g. ScriptRunConfig(source_directory='src', script='train.py')")
        root = source.resolve()
        script = (root / self.script).resolve()
        if root != script and root not in script.parents:
            raise InputError(f"script {self.script!r} is outside the source directory {root}",
                             hint="put the script inside source_directory and name it relative to it")
        if not script.is_file():
            raise InputError(f"script {self.script!r} not found in {root}", hint="check the script name")
        return root, script.relative_to(root).as_posix()

    def _gpu_request(self, here: bool = True) -> dict[str, Any]:
        """The run's GPU request in its stored form, checked against this machine's GPUs (``here``;
        a cluster's nodes are Ray's to match).

        Raises:
            InputError: a bad field, or a request this machine can never serve (with the reason).
        """
        for name, value in (("gpus", self.gpus), ("gpu_memory_mib", self.gpu_memory_mib), ("priority", self.priority)):
            if not isinstance(value, int) or isinstance(value, bool) or (name != "priority" and value < 0):
                raise InputError(f"{name} must be a non-negative integer, got {value!r}")
        limit = self.max_run_duration_seconds
        if limit is not None and (not isinstance(limit, (int, float)) or limit <= 0):
            raise InputError(f"max_run_duration_seconds must be a positive number, got {limit!r}")
        stored = {"count": self.gpus, "min_memory_mib": self.gpu_memory_mib, "name_filter": self.gpu_name,
                  "priority": self.priority, "time_limit_s": limit}
        if self.gpus:  # the scheduler's import is paid only by runs that want GPUs
            from .gpu import GpuRequest, check_fits

            request = GpuRequest.from_dict(stored)
            if here:
                check_fits(request)
            stored = request.to_dict()
        return stored


def _check_tags(tags: Any) -> dict[str, str]:
    """Tags as Azure ML keeps them: str -> str (a value given as a number is kept as its text)."""
    if tags is None:
        return {}
    if not isinstance(tags, dict):
        raise InputError(f"tags must be a dict of str -> str, got {type(tags).__name__}",
                         hint='e.g. tags={"model": "resnet50", "lr": "0.1"}')
    out = {}
    for key, value in tags.items():
        if not isinstance(key, str) or not key.strip():
            raise InputError(f"tag name {key!r} is not a non-empty string", hint="use names like 'model' or 'lr'")
        out[key] = "" if value is None else str(value)
    return out


class Experiment(metaclass=AzureNames):
    """A named group of runs in a workspace."""

    __getattr__ = instance_getattr('Experiment')

    def __init__(self, workspace: Workspace, name: str, **kwargs: Any) -> None:
        self.workspace = workspace
        self.name = _check_name("experiment", name, _EXPERIMENT_MAX)

    def __repr__(self) -> str:
        return f"Experiment(name={self.name!r}, workspace={self.workspace.name!r})"

    def submit(self, config: ScriptRunConfig, tags: dict[str, str] | None = None, **kwargs: Any) -> Run:
        """Snapshot the source, queue the run and return at once (the machine's agent starts it).

        Raises:
            InputError: missing/outside script, missing source, bad names, unknown compute
                target, oversized snapshot, a GPU request this machine can never serve.
            RegistryAuthError: the environment's private base registry refused its credentials.
        """
        from ._run import Run
        from .compute import ensure_agent
        from .runs import RunRecord, SnapshotStore, new_run_id

        if kwargs:
            raise InputError(f"submit() got unknown arguments: {', '.join(sorted(kwargs))}",
                             hint="submit(config, tags={...}) is what dockyard takes; run settings go in ScriptRunConfig")
        ws = self.workspace
        source, script = config._validate()
        target = config.compute_target
        compute = target.name if isinstance(target, ComputeTarget) else (target or LOCAL_COMPUTE)
        if compute != LOCAL_COMPUTE and ws.store.compute(str(compute)) is None:
            raise ComputeTargetException(
                f"unknown compute target {compute!r}",
                hint="create it with ComputeTarget.create(...) or leave compute_target unset for 'local'",
            )
        env = config.environment or Environment("default")
        env.validate()
        run_tags = _check_tags(tags)
        docker = config.docker_runtime_config
        container = bool(env.docker.enabled) and not (docker is not None and docker.use_docker is False)
        arguments, runtime = config._runtime(env, container)
        target_record = ws.store.compute(str(compute)) if compute != LOCAL_COMPUTE else None
        on_cluster = target_record is not None and target_record.kind != LOCAL_KIND
        if on_cluster:
            _check_cluster_run(str(compute), container, runtime, env)
        _check_distribution(str(compute), runtime, target_record if on_cluster else None)
        gpu_request = config._gpu_request(here=not on_cluster)
        registry = env.docker.base_image_registry
        if container and registry.address and registry.password is not None:
            # The password (set in code, or in this process's environment) is not available to the
            # agent, a long-lived process: pull the base now; the agent's build then finds it in
            # the engine. Nothing stores the password.
            from .build import Builder

            builder = Builder(ws.home)
            try:
                builder.pull_bases(env)  # also when a remembered resolution outlived the image
            finally:
                builder.close()
        shared = ws.shared_cache() if container else None
        if shared is not None and shared.password_env and os.environ.get(shared.password_env):
            # Same reason: the agent cannot hold the shared cache's password, so a key published
            # elsewhere is pulled now, by this process; the agent then finds it here.
            from .build import Builder

            builder = Builder(ws.home, cache_registry=shared)
            try:
                builder.fetch_shared(env)
            finally:
                builder.close()
        if shared is not None:
            # The agent builds with the shared cache this submit saw (the workspace's setting, or
            # this process's variable), not with whatever its own environment says.
            runtime = runtime.with_shared_cache(str(shared), shared.username or "", shared.password_env or "")
        elif container:
            runtime = runtime.with_shared_cache("", "", "")
        snapshot = SnapshotStore(ws.home / "snapshots").take(source)
        run_id = new_run_id(self.name)
        run_dir = ws.store.folder_of(run_id).root
        run_dir.mkdir(parents=True, exist_ok=True)
        ws.store.insert(
            RunRecord(
                id=run_id, experiment=self.name, status=RunStatus.QUEUED, script=script,
                arguments=tuple(arguments), source_dir=str(source), snapshot=snapshot.id,
                environment=env.to_dict(), compute=str(compute),
                launcher="container" if container else "process", image="", gpus=(), exit_code=None,
                reason="", container_id="", pid=None, created=time.time(), started=None, ended=None,
                cancel_requested=False, metrics_offset=0, run_dir=str(run_dir), gpu_request=gpu_request,
                runtime=runtime.to_dict(), tags=run_tags,
            )
        )
        secrets = [name for name in (registry.password_env, shared.password_env if shared else None) if name]
        ensure_agent(ws.home, scrub=secrets)
        return Run(self, run_id)

    def get_runs(self) -> list[Run]:
        """This experiment's runs, newest first."""
        return self.workspace.get_runs(experiment=self.name)

    @staticmethod
    def list(workspace: Workspace, experiment_name: str | None = None, **kwargs: Any) -> list[Experiment]:
        """The workspace's experiments (those with runs), by name (Azure's ``Experiment.list``)."""
        names = workspace.store.experiments()
        return [Experiment(workspace, n) for n in names if experiment_name is None or n == experiment_name]
