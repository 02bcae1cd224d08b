"""The api on a real port in the test's process, optionally with the four pipeline stages
running beside it (as ``imagestream up`` runs them), against the real Redis/PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web

from imagestream.api.app import create_app
from imagestream.api.settings import ApiSettings
from imagestream.cli import pipeline
from imagestream.common import settings, tokens
from imagestream.common.connections import Resources, redis_client
from imagestream.common.keys import Keys

from .procs import free_port, service_env


@dataclass
class Api:
    base: str
    app: web.Application
    res: Resources
    admin: str
    viewer: str

    def headers(self, token: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"} if token else {}

    def session(self, token: str | None = None) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(self.base, headers=self.headers(token))


@contextlib.asynccontextmanager
async def running_api(
    redis_url: str,
    database_url: str,
    pool: asyncpg.Pool,
    *,
    stages: bool = False,
    **env: str,
) -> AsyncIterator[Api]:
    """An api (and, with ``stages``, ingest/fetcher/analyzer/writer) on its own key prefix."""
    prefix = f"api{secrets.token_hex(4)}"
    values = service_env(
        redis_url, database_url, prefix, API_HOST="127.0.0.1", LIVE_INTERVAL_S="0.25", **env
    )
    config: ApiSettings = settings.load(ApiSettings, values)
    redis = redis_client(redis_url)
    res = Resources(redis, pool, Keys(prefix))
    app = create_app(res, config)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    stop = asyncio.Event()
    workers: asyncio.Task[None] | None = None
    if stages:
        configured = pipeline.load_all(values, pipeline.PIPELINE)
        workers = asyncio.create_task(pipeline.run_stages(res, configured, stop))
    suffix = secrets.token_hex(3)
    _, admin = await tokens.create(pool, f"admin-{suffix}", "admin")
    _, viewer = await tokens.create(pool, f"viewer-{suffix}", "viewer")
    try:
        yield Api(f"http://127.0.0.1:{port}", app, res, admin, viewer)
    finally:
        stop.set()
        await runner.cleanup()
        if workers is not None:
            await asyncio.wait_for(workers, timeout=30)
        async for key in redis.scan_iter(match=f"{prefix}:*", count=1000):
            await redis.delete(key)
        await redis.aclose()


async def upload(
    api: Api,
    data: bytes,
    *,
    filename: str = "urls.csv",
    token: str | None = None,
    **fields: str,
) -> tuple[int, Any]:
    form = aiohttp.FormData()
    form.add_field("file", data, filename=filename, content_type="application/octet-stream")
    for name, value in fields.items():
        form.add_field(name, value)
    async with (
        api.session(token or api.admin) as http,
        http.post("/api/v1/batches", data=form) as r,
    ):
        return r.status, await r.json()
