"""Exports through the api: seconds and the api process's memory, Parquet beside CSV.

    uv run python bench/export.py [--rows 1000000] [--xlsx-rows 200000] [--runs 3]

A scratch database gets a finished batch of ``--rows`` items (every tenth failed, result
rows with typed analysis fields, an integer, lists and lists of objects among them, and a
few formula cells, written straight into the ledger by ``imagestream.devtools.ledgerfill``)
and one of ``--xlsx-rows``. Each case gets an ``imagestream serve api`` process of its own
(so one case's memory does not show in the next), whose resident memory is sampled every
20 ms:

* downloads: each format fetched over HTTP to nowhere;
* export jobs (``POST /api/v1/batches/{id}/exports``): CSV and Parquet written by the api
  to a local file (``EXPORT_DIR``) and to moto's S3 server on 127.0.0.1 (a multipart
  upload through ``AWS_ENDPOINT_URL``), timed from the request to the job's completion.

CSV and Parquet of one destination run in two api processes side by side, their runs
alternating (CSV, Parquet, CSV, ...), so a change in the machine's load touches both.
Reported: seconds (median of ``--runs`` for CSV and Parquet, one run for JSONL and XLSX),
rows/s, file size, the api's idle RSS (warmed up by a small CSV download), its peak, and
the export's own share (peak - idle). Beside them: what importing pyarrow costs a process
(the api imports it on its first Parquet export), and PostgreSQL's plain
``COPY (query) TO STDOUT`` of the same rows without any formatting, the ceiling for CSV.

Goals: 1,000,000 CSV rows in <= 20 s with the api at <= 150 MB RSS; Parquet in <= 1.5x the
CSV time of the same destination, at <= 150 MB RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

sys.path.insert(0, str(Path(__file__).parent))
from _common import REDIS_URL, free_port, machine, median, scratch_database, table

from imagestream.common import db, tokens
from imagestream.devtools import ledgerfill, s3server

MB = 1024 * 1024


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def download(base: str, token: str, path: str, pid: int) -> tuple[float, int, int]:
    """(seconds, bytes, peak RSS of the api) of one export, read as fast as it comes."""
    peak = rss(pid)
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss(pid))
            await asyncio.sleep(0.02)

    sampler = asyncio.ensure_future(sample())
    size = 0
    started = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with (
        aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {token}"}, timeout=timeout
        ) as http,
        http.get(base + path) as response,
    ):
        response.raise_for_status()
        async for chunk in response.content.iter_chunked(1 << 20):
            size += len(chunk)
    elapsed = time.perf_counter() - started
    done.set()
    await sampler
    return elapsed, size, peak


async def export_job(
    base: str, token: str, batch_id: uuid.UUID, body: dict[str, Any], pid: int
) -> tuple[float, int, int]:
    """(seconds from the request to the job's completion, bytes written, peak RSS of the api)."""
    peak = rss(pid)
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss(pid))
            await asyncio.sleep(0.02)

    sampler = asyncio.ensure_future(sample())
    started = time.perf_counter()
    path = f"{base}/api/v1/batches/{batch_id}/exports"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
        async with http.post(path, json=body) as response:
            response.raise_for_status()
            job = await response.json()
        while job["state"] not in ("completed", "failed"):
            await asyncio.sleep(0.05)
            async with http.get(f"{path}/{job['id']}") as response:
                job = await response.json()
    elapsed = time.perf_counter() - started
    done.set()
    await sampler
    if job["state"] != "completed":
        raise RuntimeError(f"export job failed: {job['error']}")
    return elapsed, job["bytes_written"], peak


async def copy_ceiling(pool: asyncpg.Pool, batch_id: uuid.UUID) -> tuple[float, int]:
    """PostgreSQL's own COPY of the same rows, unformatted: the floor under any CSV export."""
    size = 0

    async def sink(data: bytes) -> None:
        nonlocal size
        size += len(data)

    started = time.perf_counter()
    async with pool.acquire() as conn:
        await conn.copy_from_query(
            "SELECT i.url, i.state, i.error_class, i.error_message, i.metadata, r.width,"
            " r.height, r.format, r.bytes, r.sha256, r.analysis, r.input_tokens,"
            " r.output_tokens, r.cost_usd FROM items i LEFT JOIN results r ON r.item_id = i.id"
            " WHERE i.batch_id = $1 ORDER BY i.line",
            batch_id,
            output=sink,
            format="csv",
        )
    return time.perf_counter() - started, size


