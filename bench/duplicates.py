"""Near-duplicate grouping: the threshold on real photographs, grouping a million hashes,
the cost of a grouping step at a million stored, and the pipeline's throughput with the
grouper running beside the writer or not.

    uv run python bench/duplicates.py [--hashes 1000000] [--images 3000] [--runs 3]

1. **Corpus**: scikit-image's photographs and their copies (resized, recompressed,
   converted, cropped) through the fetcher's ``prepare`` and the local analyzer, as in a
   batch: the Hamming distance of each copy's pHash from the original's, and the closest
   two different photographs. This is where ``DUPLICATE_MAX_DISTANCE``'s default comes from.
2. **A million hashes in memory** (seeded): 100,000 originals with 4 copies each (0-8 bits
   flipped) and 500,000 unrelated random hashes, shuffled, grouped in steps of 20,000 (the
   grouper's step): seconds, peak memory (tracemalloc: numpy's arrays) and the groups
   found; then the time to add one writer bulk (500 new hashes) at 0 to 1M stored.
3. **In PostgreSQL at a million stored**: those million rows already grouped in a scratch
   database; the first grouping step of a process (it reads the index back from the
   ledger), then steps of 500 new results; and the writer's own bulk of 500 results with
   and without the partial index of ungrouped rows (its only extra cost), alternated.
4. **Pipeline**: ``--images`` tiny JPEGs through ingest, fetcher, analyzer (local) and
   writer in this process (as ``imagestream analyze`` runs them), with the grouper running
   or switched off (after one warm-up run; alternated, medians); and how long after the
   batch completes its last groups are written.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import resource
import statistics
import sys
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skdata

sys.path.insert(0, str(Path(__file__).parent))
from _common import REDIS_URL, corpus_dir, machine, median, scratch_database, serve_directory, table

from imagestream.analyzer.providers.local.facts import analyze
from imagestream.cli import pipeline
from imagestream.common import db, duplicates, hashindex, ledger, messages
from imagestream.common.connections import Resources, redis_client
from imagestream.common.keys import Keys
from imagestream.devtools import corpus
from imagestream.devtools.processes import service_env
from imagestream.fetcher.image import prepare
from imagestream.ingest.service import ingest_list

PHOTOS = (
    "astronaut", "camera", "chelsea", "coffee", "rocket", "coins", "hubble_deep_field",
    "immunohistochemistry", "moon", "page", "retina", "text", "cell", "clock",
)  # fmt: skip
DISTANCE = 8
BULK = 500


# ---------------------------------------------------------------- 1. corpus
def _encoded(img: Image.Image, fmt: str = "JPEG", **options: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def _phash(data: bytes) -> int:
    prepared = prepare(data)
    return int(analyze(prepared.data, prepared.facts)["phash"], 16)


def _copies(img: Image.Image) -> dict[str, bytes]:
    w, h = img.size
    dx, dy = w * 2 // 100, h * 2 // 100
    ex, ey = w // 100, h // 100
    return {
        "resized 50 %": _encoded(img.resize((w // 2, h // 2), Image.Resampling.LANCZOS)),
        "resized 25 %": _encoded(img.resize((w // 4, h // 4), Image.Resampling.LANCZOS)),
        "upscaled 150 %": _encoded(img.resize((w * 3 // 2, h * 3 // 2))),
        "JPEG quality 30": _encoded(img, quality=30),
        "JPEG quality 10": _encoded(img, quality=10),
        "PNG": _encoded(img, "PNG"),
        "WebP quality 70": _encoded(img, "WEBP", quality=70),
        "GIF (256 colours)": _encoded(img.convert("P"), "GIF"),
        "cropped 1 % every side": _encoded(img.crop((ex, ey, w - ex, h - ey))),
        "cropped 2 % left and top": _encoded(img.crop((dx, dy, w, h))),
        "cropped 2 % right": _encoded(img.crop((0, 0, w - dx, h))),
        "cropped 2 % every side": _encoded(img.crop((dx, dy, w - dx, h - dy))),
    }


def corpus_distances() -> str:
    originals: dict[str, int] = {}
    distances: dict[str, list[tuple[int, str]]] = {}
    for name in PHOTOS:
        img = Image.fromarray(getattr(skdata, name)()).convert("RGB")
        originals[name] = _phash(_encoded(img, quality=95))
        for kind, data in _copies(img).items():
            bits = (_phash(data) ^ originals[name]).bit_count()
            distances.setdefault(kind, []).append((bits, name))
    rows: list[list[object]] = [
        [
            kind,
            min(found)[0],
            statistics.median(b for b, _ in found),
            f"{max(found)[0]} ({max(found)[1]})",
        ]
        for kind, found in distances.items()
    ]
    closest = min(
        ((originals[a] ^ originals[b]).bit_count(), a, b)
        for a, b in itertools.combinations(originals, 2)
    )
    rows.append(
        ["different photographs (closest pair)", closest[0], "", f"{closest[1]} / {closest[2]}"]
    )
    return table(["copy of each of the photographs", "min bits", "median", "max (photo)"], rows)


# ---------------------------------------------------------------- 2. in memory
def synthetic(count: int, seed: int = 2026) -> np.ndarray:
    """Clusters of near-copies (a fifth of the count's originals, 4 copies each, 0-8 bits
    flipped) and unrelated random hashes for the other half, shuffled."""
    rng = np.random.default_rng(seed)
    clusters = count // 10
    originals = rng.integers(0, 2**64, size=clusters, dtype=np.uint64)
    copies = np.repeat(originals, 4)
    flips = np.zeros(len(copies), dtype=np.uint64)
    for row, n in enumerate(rng.integers(0, DISTANCE + 1, size=len(copies))):
        for bit in rng.choice(64, size=n, replace=False):
            flips[row] |= np.uint64(1) << np.uint64(bit)
    singles = rng.integers(0, 2**64, size=count - 5 * clusters, dtype=np.uint64)
    hashes = np.concatenate([originals, copies ^ flips, singles])
    rng.shuffle(hashes)
    return hashes


def in_memory(hashes: np.ndarray) -> tuple[str, hashindex.Components]:
    ids = np.arange(1, len(hashes) + 1, dtype=np.int64)
    components = hashindex.Components(DISTANCE)
    tracemalloc.start()
    started = time.perf_counter()
    for begin in range(0, len(hashes), duplicates.STEP_ROWS):
        end = begin + duplicates.STEP_ROWS
        components.add(ids[begin:end], hashes[begin:end])
    seconds = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    held = sum(
        a.nbytes
        for a in (
            components.ids,
            components.labels,
            components.index.hashes,
            *components.index._heads,
            *components.index._chains,
        )
    )
    groups = len(components.sizes)
    rows: list[list[object]] = [
        [f"group {len(hashes):,} hashes (steps of {duplicates.STEP_ROWS:,})", f"{seconds:.1f} s",
         f"{len(hashes) / seconds:,.0f} hashes/s"],
        ["peak memory while grouping (numpy, tracemalloc)", f"{peak / 2**20:.0f} MiB", ""],
        ["index held afterwards", f"{held / 2**20:.0f} MiB", ""],
        ["groups of 2+ found / planted", f"{groups:,} / {len(hashes) // 10:,}",
         f"{sum(components.sizes.values()):,} items in them"],
        ["process peak RSS (ru_maxrss)", f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB", ""],
    ]  # fmt: skip
    bulk_rows: list[list[object]] = []
    rng = np.random.default_rng(7)
    for stored in sorted({n for n in (0, 100_000, 500_000, len(hashes)) if n <= len(hashes)}):
        base = hashindex.Components(DISTANCE)
        if stored:
            base.load(ids[:stored], hashes[:stored], components.labels[:stored].copy())
        times = []
        for round_ in range(5):
            fresh = rng.integers(0, 2**64, size=BULK, dtype=np.uint64)
            fresh[: BULK // 5] = hashes[
                rng.integers(0, max(1, stored), size=BULK // 5)
            ] ^ np.uint64(3)
            new_ids = np.arange(BULK, dtype=np.int64) + 10**9 + round_ * BULK
            started = time.perf_counter()
            base.add(new_ids, fresh)
            times.append(time.perf_counter() - started)
        bulk_rows.append([f"{stored:,}", f"{median(times) * 1000:.1f} ms"])
    return (
        table(["in memory", "figure", ""], rows)
        + "\n\n"
        + table(["hashes stored", f"add a bulk of {BULK} (median of 5)"], bulk_rows),
        components,
    )


# ---------------------------------------------------------------- 3. in PostgreSQL
async def in_ledger(database_url: str, hashes: np.ndarray, labels: np.ndarray) -> str:
    pool = await db.create_pool(database_url, max_size=4)
    async with pool.acquire() as conn:
        await db.migrate(conn)
    batch_id = await ledger.create_batch(pool, ledger.NewBatch(name="dups", pipeline="bench"))
    count = len(hashes)
    extra = 20 * BULK
    started = time.perf_counter()
    async with pool.acquire() as conn:
        await conn.execute(
            """
            INSERT INTO items (batch_id, line, url, url_hash, state)
            SELECT $1, g, 'https://img.example.com/' || g || '.jpg', decode(md5(g::text), 'hex'),
                   CASE WHEN g <= $2::int THEN 'succeeded' ELSE 'writing' END
            FROM generate_series(1, $2::int + $3::int) g
            """,
            batch_id,
            count,
            extra,
        )
        ids = [r["id"] for r in await conn.fetch(
            "SELECT id FROM items WHERE batch_id = $1 ORDER BY line", batch_id)]  # fmt: skip
        records = (
            (ids[i], batch_id, 640, 480, "JPEG", 1000, b"\0" * 24 + int(hashes[i]).to_bytes(8, "big"),
             "local", {"phash": f"{int(hashes[i]):016x}"}, ids[int(labels[i]) - 1])
            for i in range(count)
        )  # fmt: skip
        await conn.copy_records_to_table(
            "results",
            records=records,
            columns=["item_id", "batch_id", "width", "height", "format", "bytes", "sha256",
                     "analyzer", "analysis", "duplicate_group"],
        )  # fmt: skip
        await conn.execute("VACUUM ANALYZE results")
    fill_s = time.perf_counter() - started

    def results_for(chosen: list[int], rng: np.random.Generator) -> list[messages.ItemResult]:
        fresh = rng.integers(0, 2**64, size=len(chosen), dtype=np.uint64)
        fresh[::5] = hashes[rng.integers(0, count, size=len(fresh[::5]))] ^ np.uint64(5)
        return [
            messages.ItemResult(
                batch_id=str(batch_id), item_id=item_id, status="succeeded", stage="analyzer",
                facts=messages.ImageFacts(width=64, height=64, format="JPEG", mode="RGB",
                                          bytes=1000, sha256=f"{int(h):064x}"),
                analyzer="local", analysis={"phash": f"{int(h):016x}"},
            )
            for item_id, h in zip(chosen, fresh, strict=True)
        ]  # fmt: skip

    rng = np.random.default_rng(3)
    pending = ids[count:]
    writer_ms: dict[str, list[float]] = {"with": [], "without": []}
    step_ms: list[float] = []
    cache: dict[uuid.UUID, duplicates.BatchGroups] = {}
    async with pool.acquire() as conn, pool.acquire() as grouper:
        started = time.perf_counter()
        await duplicates.step(grouper, batch_id, cache, DISTANCE, wait=True)
        rebuild_s = time.perf_counter() - started
        for round_ in range(len(pending) // BULK):
            chosen = pending[round_ * BULK : (round_ + 1) * BULK]
            variant = "with" if round_ % 2 == 0 else "without"
            if variant == "without":
                await conn.execute("DROP INDEX results_ungrouped")
            began = time.perf_counter()
            await ledger.apply_results(conn, results_for(chosen, rng))
            writer_ms[variant].append((time.perf_counter() - began) * 1000)
            if variant == "without":
                await conn.execute(
                    "CREATE INDEX results_ungrouped ON results (batch_id, item_id)"
                    " WHERE duplicate_group IS NULL"
                )
            began = time.perf_counter()
            await duplicates.step(grouper, batch_id, cache, DISTANCE, wait=True)
            step_ms.append((time.perf_counter() - began) * 1000)
    await pool.close()
    rows: list[list[object]] = [
        [f"fill {count:,} grouped results (COPY, VACUUM ANALYZE)", f"{fill_s:.1f} s"],
        [f"first step of a process: read {count:,} rows back + group {BULK}", f"{rebuild_s:.2f} s"],
        [f"grouping step of {BULK} new results (median of {len(step_ms)})", f"{median(step_ms):.0f} ms"],
        [f"writer bulk of {BULK} results, partial index present (median of {len(writer_ms['with'])})",
         f"{median(writer_ms['with']):.0f} ms"],
        [f"writer bulk of {BULK} results, partial index dropped (median of {len(writer_ms['without'])})",
         f"{median(writer_ms['without']):.0f} ms"],
    ]  # fmt: skip
    return table([f"in PostgreSQL, {count:,} stored", "figure"], rows)


# ---------------------------------------------------------------- 4. pipeline
def tiny_corpus(count: int) -> Path:
    folder = corpus_dir(f"duplicates-tiny-{count}")
    missing = [i for i in range(count) if not (folder / f"{i:05d}.jpg").exists()]
    if missing:
        for s in corpus.mixed(count, sizes=((32, 24), (64, 48)), seed=99):
            index = int(Path(s.name).stem)
            if index in missing:
                (folder / f"{index:05d}.jpg").write_bytes(s.data)
    return folder


async def pipeline_run(database_url: str, urls: list[str], grouping: bool) -> tuple[float, float]:
    """Seconds from submission to the batch's completion, and from then until its last
    group was written (the grouper's lag; 0 without it)."""
    prefix = f"dup{uuid.uuid4().hex[:6]}"
    env = service_env(REDIS_URL, database_url, prefix, METRICS_PORT="-1", LOG_LEVEL="WARNING",
                      FETCH_ALLOWED_CIDRS="127.0.0.1/32")  # fmt: skip
    configured = pipeline.load_all(env, pipeline.PIPELINE)
    redis = redis_client(REDIS_URL)
    pool = await db.create_pool(database_url, max_size=12)
    res = Resources(redis, pool, Keys(prefix))
    stop = asyncio.Event()
    original = duplicates.Grouper.tick
    if not grouping:

        async def idle(self: duplicates.Grouper) -> None:
            return None

        duplicates.Grouper.tick = idle  # type: ignore[method-assign]
    stages = asyncio.create_task(pipeline.run_stages(res, configured, stop, observe=False))
    try:
        await asyncio.sleep(1)
        batch_id = await ledger.create_batch(pool, ledger.NewBatch(name="bench", pipeline=prefix))

        async def chunks() -> AsyncIterator[bytes]:
            yield ("\n".join(urls) + "\n").encode()

        started = time.perf_counter()
        await ingest_list(res, batch_id, chunks(), filename="list.txt")
        while (await ledger.batch(pool, batch_id))["state"] not in ledger.FINISHED_BATCH_STATES:
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - started
        lag = 0.0
        if grouping:
            while await pool.fetchval(
                "SELECT count(*) FROM results WHERE batch_id = $1 AND duplicate_group IS NULL",
                batch_id,
            ):
                await asyncio.sleep(0.05)
            lag = time.perf_counter() - started - elapsed
        return elapsed, lag
    finally:
        stop.set()
        await stages
        duplicates.Grouper.tick = original  # type: ignore[method-assign]
        async for key in redis.scan_iter(match=f"{prefix}:*", count=1000):
            await redis.delete(key)
        await redis.aclose()
        await pool.close()


async def pipeline_effect(database_url: str, count: int, runs: int, bases: str) -> str:
    pool = await db.create_pool(database_url, max_size=1)
    async with pool.acquire() as conn:
        await db.migrate(conn)
    await pool.close()
    names = sorted(p.name for p in tiny_corpus(count).iterdir())
    servers = bases.split(",")
    urls = [f"{servers[i % len(servers)]}/{name}" for i, name in enumerate(names)]
    await pipeline_run(database_url, urls, True)  # warm-up: imports, pools, page cache
    found: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for run in range(runs):
        for grouping in (run % 2 == 0, run % 2 == 1):  # alternate which goes first
            found[grouping].append(await pipeline_run(database_url, urls, grouping))
    on = median([count / e for e, _ in found[True]])
    off = median([count / e for e, _ in found[False]])
    rows: list[list[object]] = [
        ["grouper running (writer processes, by lease)", f"{on:,.0f}",
         f"{median([lag for _, lag in found[True]]):.2f} s"],
        ["grouper switched off", f"{off:,.0f}", "—"],
        ["ratio on / off", f"{on / off:.2f}", ""],
    ]  # fmt: skip
    return table(
        [f"pipeline, {count:,} tiny JPEGs, one process (median of {runs})", "items/s",
         "groups complete after the batch"], rows,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hashes", type=int, default=1_000_000)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {machine()}\n")
    print(corpus_distances() + "\n", flush=True)
    hashes = synthetic(args.hashes)
    text, components = in_memory(hashes)
    print(text + "\n", flush=True)
    # Items were numbered 1..N in memory: their labels, as item positions.
    labels = components.labels
    with scratch_database() as database_url:
        print(asyncio.run(in_ledger(database_url, hashes, labels)) + "\n", flush=True)
    with scratch_database() as database_url, serve_directory(tiny_corpus(args.images)) as bases:
        print(asyncio.run(pipeline_effect(database_url, args.images, args.runs, bases)))


if __name__ == "__main__":
    main()
