"""GPU discovery through NVML (nvidia-ml-py), keyed by UUID, never by index.

NVML is optional: without the ``gpu`` extra or without a driver, discovery says why there are none.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import InputError

__all__ = ["Gpu", "GpuDiscovery", "discover_gpus", "inventory"]


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    name: str
    memory_mib: int
    pci_bus_id: str
    virtual: bool = False
    numa_node: int | None = None
    mig: bool = False

    def to_json(self) -> dict[str, object]:
        return {"index": self.index, "uuid": self.uuid, "name": self.name, "memory_mib": self.memory_mib,
                "pci_bus_id": self.pci_bus_id, "numa_node": self.numa_node, "mig": self.mig,
                "virtual": self.virtual}


@dataclass(frozen=True)
class GpuDiscovery:
    """The GPUs found, the driver version, and ``reason`` when none were found."""

    gpus: tuple[Gpu, ...]
    driver: str = ""
    reason: str = ""
    # (uuid a, uuid b) -> (nvlinks, topology level 0..5): what placement scores sets by.
    links: tuple[tuple[str, str, int, int], ...] = ()
    virtual: bool = False

    def topology_dict(self) -> dict[str, object]:
        """The JSON topology form (``DOCKYARD_GPU_TOPOLOGY`` files use it too)."""
        return {
            "gpus": [{"uuid": g.uuid, "index": g.index, "name": g.name, "memory_mib": g.memory_mib,
                      "numa_node": g.numa_node} for g in self.gpus],
            "links": [{"a": a, "b": b, "nvlinks": n, "level": lvl} for a, b, n, lvl in self.links],
        }


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _numa_node(bus_id: str) -> int | None:
    # NVML names the bus "00000000:3B:00.0"; sysfs "0000:3b:00.0".
    domain, _, rest = bus_id.partition(":")
    path = f"/sys/bus/pci/devices/{domain[-4:]}:{rest}".lower() + "/numa_node"
    try:
        with open(path) as fh:
            node = int(fh.read().strip())
    except (OSError, ValueError):
        return None
    return node if node >= 0 else None


def _nvml_links(pynvml: Any, handles: list[Any], gpus: list[Gpu]) -> tuple[tuple[str, str, int, int], ...]:
    by_bus = {g.pci_bus_id.lower(): g.uuid for g in gpus}
    counts: dict[tuple[str, str], int] = {}
    for handle, gpu in zip(handles, gpus):
        for link in range(getattr(pynvml, "NVML_NVLINK_MAX_LINKS", 18)):
            try:
                if pynvml.nvmlDeviceGetNvLinkState(handle, link) != pynvml.NVML_FEATURE_ENABLED:
                    continue
                peer = by_bus.get(_text(pynvml.nvmlDeviceGetNvLinkRemotePciInfo(handle, link).busId).lower())
            except pynvml.NVMLError:
                continue  # no NVLink on this GPU or link: PCIe only
            if peer and peer != gpu.uuid:
                pair = tuple(sorted((gpu.uuid, peer)))
                counts[pair] = counts.get(pair, 0) + 1  # type: ignore[index]
    out = []
    for i in range(len(gpus)):
        for j in range(i + 1, len(gpus)):
            a, b = sorted((gpus[i].uuid, gpus[j].uuid))
            try:
                level = int(pynvml.nvmlDeviceGetTopologyCommonAncestor(handles[i], handles[j])) // 10
            except pynvml.NVMLError:
                level = 5
            # Each link is seen from both ends.
            out.append((a, b, counts.get((a, b), 0) // 2 or counts.get((a, b), 0), level))
    return tuple(out)


def _virtual(environ: Mapping[str, str]) -> GpuDiscovery | None:
    """Virtual GPUs for development and simulation: ``DOCKYARD_GPU_TOPOLOGY`` or ``DOCKYARD_GPUS``."""
    topo_file = environ.get("DOCKYARD_GPU_TOPOLOGY")
    if topo_file:
        try:
            with open(topo_file) as fh:
                data = json.load(fh)
            gpus = tuple(
                # "virtual": false describes real GPUs (a hand-written topology for a machine whose
                # NVML lacks link data): those get a device request, not just environment variables.
                Gpu(int(g.get("index", i)), str(g["uuid"]), str(g.get("name", "virtual GPU")),
                    int(g.get("memory_mib", 81920)), str(g.get("pci_bus_id", "")), bool(g.get("virtual", True)),
                    g.get("numa_node"))
                for i, g in enumerate(data["gpus"])
            )
            links = tuple((str(link["a"]), str(link["b"]), int(link.get("nvlinks", 0)), int(link.get("level", 0)))
                          for link in data.get("links", []))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"DOCKYARD_GPU_TOPOLOGY={topo_file}: not a readable topology file ({exc})",
                             hint='write {"gpus": [{"uuid": ..., "index": 0, "memory_mib": ...}], "links": [...]}') from exc
        return GpuDiscovery(gpus, reason="" if gpus else "the topology file lists no GPUs", links=links,
                            virtual=all(g.virtual for g in gpus))
    count = environ.get("DOCKYARD_GPUS")
    if count is None or count == "":
        return None
    if not count.isdigit():
        raise InputError(f"DOCKYARD_GPUS={count!r} is not a number of GPUs", hint="e.g. DOCKYARD_GPUS=8")
    gpus = tuple(Gpu(i, f"VIRTUAL-GPU-{i}", "virtual GPU", 81920, "", True) for i in range(int(count)))
    return GpuDiscovery(gpus, reason="" if gpus else "DOCKYARD_GPUS=0", virtual=True)


def inventory(environ: Mapping[str, str] | None = None) -> GpuDiscovery:
    """The GPUs runs are placed on: declared virtual GPUs if any, else what NVML finds.

    Raises:
        InputError: a malformed ``DOCKYARD_GPUS`` or ``DOCKYARD_GPU_TOPOLOGY``.
    """
    env = os.environ if environ is None else environ
    return _virtual(env) or discover_gpus()


def discover_gpus() -> GpuDiscovery:
    """Ask NVML for every GPU. Never raises: a machine without GPUs is a normal answer."""
    try:
        import pynvml  # from nvidia-ml-py
    except ImportError:
        return GpuDiscovery((), reason="nvidia-ml-py is not installed (pip install 'dockyard[gpu]')")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return GpuDiscovery((), reason=f"NVML unavailable: {exc} (no NVIDIA driver on this machine)")
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        gpus, handles = [], []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            bus = _text(pynvml.nvmlDeviceGetPciInfo(handle).busId)
            try:
                mig = bool(pynvml.nvmlDeviceGetMigMode(handle)[0])
            except pynvml.NVMLError:
                mig = False
            handles.append(handle)
            gpus.append(
                Gpu(
                    index=i,
                    uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                    name=_text(pynvml.nvmlDeviceGetName(handle)),
                    memory_mib=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total) // (1 << 20),
                    pci_bus_id=bus,
                    numa_node=_numa_node(bus),
                    mig=mig,
                )
            )
        links = _nvml_links(pynvml, handles, gpus)
        return GpuDiscovery(tuple(gpus), driver=driver, reason="" if gpus else "NVML reports 0 GPUs", links=links)
    except pynvml.NVMLError as exc:
        return GpuDiscovery((), reason=f"NVML query failed: {exc}")
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass
