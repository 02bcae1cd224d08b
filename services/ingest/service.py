"""The ingest service: reads uploaded lists into the ledger and feeds the pipeline.

Three loops share one process:

* the **batches** consumer reads each submitted list (stored in PostgreSQL by the api, or
  streamed from its ``list_url``: s3://, gs:// or https://, see storage.py) incrementally,
  validates and normalizes every URL, and COPYs the rows into ``items``; in-batch
  duplicate URLs are dropped by the ledger's unique key and counted. Progress is
  committed with the rows, so a list whose reader died resumes where it stopped;
* the **dispatcher** keeps the fetch stream topped up: it moves pending items of running
  batches into the stream while the whole pipeline holds fewer than ``DISPATCH_WINDOW``
  items, sharing the free room fairly between batches. Redis never holds a whole batch;
* the **reconciler** notices when Redis lost its data (its epoch key is gone) and puts
  every in-flight item back to pending, so they are dispatched again; it also re-drives
  items in flight for longer than ``STALE_AFTER_S`` and mirrors pause/cancel into Redis.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from prometheus_client import Counter
from redis.exceptions import LockError

from imagestream.common import control, db, ledger, messages, storage, streams
from imagestream.common.connections import Resources
from imagestream.common.inputs import InputError, ListParser, Reject, Row
from imagestream.common.keys import GROUPS
from imagestream.common.runtime import supervise
from imagestream.common.settings import StreamSettings
from imagestream.common.storage import StorageError
from imagestream.common.worker import Out, StreamWorker

log = logging.getLogger(__name__)

ROWS = Counter(
    "imagestream_ingest_rows_total",
    "Input rows read, by outcome (accepted, duplicate, invalid).",
    ["outcome"],
)
DISPATCHED = Counter(
    "imagestream_dispatched_items_total", "Items moved from the ledger into the fetch stream."
)
REDRIVEN = Counter(
    "imagestream_redriven_items_total",
    "In-flight items put back to pending by the reconciler, by reason.",
    ["reason"],
)


class IngestSettings(StreamSettings, kw_only=True, frozen=True):
    #: Most items in flight (in the fetch, analyze and write streams together).
    dispatch_window: int = 2000
    #: How often the dispatcher tops the fetch stream up (seconds).
    dispatch_interval_s: float = 0.1
    #: In-flight items older than this are re-driven from the ledger (seconds).
    stale_after_s: float = 3600.0
    #: How often the reconciler checks Redis and the halted batches (seconds).
    reconcile_interval_s: float = 2.0
    #: Rows per COPY while reading a list.
    ingest_chunk_rows: int = 10_000

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dispatch_window < 1 or self.ingest_chunk_rows < 1:
            raise ValueError("DISPATCH_WINDOW and INGEST_CHUNK_ROWS must be >= 1")


class _Cancelled(Exception):
    """The batch was cancelled while its list was being read."""


@dataclass(slots=True)
class IngestSummary:
    accepted: int = 0
    duplicates: int = 0
    invalid: int = 0


async def ingest_list(
    res: Resources,
    batch_id: uuid.UUID,
    chunks: AsyncIterator[bytes],
    *,
    filename: str | None,
    allow_file: bool = False,
    chunk_rows: int = 10_000,
) -> IngestSummary:
    """Read a list into the ledger. Rows up to the batch's ``ingest_line`` are skipped
    (already committed by an earlier attempt).

    Parsing (in an executor) and writing (COPY, in PostgreSQL) overlap: while one block of
    rows is being written, the next is parsed.
    """
    loop = asyncio.get_running_loop()
    done_line = 0  # read under the lock below
    parser = ListParser(filename=filename, allow_file=allow_file)
    summary = IngestSummary()
    blocks: asyncio.Queue[tuple[list[Row], list[Reject], int] | None] = asyncio.Queue(maxsize=2)

    async def write_blocks() -> None:
        while (block := await blocks.get()) is not None:
            rows, rejects, last_line = block
            async with res.pool.acquire() as conn, conn.transaction():
                # A commit lost in a crash only means these rows are read again.
                await conn.execute("SET LOCAL synchronous_commit = off")
                inserted, duplicates = await ledger.insert_items(conn, batch_id, rows)
                await ledger.insert_rejects(conn, batch_id, rejects)
                await conn.execute(
                    "UPDATE batches SET ingest_line = greatest(ingest_line, $2) WHERE id = $1",
                    batch_id,
                    last_line,
                )
            summary.accepted += inserted
            summary.duplicates += duplicates
            summary.invalid += len(rejects)
            ROWS.labels("accepted").inc(inserted)
            ROWS.labels("duplicate").inc(duplicates)
            ROWS.labels("invalid").inc(len(rejects))
            if (await ledger.batch(res.pool, batch_id))["state"] in ("cancelling", "cancelled"):
                raise _Cancelled

    async def read_blocks() -> None:
        rows: list[Row] = []
        rejects: list[Reject] = []
        last_line = 0

        def take(parsed: Sequence[Row | Reject]) -> None:
            nonlocal last_line
            for entry in parsed:
                last_line = entry.line
                if entry.line > done_line:
                    if isinstance(entry, Row):
                        rows.append(entry)
                    else:
                        rejects.append(entry)

        async for chunk in chunks:
            take(await loop.run_in_executor(None, parser.feed, chunk))
            if len(rows) + len(rejects) >= chunk_rows:
                await blocks.put((rows, rejects, last_line))
                rows, rejects = [], []
        take(await loop.run_in_executor(None, parser.close))
        await blocks.put((rows, rejects, last_line))
        await blocks.put(None)

    async with res.pool.acquire() as lock_conn:
        # One reader per list, across replicas: a second submission of the same batch
        # (a redelivery, a re-drive) leaves it to the reader that holds the lock.
        if not await lock_conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", str(batch_id)):
            log.info("list is being read by another ingest", extra={"batch": str(batch_id)})
            return summary
        try:
            batch = await ledger.batch(res.pool, batch_id)
            if batch["ingested"]:
                return summary  # another reader finished it before we got the lock
            done_line = batch["ingest_line"]
            await ledger.start_batch(res.pool, batch_id)
            try:
                # If either side fails, the group cancels the other.
                async with asyncio.TaskGroup() as group:
                    group.create_task(write_blocks())
                    group.create_task(read_blocks())
            except ExceptionGroup as failed:
                if not isinstance(failed.exceptions[0], _Cancelled):
                    raise failed.exceptions[0] from None
                log.info("batch cancelled: list not read further", extra={"batch": str(batch_id)})
            async with res.pool.acquire() as conn:
                await ledger.finish_ingest(conn, batch_id, parser.format or "txt", parser.columns)
        finally:
            await db.release_advisory_lock(
                lock_conn, "SELECT pg_advisory_unlock(hashtext($1))", str(batch_id)
            )
    log.info(
        "list ingested",
        extra={
            "batch": str(batch_id),
            "accepted": summary.accepted,
            "duplicates": summary.duplicates,
            "invalid": summary.invalid,
        },
    )
    return summary


class Ingest:
    def __init__(self, res: Resources, settings: IngestSettings) -> None:
        self.res = res
        self.settings = settings

    # ------------------------------------------------------------- batches stream
    async def handle(self, message: messages.BatchSubmitted) -> Sequence[Out]:
        batch_id = uuid.UUID(message.batch_id)
        try:
            batch = await ledger.batch(self.res.pool, batch_id)
        except ledger.NotFound:
            log.warning("submitted batch no longer exists", extra={"batch": message.batch_id})
            return []
        if batch["ingested"] or batch["state"] not in ("queued", "running", "paused"):
            return []
        try:
            await ingest_list(
                self.res,
                batch_id,
                self._list_chunks(batch),
                filename=batch["source_name"],
                chunk_rows=self.settings.ingest_chunk_rows,
            )
        except (InputError, StorageError) as exc:
            log.warning("list rejected: %s", exc, extra={"batch": message.batch_id})
            await ledger.fail_batch(self.res.pool, batch_id, str(exc))
        return []

    def _list_chunks(self, batch: Any) -> AsyncIterator[bytes]:
        """The uploaded list from the ledger, or the list at the batch's ``list_url`` (its
        bucket or address checked again: the settings may have changed since)."""
        url = batch["list_url"]
        if url is None:
            return ledger.upload_parts(self.res.pool, batch["id"])
        policy = self.settings.list_address_policy()
        storage.check_source(url, allowed_buckets=self.settings.list_buckets(), policy=policy)
        return storage.read_chunks(url, policy=policy)

    def on_dead(self, message: messages.BatchSubmitted | None, reason: str) -> list[Out]:
        return []

    # ------------------------------------------------------------- dispatcher
    async def dispatch_once(self) -> int:
        """Move pending items into the fetch stream while the window has room."""
        keys = self.res.keys
        lock = self.res.redis.lock(keys.dispatch_lock, timeout=10, blocking=False)
        if not await lock.acquire():
            return 0
        try:
            inflight = sum(await streams.lengths(self.res.redis, keys.work_streams))
            free = self.settings.dispatch_window - inflight
            if free < max(1, self.settings.dispatch_window // 20):
                return 0
            batch_ids = await ledger.dispatchable_batches(self.res.pool, keys.prefix)
            sent = 0
            # Fair share: each running batch gets an equal part of the free room; what a
            # small batch leaves unused goes to the others on the next pass.
            while batch_ids and free > 0:
                share = max(1, free // len(batch_ids))
                still = []
                for batch_id in batch_ids:
                    n = await self._dispatch_batch(batch_id, min(share, free))
                    sent += n
                    free -= n
                    if n == share:
                        still.append(batch_id)
                    if free <= 0:
                        break
                batch_ids = still
            return sent
        finally:
            try:
                await lock.release()
            except LockError:
                log.warning("dispatch lock expired during a tick")

    async def _dispatch_batch(self, batch_id: uuid.UUID, limit: int) -> int:
        async with self.res.pool.acquire() as conn, conn.transaction():
            claimed = await ledger.claim_pending(conn, batch_id, limit)
            # Added before the commit: a crash in between leaves the items pending
            # (dispatched again later; the writer makes the duplicate harmless).
            await streams.append(
                self.res.redis,
                self.res.keys.fetch,
                [
                    messages.encode(
                        messages.FetchTask(batch_id=str(batch_id), item_id=r["id"], url=r["url"])
                    )
                    for r in claimed
                ],
            )
        DISPATCHED.inc(len(claimed))
        return len(claimed)

    # ------------------------------------------------------------- reconciler
    async def reconcile_once(self) -> None:
        redis, keys = self.res.redis, self.res.keys
        unread_age_s = 60.0
        if await redis.set(keys.epoch, orjson.dumps({"since": uuid.uuid4().hex}), nx=True):
            # The epoch key was missing: Redis is new or lost its data. Whatever the
            # ledger says is in flight is re-driven from the ledger.
            for name, group in GROUPS.items():
                await streams.StreamGroup(redis, keys.stream(name), group, "reconciler").ensure()
            count = await ledger.requeue_inflight(self.res.pool, keys.prefix)
            if count:
                REDRIVEN.labels("redis_lost").inc(count)
                log.warning(
                    "Redis lost its data: re-driving in-flight items", extra={"count": count}
                )
            unread_age_s = 0.0
        # Lists nobody is reading (their submission was lost with Redis, or never sent).
        unread = await self.res.pool.fetch(
            """
            UPDATE batches b SET updated_at = now()
            WHERE pipeline = $1 AND NOT ingested AND state IN ('queued', 'running', 'paused')
              AND updated_at < now() - make_interval(secs => $2)
              -- Uploads and lists at a URL can be read again; one the CLI streams cannot.
              AND (b.list_url IS NOT NULL
                   OR EXISTS (SELECT 1 FROM upload_parts p WHERE p.batch_id = b.id))
            RETURNING id
            """,
            keys.prefix,
            unread_age_s,
        )
        if unread:
            await streams.append(
                redis,
                keys.batches,
                [messages.encode(messages.BatchSubmitted(batch_id=str(r["id"]))) for r in unread],
            )
        stale = await ledger.requeue_inflight(
            self.res.pool, keys.prefix, older_than_s=self.settings.stale_after_s
        )
        if stale:
            REDRIVEN.labels("stale").inc(stale)
            log.warning("re-driving items in flight for too long", extra={"count": stale})
        await control.sync_halted(redis, keys, self.res.pool)


async def run(res: Resources, settings: IngestSettings, stop: asyncio.Event) -> None:
    ingest = Ingest(res, settings)
    worker: StreamWorker[messages.BatchSubmitted] = StreamWorker(
        res.redis,
        res.keys,
        settings,
        stage="ingest",
        stream=res.keys.batches,
        group=GROUPS["batches"],
        decode=messages.batch_decoder.decode,
        handle=ingest.handle,
        on_dead=ingest.on_dead,
        concurrency=2,
    )
    await ingest.reconcile_once()
    chores = [
        asyncio.create_task(
            supervise("dispatch", ingest.dispatch_once, stop, settings.dispatch_interval_s)
        ),
        asyncio.create_task(
            supervise("reconcile", ingest.reconcile_once, stop, settings.reconcile_interval_s)
        ),
    ]
    try:
        await worker.run(stop)
    finally:
        for chore in chores:
            chore.cancel()
        await asyncio.gather(*chores, return_exceptions=True)
