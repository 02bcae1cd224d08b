"""Every read and write of the PostgreSQL ledger (batches, items, results, failures).

The ledger is the truth: an item's state changes only here, and a batch's counters move
in the same transaction as the item transitions they count, so they always equal the
items. Writes are idempotent: an item already terminal ignores a second result.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, TypeAlias

import asyncpg
import msgspec

from .inputs import Reject, Row
from .messages import ItemResult

TERMINAL_ITEM_STATES = ("succeeded", "failed", "skipped", "cancelled")
INFLIGHT_ITEM_STATES = ("fetching", "analyzing", "writing")
ACTIVE_BATCH_STATES = ("queued", "running", "paused", "cancelling")
FINISHED_BATCH_STATES = ("completed", "completed_with_errors", "cancelled", "failed")

Conn: TypeAlias = asyncpg.Connection | asyncpg.Pool


class NotFound(LookupError):
    pass


def parse_batch_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except (ValueError, AttributeError, TypeError):
        raise NotFound(f"no batch {text!r}") from None


# ------------------------------------------------------------------ batches
@dataclass(frozen=True, slots=True)
class NewBatch:
    name: str
    pipeline: str = "is"
    analyzer: str = "local"
    profile: str | None = None
    model: str | None = None
    options: dict[str, Any] | None = None
    source_name: str | None = None
    source_format: str | None = None
    analysis_columns: Sequence[str] = ()
    #: JSON Schema of each analysis column (see Provider.schema).
    analysis_schema: Mapping[str, Any] | None = None
    budget_usd: float | None = None
    #: Where its events go (webhooks.py), and the ``whsec_`` secret that signs them.
    webhook_url: str | None = None
    webhook_secret: str | None = None


async def create_batch(conn: Conn, batch: NewBatch) -> uuid.UUID:
    batch_id: uuid.UUID = await conn.fetchval(
        """
        INSERT INTO batches (name, analyzer, profile, model, options, source_name,
                             source_format, analysis_columns, analysis_schema, budget_usd,
                             pipeline, webhook_url, webhook_secret)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) RETURNING id
        """,
        batch.name,
        batch.analyzer,
        batch.profile,
        batch.model,
        batch.options or {},
        batch.source_name,
        batch.source_format,
        list(batch.analysis_columns),
        dict(batch.analysis_schema) if batch.analysis_schema is not None else None,
        batch.budget_usd,
        batch.pipeline,
        batch.webhook_url,
        batch.webhook_secret,
    )
    return batch_id


async def store_upload_part(conn: Conn, batch_id: uuid.UUID, part: int, data: bytes) -> None:
    await conn.execute(
        "INSERT INTO upload_parts (batch_id, part, data) VALUES ($1, $2, $3)", batch_id, part, data
    )


async def upload_parts(pool: asyncpg.Pool, batch_id: uuid.UUID) -> AsyncIterator[bytes]:
    """The stored upload, one part at a time (never the whole file in memory)."""
    part = 0
    while True:
        data = await pool.fetchval(
            "SELECT data FROM upload_parts WHERE batch_id = $1 AND part = $2", batch_id, part
        )
        if data is None:
            return
        yield bytes(data)
        part += 1


async def batch(conn: Conn, batch_id: uuid.UUID) -> asyncpg.Record:
    row = await conn.fetchrow("SELECT * FROM batches WHERE id = $1", batch_id)
    if row is None:
        raise NotFound(f"no batch {batch_id}")
    return row


async def list_batches(
    conn: Conn,
    *,
    limit: int = 50,
    offset: int = 0,
    states: Sequence[str] = (),
    search: str | None = None,
) -> tuple[list[asyncpg.Record], int]:
    """A page of batches, newest first (optionally in ``states``, or with ``search`` in the
    name), and how many match in all."""
    where = """
        (cardinality($1::text[]) = 0 OR state = ANY($1::text[]))
        AND ($2::text IS NULL OR strpos(lower(name), lower($2)) > 0)
    """
    rows = await conn.fetch(
        f"SELECT * FROM batches WHERE {where} ORDER BY created_at DESC, id LIMIT $3 OFFSET $4",
        list(states),
        search,
        limit,
        offset,
    )
    total: int = await conn.fetchval(
        f"SELECT count(*) FROM batches WHERE {where}", list(states), search
    )
    return list(rows), total


async def start_batch(conn: Conn, batch_id: uuid.UUID) -> None:
    await conn.execute(
        """
        UPDATE batches SET started_at = coalesce(started_at, now()), updated_at = now(),
               state = CASE WHEN state = 'queued' THEN 'running' ELSE state END
        WHERE id = $1 AND state IN ('queued', 'paused')
        """,
        batch_id,
    )


async def fail_batch(conn: Conn, batch_id: uuid.UUID, reason: str) -> None:
    await conn.execute(
        """
        UPDATE batches SET state = 'failed', state_reason = $2, finished_at = now(),
               updated_at = now()
        WHERE id = $1 AND state IN ('queued', 'running')
        """,
        batch_id,
        reason,
    )


# ------------------------------------------------------------------ ingest
async def insert_items(
    conn: asyncpg.Connection, batch_id: uuid.UUID, rows: Sequence[Row]
) -> tuple[int, int]:
    """Add rows as pending items (COPY); returns (inserted, in-batch duplicates).

    Rows read after the batch was cancelled become cancelled items at once: the batch row
    is share-locked, so a concurrent cancel either sees these rows or is seen by them."""
    if not rows:
        return 0, 0
    async with conn.transaction():
        state = await conn.fetchval("SELECT state FROM batches WHERE id = $1 FOR SHARE", batch_id)
        cancelled = state in ("cancelling", "cancelled")
        await conn.execute(
            """
            CREATE TEMP TABLE IF NOT EXISTS items_staging (
                line bigint, url text, url_hash bytea, metadata jsonb
            ) ON COMMIT DELETE ROWS
            """
        )
        await conn.copy_records_to_table(
            "items_staging",
            records=[(r.line, r.url, r.url_hash, r.metadata) for r in rows],
            columns=["line", "url", "url_hash", "metadata"],
        )
        if cancelled:
            status = await conn.execute(
                """
                INSERT INTO items (batch_id, line, url, url_hash, metadata, state,
                                   error_class, error_message, finished_at)
                SELECT $1, line, url, url_hash, metadata, 'cancelled', 'cancelled',
                       'batch cancelled', now()
                FROM items_staging ORDER BY line
                ON CONFLICT (batch_id, url_hash) DO NOTHING
                """,
                batch_id,
            )
        else:
            status = await conn.execute(
                """
                INSERT INTO items (batch_id, line, url, url_hash, metadata)
                SELECT $1, line, url, url_hash, metadata FROM items_staging ORDER BY line
                ON CONFLICT (batch_id, url_hash) DO NOTHING
                """,
                batch_id,
            )
        inserted = int(status.split()[-1])
        duplicates = len(rows) - inserted
        await conn.execute(
            """
            UPDATE batches SET total = total + $2, duplicates = duplicates + $3,
                   cancelled = cancelled + $4, updated_at = now()
            WHERE id = $1
            """,
            batch_id,
            inserted,
            duplicates,
            inserted if cancelled else 0,
        )
    return inserted, duplicates


async def insert_rejects(conn: Conn, batch_id: uuid.UUID, rejects: Sequence[Reject]) -> None:
    if not rejects:
        return
    await conn.executemany(
        "INSERT INTO rejects (batch_id, line, reason, raw) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT DO NOTHING",
        [(batch_id, r.line, r.reason, r.raw) for r in rejects],
    )
    await conn.execute(
        "UPDATE batches SET invalid = (SELECT count(*) FROM rejects WHERE batch_id = $1)"
        " WHERE id = $1",
        batch_id,
    )


async def finish_ingest(
    conn: asyncpg.Connection, batch_id: uuid.UUID, source_format: str, metadata_columns: list[str]
) -> None:
    async with conn.transaction():
        await conn.execute(
            """
            UPDATE batches SET ingested = true, source_format = $2, metadata_columns = $3,
                   updated_at = now()
            WHERE id = $1
            """,
            batch_id,
            source_format,
            metadata_columns,
        )
        await conn.execute("DELETE FROM upload_parts WHERE batch_id = $1", batch_id)
        await settle(conn, [batch_id])


# ------------------------------------------------------------------ dispatch
async def dispatchable_batches(conn: Conn, pipeline: str) -> list[uuid.UUID]:
    """Running batches of this pipeline that still have pending items, oldest first."""
    rows = await conn.fetch(
        """
        SELECT b.id FROM batches b
        WHERE b.pipeline = $1 AND b.state = 'running'
          AND EXISTS (SELECT 1 FROM items i WHERE i.batch_id = b.id AND i.state = 'pending')
        ORDER BY b.created_at
        """,
        pipeline,
    )
    return [r["id"] for r in rows]


async def claim_pending(
    conn: asyncpg.Connection, batch_id: uuid.UUID, limit: int
) -> list[asyncpg.Record]:
    """Mark up to ``limit`` pending items as dispatched; call inside a transaction."""
    return list(
        await conn.fetch(
            """
            WITH picked AS (
                SELECT id FROM items
                WHERE batch_id = $1 AND state = 'pending'
                ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED
            )
            UPDATE items i SET state = 'fetching', dispatched_at = now(), attempts = attempts + 1
            FROM picked WHERE i.id = picked.id
            RETURNING i.id, i.url
            """,
            batch_id,
            limit,
        )
    )


async def touch_inflight(conn: Conn, item_ids: Sequence[int]) -> None:
    """Mark in-flight items as alive now: a stage holding them for long on purpose (a Batch
    API group waiting for its turn) keeps the reconciler from taking them for stuck."""
    await conn.execute(
        "UPDATE items SET dispatched_at = now()"
        " WHERE id = ANY($1::bigint[]) AND state IN ('fetching', 'analyzing', 'writing')",
        list(item_ids),
    )


async def requeue_inflight(conn: Conn, pipeline: str, *, older_than_s: float | None = None) -> int:
    """Put this pipeline's in-flight items back to pending (Redis lost them, or they are stuck),
    except those a provider's Batch API job holds."""
    status = await conn.execute(
        """
        UPDATE items SET state = 'pending', dispatched_at = NULL
        WHERE id IN (
            SELECT id FROM items
            WHERE state IN ('fetching', 'analyzing', 'writing')
              AND ($2::float8 IS NULL OR dispatched_at < now() - make_interval(secs => $2))
              AND batch_id IN (SELECT id FROM batches WHERE pipeline = $1
                               AND state IN ('queued', 'running', 'paused', 'cancelling'))
              -- Items in a running Batch API job are neither lost nor stuck: the job's
              -- collector finishes them (it may take the provider hours).
              AND NOT EXISTS (SELECT 1 FROM provider_jobs j
                              WHERE j.state = 'running' AND j.batch_id = items.batch_id
                                AND items.id = ANY (j.item_ids))
            -- In id order, skipping rows the writer is finishing: no deadlock with it.
            ORDER BY id FOR UPDATE SKIP LOCKED)
        """,
        pipeline,
        older_than_s,
    )
    return int(status.split()[-1])


