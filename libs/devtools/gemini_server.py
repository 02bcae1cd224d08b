"""A Gemini API emulator: an aiohttp server the real google-genai SDK can be pointed at.

    client = genai.Client(api_key="k1", http_options=types.HttpOptions(
        base_url="http://127.0.0.1:PORT", api_version="v1beta"))

What the SDK sends (google-genai 3.4, read from its source and checked on the wire):
``POST /{v1beta|v1}/models/{model}:generateContent`` and ``...:countTokens``, the key in the
``x-goog-api-key`` header (the REST ``?key=`` parameter is accepted too), a JSON body whose
field names are mostly camelCase but partly snake_case where the SDK dumps its own models
(``inlineData.mime_type``, ``thinkingConfig.thinking_budget``,
``responseSchema.property_ordering``), so every field is read under both spellings.
Batch mode: ``POST .../models/{model}:batchGenerateContent`` with ``{"batch": {"displayName",
"inputConfig": {"requests": {"requests": [{"request", "metadata"}]}}}}``, then
``GET /{v}/batches/{id}`` returning a long-running Operation whose ``metadata`` is the batch
(``state: BATCH_STATE_*``, ``output.inlinedResponses.inlinedResponses``).

Keys, quota, latency, faults and the ``/_emulator/`` control endpoints (no key needed:
``GET stats`` with counters per key, project and outcome, token totals and the request log;
``GET log``, ``GET|POST config``, ``POST outcomes`` to queue the next outcomes, ``POST
reset``, ``GET health``) come from ``emulator_core``, shared with the OpenAI and Anthropic
emulators. Outcomes can be forced per request with a marker in any text part, e.g.
``[[emulate:503]]``; see ``OUTCOMES``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import orjson
from aiohttp import web

from .emulator_core import (
    MAX_BODY_BYTES,
    CoreConfig,
    EmulatorCore,
    LatencyConfig,
    add_common_arguments,
    add_control_routes,
    common_patch,
    error_middleware,
    json_response,
    read_json,
    rfc3339,
    running,
    serve_main,
    start_app,
)
from .emulator_quota import QuotaLimits
from .gemini_answers import (
    OUTCOMES,
    Usage,
    build_response,
    field_of,
    parse_request,
)
from .gemini_errors import (
    ApiError,
    bad_request,
    invalid_key_error,
    missing_key_error,
    not_found,
    quota_error,
    server_error,
    suspended_key_error,
)
from .gemini_tokens import model_generation

__all__ = [
    "OUTCOMES",
    "Emulator",
    "EmulatorConfig",
    "LatencyConfig",
    "QuotaLimits",
    "build_arg_parser",
    "create_app",
    "emulator_of",
    "main",
    "running_emulator",
    "start_emulator",
]

API_VERSIONS = frozenset({"v1", "v1beta", "v1alpha"})
_BATCH_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch"
_BATCH_OUTPUT_TYPE = (
    "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatchOutput"
)


@dataclass
class EmulatorConfig(CoreConfig):
    """The shared knobs (``CoreConfig``) and Gemini's own."""

    OUTCOMES: ClassVar[tuple[str, ...]] = OUTCOMES

    # "ceil": whole seconds rounded up ("13s", as Google formats it); "exact": milliseconds.
    retry_delay_format: Literal["ceil", "exact"] = "ceil"
    # Real 2.5 Flash/Pro and Gemini 3 think by default; off here unless asked, so token
    # counts stay predictable.
    default_thinking: bool = False


@dataclass
class _BatchJob:
    id: str
    model: str
    display_name: str
    project: str
    created_wall: float
    created_mono: float
    responses: list[dict[str, Any]]
    failed: int
    cancelled_mono: float | None = None


def _tokens(usage: Usage) -> dict[str, int]:
    return {
        "prompt": usage.prompt,
        "candidates": usage.candidates,
        "thoughts": usage.thoughts,
        "total": usage.total,
    }


