"""What the analyzer benchmarks share (bench/gemini.py, bench/providers.py): distinct
images put straight into the analyze stream as the fetcher would, waiting for batches,
the emulators' request logs, service processes, and per-key rates from those logs."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import secrets
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from PIL import Image

from imagestream.common import db, ledger, messages, streams
from imagestream.common.inputs import Row
from imagestream.common.keys import Keys


def image(index: int, salt: int) -> bytes:
    """A distinct 160x120 JPEG per index: a colour, and the index and salt as pixels."""
    img = Image.new("RGB", (160, 120), (index * 7 % 256, index * 13 % 256, index * 29 % 256))
    for bit in range(32):
        img.putpixel((bit, 0), (255, 255, 255) if (salt >> bit) & 1 else (0, 0, 0))
        img.putpixel((bit, 1), (255, 255, 255) if (index >> bit) & 1 else (0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


async def submit(
    pool: asyncpg.Pool,
    redis: Any,
    keys: Keys,
    profile: str,
    model: str,
    count: int,
    mode: str = "standard",
    analyzer: str = "gemini",
) -> uuid.UUID:
    """A running batch of ``count`` images waiting in the analyze stream."""
    batch_id = await ledger.create_batch(
        pool,
        ledger.NewBatch(
            name=f"bench {analyzer} {profile} {model} {mode}",
            pipeline=keys.prefix,
            analyzer=analyzer,
            profile=profile,
            model=model,
            options={"mode": mode} if mode == "batch" else {},
        ),
    )
    rows = [Row(line=i, url=f"http://127.0.0.1/{i}.jpg", metadata=None) for i in range(count)]
    async with pool.acquire() as conn:
        await ledger.insert_items(conn, batch_id, rows)
        await ledger.start_batch(conn, batch_id)
        await ledger.finish_ingest(conn, batch_id, "txt", [])
    ids = await pool.fetch(
        "UPDATE items SET state = 'analyzing', dispatched_at = now() WHERE batch_id = $1"
        " RETURNING id, line",
        batch_id,
    )
    salt = secrets.randbits(32)
    payloads = []
    async with redis.pipeline(transaction=False) as pipe:
        for record in ids:
            data = image(record["line"], salt)
            sha = hashlib.sha256(data).hexdigest()
            blob = keys.blob(sha, 768)
            pipe.set(blob, data, ex=3600)
            facts = messages.ImageFacts(
                width=160, height=120, format="JPEG", mode="RGB", bytes=len(data), sha256=sha
            )
            task = messages.AnalyzeTask(
                batch_id=str(batch_id),
                item_id=record["id"],
                url=f"http://127.0.0.1/{record['line']}.jpg",
                facts=facts,
                blob_key=blob,
            )
            payloads.append(messages.encode(task))
        await pipe.execute()
    for start in range(0, len(payloads), 1000):
        await streams.append(redis, keys.analyze, payloads[start : start + 1000])
    return batch_id


async def wait_done(pool: asyncpg.Pool, batch_ids: list[uuid.UUID], label: str) -> float:
    started = time.monotonic()
    last_print = 0.0
    while True:
        rows = await pool.fetch(
            "SELECT total, succeeded + failed + skipped + cancelled AS done, state"
            " FROM batches WHERE id = ANY($1::uuid[])",
            batch_ids,
        )
        total = sum(r["total"] for r in rows)
        done = sum(r["done"] for r in rows)
        now = time.monotonic()
        if now - last_print >= 15:
            rate = done / (now - started) * 60 if now > started else 0
            print(f"  {label}: {done}/{total} after {now - started:.0f} s ({rate:.0f}/min)")
            last_print = now
        if all(r["state"] in ledger.FINISHED_BATCH_STATES for r in rows):
            return now - started
        await asyncio.sleep(1)


async def emulator_log(base_url: str) -> list[dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{base_url}/_emulator/log") as response,
    ):
        return list((await response.json())["log"])


async def wait_listening(base_url: str) -> None:
    for _ in range(300):
        try:
            await emulator_log(base_url)
            return
        except aiohttp.ClientError:
            await asyncio.sleep(0.1)
    raise RuntimeError(f"no emulator answers at {base_url}")


def write_keys_file(path: Path, keys: list[str], rpm: int) -> Path:
    """An emulator's ``--keys-file``: key i in project-i, each project at ``rpm``
    requests per window and tokens enough never to bind."""
    projects = {
        f"project-{i + 1}": {"rpm": rpm, "tpm": 4_000_000, "rpd": None} for i in range(len(keys))
    }
    key_projects = {k: f"project-{i + 1}" for i, k in enumerate(keys)}
    path.write_text(json.dumps({"key_projects": key_projects, "projects": projects}))
    return path


def service_env(dsn: str, prefix: str, redis_url: str, dropped: tuple[str, ...]) -> dict[str, str]:
    """The services' environment: this one without the settings named ``dropped*`` (the
    benchmark sets its own), on the bench's Redis prefix and scratch database."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith((*dropped, "REDIS_"))},
        "IMAGESTREAM_ENV_FILE": "/nonexistent",
        "REDIS_URL": redis_url,
        "DATABASE_URL": dsn,
        "REDIS_PREFIX": prefix,
        "METRICS_PORT": "0",
        "LOG_LEVEL": "WARNING",
    }


async def migrate(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await db.migrate(conn)
    finally:
        await conn.close()


@contextlib.contextmanager
def processes(
    commands: Mapping[str, list[str]], env: Mapping[str, str], workdir: Path
) -> Iterator[None]:
    """Each command its own process (stderr to ``<name>.log`` in ``workdir``) until the
    block ends."""
    started = []
    try:
        for name, command in commands.items():
            with (workdir / f"{name}.log").open("wb") as log:
                started.append(
                    subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log)
                )
        yield
    finally:
        for process in reversed(started):
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


@dataclass(frozen=True, slots=True)
class KeyRate:
    key: str
    answered: int
    refused: int
    #: Seconds from its first to its last answered request.
    span_s: float
    #: Answered requests per quota window ("minute"), over that span.
    per_window: float


def key_rates(calls: list[dict[str, Any]], window_s: float) -> list[KeyRate]:
    """Each key's rate, from an emulator's log entries of its analysis calls."""
    rates = []
    for key in sorted({e["key"] for e in calls}):
        ok = sorted(e["t"] for e in calls if e["key"] == key and e["status"] == 200)
        refused = sum(e["key"] == key and e["status"] == 429 for e in calls)
        span = ok[-1] - ok[0] if len(ok) > 1 else float("nan")
        rates.append(KeyRate(key, len(ok), refused, span, (len(ok) - 1) / span * window_s))
    return rates
