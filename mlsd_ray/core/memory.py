"""How a process that runs PyTorch on the CPU gets its memory: `reuse_freed_memory`.

glibc's malloc serves every request of 128 KiB or more with its own `mmap`, and gives the pages
back on `free`. A CPU training step allocates many tensors of that size (a batch of 64 digits
through seed_cnn: activations and gradients of 128 KiB to a few MiB), so every step maps fresh
pages and page-faults on their first touch, zeroed by the kernel. glibc raises that threshold
by itself only after a larger block is freed, so whether a process runs fast can depend on
something unrelated having allocated a big block earlier. Our bare-PyTorch baseline trained at
4,650 images/s because its full-split validation did that, and at 3,380 without it
(docs/performance.md, "The allocator").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

__all__ = ["claim_cpus_for_torch", "MMAP_THRESHOLD", "reuse_freed_memory", "TRIM_THRESHOLD"]

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc's own ceiling for the threshold it adjusts by itself (DEFAULT_MMAP_THRESHOLD_MAX on
# 64-bit), and the trim threshold it pairs with it: what a process reaches anyway after one
# large free, set from the start.
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD


@functools.cache
def reuse_freed_memory() -> bool:
    """Serve allocations below 32 MiB from malloc's heap and keep up to 64 MiB of freed memory
    there, in this process, so that tensors freed by one step are reused by the next instead of
    being unmapped and faulted in again. Returns False where the C library is not glibc (musl,
    macOS): nothing is changed there. Idempotent."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def claim_cpus_for_torch(threads: int) -> None:
    """Set up a process whose work is torch on the CPU (a model replica, an offline-prediction
    actor): `threads` torch threads, since such processes share the machine, and freed tensors
    kept for the next batch (`reuse_freed_memory`)."""
    import torch

    torch.set_num_threads(threads)
    reuse_freed_memory()
