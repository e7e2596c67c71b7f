"""SharedMemoryRegions on files standing in for /dev/shm: what a region maps, and how long the mapping lives."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from modelforge_inference.errors import (
    InvalidSharedMemoryRegion,
    SharedMemoryKeyNotFound,
    SharedMemoryOff,
    SharedMemoryRegionExists,
    SharedMemoryRegionNotFound,
    SharedMemoryRegionsFull,
)
from modelforge_inference.shm import SharedMemoryRegions, region_limit


@pytest.fixture
def regions(tmp_path: Path) -> SharedMemoryRegions:
    (tmp_path / "object").write_bytes(bytes(range(256)) * 16)  # 4 KiB
    return SharedMemoryRegions(enabled=True, directory=tmp_path)


def test_a_region_maps_its_slice_of_the_object(regions: SharedMemoryRegions, tmp_path: Path) -> None:
    region = regions.register("r", "/object", 100, 50)
    assert (region.key, region.offset, region.byte_size) == ("/object", 100, 50)
    assert bytes(regions.slice("r", 10, 5, tensor="t")) == bytes(range(110, 115))
    regions.slice("r", 0, 4, tensor="t")[:] = b"abcd"
    assert (tmp_path / "object").read_bytes()[100:104] == b"abcd"  # writes reach the object itself


def test_a_view_outlives_the_unregistered_region(regions: SharedMemoryRegions) -> None:
    regions.register("r", "object", 0, 4096)
    view = np.frombuffer(regions.slice("r", 0, 16, tensor="t"), dtype=np.uint8)
    regions.unregister("r")
    assert view.tolist() == list(range(16))  # still mapped while a request holds it
    with pytest.raises(SharedMemoryRegionNotFound):
        regions.slice("r", 0, 16, tensor="t")


@pytest.mark.parametrize(
    ("offset", "byte_size"),
    [(0, 4097), (4000, 100), (-1, 10), (10, -1)],
    ids=["long", "past", "neg-offset", "neg-size"],
)
def test_a_slice_outside_the_region_is_refused(regions: SharedMemoryRegions, offset: int, byte_size: int) -> None:
    regions.register("r", "/object", 0, 4096)
    with pytest.raises(InvalidSharedMemoryRegion, match="the region holds 4096"):
        regions.slice("r", offset, byte_size, tensor="t")


def test_a_slice_of_an_object_cut_short_since_registering_is_refused(
    regions: SharedMemoryRegions, tmp_path: Path
) -> None:
    regions.register("r", "/object", 1024, 2048)
    (tmp_path / "object").write_bytes(bytes(3000))  # now ends inside the region
    with pytest.raises(InvalidSharedMemoryRegion, match="was cut to 3000 bytes"):
        regions.slice("r", 0, 4, tensor="t")
    (tmp_path / "object").write_bytes(bytes(3072))  # holds the region again
    assert bytes(regions.slice("r", 0, 4, tensor="t")) == bytes(4)


def test_close_forgets_every_region_while_views_stay_mapped(regions: SharedMemoryRegions) -> None:
    regions.register("a", "/object", 0, 16)
    view = regions.slice("a", 0, 16, tensor="t")
    regions.close()
    assert regions.status("") == []
    assert bytes(view) == bytes(range(16))


def test_registration_checks_name_key_and_bounds(regions: SharedMemoryRegions, tmp_path: Path) -> None:
    with pytest.raises(InvalidSharedMemoryRegion, match="holds 4096 bytes"):
        regions.register("r", "/object", 4000, 100)
    with pytest.raises(SharedMemoryKeyNotFound):
        regions.register("r", "/missing", 0, 1)
    for key in ("", "/", "/a/b", "/..", ".", "/a\0b", "/" + "x" * 256):
        with pytest.raises(InvalidSharedMemoryRegion, match="POSIX shared memory name"):
            regions.register("r", key, 0, 1)
    (tmp_path / "directory").mkdir()
    with pytest.raises(InvalidSharedMemoryRegion, match="'/directory' cannot be opened as one: Is a directory"):
        regions.register("r", "/directory", 0, 1)
    regions.register("r", "/object", 0, 1)
    with pytest.raises(SharedMemoryRegionExists):
        regions.register("r", "/object", 0, 2)
    assert [r.byte_size for r in regions.status("")] == [1]


def test_unregistering_an_empty_name_forgets_every_region(regions: SharedMemoryRegions) -> None:
    regions.register("a", "/object", 0, 1)
    regions.register("b", "/object", 1, 1)
    regions.unregister("unknown")
    assert [r.name for r in regions.status("")] == ["a", "b"]
    regions.unregister("")
    assert regions.status("") == []


def test_everything_is_refused_while_off(tmp_path: Path) -> None:
    regions = SharedMemoryRegions(enabled=False, directory=tmp_path)
    for call in (
        lambda: regions.register("r", "/object", 0, 1),
        lambda: regions.unregister(""),
        lambda: regions.status(""),
        lambda: regions.slice("r", 0, 1, tensor="t"),
    ):
        with pytest.raises(SharedMemoryOff):
            call()


def test_regions_past_the_servers_limit_are_resource_exhausted(tmp_path: Path) -> None:
    (tmp_path / "object").write_bytes(bytes(4096))
    regions = SharedMemoryRegions(enabled=True, directory=tmp_path, max_regions=3)
    for name in "abc":
        regions.register(name, "/object", 0, 4096)
    with pytest.raises(SharedMemoryRegionsFull, match="3 regions are registered, the most this server holds"):
        regions.register("d", "/object", 0, 4096)
    regions.unregister("a")
    regions.register("d", "/object", 0, 4096)  # room again


def test_the_default_limit_leaves_most_file_descriptors_to_the_rest_of_the_server() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert 16 <= region_limit() <= max(16, min(1024, soft // 8))


def test_running_out_of_file_descriptors_is_resource_exhausted_not_a_bad_key(tmp_path: Path) -> None:
    (tmp_path / "object").write_bytes(bytes(4096))
    script = f"""
