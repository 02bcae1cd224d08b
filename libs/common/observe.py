"""Pipeline-level gauges: stream backlogs, the dead stream, batch progress, dependency health.

Two kinds of numbers, collected by one background chore per service process
(``Observer.run``, every ``OBSERVE_INTERVAL_S``):

* **per process**: the round trip to Redis and to PostgreSQL from this process (a PING, a
  ``SELECT 1``), so a replica that lost its way to a server shows up as itself;
* **per deployment**: each stage's stream (entries, pending, lag, age of the oldest held
  entry, age of the oldest waiting one, consumers), the dead stream, Redis memory, the
  batches by state and the items of active batches, the largest share of a budget spent,
  the database size. One process at a time collects these — the holder of a short Redis
  lease (``{p}:observe:lease``) — so a hundred replicas cost Redis what one does. The
  holder alone exports them; a process that loses the lease stops exporting them at once,
  and queries take ``max by (stage)`` across targets to ride over a hand-over.

Entries are deleted when acknowledged (see keys.py), so a stream's length is exactly the
work waiting in or held by its stage, and lag = length - pending. That is the number
Redis 7 reports as the group's ``lag`` whenever it can; it reports NULL after an
out-of-order acknowledgement deleted the group's last-delivered entry, which our
workers do all the time, so the lag is computed here rather than read from XINFO.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from prometheus_client import REGISTRY, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from redis.asyncio import Redis
from redis.exceptions import RedisError

from .keys import GROUPS, Keys
from .ledger import ACTIVE_BATCH_STATES
from .runtime import Lease, supervise

log = logging.getLogger(__name__)

REDIS_UP = Gauge("imagestream_redis_up", "1 if this process's last Redis PING answered, else 0.")
REDIS_PING = Gauge(
    "imagestream_redis_ping_seconds", "Round trip of this process's last Redis PING."
)
POSTGRES_UP = Gauge(
    "imagestream_postgres_up", "1 if this process's last PostgreSQL SELECT 1 answered, else 0."
)
POSTGRES_PING = Gauge(
    "imagestream_postgres_ping_seconds", "Round trip of this process's last SELECT 1."
)
LEADER = Gauge(
    "imagestream_observer_leader",
    "1 if this process collects the deployment-wide gauges now (holds the observe lease).",
)

#: Item outcomes of a batch's counters, in the order of the ledger's columns.
ITEM_OUTCOMES = ("succeeded", "failed", "skipped", "cancelled")
PING_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class StreamStats:
    stage: str
    entries: int
    pending: int
    consumers: int
    oldest_pending_age_s: float
    oldest_waiting_age_s: float

    @property
    def lag(self) -> int:
        return max(0, self.entries - self.pending)


@dataclass(frozen=True, slots=True)
class Snapshot:
    streams: list[StreamStats]
    dead_entries: int
    redis_memory_bytes: int
    batches: dict[str, int]
    active_items: dict[str, int]
    active_cost_usd: float
    budget_used_max_ratio: float
    database_bytes: int
    #: Webhook events of this deployment not delivered yet, and the age of the oldest.
    webhook_events_pending: int
    webhook_oldest_pending_age_s: float
    taken_at: float = field(default_factory=time.time)


def _id_ms(entry_id: bytes | str | None) -> int | None:
    if not entry_id:
        return None
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-", 1)[0])


def _age_s(now_ms: int, entry_id: bytes | str | None) -> float:
    ms = _id_ms(entry_id)
    return 0.0 if ms is None else max(0.0, (now_ms - ms) / 1000)


async def collect_streams(redis: Redis, keys: Keys) -> tuple[list[StreamStats], int, int]:
    """Per-stage stream stats, the dead stream's length and Redis memory (3 round trips)."""
    names = list(GROUPS)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.time()
        for name in names:
            pipe.xlen(keys.stream(name))
            pipe.xinfo_groups(keys.stream(name))
            pipe.xpending(keys.stream(name), GROUPS[name])
        pipe.xlen(keys.dead)
        pipe.info("memory")
        replies: list[Any] = await pipe.execute(raise_on_error=False)
    seconds, micros = replies[0]
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    per_stream = [replies[1 + 3 * i : 4 + 3 * i] for i in range(len(names))]
    dead, memory = replies[-2], replies[-1]

    # The first entry after each group's last-delivered id: the oldest one still waiting.
    last_delivered: dict[str, Any] = {}
    for name, (_, groups, _) in zip(names, per_stream, strict=True):
        group = _group(groups, GROUPS[name])
        if group is not None:
            last_delivered[name] = group["last-delivered-id"]
    waiting: dict[str, Any] = {}
    if last_delivered:
        async with redis.pipeline(transaction=False) as pipe:
            for name, last in last_delivered.items():
                text = last.decode() if isinstance(last, bytes) else str(last)
                pipe.xrange(keys.stream(name), min=f"({text}", count=1)
            found = await pipe.execute(raise_on_error=False)
        for name, entries in zip(last_delivered, found, strict=True):
            if isinstance(entries, list) and entries:
                waiting[name] = entries[0][0]

    stats = []
    for name, (length, groups, pending) in zip(names, per_stream, strict=True):
        group = _group(groups, GROUPS[name])
        summary = pending if isinstance(pending, dict) else {}
        stats.append(
            StreamStats(
                stage=GROUPS[name],
                entries=length if isinstance(length, int) else 0,
                pending=int(summary.get("pending") or 0),
                consumers=int(group["consumers"]) if group is not None else 0,
                oldest_pending_age_s=_age_s(now_ms, summary.get("min")),
                oldest_waiting_age_s=_age_s(now_ms, waiting.get(name)),
            )
        )
    return (
        stats,
        dead if isinstance(dead, int) else 0,
        int(memory.get("used_memory", 0)) if isinstance(memory, dict) else 0,
    )


