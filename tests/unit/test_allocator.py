"""The inference process's allocator thresholds (modelforge_inference.allocator)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from modelforge_inference import allocator


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_the_thresholds_apply_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    assert allocator.keep_freed_memory() is True


@pytest.mark.parametrize("variable", ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"])
def test_an_operators_own_glibc_setting_is_left_alone(monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    monkeypatch.setenv(variable, "131072")
    assert allocator.keep_freed_memory() is False


_HELD_AFTER_FREE = """
import ctypes, sys
from modelforge_inference import allocator
from modelforge_inference.sessions import resident_bytes

assert allocator.keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
big, kept = [], []
for _ in range(256):  # 256 MiB in blocks the heap serves, each followed by one that stays, as live buffers do
    block = libc.malloc(1 << 20)
    ctypes.memset(block, 1, 1 << 20)
    big.append(block)
    kept.append(libc.malloc(128 << 10))
before = resident_bytes()
for block in big:
    libc.free(block)
freed = resident_bytes()
released = allocator.release_freed_memory()
print(released, before >> 20, freed >> 20, resident_bytes() >> 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_memory_freed_inside_the_heap_goes_back_to_the_system_once_released(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a session unloaded beside live requests leaves: freed chunks between ones still in use, which the kept
    thresholds hold in the heap until released."""
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    ran = subprocess.run(
        [sys.executable, "-c", _HELD_AFTER_FREE], capture_output=True, text=True, timeout=60, check=True
    )
    released, before, freed, after = ran.stdout.split()
    assert released == "True"
    assert int(freed) > int(before) - 64  # held by the heap, between the blocks that stay
    assert int(after) < int(freed) - 192  # most of the 256 MiB gone back
