from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from modelforge_server import db
from tests.fixtures.polling import eventually
from tests.fixtures.proxy import TcpProxy


@pytest.fixture
async def fresh(db_pool: AsyncConnectionPool) -> AsyncConnectionPool:
    async with db_pool.connection() as conn:
        await conn.execute("DROP SCHEMA IF EXISTS sample CASCADE")
        await conn.execute("DROP SCHEMA IF EXISTS broken CASCADE")
    return db_pool


async def test_migrations_apply_once_in_order(fresh: AsyncConnectionPool) -> None:
    first = await db.migrate(fresh, schema="sample", package="tests.fixtures.sample_migrations")
    second = await db.migrate(fresh, schema="sample", package="tests.fixtures.sample_migrations")
    assert first == ["0001_create_things.sql", "0002_add_note.sql"]
    assert second == []
    async with fresh.connection() as conn:
        await conn.execute("INSERT INTO sample.things (name) VALUES ('a')")
        cur = await conn.execute("SELECT name, note FROM sample.things")
        assert await cur.fetchall() == [("a", "")]
        cur = await conn.execute("SELECT version FROM sample.schema_migrations ORDER BY version")
        assert [row[0] for row in await cur.fetchall()] == [1, 2]


async def test_a_schema_a_newer_version_migrated_further_is_used_with_a_warning(
    fresh: AsyncConnectionPool, caplog: pytest.LogCaptureFixture
) -> None:
    await db.migrate(fresh, schema="sample", package="tests.fixtures.sample_migrations")
    async with fresh.connection() as conn:  # as a newer version leaves it: a migration this one does not ship
        await conn.execute("INSERT INTO sample.schema_migrations (version, name) VALUES (3, '0003_from_later.sql')")
    with caplog.at_level(logging.WARNING, logger="modelforge.db"):
        assert await db.migrate(fresh, schema="sample", package="tests.fixtures.sample_migrations") == []
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "sample schema has migrations this version of ModelForge does not know (0003_from_later.sql)" in (
        warning.getMessage()
    )
    caplog.clear()
    async with fresh.connection() as conn:
        await conn.execute("DELETE FROM sample.schema_migrations WHERE version = 3")
    await db.migrate(fresh, schema="sample", package="tests.fixtures.sample_migrations")
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


async def test_replicas_starting_together_apply_each_migration_once(fresh: AsyncConnectionPool) -> None:
    results = await asyncio.gather(
        *(db.migrate(fresh, schema="sample", package="tests.fixtures.sample_migrations") for _ in range(4))
    )
    applied = [name for result in results for name in result]
    assert sorted(applied) == ["0001_create_things.sql", "0002_add_note.sql"]


async def test_a_failing_migration_leaves_nothing_of_itself(fresh: AsyncConnectionPool) -> None:
    with pytest.raises(psycopg.errors.UndefinedFunction):
        await db.migrate(fresh, schema="broken", package="tests.fixtures.broken_migrations")
    async with fresh.connection() as conn:
        cur = await conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'broken' ORDER BY 1"
        )
        assert [row[0] for row in await cur.fetchall()] == ["kept", "schema_migrations"]
        cur = await conn.execute("SELECT version FROM broken.schema_migrations")
        assert [row[0] for row in await cur.fetchall()] == [1]


async def test_ping_fails_once_the_pool_is_closed(clean_db: str) -> None:
    async with db.open_pool(clean_db, max_size=1, timeout=2.0) as pool:
        await db.ping(pool)
    with pytest.raises(Exception):  # noqa: B017 - any failure will do: the pool is closed
        await db.ping(pool)


async def _terminate(pool: AsyncConnectionPool, other: AsyncConnectionPool) -> None:
    """Kills, from another pool, the backend of the connection `pool` hands out next."""
    async with pool.connection() as conn:
        pid = conn.info.backend_pid
    async with other.connection() as conn:
        await conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


async def test_checked_pool_replaces_a_connection_that_died_while_idle(clean_db: str) -> None:
    async with (
        db.open_pool(clean_db, min_size=1, max_size=1) as pool,
        db.open_pool(clean_db, min_size=1, max_size=1) as other,
    ):
        await _terminate(pool, other)
        await db.ping(pool)  # the check found the dead connection and the pool made a new one


async def test_recheck_after_skips_the_check_for_a_connection_just_used(clean_db: str) -> None:
    async with (
        db.open_pool(clean_db, min_size=1, max_size=1, recheck_after=60.0) as pool,
        db.open_pool(clean_db, min_size=1, max_size=1) as other,
    ):
        await _terminate(pool, other)
        with pytest.raises(psycopg.OperationalError):  # handed out unchecked: the query meets the dead backend
            await db.ping(pool)
        await db.ping(pool)  # the pool dropped the broken connection; the next one works


