"""A 200,000-row export streams from a real api process in flat memory: the process's
resident memory, sampled while the file downloads, grows by a small fraction of the file.
(Memory, not time, is asserted: speed is bench/export.py's business.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from imagestream.common import tokens
from imagestream.devtools import ledgerfill

from .helpers import wait_ready
from .procs import Fleet, free_port, service_env

ROWS = 200_000
#: Allowed growth of the api's resident memory during one export.
GROWTH_LIMIT = 16 * 1024**2


@dataclass
class Served:
    base: str
    token: str
    pid: int


@pytest.fixture(scope="module")
async def served(
    redis_url: str, database_url: str, pool: asyncpg.Pool, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Served]:
    port = free_port()
    fleet = Fleet(
        service_env(redis_url, database_url, f"flat{port}", API_PORT=str(port)),
        tmp_path_factory.mktemp("flat"),
    )
    service = fleet.start("api")
    base = f"http://127.0.0.1:{port}"

    try:
        await wait_ready(base)
        _, secret = await tokens.create(pool, "flat-memory", "viewer")
        yield Served(base, secret, service.process.pid)
    finally:
        fleet.stop_all()


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def download(served: Served, path: str) -> tuple[int, int]:
    """(bytes received, peak resident memory of the api while sending them)."""
    peak = rss(served.pid)
    received = 0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss(served.pid))
            await asyncio.sleep(0.02)

    sampler = asyncio.ensure_future(sample())
    headers = {"Authorization": f"Bearer {served.token}"}
    try:
        async with (
            aiohttp.ClientSession(headers=headers) as http,
            http.get(served.base + path) as r,
        ):
            assert r.status == 200, await r.text()
            async for chunk in r.content.iter_chunked(256 * 1024):
                received += len(chunk)
    finally:
        done.set()
        await sampler
    return received, peak


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
async def test_200k_rows_stream_in_flat_memory(
    served: Served, pool: asyncpg.Pool, fmt: str
) -> None:
    batch_id = await ledgerfill.finished_batch(pool, ROWS, pipeline="flat")
    path = f"/api/v1/batches/{batch_id}/results?format={fmt}"
    # Warm up: the same code path over a few rows, so imports and caches are in place.
    await download(served, f"{path}&field=input.sku:eq:SKU-00000001")
    baseline = rss(served.pid)
    size, peak = await download(served, path)
    assert size > 3 * GROWTH_LIMIT, size  # the file is far bigger than the allowed growth
    assert peak - baseline < GROWTH_LIMIT, (
        f"api memory grew by {(peak - baseline) / 1e6:.1f} MB for a {size / 1e6:.1f} MB export"
    )
