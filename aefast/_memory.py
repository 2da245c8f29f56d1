"""Keeping freed memory in a CPU process (glibc): large tensors from the heap instead of
fresh mappings. The benchmarks time with it (aefast.bench.harness) and the training
loop runs under it (aefast.train.loop)."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys

import torch


@functools.cache
def libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
# After a mallopt glibc no longer adjusts its thresholds itself; restored to where
# its own adjustment leads once large tensors have been freed (the largest
# freed mapping up to 32 MiB, trim at twice that), not to the 128 KiB it starts at.
_MMAP_AFTER, _TRIM_AFTER = 32 << 20, 64 << 20
# While kept: no block mapped anew below 1 GiB, the heap never trimmed.
_MMAP_KEPT, _TRIM_KEPT = 1 << 30, 2**31 - 1


def kept_memory_environment() -> dict[str, str]:
    """The same for a child process, from its start: glibc's environment variables."""
    return {"MALLOC_MMAP_THRESHOLD_": str(_MMAP_KEPT), "MALLOC_TRIM_THRESHOLD_": str(_TRIM_KEPT)}


@contextlib.contextmanager
def freed_memory_kept(device: torch.device):
    """For a CPU run (glibc), memory freed by one call stays in the process for the
    next instead of going back to the system: large tensors come from the heap, not
    from fresh mappings. glibc maps every block over 32 MiB anew and unmaps it when
    freed, so each training step faulted in its gradients and activations again: a
    TopKSAE step (1024 x 768 -> 16384) took 140 ms, 121 ms with this. On the project's
    VM (Firecracker, free page reporting of 8 MiB blocks) the system's fresh memory took
    3-5 ms or 70-110 ms for 64 MB at random, whoever asked. The process's resident
    memory stays at its peak instead of falling between steps. Yields whether it took
    effect (not on a glibc that refuses a threshold over 32 MiB, nor on a GPU)."""
    lib = libc() if device.type == "cpu" and sys.platform == "linux" else None
    glibc = lib is not None and hasattr(lib, "mallopt")
    # Only a threshold that was set is set back: a refused one left glibc adjusting its own.
    mmap_set = glibc and lib.mallopt(_M_MMAP_THRESHOLD, _MMAP_KEPT) == 1
    trim_set = mmap_set and lib.mallopt(_M_TRIM_THRESHOLD, _TRIM_KEPT) == 1
    try:
        yield trim_set
    finally:
        if mmap_set:
            lib.mallopt(_M_MMAP_THRESHOLD, _MMAP_AFTER)
        if trim_set:
            lib.mallopt(_M_TRIM_THRESHOLD, _TRIM_AFTER)
        if mmap_set:
            lib.malloc_trim(0)
