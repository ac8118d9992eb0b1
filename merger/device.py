"""Compute devices and CPUs: ``--device auto|cpu|cuda[:i]`` resolved, without importing torch
where no GPU can be present, and the CPUs this process may use."""

from __future__ import annotations

import os
import re

from merger.errors import UsageError

# a GPU driver leaves one of these behind (NVIDIA; ROCm's kfd); without any, torch can't see a GPU either
GPU_DEVICE_PATHS = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/proc/driver/nvidia")


def gpu_possible() -> bool:
    """Whether a CUDA (or ROCm) device could be visible: a driver's device file exists."""
    return any(os.path.exists(p) for p in GPU_DEVICE_PATHS)


def usable_cpus() -> int:
    """CPUs this process may run on (a container's cpuset, ``taskset``), not the host's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def resolve_device(device: str, *, allow_mps: bool = False) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; checks ``cuda:i`` exists.

    torch (1 s to import) is imported only to answer a question about a GPU: ``cpu`` never
    imports it, nor does ``auto`` on a machine with no GPU driver (none of ``GPU_DEVICE_PATHS``
    exists); ``auto`` with a driver, ``cuda[:i]`` and ``mps`` ask torch.

    ``allow_mps``: also accept Apple's ``mps`` where it is there (evaluation runs on it; the merge
    kernel is only tested on CPU and CUDA).
    """
    if device == "cpu" or (device == "auto" and not gpu_possible()):
        return "cpu"
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if re.fullmatch(r"cuda(:\d+)?", device):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA device is visible", hint="use --device cpu")
        idx = device.partition(":")[2]
        if idx and int(idx) >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices")
        return device
    if allow_mps and device in ("mps", "mps:0") and torch.backends.mps.is_available():
        return device
    raise UsageError(f"--device {device!r}: unknown device", hint="use auto, cpu, cuda or cuda:N")