# A stalled proxy is PostgreSQL stopped, stuck on its disk or behind a network partition: connections stay open
# and no answer comes. The asyncio.timeout around each case only turns a hang into a failure.


@pytest.fixture
async def proxy(clean_db: str) -> AsyncIterator[TcpProxy]:
    """A TCP proxy in front of the test PostgreSQL."""
    proxy = await TcpProxy.to_postgres(clean_db)
    yield proxy
    await proxy.close()


async def test_an_operation_on_a_postgresql_that_does_not_answer_ends_within_its_bound(proxy: TcpProxy) -> None:
    # Handed out unchecked (used a moment ago), the connection fails on the operation's own statement.
    async with db.open_pool(proxy.url, max_size=1, recheck_after=60.0, operation_timeout=1.0) as pool:
        await db.ping(pool)
        proxy.stall()
        async with asyncio.timeout(10):
            with pytest.raises(db.OperationTimedOut, match="did not answer within 1 s"):
                async with db.connection(pool) as conn:
                    await conn.execute("SELECT 1")
            with pytest.raises((db.OperationTimedOut, PoolTimeout)):
                await db.ping(pool)  # within PING_TIMEOUT: a health check never has to cancel it
        await proxy.restore()
        await eventually(lambda: answers(pool), "the pool to connect again")
        async with db.connection(pool) as conn:
            assert await (await conn.execute("SELECT 2")).fetchone() == (2,)


async def test_the_check_of_a_connection_ends_with_the_operation_that_asked_for_it(proxy: TcpProxy) -> None:
    # The connection is idle in the pool when PostgreSQL stops answering: the pool's check of it hangs, and that
    # check runs before the operation has a connection to cut.
    async with db.open_pool(proxy.url, min_size=1, max_size=1, operation_timeout=1.0) as pool:
        await db.ping(pool)
        proxy.stall()
        async with asyncio.timeout(10):
            with pytest.raises((db.OperationTimedOut, PoolTimeout)):
                async with db.connection(pool) as conn:
                    await conn.execute("SELECT 1")


async def test_an_unbounded_operation_runs_past_the_operation_timeout(clean_db: str) -> None:
    async with db.open_pool(clean_db, max_size=2, operation_timeout=0.5) as pool:
        async with db.connection(pool, bounded=False) as conn:
            await conn.execute("SELECT pg_sleep(1.0)")
        with pytest.raises(db.OperationTimedOut, match="within 0.5 s"):
            async with db.connection(pool) as conn:
                await conn.execute("SELECT pg_sleep(5.0)")
        async with db.connection(pool) as conn:  # the cut connection was dropped; the next one works
            assert await (await conn.execute("SELECT 3")).fetchone() == (3,)


async def answers(pool: AsyncConnectionPool) -> bool:
    try:
        await db.ping(pool)
    except (psycopg.OperationalError, PoolTimeout):
        return False
    return True


async def test_a_checkout_begun_as_postgresql_went_away_ends_once_a_health_check_finds_it_gone(
    proxy: TcpProxy,
) -> None:
    # Without the health check's finding, the checkout would wait the pool's whole timeout.
    async with db.open_pool(proxy.url, min_size=1, max_size=2, timeout=30.0, outage_timeout=0.2) as pool:
        await db.ping(pool)
        await proxy.cut()

        async def select() -> None:
            async with db.connection(pool) as conn:
                await conn.execute("SELECT 1")

        begun = asyncio.ensure_future(select())
        with pytest.raises((db.OperationTimedOut, PoolTimeout, psycopg.OperationalError)):
            await db.ping(pool)  # the health check, within PING_TIMEOUT
        assert pool.unreachable
        async with asyncio.timeout(10):
            with pytest.raises(PoolTimeout):
                await begun
        await proxy.restore()
        await eventually(lambda: answers(pool), "the pool to connect again")
        assert not pool.unreachable


async def test_the_pools_reconnection_attempts_during_an_outage_log_once_a_minute(
    proxy: TcpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="psycopg.pool")
    async with db.open_pool(proxy.url, min_size=1, max_size=1, outage_timeout=0.2) as pool:
        await db.ping(pool)
        await proxy.cut()  # gone: every attempt the pool makes to connect again fails at once
        for _ in range(8):  # a health check every half second, as the services' probes come
            with contextlib.suppress(db.OperationTimedOut, PoolTimeout, psycopg.OperationalError):
                await db.ping(pool)
            await asyncio.sleep(0.5)
        failed = [r for r in caplog.records if r.name == "psycopg.pool" and "error connecting" in r.getMessage()]
        await proxy.restore()
    assert len(failed) <= 1, [r.getMessage() for r in failed]  # psycopg_pool logged each attempt, about 1 a second