# ------------------------------------------------------------------ results (writer)
@dataclass(slots=True)
class _Tally:
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    cancelled: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: Decimal = Decimal(0)


async def apply_results(conn: asyncpg.Connection, results: Sequence[ItemResult]) -> int:
    """Record item outcomes; returns how many items changed state.

    Only items not yet terminal move; counters move with them; succeeded items get their
    result row (upserted, so a redelivered result is harmless).
    """
    latest: dict[int, ItemResult] = {}
    for result in results:
        latest.setdefault(result.item_id, result)
    if not latest:
        return 0
    ids = sorted(latest)
    async with conn.transaction():
        # Lock in id order so concurrent writers never deadlock on shared items.
        await conn.execute(
            "SELECT 1 FROM items WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE", ids
        )
        final = [latest[i] for i in ids if latest[i].status != "requeued"]
        requeued = [i for i in ids if latest[i].status == "requeued"]
        moved = await conn.fetch(
            """
            UPDATE items SET state = v.state, error_class = v.error_class,
                   error_message = v.error_message, error_stage = v.stage, finished_at = now()
            FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[])
                 AS v(id, state, error_class, error_message, stage)
            WHERE items.id = v.id
              AND items.state NOT IN ('succeeded', 'failed', 'skipped', 'cancelled')
            RETURNING items.id, items.batch_id
            """,
            [r.item_id for r in final],
            [r.status for r in final],
            [r.error_class for r in final],
            [r.error_message for r in final],
            [r.stage if r.status != "succeeded" else None for r in final],
        )
        if requeued:
            await conn.execute(
                """
                UPDATE items SET state = 'pending', dispatched_at = NULL
                WHERE id = ANY($1::bigint[]) AND state IN ('fetching', 'analyzing', 'writing')
                """,
                requeued,
            )
        moved_ids = {r["id"]: r["batch_id"] for r in moved}
        done = [latest[i] for i in sorted(moved_ids)]
        await _insert_results(conn, [r for r in done if r.status == "succeeded"])
        failures = [r for r in done if r.status == "failed"]
        if failures:
            await conn.execute(
                """
                INSERT INTO failures (item_id, batch_id, stage, error_class, message)
                SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::text[], $5::text[])
                """,
                [r.item_id for r in failures],
                [moved_ids[r.item_id] for r in failures],
                [r.stage for r in failures],
                [r.error_class or "internal_error" for r in failures],
                [r.error_message for r in failures],
            )
        tallies: dict[uuid.UUID, _Tally] = defaultdict(_Tally)
        for r in done:
            tally = tallies[moved_ids[r.item_id]]
            setattr(tally, r.status, getattr(tally, r.status) + 1)
            if r.usage is not None:
                tally.input_tokens += r.usage.input_tokens
                tally.output_tokens += r.usage.output_tokens
                tally.cost_usd += Decimal(str(r.usage.cost_usd))
        batch_ids = sorted(tallies)
        await conn.execute(
            """
            UPDATE batches b SET succeeded = b.succeeded + v.s, failed = b.failed + v.f,
                   skipped = b.skipped + v.k, cancelled = b.cancelled + v.c,
                   input_tokens = b.input_tokens + v.it, output_tokens = b.output_tokens + v.ot,
                   cost_usd = b.cost_usd + v.cost, updated_at = now()
            FROM unnest($1::uuid[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[],
                        $6::bigint[], $7::bigint[], $8::numeric[])
                 AS v(id, s, f, k, c, it, ot, cost)
            WHERE b.id = v.id
            """,
            batch_ids,
            [tallies[b].succeeded for b in batch_ids],
            [tallies[b].failed for b in batch_ids],
            [tallies[b].skipped for b in batch_ids],
            [tallies[b].cancelled for b in batch_ids],
            [tallies[b].input_tokens for b in batch_ids],
            [tallies[b].output_tokens for b in batch_ids],
            [tallies[b].cost_usd for b in batch_ids],
        )
        await settle(conn, batch_ids)
    return len(moved)


