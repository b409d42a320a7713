"""Handing the memory of large freed tensors back to the system at once.

The images run jemalloc as the allocator (docs/models.md). It keeps freed pages for a while (10 s by
default) to reuse them, which suits the small tensors every decoding step allocates and frees. But
when the server frees something large that it will not allocate again soon (the float32 weights the
int8 or packed layers replaced, the key/value storage of a batch that grew, shrank or emptied), those
pages would still count in its memory until they decay, on top of what replaced them.
`release_free_memory` returns them now: jemalloc purges its arenas; glibc's allocator trims its heap.
Measured on GPT-2 small in int8 (the worker process, 16 streams, twice each way): peak 823-825 ->
784-785 MB, memory after boot 587-588 -> 566 MB, tokens/s within noise. Returning freed pages at
every free instead (`MALLOC_CONF=dirty_decay_ms:0`) peaked at 769 MB but cost a third of the
throughput.
"""

from __future__ import annotations

import ctypes
import sys

# jemalloc's mallctl name for purging every arena's unused pages (MALLCTL_ARENAS_ALL is 4096).
_PURGE_ALL_ARENAS = b"arena.4096.purge"


def _allocator():
    """What this process's allocator offers: ("jemalloc", mallctl), ("glibc", malloc_trim) or (None, None)."""
    if sys.platform != "linux":
        return None, None
    try:
        process = ctypes.CDLL(None)
    except OSError:
        return None, None
    if hasattr(process, "mallctl"):  # preloaded jemalloc (LD_PRELOAD)
        mallctl = process.mallctl
        mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        return "jemalloc", mallctl
    if hasattr(process, "malloc_trim"):
        return "glibc", process.malloc_trim
    return None, None


_KIND, _CALL = _allocator()


def release_free_memory() -> None:
    """Give the pages of memory freed so far back to the system (nothing else changes)."""
    if _KIND == "jemalloc":
        _CALL(_PURGE_ALL_ARENAS, None, None, None, 0)
    elif _KIND == "glibc":
        _CALL(0)
