"""A webhook receiver on 127.0.0.1 for tests: it checks every request with the reference
verifier (the ``standardwebhooks`` package), answers 500 to its first ``fail_first``
requests, can be taken down (not listening) and brought back on the same port, and keeps
what it accepted in arrival order."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from .procs import free_port


@dataclass
class Received:
    webhook_id: str
    body: dict[str, Any]


@dataclass
class Receiver:
    secret: str
    fail_first: int = 0
    #: Keep the first request waiting (after reading it) until ``release`` is set.
    hold_first: bool = False
    held: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = field(default_factory=free_port)
    #: Every request that verified and was answered 2xx, in arrival order.
    accepted: list[Received] = field(default_factory=list)
    #: Requests answered 500 (on purpose), and those whose signature did not verify.
    refused: int = 0
    forged: int = 0
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            parsed = Webhook(self.secret).verify(body, dict(request.headers))
        except WebhookVerificationError:
            self.forged += 1
            return web.Response(status=401)
        if self.hold_first and not self.held.is_set():
            self.held.set()
            await self.release.wait()
        if self.refused < self.fail_first:
            self.refused += 1
            return web.Response(status=500)
        self.accepted.append(Received(request.headers["webhook-id"], parsed))
        return web.Response(status=204)

    async def up(self) -> None:
        app = web.Application()
        app.router.add_post("/hooks", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def down(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def unique(self) -> list[Received]:
        """What arrived, repeats of a webhook-id dropped (as a receiver dedupes)."""
        seen: set[str] = set()
        kept = []
        for item in self.accepted:
            if item.webhook_id not in seen:
                seen.add(item.webhook_id)
                kept.append(item)
        return kept


@contextlib.asynccontextmanager
async def receiving(
    secret: str, *, fail_first: int = 0, hold_first: bool = False
) -> AsyncIterator[Receiver]:
    receiver = Receiver(secret, fail_first, hold_first)
    await receiver.up()
    try:
        yield receiver
    finally:
        receiver.release.set()
        await receiver.down()
