"""Export jobs: an export written in the background to a file or object URL (or to part
files under a prefix), with its progress in the ledger (table ``export_jobs``).

Life of a job: ``queued`` (created) -> ``running`` (claimed by one worker, which writes a
heartbeat with the rows written so far every few seconds) -> ``completed`` or ``failed``
(a one-line error). Writes are all-or-nothing per file (storage.open_write), so a job cut
short leaves no half file behind.

A job whose worker died (its heartbeat older than ``stale_s``) is resumed: claimed again
by a worker and started over from its first row, at most ``MAX_ATTEMPTS`` times, then
failed. A worker that stops gracefully hands its jobs back at once (``release``).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg

from .. import duplicates, storage
from .columns import batch_layout
from .destinations import DEFAULT_PART_ROWS, Written, write_to
from .filters import Condition, Filters
from .sinks import SINKS
from .source import RowCounter, Selection

log = logging.getLogger(__name__)

#: Times a job is started before an interruption fails it.
MAX_ATTEMPTS = 3
#: Filter fields a job keeps (lists of strings; the times as ISO 8601 text; the
#: near-duplicate group as a number).
FILTER_FIELDS = (
    "state", "error_class", "field", "created_after", "created_before", "duplicate_group",
    "duplicates",
)  # fmt: skip


def filters_from(stored: Mapping[str, Any]) -> Filters:
    """The Filters of a job's stored ``filters`` (checked when the job was created)."""

    def moment(name: str) -> datetime.datetime | None:
        text = stored.get(name)
        return datetime.datetime.fromisoformat(text) if text else None

    return Filters(
        states=stored.get("state", []),
        error_classes=stored.get("error_class", []),
        conditions=[Condition.parse(text) for text in stored.get("field", [])],
        created_after=moment("created_after"),
        created_before=moment("created_before"),
        duplicate_group=stored.get("duplicate_group"),
        duplicates=stored.get("duplicates"),
    )


# ---------------------------------------------------------------- the ledger
async def create(
    conn: asyncpg.Pool | asyncpg.Connection,
    batch_id: uuid.UUID,
    fmt: str,
    destination: str,
    *,
    pipeline: str,
    filters: Mapping[str, Any],
    part_rows: int | None,
) -> asyncpg.Record:
    """A queued job, for the workers of ``pipeline``."""
    row: asyncpg.Record = await conn.fetchrow(
        """
        INSERT INTO export_jobs (batch_id, pipeline, format, destination, filters, shard_rows)
        VALUES ($1, $2, $3, $4, $5, $6) RETURNING *
        """,
        batch_id,
        pipeline,
        fmt,
        destination,
        dict(filters),
        part_rows,
    )
    return row


async def get(pool: asyncpg.Pool, batch_id: uuid.UUID, job_id: uuid.UUID) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await pool.fetchrow(
        "SELECT * FROM export_jobs WHERE id = $1 AND batch_id = $2", job_id, batch_id
    )
    return row


async def list_for_batch(
    pool: asyncpg.Pool, batch_id: uuid.UUID, limit: int
) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await pool.fetch(
        "SELECT * FROM export_jobs WHERE batch_id = $1 ORDER BY created_at DESC LIMIT $2",
        batch_id,
        limit,
    )
    return rows


async def claim(
    pool: asyncpg.Pool, worker: str, stale_s: float, pipeline: str
) -> asyncpg.Record | None:
    """The oldest queued job of the pipeline, or one whose worker stopped answering, now
    this worker's."""
    stale = datetime.timedelta(seconds=stale_s)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            """
            UPDATE export_jobs SET state = 'failed', finished_at = now(), worker = NULL,
                   error = 'interrupted ' || attempts || ' times (the api process running'
                           || ' it stopped); not started again'
            WHERE state = 'running' AND heartbeat_at < now() - $1::interval AND attempts >= $2
              AND pipeline = $3
            """,
            stale,
            MAX_ATTEMPTS,
            pipeline,
        )
        row: asyncpg.Record | None = await conn.fetchrow(
            """
            UPDATE export_jobs SET state = 'running', attempts = attempts + 1, worker = $1,
                   heartbeat_at = now(), started_at = now(), rows_written = 0,
                   bytes_written = 0, error = NULL
            WHERE id = (
                SELECT id FROM export_jobs
                WHERE (state = 'queued'
                       OR (state = 'running' AND heartbeat_at < now() - $2::interval))
                  AND pipeline = $3
                ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED
            )
            RETURNING *
            """,
            worker,
            stale,
            pipeline,
        )
    return row


