"""How a training process uses host memory: glibc's malloc keeps what XLA frees.

XLA allocates a step's temporaries afresh at every step. By default glibc hands large
blocks straight to the kernel (``mmap``/``munmap``), trims the heap when the top is free,
and gives each thread its own arena, which it also trims: so every step maps the same
memory again and touches it page by page, one page fault per 4 KiB. ``keep_freed_memory``
tells glibc to serve large blocks from the heap, never to trim it and to keep one arena,
so that after the first steps a step reuses the pages it had. The process's peak memory
stays what it was; it just is not given back between steps. Measured speeds are in the
README ("Sharding and speed"); ``CPT_JAX_MALLOC=system`` leaves malloc as it is.

The scripts that train, prepare or time a step set it when they start
(``cpt_jax.cli.run_main``: train, sweep, prepare_data, benchmark, generate, modules), so
a run, a sweep and the benchmark's timed process of our step all train the same way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

ENV = "CPT_JAX_MALLOC"
# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
SETTINGS = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_ARENA_MAX, 1))


def keep_freed_memory() -> bool:
    """Apply ``SETTINGS`` through glibc's ``mallopt``; True when applied. A C library
    without ``mallopt`` (macOS, musl) or ``CPT_JAX_MALLOC=system`` leaves malloc alone."""
    if os.environ.get(ENV, "") == "system":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in SETTINGS)