_RESULT_COLUMNS = [
    "item_id", "batch_id", "width", "height", "format", "mode", "bytes", "sha256", "frames",
    "exif", "analyzer", "model", "analysis", "input_tokens", "output_tokens",
    "thought_tokens", "cached_tokens", "cost_usd", "cache_hit",
]  # fmt: skip


async def _insert_results(conn: asyncpg.Connection, results: Sequence[ItemResult]) -> None:
    """Upsert result rows through COPY into a staging table."""
    if not results:
        return
    await conn.execute(
        """
        CREATE TEMP TABLE IF NOT EXISTS results_staging
            (LIKE results INCLUDING DEFAULTS) ON COMMIT DELETE ROWS
        """
    )
    records = []
    for r in results:
        facts = r.facts
        assert facts is not None, "a succeeded result carries the image facts"
        usage = r.usage
        records.append(
            (
                r.item_id,
                uuid.UUID(r.batch_id),
                facts.width,
                facts.height,
                facts.format,
                facts.mode,
                facts.bytes,
                bytes.fromhex(facts.sha256),
                facts.frames,
                msgspec.to_builtins(facts.exif) if facts.exif else None,
                r.analyzer or "local",
                r.model,
                r.analysis,
                usage.input_tokens if usage else 0,
                usage.output_tokens if usage else 0,
                usage.thought_tokens if usage else 0,
                usage.cached_tokens if usage else 0,
                Decimal(str(usage.cost_usd)) if usage else Decimal(0),
                r.cache_hit,
            )
        )
    await conn.copy_records_to_table("results_staging", records=records, columns=_RESULT_COLUMNS)
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in _RESULT_COLUMNS[1:])
    columns = ", ".join(_RESULT_COLUMNS)
    await conn.execute(
        f"INSERT INTO results ({columns}) SELECT {columns} FROM results_staging"
        f" ON CONFLICT (item_id) DO UPDATE SET {updates}"
    )


