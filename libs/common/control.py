"""Per-batch controls the stages consult on every item: halted batches and batch settings.

Pause and cancel are written to the ledger and mirrored into the Redis hash ``halted``
(batch id -> "paused" | "cancelled"); the reconciler rewrites that hash from the ledger,
so it survives Redis losing its data. Stages read it through a cache refreshed at most
every ``ttl_s`` (0.5 s), which bounds how long a pause takes to reach every replica.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from redis.asyncio import Redis

from . import ledger
from .keys import Keys


async def set_halted(redis: Redis, keys: Keys, batch_id: str, state: str | None) -> None:
    if state is None:
        await redis.hdel(keys.halted, batch_id)
    else:
        await redis.hset(keys.halted, batch_id, state)


async def sync_halted(redis: Redis, keys: Keys, pool: asyncpg.Pool) -> None:
    """Rewrite the halted hash from the ledger (the truth)."""
    rows = await pool.fetch(
        "SELECT id, state FROM batches WHERE pipeline = $1 AND state IN ('paused', 'cancelling')",
        keys.prefix,
    )
    wanted = {str(r["id"]): ("paused" if r["state"] == "paused" else "cancelled") for r in rows}
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(keys.halted)
        if wanted:
            pipe.hset(keys.halted, mapping=wanted)  # type: ignore[arg-type]
        await pipe.execute()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass
class HaltedBatches:
    redis: Redis
    keys: Keys
    ttl_s: float = 0.5
    _states: dict[str, str] = field(default_factory=dict)
    _fetched_at: float = 0.0
    _refresh: asyncio.Task[None] | None = None

    async def state(self, batch_id: str) -> str | None:
        if time.monotonic() - self._fetched_at > self.ttl_s:
            # One read for all the handlers that find the copy stale at the same moment
            # (a fetcher holds hundreds), not one HGETALL each.
            if self._refresh is None or self._refresh.done():
                self._refresh = asyncio.ensure_future(self._read())
            await asyncio.shield(self._refresh)
        return self._states.get(batch_id)

    async def _read(self) -> None:
        raw = await self.redis.hgetall(self.keys.halted)
        self._states = {_text(k): _text(v) for k, v in raw.items()}
        self._fetched_at = time.monotonic()


@dataclass(frozen=True, slots=True)
class BatchConfig:
    """What a stage needs to know about an item's batch."""

    id: str
    analyzer: str
    profile: str | None
    model: str | None
    options: dict[str, Any]


@dataclass
class BatchConfigs:
    """Batch settings by id, cached (they do not change while a batch runs)."""

    pool: asyncpg.Pool
    capacity: int = 1024
    _cache: OrderedDict[str, BatchConfig] = field(default_factory=OrderedDict)

    async def get(self, batch_id: str) -> BatchConfig | None:
        config = self._cache.get(batch_id)
        if config is not None:
            self._cache.move_to_end(batch_id)
            return config
        row = await self.pool.fetchrow(
            "SELECT id, analyzer, profile, model, options FROM batches WHERE id = $1",
            uuid.UUID(batch_id),
        )
        if row is None:
            return None
        config = BatchConfig(
            id=batch_id,
            analyzer=row["analyzer"],
            profile=row["profile"],
            model=row["model"],
            options=dict(row["options"] or {}),
        )
        self._cache[batch_id] = config
        if len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return config


# ------------------------------------------------------------------ batch controls
# Each changes the ledger (the truth) first, then mirrors the halt into Redis so stages see
# it within HaltedBatches.ttl_s; the reconciler repairs the mirror if this process dies
# in between.
async def pause(
    redis: Redis, keys: Keys, pool: asyncpg.Pool, batch_id: uuid.UUID, reason: str
) -> str:
    state = await ledger.pause_batch(pool, batch_id, reason)
    await set_halted(redis, keys, str(batch_id), "paused")
    return state


async def resume(redis: Redis, keys: Keys, pool: asyncpg.Pool, batch_id: uuid.UUID) -> str:
    state = await ledger.resume_batch(pool, batch_id)
    await set_halted(redis, keys, str(batch_id), None)
    return state


async def cancel(redis: Redis, keys: Keys, pool: asyncpg.Pool, batch_id: uuid.UUID) -> str:
    async with pool.acquire() as conn:
        state = await ledger.cancel_batch(conn, batch_id)
    await set_halted(redis, keys, str(batch_id), "cancelled" if state == "cancelling" else None)
    return state


async def replay(
    pool: asyncpg.Pool,
    batch_id: uuid.UUID,
    *,
    error_classes: list[str] | None = None,
    stages: list[str] | None = None,
    item_ids: list[int] | None = None,
) -> int:
    """Failed items back to pending; the dispatcher sends them through again."""
    async with pool.acquire() as conn:
        return await ledger.replay_batch(
            conn,
            batch_id,
            error_classes=error_classes or (),
            stages=stages or (),
            item_ids=item_ids or (),
        )
