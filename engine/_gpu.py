"""GPU discovery through NVML (nvidia-ml-py), keyed by UUID, never by index.

NVML is optional: without the ``gpu`` extra or without a driver, discovery says why there are none.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Gpu", "GpuDiscovery", "discover_gpus"]


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    name: str
    memory_mib: int
    pci_bus_id: str
    virtual: bool = False


@dataclass(frozen=True)
class GpuDiscovery:
    """The GPUs found, the driver version, and ``reason`` when none were found."""

    gpus: tuple[Gpu, ...]
    driver: str = ""
    reason: str = ""


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


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
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            gpus.append(
                Gpu(
                    index=i,
                    uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                    name=_text(pynvml.nvmlDeviceGetName(handle)),
                    memory_mib=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total) // (1 << 20),
                    pci_bus_id=_text(pynvml.nvmlDeviceGetPciInfo(handle).busId),
                )
            )
        return GpuDiscovery(tuple(gpus), driver=driver, reason="" if gpus else "NVML reports 0 GPUs")
    except pynvml.NVMLError as exc:
        return GpuDiscovery((), reason=f"NVML query failed: {exc}")
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass
