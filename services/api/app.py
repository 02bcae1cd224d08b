"""The REST API (aiohttp): batches, status, results, controls, health and metrics.

Every error is JSON ``{"error": {"code": ..., "message": ...}}`` with its HTTP status.
Every /api/v1 call needs a bearer token (``viewer`` reads, ``admin`` changes), unless
``AUTH_DISABLED=true`` was set explicitly.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
from aiohttp import BodyPartReader, web
from redis.asyncio import Redis

from imagestream.common import control, export, ledger, messages, streams, tokens
from imagestream.common.connections import Resources
from imagestream.common.inputs import InputError, ListParser
from imagestream.common.metrics import metrics_handler
from imagestream.common.settings import CommonSettings

log = logging.getLogger(__name__)

ANALYZERS = ("local", "gemini")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiSettings(CommonSettings, kw_only=True, frozen=True):
    api_host: str = "0.0.0.0"  # noqa: S104 - a service listens on all interfaces
    api_port: int = 5001
    #: Largest accepted upload (bytes); uploads stream, so this can be large.
    max_upload_bytes: int = 2 * 1024**3
    #: Turn token checks off (only for a trusted, local setup).
    auth_disabled: bool = False
    #: Analyzer of batches that do not name one.
    analyzer: str = "local"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.analyzer not in ANALYZERS:
            raise ValueError(f"ANALYZER must be one of {', '.join(ANALYZERS)}")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response(
        {"error": {"code": code, "message": message}}, status=status, dumps=_dumps
    )


def _dumps(value: Any) -> str:
    return orjson.dumps(value, default=str).decode()


def json_response(value: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(value, default=str), status=status, content_type="application/json"
    )


# ---------------------------------------------------------------- middleware
_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 409: "conflict", 413: "payload_too_large",
               415: "unsupported_media_type"}  # fmt: skip


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.message)
    except ledger.NotFound as exc:
        return error_response(404, "not_found", str(exc))
    except ledger.Conflict as exc:
        return error_response(409, "conflict", str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "error")
        return error_response(exc.status, code, exc.reason or code)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error", extra={"path": request.path})
        return error_response(500, "internal_error", "internal error; see the api's log")


@dataclass
class Auth:
    pool: asyncpg.Pool
    disabled: bool
    ttl_s: float = 30.0

    def __post_init__(self) -> None:
        self._cache: dict[str, tuple[float, tokens.TokenInfo]] = {}

    async def identify(self, request: web.Request) -> tokens.TokenInfo:
        header = request.headers.get("Authorization", "")
        scheme, _, secret = header.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise ApiError(
                401, "unauthorized", "missing bearer token (Authorization: Bearer <token>)"
            )
        secret = secret.strip()
        now = time.monotonic()
        cached = self._cache.get(secret)
        if cached and now - cached[0] < self.ttl_s:
            return cached[1]
        info = await tokens.verify(self.pool, secret)
        if info is None:
            raise ApiError(401, "unauthorized", "invalid or revoked token")
        if len(self._cache) > 1000:
            self._cache.clear()
        self._cache[secret] = (now, info)
        return info


def auth_middleware(auth: Auth) -> Any:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/api/") and not auth.disabled:
            info = await auth.identify(request)
            if request.method not in ("GET", "HEAD", "OPTIONS") and info.role != "admin":
                raise ApiError(403, "forbidden", "this call needs an admin token")
            request["token"] = info
        return await handler(request)

    return middleware


# ---------------------------------------------------------------- progress
class RateTracker:
    """Items per second per batch over the last minute, from the counters we serve."""

    def __init__(self, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self._samples: dict[uuid.UUID, list[tuple[float, int]]] = {}

    def rate(self, batch_id: uuid.UUID, done: int, fallback: float) -> float:
        now = time.monotonic()
        samples = self._samples.setdefault(batch_id, [])
        samples.append((now, done))
        while len(samples) > 2 and now - samples[0][0] > self.window_s:
            samples.pop(0)
        t0, d0 = samples[0]
        if now - t0 >= 2.0:
            return max(0.0, (done - d0) / (now - t0))
        return fallback


def batch_json(row: asyncpg.Record) -> dict[str, Any]:
    done = row["succeeded"] + row["failed"] + row["skipped"] + row["cancelled"]
    total = row["total"]
    return {
        "id": str(row["id"]),
        "name": row["name"],
        "state": row["state"],
        "state_reason": row["state_reason"],
        "analyzer": row["analyzer"],
        "profile": row["profile"],
        "model": row["model"],
        "source_name": row["source_name"],
        "source_format": row["source_format"],
        "ingested": row["ingested"],
        "counts": {
            "total": total,
            "succeeded": row["succeeded"],
            "failed": row["failed"],
            "skipped": row["skipped"],
            "cancelled": row["cancelled"],
            "remaining": max(0, total - done),
            "duplicates": row["duplicates"],
            "invalid": row["invalid"],
        },
        "progress": round(100.0 * done / total, 2)
        if total
        else (100.0 if row["ingested"] else 0.0),
        "tokens": {"input": row["input_tokens"], "output": row["output_tokens"]},
        "cost_usd": float(row["cost_usd"]),
        "budget_usd": float(row["budget_usd"]) if row["budget_usd"] is not None else None,
        "created_at": row["created_at"].isoformat(),
        "started_at": row["started_at"].isoformat() if row["started_at"] else None,
        "finished_at": row["finished_at"].isoformat() if row["finished_at"] else None,
    }


# ---------------------------------------------------------------- handlers
class Api:
    def __init__(self, res: Resources, settings: ApiSettings) -> None:
        self.res = res
        self.settings = settings
        self.rates = RateTracker()

    @property
    def pool(self) -> asyncpg.Pool:
        return self.res.pool

    @property
    def redis(self) -> Redis:
        return self.res.redis

    def batch_id(self, request: web.Request) -> uuid.UUID:
        return ledger.parse_batch_id(request.match_info["batch_id"])

    # -- batches
    async def create_batch(self, request: web.Request) -> web.Response:
        limit = self.settings.max_upload_bytes
        if request.content_length is not None and request.content_length > limit + 64 * 1024:
            raise ApiError(
                413, "payload_too_large", f"upload larger than the limit of {limit} bytes"
            )
        if not request.content_type.startswith("multipart/"):
            raise ApiError(
                415, "unsupported_media_type", "send multipart/form-data with a 'file' field"
            )
        reader = await request.multipart()
        fields: dict[str, str] = {}
        async with self.pool.acquire() as conn, conn.transaction():
            batch_id = await ledger.create_batch(
                conn, ledger.NewBatch(name="upload", pipeline=self.res.keys.prefix)
            )
            got_file = False
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):
                    continue
                if part.name == "file":
                    if got_file:
                        raise ApiError(400, "bad_request", "send one 'file' per batch")
                    got_file = True
                    fields["source_name"] = part.filename or "upload"
                    await self._store_upload(conn, batch_id, part, fields["source_name"], limit)
                elif part.name:
                    fields[part.name] = (await part.read(decode=True)).decode("utf-8", "replace")[
                        :1000
                    ]
            if not got_file:
                raise ApiError(400, "bad_request", "the form has no 'file' field")
            options = self._batch_options(fields)
            await conn.execute(
                """
                UPDATE batches SET name = $2, analyzer = $3, profile = $4, model = $5,
                       budget_usd = $6, source_name = $7, options = $8
                WHERE id = $1
                """,
                batch_id,
                options["name"],
                options["analyzer"],
                options["profile"],
                options["model"],
                options["budget_usd"],
                fields["source_name"],
                {},
            )
        await streams.append(
            self.redis,
            self.res.keys.batches,
            [messages.encode(messages.BatchSubmitted(batch_id=str(batch_id)))],
        )
        row = await ledger.batch(self.pool, batch_id)
        return json_response(batch_json(row), status=201)

    def _batch_options(self, fields: dict[str, str]) -> dict[str, Any]:
        name = (fields.get("batch_name") or fields.get("name") or fields["source_name"]).strip()
        analyzer = (fields.get("analyzer") or self.settings.analyzer).strip()
        if analyzer not in ANALYZERS:
            raise ApiError(400, "bad_request", f"analyzer must be one of {', '.join(ANALYZERS)}")
        budget: float | None = None
        if fields.get("budget_usd"):
            try:
                budget = float(fields["budget_usd"])
            except ValueError:
                raise ApiError(400, "bad_request", "budget_usd must be a number") from None
            if budget <= 0:
                raise ApiError(400, "bad_request", "budget_usd must be > 0")
        return {
            "name": name[:200] or "upload",
            "analyzer": analyzer,
            "profile": fields.get("profile") or None,
            "model": fields.get("model") or None,
            "budget_usd": budget,
        }

    async def _store_upload(
        self,
        conn: asyncpg.Connection,
        batch_id: uuid.UUID,
        part: BodyPartReader,
        name: str,
        limit: int,
    ) -> None:
        """Store the file in parts as it arrives; the head is checked before anything else."""
        parser = ListParser(filename=name)
        size = 0
        index = 0
        buffer = bytearray()
        checked = False
        while chunk := await part.read_chunk(256 * 1024):
            size += len(chunk)
            if size > limit:
                raise ApiError(
                    413, "payload_too_large", f"upload larger than the limit of {limit} bytes"
                )
            buffer += chunk
            if not checked and len(buffer) >= 64 * 1024:
                self._check_head(parser, bytes(buffer))
                checked = True
            if len(buffer) >= 1024 * 1024:
                await ledger.store_upload_part(conn, batch_id, index, bytes(buffer))
                index += 1
                buffer.clear()
        if not checked:
            self._check_head(parser, bytes(buffer))
        if buffer:
            await ledger.store_upload_part(conn, batch_id, index, bytes(buffer))

    @staticmethod
    def _check_head(parser: ListParser, head: bytes) -> None:
        try:
            parser.feed(head)
            parser.close()
        except InputError as exc:
            raise ApiError(400, "bad_request", f"cannot read the list: {exc}") from None

    async def list_batches(self, request: web.Request) -> web.Response:
        limit = _int_param(request, "limit", 50, 1, 500)
        offset = _int_param(request, "offset", 0, 0, 10**9)
        state = request.query.get("state")
        rows = await ledger.list_batches(self.pool, limit=limit, offset=offset, state=state)
        return json_response(
            {"batches": [batch_json(r) for r in rows], "limit": limit, "offset": offset}
        )

    async def get_batch(self, request: web.Request) -> web.Response:
        return json_response(batch_json(await ledger.batch(self.pool, self.batch_id(request))))

    async def status(self, request: web.Request) -> web.Response:
        batch_id = self.batch_id(request)
        row = await ledger.batch(self.pool, batch_id)
        body = batch_json(row)
        counts = body["counts"]
        done = counts["total"] - counts["remaining"]
        started = row["started_at"]
        elapsed = (
            (row["finished_at"] or datetime.datetime.now(datetime.UTC)) - started
            if started
            else None
        )
        average = done / elapsed.total_seconds() if elapsed and elapsed.total_seconds() > 0 else 0.0
        rate = average if row["finished_at"] else self.rates.rate(batch_id, done, average)
        body["rate_per_s"] = round(rate, 3)
        body["eta_s"] = (
            round(counts["remaining"] / rate, 1) if rate > 0 and counts["remaining"] else None
        )
        body["errors"] = await ledger.error_counts(self.pool, batch_id)
        return json_response(body)

    async def results(self, request: web.Request) -> web.StreamResponse:
        batch_id = self.batch_id(request)
        fmt = request.query.get("format", "csv")
        if fmt not in export.FORMATS:
            raise ApiError(400, "bad_request", f"format must be one of {', '.join(export.FORMATS)}")
        return await self._export(request, batch_id, fmt)

    async def legacy_export(self, request: web.Request) -> web.StreamResponse:
        """The old system's export path: /api/v1/batch-data/export?format=csv&batch_id=..."""
        if "batch_id" not in request.query:
            raise ApiError(400, "bad_request", "batch_id is required")
        batch_id = ledger.parse_batch_id(request.query["batch_id"])
        fmt = request.query.get("format", "csv")
        if fmt not in export.FORMATS:
            raise ApiError(400, "bad_request", f"format must be one of {', '.join(export.FORMATS)}")
        return await self._export(request, batch_id, fmt)

    async def _export(
        self, request: web.Request, batch_id: uuid.UUID, fmt: export.ExportFormat
    ) -> web.StreamResponse:
        row = await ledger.batch(self.pool, batch_id)
        filters = export.Filters(
            states=_list_param(request, "state"), error_classes=_list_param(request, "error_class")
        )
        shape = export.layout(row["metadata_columns"], row["analysis_columns"])
        response = web.StreamResponse(
            headers={
                "Content-Type": export.MEDIA_TYPES[fmt],
                "Content-Disposition": f'attachment; filename="batch-{batch_id}.{fmt}"',
            }
        )
        await response.prepare(request)
        rows = export.records(self.pool, batch_id, shape, filters)
        async for piece in export.encode(rows, shape.columns, fmt):
            await response.write(piece)
        await response.write_eof()
        return response

    # -- controls
    async def pause(self, request: web.Request) -> web.Response:
        batch_id = self.batch_id(request)
        state = await ledger.pause_batch(self.pool, batch_id, "paused by user")
        await control.set_halted(self.redis, self.res.keys, str(batch_id), "paused")
        return json_response({"id": str(batch_id), "state": state})

    async def resume(self, request: web.Request) -> web.Response:
        batch_id = self.batch_id(request)
        state = await ledger.resume_batch(self.pool, batch_id)
        await control.set_halted(self.redis, self.res.keys, str(batch_id), None)
        return json_response({"id": str(batch_id), "state": state})

    async def cancel(self, request: web.Request) -> web.Response:
        batch_id = self.batch_id(request)
        async with self.pool.acquire() as conn:
            state = await ledger.cancel_batch(conn, batch_id)
        await control.set_halted(self.redis, self.res.keys, str(batch_id), "cancelled")
        return json_response({"id": str(batch_id), "state": state})

    # -- health
    async def healthz(self, _: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def readyz(self, _: web.Request) -> web.Response:
        checks = await self.dependency_checks()
        ok = all(c["ok"] for c in checks.values())
        return json_response({"ready": ok, "checks": checks}, status=200 if ok else 503)

    async def dependency_checks(self) -> dict[str, dict[str, Any]]:
        async def timed(probe: Callable[[], Awaitable[Any]]) -> dict[str, Any]:
            started = time.perf_counter()
            try:
                await asyncio.wait_for(probe(), timeout=2.0)
            except Exception as exc:
                return {"ok": False, "error": str(exc) or type(exc).__name__}
            return {"ok": True, "latency_ms": round(1000 * (time.perf_counter() - started), 2)}

        redis_check, pg_check = await asyncio.gather(
            timed(self.redis.ping), timed(lambda: self.pool.fetchval("SELECT 1"))
        )
        return {"redis": redis_check, "postgres": pg_check}


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, "bad_request", f"{name} must be an integer") from None
    if not low <= value <= high:
        raise ApiError(400, "bad_request", f"{name} must be between {low} and {high}")
    return value


