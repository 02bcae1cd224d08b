"""Live numbers: a batch's progress (counts, rate, ETA, cost, errors by class), the
pipeline's state (stages, services, dead stream), and the server-sent events that carry
both to the dashboard.

Server-sent events are fed by **one poll loop per watched batch per api process**, shared
by every subscriber of that batch: each tick (``LIVE_INTERVAL_S``, 1 s) reads the batch's
row, and the pipeline snapshot is read once per tick for all batches. The database load is
therefore O(batches being watched), not O(browsers). We poll rather than LISTEN/NOTIFY
because the writer moves a batch's counters hundreds of times a second: a NOTIFY per
update would be far more traffic than one indexed row read per second, it would need a
trigger or a writer change on the hot path, and each api process would hold a dedicated
connection for LISTEN. A subscriber that falls behind skips to the newest state.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from imagestream.common import ledger, observe, storage, streams
from imagestream.common.keys import GROUPS, Keys

log = logging.getLogger(__name__)

FINISHED = frozenset(ledger.FINISHED_BATCH_STATES)


def _iso(value: datetime.datetime | None) -> str | None:
    return value.isoformat() if value else None


def batch_json(row: asyncpg.Record) -> dict[str, Any]:
    done = row["succeeded"] + row["failed"] + row["skipped"] + row["cancelled"]
    total = row["total"]
    # An ingested list without a valid URL is complete; one not yet read is at 0.
    progress = round(100.0 * done / total, 2) if total else (100.0 if row["ingested"] else 0.0)
    return {
        "id": str(row["id"]),
        "name": row["name"],
        "state": row["state"],
        "state_reason": row["state_reason"],
        "analyzer": row["analyzer"],
        "profile": row["profile"],
        "model": row["model"],
        "source_name": row["source_name"],
        "source_format": row["source_format"],
        # Without a signed URL's query (the caller's credential) or user info.
        "list_url": storage.shown_url(row["list_url"]) if row["list_url"] else None,
        # Where its events go (webhooks); the secret that signs them is never shown.
        "webhook_url": storage.shown_url(row["webhook_url"]) if row["webhook_url"] else None,
        "ingested": row["ingested"],
        "counts": {
            "total": total,
            "succeeded": row["succeeded"],
            "failed": row["failed"],
            "skipped": row["skipped"],
            "cancelled": row["cancelled"],
            "remaining": max(0, total - done),
            "duplicates": row["duplicates"],
            "invalid": row["invalid"],
        },
        "progress": progress,
        "tokens": {"input": row["input_tokens"], "output": row["output_tokens"]},
        "cost_usd": float(row["cost_usd"]),
        "budget_usd": float(row["budget_usd"]) if row["budget_usd"] is not None else None,
        "mode": (row["options"] or {}).get("mode", "standard"),
        "created_at": row["created_at"].isoformat(),
        "started_at": _iso(row["started_at"]),
        "finished_at": _iso(row["finished_at"]),
    }


class RateTracker:
    """Items per second per batch over the last minute, from the counters as they move."""

    def __init__(self, window_s: float = 60.0, capacity: int = 1000) -> None:
        self.window_s = window_s
        self.capacity = capacity
        self._samples: dict[uuid.UUID, list[tuple[float, int]]] = {}

    def rate(self, batch_id: uuid.UUID, done: int, fallback: float) -> float:
        now = time.monotonic()
        samples = self._samples.setdefault(batch_id, [])
        if not samples or now - samples[-1][0] >= 0.5:
            samples.append((now, done))
        while len(samples) > 2 and now - samples[0][0] > self.window_s:
            samples.pop(0)
        if len(self._samples) > self.capacity:
            # Forget the batches nobody asked about for the longest time.
            for stale in sorted(self._samples, key=lambda b: self._samples[b][-1][0])[:100]:
                del self._samples[stale]
        t0, d0 = samples[0]
        if now - t0 >= 2.0:
            return max(0.0, (done - d0) / (now - t0))
        return fallback


@dataclass
class _Errors:
    failed: int
    at: float
    counts: dict[str, int]


class StreamHoldings:
    """How many entries of each batch every work stream of a pipeline holds: where a
    batch's in-flight items are (the ledger only records that they are in flight, not at
    which stage: writing that per item cost two row updates each). The streams are read at
    most once per ``ttl_s`` per pipeline, for every batch and subscriber at once."""

    def __init__(self, redis: Redis, ttl_s: float = 1.0) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self._read: dict[str, tuple[float, list[Counter[str]]]] = {}
        self._lock = asyncio.Lock()

    async def held(self, pipeline: str, batch_id: uuid.UUID) -> tuple[int, int, int]:
        """Entries of the batch in its fetch, analyze and write streams."""
        async with self._lock:
            known = self._read.get(pipeline)
            if known is None or time.monotonic() - known[0] >= self.ttl_s:
                counts = [
                    await streams.count_by_batch(self.redis, stream)
                    for stream in Keys(pipeline).work_streams
                ]
                if len(self._read) > 100:
                    self._read.clear()
                known = self._read[pipeline] = (time.monotonic(), counts)
        fetch, analyze, write = (c[str(batch_id)] for c in known[1])
        return fetch, analyze, write


class Progress:
    """A batch's status: its row, plus rate, ETA, errors by class and where its in-flight
    items are."""

    #: Errors by class are recounted at most this often while a batch runs (a GROUP BY
    #: over its failed items), and whenever the number of failures is unchanged, never.
    errors_every_s = 5.0

    def __init__(self, pool: asyncpg.Pool, holdings: StreamHoldings) -> None:
        self.pool = pool
        self.holdings = holdings
        self.rates = RateTracker()
        self._errors: dict[uuid.UUID, _Errors] = {}

    async def status(self, batch_id: uuid.UUID) -> dict[str, Any]:
        row = await ledger.batch(self.pool, batch_id)
        body = batch_json(row)
        counts = body["counts"]
        done = counts["total"] - counts["remaining"]
        started, finished = row["started_at"], row["finished_at"]
        elapsed = ((finished or datetime.datetime.now(datetime.UTC)) - started) if started else None
        seconds = elapsed.total_seconds() if elapsed else 0.0
        average = done / seconds if seconds > 0 else 0.0
        if finished or row["state"] != "running":
            rate = average if finished else 0.0
        else:
            rate = self.rates.rate(batch_id, done, average)
        body["elapsed_s"] = round(seconds, 1)
        body["rate_per_s"] = round(rate, 3)
        remaining = counts["remaining"]
        body["eta_s"] = round(remaining / rate, 1) if rate > 0 and remaining else None
        body["errors"] = await self._error_counts(batch_id, row["failed"], row["state"] in FINISHED)
        inflight = await self._inflight(row) if row["state"] not in FINISHED else {}
        stages = {state: inflight.get(state, 0) for state in ledger.INFLIGHT_ITEM_STATES}
        body["stages"] = {"pending": max(0, remaining - sum(stages.values())), **stages}
        return body

    async def _inflight(self, row: asyncpg.Record) -> dict[str, int]:
        """The batch's in-flight items (the ledger's count) by stage (the streams' view):
        in the fetch stream, fetching; in the write stream, writing; the rest analyzing
        (in the analyze stream, between two streams, or in a provider's Batch API job)."""
        total = await ledger.inflight_count(self.pool, row["id"])
        try:
            fetch, _, write = await self.holdings.held(row["pipeline"], row["id"])
        except (RedisError, OSError):
            return {"fetching": total}  # the ledger's own view
        fetching = min(fetch, total)
        writing = min(write, total - fetching)
        return {"fetching": fetching, "analyzing": total - fetching - writing, "writing": writing}

    async def _error_counts(self, batch_id: uuid.UUID, failed: int, final: bool) -> dict[str, int]:
        if failed == 0:
            return {}
        now = time.monotonic()
        known = self._errors.get(batch_id)
        if known and (
            known.failed == failed or (not final and now - known.at < self.errors_every_s)
        ):
            return known.counts
        counts = await ledger.error_counts(self.pool, batch_id)
        if len(self._errors) > 1000:
            self._errors.clear()
        self._errors[batch_id] = _Errors(failed, now, counts)
        return counts


# ---------------------------------------------------------------- pipeline
class Monitor:
    """The pipeline as a whole: each stage's stream, the services alive, the dead stream.
    Read at most once per ``ttl_s`` per api process, whatever the number of readers."""

    def __init__(self, redis: Redis, keys: Keys, ttl_s: float = 1.0) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl_s = ttl_s
        self._cached: tuple[float, dict[str, Any]] | None = None
        self._lock = asyncio.Lock()
        self._added: dict[str, list[tuple[float, int]]] = {}

    async def snapshot(self) -> dict[str, Any]:
        async with self._lock:
            now = time.monotonic()
            if self._cached and now - self._cached[0] < self.ttl_s:
                return self._cached[1]
            value = await self._collect()
            self._cached = (time.monotonic(), value)
            return value

    async def _collect(self) -> dict[str, Any]:
        try:
            (streams, dead, memory), added, services = await asyncio.gather(
                observe.collect_streams(self.redis, self.keys),
                self._entries_added(),
                self.services(),
            )
        except (RedisError, OSError) as exc:
            return {"ok": False, "error": str(exc) or type(exc).__name__}
        inflight = {s["stage"]: 0 for s in services}
        capacity = dict(inflight)
        for s in services:
            inflight[s["stage"]] += s["inflight"]
            capacity[s["stage"]] += s["capacity"]
        stages = [
            {
                "stage": stat.stage,
                "stream": stream,
                "entries": stat.entries,
                "pending": stat.pending,
                "lag": stat.lag,
                "consumers": stat.consumers,
                "services": sum(1 for s in services if s["stage"] == stat.stage),
                "inflight": inflight.get(stat.stage, 0),
                "capacity": capacity.get(stat.stage, 0),
                "oldest_pending_age_s": round(stat.oldest_pending_age_s, 1),
                "oldest_waiting_age_s": round(stat.oldest_waiting_age_s, 1),
                "throughput_per_s": added.get(stream),
            }
            for stream, stat in zip(GROUPS, streams, strict=True)
        ]
        return {
            "ok": True,
            "stages": stages,
            "services": services,
            "dead_entries": dead,
            "redis_memory_bytes": memory,
            "taken_at": datetime.datetime.now(datetime.UTC).isoformat(),
        }

    async def _entries_added(self) -> dict[str, float | None]:
        """Entries per second into each stage's stream over the last ~10 s (Redis 7's
        ``entries-added``; None on Redis 6.2, which does not count them)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in GROUPS:
                pipe.xinfo_stream(self.keys.stream(name))
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        now = time.monotonic()
        rates: dict[str, float | None] = {}
        for name, reply in zip(GROUPS, replies, strict=True):
            total = reply.get("entries-added") if isinstance(reply, dict) else None
            if total is None:
                rates[name] = None if not isinstance(reply, Exception) else 0.0
                continue
            samples = self._added.setdefault(name, [])
            samples.append((now, int(total)))
            while len(samples) > 2 and now - samples[0][0] > 10.0:
                samples.pop(0)
            t0, n0 = samples[0]
            rates[name] = round((int(total) - n0) / (now - t0), 2) if now - t0 >= 0.5 else None
        return rates

    async def services(self) -> list[dict[str, Any]]:
        """Every stage process whose heartbeat (``{p}:alive:*``, TTL 15 s) is current."""
        names = [k async for k in self.redis.scan_iter(match=self.keys.alive_pattern(), count=1000)]
        if not names:
            return []
        values = await self.redis.mget(names)
        now = time.time()
        found = []
        for value in values:
            if value is None:
                continue
            try:
                beat = orjson.loads(value)
                found.append(
                    {
                        "stage": str(beat["stage"]),
                        "consumer": str(beat["consumer"]),
                        "inflight": int(beat.get("inflight", 0)),
                        "capacity": int(beat.get("capacity", 0)),
                        "up_s": round(now - float(beat.get("started", now)), 1),
                        "seen_s_ago": round(max(0.0, now - float(beat.get("at", now))), 1),
                    }
                )
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
        return sorted(found, key=lambda s: (s["stage"], s["consumer"]))


# ---------------------------------------------------------------- server-sent events
def sse(event: str, data: Any) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


@dataclass
class _Feed:
    batch_id: uuid.UUID
    subscribers: int = 0
    version: int = 0
    message: bytes = b""
    finished: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def publish(self, message: bytes, finished: bool) -> None:
        self.message = message
        self.finished = finished
        self.version += 1
        # Wake every waiter, then give later waiters a fresh event.
        self.changed.set()
        self.changed = asyncio.Event()


class Feeds:
    """One poll loop per watched batch, shared by its subscribers."""

    heartbeat_s = 15.0

    def __init__(self, progress: Progress, monitor: Monitor, interval_s: float) -> None:
        self.progress = progress
        self.monitor = monitor
        self.interval_s = interval_s
        self._feeds: dict[uuid.UUID, _Feed] = {}
        self._closing = asyncio.Event()

    @property
    def watched(self) -> int:
        return len(self._feeds)

    async def subscribe(self, batch_id: uuid.UUID) -> AsyncGenerator[bytes]:
        """SSE messages for one subscriber: the newest state at every change, an ``end``
        event once the batch has finished, comments as heartbeats while nothing moves."""
        feed = self._feeds.get(batch_id)
        if feed is None:
            feed = self._feeds[batch_id] = _Feed(batch_id)
            feed.task = asyncio.create_task(self._poll(feed), name=f"feed-{batch_id}")
        feed.subscribers += 1
        seen = 0
        try:
            while not self._closing.is_set():
                if feed.version > seen:
                    seen = feed.version
                    yield feed.message
                    if feed.finished:
                        return
                    continue
                waiter = feed.changed
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wait(waiter), timeout=self.heartbeat_s)
                    continue
                yield b": still here\n\n"
        finally:
            feed.subscribers -= 1
            if feed.subscribers == 0 and self._feeds.get(batch_id) is feed:
                del self._feeds[batch_id]
                if feed.task is not None:
                    feed.task.cancel()

    async def _wait(self, changed: asyncio.Event) -> None:
        waiters = [
            asyncio.ensure_future(changed.wait()),
            asyncio.ensure_future(self._closing.wait()),
        ]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def _poll(self, feed: _Feed) -> None:
        last = b""
        while True:
            try:
                status, pipeline = await asyncio.gather(
                    self.progress.status(feed.batch_id), self.monitor.snapshot()
                )
            except asyncio.CancelledError:
                raise
            except ledger.NotFound:
                feed.publish(sse("end", {"state": "deleted"}), finished=True)
                return
            except Exception:
                log.exception("live progress failed; retrying", extra={"batch": str(feed.batch_id)})
            else:
                finished = status["state"] in FINISHED
                message = sse("status", status) + sse("pipeline", pipeline)
                if finished:
                    message += sse("end", {"state": status["state"]})
                if message != last:
                    last = message
                    feed.publish(message, finished)
                if finished:
                    return
            await asyncio.sleep(self.interval_s)

    async def close(self) -> None:
        """Release every subscriber (on shutdown) and stop the poll loops."""
        self._closing.set()
        tasks = [f.task for f in self._feeds.values() if f.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