class Emulator(EmulatorCore[EmulatorConfig]):
    """The Gemini API on top of the shared core; the aiohttp handlers are thin wrappers."""

    def __init__(self, config: EmulatorConfig | None = None) -> None:
        super().__init__(config or EmulatorConfig())
        self._batches: dict[str, _BatchJob] = {}

    def forget_jobs(self) -> None:
        self._batches.clear()

    def extra_stats(self) -> dict[str, Any]:
        return {"batches": len(self._batches)}

    def _authenticate(self, key: str | None) -> str:
        status = self.key_status(key)
        if status == "missing" or key is None:
            raise missing_key_error()
        if status == "invalid":
            raise invalid_key_error()
        if status == "revoked":
            raise suspended_key_error(key, self.project_of(key))
        return key

    # -- API methods -----------------------------------------------------------------------

    async def generate_content(
        self, key: str | None, model: str, body: Mapping[str, Any], *, method: str
    ) -> dict[str, Any]:
        t = time.monotonic()
        cfg = self._config
        with self.recording_errors(t=t, key=key, model=model, method=method):
            key = self._authenticate(key)
            req = parse_request(body, model)
            outcome, source = self.next_outcome(req.markers, key)
            refusal = self.admit_outcome(
                key, model, req.prompt_tokens, t, outcome=outcome, source=source
            )
            if refusal is not None:
                error = quota_error(
                    refusal.violations, model, refusal.retry_after, cfg.retry_delay_format
                )
                raise error.refused(refusal)
        with self.tracking():
            forced = source == "marker" or source.startswith("queue:")
            if outcome in ("500", "503", "504"):
                await self.fail_late(
                    server_error(outcome), t=t, key=key, model=model, method=method, source=source
                )
            body_out, usage, produced = build_response(
                req,
                outcome,
                response_id=self.new_id(),
                default_thinking=cfg.default_thinking,
                forced=forced,
            )
            delay = self.latency(usage.candidates + usage.thoughts)
            await asyncio.sleep(delay)
            self.record(
                t=t,
                key=key,
                model=model,
                method=method,
                status=200,
                outcome=produced,
                tokens=_tokens(usage),
                latency=delay,
                source=source,
            )
            return body_out

    async def count_tokens(
        self, key: str | None, model: str, body: Mapping[str, Any]
    ) -> dict[str, Any]:
        t = time.monotonic()
        with self.recording_errors(t=t, key=key, model=model, method="countTokens"):
            key = self._authenticate(key)
            inner = field_of(body, "generateContentRequest")
            req = parse_request(inner if isinstance(inner, dict) else body, model)
        usage = Usage(prompt=req.prompt_tokens)
        self.record(
            t=t,
            key=key,
            model=model,
            method="countTokens",
            status=200,
            outcome="ok",
            tokens=_tokens(usage),
            count_tokens=False,  # counting is free: it draws on no token total
        )
        return {"totalTokens": req.prompt_tokens, "promptTokensDetails": req.prompt_details()}

    def model_info(self, key: str | None, model: str) -> dict[str, Any]:
        self._authenticate(key)
        generation = model_generation(model)
        return {
            "name": f"models/{model}",
            "baseModelId": model,
            "version": "001",
            "displayName": f"{model} (emulated)",
            "description": "Served by the imagestream Gemini emulator.",
            "inputTokenLimit": 1_048_576,
            "outputTokenLimit": 65_536,
            "supportedGenerationMethods": [
                "generateContent",
                "countTokens",
                "batchGenerateContent",
            ],
            "temperature": 1,
            "topP": 0.95,
            "topK": 64,
            "thinking": generation >= 2,
        }

    # -- batch mode --

    def create_batch(self, key: str | None, model: str, body: Mapping[str, Any]) -> dict[str, Any]:
        t = time.monotonic()
        with self.recording_errors(t=t, key=key, model=model, method="batchGenerateContent"):
            key = self._authenticate(key)
            batch = body.get("batch")
            if not isinstance(batch, dict):
                raise bad_request("* BatchGenerateContentRequest.batch: batch is not specified\n")
            input_config = field_of(batch, "inputConfig") or {}
            if field_of(input_config, "fileName"):
                raise bad_request(
                    "The emulator supports inlined batch requests only, not fileName input."
                )
            requests = (input_config.get("requests") or {}).get("requests")
            if not isinstance(requests, list) or not requests:
                raise bad_request("* BatchGenerateContentRequest.batch.input_config: no requests\n")
            limit = self._config.max_concurrent_batches
            project = self.project_of(key)
            unfinished = sum(
                j.project == project
                and self._batch_state(j, t) in ("BATCH_STATE_PENDING", "BATCH_STATE_RUNNING")
                for j in self._batches.values()
            )
            if limit is not None and unfinished >= limit:
                raise ApiError(
                    429,
                    "RESOURCE_EXHAUSTED",
                    f"Too many concurrent batches: {unfinished} of at most {limit}.",
                    outcome="429",
                )
        responses: list[dict[str, Any]] = []
        failed = 0
        total = Usage()
        for line in requests:
            entry: dict[str, Any] = {}
            metadata = line.get("metadata") if isinstance(line, dict) else None
            try:
                request = line.get("request") if isinstance(line, dict) else None
                if not isinstance(request, dict):
                    raise bad_request("* InlinedRequest.request: request is not specified\n")
                req = parse_request(request, model)
                outcome, source = self.next_outcome(req.markers, key)
                self.consume(source, key)
                if outcome == "429":
                    raise ApiError(
                        429, "RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota)."
                    )
                if outcome in ("500", "503", "504"):
                    raise server_error(outcome)
                forced = source == "marker" or source.startswith("queue:")
                response, usage, _ = build_response(
                    req,
                    outcome,
                    response_id=self.new_id(),
                    default_thinking=self._config.default_thinking,
                    forced=forced,
                )
                entry["response"] = response
                total.prompt += usage.prompt
                total.candidates += usage.candidates
                total.thoughts += usage.thoughts
            except ApiError as exc:
                entry["error"] = exc.as_status()
                failed += 1
            if metadata is not None:
                entry["metadata"] = metadata
            responses.append(entry)
        batch_id = hashlib.sha256(self.new_id("batch").encode()).hexdigest()
        job = _BatchJob(
            id=batch_id[:24],
            model=model,
            display_name=str(field_of(batch, "displayName") or ""),
            project=self.project_of(key),
            created_wall=time.time(),
            created_mono=t,
            responses=responses,
            failed=failed,
        )
        self._batches[job.id] = job
        self.record(
            t=t,
            key=key,
            model=model,
            method="batchGenerateContent",
            status=200,
            outcome="ok",
            tokens=_tokens(total),
        )
        return self._batch_operation(job)

    def _batch_state(self, job: _BatchJob, now: float) -> str:
        if job.cancelled_mono is not None:
            return "BATCH_STATE_CANCELLED"
        phase = self.batch_phase(job.created_mono, now)
        return {
            "pending": "BATCH_STATE_PENDING",
            "running": "BATCH_STATE_RUNNING",
            "done": "BATCH_STATE_SUCCEEDED",
        }[phase]

    def _batch_operation(self, job: _BatchJob) -> dict[str, Any]:
        now = time.monotonic()
        state = self._batch_state(job, now)
        count = len(job.responses)
        done = state in ("BATCH_STATE_SUCCEEDED", "BATCH_STATE_CANCELLED")
        succeeded = state == "BATCH_STATE_SUCCEEDED"
        wall_now = job.created_wall + (now - job.created_mono)
        stats = {
            "requestCount": str(count),
            "successfulRequestCount": str(count - job.failed if succeeded else 0),
            "failedRequestCount": str(job.failed if succeeded else 0),
            "pendingRequestCount": str(0 if done else count),
        }
        metadata: dict[str, Any] = {
            "@type": _BATCH_TYPE,
            "model": f"models/{job.model}",
            "displayName": job.display_name,
            "createTime": rfc3339(job.created_wall),
            "updateTime": rfc3339(wall_now),
            "batchStats": stats,
            "state": state,
            "name": f"batches/{job.id}",
        }
        operation: dict[str, Any] = {"name": f"batches/{job.id}", "metadata": metadata}
        if done:
            metadata["endTime"] = rfc3339(wall_now)
            operation["done"] = True
        if succeeded:
            output = {"inlinedResponses": {"inlinedResponses": job.responses}}
            metadata["output"] = output
            operation["response"] = {"@type": _BATCH_OUTPUT_TYPE, **output}
        return operation

    def _batch_for(self, key: str | None, batch_id: str) -> _BatchJob:
        key = self._authenticate(key)
        job = self._batches.get(batch_id)
        if job is None or job.project != self.project_of(key):
            raise not_found()
        return job

    def get_batch(self, key: str | None, batch_id: str) -> dict[str, Any]:
        return self._batch_operation(self._batch_for(key, batch_id))

    def cancel_batch(self, key: str | None, batch_id: str) -> dict[str, Any]:
        job = self._batch_for(key, batch_id)
        if self._batch_state(job, time.monotonic()) != "BATCH_STATE_SUCCEEDED":
            job.cancelled_mono = time.monotonic()
        return {}

    def delete_batch(self, key: str | None, batch_id: str) -> dict[str, Any]:
        job = self._batch_for(key, batch_id)
        del self._batches[job.id]
        return {}

    def list_batches(self, key: str | None) -> dict[str, Any]:
        key = self._authenticate(key)
        project = self.project_of(key)
        jobs = [j for j in self._batches.values() if j.project == project]
        return {"operations": [self._batch_operation(j) for j in jobs]}


