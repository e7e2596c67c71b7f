"""The PostgreSQL connection pool and the migration runner that every service with tables uses."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import logging
import os
import re
import socket
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any

import psycopg
from psycopg import AsyncConnection, sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from modelforge_server import logs
from modelforge_server.settings import SettingsError

log = logging.getLogger("modelforge.db")
# psycopg_pool logs each failed reconnection attempt, a WARNING about every second of an outage that the dependency
# probes already report once: its lines pass at most once a minute.
_POOL_LOG_THROTTLE = logs.Throttle(60.0)

_MIGRATION = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")

# The loop time by which the current task's database operation must end (`connection`), so that the pool's check
# of the connection it hands out, which runs in the caller's task, ends by then too.
_deadline: ContextVar[float | None] = ContextVar("modelforge_db_deadline", default=None)


class OperationTimedOut(psycopg.OperationalError):
    """PostgreSQL did not finish an operation within its bound, so its connection was cut."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"PostgreSQL did not answer within {seconds:g} s")
        self.seconds = seconds


def _cut(conn: AsyncConnection[Any]) -> None:
    """Shuts the connection's socket down, so that whatever awaits an answer on it fails at once.

    PostgreSQL that is stopped, stuck on its disk or behind a network partition never answers, and the kernel may
    still acknowledge every packet, so nothing on the connection ever fails by itself. Cancelling the waiting task
    is no way out: psycopg then sends PostgreSQL a cancel request and waits for it, up to 10 s more. After a
    shutdown, libpq reads the end of the stream: the statement fails with OperationalError, and the pool discards
    the broken connection when it comes back.
    """
    with contextlib.suppress(OSError, psycopg.Error):
        fd = conn.pgconn.socket
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)