def _group(groups: Any, name: str) -> dict[str, Any] | None:
    """The group's XINFO GROUPS entry (None if the stream or the group does not exist)."""
    if not isinstance(groups, list):
        return None
    for group in groups:
        group_name = group["name"]
        if (group_name.decode() if isinstance(group_name, bytes) else group_name) == name:
            return dict(group)
    return None


async def collect_ledger(
    pool: asyncpg.Pool, pipeline: str
) -> tuple[dict[str, int], dict[str, int], float, float, int]:
    """Batches by state, items of active batches by outcome, their cost, the largest share
    of a budget spent, and the database size (one query)."""
    row = await pool.fetchrow(
        """
        WITH mine AS (SELECT * FROM batches WHERE pipeline = $1),
             active AS (SELECT * FROM mine WHERE state = ANY($2::text[]))
        SELECT
          (SELECT coalesce(jsonb_object_agg(state, n), '{}'::jsonb)
             FROM (SELECT state, count(*) AS n FROM mine GROUP BY state) s) AS batches,
          (SELECT jsonb_build_object(
                    'total', coalesce(sum(total), 0), 'succeeded', coalesce(sum(succeeded), 0),
                    'failed', coalesce(sum(failed), 0), 'skipped', coalesce(sum(skipped), 0),
                    'cancelled', coalesce(sum(cancelled), 0))
             FROM active) AS items,
          (SELECT coalesce(sum(cost_usd), 0)::float8 FROM active) AS cost,
          (SELECT coalesce(max(cost_usd / budget_usd), 0)::float8
             FROM active WHERE budget_usd > 0) AS budget_ratio,
          pg_database_size(current_database()) AS database_bytes
        """,
        pipeline,
        list(ACTIVE_BATCH_STATES),
    )
    assert row is not None
    counts = {k: int(v) for k, v in row["items"].items()}
    done = sum(counts[o] for o in ITEM_OUTCOMES)
    items = {o: counts[o] for o in ITEM_OUTCOMES} | {"remaining": max(0, counts["total"] - done)}
    batches = {str(k): int(v) for k, v in row["batches"].items()}
    return batches, items, row["cost"], row["budget_ratio"], int(row["database_bytes"])


async def collect_webhooks(pool: asyncpg.Pool, pipeline: str) -> tuple[int, float]:
    """Webhook events the pipeline's api processes have not delivered yet, and the age of
    the oldest (seconds; 0 if none): a receiver that is down shows as a growing age."""
    row = await pool.fetchrow(
        """
        SELECT count(*) AS pending,
               coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS oldest_s
        FROM webhook_events WHERE pipeline = $1 AND state = 'pending'
        """,
        pipeline,
    )
    assert row is not None
    return int(row["pending"]), float(row["oldest_s"])


async def collect(redis: Redis, pool: asyncpg.Pool, keys: Keys) -> Snapshot:
    (
        (streams, dead, memory),
        (batches, items, cost, ratio, db_bytes),
        (hooks_pending, hooks_oldest_s),
    ) = await asyncio.gather(
        collect_streams(redis, keys),
        collect_ledger(pool, keys.prefix),
        collect_webhooks(pool, keys.prefix),
    )
    return Snapshot(
        streams, dead, memory, batches, items, cost, ratio, db_bytes, hooks_pending,
        hooks_oldest_s,
    )  # fmt: skip


