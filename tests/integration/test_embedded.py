"""The embedded Redis: a port taken between picking it and binding it does not stop the start."""

from __future__ import annotations

import socket
from collections.abc import Iterator
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
        monkeypatch.setattr(embedded, "free_port", lambda: next(picks, None) or real_pick())

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
