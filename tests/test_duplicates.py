"""Near-duplicate groups: the in-memory index against brute force, and grouping in the
ledger (replicas, stale indexes, redelivery, merges, content-only grouping) on the real
PostgreSQL, with results written through the writer's own ledger path."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg
import numpy as np
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from imagestream.common import duplicates, hashindex, ledger, messages
from imagestream.common.inputs import Row


# ---------------------------------------------------------------- the index, in memory
def near_copies(rng: np.random.Generator, count: int, clusters: int, max_flips: int) -> np.ndarray:
    """``count`` hashes: ``clusters`` random ones and copies of them with up to
    ``max_flips`` bits flipped, shuffled."""
    originals = rng.integers(0, 2**64, size=clusters, dtype=np.uint64)
    picked = originals[rng.integers(0, clusters, size=count - clusters)]
    flips = np.zeros(len(picked), dtype=np.uint64)
    for row, n in enumerate(rng.integers(0, max_flips + 1, size=len(picked))):
        for bit in rng.choice(64, size=n, replace=False):
            flips[row] |= np.uint64(1) << np.uint64(bit)
    hashes = np.concatenate([originals, picked ^ flips])
    rng.shuffle(hashes)
    return hashes


def brute_force_labels(ids: np.ndarray, hashes: np.ndarray, distance: int) -> dict[int, int]:
    near = np.bitwise_count(hashes[:, None] ^ hashes[None, :]) <= distance
    _, component = connected_components(coo_matrix(near), directed=False)
    first = {c: int(ids[component == c].min()) for c in np.unique(component)}
    return {int(i): first[c] for i, c in zip(ids, component, strict=True)}


@pytest.mark.parametrize("distance", [0, 3, 8, 10])
@pytest.mark.parametrize(("step", "tables_from"), [(1, 50), (97, 300), (3000, 10**6)])
def test_components_equal_brute_force(
    distance: int, step: int, tables_from: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # tables_from moves the switch from brute force to the band tables, so both searches
    # (and the switch in the middle of a run) are compared with all pairs.
    monkeypatch.setattr(hashindex, "BRUTE_FORCE_LIMIT", tables_from)
    rng = np.random.default_rng(distance * 1000 + step)
    hashes = near_copies(rng, 2000, 400, distance + 3)
    ids = (rng.permutation(2000) + 1).astype(np.int64) * 7  # arrival out of id order
    components = hashindex.Components(distance)
    labels: dict[int, int] = {}
    sizes: dict[int, int] = {}
    for begin in range(0, len(ids), step):
        change = components.add(ids[begin : begin + step], hashes[begin : begin + step])
        labels.update(zip(change.item_ids.tolist(), change.labels.tolist(), strict=True))
        for label in change.gone:
            sizes.pop(label)
        sizes.update(change.sizes)
    expected = brute_force_labels(ids, hashes, distance)
    assert labels == expected
    counts: dict[int, int] = {}
    for label in expected.values():
        counts[label] = counts.get(label, 0) + 1
    assert sizes == {label: n for label, n in counts.items() if n > 1} == components.sizes
    assert len(set(expected.values())) < len(ids)  # there were groups to find


def test_load_then_add_equals_adding_everything() -> None:
    rng = np.random.default_rng(5)
    hashes = near_copies(rng, 3000, 700, 10)
    ids = np.arange(1, 3001, dtype=np.int64)
    whole = hashindex.Components(8)
    whole.add(ids[:2000], hashes[:2000])
    reloaded = hashindex.Components(8)
    reloaded.load(ids[:2000], hashes[:2000], whole.labels.copy())
    assert reloaded.sizes == whole.sizes
    a = whole.add(ids[2000:], hashes[2000:])
    b = reloaded.add(ids[2000:], hashes[2000:])
    assert dict(zip(a.item_ids.tolist(), a.labels.tolist(), strict=True)) == dict(
        zip(b.item_ids.tolist(), b.labels.tolist(), strict=True)
    )
    assert np.array_equal(whole.labels, reloaded.labels)


def test_distance_is_checked() -> None:
    with pytest.raises(ValueError, match="between 0 and"):
        hashindex.HashIndex(hashindex.MAX_DISTANCE + 1)


# ---------------------------------------------------------------- in the ledger
def phash(value: int) -> str:
    return f"{value:016x}"


async def new_batch(pool: asyncpg.Pool, pipeline: str, count: int) -> tuple[uuid.UUID, list[int]]:
    batch_id = await ledger.create_batch(pool, ledger.NewBatch(name="dups", pipeline=pipeline))
    async with pool.acquire() as conn:
        await ledger.insert_items(
            conn, batch_id, [Row(n, f"http://127.0.0.1/{n}.jpg", None) for n in range(count)]
        )
        await ledger.finish_ingest(conn, batch_id, "txt", [])
        ids = [
            r["id"]
            for r in await conn.fetch(
                "SELECT id FROM items WHERE batch_id = $1 ORDER BY line", batch_id
            )
        ]
    return batch_id, ids


async def write(
    pool: asyncpg.Pool,
    batch_id: uuid.UUID,
    outcomes: Sequence[tuple[int, str | None, str]],
) -> None:
    """Succeeded results (item id, phash or None, sha256 hex) through the writer's path."""
    results = [
        messages.ItemResult(
            batch_id=str(batch_id),
            item_id=item_id,
            status="succeeded",
            stage="analyzer",
            facts=messages.ImageFacts(
                width=64, height=64, format="JPEG", mode="RGB", bytes=100, sha256=sha
            ),
            analyzer="local" if hash_hex else "gemini",
            analysis={"phash": hash_hex} if hash_hex else {"caption": "a photo"},
        )
        for item_id, hash_hex, sha in outcomes
    ]
    async with pool.acquire() as conn:
        await ledger.apply_results(conn, results)


