"""Near-duplicate groups of a batch, kept in the ledger (``results.duplicate_group``).

A succeeded item's group is the connected component of "perceptual hashes (``phash``,
from the local analyzer) at most the batch's ``max_distance`` bits apart", labelled by
the smallest item id in it: the first of the group in input order. An item without a
perceptual hash (another analyzer) is grouped with the items of the same content (the
first 64 bits of their sha256: a chance collision within a million items is about 3 in
100 million). Same content gives the same phash, so exact copies share a group either way.

Design (measured in bench/duplicates.py, against the earlier idea of hash bands looked up
in PostgreSQL under a lock inside the writer's transaction, 1.3-1.45 s per bulk of 500 at
a million stored):

* **Off the writer's path.** The writer stores results with ``duplicate_group`` NULL and
  nothing else; a grouper (``Grouper``, in the writer processes) groups what is new every
  second. The writer's only extra cost is one entry in the small partial index of
  ungrouped rows, which is also how the grouper finds them.
* **In memory.** Each batch's hashes live in a ``hashindex.Components`` (multi-index
  hashing in numpy), run in a worker thread; a bulk's cost grows with the candidates its
  lookups find, not with a copy of what is stored (bench/RESULTS.md). It is rebuilt from
  the ledger (the stored groups read by binary COPY, no search) whenever it is not known
  to be current: seconds at a million, so one process keeps the work (below).
* **One grouper per batch at a time, any process.** A grouping step is one transaction that
  locks the batch's ``duplicate_grouping`` row, reads up to ``STEP_ROWS`` ungrouped rows,
  writes their groups, the relabelled members of merged groups and the sizes in
  ``duplicate_groups``, and bumps the row's ``version``. A process whose index has another
  version (someone else grouped the batch meanwhile) rebuilds it first; a step that fails
  drops the index. So replicas, crashes and redelivery cannot leave groups inconsistent:
  a row is grouped once, by a step that saw every row grouped before it, and groups are
  connected components, which do not depend on the order rows arrive in.
* **One process does the work.** A Redis lease (``{p}:duplicates:lease``) keeps grouping
  in one writer process of the deployment, so its index stays current instead of being
  rebuilt as replicas take turns. The lease is only for efficiency: the row lock is what
  keeps groups right.
* **Finished batches are complete.** Reads of a finished batch's groups (exports, the
  duplicates endpoint) first group whatever is left (``finish``), waiting for the lock;
  a running batch shows the groups so far (rows not yet grouped have no group).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Final

import asyncpg
import numpy as np
import numpy.typing as npt
from prometheus_client import Counter, Gauge
from redis.asyncio import Redis

from .hashindex import Change, Components
from .keys import Keys
from .ledger import FINISHED_BATCH_STATES
from .runtime import Lease, supervise

log = logging.getLogger(__name__)

GROUPED = Counter(
    "imagestream_duplicates_grouped_total", "Result rows given their near-duplicate group."
)
REBUILDS = Counter(
    "imagestream_duplicates_rebuilds_total",
    "Times a batch's in-memory hash index was rebuilt from the ledger.",
)
LEADER = Gauge(
    "imagestream_duplicates_leader",
    "1 if this process groups near-duplicates now (holds the duplicates lease).",
)

#: Ungrouped rows one grouping step takes (one transaction, bounded work and memory).
STEP_ROWS: Final = 20_000
#: How often the grouper looks for new results (seconds).
INTERVAL_S: Final = 1.0
#: A batch's index not used for this long is dropped (it is rebuilt if needed again).
IDLE_S: Final = 120.0

# One row of a binary COPY of _COLUMNS (no NULLs): field count, then length + value each.
_ROW = np.dtype(
    [
        ("fields", ">i2"),
        ("len_id", ">i4"), ("item_id", ">i8"),
        ("len_group", ">i4"), ("group", ">i8"),
        ("len_near", ">i4"), ("near", "u1"),
        ("len_key", ">i4"), ("key", ">u8"),
    ]
)  # fmt: skip
_COPY_HEADER = 19  # signature, flags, extension length
_COPY_TRAILER = 2
_COLUMNS = """
    r.item_id,
    coalesce(r.duplicate_group, 0),
    coalesce((r.analysis ->> 'phash') ~ '^[0-9a-f]{16}$', false),
    CASE WHEN (r.analysis ->> 'phash') ~ '^[0-9a-f]{16}$'
         THEN ('x' || (r.analysis ->> 'phash'))::bit(64)::bigint
         ELSE ('x' || encode(substring(r.sha256 FROM 1 FOR 8), 'hex'))::bit(64)::bigint END
