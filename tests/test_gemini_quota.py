"""Two analyzer processes share one key's quota through Redis and never exceed it together.

The emulator (in this process) enforces 8 requests per 2-second window on the key and
answers 429 above it; two ``imagestream serve analyzer`` processes, each allowed to hold 6
images, analyze 24 distinct images from the analyze stream. No request may be refused, no
2-second window may see more than 8 requests, and both processes must have sent some.
"""

from __future__ import annotations

import hashlib
import io
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from PIL import Image

from imagestream.common import ledger, messages, streams
from imagestream.common.connections import Resources
from imagestream.common.inputs import Row
from imagestream.devtools.gemini_server import (
    Emulator,
    EmulatorConfig,
    LatencyConfig,
    QuotaLimits,
    running_emulator,
)

from .helpers import wait_for
from .procs import Fleet, free_port, service_env

KEY = "AIzaSy-shared-quota-key"
RPM, WINDOW_S, IMAGES = 8, 2.0, 24


def image(index: int, salt: int) -> bytes:
    img = Image.new("RGB", (64, 48), (index * 9 % 256, salt % 256, 120))
    for bit in range(32):
        img.putpixel((bit, 0), (255, 255, 255) if (salt ^ index << 20) >> bit & 1 else (0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
async def emulator() -> AsyncIterator[tuple[Emulator, str]]:
    config = EmulatorConfig(
        default_limits=QuotaLimits(rpm=RPM, tpm=None, rpd=None),
        window_seconds=WINDOW_S,
        latency=LatencyConfig(kind="fixed", median_ms=150),
    )
    async with running_emulator(config) as pair:
        yield pair


async def seed(res: Resources) -> str:
    """A gemini batch whose items wait in the analyze stream with their images in Redis."""
    batch_id = await ledger.create_batch(
        res.pool,
        ledger.NewBatch(
            name="quota", pipeline=res.keys.prefix, analyzer="gemini", profile="describe",
            model="gemini-2.5-flash-lite",
        ),
    )  # fmt: skip
    rows = [Row(line=i, url=f"http://127.0.0.1/{i}.png", metadata=None) for i in range(IMAGES)]
    async with res.pool.acquire() as conn:
        await ledger.insert_items(conn, batch_id, rows)
    ids = await res.pool.fetch(
        "UPDATE items SET state = 'analyzing' WHERE batch_id = $1 RETURNING id, line", batch_id
    )
    salt = secrets.randbits(32)
    payloads = []
    for record in sorted(ids, key=lambda r: r["line"]):
        data = image(record["line"], salt)
        sha = hashlib.sha256(data).hexdigest()
        blob = res.keys.blob(sha, 768)
        await res.redis.set(blob, data, ex=600)
        facts = messages.ImageFacts(
            width=64, height=48, format="PNG", mode="RGB", bytes=len(data), sha256=sha
        )
        task = messages.AnalyzeTask(
            batch_id=str(batch_id), item_id=record["id"], url="x", facts=facts, blob_key=blob
        )
        payloads.append(messages.encode(task))
    await streams.append(res.redis, res.keys.analyze, payloads)
    return str(batch_id)


async def ok_requests(session: aiohttp.ClientSession, port: int) -> float:
    async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
        text = await response.text()
    # Summed over projects: the labels are project="...",outcome="ok".
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("imagestream_gemini_requests_total{") and 'outcome="ok"' in line
    )


async def test_two_analyzer_processes_share_one_keys_quota(
    res: Resources,
    emulator: tuple[Emulator, str],
    redis_url: str,
    database_url: str,
    tmp_path: Path,
) -> None:
    emu, base_url = emulator
    env = service_env(
        redis_url,
        database_url,
        res.keys.prefix,
        GEMINI_API_KEYS=KEY,
        GEMINI_BASE_URL=base_url,
        GEMINI_RPM=str(RPM),
        GEMINI_TPM="0",
        GEMINI_RPD="0",
        GEMINI_QUOTA_WINDOW_S=str(WINDOW_S),
        GEMINI_QUOTA_MARGIN_S="0.3",
        GEMINI_QUOTA_BURST_S="0.5",
        ANALYZE_CONCURRENCY="6",
    )
    fleet = Fleet(env, tmp_path)
    ports = [free_port(), free_port()]
    for port in ports:
        fleet.env = {**env, "METRICS_PORT": str(port)}
        fleet.start("analyzer")
    try:

        async def both_alive() -> bool:
            found = [k async for k in res.redis.scan_iter(match=res.keys.alive("analyzer", "*"))]
            return len(found) == 2

        await wait_for(both_alive, timeout=60)
        await seed(res)

        async def all_answered() -> bool:
            return int(await res.redis.xlen(res.keys.write)) >= IMAGES

        await wait_for(all_answered, timeout=90, interval=0.2)
        async with aiohttp.ClientSession() as session:
            sent_by = [await ok_requests(session, port) for port in ports]
    finally:
        codes = fleet.stop_all()
    assert all(code == 0 for code in codes.values()), fleet.logs_text()

    entries = await res.redis.xrange(res.keys.write)
    results = [messages.result_decoder.decode(fields[b"m"]) for _, fields in entries]
    assert [r.status for r in results] == ["succeeded"] * IMAGES
    log = [e for e in emu.request_log(key=KEY) if e["method"] == "generateContent"]
    assert [e["status"] for e in log] == [200] * IMAGES  # not one 429
    stamps = sorted(float(e["t"]) for e in log)
    busiest = max(sum(s <= t < s + WINDOW_S for t in stamps) for s in stamps)
    assert busiest <= RPM
    assert all(n > 0 for n in sent_by) and sum(sent_by) == IMAGES, sent_by
