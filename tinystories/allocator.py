"""Keep freed memory for reuse: the one process-wide setting that speeds up CPU training most.

    from tinystories.allocator import keep_freed_memory
    keep_freed_memory()   # once, before training on the CPU; True where it took effect (glibc)

PyTorch has a caching allocator on GPUs but none on the CPU: every tensor comes from malloc. glibc
serves blocks over 32 MB (at most; 128 KB until it adapts) with a fresh mmap and gives them back to
the kernel on free, so every large activation of every step (a 2,048 x 50,257 bf16 logits tensor is
206 MB) is mapped again and zero-filled page by page on first touch. On the 2-core EPYC of
BENCHMARKS.md that page faulting took about a third of a `33m` training step. With mmap switched off
and the heap never trimmed, freed blocks stay in the process and the next step reuses them.

The price: the process keeps its peak memory until it exits, which is what a training run does
anyway. Other allocators (jemalloc, tcmalloc via LD_PRELOAD) do the same job; this needs nothing
installed. Elsewhere than glibc (macOS, musl) it does nothing and returns False.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_NEVER = 2**31 - 1  # mallopt takes an int: the largest trim threshold it accepts (2 GiB)

_applied = False


def keep_freed_memory() -> bool:
    """Tell glibc to serve every allocation from its heap and never return freed memory early."""
    global _applied
    if _applied:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; both must hold, or blocks would still be unmapped on free
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _NEVER))
    return _applied
