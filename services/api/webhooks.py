"""A batch's webhook events over HTTP: ``GET /api/v1/batches/{id}/webhooks`` lists them,
oldest first, each with its delivery log (every attempt: time, duration, HTTP status or
error); ``POST .../webhooks/{event_id}/redeliver`` sends one again (admins). The api
processes deliver them in the background (imagestream.common.webhooks.Deliverer)."""

from __future__ import annotations

import asyncpg
from aiohttp import web

from imagestream.common import ledger, storage, webhooks

from . import params
from .errors import ApiError, json_response


class WebhookEvents:
    def __init__(self, pool: asyncpg.Pool, deliverer: webhooks.Deliverer) -> None:
        self.pool = pool
        self.deliverer = deliverer

    async def list(self, request: web.Request) -> web.Response:
        batch_id = ledger.parse_batch_id(request.match_info["batch_id"])
        limit = params.integer(request.query, "limit", 100, 1, 1000)
        batch = await ledger.batch(self.pool, batch_id)
        events = await webhooks.batch_events(self.pool, batch_id, limit)
        return json_response(
            {
                "webhook_url": _shown(batch["webhook_url"]),
                "events": [webhooks.event_json(e, attempts) for e, attempts in events],
                "limit": limit,
            }
        )

    async def redeliver(self, request: web.Request) -> web.Response:
        batch_id = ledger.parse_batch_id(request.match_info["batch_id"])
        try:
            event_id = int(request.match_info["event_id"])
        except ValueError:
            raise ApiError(404, "no such webhook event") from None
        row = None
        if 0 < event_id < 2**63:
            row = await webhooks.redeliver(self.pool, batch_id, event_id, self.deliverer.pipeline)
        if row is None:
            raise ApiError(404, f"no webhook event {event_id} in batch {batch_id}")
        self.deliverer.wake.set()
        return json_response(webhooks.event_json(row, []), status=202)


def _shown(url: str | None) -> str | None:
    """Without a query or user info (they may hold the receiver's credential)."""
    return storage.shown_url(url) if url else None