async def stored_groups(pool: asyncpg.Pool, batch_id: uuid.UUID) -> dict[int, int | None]:
    rows = await pool.fetch(
        "SELECT item_id, duplicate_group FROM results WHERE batch_id = $1", batch_id
    )
    return {r["item_id"]: r["duplicate_group"] for r in rows}


async def stored_sizes(pool: asyncpg.Pool, batch_id: uuid.UUID) -> dict[int, int]:
    rows = await pool.fetch(
        "SELECT group_id, size FROM duplicate_groups WHERE batch_id = $1", batch_id
    )
    return {r["group_id"]: r["size"] for r in rows}


async def group_all(
    pool: asyncpg.Pool, batch_id: uuid.UUID, cache: dict[uuid.UUID, Any] | None = None
) -> None:
    async with pool.acquire() as conn:
        while await duplicates.step(conn, batch_id, {} if cache is None else cache, 8, wait=True):
            pass


def sha(n: int) -> str:
    return f"{n:064x}"


async def test_groups_merge_and_take_the_first_item_whatever_the_arrival_order(
    pool: asyncpg.Pool, prefix: str
) -> None:
    batch_id, ids = await new_batch(pool, prefix, 6)
    a, b, c, d, e, f = ids
    base = 0x0F0F_0F0F_0F0F_0F0F
    cache: dict[uuid.UUID, Any] = {}
    # Later items first: d and e are 10 bits apart (two groups), f is unrelated.
    await write(pool, batch_id, [(d, phash(base), sha(1)), (e, phash(base ^ 0x3FF), sha(2))])
    await write(pool, batch_id, [(f, phash(~base & (2**64 - 1)), sha(3))])
    await group_all(pool, batch_id, cache)
    assert await stored_groups(pool, batch_id) == {d: d, e: e, f: f}
    assert await stored_sizes(pool, batch_id) == {}
    # b is 5 bits from d and 5 from e: one group, whose first item is now b.
    await write(pool, batch_id, [(b, phash(base ^ 0x1F), sha(4))])
    await group_all(pool, batch_id, cache)
    assert await stored_groups(pool, batch_id) == {b: b, d: b, e: b, f: f}
    assert await stored_sizes(pool, batch_id) == {b: 3}
    # a joins it (an exact copy of d's content and hash), c stays alone.
    await write(pool, batch_id, [(a, phash(base), sha(1)), (c, phash(0x1234), sha(5))])
    await group_all(pool, batch_id, cache)
    assert await stored_groups(pool, batch_id) == {a: a, b: a, c: c, d: a, e: a, f: f}
    assert await stored_sizes(pool, batch_id) == {a: 4}
    summary = await duplicates.summary(pool, batch_id)
    assert (summary.groups, summary.items, summary.pending, summary.max_distance) == (1, 4, 0, 8)


async def test_another_process_grouping_in_between_makes_the_index_rebuild(
    pool: asyncpg.Pool, prefix: str
) -> None:
    batch_id, ids = await new_batch(pool, prefix, 3)
    mine: dict[uuid.UUID, Any] = {}
    await write(pool, batch_id, [(ids[2], phash(0xFF), sha(1))])
    await group_all(pool, batch_id, mine)
    # Another process (its own, empty cache) groups the next result...
    await write(pool, batch_id, [(ids[1], phash(0xFE), sha(2))])
    await group_all(pool, batch_id)
    # ...so this one's index is behind: it must see ids[1] and ids[2] as one group.
    await write(pool, batch_id, [(ids[0], phash(0xFC), sha(3))])
    await group_all(pool, batch_id, mine)
    assert await stored_groups(pool, batch_id) == dict.fromkeys(ids, ids[0])


