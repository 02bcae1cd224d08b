"""An Anthropic-compatible API emulator: what the real ``anthropic`` SDK sees.

    client = anthropic.AsyncAnthropic(base_url="http://127.0.0.1:PORT", api_key="k1")

Endpoints (shapes from the Messages API reference and the ``anthropic`` SDK's types):

* ``POST /v1/messages``: text and base64 ``image`` blocks, ``system``, ``tools`` with
  ``tool_choice`` (``{"type": "tool", "name": ...}`` or ``any`` forces a ``tool_use`` block
  whose ``input`` fits the tool's ``input_schema``; stop_reason ``tool_use``). ``usage``:
  ``input_tokens`` (text at ~4 characters per token, images by Anthropic's rule
  width x height / 750 after fitting 1568 px and 1.15 megapixels, plus the tool-use system
  prompt: 313 tokens when a tool is forced, 346 for ``auto``) and ``output_tokens``.
* ``POST /v1/messages/count_tokens``, ``GET /v1/models``.
* Message Batches: ``POST /v1/messages/batches`` (``requests: [{custom_id, params}]``),
  ``GET /v1/messages/batches[/{id}]``, ``GET /v1/messages/batches/{id}/results`` (JSONL of
  ``{custom_id, result: {type: succeeded|errored|canceled, ...}}``, shuffled), ``POST
  .../{id}/cancel``, ``DELETE .../{id}``. ``in_progress`` for ``batch_pending_seconds +
  batch_running_seconds``, then ``ended``; a cancel keeps what finished by then, the rest
  ``canceled``, after ``canceling`` for ``batch_cancel_seconds``.

Rate limits per project (a key's own unless ``key_projects`` groups keys) and model: RPM and
input tokens per minute (``tpm``; output tokens are not limited). Every answer carries
``anthropic-ratelimit-requests-{limit,remaining,reset}`` and the ``-tokens`` and
``-input-tokens`` variants (reset as RFC 3339); a 429 adds ``retry-after`` (whole seconds).
Keys (``x-api-key``): missing or unknown -> 401 ``authentication_error``; revoked -> 403
``permission_error``.

Outcomes (``OUTCOMES``; ``[[emulate:NAME]]`` in a text block, queued, or at ``error_rates``):
429, 500, 529 (``overloaded_error``), schema_mismatch (the tool input lacks required
properties), fenced_json / invalid_json (a text block with fenced or cut JSON instead of the
tool call), max_tokens (stop_reason max_tokens, the tool input empty), refusal
(stop_reason refusal, no content), empty_content (200 with ``content: []``), non_json (200
whose body is an HTML page).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson
from aiohttp import web

from .emulator_core import (
    MARKER_RE,
    MAX_BODY_BYTES,
    CoreConfig,
    EmulatedError,
    EmulatorCore,
    ImageDecodeError,
    Refusal,
    add_common_arguments,
    add_control_routes,
    common_patch,
    error_middleware,
    image_size,
    json_response,
    read_json,
    rfc3339,
    running,
    serve_main,
    text_tokens,
)
from .emulator_quota import QuotaLimits
from .schema_fake import caption, generate_for_schema, seed_from, spoil

__all__ = [
    "OUTCOMES",
    "AnthropicConfig",
    "AnthropicEmulator",
    "build_arg_parser",
    "config_from_args",
    "create_app",
    "image_tokens",
    "main",
    "running_anthropic_emulator",
]

OUTCOMES: tuple[str, ...] = (
    "ok",
    "429",
    "500",
    "529",
    "schema_mismatch",
    "fenced_json",
    "invalid_json",
    "max_tokens",
    "refusal",
    "empty_content",
    "non_json",
)
FORCED_TOOL_SYSTEM_TOKENS = 313  # the tool-use system prompt, tool_choice any/tool
AUTO_TOOL_SYSTEM_TOKENS = 346  # the same, tool_choice auto/none
_NON_JSON_PAGE = b"<html><head><title>502 Bad Gateway</title></head><body>cloudflare</body></html>"
_MEDIA_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})


def _anthropic_limits() -> QuotaLimits:
    # Roughly tier 1 (https://docs.anthropic.com/en/api/rate-limits): 50 RPM, 50k ITPM.
    return QuotaLimits(rpm=50, tpm=50_000, rpd=None)


@dataclass
class AnthropicConfig(CoreConfig):
    """The shared knobs (``CoreConfig``) and the Anthropic-compatible server's own."""

    OUTCOMES: ClassVar[tuple[str, ...]] = OUTCOMES

    default_limits: QuotaLimits = field(default_factory=_anthropic_limits)
    batch_cancel_seconds: float = 0.5
    batch_shuffle_output: bool = True
    max_batch_requests: int = 100_000


