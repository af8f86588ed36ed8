"""core/memory.py: tensors of a training step's size come from malloc's heap, not from mmap."""

import subprocess
import sys
import textwrap

import pytest

# Counts the blocks glibc serves with their own mmap while a 4 MiB array is alive. Run in a
# fresh interpreter: this one's allocator has long since adjusted its threshold by itself.
PROBE = textwrap.dedent("""
    import ctypes, sys
    import numpy as np
    from mlsd_ray.core.memory import reuse_freed_memory

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    if sys.argv[1] == "reuse":
        assert reuse_freed_memory() is True
        assert reuse_freed_memory() is True  # idempotent
    before = libc.mallinfo2().hblks
    block = np.ones(4 * 1024 * 1024, dtype=np.uint8)
    print(libc.mallinfo2().hblks - before)
""")


def _mmapped_blocks(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="mallopt and mallinfo2 are glibc's; other C libraries are left alone")
def test_a_step_sized_tensor_comes_from_the_heap_once_set():
    assert _mmapped_blocks("default") == 1  # glibc's default: its own mapping, unmapped on free
    assert _mmapped_blocks("reuse") == 0