@dataclass
class Api:
    base: str
    pid: int
    #: RSS once warmed up (imports, caches), before the measured export.
    idle: int


@asynccontextmanager
async def api_process(env: dict[str, str], warm_up: str, token: str) -> AsyncIterator[Api]:
    """An ``imagestream serve api`` process of its own (own port and Redis prefix: its
    export-job workers run only the jobs it accepts), warmed up by ``warm_up``."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "imagestream.cli", "serve", "api"],
        env={**env, "API_PORT": str(port), "REDIS_PREFIX": f"bench-export-{port}"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                async with aiohttp.ClientSession() as http, http.get(base + "/readyz") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        await download(base, token, warm_up, proc.pid)
        yield Api(base, proc.pid, rss(proc.pid))
    finally:
        proc.terminate()
        proc.wait(30)


def pyarrow_loaded(pid: int) -> bool:
    return "libarrow" in Path(f"/proc/{pid}/maps").read_text()


def pyarrow_import_cost() -> tuple[int, int]:
    """RSS of a process that imported the export package, before and after pyarrow's
    modules a Parquet export uses."""
    code = (
        "import pathlib, imagestream.common.export\n"
        "def rss():\n"
        "    text = pathlib.Path('/proc/self/status').read_text()\n"
        "    return int(text.split('VmRSS:')[1].split()[0]) * 1024\n"
        "before = rss()\n"
        "import pyarrow, pyarrow.json, pyarrow.parquet\n"
        "print(before, rss())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, text=True)
    before, after = out.stdout.split()
    return int(before), int(after)


Measure = Callable[[Api, str], Awaitable[tuple[float, int, int]]]


def row(label: str, rows: int, results: list[tuple[float, int, int]], api: Api) -> list[Any]:
    seconds = median([r[0] for r in results])
    peak = max(r[2] for r in results)
    return [label, f"{rows:,}", f"{seconds:.1f}", f"{rows / seconds:,.0f}",
            f"{results[-1][1] / MB:,.0f}", f"{api.idle / MB:.0f}", f"{peak / MB:.0f}",
            f"{(peak - api.idle) / MB:.0f}", len(results)]  # fmt: skip


async def main(args: argparse.Namespace, dsn: str, s3: str, folder: str) -> None:
    pool = await db.create_pool(dsn, max_size=4)
    async with pool.acquire() as conn:
        await db.migrate(conn)
    print(f"filling {args.rows:,} + {args.xlsx_rows:,} rows...", file=sys.stderr)
    big = await ledgerfill.finished_batch(pool, args.rows, name="bench-1m")
    small = await ledgerfill.finished_batch(pool, args.xlsx_rows, name="bench-xlsx")
    await pool.execute("ANALYZE")
    _, secret = await tokens.create(pool, "bench", "viewer")
    _, admin = await tokens.create(pool, "bench-admin", "admin")
    import boto3

    credentials = s3server.environment(s3)
    boto3.client(
        "s3",
        endpoint_url=s3,
        aws_access_key_id=credentials["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=credentials["AWS_SECRET_ACCESS_KEY"],
        region_name=credentials["AWS_DEFAULT_REGION"],
    ).create_bucket(Bucket="bench")
    env = {
        **os.environ,
        "DATABASE_URL": dsn,
        "REDIS_URL": REDIS_URL,
        "API_HOST": "127.0.0.1",
        "IMAGESTREAM_ENV_FILE": "/nonexistent",
        "LOG_LEVEL": "WARNING",
        "EXPORT_DIR": folder,
        "EXPORT_ALLOWED_BUCKETS": "s3://bench",
        **credentials,
    }
    warm_up = f"/api/v1/batches/{small}/results?format=csv&state=failed"

    def results_of(batch_id: uuid.UUID) -> Measure:
        async def measure(api: Api, fmt: str) -> tuple[float, int, int]:
            path = f"/api/v1/batches/{batch_id}/results?format={fmt}"
            return await download(api.base, secret, path, api.pid)

        return measure

    def job_to(destination: str) -> Measure:
        async def measure(api: Api, fmt: str) -> tuple[float, int, int]:
            body = {"format": fmt, "destination": destination + fmt}
            return await export_job(api.base, admin, big, body, api.pid)

        return measure

    table_rows: list[list[Any]] = []
    idle_has_pyarrow = False
    pairs: list[tuple[str, Measure]] = [
        ("download", results_of(big)),
        ("-> file (job)", job_to("bench.")),
        ("-> S3 moto (job)", job_to("s3://bench/b.")),
    ]
    try:
        for where, measure in pairs:
            async with (
                api_process(env, warm_up, secret) as csv_api,
                api_process(env, warm_up, secret) as parquet_api,
            ):
                idle_has_pyarrow |= pyarrow_loaded(parquet_api.pid)
                apis = {"csv": csv_api, "parquet": parquet_api}
                results: dict[str, list[tuple[float, int, int]]] = {"csv": [], "parquet": []}
                for run in range(args.runs):
                    for fmt, api in apis.items():
                        print(f"{fmt} {where}, {args.rows:,} rows, run {run + 1}", file=sys.stderr)
                        results[fmt].append(await measure(api, fmt))
                for fmt, api in apis.items():
                    table_rows.append(row(f"{fmt} {where}", args.rows, results[fmt], api))
        for fmt, batch_id, count in (("jsonl", big, args.rows), ("xlsx", small, args.xlsx_rows)):
            async with api_process(env, warm_up, secret) as api:
                print(f"{fmt} download, {count:,} rows", file=sys.stderr)
                result = await results_of(batch_id)(api, fmt)
                table_rows.append(row(f"{fmt} download", count, [result], api))
        ceiling = [await copy_ceiling(pool, big) for _ in range(args.runs)]
        seconds = median([c[0] for c in ceiling])
        table_rows.append(
            ["COPY, unformatted (ceiling)", f"{args.rows:,}", f"{seconds:.1f}",
             f"{args.rows / seconds:,.0f}", f"{ceiling[0][1] / MB:,.0f}", "-", "-", "-",
             args.runs]
        )  # fmt: skip
    finally:
        await pool.close()
    before, after = pyarrow_import_cost()
    by_label = {r[0]: r for r in table_rows}
    print(f"\n{machine()}")
    print("Preliminary: the machine is shared with other work while this runs.\n")
    print(
        table(
            ["export", "rows", "seconds", "rows/s", "file MB", "api idle RSS MB",
             "api peak RSS MB", "export's own MB", "runs"],
            table_rows,
        )
    )  # fmt: skip
    print(
        f"\nImporting pyarrow (json, parquet): {before / MB:.0f} -> {after / MB:.0f} MB"
        f" (+{(after - before) / MB:.0f} MB); the warmed-up api had"
        f" {'loaded it already' if idle_has_pyarrow else 'not loaded it'}."
    )
    csv_row = by_label["csv download"]
    csv_seconds, csv_peak = float(csv_row[2]), float(csv_row[6])
    print(
        f"CSV vs plain COPY: {float(table_rows[-1][2]) / csv_seconds:.2f}x the ceiling's speed."
        f"\nGoal 1M CSV rows <= 20 s and <= 150 MB RSS: {csv_seconds:.1f} s, {csv_peak:.0f} MB"
        f" -> {'met' if csv_seconds <= 20 and csv_peak <= 150 else 'NOT met'}"
        + ("" if args.rows == 1_000_000 else f" (measured on {args.rows:,} rows)")
    )
    for where, _ in pairs:
        csv_time = float(by_label[f"csv {where}"][2])
        parquet = by_label[f"parquet {where}"]
        ratio = float(parquet[2]) / csv_time
        idle, peak, own = float(parquet[5]), float(parquet[6]), float(parquet[7])
        met = ratio <= 1.5 and peak <= 150
        print(
            f"Parquet vs CSV, {where}: {ratio:.2f}x the CSV time (goal <= 1.5x); api peak"
            f" {peak:.0f} MB = idle {idle:.0f} + the export's own {own:.0f}, pyarrow's import"
            f" among them (goal <= 150 MB) -> {'met' if met else 'NOT met'}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--xlsx-rows", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3)
    with (
        scratch_database() as scratch,
        s3server.running() as s3,
        tempfile.TemporaryDirectory(prefix="bench-export-") as folder,
    ):
        asyncio.run(main(parser.parse_args(), scratch, s3, folder))
