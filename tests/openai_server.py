"""A minimal OpenAI-compatible chat-completions server on 127.0.0.1, scripted by each test.

Until libs/devtools has the shared OpenAI-compatible emulator, the openai provider's tests
drive the real ``openai`` SDK against this: ``POST /v1/chat/completions`` answers with what
the test's ``reply`` function returns for the request (a chat-completion dict, or an
aiohttp response for errors and bodies that are not JSON), and every request is logged
with the key that sent it. ``GET /v1/models/{id}`` answers as OpenAI does.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Reply = Callable[[dict[str, Any], str], dict[str, Any] | web.Response]


def completion(content: str | None, *, usage: dict[str, Any] | None = None,
               finish: str = "stop", refusal: str | None = None) -> dict[str, Any]:  # fmt: skip
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1764950400,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "finish_reason": finish,
                "message": {"role": "assistant", "content": content, "refusal": refusal},
            }
        ],
        "usage": usage or {"prompt_tokens": 500, "completion_tokens": 40, "total_tokens": 540},
    }


def error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": "error", "code": None}}
    return web.json_response(body, status=status, headers=headers)


@dataclass
class OpenAIServer:
    reply: Reply
    log: list[dict[str, Any]] = field(default_factory=list)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        key = request.headers.get("Authorization", "").removeprefix("Bearer ")
        body = await request.json()
        self.log.append({"key": key, "body": body})
        answer = self.reply(body, key)
        return answer if isinstance(answer, web.StreamResponse) else web.json_response(answer)

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        return web.json_response({"id": name, "object": "model", "created": 0, "owned_by": "t"})


@contextlib.asynccontextmanager
async def running(reply: Reply) -> AsyncIterator[tuple[OpenAIServer, str]]:
    """``async with running(reply) as (server, base_url)``; base_url ends in /v1."""
    server = OpenAIServer(reply)
    app = web.Application()
    app.router.add_post("/v1/chat/completions", server.chat)
    app.router.add_get("/v1/models/{name:.+}", server.model)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield server, f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()
