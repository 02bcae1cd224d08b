"""Exports through the api: rows/s and the api process's memory.

    uv run python bench/export.py [--rows 1000000] [--xlsx-rows 200000] [--runs 3]

A scratch database gets a finished batch of ``--rows`` items (every tenth failed, result
rows with typed analysis fields, lists and lists of objects among them, and a few formula
cells, written straight into the ledger by ``imagestream.devtools.ledgerfill``) and one of
``--xlsx-rows``. An ``imagestream serve api`` process serves them while its resident
memory is sampled every 20 ms:

* downloads: each format fetched over HTTP to nowhere;
* export jobs (``POST /api/v1/batches/{id}/exports``): CSV and Parquet written by the api
  to a local file (``EXPORT_DIR``) and to moto's S3 server on 127.0.0.1 (a multipart
  upload through ``AWS_ENDPOINT_URL``), timed from the request to the job's completion.

Reported: seconds (median of ``--runs`` for CSV and Parquet downloads, one run for the
rest), rows/s, file size, the api's peak RSS and its growth over its idle RSS. Side by
side: PostgreSQL's plain ``COPY (query) TO STDOUT`` of the same rows without any
formatting, the ceiling for CSV.

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
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": dsn,
        "REDIS_URL": REDIS_URL,
        "REDIS_PREFIX": f"bench-export-{port}",
        "API_HOST": "127.0.0.1",
        "API_PORT": str(port),
        "IMAGESTREAM_ENV_FILE": "/nonexistent",
        "LOG_LEVEL": "WARNING",
        "EXPORT_DIR": folder,
        "EXPORT_ALLOWED_BUCKETS": "s3://bench",
        **s3server.environment(s3),
    }
    api = subprocess.Popen([sys.executable, "-m", "imagestream.cli", "serve", "api"], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                async with aiohttp.ClientSession() as http, http.get(base + "/readyz") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        # Warm up (imports, caches), then the idle size the growth is measured from.
        await download(base, secret, f"/api/v1/batches/{small}/results?format=csv", api.pid)
        idle = rss(api.pid)
        rows = []
        cases = [
            ("csv", big, args.rows, args.runs),
            ("parquet", big, args.rows, args.runs),
            ("jsonl", big, args.rows, 1),
            ("xlsx", small, args.xlsx_rows, 1),
        ]
        jobs = [
            ("csv -> file (job)", {"format": "csv", "destination": "bench.csv"}),
            ("parquet -> file (job)", {"format": "parquet", "destination": "bench.parquet"}),
            ("csv -> S3 moto (job)", {"format": "csv", "destination": "s3://bench/b.csv"}),
            ("parquet -> S3 moto (job)", {"format": "parquet", "destination": "s3://bench/b.parquet"}),
        ]  # fmt: skip
        for fmt, batch_id, count, runs in cases:
            times, peaks, size = [], [], 0
            for _ in range(runs):
                print(f"exporting {count:,} rows as {fmt}...", file=sys.stderr)
                path = f"/api/v1/batches/{batch_id}/results?format={fmt}"
                elapsed, size, peak = await download(base, secret, path, api.pid)
                times.append(elapsed)
                peaks.append(peak)
            seconds = median(times)
            rows.append(
                [fmt, f"{count:,}", f"{seconds:.1f}", f"{count / seconds:,.0f}",
                 f"{size / MB:,.0f}", f"{max(peaks) / MB:.0f}", f"{(max(peaks) - idle) / MB:.0f}",
                 runs]
            )  # fmt: skip
        for label, body in jobs:
            print(f"export job: {args.rows:,} rows, {label}...", file=sys.stderr)
            seconds, size, peak = await export_job(base, admin, big, body, api.pid)
            rows.append(
                [label, f"{args.rows:,}", f"{seconds:.1f}", f"{args.rows / seconds:,.0f}",
                 f"{size / MB:,.0f}", f"{peak / MB:.0f}", f"{(peak - idle) / MB:.0f}", 1]
            )  # fmt: skip
        ceiling = [await copy_ceiling(pool, big) for _ in range(args.runs)]
        seconds = median([c[0] for c in ceiling])
        rows.append(
            ["COPY, unformatted (ceiling)", f"{args.rows:,}", f"{seconds:.1f}",
             f"{args.rows / seconds:,.0f}", f"{ceiling[0][1] / MB:,.0f}", "-", "-", args.runs]
        )  # fmt: skip
    finally:
        api.terminate()
        api.wait(20)
        await pool.close()
    csv_row = rows[0]
    by_label = {r[0]: r for r in rows}
    print(f"\n{machine()}")
    print("Preliminary: the machine is shared with other work while this runs.\n")
    print(
        table(
            ["export", "rows", "seconds", "rows/s", "file MB", "api peak RSS MB",
             "RSS growth MB", "runs"],
            rows,
        )
    )  # fmt: skip
    csv_seconds, csv_peak = float(csv_row[2]), float(csv_row[5])
    print(
        f"\nCSV vs plain COPY: {float(rows[-1][2]) / csv_seconds:.2f}x the ceiling's speed."
        f"\nGoal 1M CSV rows <= 20 s and <= 150 MB RSS: {csv_seconds:.1f} s, {csv_peak:.0f} MB"
        f" -> {'met' if csv_seconds <= 20 and csv_peak <= 150 else 'NOT met'}"
        + ("" if args.rows == 1_000_000 else f" (measured on {args.rows:,} rows)")
    )
    for where, csv_label, parquet_label in (
        ("download", "csv", "parquet"),
        ("local file", "csv -> file (job)", "parquet -> file (job)"),
        ("S3 (moto)", "csv -> S3 moto (job)", "parquet -> S3 moto (job)"),
    ):
        ratio = float(by_label[parquet_label][2]) / float(by_label[csv_label][2])
        parquet_peak = float(by_label[parquet_label][5])
        met = ratio <= 1.5 and parquet_peak <= 150
        print(
            f"Parquet vs CSV, {where}: {ratio:.2f}x the CSV time, api peak {parquet_peak:.0f} MB"
            f" (goal <= 1.5x, <= 150 MB) -> {'met' if met else 'NOT met'}"
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