# --------------------------------------------------------------------------------------------
# HTTP layer

EMULATOR_KEY = web.AppKey("gemini_emulator", Emulator)


def _api_key(request: web.Request) -> str | None:
    return request.headers.get("x-goog-api-key") or request.query.get("key")


async def _body(request: web.Request) -> dict[str, Any]:
    return await read_json(request, bad_request)


def _version(request: web.Request) -> str:
    version = request.match_info["version"]
    if version not in API_VERSIONS:
        raise web.HTTPNotFound()
    return version


async def _model_action(request: web.Request) -> web.StreamResponse:
    _version(request)
    emulator = request.app[EMULATOR_KEY]
    model, _, action = request.match_info["model_action"].partition(":")
    key = _api_key(request)
    if request.method == "GET":
        if action:
            raise web.HTTPNotFound()
        return json_response(emulator.model_info(key, model))
    body = await _body(request)
    if action == "generateContent":
        return json_response(await emulator.generate_content(key, model, body, method=action))
    if action == "streamGenerateContent":
        # One chunk holding the whole answer: enough for clients that stream.
        answer = await emulator.generate_content(key, model, body, method=action)
        if request.query.get("alt") == "sse":
            payload = b"data: " + orjson.dumps(answer) + b"\r\n\r\n"
            return web.Response(body=payload, content_type="text/event-stream")
        return json_response([answer])
    if action == "countTokens":
        return json_response(await emulator.count_tokens(key, model, body))
    if action == "batchGenerateContent":
        return json_response(emulator.create_batch(key, model, body))
    raise web.HTTPNotFound()


