"""glibc's allocator told to keep freed memory for reuse, so that large tensors do not cost page faults.

By default glibc serves every allocation over 128 KiB (raised dynamically up to 32 MiB) with a fresh ``mmap`` and
gives it back on free, and trims the heap as soon as 128 KiB are free at its top. An inference server allocates
and frees the same few large buffers on every request (ONNX Runtime's outputs, the serialised response), so each
request then pays for the kernel to map, zero and unmap megabytes: on the image generator (3 MiB per output) that
was about half the server's CPU per call (docs/PERFORMANCE.md). :func:`keep_freed_memory` raises both thresholds,
so those buffers come from, and go back to, the heap.

The cost is resident memory: up to `trim_threshold` bytes freed at the heap's top stay with the process. Operators
who set glibc's own ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` keep their values: nothing is changed.
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


def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Applies the thresholds through ``mallopt``; False where that is not glibc's, or the operator chose."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in _OWN_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt  # glibc only: musl and others have no mallopt
    except (OSError, AttributeError):
        return False
    applied = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    if not applied:
        log.warning("glibc refused the allocator thresholds; large tensors will be mapped afresh per request")
    return applied