class Bound:
    """Cuts a connection once PostgreSQL has taken `seconds` over a block's work (see `bound`); `paused()` leaves
    out a part of the block that is not PostgreSQL's doing, after which the bound starts again."""

    def __init__(self, conn: AsyncConnection[Any], seconds: float | None) -> None:
        self._conn = conn
        self.seconds = seconds
        self.cut = False
        self._handle: asyncio.TimerHandle | None = None

    def _arm(self, within: float | None = None) -> None:
        if self.seconds is not None:
            delay = self.seconds if within is None else within
            self._handle = asyncio.get_running_loop().call_later(delay, self._fire)

    def _disarm(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self.cut = True
        _cut(self._conn)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self._disarm()
        try:
            yield
        finally:
            self._arm()


@contextlib.contextmanager
def bound(conn: AsyncConnection[Any], seconds: float | None, *, within: float | None = None) -> Iterator[Bound]:
    """Bounds the PostgreSQL work of a block on a connection: each stretch of it between pauses ends within `seconds`
    (None: no bound; the first stretch within `within` when given, what is left of an operation's deadline), or
    the connection is cut and the block raises OperationTimedOut(`seconds`). Pauses are for a block on a connection
    taken with `bounded=False` whose length is not all PostgreSQL's: a file written in the middle of a transaction."""
    watch = Bound(conn, seconds)
    watch._arm(within)
    try:
        yield watch
    except psycopg.OperationalError as exc:
        if watch.cut and seconds is not None and not isinstance(exc, OperationTimedOut):
            raise OperationTimedOut(seconds) from exc
        raise
    finally:
        watch._disarm()


class _Recheck:
    """The pool's connection check, skipped for a connection handed out less than `after` seconds ago.

    The check costs a round trip per checkout. A connection that was in use a moment ago almost surely still
    works; if PostgreSQL went away in that moment, the query fails like any query during an outage, and the pool
    discards the broken connection. (Stamped at checkout: a `reset` hook would make the pool return connections
    through its background worker, later.)
    """

    def __init__(self, after: float) -> None:
        self._after = after
        self._used: weakref.WeakKeyDictionary[AsyncConnection[Any], float] = weakref.WeakKeyDictionary()

    async def check(self, conn: AsyncConnection[Any]) -> None:
        if conn.closed or conn.broken:
            raise psycopg.OperationalError("the connection is closed")
        now = time.monotonic()
        used = self._used.get(conn)
        if used is None or now - used >= self._after:
            await _check(conn)
        self._used[conn] = now


async def _check(conn: AsyncConnection[Any]) -> None:
    """psycopg_pool's check of a connection before it is handed out, ended by the operation's deadline, or within
    CHECK_TIMEOUT when it has none: a connection whose check does not answer is cut and the pool takes another."""
    deadline = _deadline.get()
    seconds = CHECK_TIMEOUT
    if deadline is None:
        deadline = asyncio.get_running_loop().time() + CHECK_TIMEOUT
    else:
        seconds = deadline - asyncio.get_running_loop().time()
    with bound(conn, seconds):
        await AsyncConnectionPool.check_connection(conn)


# Seconds a new connection may take to be established, unless the URL or PGCONNECT_TIMEOUT says otherwise.
CONNECT_TIMEOUT = 10

# How long the pool's check of a connection may take when the operation that asked for it has no deadline.
CHECK_TIMEOUT = 5.0


class _OutagePool(AsyncConnectionPool):
    """A pool that stops making callers wait its full timeout once PostgreSQL is known to be out of reach.

    A checkout waits up to the pool's timeout (10 s) for a connection. When PostgreSQL refuses connections, every
    request would wait that long before answering UNAVAILABLE, and a client that retries UNAVAILABLE five times
    would wait most of a minute. After a checkout has timed out (a request's, or the health check's every couple of
    seconds), checkouts wait at most `outage_timeout` until one succeeds again. A checkout that began before waits
    in slices of `outage_timeout`, and ends at the first slice that finds the pool out of reach: the requests that
    came as the outage began answer within a health check of it, not after the full timeout. The pool keeps
    reconnecting in the background meanwhile, so the first request after PostgreSQL is back finds a connection.
    """

    def __init__(self, *args: Any, outage_timeout: float, operation_timeout: float | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._outage_timeout = outage_timeout
        self._unreachable = False
        self.operation_timeout = operation_timeout

    @property
    def unreachable(self) -> bool:
        """Whether the last checkout timed out."""
        return self._unreachable

    async def getconn(self, timeout: float | None = None) -> AsyncConnection[Any]:
        limit = self.timeout if timeout is None else timeout
        if self._unreachable:
            limit = min(limit, self._outage_timeout)
        deadline = time.monotonic() + limit
        while True:
            left = deadline - time.monotonic()
            try:
                conn = await super().getconn(max(0.0, min(left, self._outage_timeout)))
            except PoolTimeout:
                if self._unreachable or left <= self._outage_timeout:
                    self._unreachable = True
                    raise
                continue  # busy, not known to be out of reach: wait on
            self._unreachable = False
            return conn


class DatabaseUnreachable(SettingsError):
    """The database could not be opened as the process started: it ends with one line naming it and why."""

    def __init__(self, url: str, waited: float, why: str) -> None:
        params = conninfo_to_dict(url)
        where = f"{params.get('host') or 'localhost'}:{params.get('port') or 5432}/{params.get('dbname') or ''}"
        super().__init__(
            f"cannot open the PostgreSQL database {where} (tried for {waited:g} s): {why}; check "
            "MODELFORGE_DATABASE_URL, and that the server is up and takes this role"
        )


async def _why_unreachable(url: str, kwargs: dict[str, Any]) -> str:
    """What PostgreSQL (or the network) says to one more connection attempt: the pool keeps it to its own log."""
    try:
        conn = await AsyncConnection.connect(url, **kwargs)
    except psycopg.Error as exc:
        return " ".join(str(exc).split())  # libpq's lines, on one; they name no password
    await conn.close()
    return "it answered only once the wait was over"


@asynccontextmanager
async def open_pool(
    url: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    timeout: float = 10.0,
    outage_timeout: float = 1.0,
    reconnect_timeout: float = 10.0,
    recheck_after: float = 0.0,
    operation_timeout: float | None = 30.0,
) -> AsyncIterator[AsyncConnectionPool]:
    """An opened pool whose connections are checked before use; closed on exit.

    `operation_timeout` bounds each operation taken through `connection` (None: no bound).

    A checkout waits up to `timeout` for a connection, or `outage_timeout` after one has timed out and until one
    succeeds (`_OutagePool`). With `recheck_after` > 0 a connection handed out less than that many seconds before is
    handed out unchecked: for a busy process whose every statement would otherwise pay a second round trip.

    The pool retries a failed connection attempt with a doubling delay for `reconnect_timeout`, then gives up until
    a checkout finds the pool empty again (every request, and the health check every couple of seconds). Left at
    psycopg_pool's five minutes, the delay doubled past a minute during a long outage, and the service came back
    that much later than PostgreSQL.
    """
    recheck = _Recheck(recheck_after) if recheck_after > 0 else None
    logging.getLogger("psycopg.pool").addFilter(_POOL_LOG_THROTTLE)  # added once, however many pools
    kwargs: dict[str, Any] = {"autocommit": True}
    if "connect_timeout" not in conninfo_to_dict(url) and "PGCONNECT_TIMEOUT" not in os.environ:
        # libpq's own default is no limit (psycopg's 130 s): a PostgreSQL that accepts TCP and never answers would
        # hold each of the pool's reconnection attempts that long.
        kwargs["connect_timeout"] = CONNECT_TIMEOUT
    pool = _OutagePool(
        url,
        outage_timeout=outage_timeout,
        operation_timeout=operation_timeout,
        reconnect_timeout=reconnect_timeout,
        min_size=min_size,
        max_size=max_size,
        timeout=timeout,
        open=False,
        check=recheck.check if recheck is not None else _check,
        kwargs=kwargs,
    )
    try:
        await pool.open(wait=True, timeout=timeout)
    except PoolTimeout:
        await pool.close()
        raise DatabaseUnreachable(url, timeout, await _why_unreachable(url, kwargs)) from None
    try:
        yield pool
    finally:
        await pool.close()


@asynccontextmanager
async def connection(
    pool: AsyncConnectionPool, *, bounded: bool = True, seconds: float | None = None, checkout: float | None = None
) -> AsyncIterator[AsyncConnection[Any]]:
    """A connection of the pool for one operation, which ends within the pool's `operation_timeout` of asking for
    it (or `seconds`), checkout and the pool's check of the connection included.

    Past that bound the connection is cut (`_cut`), and what awaits PostgreSQL raises OperationTimedOut, an
    OperationalError like any other outage. `bounded=False` is for operations whose length is not PostgreSQL's
    doing: a copy paced by a client's upload, a lock held while a file is written. They end when PostgreSQL fails
    or their caller goes away. `checkout` bounds the wait for a connection (default: the pool's timeout).
    """
    limit = seconds if seconds is not None else getattr(pool, "operation_timeout", None)
    if not bounded or limit is None:
        async with pool.connection(timeout=checkout) as conn:
            yield conn
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    token = _deadline.set(deadline)
    try:
        wait = min(limit, pool.timeout if checkout is None else checkout)
        async with pool.connection(timeout=wait) as conn:
            with bound(conn, limit, within=deadline - loop.time()):
                yield conn
    finally:
        _deadline.reset(token)


# The bound of a health check's query: below the health check's own timeout (at least one second, see
# `app.Server.watch_dependency`), so that the check never needs cancelling, which would make psycopg wait for
# PostgreSQL to acknowledge a cancel request (up to 10 s more).
PING_TIMEOUT = 0.9


async def ping(pool: AsyncConnectionPool) -> None:
    """Raises unless PostgreSQL answers a trivial query within PING_TIMEOUT; used by health checks.

    A checkout that times out tells the pool that PostgreSQL is out of reach (`_OutagePool`), so requests stop
    waiting the full timeout within one health check of an outage.
    """
    async with connection(pool, seconds=PING_TIMEOUT) as conn:
        await conn.execute("SELECT 1")


def migration_files(package: str) -> list[tuple[int, str, str]]:
    """(number, file name, SQL) of each NNNN_name.sql in the package, in order."""
    found = []
    for entry in importlib.resources.files(package).iterdir():
        match = _MIGRATION.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    numbers = [number for number, _, _ in found]
    if len(set(numbers)) != len(numbers):
        raise RuntimeError(f"{package} has two migrations with the same number")
    return found


async def migrate(pool: AsyncConnectionPool, *, schema: str, package: str) -> list[str]:
    """Applies the package's migrations not yet recorded in <schema>.schema_migrations, one transaction each.

    An advisory lock per schema serialises replicas that start at the same time; the others wait, then find
    nothing left to apply. Migrations a newer version recorded are logged as a warning: the schema is used as it is,
    as an older replica uses it during a rolling upgrade (migrations add, never take away). Returns the names of the
    files applied.
    """
    applied: list[str] = []
    ident = sql.Identifier(schema)
    files = migration_files(package)
    async with pool.connection() as conn:
        for number, name, text in files:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"modelforge.migrate.{schema}",))
                await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
                await conn.execute(
                    sql.SQL(
                        "CREATE TABLE IF NOT EXISTS {}.schema_migrations ("
                        " version integer PRIMARY KEY, name text NOT NULL,"
                        " applied_time timestamptz NOT NULL DEFAULT now())"
                    ).format(ident)
                )
                cur = await conn.execute(
                    sql.SQL("SELECT 1 FROM {}.schema_migrations WHERE version = %s").format(ident), (number,)
                )
                if await cur.fetchone():
                    continue
                await conn.execute(text)  # trusted SQL shipped with the package
                await conn.execute(
                    sql.SQL("INSERT INTO {}.schema_migrations (version, name) VALUES (%s, %s)").format(ident),
                    (number, name),
                )
                applied.append(name)
                log.info("applied migration %s.%s", schema, name)
        if not files:
            return applied
        newer_sql = sql.SQL("SELECT name FROM {}.schema_migrations WHERE version > %s ORDER BY version")
        cur = await conn.execute(newer_sql.format(ident), (files[-1][0],))
        if newer := [row[0] for row in await cur.fetchall()]:
            log.warning(
                "the %s schema has migrations this version of ModelForge does not know (%s): a newer version "
                "upgraded it. This one runs on it, as an older replica does during a rolling upgrade, but going "
                "back to an older version is not supported: run the newer one",
                schema,
                ", ".join(newer),
            )
    return applied
