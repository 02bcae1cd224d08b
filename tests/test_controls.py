"""Pause, resume, cancel and replay through the running pipeline (real Redis/PostgreSQL,
real HTTP on loopback)."""

from __future__ import annotations

import asyncio
from collections import Counter

import asyncpg

from imagestream.common import control, ledger
from imagestream.common.connections import Resources
from imagestream.devtools import corpus
from imagestream.devtools.imageserver import ImageServer, Reply
from imagestream.ingest.service import ingest_list

from .helpers import wait_for
from .pipeline_harness import finished, running, submit


def small_images(count: int, drip_s: float = 0.0) -> dict[str, Reply]:
    data = corpus.sample("x", 48, 32, "PNG", seed=1).data
    return {
        f"img/{i}.png": Reply(data, content_type="image/png", drip_s=drip_s) for i in range(count)
    }


async def counts(pool: asyncpg.Pool, batch_id: object) -> dict[str, int]:
    rows = await pool.fetch(
        "SELECT state, count(*) AS n FROM items WHERE batch_id = $1 GROUP BY state", batch_id
    )
    return {r["state"]: r["n"] for r in rows}


async def test_pause_stops_dispatch_within_a_second_and_resume_finishes_once(
    res: Resources,
) -> None:
    # Each image takes ~0.2 s to serve, the window is small: most items wait in the ledger.
    server = ImageServer(small_images(120, drip_s=0.1))
    await server.start()
    try:
        async with running(res, DISPATCH_WINDOW="12", FETCH_CONCURRENCY="6"):
            batch_id = await submit(res, [server.url(p) for p in server.routes])

            async def some_done() -> bool:
                return (await ledger.batch(res.pool, batch_id))["succeeded"] >= 10

            await wait_for(some_done)
            assert await control.pause(res.redis, res.keys, res.pool, batch_id, "test") == "paused"
            await asyncio.sleep(1.0)
            hits_after_1s = sum(server.hits.values())
            await asyncio.sleep(2.0)
            # Nothing new was fetched once the pause had reached the fetcher.
            assert sum(server.hits.values()) == hits_after_1s
            paused = await ledger.batch(res.pool, batch_id)
            assert paused["state"] == "paused"
            assert paused["succeeded"] < 120
            assert (await counts(res.pool, batch_id)).get("pending", 0) > 0
            # Nothing left in flight: the fetch stream's entries went back to pending.
            assert await res.redis.xlen(res.keys.fetch) == 0

            assert await control.resume(res.redis, res.keys, res.pool, batch_id) == "running"
            done = await wait_for(lambda: finished(res, batch_id), timeout=60)
        assert done["state"] == "completed" and done["succeeded"] == 120
        assert await counts(res.pool, batch_id) == {"succeeded": 120}
        # No image was fetched twice, and there is one result per item.
        assert max(server.hits.values()) == 1 and len(server.hits) == 120
        assert (
            await res.pool.fetchval(
                "SELECT count(*) FROM results r JOIN items i ON i.id = r.item_id WHERE i.batch_id = $1",
                batch_id,
            )
            == 120
        )
    finally:
        await server.stop()


async def test_pausing_one_batch_does_not_hold_another(res: Resources) -> None:
    server = ImageServer(small_images(60))
    await server.start()
    try:
        async with running(res, DISPATCH_WINDOW="20"):
            urls = [server.url(p) for p in server.routes]
            held = await submit(res, urls[:30])
            await control.pause(res.redis, res.keys, res.pool, held, "test")
            other = await submit(res, urls[30:])
            done = await wait_for(lambda: finished(res, other), timeout=60)
            assert done["succeeded"] == 30
            assert (await ledger.batch(res.pool, held))["state"] == "paused"
    finally:
        await server.stop()


async def test_cancel_marks_the_rest_cancelled(res: Resources) -> None:
    server = ImageServer(small_images(80, drip_s=0.1))
    await server.start()
    try:
        async with running(res, DISPATCH_WINDOW="8", FETCH_CONCURRENCY="4"):
            batch_id = await submit(res, [server.url(p) for p in server.routes])

            async def started() -> bool:
                return (await ledger.batch(res.pool, batch_id))["succeeded"] >= 4

            await wait_for(started)
            assert await control.cancel(res.redis, res.keys, res.pool, batch_id) in (
                "cancelling",
                "cancelled",
            )
            done = await wait_for(lambda: finished(res, batch_id), timeout=60)
        assert done["state"] == "cancelled"
        states = await counts(res.pool, batch_id)
        assert set(states) <= {"succeeded", "cancelled"}
        assert states["cancelled"] == done["cancelled"] > 40
        assert states.get("succeeded", 0) == done["succeeded"]
        assert done["succeeded"] + done["cancelled"] == 80
    finally:
        await server.stop()


