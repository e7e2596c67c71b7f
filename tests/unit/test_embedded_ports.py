"""free_port: the port an embedded Redis takes, never one the suite is about to listen on itself."""

from __future__ import annotations

from modelforge_server.embedded import free_port


def test_a_free_port_is_none_of_those_to_avoid() -> None:
    # `modelforge up` plans its services' ports (free, not yet bound) before it starts the embedded Redis; a Redis
    # on one of them made the service planned there fail to bind.
    planned = {free_port() for _ in range(64)}
    assert not {free_port(avoid=planned) for _ in range(256)} & planned
