from __future__ import annotations

import asyncio

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from modelforge_server import db


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
