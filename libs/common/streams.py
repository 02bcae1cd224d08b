"""The only module that issues Redis Streams (X*) commands.

A ``StreamGroup`` is one consumer's view of one stream's consumer group: it reads its own
pending entries first, then new ones; claims entries left idle by a consumer that died
(XAUTOCLAIM, following the cursor; Redis 6.2 replies with two elements and 7.x with
three); and hands an entry off to the next stage with a fenced script (below) that adds
the next messages and acknowledges the current entry in one atomic step, only if the entry
is still pending for this consumer. A consumer whose entry was claimed by another while
it worked therefore cannot hand it off a second time.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from . import messages
from .keys import FIELD

log = logging.getLogger(__name__)

# Hand-off, fenced. Keys and arguments:
#   KEYS[1]            the stream the entries were read from
#   KEYS[2..]          the streams the entries hand off to (referenced by index below)
#   ARGV[1], ARGV[2]   group, consumer
#   ARGV[3]            number of entries, then per entry:
#                        entry id, number of outputs n, then n pairs (key index, payload)
# Per entry: if the entry is still pending for this consumer, XADD each output to its
# stream, then XACK and XDEL the entry (acknowledged entries are deleted so that a
# stream's length is the work waiting in it). Returns 1 per entry handed off, 0 per entry
# fenced out (claimed by another consumer, or already acknowledged).
HAND_OFF_LUA = """
local group, consumer = ARGV[1], ARGV[2]
local results = {}
local i = 4
for e = 1, tonumber(ARGV[3]) do
  local id = ARGV[i]
  local nout = tonumber(ARGV[i + 1])
  i = i + 2
  local owned = redis.call('XPENDING', KEYS[1], group, id, id, 1, consumer)
  if #owned == 1 then
    for _ = 1, nout do
      redis.call('XADD', KEYS[tonumber(ARGV[i])], '*', 'm', ARGV[i + 1])
      i = i + 2
    end
    redis.call('XACK', KEYS[1], group, id)
    redis.call('XDEL', KEYS[1], id)
    results[e] = 1
  else
    i = i + 2 * nout
    results[e] = 0
  end
end
return results
"""


# Touch, fenced: reset the idle time of entries this consumer still holds and is still
# working on (a long ingest, a call waiting for quota), so they are not claimed from a
# live consumer. XCLAIM with JUSTID does not count as a delivery.
#   KEYS[1] the stream; ARGV[1], ARGV[2] group, consumer; ARGV[3..] entry ids
TOUCH_LUA = """
local touched = 0
for i = 3, #ARGV do
  local owned = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if #owned == 1 then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    touched = touched + 1
  end
