# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Keep freed tensor memory in the process on glibc (CPU training).

A CPU training step allocates and frees hundreds of activation-sized
tensors. With glibc's default settings every block above the mmap
threshold (at most 32 MiB after its dynamic adjustment) is a fresh
``mmap`` and goes back to the kernel when freed, and the top of the heap is
trimmed, so the next step touches new pages again: on BHViT-small (batch 8)
that is ~0.6–0.8 million page faults per step, a quarter of the step time
as system time (``tools/analysis_tools/benchmark_train_step.py``; the
README's "Training speed" has the figures).

:func:`keep_freed_memory` raises the mmap threshold, keeps freed memory
(no trimming, one arena, padding at the top of the heap), the effect of
``MALLOC_MMAP_THRESHOLD_`` and friends, set from inside the process
with ``mallopt``. The cost: the process keeps its peak memory instead of
giving it back between steps. With one arena, threads that allocate at
the same time wait on its lock; the packed engine's C++ kernels therefore
take their scratch memory from per-thread stacks (``csrc/core/scratch.h``)
and do not allocate in steady state. ``tools/train.py``,
``tools/test.py`` and the demo call it on machines without an accelerator
(through :func:`mmbhvit.utils.launch.setup_cpu_runtime`);
``MMBHVIT_MALLOC=default`` leaves glibc as it is. It is a no-op
on other C libraries (musl, macOS, Windows) and when another allocator
(jemalloc, tcmalloc) is preloaded, glibc's settings then concern nobody.
"""
import ctypes
import os
import platform
from typing import Dict

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -2, -3, -8

SETTINGS = {
    'M_MMAP_THRESHOLD': (_M_MMAP_THRESHOLD, 1 << 30),  # mmap only >= 1 GiB
    # never trim the heap (mallopt takes a C int: the largest one)
    'M_TRIM_THRESHOLD': (_M_TRIM_THRESHOLD, 2**31 - 1),
    'M_TOP_PAD': (_M_TOP_PAD, 256 << 20),  # grow the heap 256 MiB at a time
    'M_ARENA_MAX': (_M_ARENA_MAX, 1),  # one heap for all threads
}


def keep_freed_memory() -> Dict[str, bool]:
    """Apply :data:`SETTINGS` with glibc's ``mallopt``.

    Returns:
        dict: setting name to whether glibc accepted it; empty when nothing
        was tried (not glibc, or ``MMBHVIT_MALLOC=default``).
    """
    if os.environ.get('MMBHVIT_MALLOC', '') == 'default':
        return {}
    if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
        return {}
    try:
        mallopt = ctypes.CDLL('libc.so.6').mallopt
    except (OSError, AttributeError):
        return {}
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], \
        ctypes.c_int
    return {
        name: bool(mallopt(param, value))
        for name, (param, value) in SETTINGS.items()
    }
