"""The ports a process listens on: whether one is free, and the one-line refusal when one is not.

A service checks its gRPC and metrics ports before it opens anything (an embedded PostgreSQL takes seconds to
start, and its logs would bury the one line that says why the service stopped); `modelforge up` checks every port
of the suite before it starts anything. The check is a probe, so a port taken between the check and the bind is
still possible: the bind's own failure ends in the same :class:`PortInUse`.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from modelforge_server import locks
from modelforge_server.settings import SettingsError

__all__ = [
    "INFERENCE_METRICS_PORT",
    "INFERENCE_PORT",
    "JOBS_METRICS_PORT",
    "JOBS_PORT",
    "AddressInUse",
    "NotAnAddressHere",
    "PortInUse",
    "REGISTRY_METRICS_PORT",
    "REGISTRY_PORT",
    "WORKER_METRICS_PORT",
    "check_private",
    "claim_private",
    "free",
    "listened",
]

# The suite's default ports, for the services' settings, their entry points and `modelforge up` alike: each
# service's gRPC port and /metrics port, and the first jobs worker's /metrics port (the next ones count up).
REGISTRY_PORT = 50051
INFERENCE_PORT = 50052
JOBS_PORT = 50053
REGISTRY_METRICS_PORT = 9101
INFERENCE_METRICS_PORT = 9102
JOBS_METRICS_PORT = 9103
WORKER_METRICS_PORT = 9104


class PortInUse(SettingsError):
    """Another process listens on a port this one is to listen on.

    A SettingsError: as with a malformed variable, the process cannot start until the setting changes (or the
    other process stops), so it ends the same way (``settings.reported``: one line, exit 2).
    """

    def __init__(self, port: int, use: str, remedy: str) -> None:
        super().__init__(taken(port, use, remedy))
        self.port = port


def taken(port: int, use: str, remedy: str) -> str:
    """What to tell of a port that cannot be bound: a listener holds it, or (for a port in the ephemeral range) a
    connection of this machine that is still closing."""
    return (
        f"port {port} ({use}) is in use by another process (or a connection still closing); stop it, or choose "
        f"another port with {remedy}"
    )


class AddressInUse(SettingsError):
    """Another process listens on the Unix socket this one is to listen on alone (MODELFORGE_PRIVATE_ADDRESS)."""

    def __init__(self, address: str) -> None:
        super().__init__(
            f"{address} (MODELFORGE_PRIVATE_ADDRESS) is in use by another process; stop it, or choose another address"
        )
        self.address = address


class NotAnAddressHere(ValueError):
    """A host to listen on names no interface of this machine; str() says why, for a message that adds the fix."""


def free(host: str, port: int, *, shared: bool = False) -> bool:
    """Whether no process listens on `port` of `host`: a socket binds to it without sharing it (SO_REUSEPORT),
    as one would while a server, gRPC's included, holds it. `shared`: whether a process may listen on it beside
    the ones there, that is whether none is there or all of them share it (SO_REUSEPORT, the same user).

    Raises:
        NotAnAddressHere: `host` does not resolve, or is no address of this machine.
    """
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise NotAnAddressHere(exc.strerror) from None
    except UnicodeError:  # the name cannot be encoded for a lookup (IDNA)
        raise NotAnAddressHere(_unencodable(host)) from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no owner
            if shared:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return False
                if exc.errno == errno.EADDRNOTAVAIL:
                    raise NotAnAddressHere("it is no address of this machine") from None
                raise
    return True


def _unencodable(host: str) -> str:
    labels = host.removesuffix(".").split(".")
    if any(len(label) > 63 for label in labels):
        return "a name with a label longer than 63 characters"
    if not all(labels):
        return "a name with an empty label"
    return "a name that cannot be encoded for a lookup"


def check_private(address: str) -> None:
    """Refuses a private address (``unix:PATH`` or ``unix-abstract:NAME``) that another process listens on or holds,
    or a PATH whose directory is missing or that names something other than a socket (gRPC would fail to bind it).

    Raises:
        AddressInUse: a process listens there, or holds the path's lock.
        SettingsError: the path cannot be a socket of this process.
    """
    held = claim_private(address)
    if held is not None:
        os.close(held)


def claim_private(address: str) -> int | None:
    """Checks a private address as :func:`check_private` does and, for ``unix:PATH``, holds it for this process
    until the returned descriptor is closed (or the process ends, however it ends): a lock on ``PATH.lock``
    beside it. gRPC removes a socket file it finds at PATH before it binds, so two processes that both checked
    PATH before either bound it would both bind it, the second taking it from the first; the lock lets one only.
    An abstract name needs no lock: the kernel refuses a second bind of it.

    Raises:
        AddressInUse: a process listens there, or holds the path's lock.
        SettingsError: the path cannot be a socket of this process, or its lock cannot be created.
    """
    scheme, _, name = address.partition(":")
    held = None
    if scheme == "unix":
        path = Path(name)
        if not path.parent.is_dir():
            raise SettingsError(f"MODELFORGE_PRIVATE_ADDRESS={address!r}: its directory {path.parent} does not exist")
        if path.exists() and not path.is_socket():
            raise SettingsError(f"MODELFORGE_PRIVATE_ADDRESS={address!r}: {path} is there and is not a socket")
        held = _lock(address, path.with_name(path.name + ".lock"))
    if listened(address):
        if held is not None:
            os.close(held)
        raise AddressInUse(address)
    return held


def _lock(address: str, path: Path) -> int:
    try:
        held = locks.hold(path)
    except OSError as exc:
        raise SettingsError(
            f"MODELFORGE_PRIVATE_ADDRESS={address!r}: cannot create its lock {path}: {exc.strerror}"
        ) from None
    if held is None:
        raise AddressInUse(address)
    return held


def listened(address: str) -> bool:
    """Whether a process listens on the Unix socket `address` (``unix:PATH`` or ``unix-abstract:NAME``): it takes a
    connection. gRPC removes a socket file it finds at PATH before it binds, so a second server would take the
    path from under a first one without this check; an abstract name it refuses on its own."""
    scheme, _, name = address.partition(":")
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect("\0" + name if scheme == "unix-abstract" else name)
        except OSError:
            return False
    return True
