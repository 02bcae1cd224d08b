"""The api service (aiohttp): REST API, dashboard, OpenAPI document, health and metrics.

Every error is JSON ``{"error": {"code": ..., "message": ...}}`` with its HTTP status.
Every /api/v1 call needs a bearer token (``viewer`` reads and exports, ``admin`` changes
things), unless ``AUTH_DISABLED=true`` was set explicitly; the route table below says
which role each route needs. The dashboard is plain HTML/CSS/JS under ``static/``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from aiohttp import web
from prometheus_client import Counter, Histogram

from imagestream.common import webhooks
from imagestream.common.connections import Resources
from imagestream.common.metrics import metrics_handler

from . import openapi, uploads
from .auth import Auth, Need, auth_middleware, register
from .batches import Batches
from .errors import Handler, errors_middleware
from .exports import ExportJobs, ExportWorker
from .live import Feeds, Monitor, Progress, StreamHoldings
from .settings import ApiSettings
from .system import System
from .webhooks import WebhookEvents

__all__ = ["ApiSettings", "create_app", "run"]

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
#: The live-progress hub of an app (tests look at how many poll loops run).
FEEDS = web.AppKey("feeds", Feeds)

REQUESTS = Counter(
    "imagestream_api_requests_total",
    "Requests the api answered, by status class.",
    ["status_class"],
)
REQUEST_SECONDS = Histogram(
    "imagestream_api_request_duration_seconds",
    "Time to answer an api request (a streamed export or event stream: until it ends).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120),
)

# The dashboard runs only our own files: no inline script, no other origin, no framing.
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
        " connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        REQUESTS.labels(f"{status // 100}xx").inc()
        REQUEST_SECONDS.observe(time.perf_counter() - started)


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    if response.content_type == "text/html":
        for name, value in _PAGE_HEADERS.items():
            response.headers.setdefault(name, value)


def _page(name: str) -> Handler:
    async def serve(_: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / name, headers={"Cache-Control": "no-cache"})

    return serve


async def _old_status_page(_: web.Request) -> web.StreamResponse:
    """The old system's status page address."""
    raise web.HTTPFound("/#/system")


def routes(
    batches: Batches,
    exports: ExportJobs,
    hooks: WebhookEvents,
    system: System,
    settings: ApiSettings,
) -> list[tuple[web.AbstractRouteDef, Need]]:
    """Every route, with the role it needs (None: public)."""
    b, e, w, s = batches, exports, hooks, system
    early_refusal = uploads.expect_handler(settings.max_upload_bytes)
    v1 = "/api/v1"
    one = f"{v1}/batches/{{batch_id}}"
    return [
        (web.post(f"{v1}/batches", b.create, expect_handler=early_refusal), "admin"),
        (web.get(f"{v1}/batches", b.list, allow_head=False), "viewer"),
        (web.get(one, b.get, allow_head=False), "viewer"),
        (web.delete(one, b.delete), "admin"),
        (web.get(f"{one}/status", b.status, allow_head=False), "viewer"),
        (web.get(f"{one}/events", b.events, allow_head=False), "viewer"),
        (web.post(f"{one}/pause", b.pause), "admin"),
        (web.post(f"{one}/resume", b.resume), "admin"),
        (web.post(f"{one}/cancel", b.cancel), "admin"),
        (web.post(f"{one}/replay", b.replay), "admin"),
        (web.get(f"{one}/items", b.items, allow_head=False), "viewer"),
        (web.get(f"{one}/items/{{item_id}}", b.item, allow_head=False), "viewer"),
        (web.get(f"{one}/rejects", b.rejects, allow_head=False), "viewer"),
        (web.get(f"{one}/duplicates", b.duplicates, allow_head=False), "viewer"),
        (web.get(f"{one}/results", b.results, allow_head=False), "viewer"),
        (web.post(f"{one}/exports", e.create), "admin"),
        (web.get(f"{one}/exports", e.list, allow_head=False), "viewer"),
        (web.get(f"{one}/exports/{{export_id}}", e.get, allow_head=False), "viewer"),
        (web.get(f"{one}/webhooks", w.list, allow_head=False), "viewer"),
        (web.post(f"{one}/webhooks/{{event_id}}/redeliver", w.redeliver), "admin"),
        (web.get(f"{v1}/batch-data/export", b.legacy_export, allow_head=False), "viewer"),
        (web.post(f"{v1}/downloads", b.create_download), "viewer"),
        (web.get(f"{v1}/downloads/{{ticket}}", b.download, allow_head=False), None),
        (web.get(f"{v1}/session", s.session, allow_head=False), "viewer"),
        (web.get(f"{v1}/system", s.status, allow_head=False), "viewer"),
        (web.get(f"{v1}/dead", s.dead, allow_head=False), "viewer"),
        (web.post(f"{v1}/dead/replay", s.replay_dead), "admin"),
        (web.post(f"{v1}/dead/discard", s.discard_dead), "admin"),
        (web.get(f"{v1}/tokens", s.list_tokens, allow_head=False), "admin"),
        (web.post(f"{v1}/tokens", s.create_token), "admin"),
        (web.delete(f"{v1}/tokens/{{token_id}}", s.revoke_token), "admin"),
        (web.get(f"{v1}/openapi.json", openapi.handler, allow_head=False), None),
        (web.get("/api/docs", _page("docs.html"), allow_head=False), None),
        (web.get("/healthz", s.healthz, allow_head=False), None),
        (web.get("/readyz", s.readyz, allow_head=False), None),
        (web.get("/metrics", metrics_handler, allow_head=False), None),
        (web.get("/", _page("index.html"), allow_head=False), None),
        (web.get("/system/status", _old_status_page, allow_head=False), None),
        (web.static("/static", STATIC, append_version=False), None),
    ]


def create_app(res: Resources, settings: ApiSettings) -> web.Application:
    auth = Auth(res.pool, settings.auth_disabled)
    progress = Progress(res.pool, StreamHoldings(res.redis))
    monitor = Monitor(res.redis, res.keys)
    feeds = Feeds(progress, monitor, settings.live_interval_s)
    app = web.Application(
        middlewares=[
            metrics_middleware,
            errors_middleware,
            auth_middleware(auth),
            openapi.query_guard,
        ]
    )
    worker = ExportWorker(res.pool, res.keys.prefix, settings)
    batches = Batches(res, settings, progress, feeds)
    exports = ExportJobs(res.pool, settings, worker)
    # The api processes deliver the deployment's webhook events (one lease per event, so
    # replicas never send one concurrently).
    deliverer = webhooks.Deliverer(res.pool, res.keys.prefix, settings.webhook_delivery())
    hooks = WebhookEvents(res.pool, deliverer)
    register(app, routes(batches, exports, hooks, System(res, auth, monitor), settings))
    app.on_startup.append(worker.start)
    app.on_shutdown.append(worker.stop)

    async def start_deliverer(_: web.Application) -> None:
        await deliverer.start()

    async def stop_deliverer(_: web.Application) -> None:
        await deliverer.stop()

    app.on_startup.append(start_deliverer)
    app.on_shutdown.append(stop_deliverer)
    app.on_response_prepare.append(_security_headers)
    app[FEEDS] = feeds

    async def close_feeds(_: web.Application) -> None:
        await feeds.close()

    app.on_shutdown.append(close_feeds)
    return app


async def run(res: Resources, settings: ApiSettings, stop: asyncio.Event) -> None:
    app = create_app(res, settings)
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, shutdown_timeout=settings.shutdown_grace_s
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.api_host, settings.api_port)
    await site.start()
    log.info("api listening", extra={"host": settings.api_host, "port": settings.api_port})
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
