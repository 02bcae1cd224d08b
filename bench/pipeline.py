"""End-to-end images/s of the pipeline with the local analyzer, next to the bare loop of
the same fetch + decode without the pipeline.

    uv run python bench/pipeline.py [--images 2000] [--runs 3]

A corpus of JPEGs (mixed 640x480 to 1920x1080, cropped from real photographs) is served
on 127.0.0.1 by a separate process. Measured, each ``--runs`` times (medians reported):

* bare loop: aiohttp GET with the fetcher's concurrency + ``image.prepare`` (identify,
  decode with DCT scaling, orient, downscale, encode) in a thread pool of one thread per
  core: the floor the pipeline is compared with;
* pipeline, one process: ``imagestream analyze`` (ingest, fetcher, analyzer with the local
  analyzer, writer, all in one process) on the same URLs;
* pipeline, one process per stage: ``imagestream serve`` ingest/fetcher/analyzer/writer as
  four processes against Redis and PostgreSQL on this machine.

Besides seconds, each mode's CPU time per image is printed (the bare loop: this process;
``analyze``: the child process, its start-up included; per stage: each service process with
its decode workers, from submission to completion), and the CPU per image of each stage.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import aiohttp
import asyncpg

sys.path.insert(0, str(Path(__file__).parent))
from _common import (
    REDIS_URL,
    corpus_dir,
    cpu_by_stage,
    machine,
    median,
    scratch_database,
    serve_directory,
    submit_and_wait,
    table,
    wait_alive,
)

from imagestream.common import db, ledger
from imagestream.common.connections import redis_client
from imagestream.common.keys import Keys
from imagestream.devtools import corpus
from imagestream.devtools.processes import Fleet, service_env
from imagestream.fetcher import image


def build_corpus(count: int) -> Path:
    folder = corpus_dir(f"pipeline-{count}")
    missing = [i for i in range(count) if not (folder / f"{i:05d}.jpg").exists()]
    if missing:
        print(
            f"generating {len(missing)} JPEGs in {folder} (cached for later runs)...",
            file=sys.stderr,
        )
        for s in corpus.mixed(count, sizes=((640, 480), (1920, 1080)), seed=2024):
            index = int(Path(s.name).stem)
            if index in missing:
                (folder / f"{index:05d}.jpg").write_bytes(s.data)
    return folder


def urls(bases: str, folder: Path) -> list[str]:
    servers = bases.split(",")
    names = sorted(p.name for p in folder.iterdir())
    return [f"{servers[i % len(servers)]}/{name}" for i, name in enumerate(names)]


STAGES = ("ingest", "fetcher", "analyzer", "writer")


@dataclass
class Run:
    seconds: float
    #: CPU seconds, in all (key "all") and by stage for the per-stage processes.
    cpu: dict[str, float]


async def bare_loop(targets: list[str], concurrency: int = 64) -> Run:
    """Fetch and prepare every URL without the pipeline."""
    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2)
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)

    async def one(session: aiohttp.ClientSession, url: str) -> None:
        async with gate:
            async with session.get(url) as response:
                body = await response.read()
            await loop.run_in_executor(pool, partial(image.prepare, body, target_long_side=768))

    started, cpu = time.perf_counter(), time.process_time()
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(one(session, u) for u in targets))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    pool.shutdown()
    return Run(elapsed, {"all": cpu})


def env_for(database_url: str, prefix: str) -> dict[str, str]:
    # The local facts profile: the analyzer loads no content models.
    return service_env(
        REDIS_URL,
        database_url,
        prefix,
        METRICS_PORT="-1",
        LOG_LEVEL="WARNING",
        LOCAL_MODELS="false",
    )


async def forget_analyses(database_url: str) -> None:
    """Empty the analysis cache: every run analyzes each image (runs share the database,
    and a run after the first would otherwise find every analysis cached)."""
    conn = await asyncpg.connect(database_url)
    try:
        await db.migrate(conn)
        await conn.execute("TRUNCATE analysis_cache")
    finally:
        await conn.close()


def run_analyze(listing: Path, database_url: str) -> Run:
    """The in-process pipeline (seconds from its own summary line)."""
    out = listing.with_suffix(".results.csv")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "imagestream.cli",
            "analyze",
            str(listing),
            "-o",
            str(out),
            "--no-progress",
        ],
        env=env_for(database_url, f"bench{uuid.uuid4().hex[:6]}"),
        capture_output=True,
        text=True,
        check=True,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    match = re.search(r"(\d+) succeeded.* in ([\d.]+) s", done.stdout)
    assert match, done.stdout + done.stderr
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return Run(float(match.group(2)), {"all": cpu})


async def run_processes(listing: Path, database_url: str, count: int) -> Run:
    """From submission to completion with one process per stage."""
    prefix = f"bench{uuid.uuid4().hex[:6]}"
    redis = redis_client(REDIS_URL)
    fleet = Fleet(env_for(database_url, prefix), corpus_dir("logs"))
    for stage in STAGES:
        fleet.start(stage)
    try:
        pool = await db.create_pool(database_url, max_size=2)
        async with pool.acquire() as conn:
            await db.migrate(conn)
        # Every stage connected before the clock starts.
        await wait_alive(redis, Keys(prefix), list(STAGES))
        batch_id = await ledger.create_batch(
            pool, ledger.NewBatch(name="bench", pipeline=prefix, source_name=listing.name)
        )
        async with pool.acquire() as conn:
            await ledger.store_upload_part(conn, batch_id, 0, listing.read_bytes())
        started, cpu_before = time.perf_counter(), cpu_by_stage(fleet.services)
        row = await submit_and_wait(redis, pool, Keys(prefix), batch_id)
        elapsed = time.perf_counter() - started
        cpu = {k: v - cpu_before[k] for k, v in cpu_by_stage(fleet.services).items()}
        assert row["succeeded"] + row["failed"] + row["skipped"] == count, row
        await pool.close()
        return Run(elapsed, {"all": sum(cpu.values()), **cpu})
    finally:
        fleet.stop_all()
        async for key in redis.scan_iter(match=f"{prefix}:*"):
            await redis.delete(key)
        await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--servers", type=int, default=1, help="image server processes")
    args = parser.parse_args()
    folder = build_corpus(args.images)
    results: dict[str, list[Run]] = {"bare": [], "analyze": [], "processes": []}
    with serve_directory(folder, args.servers) as bases, scratch_database() as database_url:
        targets = urls(bases, folder)
        listing = corpus_dir("lists") / f"pipeline-{args.images}.txt"
        listing.write_text("\n".join(targets) + "\n")
        for run in range(args.runs):
            results["bare"].append(asyncio.run(bare_loop(targets)))
            asyncio.run(forget_analyses(database_url))
            results["analyze"].append(run_analyze(listing, database_url))
            asyncio.run(forget_analyses(database_url))
            results["processes"].append(
                asyncio.run(run_processes(listing, database_url, args.images))
            )
            print(
                f"run {run + 1}: "
                + ", ".join(f"{k} {v[-1].seconds:.1f}s" for k, v in results.items())
                + f" (load average {os.getloadavg()[0]:.1f})",
                file=sys.stderr,
            )
    per_image_ms = 1000 / args.images

    def row(key: str, label: str) -> list[object]:
        runs = results[key]
        seconds = median([r.seconds for r in runs])
        # Each run's ratio to the bare loop of the same round, then their median.
        ratio = median([b.seconds / r.seconds for b, r in zip(results["bare"], runs, strict=True)])
        cpu = median([r.cpu["all"] for r in runs]) * per_image_ms
        return [
            label,
            f"{seconds:.1f}",
            f"{args.images / seconds:.0f}",
            f"{ratio:.2f}",
            f"{cpu:.1f}",
        ]

    rows = [
        row("bare", "bare fetch + decode loop (no pipeline)"),
        row("analyze", "pipeline, one process (imagestream analyze)"),
        row("processes", "pipeline, one process per stage"),
    ]
    stage_rows = [
        [stage, f"{median([r.cpu[stage] for r in results['processes']]) * per_image_ms:.2f}"]
        for stage in STAGES
    ]
    print(f"\nmachine: {machine()}")
    print(
        f"corpus: {args.images} JPEGs, 640x480..1920x1080, served from 127.0.0.1; medians of {args.runs} runs\n"
    )
    print(table(["mode", "seconds", "images/s", "ratio to bare loop", "CPU ms/image"], rows) + "\n")
    print(table(["stage (one process each)", "CPU ms/image"], stage_rows))


if __name__ == "__main__":
    main()
