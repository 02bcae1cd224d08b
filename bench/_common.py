"""Shared plumbing of the benchmarks: machine description, corpus cache, a loopback image
server in its own process, scratch databases."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import platform
import secrets
import socket
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg

from imagestream.common import messages, streams
from imagestream.common.keys import Keys
from imagestream.devtools.processes import Service

CACHE = Path(__file__).parent / ".cache"
ADMIN_DSN = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kib / 1024 / 1024:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{model}, {os.cpu_count()} cores{mem}, Python {platform.python_version()}, {platform.system()} {platform.release()}"


def table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


async def wait_alive(redis: Any, keys: Keys, stages: list[str], timeout_s: float = 120) -> None:
    """Wait until a heartbeat of every stage in ``stages`` is in Redis (one entry per
    process: ``["fetcher", "fetcher"]`` waits for two fetchers): the services have started
    and connected, so start-up is outside what is measured next."""
    wanted = Counter(stages)
    deadline = time.monotonic() + timeout_s
    while True:
        names = [k.decode() async for k in redis.scan_iter(match=keys.alive_pattern())]
        alive = Counter(name.split(":")[-2] for name in names)
        if all(alive[stage] >= n for stage, n in wanted.items()):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"services not alive after {timeout_s} s: {dict(alive)}")
        await asyncio.sleep(0.2)


async def submit_and_wait(redis: Any, pool: asyncpg.Pool, keys: Keys, batch_id: Any) -> Any:
    """Submit a batch whose list is stored to its pipeline, wait until it is neither queued
    nor running, and return its ledger row."""
    submitted = messages.BatchSubmitted(batch_id=str(batch_id))
    await streams.append(redis, keys.batches, [messages.encode(submitted)])
    while True:
        row = await pool.fetchrow("SELECT * FROM batches WHERE id = $1", batch_id)
        assert row is not None
        if row["state"] not in ("queued", "running"):
            return row
        await asyncio.sleep(0.1)


def cpu_by_stage(services: list[Service]) -> dict[str, float]:
    """CPU seconds used so far by the services, summed by stage."""
    used: dict[str, float] = defaultdict(float)
    for service in services:
        used[service.stage] += service.cpu_seconds()
    return dict(used)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def corpus_dir(name: str) -> Path:
    path = CACHE / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(directory: str, port: int, ready: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    from aiohttp import web

    files = {p.name: p.read_bytes() for p in Path(directory).iterdir() if p.is_file()}

    async def handle(request: web.Request) -> web.Response:
        body = files.get(request.match_info["name"])
        if body is None:
            return web.Response(status=404)
        return web.Response(body=body, content_type="image/jpeg")

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/{name}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
        ready.set()
        await asyncio.Event().wait()

    import uvloop

    uvloop.run(main())


@contextmanager
def serve_directory(directory: Path, processes: int = 1) -> Iterator[str]:
    """Serve the files of ``directory`` on 127.0.0.1 from separate processes (SO_REUSEPORT
    is not needed: each process gets its own port, and URLs alternate between them)."""
    ctx = multiprocessing.get_context("spawn")
    procs = []
    ports = []
    for _ in range(processes):
        port = free_port()
        ready = ctx.Event()
        proc = ctx.Process(target=_serve, args=(str(directory), port, ready), daemon=True)
        proc.start()
        if not ready.wait(60):
            raise RuntimeError("image server did not start")
        procs.append(proc)
        ports.append(port)
    try:
        yield ",".join(f"http://127.0.0.1:{p}" for p in ports)
    finally:
        for proc in procs:
            proc.terminate()
            proc.join(5)


@contextmanager
def scratch_database() -> Iterator[str]:
    name = f"imagestream_bench_{secrets.token_hex(4)}"

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(ADMIN_DSN)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run(f'CREATE DATABASE "{name}"'))
    try:
        yield ADMIN_DSN.rsplit("/", 1)[0] + f"/{name}"
    finally:
        asyncio.run(run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
