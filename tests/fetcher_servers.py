"""A raw HTTP/1.1 server on a loopback address for the fetcher's tests: every byte of a
reply is under the test's control (lying or missing Content-Length, gzip bombs, bodies
that trickle forever, stalls), which a regular web framework would tidy up."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

#: Writes a whole reply (status line, headers, body) for a request.
Handler = Callable[[asyncio.StreamWriter], Awaitable[None]]


def _head(status: int, headers: Mapping[str, str]) -> bytes:
    lines = [
        f"HTTP/1.1 {status} X",
        "Connection: close",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def reply(
    body: bytes,
    *,
    status: int = 200,
    content_type: str = "image/jpeg",
    headers: Mapping[str, str] | None = None,
    length: int | None = -1,
) -> Handler:
    """A plain reply; ``length`` -1 = the true Content-Length, None = no Content-Length
    (the body ends when the connection closes), another number = a lie."""

    async def handler(writer: asyncio.StreamWriter) -> None:
        fields = {"Content-Type": content_type, **(headers or {})}
        if length is not None:
            fields["Content-Length"] = str(len(body) if length == -1 else length)
        writer.write(_head(status, fields) + body)
        await writer.drain()

    return handler


def gzipped(body: bytes, content_type: str = "image/jpeg") -> Handler:
    """``body`` sent gzip-compressed, with Content-Encoding: gzip."""
    return reply(
        gzip.compress(body, 9), content_type=content_type, headers={"Content-Encoding": "gzip"}
    )


def chunked(body: bytes, chunk: int = 64 * 1024) -> Handler:
    """``body`` with Transfer-Encoding: chunked (no length known in advance)."""

    async def handler(writer: asyncio.StreamWriter) -> None:
        writer.write(_head(200, {"Content-Type": "image/jpeg", "Transfer-Encoding": "chunked"}))
        for start in range(0, len(body), chunk):
            part = body[start : start + chunk]
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    return handler


def trickle(start: bytes, every_s: float) -> Handler:
    """``start``, then one more byte every ``every_s`` seconds, forever (slow-loris)."""

    async def handler(writer: asyncio.StreamWriter) -> None:
        writer.write(_head(200, {"Content-Type": "image/jpeg"}) + start)
        while True:
            await writer.drain()
            await asyncio.sleep(every_s)
            writer.write(b"\x00")

    return handler


def stall() -> Handler:
    """Headers, then silence (a server that stopped sending)."""

    async def handler(writer: asyncio.StreamWriter) -> None:
        writer.write(_head(200, {"Content-Type": "image/jpeg", "Content-Length": "100000"}))
        await writer.drain()
        await asyncio.sleep(3600)

    return handler


def redirect(location: str, status: int = 302) -> Handler:
    return reply(b"", status=status, content_type="text/plain", headers={"Location": location})


def delayed(handler: Handler, seconds: float) -> Handler:
    """``handler`` after a pause (requests overlap, to observe concurrency)."""

    async def wrapped(writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(seconds)
        await handler(writer)

    return wrapped


@dataclass
class RawServer:
    routes: dict[str, Handler | list[Handler]]
    host: str = "127.0.0.2"
    port: int = 0
    #: Requests per path, and (path, monotonic time) of each request in arrival order.
    hits: Counter[str] = field(default_factory=Counter)
    log: list[tuple[str, float]] = field(default_factory=list)
    active: int = 0
    max_active: int = 0
    user_agents: set[str] = field(default_factory=set)
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()

    def url(self, path: str, host: str | None = None) -> str:
        return f"http://{host or self.host}:{self.port}/{path}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            path = request_line.split(" ")[1].lstrip("/")
            for line in header_lines:
                name, _, value = line.partition(":")
                if name.lower() == "user-agent":
                    self.user_agents.add(value.strip())
            self.hits[path] += 1
            self.log.append((path, time.monotonic()))
            route = self.routes.get(path)
            if isinstance(route, list):  # one handler per request, the last one repeats
                route = route[min(self.hits[path], len(route)) - 1]
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            try:
                await (route or reply(b"not found", status=404, content_type="text/plain"))(writer)
            finally:
                self.active -= 1
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client gave up (what several tests provoke), or the server stops
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