async def test_concurrent_groupers_agree_with_one(pool: asyncpg.Pool, prefix: str) -> None:
    rng = np.random.default_rng(11)
    hashes = near_copies(rng, 600, 150, 8)
    batch_id, ids = await new_batch(pool, prefix, 600)
    order = rng.permutation(600)

    async def writer() -> None:
        for begin in range(0, 600, 50):
            chosen = order[begin : begin + 50]
            await write(
                pool, batch_id, [(ids[i], phash(int(hashes[i])), sha(i + 1)) for i in chosen]
            )
            await asyncio.sleep(0)

    async def grouper(cache: dict[uuid.UUID, Any], wait: bool) -> None:
        async with pool.acquire() as conn:
            for _ in range(40):
                await duplicates.step(conn, batch_id, cache, 8, wait=wait)
                await asyncio.sleep(0.005)

    await asyncio.gather(writer(), grouper({}, True), grouper({}, False), grouper({}, True))
    await group_all(pool, batch_id)
    expected = brute_force_labels(np.array(ids, dtype=np.int64), hashes, 8)
    assert await stored_groups(pool, batch_id) == expected
    counts: dict[int, int] = {}
    for label in expected.values():
        counts[label] = counts.get(label, 0) + 1
    assert await stored_sizes(pool, batch_id) == {k: n for k, n in counts.items() if n > 1}


async def test_redelivered_results_and_a_failed_step_change_nothing(
    pool: asyncpg.Pool, prefix: str, database_url: str
) -> None:
    batch_id, ids = await new_batch(pool, prefix, 4)
    outcomes = [(ids[i], phash(0xABCD_0000 + i), sha(i)) for i in range(4)]
    await write(pool, batch_id, outcomes[:3])
    cache: dict[uuid.UUID, Any] = {}
    await group_all(pool, batch_id, cache)
    before = await stored_groups(pool, batch_id)
    version = await pool.fetchval(
        "SELECT version FROM duplicate_grouping WHERE batch_id = $1", batch_id
    )
    await write(pool, batch_id, outcomes[:3])  # the writer gets them again
    await group_all(pool, batch_id, cache)
    assert await stored_groups(pool, batch_id) == before
    assert (
        await pool.fetchval("SELECT version FROM duplicate_grouping WHERE batch_id = $1", batch_id)
        == version
    )
    # A step that dies in the middle (here: its connection is closed) leaves no trace,
    # and its process's index is not trusted afterwards.
    await write(pool, batch_id, outcomes[3:])
    conn = await asyncpg.connect(database_url)
    try:
        task = asyncio.ensure_future(duplicates.step(conn, batch_id, cache, 8, wait=True))
        await asyncio.sleep(0)
        conn.terminate()
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
            await task
    finally:
        conn.terminate()
    assert batch_id not in cache
    await group_all(pool, batch_id, cache)
    assert await stored_groups(pool, batch_id) == dict.fromkeys(ids, ids[0])


async def test_results_without_a_perceptual_hash_group_by_content(
    pool: asyncpg.Pool, prefix: str
) -> None:
    batch_id, ids = await new_batch(pool, prefix, 4)
    await write(
        pool,
        batch_id,
        [(ids[0], None, sha(7 << 200)), (ids[1], None, sha(8 << 200)),
         (ids[2], None, sha(7 << 200)), (ids[3], None, sha(9 << 200))],
    )  # fmt: skip
    await group_all(pool, batch_id)
    groups = await stored_groups(pool, batch_id)
    assert groups[ids[0]] == groups[ids[2]] == ids[0]
    assert groups[ids[1]] == ids[1] and groups[ids[3]] == ids[3]


async def test_finish_groups_a_finished_batch_and_leaves_a_running_one(
    pool: asyncpg.Pool, prefix: str
) -> None:
    batch_id, ids = await new_batch(pool, prefix, 2)
    await write(pool, batch_id, [(ids[0], phash(1), sha(1))])
    await duplicates.finish(pool, batch_id, 8)  # still running: one item is not done
    assert await stored_groups(pool, batch_id) == {ids[0]: None}
    await write(pool, batch_id, [(ids[1], phash(3), sha(2))])
    assert (await ledger.batch(pool, batch_id))["state"] == "completed"
    await duplicates.finish(pool, batch_id, 8)
    assert await stored_groups(pool, batch_id) == dict.fromkeys(ids, ids[0])