class AnthropicError(EmulatedError):
    """``{"type": "error", "error": {"type", "message"}, "request_id"}``."""

    def __init__(
        self,
        status: int,
        kind: str,
        message: str,
        *,
        outcome: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = status
        self.kind = kind
        self.message = message
        self.outcome = outcome or kind
        self.headers = dict(headers or {})

    def error(self) -> dict[str, Any]:
        return {"type": "error", "error": {"type": self.kind, "message": self.message}}

    def body(self) -> dict[str, Any]:
        return {**self.error(), "request_id": "req_emulator"}


def bad_request(message: str) -> AnthropicError:
    return AnthropicError(400, "invalid_request_error", message, outcome="bad_request")


def not_found(message: str) -> AnthropicError:
    return AnthropicError(404, "not_found_error", message, outcome="not_found")


def server_error(outcome: str = "500") -> AnthropicError:
    if outcome == "529":
        return AnthropicError(529, "overloaded_error", "Overloaded", outcome="529")
    return AnthropicError(500, "api_error", "Internal server error", outcome="500")


def image_tokens(width: int, height: int) -> int:
    """Anthropic's rule: (width x height) / 750 after fitting 1568 px and 1.15 megapixels."""
    w, h = float(max(1, width)), float(max(1, height))
    scale = min(1.0, 1568 / max(w, h), math.sqrt(1_150_000 / (w * h)))
    return math.ceil((w * scale) * (h * scale) / 750)


# --------------------------------------------------------------------------------------------
# Requests and answers


@dataclass
class MessagesRequest:
    model: str
    input_tokens: int
    max_tokens: int
    seed: int
    markers: list[str]
    tool: dict[str, Any] | None  # the tool the answer calls (forced, or the first one)


def _texts_of(blocks: Any) -> list[str]:
    if isinstance(blocks, str):
        return [blocks]
    if not isinstance(blocks, list):
        return []
    return [b["text"] for b in blocks if isinstance(b, Mapping) and isinstance(b.get("text"), str)]


def parse_messages(body: Mapping[str, Any]) -> MessagesRequest:
    """What the emulator needs from a Messages request; 400 for what Anthropic refuses."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model: Field required")
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise bad_request("max_tokens: Field required")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages: at least one message is required")
    texts = _texts_of(body.get("system"))
    hashes: list[bytes] = []
    media_tokens = 0
    for m_index, message in enumerate(messages):
        content = message.get("content") if isinstance(message, Mapping) else None
        texts += _texts_of(content)
        for c_index, block in enumerate(content if isinstance(content, list) else []):
            if not isinstance(block, Mapping) or block.get("type") != "image":
                continue
            where = f"messages.{m_index}.content.{c_index}.image.source"
            source = block.get("source")
            if not isinstance(source, Mapping) or source.get("type") != "base64":
                raise bad_request(f"{where}: the emulator takes base64 image sources only")
            if source.get("media_type") not in _MEDIA_TYPES:
                raise bad_request(
                    f"{where}.media_type: Input should be 'image/jpeg', 'image/png',"
                    " 'image/gif' or 'image/webp'"
                )
            try:
                data = base64.b64decode(str(source.get("data") or ""), validate=True)
                width, height = image_size(data)
            except (binascii.Error, ValueError, ImageDecodeError):
                raise bad_request(f"{where}: Could not process image") from None
            hashes.append(hashlib.sha256(data).digest())
            media_tokens += image_tokens(width, height)
    tool, tool_tokens = _chosen_tool(body.get("tools"), body.get("tool_choice"))
    seed = seed_from(*hashes) if hashes else seed_from(*(t.encode() for t in texts))
    return MessagesRequest(
        model=model,
        input_tokens=text_tokens("".join(texts)) + media_tokens + tool_tokens,
        max_tokens=max_tokens,
        seed=seed,
        markers=[m for t in texts for m in MARKER_RE.findall(t)],
        tool=tool,
    )


def _chosen_tool(tools: Any, choice: Any) -> tuple[dict[str, Any] | None, int]:
    """The tool the model calls, and the input tokens the tool definitions add."""
    if tools is None:
        return None, 0
    if not isinstance(tools, list):
        raise bad_request("tools: Input should be a valid list")
    for index, tool in enumerate(tools):
        if not isinstance(tool, Mapping) or not isinstance(tool.get("name"), str):
            raise bad_request(f"tools.{index}.name: Field required")
        schema = tool.get("input_schema")
        if not isinstance(schema, Mapping) or schema.get("type") != "object":
            raise bad_request(f"tools.{index}.input_schema.type: Input should be 'object'")
    kind = choice.get("type") if isinstance(choice, Mapping) else "auto"
    definitions = text_tokens(json.dumps(tools))
    if kind == "tool":
        wanted = choice.get("name") if isinstance(choice, Mapping) else None
        named = [t for t in tools if t["name"] == wanted]
        if not named:
            raise bad_request(f"tool_choice.name: Tool '{wanted}' not found in tools")
        return dict(named[0]), definitions + FORCED_TOOL_SYSTEM_TOKENS
    if kind == "any":
        return (dict(tools[0]) if tools else None), definitions + FORCED_TOOL_SYSTEM_TOKENS
    if kind == "none":
        return None, definitions + AUTO_TOOL_SYSTEM_TOKENS
    return (dict(tools[0]) if tools else None), definitions + AUTO_TOOL_SYSTEM_TOKENS


def _mismatched(value: Any) -> Any:
    """The value with half its properties (the first ones) dropped: it no longer fits."""
    if isinstance(value, dict) and value:
        keys = list(value)
        return {k: value[k] for k in keys[max(1, len(keys) // 2) :]}
    return {}


def build_message(
    req: MessagesRequest, outcome: str, *, message_id: str
) -> tuple[dict[str, Any], dict[str, int]]:
    """The Message object and its token counts (input, output)."""
    rng = random.Random(req.seed)
    content: list[dict[str, Any]] = []
    stop = "end_turn"
    if outcome == "refusal":
        stop = "refusal"
    elif outcome != "empty_content" and req.tool is not None:
        value = generate_for_schema(req.tool["input_schema"], req.seed)
        if outcome in ("fenced_json", "invalid_json"):
            text, _ = spoil(json.dumps(value, ensure_ascii=False), outcome)
            content.append({"type": "text", "text": text})
        else:
            if outcome == "schema_mismatch":
                value = _mismatched(value)
            elif outcome == "max_tokens":
                value, stop = {}, "max_tokens"
            else:
                stop = "tool_use"
            content.append(
                {
                    "type": "tool_use",
                    "id": f"toolu_{message_id}",
                    "name": req.tool["name"],
                    "input": value,
                }
            )
    elif outcome != "empty_content":
        text, cut_off = spoil(caption(rng), outcome)
        content.append({"type": "text", "text": text})
        stop = "max_tokens" if cut_off else stop
    output = 1 + sum(
        text_tokens(b["text"] if b["type"] == "text" else json.dumps(b["input"])) for b in content
    )
    if output > req.max_tokens:
        output, stop = req.max_tokens, "max_tokens"
    body = {
        "id": f"msg_{message_id}",
        "type": "message",
        "role": "assistant",
        "model": req.model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {
            "input_tokens": req.input_tokens,
            "output_tokens": output,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "service_tier": "standard",
        },
    }
    tokens = {"input": req.input_tokens, "output": output, "total": req.input_tokens + output}
    return body, tokens


# --------------------------------------------------------------------------------------------
# The emulator


@dataclass
class _Batch:
    id: str
    project: str
    created_wall: float
    created_mono: float
    lines: list[tuple[str, dict[str, Any]]]  # (custom_id, result), in input order
    cancelled_mono: float | None = None
    kept: int | None = None  # results finished before a cancel


class AnthropicEmulator(EmulatorCore[AnthropicConfig]):
    """The Anthropic API on top of the shared core; the aiohttp handlers are thin wrappers."""

    def __init__(self, config: AnthropicConfig | None = None) -> None:
        super().__init__(config or AnthropicConfig())
        self._batches: dict[str, _Batch] = {}

    def forget_jobs(self) -> None:
        self._batches.clear()

    def extra_stats(self) -> dict[str, Any]:
        return {"batches": len(self._batches)}

    def _authenticate(self, key: str | None) -> str:
        status = self.key_status(key)
        if status == "missing" or key is None:
            raise AnthropicError(
                401, "authentication_error", "x-api-key header is required", outcome="no_key"
            )
        if status == "invalid":
            raise AnthropicError(
                401, "authentication_error", "invalid x-api-key", outcome="invalid_key"
            )
        if status == "revoked":
            raise AnthropicError(
                403,
                "permission_error",
                "Your API key does not have permission to use the specified resource.",
                outcome="revoked_key",
            )
        return key

    def _check_model(self, model: str) -> None:
        if not self.serves(model):
            raise not_found(f"model: {model}")

    def rate_headers(self, key: str, model: str, now: float) -> dict[str, str]:
        headers = {"request-id": f"req_{self.new_id('req')}"}
        wall = time.time()
        for metric, (limit, remaining, reset) in self.remaining(key, model, now).items():
            names = [metric] if metric == "requests" else ["tokens", "input-tokens"]
            for name in names:
                headers[f"anthropic-ratelimit-{name}-limit"] = str(limit)
                headers[f"anthropic-ratelimit-{name}-remaining"] = str(remaining)
                headers[f"anthropic-ratelimit-{name}-reset"] = rfc3339(wall + reset)
        return headers

    def _rate_limited(self, key: str, model: str, now: float, refusal: Refusal) -> AnthropicError:
        headers = self.rate_headers(key, model, now)
        headers["retry-after"] = str(max(1, math.ceil(refusal.retry_after)))
        v = refusal.violations[0]
        what = "input tokens per minute" if v.metric == "tpm" else "requests per minute"
        message = (
            f"This request would exceed the rate limit for your organization of {v.limit}"
            f" {what}. For details, refer to: https://docs.claude.com/en/api/rate-limits."
        )
        return AnthropicError(429, "rate_limit_error", message, outcome="429", headers=headers)

    async def create_message(
        self, key: str | None, body: Mapping[str, Any]
    ) -> tuple[Any, dict[str, str]]:
        """(JSON body, or raw bytes for non_json; headers) of one Messages call."""
        t = time.monotonic()
        model = str(body.get("model") or "")
        with self.recording_errors(t=t, key=key, model=model, method="messages"):
            key = self._authenticate(key)
            req = parse_messages(body)
            self._check_model(req.model)
            outcome, source = self.next_outcome(req.markers, key)
            refusal = self.admit_outcome(
                key, model, req.input_tokens, t, outcome=outcome, source=source
            )
            if refusal is not None:
                raise self._rate_limited(key, model, t, refusal).refused(refusal)
        headers = self.rate_headers(key, model, t)
        with self.tracking():
            if outcome in ("500", "529"):
                error = server_error(outcome)
                error.headers = headers
                await self.fail_late(
                    error, t=t, key=key, model=model, method="messages", source=source
                )
            answer, tokens = build_message(req, outcome, message_id=self.new_id())
            delay = self.latency(tokens["output"])
            await asyncio.sleep(delay)
            self.record(
                t=t,
                key=key,
                model=model,
                method="messages",
                status=200,
                outcome=outcome,
                tokens=tokens,
                latency=delay,
                source=source,
            )
            if outcome == "non_json":
                return _NON_JSON_PAGE, headers
            return answer, headers

    def count_tokens(self, key: str | None, body: Mapping[str, Any]) -> dict[str, Any]:
        t = time.monotonic()
        model = str(body.get("model") or "")
        with self.recording_errors(t=t, key=key, model=model, method="count_tokens"):
            key = self._authenticate(key)
            req = parse_messages({"max_tokens": 1, **body})
        self.record(
            t=t,
            key=key,
            model=model,
            method="count_tokens",
            status=200,
            outcome="ok",
            tokens={"input": req.input_tokens},
            count_tokens=False,
        )
        return {"input_tokens": req.input_tokens}

    def list_models(self, key: str | None) -> dict[str, Any]:
        self._authenticate(key)
        names = self._config.models or ["claude-haiku-4-5", "claude-sonnet-4-5"]
        data = [
            {
                "type": "model",
                "id": name,
                "display_name": f"{name} (emulated)",
                "created_at": "2025-10-01T00:00:00Z",
            }
            for name in names
        ]
        return {"data": data, "has_more": False, "first_id": names[0], "last_id": names[-1]}

    # -- Message Batches --

    def create_batch(self, key: str | None, body: Mapping[str, Any]) -> dict[str, Any]:
        t = time.monotonic()
        with self.recording_errors(t=t, key=key, model="", method="batches.create"):
            key = self._authenticate(key)
            requests = body.get("requests")
            if not isinstance(requests, list) or not requests:
                raise bad_request("requests: List should have at least 1 item")
            if len(requests) > self._config.max_batch_requests:
                raise bad_request(
                    f"requests: at most {self._config.max_batch_requests} requests per batch"
                )
            seen: set[str] = set()
            for index, entry in enumerate(requests):
                custom_id = entry.get("custom_id") if isinstance(entry, Mapping) else None
                if not isinstance(custom_id, str) or not custom_id:
                    raise bad_request(f"requests.{index}.custom_id: Field required")
                if custom_id in seen:
                    raise bad_request(f"requests.{index}.custom_id: duplicate '{custom_id}'")
                if not isinstance(entry.get("params"), Mapping):
                    raise bad_request(f"requests.{index}.params: Field required")
                seen.add(custom_id)
            limit = self._config.max_concurrent_batches
            project = self.project_of(key)
            unfinished = sum(
                b.project == project and self._batch_status(b, t) != "ended"
                for b in self._batches.values()
            )
            if limit is not None and unfinished >= limit:
                raise AnthropicError(
                    429,
                    "rate_limit_error",
                    f"Too many batches in progress: {unfinished} of at most {limit}.",
                    outcome="429",
                )
        lines: list[tuple[str, dict[str, Any]]] = []
        total: dict[str, int] = {}
        model = ""
        for entry in requests:
            params = entry["params"]
            model = model or str(params.get("model") or "")
            result, tokens = self._batch_result(key, params)
            for name, value in tokens.items():
                total[name] = total.get(name, 0) + value
            lines.append((entry["custom_id"], result))
        batch = _Batch(
            id=f"msgbatch_{self.new_id('batch')}",
            project=self.project_of(key),
            created_wall=time.time(),
            created_mono=t,
            lines=lines,
        )
        self._batches[batch.id] = batch
        self.record(
            t=t,
            key=key,
            model=model,
            method="batches.create",
            status=200,
            outcome="ok",
            tokens=total,
        )
        return self._batch_json(batch, "")

    def _batch_result(
        self, key: str, params: Mapping[str, Any]
    ) -> tuple[dict[str, Any], dict[str, int]]:
        try:
            req = parse_messages(params)
            self._check_model(req.model)
            outcome, _ = self.take_outcome(req.markers, key)
            if outcome in ("429", "non_json"):
                outcome = "500"  # neither exists inside a batch; the request errors instead
            if outcome in ("500", "529"):
                raise server_error(outcome)
            message, tokens = build_message(req, outcome, message_id=self.new_id())
            return {"type": "succeeded", "message": message}, tokens
        except AnthropicError as exc:
            return {"type": "errored", "error": exc.error()}, {}

    def _batch_status(self, batch: _Batch, now: float) -> str:
        if batch.cancelled_mono is not None:
            if now < batch.cancelled_mono + self._config.batch_cancel_seconds:
                return "canceling"
            return "ended"
        return "ended" if self.batch_phase(batch.created_mono, now) == "done" else "in_progress"

    def _results(self, batch: _Batch) -> list[tuple[str, dict[str, Any]]]:
        if batch.kept is None:
            return batch.lines
        kept = batch.lines[: batch.kept]
        return kept + [(cid, {"type": "canceled"}) for cid, _ in batch.lines[batch.kept :]]

    def _wall(self, batch: _Batch, mono: float) -> str:
        return rfc3339(batch.created_wall + (mono - batch.created_mono))

    def _batch_json(self, batch: _Batch, base_url: str) -> dict[str, Any]:
        now = time.monotonic()
        status = self._batch_status(batch, now)
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        if status == "ended":
            for _, result in self._results(batch):
                counts[result["type"]] += 1
        else:
            counts["processing"] = len(batch.lines)
        cfg = self._config
        if batch.cancelled_mono is not None:
            ended = batch.cancelled_mono + cfg.batch_cancel_seconds
        else:
            ended = batch.created_mono + cfg.batch_pending_seconds + cfg.batch_running_seconds
        results_url = f"{base_url}/v1/messages/batches/{batch.id}/results"
        return {
            "id": batch.id,
            "type": "message_batch",
            "processing_status": status,
            "request_counts": counts,
            "created_at": rfc3339(batch.created_wall),
            "expires_at": rfc3339(batch.created_wall + 86_400),
            "ended_at": self._wall(batch, ended) if status == "ended" else None,
            "cancel_initiated_at": (
                self._wall(batch, batch.cancelled_mono) if batch.cancelled_mono else None
            ),
            "archived_at": None,
            "results_url": results_url if status == "ended" else None,
        }

    def _batch(self, key: str | None, batch_id: str) -> _Batch:
        key = self._authenticate(key)
        batch = self._batches.get(batch_id)
        if batch is None or batch.project != self.project_of(key):
            raise not_found(f"message_batch: {batch_id}")
        return batch

    def get_batch(self, key: str | None, batch_id: str, base_url: str) -> dict[str, Any]:
        return self._batch_json(self._batch(key, batch_id), base_url)

    def batch_results(self, key: str | None, batch_id: str) -> bytes:
        batch = self._batch(key, batch_id)
        if self._batch_status(batch, time.monotonic()) != "ended":
            raise bad_request(f"Batch {batch_id} is still processing; results are not ready.")
        lines = list(self._results(batch))
        if self._config.batch_shuffle_output:
            random.Random(batch.id).shuffle(lines)
        return b"".join(
            orjson.dumps({"custom_id": cid, "result": result}) + b"\n" for cid, result in lines
        )

    def cancel_batch(self, key: str | None, batch_id: str, base_url: str) -> dict[str, Any]:
        batch = self._batch(key, batch_id)
        now = time.monotonic()
        if self._batch_status(batch, now) == "in_progress":
            cfg = self._config
            running_for = now - batch.created_mono - cfg.batch_pending_seconds
            share = max(0.0, running_for) / max(cfg.batch_running_seconds, 1e-9)
            batch.kept = min(len(batch.lines), int(len(batch.lines) * share))
            batch.cancelled_mono = now
        return self._batch_json(batch, base_url)

    def delete_batch(self, key: str | None, batch_id: str) -> dict[str, Any]:
        batch = self._batch(key, batch_id)
        if self._batch_status(batch, time.monotonic()) != "ended":
            raise bad_request("A batch that has not ended cannot be deleted; cancel it first.")
        del self._batches[batch.id]
        return {"id": batch.id, "type": "message_batch_deleted"}

    def list_batches(self, key: str | None, base_url: str, limit: int) -> dict[str, Any]:
        key = self._authenticate(key)
        project = self.project_of(key)
        batches = [b for b in reversed(self._batches.values()) if b.project == project]
        data = [self._batch_json(b, base_url) for b in batches[:limit]]
        return {
            "data": data,
            "has_more": len(batches) > limit,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }


# --------------------------------------------------------------------------------------------
# HTTP layer

EMULATOR_KEY = web.AppKey("anthropic_emulator", AnthropicEmulator)


def _api_key(request: web.Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key
    auth = request.headers.get("Authorization", "")
    return auth[7:].strip() or None if auth.lower().startswith("bearer ") else None


def _origin(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}"


async def _body(request: web.Request) -> dict[str, Any]:
    return await read_json(request, bad_request)


async def _messages(request: web.Request) -> web.StreamResponse:
    emulator = request.app[EMULATOR_KEY]
    answer, headers = await emulator.create_message(_api_key(request), await _body(request))
    if isinstance(answer, bytes):
        return web.Response(body=answer, content_type="text/html", headers=headers)
    return json_response(answer, headers=headers)


async def _count_tokens(request: web.Request) -> web.StreamResponse:
    emulator = request.app[EMULATOR_KEY]
    return json_response(emulator.count_tokens(_api_key(request), await _body(request)))


async def _models(request: web.Request) -> web.StreamResponse:
    return json_response(request.app[EMULATOR_KEY].list_models(_api_key(request)))


async def _batches(request: web.Request) -> web.StreamResponse:
    emulator = request.app[EMULATOR_KEY]
    key = _api_key(request)
    if request.method == "POST":
        return json_response(emulator.create_batch(key, await _body(request)))
    try:
        limit = max(1, min(1000, int(request.query.get("limit", "20"))))
    except ValueError:
        raise bad_request("limit: Input should be a valid integer") from None
    return json_response(emulator.list_batches(key, _origin(request), limit))


async def _batch(request: web.Request) -> web.StreamResponse:
    emulator = request.app[EMULATOR_KEY]
    key = _api_key(request)
    batch_id = request.match_info["batch_id"]
    action = request.match_info.get("action")
    if action == "cancel":
        return json_response(emulator.cancel_batch(key, batch_id, _origin(request)))
    if action == "results":
        data = emulator.batch_results(key, batch_id)
        return web.Response(body=data, content_type="application/binary")
    if request.method == "DELETE":
        return json_response(emulator.delete_batch(key, batch_id))
    return json_response(emulator.get_batch(key, batch_id, _origin(request)))


def create_app(emulator: AnthropicEmulator) -> web.Application:
    app = web.Application(
        client_max_size=MAX_BODY_BYTES, middlewares=[error_middleware(server_error)]
    )
    app[EMULATOR_KEY] = emulator
    app.router.add_post("/v1/messages", _messages)
    app.router.add_post("/v1/messages/count_tokens", _count_tokens)
    app.router.add_get("/v1/models", _models)
    app.router.add_route("*", "/v1/messages/batches", _batches)
    app.router.add_route("GET", "/v1/messages/batches/{batch_id}", _batch)
    app.router.add_route("DELETE", "/v1/messages/batches/{batch_id}", _batch)
    app.router.add_get("/v1/messages/batches/{batch_id}/{action:results}", _batch)
    app.router.add_post("/v1/messages/batches/{batch_id}/{action:cancel}", _batch)
    add_control_routes(app, emulator)
    return app


def running_anthropic_emulator(
    config: AnthropicConfig | None = None, host: str = "127.0.0.1", port: int = 0
) -> contextlib.AbstractAsyncContextManager[tuple[AnthropicEmulator, str]]:
    """``async with running_anthropic_emulator(cfg) as (emulator, base_url): ...``

    ``base_url`` is what ``AsyncAnthropic(base_url=...)`` (or ANTHROPIC_BASE_URL) takes.
    """
    emulator = AnthropicEmulator(config)
    return running(emulator, create_app(emulator), host, port)


# --------------------------------------------------------------------------------------------
# Command line


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anthropic-server",
        description="Anthropic-compatible API emulator for tests and benchmarks (no network).",
    )
    add_common_arguments(parser, OUTCOMES, default_port=8792)
    parser.add_argument("--batch-cancel-seconds", type=float, help="how long a cancel takes")
    return parser


def config_from_args(args: argparse.Namespace) -> AnthropicConfig:
    patch = common_patch(args, OUTCOMES, ("batch_cancel_seconds",))
    return AnthropicConfig.from_dict(patch)


def main(argv: list[str] | None = None) -> None:
    """Run the emulator standalone (``imagestream dev anthropic-server`` calls this)."""

    def build(args: argparse.Namespace) -> Callable[[], web.Application]:
        config = config_from_args(args)
        return lambda: create_app(AnthropicEmulator(config))

    serve_main(build_arg_parser(), argv, "Anthropic-compatible emulator", build)


if __name__ == "__main__":
    main()
