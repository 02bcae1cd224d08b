"""Fixtures: the real Redis and PostgreSQL of this machine (or of containers).

URLs come from TEST_REDIS_URL / TEST_DATABASE_URL (defaults: the local servers). When the
default servers do not answer and a Docker engine does, testcontainers starts them.
Each test session gets its own database; each test its own Redis key prefix, so tests
never see each other's streams.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from redis.asyncio import Redis

from imagestream.common import db
from imagestream.common.connections import Resources, redis_client
from imagestream.common.keys import Keys

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"


def _answers(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), 1
        ):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def server_urls() -> Iterator[tuple[str, str]]:
    redis_url = os.environ.get("TEST_REDIS_URL", DEFAULT_REDIS)
    pg_url = os.environ.get("TEST_DATABASE_URL", DEFAULT_POSTGRES)
    with ExitStack() as stack:
        if not _answers(redis_url, 6379) or not _answers(pg_url, 5432):
            try:
                from testcontainers.postgres import PostgresContainer
                from testcontainers.redis import RedisContainer
            except ImportError:  # pragma: no cover - dev dependency
                pytest.fail("Redis/PostgreSQL do not answer and testcontainers is not installed")
            try:
                if not _answers(redis_url, 6379):
                    r = stack.enter_context(RedisContainer("redis:7"))
                    redis_url = f"redis://{r.get_container_host_ip()}:{r.get_exposed_port(6379)}/0"
                if not _answers(pg_url, 5432):
                    p = stack.enter_context(PostgresContainer("postgres:16", driver=None))
                    pg_url = p.get_connection_url()
            except Exception as exc:  # pragma: no cover - only without local servers
                pytest.fail(f"no Redis/PostgreSQL on this machine and no Docker engine: {exc}")
        yield redis_url, pg_url


@pytest.fixture(scope="session")
def redis_url(server_urls: tuple[str, str]) -> str:
    return server_urls[0]


@pytest.fixture(scope="session")
async def database_url(server_urls: tuple[str, str]) -> AsyncIterator[str]:
    """A fresh, migrated database for this test session, dropped at the end."""
    admin_url = server_urls[1]
    name = f"imagestream_test_{os.getpid()}_{secrets.token_hex(3)}"
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    parts = urlsplit(admin_url)
    url = urlunsplit(parts._replace(path=f"/{name}"))
    conn = await asyncpg.connect(url)
    try:
        await db.migrate(conn)
    finally:
        await conn.close()
    yield url
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(scope="session")
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await db.create_pool(database_url, max_size=10)
    yield pool
    await pool.close()


@pytest.fixture
def prefix() -> str:
    return f"t{secrets.token_hex(4)}"


@pytest.fixture
async def redis(redis_url: str, prefix: str) -> AsyncIterator[Redis]:
    client = redis_client(redis_url)
    yield client
    async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        await client.delete(key)
    await client.aclose()


@pytest.fixture
def keys(prefix: str) -> Keys:
    return Keys(prefix)


@pytest.fixture
def res(redis: Redis, pool: asyncpg.Pool, keys: Keys) -> Resources:
    return Resources(redis, pool, keys)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1; its endpoint and test credentials are put in this
    process's environment (where every S3 client, and every child process, reads them)."""
    from imagestream.devtools import s3server

    with s3server.running() as endpoint:
        saved = {name: os.environ.get(name) for name in s3server.environment(endpoint)}
        os.environ.update(s3server.environment(endpoint))
        try:
            yield endpoint
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A new, empty bucket of this test's own."""
    import boto3

    name = f"test-{secrets.token_hex(4)}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


#: Fixtures that reach a server: Redis, PostgreSQL (everything built on them, the api, the
#: stage processes and the dashboard's browser tests, depends on ``server_urls``) or S3.
_SERVER_FIXTURES = frozenset({"server_urls", "s3_endpoint"})
#: Modules that use none of them but run more than this process: a child in a network
#: namespace (it needs root).
_NOT_UNIT_MODULES = frozenset({"test_fetcher_netns.py"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``unit`` every test that needs no server, so ``pytest -m unit`` runs in seconds
    (in-process HTTP servers on 127.0.0.1, such as the emulators, count as no server)."""
    for item in items:
        if item.path.name in _NOT_UNIT_MODULES:
            continue
        if _SERVER_FIXTURES.isdisjoint(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.unit)
