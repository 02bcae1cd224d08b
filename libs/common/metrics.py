"""Prometheus plumbing shared by every service.

Each metric is defined beside the code that moves it (``imagestream_<thing>_<unit>``,
``_total`` on counters, labels limited to stage/outcome/error class). This module only
serves the default registry and the health endpoints of a stage process.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, generate_latest

log = logging.getLogger(__name__)

ReadyCheck = Callable[[], Awaitable[bool]]


async def metrics_handler(_: web.Request) -> web.Response:
    body = generate_latest(REGISTRY)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def health_routes(ready: ReadyCheck) -> list[web.RouteDef]:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        ok = await ready()
        return web.json_response({"ready": ok}, status=200 if ok else 503)

    return [
        web.get("/metrics", metrics_handler),
        web.get("/healthz", healthz),
        web.get("/readyz", readyz),
    ]


async def start_metrics_server(
    port: int,
    ready: ReadyCheck,
    host: str = "0.0.0.0",  # noqa: S104 - scraped from outside the container
) -> web.AppRunner | None:
    """Serve /metrics, /healthz and /readyz for a stage process; port -1 disables it."""
    if port < 0:
        return None
    app = web.Application()
    app.add_routes(health_routes(ready))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    log.info("metrics endpoint listening", extra={"port": site._server.sockets[0].getsockname()[1]})  # type: ignore[union-attr]
    return runner


# Shared by every stage: what happened to each item there. Error class is one of the
# closed set in errors.py (bounded), or "" when the item went on.
ITEM_OUTCOMES = Counter(
    "imagestream_stage_items_total",
    "Items a stage finished with, by outcome (forwarded, succeeded, failed, skipped, "
    "requeued, cancelled) and error class.",
    ["stage", "outcome", "error_class"],
)
