"""The deployment-wide gauges (libs/common/observe.py) against the real Redis and
PostgreSQL: what they report for streams in a known state, the lease that lets one
process collect them, and what a process reports when Redis stops answering."""

from __future__ import annotations

import asyncpg
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from imagestream.common import ledger, streams, webhooks
from imagestream.common.connections import redis_client
from imagestream.common.keys import GROUPS, Keys
from imagestream.common.observe import (
    Observer,
    PipelineCollector,
    collect,
    collect_streams,
)

from .procs import free_port


async def _stage_state(redis: Redis, keys: Keys) -> None:
    """fetch: 5 entries, 2 delivered, 1 of those acknowledged out of order (deleted)."""
    group = streams.StreamGroup(redis, keys.fetch, GROUPS["fetch"], "c1")
    await group.ensure()
    await streams.append(redis, keys.fetch, [b"a", b"b", b"c", b"d", b"e"])
    _held, acked = await group.read_new(2, 100)
    # Acknowledge the later one first: Redis can no longer tell the group's lag.
    assert await group.hand_off([streams.HandOff(acked.id)]) == [True]


async def test_stream_numbers(redis: Redis, keys: Keys) -> None:
    await _stage_state(redis, keys)
    await streams.append(redis, keys.dead, [b"x", b"y"])
    stats, dead, memory = await collect_streams(redis, keys)
    fetch = next(s for s in stats if s.stage == "fetcher")
    assert (fetch.entries, fetch.pending, fetch.lag, fetch.consumers) == (4, 1, 3, 1)
    assert fetch.oldest_pending_age_s >= 0 and fetch.oldest_waiting_age_s >= 0
    (info,) = await redis.xinfo_groups(keys.fetch)
    # What Redis answers (7.x: NULL here; 6.2: no lag at all), and why we compute it.
    assert info.get("lag") in (None, fetch.lag)
    # Stages whose stream or group does not exist yet report zeros, not errors.
    others = [s for s in stats if s.stage != "fetcher"]
    assert {(s.entries, s.pending, s.consumers) for s in others} == {(0, 0, 0)}
    assert dead == 2 and memory > 0


async def test_batch_numbers(redis: Redis, pool: asyncpg.Pool, keys: Keys) -> None:
    batch_id = await ledger.create_batch(
        pool, ledger.NewBatch(name="observe", pipeline=keys.prefix, budget_usd=2.0)
    )
    await pool.execute(
        "UPDATE batches SET state = 'running', total = 10, succeeded = 3, failed = 1,"
        " cost_usd = 1.5 WHERE id = $1",
        batch_id,
    )
    snapshot = await collect(redis, pool, keys)
    assert snapshot.batches == {"running": 1}
    assert snapshot.active_items == {
        "succeeded": 3, "failed": 1, "skipped": 0, "cancelled": 0, "remaining": 6,
    }  # fmt: skip
    assert snapshot.active_cost_usd == 1.5
    assert snapshot.budget_used_max_ratio == 0.75
    assert snapshot.database_bytes > 0
    await pool.execute("UPDATE batches SET state = 'completed' WHERE id = $1", batch_id)
    done = await collect(redis, pool, keys)
    assert done.batches == {"completed": 1}
    assert done.active_items["remaining"] == 0 and done.budget_used_max_ratio == 0


async def test_webhook_backlog(redis: Redis, pool: asyncpg.Pool, keys: Keys) -> None:
    assert (await collect(redis, pool, keys)).webhook_events_pending == 0
    batch_id = await ledger.create_batch(
        pool,
        ledger.NewBatch(
            name="hooked",
            pipeline=keys.prefix,
            webhook_url="http://127.0.0.1:9/hooks",
            webhook_secret=webhooks.new_secret(),
        ),
    )
    await ledger.fail_batch(pool, batch_id, "cannot read the list")
    await pool.execute(
        "UPDATE webhook_events SET created_at = now() - interval '2 hours' WHERE batch_id = $1",
        batch_id,
    )
    snapshot = await collect(redis, pool, keys)
    assert snapshot.webhook_events_pending == 1
    assert 7100 < snapshot.webhook_oldest_pending_age_s < 7300


async def test_one_collector_at_a_time(redis: Redis, pool: asyncpg.Pool, keys: Keys) -> None:
    await _stage_state(redis, keys)
    first_out, second_out = PipelineCollector(), PipelineCollector()
    first = Observer(redis, pool, keys, interval_s=5.0, exporter=first_out)
    second = Observer(redis, pool, keys, interval_s=5.0, exporter=second_out)
    await first.tick()
    await second.tick()
    assert first_out.snapshot is not None and second_out.snapshot is None
    names = {family.name for family in first_out.collect()}
    assert {"imagestream_stream_entries", "imagestream_dead_stream_entries"} <= names
    assert list(second_out.collect()) == []
    # The holder keeps the lease on its next tick; when it stops, the other takes over.
    await first.tick()
    assert first_out.snapshot is not None
    await first._resign()
    await second.tick()
    assert first_out.snapshot is None and second_out.snapshot is not None


async def test_redis_down(pool: asyncpg.Pool, keys: Keys) -> None:
    dead_redis = redis_client(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=1)
    exporter = PipelineCollector()
    observer = Observer(dead_redis, pool, keys, interval_s=1.0, exporter=exporter)
    try:
        await observer.tick()
    finally:
        await dead_redis.aclose()
    assert REGISTRY.get_sample_value("imagestream_redis_up") == 0
    assert exporter.snapshot is None, "no lease, no numbers"
