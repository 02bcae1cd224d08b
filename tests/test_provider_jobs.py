"""Migration 0004: the Gemini jobs of 0003 become rows of the provider-neutral jobs table."""

from __future__ import annotations

import datetime as dt
import os
import secrets
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from imagestream.common import db


@pytest.fixture
async def fresh_db(server_urls: tuple[str, str]) -> AsyncIterator[asyncpg.Connection]:
    admin_url = server_urls[1]
    name = f"imagestream_jobs_{os.getpid()}_{secrets.token_hex(3)}"
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    conn = await asyncpg.connect(urlunsplit(urlsplit(admin_url)._replace(path=f"/{name}")))
    try:
        yield conn
    finally:
        await conn.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_gemini_jobs_are_carried_over_nothing_lost(fresh_db: asyncpg.Connection) -> None:
    conn = fresh_db
    # The schema as a deployment on 0003 has it.
    await conn.execute(
        "CREATE TABLE schema_migrations (version int PRIMARY KEY, name text NOT NULL,"
        " applied_at timestamptz NOT NULL DEFAULT now())"
    )
    for version, name, sql in db.migrations():
        if version <= 3:
            await conn.execute(sql)
            await conn.execute("INSERT INTO schema_migrations VALUES ($1, $2)", version, name)
    batch = uuid.uuid4()
    sent = dt.datetime(2026, 12, 1, 8, 0, tzinfo=dt.UTC)
    rows = [
        ("batches/run-1", "proj-a", "gemini-2.5-flash-lite", b"\x91\x01", [1, 2, 3], 1500,
         "running", "JOB_STATE_RUNNING", None),
        ("batches/done-2", "proj-b", "gemini-2.5-flash", b"", [4], 0,
         "collected", "JOB_STATE_SUCCEEDED", sent + dt.timedelta(hours=3)),
    ]  # fmt: skip
    for name, project, model, tasks, items, reserved, state, job_state, finished in rows:
        await conn.execute(
            "INSERT INTO gemini_jobs (name, batch_id, project, model, tasks, item_ids,"
            " reserved_nano, state, job_state, created_at, polled_at, finished_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10, $11)",
            name, batch, project, model, tasks, items, reserved, state, job_state, sent, finished,
        )  # fmt: skip

    applied = await db.migrate(conn)

    assert applied[0] == "0004_provider_jobs"
    assert await conn.fetchval("SELECT to_regclass('gemini_jobs')") is None
    carried = await conn.fetch(
        "SELECT provider, name, project, model, tasks, item_ids, reserved_nano, state,"
        " job_state, finished_at, created_at, polled_at, batch_id FROM provider_jobs ORDER BY name"
    )
    assert [tuple(r.values())[:10] for r in carried] == sorted(
        [("gemini", n, p, m, t, i, r, s, j, f) for n, p, m, t, i, r, s, j, f in rows],
        key=lambda row: row[1],
    )
    assert all(
        r["created_at"] == r["polled_at"] == sent and r["batch_id"] == batch for r in carried
    )
    # The running job still shields its items from the reconciler.
    running = await conn.fetchval(
        "SELECT item_ids FROM provider_jobs WHERE state = 'running' AND batch_id = $1", batch
    )
    assert running == [1, 2, 3]