class PipelineCollector(Collector):
    """Exports the latest deployment-wide snapshot, only while this process collects it."""

    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snap = self.snapshot
        if snap is None:
            return
        # (name, help, StreamStats attribute)
        per_stage = [
            ("imagestream_stream_entries",
             "Entries in the stage's input stream (waiting + held).", "entries"),
            ("imagestream_stream_pending_entries",
             "Entries delivered to the stage's consumers and not yet acknowledged.", "pending"),
            ("imagestream_stream_lag_entries",
             "Entries not yet delivered to the stage (length - pending).", "lag"),
            ("imagestream_stream_oldest_pending_age_seconds",
             "Age of the oldest entry the stage holds, since it entered the stream.",
             "oldest_pending_age_s"),
            ("imagestream_stream_oldest_waiting_age_seconds",
             "Age of the oldest entry not yet delivered to the stage.", "oldest_waiting_age_s"),
            ("imagestream_stream_consumers",
             "Consumers registered in the stage's group.", "consumers"),
        ]  # fmt: skip
        for name, doc, attribute in per_stage:
            family = GaugeMetricFamily(name, doc, labels=["stage"])
            for stream in snap.streams:
                family.add_metric([stream.stage], float(getattr(stream, attribute)))
            yield family
        yield _gauge(
            "imagestream_dead_stream_entries",
            "Entries in the dead stream (poison entries of every stage, kept for replay).",
            snap.dead_entries,
        )
        yield _gauge(
            "imagestream_redis_memory_used_bytes", "Redis used_memory.", snap.redis_memory_bytes
        )
        yield _labelled(
            "imagestream_batches", "Batches of this deployment by state.", "state", snap.batches
        )
        yield _labelled(
            "imagestream_active_batch_items",
            "Items of active (queued, running, paused, cancelling) batches, by outcome so far.",
            "outcome",
            snap.active_items,
        )
        yield _gauge(
            "imagestream_active_batch_cost_usd",
            "Analysis cost recorded so far by active batches (USD).",
            snap.active_cost_usd,
        )
        yield _gauge(
            "imagestream_batch_budget_used_max_ratio",
            "Largest cost / budget among active batches that have a budget (0 if none).",
            snap.budget_used_max_ratio,
        )
        yield _gauge(
            "imagestream_postgres_database_size_bytes",
            "Size of the ledger's database.",
            snap.database_bytes,
        )
        yield _gauge(
            "imagestream_webhook_events_pending",
            "Webhook events of this deployment not delivered (nor given up) yet.",
            snap.webhook_events_pending,
        )
        yield _gauge(
            "imagestream_webhook_oldest_pending_age_seconds",
            "Age of the oldest webhook event not delivered yet (0 if none).",
            snap.webhook_oldest_pending_age_s,
        )
        yield _gauge(
            "imagestream_observer_snapshot_timestamp_seconds",
            "When the deployment-wide gauges above were collected (Unix time).",
            snap.taken_at,
        )


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value))


def _labelled(name: str, doc: str, label: str, values: dict[str, int]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], float(value))
    return family


PIPELINE = PipelineCollector()
REGISTRY.register(PIPELINE)


class Observer:
    """The per-process chore: ping both servers; collect the snapshot while holding the lease."""

    def __init__(
        self,
        redis: Redis,
        pool: asyncpg.Pool,
        keys: Keys,
        interval_s: float,
        exporter: PipelineCollector = PIPELINE,
    ) -> None:
        self.redis = redis
        self.pool = pool
        self.keys = keys
        self.interval_s = interval_s
        self.exporter = exporter
        # The lease outlives two missed ticks, so a slow collection does not flap it.
        self._lease = Lease(redis, keys.observe_lease, 3 * interval_s, LEADER)

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await supervise("observe", self.tick, stop, self.interval_s)
        finally:
            await self._resign()

    async def tick(self) -> None:
        await asyncio.gather(self._ping_redis(), self._ping_postgres())
        if not await self._lease.hold():
            self.exporter.snapshot = None
            return
        try:
            self.exporter.snapshot = await collect(self.redis, self.pool, self.keys)
        except (RedisError, OSError, asyncpg.PostgresError, TimeoutError):
            # Better no numbers than stale ones; the up/ping gauges tell why.
            self.exporter.snapshot = None
            raise

    async def _resign(self) -> None:
        self.exporter.snapshot = None
        await self._lease.release()

    async def _ping_redis(self) -> None:
        await _ping(REDIS_UP, REDIS_PING, self.redis.ping)

    async def _ping_postgres(self) -> None:
        await _ping(POSTGRES_UP, POSTGRES_PING, lambda: self.pool.fetchval("SELECT 1"))


async def _ping(up: Gauge, seconds: Gauge, probe: Any) -> None:
    started = time.perf_counter()
    try:
        await asyncio.wait_for(probe(), timeout=PING_TIMEOUT_S)
    except (RedisError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
        up.set(0)
        return
    up.set(1)
    seconds.set(time.perf_counter() - started)
