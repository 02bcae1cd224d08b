"""An HTTP server on loopback that serves a fixed set of responses, for tests, benchmarks
and the demo: images, errors, pages pretending to be images, slow or truncated bodies."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Reply:
    body: bytes = b""
    status: int = 200
    content_type: str = "image/jpeg"
    headers: Mapping[str, str] = field(default_factory=dict)
    #: Seconds to wait between chunks of 1 KiB (a slow server).
    drip_s: float = 0.0


@dataclass
class ImageServer:
    """Serves ``routes`` (path -> Reply) on 127.0.0.1 (or another loopback address)."""

    routes: dict[str, Reply]
    host: str = "127.0.0.1"
    hits: dict[str, int] = field(default_factory=dict)
    _runner: web.AppRunner | None = None
    base_url: str = ""

    async def start(self, port: int = 0) -> str:
        app = web.Application()
        app.router.add_get("/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, port)
        await site.start()
        bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://{self.host}:{bound}"
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        self.hits[path] = self.hits.get(path, 0) + 1
        reply = self.routes.get(path)
        if reply is None:
            return web.Response(status=404, text="not found")
        if not reply.drip_s:
            return web.Response(
                body=reply.body,
                status=reply.status,
                content_type=reply.content_type,
                headers=dict(reply.headers),
            )
        response = web.StreamResponse(
            status=reply.status, headers={"Content-Type": reply.content_type, **reply.headers}
        )
        await response.prepare(request)
        for start in range(0, len(reply.body), 1024):
            await response.write(reply.body[start : start + 1024])
            await asyncio.sleep(reply.drip_s)
        await response.write_eof()
        return response