async def settle(conn: Conn, batch_ids: Sequence[uuid.UUID]) -> None:
    """Finish batches whose every item is terminal and whose list is fully read (or
    will not be: it was cancelled)."""
    await conn.execute(
        """
        UPDATE batches SET
            state = CASE WHEN state = 'cancelling' THEN 'cancelled'
                         WHEN failed > 0 THEN 'completed_with_errors'
                         ELSE 'completed' END,
            finished_at = now(), updated_at = now()
        WHERE id = ANY($1::uuid[]) AND (ingested OR state = 'cancelling')
          AND state IN ('queued', 'running', 'paused', 'cancelling')
          AND succeeded + failed + skipped + cancelled >= total
        """,
        list(batch_ids),
    )


# ------------------------------------------------------------------ status
async def state_counts(conn: Conn, batch_id: uuid.UUID) -> dict[str, int]:
    rows = await conn.fetch(
        "SELECT state, count(*) AS n FROM items WHERE batch_id = $1 GROUP BY state", batch_id
    )
    return {r["state"]: r["n"] for r in rows}


async def error_counts(conn: Conn, batch_id: uuid.UUID) -> dict[str, int]:
    rows = await conn.fetch(
        """
        SELECT error_class, count(*) AS n FROM items
        WHERE batch_id = $1 AND state = 'failed' GROUP BY error_class ORDER BY n DESC
        """,
        batch_id,
    )
    return {r["error_class"] or "unknown": r["n"] for r in rows}


