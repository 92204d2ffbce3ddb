"""How a run's container is configured: Azure ML's ``DockerConfiguration``, host folders mounted into
the run, and the few ``docker run`` arguments dockyard accepts (each checked, never passed blindly).

Every check happens at submit, before anything is written; what is stored is a
:class:`dockyard.runs.RunRuntime` the launcher applies as it is.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ._units import binary_size
from .errors import InputError
from .runs import DEFAULT_SHM_BYTES, Distribution, RunMount, Ulimit

__all__ = [
    "ALLOWED_DOCKER_ARGUMENTS",
    "MOUNT_ROOTS_ENV",
    "DockerConfiguration",
    "MpiConfiguration",
    "PyTorchConfiguration",
    "check_mount",
    "distribution_of",
    "parse_docker_arguments",
    "parse_mount",
    "parse_shm_size",
]

#: Extra folders (``:``-separated) a run may mount besides the defaults below.
MOUNT_ROOTS_ENV = "DOCKYARD_MOUNT_ROOTS"
# Where data usually lives; a mount's real path (symlinks resolved) must be inside one of these.
_DEFAULT_ROOTS = ("/data", "/datasets", "/mnt", "/media", "/srv", "/scratch", "/home", "/tmp", "/var/tmp")
# Never mountable, whatever the roots: the engine's socket (a container holding it owns the host).
_NEVER = ("/var/run/docker.sock", "/run/docker.sock")
# Container paths a mount may not cover: dockyard's own mounts, and the system's.
_RESERVED_TARGETS = ("/", "/workspace", "/workspace/outputs", "/dockyard", "/opt/dockyard", "/proc", "/sys",
                     "/dev", "/etc", "/bin", "/sbin", "/usr", "/lib", "/lib64")
_RESERVED_PREFIXES = ("/dockyard/", "/opt/dockyard/", "/proc/", "/sys/", "/dev/")

#: What ``DockerConfiguration(arguments=...)`` / ``env.docker.arguments`` may hold.
ALLOWED_DOCKER_ARGUMENTS = ("--shm-size SIZE", "--ulimit NAME=SOFT[:HARD]", "--ipc host|private|shareable",
                            "-e/--env NAME=VALUE", "-v/--volume HOST:CONTAINER[:ro|rw]")

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_IPC = ("host", "private", "shareable")


class DockerConfiguration:
    """Azure ML's ``azureml.core.runconfig.DockerConfiguration``: how the run's container runs.

    Args:
        use_docker: False runs the script as a local process (like ``docker.enabled = False``).
        arguments: extra ``docker run`` arguments; only :data:`ALLOWED_DOCKER_ARGUMENTS` are accepted.
        shm_size: the size of ``/dev/shm``, e.g. ``"2g"`` (the default, as Azure ML's).
        shared_volumes: Azure-only; accepted and ignored.
    """

    def __init__(self, use_docker: bool | None = True, arguments: Iterable[str] | None = None,
                 shm_size: str | int | None = None, shared_volumes: bool = True, **kwargs: Any) -> None:
        if kwargs:
            raise InputError(f"DockerConfiguration got unknown arguments: {', '.join(sorted(kwargs))}",
                             hint="it takes use_docker, arguments, shm_size and shared_volumes")
        self.use_docker = use_docker
        self.arguments = list(arguments or [])
        self.shm_size = shm_size
        self.shared_volumes = shared_volumes

    def __repr__(self) -> str:
        return (f"DockerConfiguration(use_docker={self.use_docker!r}, arguments={self.arguments!r}, "
                f"shm_size={self.shm_size!r})")


def _count(value: object, name: str, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InputError(f"{where}: {name} must be a positive integer, got {value!r}",
                         hint=f"e.g. {where}({name}=2)")
    return value


class PyTorchConfiguration:
    """Azure ML's ``azureml.core.runconfig.PyTorchConfiguration``: a run of ``process_count``
    processes over ``node_count`` nodes (one container per node, ``process_count / node_count``
    processes in each), given ``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``, ``RANK``,
    ``NODE_RANK`` and ``LOCAL_RANK`` as ``torch.distributed`` reads them (``init_method="env://"``).

    Args:
        communication_backend: Azure's field (``Nccl``, ``Gloo``); passed as ``DOCKYARD_DIST_BACKEND``.
        process_count: processes in all (default: one per node); a multiple of ``node_count``.
        node_count: nodes (containers), each on its own node of a cluster target.
    """

    kind = "pytorch"

    def __init__(self, communication_backend: str = "Nccl", process_count: int | None = None,
                 node_count: int = 1, **kwargs: Any) -> None:
        if kwargs:
            raise InputError(f"PyTorchConfiguration got unknown arguments: {', '.join(sorted(kwargs))}",
                             hint="it takes communication_backend, process_count and node_count")
        self.communication_backend = communication_backend
        self.node_count = node_count
        self.process_count = process_count

    def _distribution(self) -> Distribution:
        nodes = _count(self.node_count, "node_count", "PyTorchConfiguration")
        total = nodes if self.process_count is None else _count(self.process_count, "process_count",
                                                                 "PyTorchConfiguration")
        if total % nodes:
            raise InputError(f"PyTorchConfiguration: process_count {total} is not a multiple of node_count {nodes}",
                             hint="give every node the same number of processes, e.g. "
                                  f"process_count={nodes * max(1, total // nodes)}")
        return Distribution(self.kind, nodes, total // nodes, str(self.communication_backend or ""))

    def __repr__(self) -> str:
        return (f"PyTorchConfiguration(communication_backend={self.communication_backend!r}, "
                f"process_count={self.process_count!r}, node_count={self.node_count!r})")


class MpiConfiguration:
    """Azure ML's ``azureml.core.runconfig.MpiConfiguration``: ``process_count_per_node`` processes
    on each of ``node_count`` nodes. dockyard starts the processes itself (no ``mpirun``): each gets
    the names Open MPI gives its ranks (``OMPI_COMM_WORLD_RANK``, ``…_LOCAL_RANK``, ``…_SIZE``) and
    the ``torch.distributed`` ones, so scripts that read either find their rank and a rendezvous
    (``MASTER_ADDR``/``MASTER_PORT``); MPI's own wire-up between nodes (ssh, ``mpirun``) is not made.
    """

    kind = "mpi"

    def __init__(self, process_count_per_node: int = 1, node_count: int = 1, **kwargs: Any) -> None:
        if kwargs:
            raise InputError(f"MpiConfiguration got unknown arguments: {', '.join(sorted(kwargs))}",
                             hint="it takes process_count_per_node and node_count")
        self.process_count_per_node = process_count_per_node
        self.node_count = node_count

    def _distribution(self) -> Distribution:
        nodes = _count(self.node_count, "node_count", "MpiConfiguration")
        per_node = _count(self.process_count_per_node, "process_count_per_node", "MpiConfiguration")
        return Distribution(self.kind, nodes, per_node)

    def __repr__(self) -> str:
        return f"MpiConfiguration(process_count_per_node={self.process_count_per_node!r}, node_count={self.node_count!r})"


def distribution_of(config: object) -> Distribution | None:
    """The run's distribution from a ``distributed_job_config`` (None: one process).

    Raises:
        InputError: not a PyTorch/MPI configuration, or bad counts.
    """
    if config is None:
        return None
    if not isinstance(config, (PyTorchConfiguration, MpiConfiguration)):
        raise InputError(f"distributed_job_config {type(config).__name__} is not supported here",
                         hint="use PyTorchConfiguration(process_count=…, node_count=…) or "
                              "MpiConfiguration(process_count_per_node=…, node_count=…)")
    found = config._distribution()
    return None if found.world_size == 1 else found


def parse_shm_size(value: str | int | None, where: str = "shm_size") -> int:
    """``"2g"``, ``"512m"``, ``"1073741824"`` or an int of bytes -> bytes (None: the 2 GiB default).

    Raises:
        InputError: not a size, or under 1 MiB.
    """
    if value is None:
        return DEFAULT_SHM_BYTES
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        parsed = binary_size(str(value))
        if parsed is None:
            raise InputError(f"{where} {value!r} is not a size", hint="write e.g. 2g, 512m or a number of bytes")
        size = parsed
    if size < 1 << 20:
        raise InputError(f"{where} {value!r} is under 1 MiB", hint="shared memory that small breaks every DataLoader; "
                         "the default is 2g")
    return size


def _roots() -> list[str]:
    extra = [p for p in os.environ.get(MOUNT_ROOTS_ENV, "").split(":") if p]
    return [os.path.realpath(p) for p in (*_DEFAULT_ROOTS, os.path.expanduser("~"), *extra)]


def check_mount(source: str | os.PathLike[str], target: str, read_only: bool = True, *,
                what: str = "mount") -> RunMount:
    """A host path to mount at ``target`` in the container, checked.

    The source must exist, and its real path (symlinks resolved) must be inside an allowed root:
    ``/data``, ``/datasets``, ``/mnt``, ``/media``, ``/srv``, ``/scratch``, ``/home``, ``/tmp``,
    ``/var/tmp``, your home folder, or a folder named in ``DOCKYARD_MOUNT_ROOTS``; never the
    Docker socket. The target must be an absolute path that covers none of dockyard's own
    mounts or the system's folders.

    Raises:
        InputError: what is wrong, and what to do.
    """
    raw = os.fspath(source)
    if not raw:
        raise InputError(f"{what}: the host path is empty")
    path = Path(raw).expanduser().absolute()
    if not path.exists():
        raise InputError(f"{what}: {path} does not exist", hint="mount an existing file or folder of this machine")
    real = os.path.realpath(path)
    if real in _NEVER or any(real == os.path.realpath(n) for n in _NEVER):
        raise InputError(f"{what}: {path} is the Docker Engine's socket; a run may never hold it")
    roots = _roots()
    if not any(real == root or real.startswith(root.rstrip("/") + "/") for root in roots):
        via = f" (it is a link to {real})" if real != str(path) else ""
        raise InputError(f"{what}: {path}{via} is outside the folders a run may mount",
                         hint=f"allowed: {', '.join(roots)}; add one with {MOUNT_ROOTS_ENV}=/path")
    if not isinstance(target, str) or not target.startswith("/"):
        raise InputError(f"{what}: the container path {target!r} must be absolute", hint="e.g. /data/train")
    clean = posixpath.normpath(target)
    if clean in _RESERVED_TARGETS or clean.startswith(_RESERVED_PREFIXES):
        raise InputError(f"{what}: the container path {target!r} is dockyard's or the system's",
                         hint="mount under /data, /mnt or /workspace/<name> instead")
    return RunMount(real, clean, read_only)


def parse_mount(text: str, what: str = "--mount") -> RunMount:
    """``HOST:CONTAINER[:ro|rw]`` (read-only unless ``rw``). Raises: InputError."""
    parts = text.rsplit(":", 2) if text.endswith((":ro", ":rw")) else text.rsplit(":", 1)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise InputError(f"{what} {text!r} is not HOST:CONTAINER[:ro|rw]", hint="e.g. --mount /data/pets:/data:ro")
    mode = parts[2] if len(parts) == 3 else "ro"
    return check_mount(parts[0], parts[1], mode == "ro", what=f"{what} {text}")


def _ulimit(text: str) -> Ulimit:
    name, eq, values = text.partition("=")
    soft, _, hard = values.partition(":")
    try:
        low = int(soft)
        high = int(hard) if hard else low
    except ValueError:
        low = high = 0
        eq = ""
    if not eq or not re.fullmatch(r"[a-z]+", name):
        raise InputError(f"--ulimit {text!r} is not NAME=SOFT[:HARD]", hint="e.g. --ulimit memlock=-1 or nofile=65536:65536")
    return Ulimit(name, low, high)


def parse_docker_arguments(arguments: Iterable[str], where: str = "docker arguments") -> dict[str, Any]:
    """The allowed ``docker run`` arguments -> ``{"shm_size", "ulimits", "ipc", "variables", "mounts"}``.

    Raises:
        InputError: an argument outside :data:`ALLOWED_DOCKER_ARGUMENTS`, or a bad value (with the list).
    """
    args = [str(a) for a in arguments]
    out: dict[str, Any] = {"shm_size": None, "ulimits": [], "ipc": None, "variables": {}, "mounts": []}
    i = 0
    while i < len(args):
        name, eq, value = args[i].partition("=")
        if name not in ("--shm-size", "--ulimit", "--ipc", "-e", "--env", "-v", "--volume"):
            raise InputError(f"{where}: {args[i]!r} is not an argument dockyard passes to the container",
                             hint="allowed: " + "; ".join(ALLOWED_DOCKER_ARGUMENTS))
        if not eq:
            if i + 1 >= len(args):
                raise InputError(f"{where}: {name} needs a value", hint="allowed: " + "; ".join(ALLOWED_DOCKER_ARGUMENTS))
            i += 1
            value = args[i]
        if name == "--shm-size":
            out["shm_size"] = parse_shm_size(value, "--shm-size")
        elif name == "--ulimit":
            out["ulimits"].append(_ulimit(value))
        elif name == "--ipc":
            if value not in _IPC:
                raise InputError(f"{where}: --ipc {value!r} is not one of {', '.join(_IPC)}")
            out["ipc"] = value
        elif name in ("-e", "--env"):
            key, has, val = value.partition("=")
            if not has or not _ENV_NAME.match(key):
                raise InputError(f"{where}: {name} {value!r} is not NAME=VALUE")
            out["variables"][key] = val
        else:
            out["mounts"].append(parse_mount(value, name))
        i += 1
    return out