def _list_param(request: web.Request, name: str) -> list[str]:
    return [v for raw in request.query.getall(name, []) for v in raw.split(",") if v]


def create_app(res: Resources, settings: ApiSettings) -> web.Application:
    api = Api(res, settings)
    auth = Auth(res.pool, settings.auth_disabled)
    app = web.Application(middlewares=[errors_middleware, auth_middleware(auth)])
    app.add_routes(
        [
            web.post("/api/v1/batches", api.create_batch),
            web.get("/api/v1/batches", api.list_batches),
            web.get("/api/v1/batches/{batch_id}", api.get_batch),
            web.get("/api/v1/batches/{batch_id}/status", api.status),
            web.get("/api/v1/batches/{batch_id}/results", api.results),
            web.post("/api/v1/batches/{batch_id}/pause", api.pause),
            web.post("/api/v1/batches/{batch_id}/resume", api.resume),
            web.post("/api/v1/batches/{batch_id}/cancel", api.cancel),
            web.get("/api/v1/batch-data/export", api.legacy_export),
            web.get("/healthz", api.healthz),
            web.get("/readyz", api.readyz),
            web.get("/metrics", metrics_handler),
        ]
    )
    app["api"] = api
    return app


async def run(res: Resources, settings: ApiSettings, stop: asyncio.Event) -> None:
    app = create_app(res, settings)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, settings.api_host, settings.api_port)
    await site.start()
    log.info("api listening", extra={"host": settings.api_host, "port": settings.api_port})
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