import os, resource
import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from modelforge_inference.errors import SharedMemoryRegionsFull
from modelforge_inference.shm import SharedMemoryRegions
regions = SharedMemoryRegions(enabled=True, directory=Path({str(tmp_path)!r}), max_regions=10_000)
open_now = len(os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 7, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
try:
    for i in range(100):
        regions.register(f"r{{i}}", "/object", 0, 4096)
except SharedMemoryRegionsFull as exc:
    print("FULL", i, exc)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.startswith("FULL "), done.stdout + done.stderr
    assert "the server has no file descriptor left to open it" in done.stdout


@pytest.fixture
def huge_object() -> Iterator[str]:
    """A sparse shared memory object of 4 EiB (tmpfs keeps no page of it), as a client may register."""
    name = f"modelforge-test-{os.getpid()}-huge"
    path = Path("/dev/shm") / name
    path.write_bytes(b"")
    os.truncate(path, 1 << 62)
    try:
        yield name
    finally:
        path.unlink()


def test_a_region_far_into_an_object_maps_its_own_pages_and_one_too_large_to_map_is_refused(
    huge_object: str,
) -> None:
    regions = SharedMemoryRegions(enabled=True, directory=Path("/dev/shm"))
    region = regions.register("tail", huge_object, (1 << 62) - 8, 8)  # used to map all 4 EiB before it
    assert bytes(regions.slice("tail", 0, 8, tensor="t")) == bytes(8)
    assert region.memory.nbytes == 8
    with pytest.raises(InvalidSharedMemoryRegion, match=f"{1 << 62} bytes of shared memory object .* cannot be mapped"):
        regions.register("whole", huge_object, 0, 1 << 62)
    regions.close()
