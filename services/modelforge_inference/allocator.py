"""glibc's allocator told to keep freed memory for reuse, so that large tensors do not cost page faults.

By default glibc serves every allocation over 128 KiB (raised dynamically up to 32 MiB) with a fresh ``mmap`` and
gives it back on free, and trims the heap as soon as 128 KiB are free at its top. An inference server allocates
and frees the same few large buffers on every request (ONNX Runtime's outputs, the serialised response), so each
request then pays for the kernel to map, zero and unmap megabytes: on the image generator (3 MiB per output) that
was about half the server's CPU per call (docs/PERFORMANCE.md). :func:`keep_freed_memory` raises both thresholds,
so those buffers come from, and go back to, the heap.

The cost is resident memory: up to `trim_threshold` bytes freed at the heap's top stay with the process, and
memory freed inside the heap stays too, for reuse. A model version's session takes its weights and arena from the
heap as well; unloaded beside live requests, whose buffers sit between its chunks, it would leave its memory there,
and versions coming and going (an LRU evicting under traffic) would add up to gigabytes. The engine calls
:func:`release_freed_memory` once a version is unloaded. Operators who set glibc's own ``MALLOC_MMAP_THRESHOLD_`` or
``MALLOC_TRIM_THRESHOLD_`` keep their values: nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_OWN_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

MMAP_THRESHOLD = 64 << 20  # allocations up to 64 MiB come from the heap
TRIM_THRESHOLD = 256 << 20  # up to 256 MiB free at the heap's top are kept


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def release_freed_memory() -> bool:
    """Gives the pages the heap holds free back to the system (glibc's ``malloc_trim(0)``, which also releases
    whole free pages inside the heap, not only at its top); False where the allocator is not glibc's. Takes a few
    milliseconds on a large heap, without the GIL: call it on a thread."""
    libc = _libc() if sys.platform.startswith("linux") else None
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return False
    trim(0)
    return True


def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Applies the thresholds through ``mallopt``; False where that is not glibc's, or the operator chose."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in _OWN_SETTINGS):
        return False
    mallopt = getattr(_libc(), "mallopt", None)  # glibc only: musl and others have no mallopt
    if mallopt is None:
        return False
    applied = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    if not applied:
        log.warning("glibc refused the allocator thresholds; large tensors will be mapped afresh per request")
    return applied
