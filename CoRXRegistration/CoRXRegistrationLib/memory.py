"""The C allocator's side of memory use (glibc on Linux; no-ops elsewhere).

torch and numpy free large arrays back to glibc's heap, which keeps them for reuse instead of returning
them to the system. Handing the free pages back between the stages of a registration was measured and
not kept: 0.05-0.1 GB lower peaks for 0.3-0.5 s more per pair (the pages are faulted in again by the
next stage). The benchmarks hand them back before measuring a block, so each block's peak is its own."""
from __future__ import annotations

import sys


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def release_free_memory() -> bool:
    """Return the heap's free pages to the system (glibc ``malloc_trim(0)``: a few milliseconds); True
    when glibc did so."""
    libc = _libc()
    try:
        return bool(libc is not None and libc.malloc_trim(0))
    except AttributeError:                       # not glibc (e.g. musl)
        return False


def one_malloc_arena() -> bool:
    """Ask glibc for a single malloc arena, before any thread starts. The reading, SSIM and writing
    threads otherwise each get an arena that keeps what they freed: a 4-time-point series then peaks at
    1.72-1.76 GB instead of 1.54-1.59 GB, in the same time (2-core CPU, docs/evaluation.md). True when
    set. The command line does this; the Slicer modules leave Slicer's process alone."""
    libc = _libc()
    try:
        return bool(libc is not None and libc.mallopt(-8, 1))   # M_ARENA_MAX = -8 in glibc's malloc.h
    except AttributeError:
        return False
