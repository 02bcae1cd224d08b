"""A minimal OpenAI-compatible chat-completions server on 127.0.0.1, scripted by each test.

Until libs/devtools has the shared OpenAI-compatible emulator, the openai provider's tests
drive the real ``openai`` SDK against this: ``POST /v1/chat/completions`` answers with what
the test's ``reply`` function returns for the request (a chat-completion dict, or an
aiohttp response for errors and bodies that are not JSON), and every request is logged
with the key that sent it. ``GET /v1/models/{id}`` answers as OpenAI does. The Batch API
(``/v1/files``, ``/v1/batches``) answers each line of an uploaded JSONL file with the same
``reply``, once the job has been polled ``polls_to_finish`` times.
"""

from __future__ import annotations

import contextlib
import json
import secrets
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
    files: dict[str, bytes] = field(default_factory=dict)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    polls_to_finish: int = 1

    async def upload(self, request: web.Request) -> web.Response:
        form = await request.post()
        upload = form["file"]
        assert form["purpose"] == "batch" and isinstance(upload, web.FileField)
        file_id = f"file-{len(self.files) + 1}"
        self.files[file_id] = upload.file.read()
        return web.json_response({
            "id": file_id, "object": "file", "bytes": len(self.files[file_id]),
            "created_at": 0, "filename": upload.filename, "purpose": "batch",
            "status": "processed",
        })  # fmt: skip

    async def create_job(self, request: web.Request) -> web.Response:
        body = await request.json()
        job_id = f"batch_{secrets.token_hex(6)}"  # unique, as OpenAI's are
        self.jobs[job_id] = {
            "id": job_id, "object": "batch", "endpoint": body["endpoint"],
            "input_file_id": body["input_file_id"], "completion_window": body["completion_window"],
            "status": "validating", "created_at": 0, "output_file_id": None,
            "error_file_id": None, "polls": 0,
            "key": request.headers.get("Authorization", "").removeprefix("Bearer "),
        }  # fmt: skip
        return web.json_response(self._public(self.jobs[job_id]))

    async def get_job(self, request: web.Request) -> web.Response:
        job = self.jobs.get(request.match_info["job"])
        if job is None:
            return error(404, "No batch found")
        job["polls"] += 1
        if job["status"] in ("validating", "in_progress") and job["polls"] >= self.polls_to_finish:
            self._finish(job)
        elif job["status"] == "validating":
            job["status"] = "in_progress"
        return web.json_response(self._public(job))

    async def cancel_job(self, request: web.Request) -> web.Response:
        job = self.jobs[request.match_info["job"]]
        job["status"] = "cancelled"
        return web.json_response(self._public(job))

    async def content(self, request: web.Request) -> web.Response:
        return web.Response(body=self.files[request.match_info["file"]])

    def _finish(self, job: dict[str, Any]) -> None:
        out = []
        for raw in self.files[job["input_file_id"]].splitlines():
            line = json.loads(raw)
            self.log.append({"key": job["key"], "body": line["body"], "job": job["id"]})
            answer = self.reply(line["body"], job["key"])
            response = (
                {"status_code": answer.status, "body": json.loads(answer.text or "{}")}
                if isinstance(answer, web.Response)
                else {"status_code": 200, "body": answer}
            )
            out.append({"id": "r", "custom_id": line["custom_id"], "response": response,
                        "error": None})  # fmt: skip
        file_id = f"file-{len(self.files) + 1}"
        self.files[file_id] = "".join(json.dumps(o) + "\n" for o in out).encode()
        job |= {"status": "completed", "output_file_id": file_id}

    @staticmethod
    def _public(job: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in job.items() if k not in ("polls", "key")}

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
    app.router.add_post("/v1/files", server.upload)
    app.router.add_get("/v1/files/{file}/content", server.content)
    app.router.add_post("/v1/batches", server.create_job)
    app.router.add_get("/v1/batches/{job}", server.get_job)
    app.router.add_post("/v1/batches/{job}/cancel", server.cancel_job)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield server, f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()