# ------------------------------------------------------------------ browsing (api)
async def list_items(
    conn: Conn,
    batch_id: uuid.UUID,
    *,
    states: Sequence[str] = (),
    error_classes: Sequence[str] = (),
    after_line: int = 0,
    limit: int = 100,
) -> list[asyncpg.Record]:
    """A page of a batch's items in input order, after input line ``after_line``."""
    return list(
        await conn.fetch(
            """
            SELECT i.id, i.line, i.url, i.state, i.attempts, i.error_class, i.error_message,
                   i.error_stage, i.metadata, i.dispatched_at, i.finished_at,
                   r.width, r.height, r.format, r.bytes, r.cost_usd
            FROM items i LEFT JOIN results r ON r.item_id = i.id
            WHERE i.batch_id = $1 AND i.line > $2
              AND (cardinality($3::text[]) = 0 OR i.state = ANY($3::text[]))
              AND (cardinality($4::text[]) = 0 OR i.error_class = ANY($4::text[]))
            ORDER BY i.line LIMIT $5
            """,
            batch_id,
            after_line,
            list(states),
            list(error_classes),
            limit,
        )
    )


async def inflight_count(conn: Conn, batch_id: uuid.UUID) -> int:
    """A batch's items in flight: dispatched, outcome not recorded yet (cheap: the partial
    index on in-flight items holds at most the dispatch window, whatever the batch's size).
    Which stage holds them is not written here item by item; the streams say (live.py)."""
    count: int = await conn.fetchval(
        """
        SELECT count(*) FROM items
        WHERE batch_id = $1 AND state IN ('fetching', 'analyzing', 'writing')
        """,
        batch_id,
    )
    return count


async def item_detail(
    conn: Conn, batch_id: uuid.UUID, item_id: int
) -> tuple[asyncpg.Record, asyncpg.Record | None, list[asyncpg.Record]]:
    """One item, its result (if it succeeded) and every failure it met, oldest first."""
    item = await conn.fetchrow(
        "SELECT * FROM items WHERE id = $1 AND batch_id = $2", item_id, batch_id
    )
    if item is None:
        raise NotFound(f"no item {item_id} in batch {batch_id}")
    result = await conn.fetchrow(
        "SELECT *, encode(sha256, 'hex') AS sha256_hex FROM results WHERE item_id = $1", item_id
    )
    failures = await conn.fetch(
        "SELECT stage, error_class, message, created_at FROM failures"
        " WHERE item_id = $1 ORDER BY id",
        item_id,
    )
    return item, result, list(failures)


async def list_rejects(
    conn: Conn, batch_id: uuid.UUID, *, after_line: int = 0, limit: int = 100
) -> list[asyncpg.Record]:
    """A page of the input rows ingest refused (the validation report), in input order."""
    return list(
        await conn.fetch(
            "SELECT line, reason, raw FROM rejects WHERE batch_id = $1 AND line > $2"
            " ORDER BY line LIMIT $3",
            batch_id,
            after_line,
            limit,
        )
    )


async def delete_batch(conn: asyncpg.Connection, batch_id: uuid.UUID) -> None:
    """Delete a finished batch with its items, results, failures, rejects and upload."""
    async with conn.transaction():
        state = await conn.fetchval("SELECT state FROM batches WHERE id = $1 FOR UPDATE", batch_id)
        if state is None:
            raise NotFound(f"no batch {batch_id}")
        if state in ACTIVE_BATCH_STATES:
            raise Conflict(f"cannot delete a batch that is {state}: cancel it first")
        for table in ("results", "failures", "items", "provider_jobs"):
            await conn.execute(f"DELETE FROM {table} WHERE batch_id = $1", batch_id)
        await conn.execute("DELETE FROM batches WHERE id = $1", batch_id)