"""


@dataclass(slots=True)
class BatchGroups:
    """A batch's groups in memory as of ``version`` of its ``duplicate_grouping`` row."""

    max_distance: int
    version: int
    #: Items with a perceptual hash, within max_distance.
    near: Components
    #: Items without one, by content.
    same: Components = field(default_factory=lambda: Components(0))
    used_at: float = field(default_factory=time.monotonic)

    @classmethod
    def empty(cls, max_distance: int, version: int) -> BatchGroups:
        return cls(max_distance, version, Components(max_distance))

    def load(self, rows: npt.NDArray[Any]) -> None:
        for components, part in self._split(rows):
            components.load(
                part["item_id"].astype(np.int64),
                part["key"].astype(np.uint64),
                part["group"].astype(np.int64),
            )

    def add(self, rows: npt.NDArray[Any]) -> Change:
        changes = [
            components.add(part["item_id"].astype(np.int64), part["key"].astype(np.uint64))
            for components, part in self._split(rows)
        ]
        return Change(
            np.concatenate([c.item_ids for c in changes]),
            np.concatenate([c.labels for c in changes]),
            {k: v for c in changes for k, v in c.sizes.items()},
            [label for c in changes for label in c.gone],
        )

    def _split(self, rows: npt.NDArray[Any]) -> Iterable[tuple[Components, npt.NDArray[Any]]]:
        near = rows["near"].astype(bool)
        return ((self.near, rows[near]), (self.same, rows[~near]))


async def _read(conn: asyncpg.Connection, where: str, *args: Any) -> npt.NDArray[Any]:
    """Rows of ``results r`` as an array of _ROW, through a binary COPY (parsed by numpy
    in one call instead of a million asyncpg records)."""
    pieces: list[bytes] = []

    async def keep(piece: bytes) -> None:
        pieces.append(piece)

    await conn.copy_from_query(
        f"SELECT {_COLUMNS} FROM results r WHERE {where}", *args, output=keep, format="binary"
    )
    data = b"".join(pieces)
    return np.frombuffer(data[_COPY_HEADER : len(data) - _COPY_TRAILER], dtype=_ROW)


async def step(
    conn: asyncpg.Connection,
    batch_id: uuid.UUID,
    cache: MutableMapping[uuid.UUID, BatchGroups],
    max_distance: int,
    *,
    wait: bool,
) -> int | None:
    """Group up to ``STEP_ROWS`` of the batch's ungrouped rows, in one transaction.

    Returns how many were grouped, or None when another process holds the batch (only
    without ``wait``) or the batch is gone. ``max_distance`` applies to a batch grouped
    for the first time; a batch keeps the distance it was first grouped with.
    """
    loop = asyncio.get_running_loop()
    lock = "SELECT max_distance, version FROM duplicate_grouping WHERE batch_id = $1 FOR UPDATE"
    if not wait:
        lock += " SKIP LOCKED"
    try:
        async with conn.transaction():
            state = await conn.fetchrow(lock, batch_id)
            if state is None:
                await conn.execute(
                    "INSERT INTO duplicate_grouping (batch_id, max_distance)"
                    " SELECT id, $2 FROM batches WHERE id = $1 ON CONFLICT DO NOTHING",
                    batch_id,
                    max_distance,
                )
                state = await conn.fetchrow(lock, batch_id)
                if state is None:
                    return None
            groups = cache.get(batch_id)
            if groups is None or groups.version != state["version"]:
                REBUILDS.inc()
                groups = BatchGroups.empty(state["max_distance"], state["version"])
                stored = await _read(
                    conn, "r.batch_id = $1 AND r.duplicate_group IS NOT NULL", batch_id
                )
                await loop.run_in_executor(None, groups.load, stored)
            cache[batch_id] = groups
            groups.used_at = time.monotonic()
            fresh = await _read(
                conn,
                "r.batch_id = $1 AND r.duplicate_group IS NULL ORDER BY r.item_id LIMIT $2",
                batch_id,
                STEP_ROWS,
            )
            if not len(fresh):
                return 0
            change = await loop.run_in_executor(None, groups.add, fresh)
            await _write(conn, batch_id, change)
            groups.version = await conn.fetchval(
                "UPDATE duplicate_grouping SET version = version + 1, updated_at = now()"
                " WHERE batch_id = $1 RETURNING version",
                batch_id,
            )
    except BaseException:
        # The index may hold rows this transaction did not record: rebuild it next time.
        cache.pop(batch_id, None)
        raise
    GROUPED.inc(len(fresh))
    return len(fresh)


async def _write(conn: asyncpg.Connection, batch_id: uuid.UUID, change: Change) -> None:
    await conn.execute(
        """
        UPDATE results r SET duplicate_group = v.label
        FROM unnest($2::bigint[], $3::bigint[]) AS v(item_id, label)
        WHERE r.item_id = v.item_id AND r.batch_id = $1
        """,
        batch_id,
        change.item_ids.tolist(),
        change.labels.tolist(),
    )
    if change.gone:
        await conn.execute(
            "DELETE FROM duplicate_groups WHERE batch_id = $1 AND group_id = ANY($2::bigint[])",
            batch_id,
            change.gone,
        )
    if change.sizes:
        await conn.execute(
            """
            INSERT INTO duplicate_groups (batch_id, group_id, size)
            SELECT $1, * FROM unnest($2::bigint[], $3::int[])
            ON CONFLICT (batch_id, group_id) DO UPDATE SET size = EXCLUDED.size
            """,
            batch_id,
            list(change.sizes),
            list(change.sizes.values()),
        )