end
return touched
"""


@dataclass(frozen=True, slots=True)
class Entry:
    """One delivered stream entry; ``payload`` is None if the entry was deleted meanwhile."""

    id: str
    payload: bytes | None
    deliveries: int


@dataclass(frozen=True, slots=True)
class HandOff:
    """Acknowledge ``entry_id`` and add ``outputs`` (stream key, payload) atomically."""

    entry_id: str
    outputs: Sequence[tuple[str, bytes]] = ()


def _id(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _parse_entries(raw: Any, deliveries: int) -> list[Entry]:
    return [
        Entry(_id(eid), fields.get(FIELD) if fields else None, deliveries) for eid, fields in raw
    ]


class StreamGroup:
    def __init__(self, redis: Redis, stream: str, group: str, consumer: str) -> None:
        self.redis = redis
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self._hand_off = redis.register_script(HAND_OFF_LUA)
        self._touch = redis.register_script(TOUCH_LUA)

    async def ensure(self) -> None:
        """Create the stream and group if missing (idempotent)."""
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read_own_pending(self, count: int) -> list[Entry]:
        """Entries already delivered to this consumer name and not acknowledged."""
        reply: Any = await self.redis.xreadgroup(
            self.group, self.consumer, {self.stream: "0"}, count=count
        )
        entries = _parse_entries(reply[0][1], 0) if reply else []
        return await self._with_deliveries(entries)

    async def read_new(self, count: int, block_ms: int) -> list[Entry]:
        reply: Any = await self.redis.xreadgroup(
            self.group, self.consumer, {self.stream: ">"}, count=count, block=block_ms
        )
        return _parse_entries(reply[0][1], 1) if reply else []

    async def claim_idle(self, min_idle_ms: int, count: int) -> list[Entry]:
        """Take over up to ``count`` entries idle for ``min_idle_ms`` (from dead consumers)."""
        claimed: list[Entry] = []
        cursor = "0-0"
        while len(claimed) < count:
            reply: Any = await self.redis.xautoclaim(
                self.stream,
                self.group,
                self.consumer,
                min_idle_time=min_idle_ms,
                start_id=cursor,
                count=count - len(claimed),
            )
            # Redis 6.2: [cursor, entries]; 7.x: [cursor, entries, deleted ids].
            cursor = _id(reply[0])
            claimed.extend(_parse_entries(reply[1], 0))
            if cursor == "0-0":
                break
        return await self._with_deliveries(claimed)

    async def _with_deliveries(self, entries: list[Entry]) -> list[Entry]:
        """Fill in delivery counts from the pending list (XAUTOCLAIM does not return them)."""
        if not entries:
            return entries
        pending: Any = await self.redis.xpending_range(
            self.stream,
            self.group,
            min=entries[0].id,
            max=entries[-1].id,
            count=len(entries) * 2 + 10,
            consumername=self.consumer,
        )
        counts = {_id(p["message_id"]): int(p["times_delivered"]) for p in pending}
        return [Entry(e.id, e.payload, counts.get(e.id, 1)) for e in entries]

    async def hand_off(self, handoffs: Sequence[HandOff]) -> list[bool]:
        """Fenced XADD-next + XACK-current for many entries in one round trip.

        Returns, per hand-off, whether it happened (False: the entry was no longer ours).
        """
        if not handoffs:
            return []
        keys: list[str] = [self.stream]
        index: dict[str, int] = {}
        args: list[Any] = [self.group, self.consumer, len(handoffs)]
        for handoff in handoffs:
            args += [handoff.entry_id, len(handoff.outputs)]
            for stream, payload in handoff.outputs:
                if stream not in index:
                    keys.append(stream)
                    index[stream] = len(keys)
                args += [index[stream], payload]
        result = await self._hand_off(keys=keys, args=args)
        return [bool(r) for r in result]

    async def touch(self, entry_ids: Sequence[str]) -> int:
        """Keep entries this consumer still works on from being claimed as idle."""
        if not entry_ids:
            return 0
        return int(
            await self._touch(keys=[self.stream], args=[self.group, self.consumer, *entry_ids])
        )

    async def drop(self, entry_ids: Sequence[str]) -> None:
        """Acknowledge entries whose content is gone (deleted while pending)."""
        if entry_ids:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xack(self.stream, self.group, *entry_ids)
                pipe.xdel(self.stream, *entry_ids)
                await pipe.execute()

    async def consumers(self) -> list[dict[str, Any]]:
        return list(await self.redis.xinfo_consumers(self.stream, self.group))

    async def remove_consumer(self, name: str) -> int:
        return int(await self.redis.xgroup_delconsumer(self.stream, self.group, name))


async def append(redis: Redis, stream: str, payloads: Sequence[bytes]) -> list[str]:
    """Add entries to a stream (one round trip). Used to feed the first stage."""
    if not payloads:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for payload in payloads:
            pipe.xadd(stream, {FIELD: payload})
        ids = await pipe.execute()
    return [_id(i) for i in ids]


async def lengths(redis: Redis, streams: Sequence[str]) -> list[int]:
    async with redis.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xlen(stream)
        return [int(n) for n in await pipe.execute()]


async def read_range(redis: Redis, stream: str, start: str, count: int) -> list[Entry]:
    """Entries of a stream without a group (the dead stream's browser and replay)."""
    return _parse_entries(await redis.xrange(stream, min=start, count=count), 0)


async def delete(redis: Redis, stream: str, entry_ids: Sequence[str]) -> int:
    return int(await redis.xdel(stream, *entry_ids)) if entry_ids else 0


async def count_by_batch(redis: Redis, stream: str, page: int = 1000) -> Counter[str]:
    """How many entries of each batch a work stream holds (waiting or being worked on:
    acknowledged entries are deleted). Reads the whole stream, which the dispatch window
    bounds (DISPATCH_WINDOW entries across the work streams)."""
    counts: Counter[str] = Counter()
    start = "-"
    while True:
        raw: Any = await redis.xrange(stream, min=start, count=page)
        for _, fields in raw:
            try:
                counts[messages.batch_ref_decoder.decode(fields[FIELD]).batch_id] += 1
            except (KeyError, msgspec.DecodeError, msgspec.ValidationError):
                continue  # a foreign entry: the worker dead-letters it
        if len(raw) < page:
            return counts
        start = "(" + _id(raw[-1][0])


def is_missing_group(exc: ResponseError) -> bool:
    """The stream or group vanished (Redis restarted empty or was flushed, or the stream was
    deleted while a read blocked on it)."""
    text = str(exc)
    return "NOGROUP" in text or "UNBLOCKED" in text
