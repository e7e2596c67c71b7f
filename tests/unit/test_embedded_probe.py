"""accepts_connections: how `modelforge up` tells that an embedded PostgreSQL or Redis has stopped."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from modelforge_server.embedded import accepts_connections


def test_a_tcp_port_someone_listens_on_accepts_and_a_closed_one_does_not(closed_port: int) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert accepts_connections(f"redis://127.0.0.1:{port}/0")
        assert accepts_connections(f"postgresql://postgres:@127.0.0.1:{port}/postgres")
    assert not accepts_connections(f"redis://127.0.0.1:{closed_port}/0")


def test_a_unix_socket_directory_accepts_once_postgres_socket_listens(tmp_path: Path) -> None:
    url = f"postgresql://postgres:@/postgres?host={tmp_path}"
    assert not accepts_connections(url)  # no socket file
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tmp_path / ".s.PGSQL.5432"))
        assert not accepts_connections(url)  # a socket file nobody listens on (a server that died)
        server.listen()
        assert accepts_connections(url)


def test_a_unix_socket_url_without_a_port_takes_pgport_as_libpq_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGPORT", "55432")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tmp_path / ".s.PGSQL.55432"))
        server.listen()
        assert accepts_connections(f"postgresql://postgres:@/postgres?host={tmp_path}")
