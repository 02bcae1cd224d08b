"""The consumer loop every stage runs: read, handle, hand off, claim, dead-letter, drain.

A stage supplies a decoder and a handler (one message -> the next messages, or a list of
messages -> their next messages for stages that work in bulk, like the writer); this loop
supplies everything else:

* bounded concurrency: at most ``concurrency`` entries are held at once (read COUNT is the
  number of free slots), and reading pauses while the next stream is over its high-water
  mark, so a slow downstream stage holds the upstream back instead of filling Redis;
* reading its own pending entries first, then new ones;
* claiming entries idle for ``CLAIM_IDLE_MS`` (their consumer died) and sending entries
  delivered more than ``MAX_DELIVERIES`` times to the dead stream, with the stage's
  failure message for their item;
* batching the fenced hand-offs of finished entries into one round trip;
* on stop: no new reads, in-flight work gets ``SHUTDOWN_GRACE_S`` to finish, then what is
  left is cancelled and stays pending for another consumer to claim.

A handler that raises leaves its entry pending: it is redelivered after the claim idle
time, and dead-lettered once it has been delivered too often.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec
import orjson
from prometheus_client import Counter, Gauge, Histogram
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import messages
from .keys import Keys
from .runtime import drain, supervise
from .settings import StreamSettings
from .streams import Entry, HandOff, StreamGroup, is_missing_group, lengths

log = logging.getLogger(__name__)

ITEMS = Counter(
    "imagestream_stage_entries_total",
    "Stream entries finished by a stage, by outcome (handed_off, fenced, failed, dead).",
    ["stage", "outcome"],
)
DURATION = Histogram(
    "imagestream_stage_duration_seconds",
    "Time a stage spent handling one entry (or one bulk read), hand-off excluded.",
    ["stage"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
INFLIGHT = Gauge("imagestream_stage_inflight", "Entries a stage holds now.", ["stage"])
CAPACITY = Gauge("imagestream_stage_capacity", "Entries a stage may hold at once.", ["stage"])
CLAIMED = Counter(
    "imagestream_stage_claimed_total", "Entries taken over from stopped consumers.", ["stage"]
)
RECEIVED = Counter(
    "imagestream_stage_received_total",
    "Stream entries a stage took in (new, its own pending after a restart, or claimed).",
    ["stage"],
)

T = TypeVar("T")
#: One message for the next stage: (stream key, encoded message).
Out = tuple[str, bytes]
Handler = Callable[[T], Awaitable[Sequence[Out]]]
BulkHandler = Callable[[list[T]], Awaitable[list[Sequence[Out] | BaseException]]]
DeadHandler = Callable[[T | None, str], Sequence[Out]]

REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)


def out(stream: str, message: Any) -> Out:
    return (stream, messages.encode(message))


def default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass
class _Pending:
    handoff: HandOff
    done: asyncio.Future[bool]


class StreamWorker(Generic[T]):
    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        settings: StreamSettings,
        *,
        stage: str,
        stream: str,
        group: str,
        decode: Callable[[bytes], T],
        on_dead: DeadHandler[T],
        handle: Handler[T] | None = None,
        handle_bulk: BulkHandler[T] | None = None,
        concurrency: int = 16,
        bulk_size: int = 500,
        high_water: tuple[str, int] | None = None,
        consumer: str | None = None,
    ) -> None:
        if (handle is None) == (handle_bulk is None):
            raise ValueError("give exactly one of handle / handle_bulk")
        self.redis = redis
        self.keys = keys
        self.settings = settings
        self.stage = stage
        self.consumer = consumer or settings.consumer_name or default_consumer_name()
        self.group = StreamGroup(redis, stream, group, self.consumer)
        self.decode = decode
        self.handle = handle
        self.handle_bulk = handle_bulk
        self.on_dead = on_dead
        self.capacity = concurrency if handle else bulk_size
        self.high_water = high_water
        self.inflight = 0
        self._slot_freed = asyncio.Event()
        # The loop holds the only strong reference to its tasks (asyncio keeps weak ones).
        self._tasks: set[asyncio.Task[None]] = set()
        self._held: set[str] = set()  # entry ids being handled now
        self._buffer: list[_Pending] = []
        self._buffer_ready = asyncio.Event()
        self._started = time.time()
        CAPACITY.labels(stage).set(self.capacity)

    # ---------------------------------------------------------------- main loop
    async def run(self, stop: asyncio.Event) -> None:
        await self.group.ensure()
        flusher = asyncio.create_task(self._flush_loop())
        chores = [
            asyncio.create_task(
                supervise("claim", self._claim_once, stop, self.settings.claim_interval_s)
            ),
            asyncio.create_task(supervise("heartbeat", self._heartbeat, stop, 5.0)),
            asyncio.create_task(
                supervise("touch", self._touch, stop, self.settings.claim_idle_ms / 3000)
            ),
        ]
        log.info("worker started", extra={"stage": self.stage, "consumer": self.consumer})
        try:
            await self._dispatch(await self.group.read_own_pending(self.capacity))
            while not stop.is_set():
                try:
                    await self._read_once(stop)
                except Exception:
                    log.exception("reading failed; retrying", extra={"stage": self.stage})
                    await _wait_any(stop, at_most_s=1.0)
        finally:
            await drain(self._tasks, self.settings.shutdown_grace_s)
            for chore in chores:
                chore.cancel()
            await asyncio.gather(*chores, return_exceptions=True)
            self._buffer_ready.set()
            flusher.cancel()
            await asyncio.gather(flusher, return_exceptions=True)
            await self._flush()
            await self.redis.delete(self.keys.alive(self.stage, self.consumer))
            log.info("worker stopped", extra={"stage": self.stage, "consumer": self.consumer})

    async def _read_once(self, stop: asyncio.Event) -> None:
        free = self.capacity - self.inflight
        if free <= 0:
            self._slot_freed.clear()
            await _wait_any(self._slot_freed, stop, at_most_s=1.0)
            return
        try:
            if self.high_water is not None:
                stream, limit = self.high_water
                (backlog,) = await lengths(self.redis, [stream])
                if backlog >= limit:
                    await _wait_any(stop, at_most_s=0.05)
                    return
            entries = await self.group.read_new(free, self.settings.read_block_ms)
        except ResponseError as exc:
            if not is_missing_group(exc):
                raise
            log.warning("stream group missing; recreating", extra={"stage": self.stage})
            await self.group.ensure()
            return
        except REDIS_ERRORS as exc:
            log.warning("redis unavailable: %s", exc, extra={"stage": self.stage})
            await _wait_any(stop, at_most_s=1.0)
            return
        await self._dispatch(entries)

    async def _claim_once(self) -> None:
        free = self.capacity - self.inflight
        if free > 0:
            try:
                entries = await self.group.claim_idle(self.settings.claim_idle_ms, free)
            except ResponseError as exc:
                if not is_missing_group(exc):
                    raise
                await self.group.ensure()
                return
            # Entries this consumer still handles look idle when the touch loop ran late (a
            # loaded machine): claiming them back only reset their idle time; handling them a
            # second time would send the item on twice.
            entries = [entry for entry in entries if entry.id not in self._held]
            if entries:
                CLAIMED.labels(self.stage).inc(len(entries))
                log.info("claimed idle entries", extra={"stage": self.stage, "count": len(entries)})
                await self._dispatch(entries)
        await self._remove_stale_consumers()

    async def _remove_stale_consumers(self) -> None:
        """Forget consumers that hold nothing and have been silent for long."""
        stale_ms = self.settings.consumer_stale_ms
        for info in await self.group.consumers():
            name = info["name"].decode() if isinstance(info["name"], bytes) else info["name"]
            if name != self.consumer and info["pending"] == 0 and info["idle"] > stale_ms:
                await self.group.remove_consumer(name)
                log.info("removed stale consumer", extra={"stage": self.stage, "name": name})

    async def _touch(self) -> None:
        await self.group.touch(sorted(self._held))

    async def _heartbeat(self) -> None:
        info = {
            "stage": self.stage,
            "consumer": self.consumer,
            "inflight": self.inflight,
            "capacity": self.capacity,
            "started": self._started,
            "at": time.time(),
        }
        await self.redis.set(self.keys.alive(self.stage, self.consumer), orjson.dumps(info), ex=15)

    # ---------------------------------------------------------------- handling
    async def _dispatch(self, entries: list[Entry]) -> None:
        gone = [e.id for e in entries if e.payload is None]
        await self.group.drop(gone)
        RECEIVED.labels(self.stage).inc(len(entries) - len(gone))
        ready: list[tuple[Entry, T]] = []
        for entry in entries:
            if entry.payload is None:
                continue
            try:
                message = self.decode(entry.payload)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self._spawn(self._dead_letter(entry, None, f"undecodable: {exc}"))
                continue
            if entry.deliveries > self.settings.max_deliveries:
                reason = f"delivered {entry.deliveries} times without completing"
                self._spawn(self._dead_letter(entry, message, reason))
                continue
            ready.append((entry, message))
        if not ready:
            return
        if self.handle is not None:
            for entry, message in ready:
                self._spawn(self._run_one(entry, message))
        else:
            self._spawn(self._run_bulk(ready))

    def _spawn(self, coro: Awaitable[None]) -> None:
        self.inflight += 1
        INFLIGHT.labels(self.stage).inc()
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._release)

    def _release(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self.inflight -= 1
        INFLIGHT.labels(self.stage).dec()
        self._slot_freed.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("worker task crashed", exc_info=task.exception(), extra={"stage": self.stage})

    async def _run_one(self, entry: Entry, message: T) -> None:
        assert self.handle is not None
        started = time.perf_counter()
        # Held (touched, never claimed back) until handed off, not only while handled.
        self._held.add(entry.id)
        try:
            try:
                outputs = await self.handle(message)
            except Exception:
                ITEMS.labels(self.stage, "failed").inc()
                log.exception("handler failed; entry stays pending", extra=self._context(entry))
                return
            DURATION.labels(self.stage).observe(time.perf_counter() - started)
            await self._submit([HandOff(entry.id, outputs)])
        finally:
            self._held.discard(entry.id)

    async def _run_bulk(self, ready: list[tuple[Entry, T]]) -> None:
        assert self.handle_bulk is not None
        started = time.perf_counter()
        # The bulk counts as one task but holds len(ready) slots.
        extra = len(ready) - 1
        self.inflight += extra
        ids = {entry.id for entry, _ in ready}
        self._held |= ids
        try:
            try:
                results = await self.handle_bulk([message for _, message in ready])
            except Exception:
                ITEMS.labels(self.stage, "failed").inc(len(ready))
                log.exception(
                    "bulk handler failed; entries stay pending", extra={"stage": self.stage}
                )
                return
            DURATION.labels(self.stage).observe(time.perf_counter() - started)
            handoffs = []
            for (entry, _), result in zip(ready, results, strict=True):
                if isinstance(result, BaseException):
                    ITEMS.labels(self.stage, "failed").inc()
                    log.error(
                        "handler failed; entry stays pending: %s",
                        result,
                        extra=self._context(entry),
                    )
                else:
                    handoffs.append(HandOff(entry.id, result))
            await self._submit(handoffs)
        finally:
            self._held -= ids
            self.inflight -= extra

    async def _dead_letter(self, entry: Entry, message: T | None, reason: str) -> None:
        assert entry.payload is not None
        letter = messages.DeadLetter(
            stream=self.group.stream,
            entry_id=entry.id,
            stage=self.stage,
            deliveries=entry.deliveries,
            reason=reason,
            payload=entry.payload,
        )
        outputs = [out(self.keys.dead, letter), *self.on_dead(message, reason)]
        log.warning("dead-lettering entry: %s", reason, extra=self._context(entry))
        await self._submit([HandOff(entry.id, outputs)], outcome="dead")

    def _context(self, entry: Entry) -> dict[str, Any]:
        return {"stage": self.stage, "entry": entry.id, "deliveries": entry.deliveries}

    # ---------------------------------------------------------------- hand-off
    async def _submit(self, handoffs: list[HandOff], outcome: str = "handed_off") -> None:
        """Queue hand-offs for the next flush and wait for them."""
        if not handoffs:
            return
        loop = asyncio.get_running_loop()
        pending = [_Pending(h, loop.create_future()) for h in handoffs]
        self._buffer.extend(pending)
        self._buffer_ready.set()
        for item in pending:
            try:
                done = await item.done
            except Exception as exc:
                ITEMS.labels(self.stage, "failed").inc()
                log.warning(
                    "hand-off failed; entry stays pending: %s", exc, extra={"stage": self.stage}
                )
                continue
            if done:
                ITEMS.labels(self.stage, outcome).inc()
            else:
                ITEMS.labels(self.stage, "fenced").inc()
                log.info(
                    "entry was claimed by another consumer; not handing it off again",
                    extra={"stage": self.stage, "entry": item.handoff.entry_id},
                )

    async def _flush_loop(self) -> None:
        while True:
            await self._buffer_ready.wait()
            self._buffer_ready.clear()
            # A moment's wait gathers the hand-offs of entries finishing together.
            await asyncio.sleep(0.002)
            await self._flush()

    async def _flush(self) -> None:
        while self._buffer:
            chunk, self._buffer = self._buffer[:200], self._buffer[200:]
            for attempt in range(5):
                try:
                    results = await self.group.hand_off([p.handoff for p in chunk])
                except REDIS_ERRORS as exc:
                    # Retrying is safe: a hand-off that already happened is fenced out.
                    if attempt == 4:
                        for p in chunk:
                            if not p.done.done():
                                p.done.set_exception(exc)
                        break
                    await asyncio.sleep(0.2 * 2**attempt)
                    continue
                except ResponseError as exc:
                    for p in chunk:
                        if not p.done.done():
                            p.done.set_exception(exc)
                    break
                for p, ok in zip(chunk, results, strict=True):
                    if not p.done.done():
                        p.done.set_result(ok)
                break


async def _wait_any(*events: asyncio.Event, at_most_s: float) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=at_most_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