# ------------------------------------------------------------------ controls
class Conflict(Exception):
    """The batch is not in a state that allows this action."""


async def pause_batch(conn: Conn, batch_id: uuid.UUID, reason: str | None = None) -> str:
    row = await conn.fetchrow(
        """
        UPDATE batches SET state = 'paused', state_reason = $2, updated_at = now()
        WHERE id = $1 AND state IN ('queued', 'running') RETURNING state
        """,
        batch_id,
        reason,
    )
    return await _changed(conn, batch_id, row, "pause")


async def resume_batch(conn: Conn, batch_id: uuid.UUID) -> str:
    row = await conn.fetchrow(
        """
        UPDATE batches SET state = CASE WHEN started_at IS NULL THEN 'queued' ELSE 'running' END,
               state_reason = NULL, updated_at = now()
        WHERE id = $1 AND state = 'paused' RETURNING state
        """,
        batch_id,
    )
    state = await _changed(conn, batch_id, row, "resume")
    await settle(conn, [batch_id])
    return state


async def cancel_batch(conn: asyncpg.Connection, batch_id: uuid.UUID) -> str:
    """Stop a batch: pending items are cancelled now, in-flight ones as they arrive."""
    async with conn.transaction():
        row = await conn.fetchrow(
            """
            UPDATE batches SET state = 'cancelling', updated_at = now()
            WHERE id = $1 AND state IN ('queued', 'running', 'paused') RETURNING state
            """,
            batch_id,
        )
        await _changed(conn, batch_id, row, "cancel")
        status = await conn.execute(
            """
            UPDATE items SET state = 'cancelled', error_class = 'cancelled',
                   error_message = 'batch cancelled', finished_at = now()
            WHERE batch_id = $1 AND state = 'pending'
            """,
            batch_id,
        )
        await conn.execute(
            "UPDATE batches SET cancelled = cancelled + $2 WHERE id = $1",
            batch_id,
            int(status.split()[-1]),
        )
        # The rest of the list will not be read (a reader still at work stops at its next
        # block, and what it adds is cancelled at once).
        await conn.execute("DELETE FROM upload_parts WHERE batch_id = $1", batch_id)
        await settle(conn, [batch_id])
        state: str = await conn.fetchval("SELECT state FROM batches WHERE id = $1", batch_id)
    return state


async def _changed(conn: Conn, batch_id: uuid.UUID, row: asyncpg.Record | None, action: str) -> str:
    if row is not None:
        state: str = row["state"]
        return state
    current = await batch(conn, batch_id)
    raise Conflict(f"cannot {action} a batch that is {current['state']}")


async def replay_batch(
    conn: asyncpg.Connection,
    batch_id: uuid.UUID,
    *,
    error_classes: Sequence[str] = (),
    stages: Sequence[str] = (),
    item_ids: Sequence[int] = (),
) -> int:
    """Put failed items (optionally only some classes, stages or ids) back to pending.

    Counters move with them; the batch runs again if it had finished. A replayed item
    that then succeeds replaces its failure (the failure stays in its history).
    """
    async with conn.transaction():
        current = await batch(conn, batch_id)
        if current["state"] in ("cancelling", "cancelled", "failed"):
            raise Conflict(f"cannot replay a batch that is {current['state']}")
        status = await conn.execute(
            """
            UPDATE items SET state = 'pending', error_class = NULL, error_message = NULL,
                   error_stage = NULL, finished_at = NULL, dispatched_at = NULL
            WHERE batch_id = $1 AND state = 'failed'
              AND (cardinality($2::text[]) = 0 OR error_class = ANY($2::text[]))
              AND (cardinality($3::text[]) = 0 OR error_stage = ANY($3::text[]))
              AND (cardinality($4::bigint[]) = 0 OR id = ANY($4::bigint[]))
            """,
            batch_id,
            list(error_classes),
            list(stages),
            list(item_ids),
        )
        count = int(status.split()[-1])
        if count:
            await conn.execute(
                """
                UPDATE batches SET failed = failed - $2, updated_at = now(), finished_at = NULL,
                       state = CASE WHEN state IN ('completed', 'completed_with_errors')
                                    THEN 'running' ELSE state END
                WHERE id = $1
                """,
                batch_id,
                count,
            )
    return count
