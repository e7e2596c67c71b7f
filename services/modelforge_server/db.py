"""The PostgreSQL connection pool and the migration runner that every service with tables uses."""

from __future__ import annotations

import importlib.resources
import logging
import re
import time
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg import AsyncConnection, sql
from psycopg_pool import AsyncConnectionPool, PoolTimeout

log = logging.getLogger("modelforge.db")

_MIGRATION = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


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
            await AsyncConnectionPool.check_connection(conn)
        self._used[conn] = now


class _OutagePool(AsyncConnectionPool):
    """A pool that stops making callers wait its full timeout once PostgreSQL is known to be out of reach.

    A checkout waits up to the pool's timeout (10 s) for a connection. When PostgreSQL refuses connections, every
    request would wait that long before answering UNAVAILABLE, and a client that retries UNAVAILABLE five times
    would wait most of a minute. After a checkout has timed out (a request's, or the health check's every couple of
    seconds), checkouts wait at most `outage_timeout` until one succeeds again. The pool keeps reconnecting in the
    background meanwhile, so the first request after PostgreSQL is back finds a connection.
    """

    def __init__(self, *args: Any, outage_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._outage_timeout = outage_timeout
        self._unreachable = False

    @property
    def unreachable(self) -> bool:
        """Whether the last checkout timed out."""
        return self._unreachable

    async def getconn(self, timeout: float | None = None) -> AsyncConnection[Any]:
        if self._unreachable:
            timeout = min(self.timeout if timeout is None else timeout, self._outage_timeout)
        try:
            conn = await super().getconn(timeout)
        except PoolTimeout:
            self._unreachable = True
            raise
        self._unreachable = False
        return conn


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
) -> AsyncIterator[AsyncConnectionPool]:
    """An opened pool whose connections are checked before use; closed on exit.

    A checkout waits up to `timeout` for a connection, or `outage_timeout` after one has timed out and until one
    succeeds (`_OutagePool`). With `recheck_after` > 0 a connection handed out less than that many seconds before is
    handed out unchecked: for a busy process whose every statement would otherwise pay a second round trip.

    The pool retries a failed connection attempt with a doubling delay for `reconnect_timeout`, then gives up until
    a checkout finds the pool empty again (every request, and the health check every couple of seconds). Left at
    psycopg_pool's five minutes, the delay doubled past a minute during a long outage, and the service came back
    that much later than PostgreSQL.
    """
    recheck = _Recheck(recheck_after) if recheck_after > 0 else None
    pool = _OutagePool(
        url,
        outage_timeout=outage_timeout,
        reconnect_timeout=reconnect_timeout,
        min_size=min_size,
        max_size=max_size,
        timeout=timeout,
        open=False,
        check=recheck.check if recheck is not None else AsyncConnectionPool.check_connection,
        kwargs={"autocommit": True},
    )
    await pool.open(wait=True, timeout=timeout)
    try:
        yield pool
    finally:
        await pool.close()


async def ping(pool: AsyncConnectionPool) -> None:
    """Raises unless PostgreSQL answers a trivial query; used by health checks.

    The checkout gives up within a second, before the health check's own timeout (at least one second, see
    `app.Server.watch_dependency`) cancels it: a checkout that times out tells the pool that PostgreSQL is out of
    reach (`_OutagePool`), so requests stop waiting the full timeout within one health check of an outage.
    """
    async with pool.connection(timeout=0.9) as conn:
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
    nothing left to apply. Returns the names of the files applied.
    """
    applied: list[str] = []
    ident = sql.Identifier(schema)
    async with pool.connection() as conn:
        for number, name, text in migration_files(package):
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
    return applied
