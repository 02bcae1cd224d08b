"""Chaos: 5,000 items through separately started services (2 fetchers, 2 analyzers) while
random service processes are SIGKILLed and restarted every few seconds and Redis restarts
empty once mid-run. Nothing may be lost or doubled.

The test runs its own redis-server (restarting the shared one would disturb other tests).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis

from imagestream.common import ledger, messages, streams
from imagestream.common.connections import redis_client
from imagestream.common.keys import FIELD, Keys
from imagestream.devtools import corpus
from imagestream.devtools.imageserver import ImageServer, Reply

from .helpers import wait_for
from .procs import Fleet, RedisServer, service_env

ITEMS = 5000
MISSING = 20
STAGES = ("ingest", "fetcher", "fetcher", "analyzer", "analyzer", "writer")


async def inject_poison(redis: Redis, keys: Keys, count: int) -> None:
    for i in range(count):
        await redis.xadd(keys.fetch, {FIELD: b"\xc1garbage-%d" % i})


@pytest.mark.timeout(600)
async def test_nothing_lost_nothing_doubled_under_chaos(
    database_url: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    rng = random.Random(20261124)
    # A few hundred distinct tiny images, so content dedup does not hide all the work.
    distinct = [
        corpus.sample("x", 24 + i % 17, 16 + i % 13, "PNG", seed=i).data for i in range(300)
    ]
    routes = {
        f"img/{i}.png": Reply(distinct[i % 300], content_type="image/png") for i in range(ITEMS)
    }
    server = ImageServer(routes)
    await server.start()
    redis_server = RedisServer(tmp_path)
    redis_server.start()
    prefix = f"chaos{uuid.uuid4().hex[:6]}"
    keys = Keys(prefix)
    env = service_env(
        redis_server.url,
        database_url,
        prefix,
        CLAIM_IDLE_MS="3000",
        CLAIM_INTERVAL_S="0.5",
        MAX_DELIVERIES="8",
        DISPATCH_WINDOW="1000",
        METRICS_PORT="-1",
        LOG_LEVEL="WARNING",
    )
    fleet = Fleet(env, tmp_path)
    redis = redis_client(redis_server.url)
    await wait_for(lambda: _pings(redis), timeout=20)
    for stage in STAGES:
        fleet.start(stage)
    urls = [server.url(p) for p in routes] + [
        server.url(f"missing/{i}.png") for i in range(MISSING)
    ]
    batch_id = await ledger.create_batch(
        pool, ledger.NewBatch(name="chaos", pipeline=prefix, source_name="l.txt")
    )
    async with pool.acquire() as conn:
        await ledger.store_upload_part(conn, batch_id, 0, ("\n".join(urls) + "\n").encode())
    await streams.append(
        redis, keys.batches, [messages.encode(messages.BatchSubmitted(batch_id=str(batch_id)))]
    )

    kills = 0
    redis_restarted = False
    deadline = time.monotonic() + 420
    try:
        while True:
            row = await ledger.batch(pool, batch_id)
            if row["state"] in ledger.FINISHED_BATCH_STATES:
                break
            assert time.monotonic() < deadline, (
                f"batch did not finish: {dict(row)}\n{fleet.logs_text()}"
            )
            done = row["succeeded"] + row["failed"]
            if not redis_restarted and done > ITEMS * 0.4:
                # Redis restarts empty: streams, groups, blobs and in-flight entries vanish.
                redis_server.kill()
                redis_server.start()
                await wait_for(lambda: _pings(redis), timeout=20)
                await inject_poison(redis, keys, 3)
                redis_restarted = True
            victim = rng.choice([s for s in fleet.services if s.process.poll() is None])
            victim.kill()
            fleet.services.remove(victim)
            fleet.start(victim.stage)
            kills += 1
            await asyncio.sleep(rng.uniform(2.0, 4.0))
        assert redis_restarted and kills >= 5

        final = await ledger.batch(pool, batch_id)
        assert final["state"] == "completed_with_errors"
        states = {
            r["state"]: r["n"]
            for r in await pool.fetch(
                "SELECT state, count(*) AS n FROM items WHERE batch_id = $1 GROUP BY state",
                batch_id,
            )
        }
        # Every item is terminal, with the outcome it deserves.
        assert states == {"succeeded": ITEMS, "failed": MISSING}, states
        assert await ledger.error_counts(pool, batch_id) == {"not_found": MISSING}
        # Counters equal the ledger.
        assert (final["total"], final["succeeded"], final["failed"]) == (
            ITEMS + MISSING,
            ITEMS,
            MISSING,
        )
        # Exactly one result row per succeeded item, none for the others.
        per_item = await pool.fetch(
            """SELECT i.state, count(r.item_id) AS n FROM items i LEFT JOIN results r ON r.item_id = i.id
               WHERE i.batch_id = $1 GROUP BY i.state, i.id HAVING count(r.item_id) <> (i.state = 'succeeded')::int""",
            batch_id,
        )
        assert per_item == []
        assert (
            await pool.fetchval("SELECT count(*) FROM results WHERE batch_id = $1", batch_id)
            == ITEMS
        )
        # The dead stream holds only the genuinely poison entries.
        letters = [messages.dead_decoder.decode(f[FIELD]) for _, f in await redis.xrange(keys.dead)]
        assert letters, "the poison entries should be in the dead stream"
        assert all(letter.reason.startswith("undecodable") for letter in letters), letters
        assert {letter.payload for letter in letters} <= {b"\xc1garbage-%d" % i for i in range(3)}
    finally:
        fleet.stop_all()
        await redis.aclose()
        redis_server.kill()
        await server.stop()


async def _pings(redis: Redis) -> bool:
    try:
        return bool(await redis.ping())
    except Exception:
        return False