async def finish(pool: asyncpg.Pool, batch_id: uuid.UUID, max_distance: int) -> None:
    """Group what is left of a finished batch (a no-op for a running one, or when nothing
    is left): its exports and listings then show complete groups."""
    async with pool.acquire() as conn:
        pending = await conn.fetchval(
            """
            SELECT b.state = ANY($2::text[]) AND EXISTS (
                SELECT 1 FROM results r WHERE r.batch_id = b.id AND r.duplicate_group IS NULL)
            FROM batches b WHERE b.id = $1
            """,
            batch_id,
            list(FINISHED_BATCH_STATES),
        )
        if not pending:
            return
        cache: dict[uuid.UUID, BatchGroups] = {}
        while await step(conn, batch_id, cache, max_distance, wait=True) == STEP_ROWS:
            pass


class Grouper:
    """The background chore of the writer processes: while this process holds the lease,
    group the new results of the pipeline's batches every ``INTERVAL_S``."""

    def __init__(
        self, pool: asyncpg.Pool, redis: Redis, keys: Keys, pipeline: str, max_distance: int
    ) -> None:
        self.pool = pool
        self.pipeline = pipeline
        self.max_distance = max_distance
        self.cache: dict[uuid.UUID, BatchGroups] = {}
        # The lease outlives several slow steps (a rebuild at a million rows takes seconds).
        self._lease = Lease(redis, keys.duplicates_lease, 30.0, LEADER)

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await supervise("duplicates", self.tick, stop, INTERVAL_S)
        finally:
            await self._resign()

    async def tick(self) -> None:
        if not await self._lease.hold():
            self.cache.clear()
            return
        async with self.pool.acquire() as conn:
            batch_ids = await conn.fetch(
                """
                SELECT DISTINCT r.batch_id FROM results r JOIN batches b ON b.id = r.batch_id
                WHERE r.duplicate_group IS NULL AND b.pipeline = $1
                """,
                self.pipeline,
            )
            for row in batch_ids:
                batch_id = row["batch_id"]
                while await step(conn, batch_id, self.cache, self.max_distance, wait=False) == (
                    STEP_ROWS
                ):
                    pass
        idle = time.monotonic() - IDLE_S
        for batch_id in [b for b, groups in self.cache.items() if groups.used_at < idle]:
            del self.cache[batch_id]

    async def _resign(self) -> None:
        self.cache.clear()
        await self._lease.release()


# ---------------------------------------------------------------- reading (api)
@dataclass(frozen=True, slots=True)
class Summary:
    max_distance: int | None
    groups: int
    items: int
    #: Succeeded items not grouped yet (a running batch's newest results).
    pending: int


async def summary(conn: asyncpg.Connection | asyncpg.Pool, batch_id: uuid.UUID) -> Summary:
    row = await conn.fetchrow(
        """
        SELECT (SELECT max_distance FROM duplicate_grouping WHERE batch_id = $1) AS max_distance,
               (SELECT count(*) FROM duplicate_groups WHERE batch_id = $1) AS groups,
               (SELECT coalesce(sum(size), 0) FROM duplicate_groups WHERE batch_id = $1) AS items,
               (SELECT count(*) FROM results
                WHERE batch_id = $1 AND duplicate_group IS NULL) AS pending
        """,
        batch_id,
    )
    return Summary(row["max_distance"], row["groups"], int(row["items"]), row["pending"])


async def groups_page(
    conn: asyncpg.Connection | asyncpg.Pool,
    batch_id: uuid.UUID,
    *,
    after: int = 0,
    limit: int = 50,
    members: int = 10,
) -> list[dict[str, Any]]:
    """Groups of two or more items in order of their first item, after group ``after``,
    each with its first ``members`` members (item id, url, size and format)."""
    groups = await conn.fetch(
        "SELECT group_id, size FROM duplicate_groups WHERE batch_id = $1 AND group_id > $2"
        " ORDER BY group_id LIMIT $3",
        batch_id,
        after,
        limit,
    )
    if not groups:
        return []
    rows = await conn.fetch(
        """
        SELECT g.group_id, m.item_id, m.url, m.width, m.height, m.format
        FROM unnest($2::bigint[]) AS g(group_id)
        CROSS JOIN LATERAL (
            SELECT r.item_id, i.url, r.width, r.height, r.format
            FROM results r JOIN items i ON i.id = r.item_id
            WHERE r.batch_id = $1 AND r.duplicate_group = g.group_id
            ORDER BY r.item_id LIMIT $3) m
        ORDER BY g.group_id, m.item_id
        """,
        batch_id,
        [g["group_id"] for g in groups],
        members,
    )
    listed: dict[int, list[dict[str, Any]]] = {g["group_id"]: [] for g in groups}
    for r in rows:
        listed[r["group_id"]].append(
            {
                "item_id": r["item_id"],
                "url": r["url"],
                "width": r["width"],
                "height": r["height"],
                "format": r["format"],
            }
        )
    return [
        {"group": g["group_id"], "size": g["size"], "members": listed[g["group_id"]]}
        for g in groups
    ]