async def heartbeat(
    pool: asyncpg.Pool, job_id: uuid.UUID, worker: str, rows: int, size: int
) -> bool:
    """Record progress; False if the job is no longer this worker's (taken over, deleted)."""
    status: str = await pool.execute(
        """
        UPDATE export_jobs SET heartbeat_at = now(), rows_written = $3, bytes_written = $4
        WHERE id = $1 AND worker = $2 AND state = 'running'
        """,
        job_id,
        worker,
        rows,
        size,
    )
    return status != "UPDATE 0"


async def complete(
    pool: asyncpg.Pool,
    job_id: uuid.UUID,
    worker: str,
    *,
    rows: int,
    size: int,
    files: Sequence[str],
) -> bool:
    """Mark the job completed (one transaction: whatever announces a completed export
    belongs in it); False if it was no longer this worker's."""
    async with pool.acquire() as conn, conn.transaction():
        status: str = await conn.execute(
            """
            UPDATE export_jobs SET state = 'completed', finished_at = now(), worker = NULL,
                   heartbeat_at = now(), rows_written = $3, bytes_written = $4, files = $5
            WHERE id = $1 AND worker = $2 AND state = 'running'
            """,
            job_id,
            worker,
            rows,
            size,
            list(files),
        )
    return status != "UPDATE 0"


async def fail(pool: asyncpg.Pool, job_id: uuid.UUID, worker: str, error: str) -> None:
    await pool.execute(
        """
        UPDATE export_jobs SET state = 'failed', finished_at = now(), worker = NULL, error = $3
        WHERE id = $1 AND worker = $2 AND state = 'running'
        """,
        job_id,
        worker,
        error,
    )


async def release(pool: asyncpg.Pool, job_id: uuid.UUID, worker: str) -> None:
    """Hand a job back (this worker is stopping): queued again, the attempt not counted."""
    await pool.execute(
        """
        UPDATE export_jobs SET state = 'queued', worker = NULL, heartbeat_at = NULL,
               attempts = greatest(attempts - 1, 0)
        WHERE id = $1 AND worker = $2 AND state = 'running'
        """,
        job_id,
        worker,
    )


# ---------------------------------------------------------------- running one
async def write(
    pool: asyncpg.Pool,
    job: asyncpg.Record,
    counter: RowCounter,
    written: Written,
    max_distance: int,
) -> None:
    """Write the job's export to its destination (StorageError or a database error on
    failure), after recording how many rows it will hold; a finished batch's
    near-duplicate groups are completed first (``max_distance`` if it has none yet)."""
    batch = await pool.fetchrow("SELECT * FROM batches WHERE id = $1", job["batch_id"])
    if batch is None:
        raise storage.StorageError("the batch was deleted", "not_found")
    await duplicates.finish(pool, job["batch_id"], max_distance)
    selection = Selection(
        pool, job["batch_id"], batch_layout(batch), filters_from(job["filters"]), counter
    )
    count_sql, count_params = selection.count_query()
    total: int | None = await pool.fetchval(count_sql, *count_params)
    await pool.execute("UPDATE export_jobs SET rows_total = $2 WHERE id = $1", job["id"], total)
    await write_to(
        selection,
        SINKS[job["format"]],
        job["destination"],
        written,
        job["shard_rows"] or DEFAULT_PART_ROWS,
    )


async def run(
    pool: asyncpg.Pool, job: asyncpg.Record, worker: str, interval_s: float, max_distance: int
) -> None:
    """Run a job this worker claimed to its end, recording progress every ``interval_s``
    seconds; it stops if the job stops being this worker's."""
    counter, written = RowCounter(), Written()
    job_id = job["id"]
    task = asyncio.ensure_future(write(pool, job, counter, written, max_distance))
    try:
        while not (await asyncio.wait([task], timeout=interval_s))[0]:
            if not await heartbeat(pool, job_id, worker, counter.rows, written.bytes):
                log.warning("export job taken over or deleted", extra={"job": str(job_id)})
                return
        task.result()
    except storage.StorageError as exc:
        log.warning("export job failed: %s", exc, extra={"job": str(job_id)})
        await fail(pool, job_id, worker, str(exc))
        return
    except Exception as exc:  # every failure ends the job, with its reason
        log.exception("export job failed", extra={"job": str(job_id)})
        await fail(pool, job_id, worker, _one_line(exc))
        return
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    await complete(pool, job_id, worker, rows=counter.rows, size=written.bytes, files=written.files)
    log.info(
        "export job completed",
        extra={"job": str(job_id), "rows": counter.rows, "files": len(written.files)},
    )


def _one_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= 200 else text[:197] + "..."