async def test_replay_by_error_class_after_the_server_recovers(res: Resources) -> None:
    good = corpus.sample("x", 40, 30, "JPEG", seed=2).data
    routes = small_images(20)
    for i in range(10):
        routes[f"flaky/{i}.jpg"] = Reply(b"down", status=500, content_type="text/plain")
    routes["gone.jpg"] = Reply(b"", status=404)
    server = ImageServer(routes)
    await server.start()
    try:
        async with running(res):
            batch_id = await submit(res, [server.url(p) for p in routes])
            first = await wait_for(lambda: finished(res, batch_id), timeout=60)
            assert first["state"] == "completed_with_errors"
            assert (first["succeeded"], first["failed"]) == (20, 11)
            assert await ledger.error_counts(res.pool, batch_id) == {
                "http_server_error": 10,
                "not_found": 1,
            }

            for i in range(10):  # the server recovers
                routes[f"flaky/{i}.jpg"] = Reply(good, content_type="image/jpeg")
            replayed = await control.replay(res.pool, batch_id, error_classes=["http_server_error"])
            assert replayed == 10
            again = await wait_for(lambda: finished(res, batch_id), timeout=60)
        assert again["state"] == "completed_with_errors"  # the 404 was not replayed
        assert (again["succeeded"], again["failed"], again["total"]) == (30, 1, 31)
        assert await counts(res.pool, batch_id) == {"succeeded": 30, "failed": 1}
        # The failures stay in the items' history.
        history = await res.pool.fetch(
            "SELECT error_class FROM failures WHERE batch_id = $1", batch_id
        )
        assert Counter(r["error_class"] for r in history) == {
            "http_server_error": 10,
            "not_found": 1,
        }
        assert (
            await res.pool.fetchval(
                "SELECT count(*) FROM results r JOIN items i ON i.id = r.item_id WHERE i.batch_id = $1",
                batch_id,
            )
            == 30
        )
    finally:
        await server.stop()


async def test_redis_losing_its_data_mid_batch_loses_nothing(res: Resources) -> None:
    server = ImageServer(small_images(150, drip_s=0.02))
    await server.start()
    try:
        async with running(res, DISPATCH_WINDOW="40"):
            batch_id = await submit(res, [server.url(p) for p in server.routes])

            async def some_done() -> bool:
                return (await ledger.batch(res.pool, batch_id))["succeeded"] >= 30

            await wait_for(some_done)
            # Everything this pipeline keeps in Redis disappears (as after a restart
            # without persistence): streams, groups, blobs, the epoch key.
            async for key in res.redis.scan_iter(match=f"{res.keys.prefix}:*"):
                await res.redis.delete(key)
            done = await wait_for(lambda: finished(res, batch_id), timeout=90)
        assert done["state"] == "completed" and done["succeeded"] == 150
        assert await counts(res.pool, batch_id) == {"succeeded": 150}
        assert (
            await res.pool.fetchval(
                "SELECT count(*) FROM results r JOIN items i ON i.id = r.item_id WHERE i.batch_id = $1",
                batch_id,
            )
            == 150
        )
    finally:
        await server.stop()


async def test_a_batch_paused_before_its_list_is_read_resumes(res: Resources) -> None:
    server = ImageServer(small_images(10))
    await server.start()
    try:
        async with running(res):
            batch_id = await ledger.create_batch(
                res.pool, ledger.NewBatch(name="t", pipeline=res.keys.prefix)
            )
            await control.pause(res.redis, res.keys, res.pool, batch_id, "test")

            async def chunks():  # type: ignore[no-untyped-def]
                yield "".join(server.url(p) + "\n" for p in server.routes).encode()

            await ingest_list(res, batch_id, chunks(), filename="l.txt")
            await asyncio.sleep(0.5)
            assert (await ledger.batch(res.pool, batch_id))["succeeded"] == 0  # still paused
            assert await control.resume(res.redis, res.keys, res.pool, batch_id) == "running"
            done = await wait_for(lambda: finished(res, batch_id), timeout=60)
        assert done["state"] == "completed" and done["succeeded"] == 10
    finally:
        await server.stop()


async def test_cancelling_before_the_list_is_read(res: Resources) -> None:
    async with running(res):
        batch_id = await ledger.create_batch(
            res.pool, ledger.NewBatch(name="t", pipeline=res.keys.prefix, source_name="l.txt")
        )
        async with res.pool.acquire() as conn:
            await ledger.store_upload_part(conn, batch_id, 0, b"http://127.0.0.1:9/a.png\n")
        assert await control.cancel(res.redis, res.keys, res.pool, batch_id) == "cancelled"
        # A list read after the cancel (a reader that was already at work) adds only
        # cancelled items, and the batch stays cancelled.

        async def chunks():  # type: ignore[no-untyped-def]
            yield b"http://127.0.0.1:9/b.png\nhttp://127.0.0.1:9/c.png\n"

        await ingest_list(res, batch_id, chunks(), filename="l.txt")
    done = await ledger.batch(res.pool, batch_id)
    assert (done["state"], done["total"], done["cancelled"]) == ("cancelled", 2, 2)
    assert await counts(res.pool, batch_id) == {"cancelled": 2}
    assert (
        await res.pool.fetchval("SELECT count(*) FROM upload_parts WHERE batch_id = $1", batch_id)
        == 0
    )
