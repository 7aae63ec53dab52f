"""Process memory: current and peak resident set on the CPU, peak allocated memory on a GPU."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource

import torch


def rss_mib() -> float:
    """This process's current resident set."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss where /proc exists: Linux carries that over from
    the parent through fork + exec, so a spawned child would report the parent's peak, and it cannot be reset."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; macOS: bytes (rough)


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs).
    False where that is not possible; the peak then keeps counting from the process's start."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak-memory window on `device` (see `peak_memory_mib`)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    return reset_peak_rss()


def peak_memory_mib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch on a CUDA device, else the process's peak resident set; both since the
    last `reset_peak_memory`."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mib()


def return_freed_memory() -> bool:
    """Ask the C allocator to hand freed heap pages back to the OS (glibc `malloc_trim(0)`), so the resident set
    reflects live memory. False where that is not available (not glibc)."""
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)  # returns 1 if memory was released, 0 if there was none to release
    except (OSError, AttributeError, TypeError):
        return False
    return True