async def _batches(request: web.Request) -> web.StreamResponse:
    _version(request)
    emulator = request.app[EMULATOR_KEY]
    key = _api_key(request)
    name = request.match_info.get("batch_action")
    if name is None:
        return json_response(emulator.list_batches(key))
    batch_id, _, action = name.partition(":")
    if request.method == "GET" and not action:
        return json_response(emulator.get_batch(key, batch_id))
    if request.method == "DELETE" and not action:
        return json_response(emulator.delete_batch(key, batch_id))
    if request.method == "POST" and action == "cancel":
        return json_response(emulator.cancel_batch(key, batch_id))
    raise web.HTTPNotFound()


def create_app(emulator: Emulator) -> web.Application:
    app = web.Application(
        client_max_size=MAX_BODY_BYTES,
        middlewares=[error_middleware(lambda: server_error("500"))],
    )
    app[EMULATOR_KEY] = emulator
    app.router.add_route("*", "/{version}/models/{model_action}", _model_action)
    app.router.add_get("/{version}/batches", _batches)
    app.router.add_route("*", "/{version}/batches/{batch_action}", _batches)
    add_control_routes(app, emulator)
    return app


async def start_emulator(
    config: EmulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, str]:
    """Start the emulator; returns its runner (``await runner.cleanup()`` stops it) and base URL.

    The Emulator object is ``emulator_of(runner)``. Port 0 picks a free port.
    """
    return await start_app(create_app(Emulator(config)), host, port)


def emulator_of(runner: web.AppRunner) -> Emulator:
    app = runner.app
    return app[EMULATOR_KEY]


def running_emulator(
    config: EmulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0
) -> contextlib.AbstractAsyncContextManager[tuple[Emulator, str]]:
    """``async with running_emulator(cfg) as (emulator, base_url): ...``"""
    emulator = Emulator(config)
    return running(emulator, create_app(emulator), host, port)


# --------------------------------------------------------------------------------------------
# Command line


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gemini-server",
        description="Gemini API emulator for tests and benchmarks (no network access needed).",
    )
    add_common_arguments(parser, OUTCOMES, default_port=8790)
    parser.add_argument("--retry-delay-format", choices=["ceil", "exact"])
    parser.add_argument("--default-thinking", action="store_true", default=None)
    return parser


def config_from_args(args: argparse.Namespace) -> EmulatorConfig:
    patch = common_patch(args, OUTCOMES, ("retry_delay_format", "default_thinking"))
    return EmulatorConfig.from_dict(patch)


def main(argv: list[str] | None = None) -> None:
    """Run the emulator standalone (``imagestream dev gemini-server`` calls this)."""

    def build(args: argparse.Namespace) -> Callable[[], web.Application]:
        config = config_from_args(args)
        return lambda: create_app(Emulator(config))

    serve_main(build_arg_parser(), argv, "Gemini emulator", build)


if __name__ == "__main__":
    main()
