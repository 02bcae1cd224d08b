"""Images/s per core of the local analyzer's profiles through the pipeline, next to the
bare loop of the same model calls without the pipeline.

    uv run python bench/local_models.py [--images 40] [--runs 2]

A corpus of 2400x1600 JPEGs, half of them photographs with words rendered on them
(libs/devtools/text_images.py), half photographs without text, is served on 127.0.0.1 by a
separate process. Measured in one run, alternating, ``--runs`` times (medians reported):

* bare model loop: the content profile's analysis images (made once by the fetcher's
  ``image.prepare`` at the profile's long side), decoded and read by the same rapidocr and
  nudenet calls the analyzer makes, in one process per core with the models loaded and
  warmed beforehand: the floor the pipeline is compared with;
* pipeline, ``facts`` and ``content``: ``imagestream serve`` ingest/fetcher/analyzer/writer
  as four processes against Redis and PostgreSQL on this machine; the clock starts once
  the analyzer has loaded its models (its heartbeat is up) and the batch is submitted, and
  stops when the batch has finished. ``facts`` takes milliseconds an image, so its batch
  is the corpus ``--facts-copies`` times over (distinct URLs, the analysis cache off).

Two figures per mode: images/s per core from the wall clock (images/s divided by the
cores: every mode keeps every core busy), and from CPU time (images per CPU second of
every process of the mode: the stages, the model workers; PostgreSQL and Redis are not
counted), which holds when other work shares the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import multiprocessing
import os
import sys
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

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

from imagestream.analyzer.providers import local as local_provider
from imagestream.analyzer.providers.local import content
from imagestream.common import db, ledger
from imagestream.common.connections import redis_client
from imagestream.common.keys import Keys
from imagestream.devtools import corpus
from imagestream.devtools.processes import Fleet, process_tree_cpu_seconds, service_env
from imagestream.devtools.text_images import text_photo
from imagestream.fetcher import image

WIDTH, HEIGHT = 2400, 1600
#: Seconds the started pipeline is watched idle before the batch goes in.
IDLE_S = 10.0
CORES = os.cpu_count() or 2


def build_corpus(count: int) -> Path:
    folder = corpus_dir(f"local-models-{count}")
    for i in range(count):
        path = folder / f"{i:04d}.jpg"
        if path.exists():
            continue
        if i % 2 == 0:
            picture = text_photo(WIDTH, HEIGHT, i, sizes=(28, 40, 56), angles=(0.0, 10.0)).image
        else:
            picture = corpus.scene(WIDTH, HEIGHT, seed=i)
        buf = io.BytesIO()
        picture.convert("RGB").save(buf, "JPEG", quality=90)
        path.write_bytes(buf.getvalue())
    return folder


# ---------------------------------------------------------------- bare model loop
def _bare_read(data: bytes) -> int:
    """One analysis image through the same model calls as the content profile."""
    models = content.loaded_models()
    with Image.open(io.BytesIO(data)) as img:
        rgb = img.convert("RGB")
    bgr = np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1])
    lines, _ = models.ocr(bgr)
    models.nsfw.detect(bgr)
    return len(lines or [])


def bare_loop(pool: ProcessPoolExecutor, analysis_images: list[bytes]) -> tuple[float, float]:
    """Seconds and CPU seconds to read every image, one process per core."""
    workers = [p.pid for p in pool._processes.values()]  # the pool has them all by now
    cpu = sum(process_tree_cpu_seconds(pid) for pid in workers)
    started = time.perf_counter()
    list(pool.map(_bare_read, analysis_images))
    elapsed = time.perf_counter() - started
    return elapsed, sum(process_tree_cpu_seconds(pid) for pid in workers) - cpu


# ---------------------------------------------------------------- pipeline
async def run_pipeline(
    database_url: str, listing: bytes, count: int, profile: str, logs: Path
) -> tuple[float, float, float]:
    """Seconds from submission to completion, with the models loaded before the clock; the
    CPU seconds the stages' processes spent meanwhile, and what they would have spent idle
    in that time."""
    prefix = f"bench{uuid.uuid4().hex[:6]}"
    keys = Keys(prefix)
    env = service_env(
        REDIS_URL, database_url, prefix, METRICS_PORT="-1", LOG_LEVEL="WARNING",
        LOCAL_MODELS="true" if profile == local_provider.CONTENT else "false",
    )  # fmt: skip
    redis = redis_client(REDIS_URL)
    fleet = Fleet(env, logs)
    for stage in ("ingest", "fetcher", "analyzer", "writer"):
        fleet.start(stage)
    pool = await db.create_pool(database_url, max_size=2)
    try:
        async with pool.acquire() as conn:
            await db.migrate(conn)
        # The analyzer beats only once its models are loaded and warmed.
        await wait_alive(redis, keys, ["ingest", "fetcher", "analyzer", "writer"], 300)
        side = local_provider.SPEC.long_side(profile)
        batch_id = await ledger.create_batch(
            pool,
            ledger.NewBatch(
                name="bench",
                pipeline=prefix,
                profile=profile,
                source_name="list.txt",
                options={"cache": False, **({"long_side": side} if side else {})},
            ),
        )
        async with pool.acquire() as conn:
            await ledger.store_upload_part(conn, batch_id, 0, listing)
        # What the idle services spend (heartbeats, claim sweeps, dispatch ticks): a cost
        # of time, not of images, which a slow (shared) machine makes look per image.
        cpu = sum(cpu_by_stage(fleet.services).values())
        await asyncio.sleep(IDLE_S)
        idle_rate = (sum(cpu_by_stage(fleet.services).values()) - cpu) / IDLE_S
        cpu = sum(cpu_by_stage(fleet.services).values())
        started = time.perf_counter()
        row = await submit_and_wait(redis, pool, keys, batch_id)
        elapsed = time.perf_counter() - started
        spent = sum(cpu_by_stage(fleet.services).values()) - cpu
        assert row["succeeded"] == count, (dict(row), fleet.logs_text())
        return elapsed, spent, idle_rate * elapsed
    finally:
        await pool.close()
        fleet.stop_all()
        async for key in redis.scan_iter(match=f"{prefix}:*"):
            await redis.delete(key)
        await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--facts-copies", type=int, default=20)
    args = parser.parse_args()

    folder = build_corpus(args.images)
    files = sorted(folder.glob("*.jpg"))[: args.images]
    side = local_provider.CONTENT_LONG_SIDE
    analysis_images = [image.prepare(f.read_bytes(), target_long_side=side).data for f in files]
    logs = corpus_dir("logs")
    counts = {"bare": len(files), "content": len(files), "facts": len(files) * args.facts_copies}
    wall: dict[str, list[float]] = {mode: [] for mode in counts}
    cpu: dict[str, list[float]] = {mode: [] for mode in counts}
    idle: dict[str, list[float]] = {mode: [] for mode in counts}
    models = ProcessPoolExecutor(
        CORES,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=content.load_models,
        initargs=(1, 0.5),
    )
    with serve_directory(folder) as bases, scratch_database() as database_url, models:
        base = bases.split(",")[0]
        listings = {
            "content": "".join(f"{base}/{f.name}\n" for f in files).encode(),
            "facts": "".join(
                f"{base}/{f.name}?copy={k}\n" for k in range(args.facts_copies) for f in files
            ).encode(),
        }
        # Load and warm every worker's models before any clock runs.
        list(models.map(_bare_read, analysis_images[:CORES]))
        for run in range(args.runs):
            seconds, spent = bare_loop(models, analysis_images)
            wall["bare"].append(seconds)
            cpu["bare"].append(spent)
            idle["bare"].append(0.0)  # the pool's workers wait on a pipe: nothing
            for profile in ("facts", "content"):
                seconds, spent, idling = asyncio.run(
                    run_pipeline(database_url, listings[profile], counts[profile], profile, logs)
                )
                wall[profile].append(seconds)
                cpu[profile].append(spent)
                idle[profile].append(idling)
            print(
                f"run {run + 1}: "
                + ", ".join(f"{m} {wall[m][-1]:.1f} s ({cpu[m][-1]:.1f} CPU s)" for m in counts),
                file=sys.stderr,
            )

    def per_core(mode: str) -> float:
        return counts[mode] / median(wall[mode]) / CORES

    def per_cpu_second(mode: str) -> float:
        return counts[mode] / median(cpu[mode])

    def per_busy_cpu_second(mode: str) -> float:
        busy = [spent - idling for spent, idling in zip(cpu[mode], idle[mode], strict=True)]
        return counts[mode] / median(busy)

    names = {
        "bare": "bare model loop (rapidocr + nudenet, no pipeline)",
        "content": f"pipeline, content (long side {side})",
        "facts": "pipeline, facts (long side 768)",
    }
    rows = [
        [
            names[mode],
            counts[mode],
            f"{median(wall[mode]):.1f}",
            f"{per_core(mode):.2f}",
            f"{per_core(mode) / per_core('bare'):.2f}",
            f"{per_cpu_second(mode):.2f}",
            f"{per_cpu_second(mode) / per_cpu_second('bare'):.2f}",
            f"{per_busy_cpu_second(mode):.2f}",
            f"{per_busy_cpu_second(mode) / per_busy_cpu_second('bare'):.2f}",
        ]
        for mode in ("bare", "content", "facts")
    ]
    print(machine())
    print(
        f"JPEGs {WIDTH}x{HEIGHT} (half with words), served from 127.0.0.1; medians of"
        f" {args.runs} runs; per core = images/s / {CORES} cores; per CPU s = images per CPU"
        " second of the mode's processes; net of idle = less what the started pipeline"
        f" spent idle ({IDLE_S:.0f} s watched before each batch) over the batch's duration"
    )
    print(
        table(
            ["mode", "images", "seconds", "images/s per core", "ratio", "images per CPU s",
             "ratio", "per CPU s net of idle", "ratio"],
            rows,
        )
    )  # fmt: skip


if __name__ == "__main__":
    main()
