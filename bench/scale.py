"""One batch of 1,000,000 URLs of tiny images: ingest rate, Redis memory, end-to-end rate.

    uv run python bench/scale.py [--urls 1000000] [--fetchers 1] [--analyzers 1] [--writers 1]

Everything runs against a redis-server started by the benchmark (so its memory is ours
alone) and a scratch PostgreSQL database; images are served on 127.0.0.1 by a separate
process (256 distinct tiny PNGs behind a million URLs). Measured:

* ingest: the list (uploaded into the ledger's upload parts, as the api stores it) read by
  the ingest service into ``items``, with the batch paused so nothing else competes;
* Redis ``used_memory`` sampled every 0.25 s for the whole run, peak minus idle (idle:
  after the services connected, before the batch);
* end to end: from resume to the last item terminal, services as processes;
* CPU per item over the end-to-end span: each stage's processes (the fetcher with its
  decode workers), the redis-server, the database's PostgreSQL backends and the image
  server, so the next bottleneck is visible;
* writer: ``ledger.apply_results`` alone on synthetic results, in bulks of 500.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import cpu_by_stage, free_port, machine, scratch_database, table, wait_alive

from imagestream.common import control, db, ledger, messages, streams
from imagestream.common.connections import redis_client
from imagestream.common.keys import Keys
from imagestream.devtools import corpus
from imagestream.devtools.processes import (
    Fleet,
    RedisServer,
    process_tree_cpu_seconds,
    service_env,
)

VARIANTS = 256


def _serve(port: int, ready: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    from aiohttp import web

    images = [
        corpus.sample("x", 8 + i % 24, 8 + i % 16, "PNG", seed=i).data for i in range(VARIANTS)
    ]

    async def handle(request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        return web.Response(body=images[n % VARIANTS], content_type="image/png")

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/i/{n}.png", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=2048).start()
        ready.set()
        await asyncio.Event().wait()

    import uvloop

    uvloop.run(main())


async def used_memory(redis: object) -> int:
    info = await redis.info("memory")  # type: ignore[attr-defined]
    return int(info["used_memory"])


async def postgres_cpu(pool: Any) -> dict[int, float]:
    """CPU seconds so far of each PostgreSQL backend serving this database, by pid."""
    pids = await pool.fetch("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
    return {r["pid"]: process_tree_cpu_seconds(r["pid"]) for r in pids}


async def run(
    args: argparse.Namespace,
    database_url: str,
    redis_url: str,
    image_port: int,
    workdir: Path,
    others: dict[str, int],
) -> list[list[object]]:
    prefix = "scale"
    keys = Keys(prefix)
    env = service_env(
        redis_url,
        database_url,
        prefix,
        METRICS_PORT="-1",
        LOG_LEVEL="WARNING",
        INGEST_CHUNK_ROWS="50000",
    )
    pool = await db.create_pool(database_url, max_size=4)
    async with pool.acquire() as conn:
        await db.migrate(conn)
    redis = redis_client(redis_url)
    fleet = Fleet(env, workdir)
    stages = [
        "ingest",
        *["fetcher"] * args.fetchers,
        *["analyzer"] * args.analyzers,
        *["writer"] * args.writers,
    ]
    for stage in stages:
        fleet.start(stage)
    samples: list[int] = []
    sampling = True

    async def sample() -> None:
        while sampling:
            samples.append(await used_memory(redis))
            await asyncio.sleep(0.25)

    try:
        await wait_alive(redis, keys, stages)  # services connected, groups created
        idle = await used_memory(redis)
        sampler = asyncio.create_task(sample())
        listing = "".join(
            f"http://127.0.0.1:{image_port}/i/{n}.png\n" for n in range(args.urls)
        ).encode()
        batch_id = await ledger.create_batch(
            pool, ledger.NewBatch(name="scale", pipeline=prefix, source_name="urls.txt")
        )
        async with pool.acquire() as conn, conn.transaction():
            for part, start in enumerate(range(0, len(listing), 1 << 20)):
                await ledger.store_upload_part(
                    conn, batch_id, part, listing[start : start + (1 << 20)]
                )
        await control.pause(redis, keys, pool, batch_id, "benchmark: measure ingest alone")
        started = time.perf_counter()
        await streams.append(
            redis, keys.batches, [messages.encode(messages.BatchSubmitted(batch_id=str(batch_id)))]
        )
        while not (await ledger.batch(pool, batch_id))["ingested"]:
            await asyncio.sleep(0.05)
        ingest_s = time.perf_counter() - started
        total = (await ledger.batch(pool, batch_id))["total"]
        assert total == args.urls, total

        started = time.perf_counter()
        cpu_before = cpu_by_stage(fleet.services)
        cpu_before |= {name: process_tree_cpu_seconds(pid) for name, pid in others.items()}
        pg_before = await postgres_cpu(pool)
        await control.resume(redis, keys, pool, batch_id)
        last_report = started
        while True:
            row = await ledger.batch(pool, batch_id)
            if row["state"] not in ("queued", "running"):
                break
            if time.perf_counter() - last_report > 30:
                last_report = time.perf_counter()
                done = row["succeeded"] + row["failed"]
                print(f"  {done}/{total} after {last_report - started:.0f} s", file=sys.stderr)
            await asyncio.sleep(0.5)
        e2e_s = time.perf_counter() - started
        cpu_after = cpu_by_stage(fleet.services)
        cpu_after |= {name: process_tree_cpu_seconds(pid) for name, pid in others.items()}
        pg_after = await postgres_cpu(pool)
        sampling = False
        await sampler
        assert row["succeeded"] == args.urls, dict(row)
    finally:
        fleet.stop_all()
    writer_rows_s = await writer_capacity(pool)
    await redis.aclose()
    await pool.close()
    peak = max(samples) - idle
    cpu = {name: cpu_after[name] - cpu_before[name] for name in cpu_before}
    # Backends present at both ends (pools keep their connections for the whole run).
    cpu["postgresql"] = sum(pg_after[p] - pg_before[p] for p in pg_before.keys() & pg_after)
    per_item = {name: 1000 * seconds / args.urls for name, seconds in cpu.items()}
    cpu_rows: list[list[object]] = [
        [f"CPU per item: {name}", f"{ms:.3f} ms", f"{cpu[name] / e2e_s:.2f} cores"]
        for name, ms in per_item.items()
    ]
    cpu_rows.append(
        [
            "CPU per item: all of the above",
            f"{sum(per_item.values()):.3f} ms",
            f"{sum(cpu.values()) / e2e_s:.2f} cores",
        ]
    )
    return [
        ["URLs", f"{args.urls:,}", ""],
        ["ingest into the ledger", f"{args.urls / ingest_s:,.0f} URLs/s", "goal >= 50,000"],
        ["Redis used_memory, idle", f"{idle / 2**20:.1f} MiB", ""],
        ["Redis used_memory, peak above idle", f"{peak / 2**20:.1f} MiB", "goal <= 64 MiB"],
        [
            "end to end (resume -> last item)",
            f"{args.urls / e2e_s:,.0f} items/s",
            f"{e2e_s:,.0f} s",
        ],
        *cpu_rows,
        ["writer alone (apply_results, bulks of 500)", f"{writer_rows_s:,.0f} rows/s", ""],
    ]


async def writer_capacity(pool: object, rows: int = 100_000) -> float:
    """Rows per second the writer's ledger transaction sustains, without upstream stages."""
    assert isinstance(pool, type(pool))
    batch_id = await ledger.create_batch(
        pool, ledger.NewBatch(name="writer", pipeline="writer-bench")
    )  # type: ignore[arg-type]
    lines = "".join(f"http://127.0.0.1:9/w/{n}.png\n" for n in range(rows)).encode()
    from imagestream.common.inputs import ListParser

    parser = ListParser(filename="w.txt")
    parsed = parser.feed(lines) + parser.close()
    async with pool.acquire() as conn:  # type: ignore[attr-defined]
        await ledger.insert_items(conn, batch_id, parsed)  # type: ignore[arg-type]
        ids = [
            r["id"]
            for r in await conn.fetch(
                "SELECT id FROM items WHERE batch_id = $1 ORDER BY id", batch_id
            )
        ]
    facts = messages.ImageFacts(
        width=16, height=16, format="PNG", mode="RGB", bytes=100, sha256="ab" * 32
    )
    results = [
        messages.ItemResult(
            batch_id=str(batch_id),
            item_id=i,
            status="succeeded",
            stage="analyzer",
            facts=facts,
            analyzer="local",
            analysis={"brightness": 0.5, "phash": "0" * 16},
        )
        for i in ids
    ]
    started = time.perf_counter()
    async with pool.acquire() as conn:  # type: ignore[attr-defined]
        for start in range(0, len(results), 500):
            await ledger.apply_results(conn, results[start : start + 500])
    return rows / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--urls", type=int, default=1_000_000)
    parser.add_argument("--fetchers", type=int, default=1)
    parser.add_argument("--analyzers", type=int, default=1)
    parser.add_argument("--writers", type=int, default=1)
    args = parser.parse_args()
    image_port = free_port()
    workdir = Path(__file__).parent / ".cache" / f"scale-{uuid.uuid4().hex[:6]}"
    workdir.mkdir(parents=True)
    redis_server = RedisServer(workdir)
    redis_server.start()
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    server = ctx.Process(target=_serve, args=(image_port, ready), daemon=True)
    server.start()
    ready.wait(60)
    try:
        with scratch_database() as database_url:
            assert redis_server.process is not None and server.pid is not None
            others = {"redis-server": redis_server.process.pid, "image server": server.pid}
            rows = asyncio.run(
                run(args, database_url, redis_server.url, image_port, workdir, others)
            )
    finally:
        server.terminate()
        redis_server.kill()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nmachine: {machine()}")
    print(
        f"services: ingest, {args.fetchers} fetcher(s), {args.analyzers} analyzer(s),"
        f" {args.writers} writer(s) as processes; local analyzer;"
        f" load average {os.getloadavg()[0]:.1f} at the end\n"
    )
    print(table(["measure", "value", "note"], rows))


if __name__ == "__main__":
    main()
