"""The embedded Redis: a port taken between picking it and binding it does not stop the start; one directory is
one process's, and a server a dead process left running on it is stopped first."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from modelforge_server import embedded


def test_redis_moves_to_another_port_when_the_picked_one_is_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        picks: Iterator[int] = iter([busy])
        real_pick = embedded.free_port
        monkeypatch.setattr(embedded, "free_port", lambda avoid=(): next(picks, None) or real_pick(avoid=avoid))

        url, stop = embedded.start_redis(tmp_path)
        try:
            assert f":{busy}/" not in url
            with redis.Redis.from_url(url) as client:
                assert client.ping()
        finally:
            stop()


def test_redis_on_a_requested_port_that_is_taken_fails_and_names_it(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]

        with pytest.raises(RuntimeError, match=f"exited with code 1 before listening on port {busy}"):
            embedded.start_redis(tmp_path, port=busy)


_HOLD_REDIS = """
import signal, sys, time
from pathlib import Path
from modelforge_server import embedded
url, stop = embedded.start_redis(Path(sys.argv[1]))
signal.signal(signal.SIGTERM, lambda *_: (stop(), sys.exit(0)))
print(url, flush=True)
time.sleep(600)
"""


@contextmanager
def holder_of(data_dir: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Another process that runs the embedded Redis of `data_dir`: the process and the Redis URL."""
    with subprocess.Popen(
        [sys.executable, "-c", _HOLD_REDIS, str(data_dir)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    ) as holder:
        assert holder.stdout is not None
        try:
            yield holder, holder.stdout.readline().strip()
        finally:
            holder.terminate()


def test_a_second_process_on_the_same_redis_directory_is_refused(tmp_path: Path) -> None:
    with holder_of(tmp_path) as (_, url):
        with pytest.raises(RuntimeError, match="is in use by another process"):
            embedded.start_redis(tmp_path)
        with redis.Redis.from_url(url) as client:
            assert client.ping()  # the holder's server was left alone


def test_a_redis_left_running_by_a_process_that_died_is_stopped_before_a_new_one_starts(tmp_path: Path) -> None:
    with holder_of(tmp_path) as (holder, url):
        (orphan,) = embedded._redis_servers_in((tmp_path / "redis").resolve())
        with redis.Redis.from_url(url) as client:
            client.set("kept", "yes")
        holder.kill()  # its redis-server runs on, in a session of its own
        holder.wait()
    assert embedded._alive(orphan)

    url, stop = embedded.start_redis(tmp_path)
    try:
        assert not embedded._alive(orphan)
        with redis.Redis.from_url(url) as client:
            assert client.get("kept") == b"yes"  # the orphan wrote its file out on SIGTERM
    finally:
        stop()


def test_a_redis_an_older_version_left_running_without_a_pid_file_is_stopped_too(tmp_path: Path) -> None:
    rdir = tmp_path / "redis"
    rdir.mkdir()
    port = embedded.free_port()
    command = [embedded.redis_executable(), "--port", str(port), "--dir", str(rdir), "--appendonly", "yes"]
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, start_new_session=True) as older:
        try:
            url = f"redis://127.0.0.1:{port}/0"
            with redis.Redis.from_url(url) as client:
                for _ in range(100):  # until it answers
                    with contextlib.suppress(redis.ConnectionError):
                        client.set("kept", "yes")
                        break
                    time.sleep(0.05)
            _, stop = embedded.start_redis(tmp_path)
            try:
                assert older.wait(timeout=15) is not None  # stopped, not left beside the new one on its files
            finally:
                stop()
        finally:
            if older.poll() is None:
                older.kill()
