"""Batches: create (upload), browse, control, replay, delete; their items, validation
report, live events and exports (including the one-time download links of the dashboard)."""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import re
import secrets
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import asyncpg
import orjson
from aiohttp import web
from multidict import MultiDict
from redis.exceptions import RedisError

from imagestream.common import (
    control,
    duplicates,
    export,
    ledger,
    messages,
    storage,
    streams,
    tokens,
    webhooks,
)
from imagestream.common.connections import Resources
from imagestream.common.storage import StorageError

from . import params, uploads
from .auth import TOKEN
from .batch_fields import batch_fields
from .errors import ApiError, bad_request, json_response
from .live import Feeds, Progress, batch_json
from .settings import ApiSettings

log = logging.getLogger(__name__)

DOWNLOAD_TTL_S = 60
_DOWNLOADABLE = re.compile(
    r"^/api/v1/(?:batches/(?P<batch>[^/]+)/(?P<kind>results|rejects)|batch-data/(?P<legacy>export))$"
)


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


@dataclass(frozen=True, slots=True)
class BatchWebhook:
    url: str | None
    secret: str | None
    #: A new secret: the reply shows it, once.
    generated: bool = False


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:60] or "batch"


class Batches:
    def __init__(
        self, res: Resources, settings: ApiSettings, progress: Progress, feeds: Feeds
    ) -> None:
        self.res = res
        self.settings = settings
        self.progress = progress
        self.feeds = feeds

    @property
    def pool(self) -> asyncpg.Pool:
        return self.res.pool

    @staticmethod
    def batch_id(request: web.Request) -> uuid.UUID:
        return ledger.parse_batch_id(request.match_info["batch_id"])

    # ------------------------------------------------------------ create
    async def create(self, request: web.Request) -> web.Response:
        limit = self.settings.max_upload_bytes
        uploads.check_declared_size(request, limit)
        async with self.pool.acquire() as conn, conn.transaction():
            batch_id = await ledger.create_batch(
                conn, ledger.NewBatch(name="upload", pipeline=self.res.keys.prefix)
            )
            upload = await uploads.receive(request, conn, batch_id, limit)
            list_url = upload.fields.pop("list_url", None)
            if list_url is not None:
                upload.source_name = self._checked_list_url(list_url)
            hook = await self._webhook(
                request,
                upload.fields.pop("webhook_url", None),
                upload.fields.pop("webhook_secret", None),
            )
            fields = batch_fields(
                upload.fields,
                source_name=upload.source_name,
                default_analyzer=self.settings.analyzer,
            )
            await conn.execute(
                """
                UPDATE batches SET name = $2, analyzer = $3, profile = $4, model = $5,
                       budget_usd = $6, source_name = $7, source_format = $8, options = $9,
                       list_url = $10, webhook_url = $11, webhook_secret = $12
                WHERE id = $1
                """,
                batch_id,
                fields.name,
                fields.analyzer,
                fields.profile,
                fields.model,
                fields.budget_usd,
                upload.source_name,
                upload.format,
                fields.options,
                list_url,
                hook.url,
                hook.secret,
            )
        try:
            await streams.append(
                self.res.redis,
                self.res.keys.batches,
                [messages.encode(messages.BatchSubmitted(batch_id=str(batch_id)))],
            )
        except (RedisError, OSError) as exc:
            # The list is safe in the ledger; ingest's reconciler submits unread lists.
            log.warning(
                "could not announce the batch to ingest: %s", exc, extra={"batch": str(batch_id)}
            )
        row = await ledger.batch(self.pool, batch_id)
        body = batch_json(row) | {"upload_bytes": upload.bytes}
        if hook.generated:
            body["webhook_secret"] = hook.secret  # shown this once
        return json_response(body, status=201, headers={"Location": f"/api/v1/batches/{batch_id}"})

    def _checked_list_url(self, list_url: str) -> str:
        """The list's name, or 400: ingest will read ``list_url`` (in LIST_ALLOWED_BUCKETS,
        or a web URL that passes the address guard) with the service's credentials."""
        url = list_url.strip()
        try:
            storage.check_source(
                url,
                allowed_buckets=self.settings.list_buckets(),
                policy=self.settings.list_address_policy(),
            )
        except StorageError as exc:
            raise bad_request(f"list_url: {exc}") from None
        return (storage.file_name(url) or "list")[: uploads.MAX_NAME]

    async def _webhook(
        self, request: web.Request, url: str | None, secret: str | None
    ) -> BatchWebhook:
        """Where the batch's events go (its webhook_url, else WEBHOOK_URL) if the address
        guard lets them, and the secret that signs them: the caller's, else its token's,
        else WEBHOOK_SECRET, else a new one (returned once); 400 saying what is wrong."""
        url = url if url is not None and url.strip() else self.settings.webhook_url
        if url is None:
            if secret is not None:
                raise bad_request("webhook_secret needs a webhook_url")
            return BatchWebhook(None, None)
        try:
            url = await webhooks.check_target(url, self.settings.webhook_policy())
        except webhooks.WebhookError as exc:
            raise bad_request(f"webhook_url: {exc}") from None
        if secret is not None:
            try:
                webhooks.secret_key(secret.strip())
            except webhooks.WebhookError as exc:
                raise bad_request(f"webhook_secret: {exc}") from None
            return BatchWebhook(url, secret.strip())
        token = request.get(TOKEN)
        if token is not None and token.id:
            of_token = await tokens.webhook_secret(self.pool, token.id)
            if of_token is not None:
                return BatchWebhook(url, of_token)
        if self.settings.webhook_secret is not None:
            return BatchWebhook(url, self.settings.webhook_secret)
        return BatchWebhook(url, webhooks.new_secret(), generated=True)

    # ------------------------------------------------------------ browse
    async def list(self, request: web.Request) -> web.Response:
        query = request.query
        limit = params.integer(query, "limit", 50, 1, 500)
        offset = params.integer(query, "offset", 0, 0, 10_000_000)
        states = params.values(query, "state", params.BATCH_STATES)
        search = params.text(query, "q", 200)
        rows, total = await ledger.list_batches(
            self.pool, limit=limit, offset=offset, states=states, search=search
        )
        return json_response(
            {
                "batches": [batch_json(r) for r in rows],
                "total": total,
                "limit": limit,
                "offset": offset,
            }
        )

    async def get(self, request: web.Request) -> web.Response:
        return json_response(batch_json(await ledger.batch(self.pool, self.batch_id(request))))

    async def status(self, request: web.Request) -> web.Response:
        return json_response(await self.progress.status(self.batch_id(request)))

    async def events(self, request: web.Request) -> web.StreamResponse:
        batch_id = self.batch_id(request)
        await ledger.batch(self.pool, batch_id)  # 404 before the stream starts
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache, no-transform",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        try:
            await response.write(b"retry: 3000\n\n")
            async with contextlib.aclosing(self.feeds.subscribe(batch_id)) as messages_:
                async for message in messages_:
                    await response.write(message)
            await response.write_eof()
        except ConnectionResetError:
            # The client left (a tab closed, a script stopped reading): nothing went wrong,
            # and closing the feed above stops its poll loop once no one else watches.
            log.debug("event stream client left", extra={"batch": str(batch_id)})
        return response

    # ------------------------------------------------------------ controls
    async def _control(
        self, request: web.Request, act: Callable[[uuid.UUID], Awaitable[str]]
    ) -> web.Response:
        """Pause, resume or cancel through ``control`` (the ledger first, then Redis). If
        Redis fails after the ledger changed, the change stands (the reconciler mirrors
        it): answer with the ledger's state rather than an error."""
        batch_id = self.batch_id(request)
        try:
            state = await act(batch_id)
        except (RedisError, OSError) as exc:
            log.warning("batch state not mirrored to Redis yet: %s", exc)
            state = (await ledger.batch(self.pool, batch_id))["state"]
        return json_response({"id": str(batch_id), "state": state})

    async def pause(self, request: web.Request) -> web.Response:
        redis, keys = self.res.redis, self.res.keys
        return await self._control(
            request, lambda b: control.pause(redis, keys, self.pool, b, "paused by user")
        )

    async def resume(self, request: web.Request) -> web.Response:
        redis, keys = self.res.redis, self.res.keys
        return await self._control(request, lambda b: control.resume(redis, keys, self.pool, b))

    async def cancel(self, request: web.Request) -> web.Response:
        redis, keys = self.res.redis, self.res.keys
        return await self._control(request, lambda b: control.cancel(redis, keys, self.pool, b))

    async def replay(self, request: web.Request) -> web.Response:
        batch_id = self.batch_id(request)
        body = params.only(await params.json_body(request), "error_class", "stage")
        count = await control.replay(
            self.pool,
            batch_id,
            error_classes=params.strings(body, "error_class"),
            stages=params.strings(body, "stage"),
        )
        row = await ledger.batch(self.pool, batch_id)
        return json_response({"id": str(batch_id), "replayed": count, "state": row["state"]})

    async def delete(self, request: web.Request) -> web.Response:
        batch_id = self.batch_id(request)
        async with self.pool.acquire() as conn:
            await ledger.delete_batch(conn, batch_id)
        with contextlib.suppress(RedisError, OSError):  # the reconciler drops it anyway
            await control.set_halted(self.res.redis, self.res.keys, str(batch_id), None)
        return json_response({"id": str(batch_id), "deleted": True})

    # ------------------------------------------------------------ items
    async def items(self, request: web.Request) -> web.Response:
        batch_id = self.batch_id(request)
        query = request.query
        limit = params.integer(query, "limit", 100, 1, 1000)
        after = params.integer(query, "after", 0, 0, 2**62)
        await ledger.batch(self.pool, batch_id)
        rows = await ledger.list_items(
            self.pool,
            batch_id,
            states=params.values(query, "state", params.ITEM_STATES),
            error_classes=params.values(query, "error_class"),
            after_line=after,
            limit=limit,
        )
        items = [
            {
                "id": r["id"],
                "line": r["line"],
                "url": r["url"],
                "state": r["state"],
                "attempts": r["attempts"],
                "error_class": r["error_class"],
                "error_message": r["error_message"],
                "error_stage": r["error_stage"],
                "metadata": r["metadata"],
                "width": r["width"],
                "height": r["height"],
                "format": r["format"],
                "bytes": r["bytes"],
                "cost_usd": float(r["cost_usd"]) if r["cost_usd"] is not None else None,
                "finished_at": _iso(r["finished_at"]),
            }
            for r in rows
        ]
        following = rows[-1]["line"] if len(rows) == limit else None
        return json_response({"items": items, "limit": limit, "next_after": following})

    async def item(self, request: web.Request) -> web.Response:
        batch_id = self.batch_id(request)
        try:
            item_id = int(request.match_info["item_id"])
        except ValueError:
            raise ApiError(404, f"no item {request.match_info['item_id']!r}") from None
        if not 0 < item_id < 2**63:
            raise ApiError(404, f"no item {item_id}")
        item, result, failures = await ledger.item_detail(self.pool, batch_id, item_id)
        body: dict[str, Any] = {
            "id": item["id"],
            "batch_id": str(item["batch_id"]),
            "line": item["line"],
            "url": item["url"],
            "state": item["state"],
            "attempts": item["attempts"],
            "error_class": item["error_class"],
            "error_message": item["error_message"],
            "error_stage": item["error_stage"],
            "metadata": item["metadata"],
            "dispatched_at": _iso(item["dispatched_at"]),
            "finished_at": _iso(item["finished_at"]),
            "result": None,
            "history": [
                {
                    "stage": f["stage"],
                    "error_class": f["error_class"],
                    "message": f["message"],
                    "at": _iso(f["created_at"]),
                }
                for f in failures
            ],
        }
        if result is not None:
            body["result"] = {
                "width": result["width"],
                "height": result["height"],
                "format": result["format"],
                "mode": result["mode"],
                "bytes": result["bytes"],
                "sha256": result["sha256_hex"],
                "frames": result["frames"],
                "exif": result["exif"],
                "analyzer": result["analyzer"],
                "model": result["model"],
                "analysis": result["analysis"],
                "tokens": {
                    "input": result["input_tokens"],
                    "output": result["output_tokens"],
                    "thought": result["thought_tokens"],
                    "cached": result["cached_tokens"],
                },
                "cost_usd": float(result["cost_usd"]),
                "cache_hit": result["cache_hit"],
                "duplicate_group": result["duplicate_group"],
                "created_at": _iso(result["created_at"]),
            }
        return json_response(body)

    # ------------------------------------------------------------ near-duplicate groups
    async def duplicates(self, request: web.Request) -> web.Response:
        """The batch's groups of two or more near-duplicates, in order of their first
        item, each with its size and first members."""
        batch_id = self.batch_id(request)
        query = request.query
        limit = params.integer(query, "limit", 50, 1, 500)
        after = params.integer(query, "after", 0, 0, params.MAX_ITEM_ID)
        members = params.integer(query, "members", 10, 1, 100)
        await ledger.batch(self.pool, batch_id)
        await duplicates.finish(self.pool, batch_id, self.settings.duplicate_max_distance)
        async with self.pool.acquire() as conn:
            summary = await duplicates.summary(conn, batch_id)
            groups = await duplicates.groups_page(
                conn, batch_id, after=after, limit=limit, members=members
            )
        return json_response(
            {
                "max_distance": summary.max_distance,
                "groups": summary.groups,
                "items": summary.items,
                "pending": summary.pending,
                "duplicate_groups": groups,
                "limit": limit,
                "next_after": groups[-1]["group"] if len(groups) == limit else None,
            }
        )

    # ------------------------------------------------------------ validation report
    async def rejects(self, request: web.Request) -> web.StreamResponse:
        return await self._rejects(request, self.batch_id(request), request.query)

    async def _rejects(
        self, request: web.Request, batch_id: uuid.UUID, query: params.Query
    ) -> web.StreamResponse:
        row = await ledger.batch(self.pool, batch_id)
        fmt = query.get("format", "json")
        if fmt not in ("json", "csv"):
            raise bad_request("format must be json or csv")
        if fmt == "json":
            limit = params.integer(query, "limit", 100, 1, 1000)
            after = params.integer(query, "after", 0, 0, 2**62)
            rows = await ledger.list_rejects(self.pool, batch_id, after_line=after, limit=limit)
            return json_response(
                {
                    "rejects": [
                        {"line": r["line"], "reason": r["reason"], "raw": r["raw"]} for r in rows
                    ],
                    "total": row["invalid"],
                    "limit": limit,
                    "next_after": rows[-1]["line"] if len(rows) == limit else None,
                }
            )
        response = self._attachment(row, "rejects", export.SINKS["csv"])
        await response.prepare(request)
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\r\n")
        writer.writerow(["line", "reason", "raw"])
        after = 0
        while page := await ledger.list_rejects(self.pool, batch_id, after_line=after, limit=5000):
            for r in page:
                writer.writerow(
                    [r["line"], export.neutralize(r["reason"]), export.neutralize(r["raw"] or "")]
                )
            after = page[-1]["line"]
            await response.write(buffer.getvalue().encode())
            buffer.seek(0)
            buffer.truncate()
        await response.write(buffer.getvalue().encode())
        await response.write_eof()
        return response

    # ------------------------------------------------------------ exports
    async def results(self, request: web.Request) -> web.StreamResponse:
        return await self._export(request, self.batch_id(request), request.query)

    async def legacy_export(self, request: web.Request) -> web.StreamResponse:
        """The old system's export path: /api/v1/batch-data/export?format=csv&batch_id=..."""
        return await self._export(request, self._legacy_batch(request.query), request.query)

    @staticmethod
    def _legacy_batch(query: params.Query) -> uuid.UUID:
        if not query.get("batch_id"):
            raise bad_request("batch_id is required")
        return ledger.parse_batch_id(query["batch_id"])

    @staticmethod
    def _attachment(row: asyncpg.Record, what: str, sink: export.Sink) -> web.StreamResponse:
        name = f"{_slug(row['name'])}-{str(row['id'])[:8]}-{what}{sink.suffix}"
        return web.StreamResponse(
            headers={
                "Content-Type": sink.media_type,
                "Content-Disposition": (
                    f"attachment; filename=\"{name}\"; filename*=UTF-8''{quote(name)}"
                ),
                "Cache-Control": "no-store",
            }
        )

    async def _export(
        self, request: web.Request, batch_id: uuid.UUID, query: params.Query
    ) -> web.StreamResponse:
        sink = params.export_sink(query)
        filters = params.export_filters(query)
        row = await ledger.batch(self.pool, batch_id)
        await duplicates.finish(self.pool, batch_id, self.settings.duplicate_max_distance)
        selection = export.Selection(self.pool, batch_id, export.batch_layout(row), filters)
        response = self._attachment(row, "results", sink)
        await response.prepare(request)
        pieces = sink.write(selection)
        async with contextlib.aclosing(pieces):
            async for piece in pieces:
                await response.write(piece)
        await response.write_eof()
        return response

    # ------------------------------------------------------------ one-time download links
    async def create_download(self, request: web.Request) -> web.Response:
        """A link that downloads one export without the Authorization header (a browser's
        plain navigation), so the file streams to disk instead of through page memory.
        Single use and valid for 60 s; creating one needs a token like any read."""
        body = params.only(await params.json_body(request), "path")
        path = body.get("path")
        if not isinstance(path, str) or not path:
            raise bad_request('send {"path": "/api/v1/batches/<id>/results?format=xlsx"}')
        parts = urlsplit(path)
        match = _DOWNLOADABLE.match(parts.path)
        if parts.scheme or parts.netloc or match is None:
            raise bad_request("path must be a batch's results or rejects path, or the export path")
        query = MultiDict(parse_qsl(parts.query, keep_blank_values=True))
        batch_id = (
            self._legacy_batch(query) if match["legacy"] else ledger.parse_batch_id(match["batch"])
        )
        kind = match["kind"] or "results"
        if kind == "results":  # check now: a bad filter is a 400 here, not a broken link
            params.export_sink(query)
            params.export_filters(query)
        await ledger.batch(self.pool, batch_id)
        ticket = secrets.token_urlsafe(24)
        target = {"kind": kind, "batch_id": str(batch_id), "query": parts.query}
        await self.res.redis.set(
            self.res.keys.download(ticket), orjson.dumps(target), ex=DOWNLOAD_TTL_S
        )
        return json_response(
            {"url": f"/api/v1/downloads/{ticket}", "expires_in_s": DOWNLOAD_TTL_S}, status=201
        )

    async def download(self, request: web.Request) -> web.StreamResponse:
        ticket = request.match_info["ticket"]
        raw = await self.res.redis.getdel(self.res.keys.download(ticket))
        if raw is None:
            raise ApiError(404, "this download link has expired or was already used")
        target = orjson.loads(raw)
        batch_id = ledger.parse_batch_id(target["batch_id"])
        query = MultiDict(parse_qsl(target["query"], keep_blank_values=True))
        if target["kind"] == "rejects":
            query["format"] = "csv"
            return await self._rejects(request, batch_id, query)
        return await self._export(request, batch_id, query)
