"""Opening Redis and PostgreSQL, with clear one-line errors when they do not answer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import db
from .keys import Keys
from .settings import CommonSettings


class ConnectError(Exception):
    """A server could not be reached; the message is one line without secrets."""


def redact(url: str) -> str:
    """The URL with any password replaced, for messages and logs."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def redis_client(url: str, *, socket_timeout: float = 10.0, max_connections: int = 256) -> Redis:
    """A client whose pool waits for a free connection rather than failing when many tasks
    talk to Redis at once (blocking reads hold a connection each)."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=30,
        decode_responses=False,
        # Reads block for at most READ_BLOCK_MS, checked below this in the settings.
        socket_timeout=socket_timeout,
        socket_connect_timeout=5.0,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), retries=3),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
    return Redis.from_pool(pool)


async def open_redis(url: str) -> Redis:
    client = redis_client(url)
    try:
        await client.ping()
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        await client.aclose()
        raise ConnectError(f"cannot reach Redis at {redact(url)}: {exc}") from None
    return client


async def open_postgres(dsn: str, *, max_size: int = 10) -> asyncpg.Pool:
    try:
        return await asyncio.wait_for(db.create_pool(dsn, max_size=max_size), timeout=15)
    except (OSError, asyncpg.PostgresError, TimeoutError, ValueError) as exc:
        reason = str(exc) or type(exc).__name__
        raise ConnectError(f"cannot reach PostgreSQL at {redact(dsn)}: {reason}") from None


@dataclass
class Resources:
    """What a service talks to: one Redis client, one PostgreSQL pool, the key layout."""

    redis: Redis
    pool: asyncpg.Pool
    keys: Keys


@contextlib.asynccontextmanager
async def resources(settings: CommonSettings, *, pool_size: int = 10) -> AsyncIterator[Resources]:
    if not settings.redis_url or not settings.database_url:
        raise ConnectError("REDIS_URL and DATABASE_URL must be set to run a service")
    redis = await open_redis(settings.redis_url)
    try:
        pool = await open_postgres(settings.database_url, max_size=pool_size)
        try:
            yield Resources(redis, pool, Keys(settings.redis_prefix))
        finally:
            await pool.close()
    finally:
        await redis.aclose()
