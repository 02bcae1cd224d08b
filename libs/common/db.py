"""PostgreSQL connections and the schema migration runner.

Migrations are the numbered ``migrations/NNNN_name.sql`` files, applied in order, each in
its own transaction, recorded in ``schema_migrations``. A session advisory lock makes
concurrent starts (several replicas) apply each file once. We keep this runner instead of
a migration library because those speak a synchronous driver (psycopg), and this is the
only place that would need one.
"""

from __future__ import annotations

import logging
import re
from importlib import resources
from typing import Any

import asyncpg
import orjson

log = logging.getLogger(__name__)

_MIGRATION_LOCK = 0x1A6E_57EA  # an arbitrary constant: "imagestream migrations"
_NAME = re.compile(r"^(\d{4})_([\w-]+)\.sql$")

Pool = asyncpg.Pool


def _encode_jsonb(value: Any) -> bytes:
    return b"\x01" + orjson.dumps(value)  # binary jsonb: a version byte, then the text


def _decode_jsonb(data: bytes) -> Any:
    return orjson.loads(data[1:])


async def _init_connection(conn: asyncpg.Connection) -> None:
    # Binary codecs (orjson) so that COPY can carry json/jsonb columns too.
    await conn.set_type_codec(
        "jsonb", encoder=_encode_jsonb, decoder=_decode_jsonb, schema="pg_catalog", format="binary"
    )
    await conn.set_type_codec(
        "json", encoder=orjson.dumps, decoder=orjson.loads, schema="pg_catalog", format="binary"
    )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool reset: nothing beyond the rollback of an abandoned transaction that asyncpg
    always does. Its default ("SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET
    ALL") is one more round trip on every release, as many as the statements themselves on
    the stages' hot paths. Nothing here leaves session state behind: settings are ``SET
    LOCAL``, cursors live in transactions, nothing LISTENs, and the two session advisory
    locks go through ``release_advisory_lock``."""


async def release_advisory_lock(conn: asyncpg.Connection, sql: str, *args: Any) -> None:
    """Run the unlock statement ``sql``; if it fails, close the connection (which releases
    the lock), since pooled connections are not reset when they return to the pool."""
    try:
        await conn.execute(sql, *args)
    except BaseException:
        conn.terminate()
        raise


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        reset=_keep_session,
        command_timeout=120,
        # The jsonb codec is set per connection; statement caching stays on.
        server_settings={"application_name": "imagestream"},
    )
    assert pool is not None
    return pool


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every shipped migration, in order."""
    found = []
    for entry in resources.files("imagestream.common").joinpath("migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), match.group(2), entry.read_text()))
    return sorted(found)


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply pending migrations; returns the names applied."""
    applied: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version int PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, name, sql in migrations():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
                )
            log.info("applied migration", extra={"version": version, "migration": name})
            applied.append(f"{version:04d}_{name}")
    finally:
        await release_advisory_lock(conn, "SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
    return applied


async def pending_migrations(conn: asyncpg.Connection) -> list[str]:
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    done: set[Any] = set()
    if exists:
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
    return [f"{v:04d}_{n}" for v, n, _ in migrations() if v not in done]
