"""An OpenAI-compatible API emulator: what the real ``openai`` SDK, vLLM or Ollama clients see.

    client = openai.AsyncOpenAI(base_url="http://127.0.0.1:PORT/v1", api_key="k1")

Endpoints (shapes from the OpenAI API reference, the ``openai`` SDK 2.x types and vLLM's
OpenAI-compatible server):

* ``POST /v1/chat/completions``: text and ``image_url`` parts (base64 ``data:`` URLs only:
  the emulator never fetches), ``response_format`` ``json_schema`` (strict mode checked the
  way OpenAI checks it: every object ``additionalProperties: false`` and every property
  required, else 400) or ``json_object``; ``honour_response_format: false`` makes it answer
  like a server that ignores the format (some Ollama and older vLLM versions): the JSON in
  prose and a Markdown fence. ``usage`` in the real shape, including
  ``completion_tokens_details.reasoning_tokens`` (o-series and gpt-5 models reason).
* ``GET /v1/models``, ``GET /v1/models/{id}``.
* Batch API: ``POST /v1/files`` (multipart, ``purpose=batch``, JSONL of ``{custom_id,
  method, url, body}``), ``GET /v1/files/{id}``, ``GET /v1/files/{id}/content``, ``DELETE
  /v1/files/{id}``, ``POST /v1/batches``, ``GET /v1/batches``, ``GET /v1/batches/{id}``,
  ``POST /v1/batches/{id}/cancel``. A batch is ``validating`` for ``batch_pending_seconds``,
  ``in_progress`` for ``batch_running_seconds``, then ``completed`` with an output file (lines
  in shuffled order, as OpenAI does not promise order) and an error file; cancelled while in
  progress, it keeps the share of results finished by then.

Rate limits are per project (a key's own unless ``key_projects`` groups keys) and model: RPM
and TPM, where a request weighs its prompt tokens plus its ``max_completion_tokens`` (OpenAI
counts the completion budget up front). Every answer carries ``x-ratelimit-limit-requests``,
``x-ratelimit-remaining-requests``, ``x-ratelimit-reset-requests`` and the ``-tokens``
variants; a 429 adds ``retry-after`` (whole seconds, never shorter than the true wait).
Keys: missing or unknown -> 401 ``invalid_api_key``; ``revoked_keys`` -> 403.

Outcomes (``OUTCOMES``, forced by ``[[emulate:NAME]]`` in a text part, queued through
``/_emulator/outcomes`` or drawn at ``error_rates``): 429 (rate_limit_exceeded),
insufficient_quota (429 that retrying does not fix), 500/502/503, fenced_json,
invalid_json (cut short, finish_reason stop), max_tokens (finish_reason length), refusal,
empty_choices (200 with ``choices: []``), non_json (200 whose body is an HTML page).
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
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson
from aiohttp import BodyPartReader, web

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
    running,
    serve_main,
    text_tokens,
)
from .emulator_quota import QuotaLimits
from .schema_fake import caption, default_json, generate_for_schema, seed_from, spoil

__all__ = [
    "OUTCOMES",
    "OpenAIConfig",
    "OpenAIEmulator",
    "build_arg_parser",
    "config_from_args",
    "create_app",
    "image_tokens",
    "main",
    "running_openai_emulator",
]

OUTCOMES: tuple[str, ...] = (
    "ok",
    "429",
    "insufficient_quota",
    "500",
    "502",
    "503",
    "fenced_json",
    "invalid_json",
    "max_tokens",
    "refusal",
    "empty_choices",
    "non_json",
)
CHAT_PATH = "/v1/chat/completions"
RATE_LIMIT_DOC = "https://platform.openai.com/account/rate-limits"
_DATA_URL = re.compile(r"^data:(?P<mime>[\w/+.-]+)?(?:;[\w=-]+)*;base64,(?P<data>.*)$", re.DOTALL)
_REASONING_MODEL = re.compile(r"^(o\d|gpt-5)")
_NON_JSON_PAGE = (
    b"<html><head><title>502 Bad Gateway</title></head><body>upstream error</body></html>"
)


def _openai_limits() -> QuotaLimits:
    # Roughly usage tier 1 of gpt-4o-mini (https://platform.openai.com/docs/guides/rate-limits).
    return QuotaLimits(rpm=500, tpm=200_000, rpd=None)


@dataclass
class OpenAIConfig(CoreConfig):
    """The shared knobs (``CoreConfig``) and the OpenAI-compatible server's own."""

    OUTCOMES: ClassVar[tuple[str, ...]] = OUTCOMES

    default_limits: QuotaLimits = field(default_factory=_openai_limits)
    # False: answer like a server that ignores response_format (JSON in prose and a fence).
    honour_response_format: bool = True
    batch_shuffle_output: bool = True
    max_batch_requests: int = 50_000


# --------------------------------------------------------------------------------------------
# Errors


class OpenAIError(EmulatedError):
    """An error in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        code: str | None = None,
        *,
        param: str | None = None,
        outcome: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = status
        self.message = message
        self.kind = kind
        self.error_code = code
        self.param = param
        self.outcome = outcome or code or kind
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.error_code,
            }
        }

    def line_error(self) -> dict[str, Any]:
        """The ``error`` of a batch output line."""
        return {"code": self.error_code or self.kind, "message": self.message}


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, outcome="bad_request")


def not_found(message: str) -> OpenAIError:
    return OpenAIError(404, message, outcome="not_found")


def server_error(outcome: str = "500") -> OpenAIError:
    messages = {
        "500": "The server had an error while processing your request. Sorry about that!",
        "502": "Bad gateway.",
        "503": "The engine is currently overloaded, please try again later.",
    }
    status = int(outcome) if outcome in messages else 500
    return OpenAIError(
        status, messages.get(outcome, messages["500"]), "server_error", None, outcome=outcome
    )


def _masked(key: str) -> str:
    return f"{key[:3]}{'*' * 8}{key[-4:]}" if len(key) > 8 else "*" * len(key)


def duration(seconds: float) -> str:
    """OpenAI's reset format: "20ms", "1.5s", "6m0s"; never shorter than the true wait."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    if seconds < 60:
        return f"{math.ceil(seconds * 1000) / 1000:g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"


# --------------------------------------------------------------------------------------------
# Requests and answers


def image_tokens(width: int, height: int, detail: str, model: str) -> int:
    """OpenAI's published tile rule for GPT-4o-class models.

    low: the base only. high/auto: fit in 2048 x 2048, scale the short side down to 768,
    then base + per-tile tokens for each 512 px tile. gpt-4o-mini bills 2833 + 5667 per
    tile, the others 85 + 170 (https://platform.openai.com/docs/guides/images-vision).
    """
    base, per_tile = (2833, 5667) if "gpt-4o-mini" in model else (85, 170)
    if detail == "low":
        return base
    w, h = float(max(1, width)), float(max(1, height))
    scale = min(1.0, 2048 / max(w, h))
    w, h = w * scale, h * scale
    scale = min(1.0, 768 / min(w, h))
    w, h = w * scale, h * scale
    return base + per_tile * math.ceil(w / 512) * math.ceil(h / 512)


@dataclass
class ChatRequest:
    model: str
    prompt_tokens: int
    seed: int
    markers: list[str]
    response_format: dict[str, Any] | None
    max_completion_tokens: int | None
    reasoning_effort: str | None


def _decode_data_url(url: str, where: str) -> bytes:
    match = _DATA_URL.match(url)
    if match is None:
        raise bad_request(
            f"Invalid image URL at {where}: the emulator takes base64 data URLs only.",
            param=where,
        )
    try:
        return base64.b64decode(match.group("data"), validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"Invalid base64 image data at {where}.", param=where) from None


def _strict_problem(schema: Any, context: tuple[str, ...] = ()) -> str | None:
    """Why OpenAI's strict mode would refuse `schema`, or None."""
    if not isinstance(schema, Mapping):
        return None
    kind = schema.get("type")
    is_object = kind == "object" or (isinstance(kind, list) and "object" in kind)
    where = f"In context={context}, "
    if is_object or "properties" in schema:
        if schema.get("additionalProperties") is not False:
            return where + "'additionalProperties' is required to be supplied and to be false."
        props = schema.get("properties") or {}
        required = schema.get("required") or []
        missing = [p for p in props if p not in required]
        if missing:
            return (
                where + "'required' is required to be supplied and to be an array including"
                f" every key in properties. Missing '{missing[0]}'."
            )
        for name, sub in props.items():
            problem = _strict_problem(sub, (*context, "properties", name))
            if problem:
                return problem
    for word in ("items", "anyOf", "$defs", "definitions"):
        sub = schema.get(word)
        if isinstance(sub, Mapping) and word in ("$defs", "definitions"):
            for name, inner in sub.items():
                problem = _strict_problem(inner, (*context, word, name))
                if problem:
                    return problem
        elif isinstance(sub, list):
            for index, inner in enumerate(sub):
                problem = _strict_problem(inner, (*context, word, str(index)))
                if problem:
                    return problem
        elif isinstance(sub, Mapping):
            problem = _strict_problem(sub, (*context, word))
            if problem:
                return problem
    return None


def parse_chat(body: Mapping[str, Any]) -> ChatRequest:
    """What the emulator needs from a chat completions body; 400 for what OpenAI refuses."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("you must provide a model parameter", param="model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array.", param="messages")
    texts: list[str] = []
    image_hashes: list[bytes] = []
    media_tokens = 0
    for m_index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise bad_request(f"messages[{m_index}] must be an object.", param="messages")
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for p_index, part in enumerate(parts if isinstance(parts, list) else []):
            if not isinstance(part, Mapping):
                continue
            if part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif part.get("type") == "image_url":
                where = f"messages.[{m_index}].content.[{p_index}].image_url"
                image = part.get("image_url")
                url = image.get("url") if isinstance(image, Mapping) else None
                if not isinstance(url, str):
                    raise bad_request(f"Missing url at {where}.", param=where)
                data = _decode_data_url(url, where)
                try:
                    width, height = image_size(data)
                except ImageDecodeError:
                    raise OpenAIError(
                        400,
                        "You uploaded an unsupported image. Please make sure your image has of"
                        " one the following formats: ['png', 'jpeg', 'gif', 'webp'].",
                        code="invalid_image_format",
                        outcome="bad_request",
                    ) from None
                detail = str(image.get("detail") or "auto") if isinstance(image, Mapping) else ""
                image_hashes.append(hashlib.sha256(data).digest())
                media_tokens += image_tokens(width, height, detail, model)
    response_format = body.get("response_format")
    if response_format is not None:
        if not isinstance(response_format, Mapping):
            raise bad_request("'response_format' must be an object.", param="response_format")
        if response_format.get("type") == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, Mapping) or not isinstance(spec.get("schema"), Mapping):
                raise bad_request(
                    "Missing required parameter: 'response_format.json_schema'.",
                    param="response_format",
                )
            if spec.get("strict"):
                problem = _strict_problem(spec["schema"])
                if problem:
                    raise bad_request(
                        f"Invalid schema for response_format '{spec.get('name')}': {problem}",
                        param="response_format",
                    )
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    effort = body.get("reasoning_effort")
    seed = seed_from(*image_hashes) if image_hashes else seed_from(*(t.encode() for t in texts))
    return ChatRequest(
        model=model,
        prompt_tokens=text_tokens("".join(texts)) + media_tokens,
        seed=seed,
        markers=[m for t in texts for m in MARKER_RE.findall(t)],
        response_format=dict(response_format) if isinstance(response_format, Mapping) else None,
        max_completion_tokens=limit if isinstance(limit, int) and limit > 0 else None,
        reasoning_effort=effort if isinstance(effort, str) else None,
    )


def _answer_text(req: ChatRequest, honour_format: bool) -> str:
    rng = random.Random(req.seed)
    fmt = req.response_format or {}
    kind = fmt.get("type")
    if kind == "json_schema":
        value = generate_for_schema(fmt["json_schema"]["schema"], req.seed)
    elif kind == "json_object":
        value = default_json(rng)
    else:
        return caption(rng)
    text = json.dumps(value, ensure_ascii=False)
    if not honour_format:
        # A server that ignores response_format: the model follows the prompt loosely.
        return f"Here is the analysis of the image:\n```json\n{text}\n```"
    return text


def _reasoning_tokens(req: ChatRequest) -> int:
    if not _REASONING_MODEL.match(req.model) or req.reasoning_effort in ("none", "minimal"):
        return 0
    rng = random.Random(req.seed ^ 0x7265617A)
    spent = 64 + rng.randrange(448)
    return spent // 4 if req.reasoning_effort == "low" else spent


def build_completion(
    req: ChatRequest, outcome: str, *, completion_id: str, honour_format: bool
) -> tuple[dict[str, Any], dict[str, int]]:
    """The chat.completion object and its token counts (prompt, completion, reasoning)."""
    reasoning = _reasoning_tokens(req)
    text, cut_off = spoil(_answer_text(req, honour_format), outcome)
    finish = "length" if cut_off else "stop"
    answer = text_tokens(text)
    if req.max_completion_tokens is not None:
        # Reasoning counts against the completion budget.
        room = max(0, req.max_completion_tokens - reasoning)
        if answer > room:
            text, answer, finish = text[: room * 4], min(answer, room), "length"
        reasoning = min(reasoning, req.max_completion_tokens)
    message: dict[str, Any] = {
        "role": "assistant",
        "content": text,
        "refusal": None,
        "annotations": [],
    }
    if outcome == "refusal":
        message["content"] = None
        message["refusal"] = "I'm sorry, I can't help with that request."
        answer = text_tokens(message["refusal"])
    completion = answer + reasoning
    usage = {
        "prompt_tokens": req.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": req.prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }
    choices = [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}]
    body = {
        "id": f"chatcmpl-{completion_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": req.model,
        "choices": [] if outcome == "empty_choices" else choices,
        "usage": usage,
        "service_tier": "default",
        "system_fingerprint": "fp_emulator",
    }
    tokens = {
        "prompt": req.prompt_tokens,
        "completion": completion,
        "reasoning": reasoning,
        "total": req.prompt_tokens + completion,
    }
    return body, tokens


# --------------------------------------------------------------------------------------------
# Files and batches


@dataclass
class _File:
    id: str
    project: str
    filename: str
    purpose: str
    data: bytes
    created_at: int

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }


@dataclass
class _Batch:
    id: str
    project: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, Any] | None
    created_at: int
    created_mono: float
    lines: list[tuple[bool, dict[str, Any]]]  # (succeeded, output line), in input order
    errors: list[dict[str, Any]] | None = None  # validation errors: the batch failed
    cancelled_mono: float | None = None
    kept: int | None = None  # results finished before a cancel
    output_file_id: str | None = None
    error_file_id: str | None = None
    finished_at: int | None = None


class OpenAIEmulator(EmulatorCore[OpenAIConfig]):
    """The OpenAI API on top of the shared core; the aiohttp handlers are thin wrappers."""

    def __init__(self, config: OpenAIConfig | None = None) -> None:
        super().__init__(config or OpenAIConfig())
        self._files: dict[str, _File] = {}
        self._batches: dict[str, _Batch] = {}

    def forget_jobs(self) -> None:
        self._files.clear()
        self._batches.clear()

    def extra_stats(self) -> dict[str, Any]:
        return {"batches": len(self._batches), "files": len(self._files)}

    def _authenticate(self, key: str | None) -> str:
        status = self.key_status(key)
        if status == "missing" or key is None:
            raise OpenAIError(
                401,
                "You didn't provide an API key. You need to provide your API key in an"
                " Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                outcome="no_key",
            )
        if status == "invalid":
            raise OpenAIError(
                401,
                f"Incorrect API key provided: {_masked(key)}. You can find your API key at"
                " https://platform.openai.com/account/api-keys.",
                code="invalid_api_key",
                outcome="invalid_key",
            )
        if status == "revoked":
            raise OpenAIError(
                403,
                "You have insufficient permissions for this operation. Missing scopes:"
                " model.request.",
                code="insufficient_permissions",
                outcome="revoked_key",
            )
        return key

    def _check_model(self, model: str) -> None:
        if not self.serves(model):
            raise OpenAIError(
                404,
                f"The model `{model}` does not exist or you do not have access to it.",
                code="model_not_found",
                outcome="not_found",
            )

    def rate_headers(self, key: str, model: str, now: float) -> dict[str, str]:
        headers = {"x-request-id": f"req_{self.new_id('req')}"}
        for metric, (limit, remaining, reset) in self.remaining(key, model, now).items():
            headers[f"x-ratelimit-limit-{metric}"] = str(limit)
            headers[f"x-ratelimit-remaining-{metric}"] = str(remaining)
            headers[f"x-ratelimit-reset-{metric}"] = duration(reset)
        return headers

    def _rate_limited(self, key: str, model: str, now: float, refusal: Refusal) -> OpenAIError:
        headers = self.rate_headers(key, model, now)
        wait = refusal.retry_after
        headers["retry-after"] = str(max(1, math.ceil(wait)))
        v = refusal.violations[0]
        metric = "requests per min (RPM)" if v.metric == "rpm" else "tokens per min (TPM)"
        if v.metric == "rpd":
            metric = "requests per day (RPD)"
        project = self.project_of(key)
        message = (
            f"Rate limit reached for {model} in organization org-{project} on {metric}:"
            f" Limit {v.limit}. Please try again in {duration(wait)}. Visit {RATE_LIMIT_DOC}"
            " to learn more."
        )
        kind = "tokens" if v.metric == "tpm" else "requests"
        return OpenAIError(
            429, message, kind, "rate_limit_exceeded", outcome="429", headers=headers
        )

    # -- chat completions --

    def _outcome_error(self, outcome: str) -> OpenAIError | None:
        if outcome in ("500", "502", "503"):
            return server_error(outcome)
        if outcome == "insufficient_quota":
            return OpenAIError(
                429,
                "You exceeded your current quota, please check your plan and billing details.",
                "insufficient_quota",
                "insufficient_quota",
                outcome="insufficient_quota",
            )
        return None

    async def chat_completion(
        self, key: str | None, body: Mapping[str, Any]
    ) -> tuple[int, Any, dict[str, str]]:
        """(status, JSON body or raw bytes for non_json, headers) of one chat completion."""
        t = time.monotonic()
        cfg = self._config
        model = str(body.get("model") or "")
        with self.recording_errors(t=t, key=key, model=model, method="chat.completions"):
            key = self._authenticate(key)
            req = parse_chat(body)
            self._check_model(req.model)
            outcome, source = self.next_outcome(req.markers, key)
            weight = req.prompt_tokens + (req.max_completion_tokens or 0)
            refusal = self.admit_outcome(key, model, weight, t, outcome=outcome, source=source)
            if refusal is not None:
                raise self._rate_limited(key, model, t, refusal).refused(refusal)
        headers = self.rate_headers(key, model, t)
        with self.tracking():
            error = self._outcome_error(outcome)
            if error is not None:
                error.headers = headers
                await self.fail_late(
                    error, t=t, key=key, model=model, method="chat.completions", source=source
                )
            answer, tokens = build_completion(
                req,
                outcome,
                completion_id=self.new_id(),
                honour_format=cfg.honour_response_format,
            )
            delay = self.latency(tokens["completion"])
            await asyncio.sleep(delay)
            self.record(
                t=t,
                key=key,
                model=model,
                method="chat.completions",
                status=200,
                outcome=outcome,
                tokens=tokens,
                latency=delay,
                source=source,
            )
            if outcome == "non_json":
                return 200, _NON_JSON_PAGE, headers
            return 200, answer, headers

    def _batch_line(self, key: str, body: Any) -> tuple[bool, dict[str, Any], dict[str, int]]:
        """One batch request answered at once: (succeeded, response or error, tokens)."""
        try:
            if not isinstance(body, Mapping):
                raise bad_request("'body' must be an object.")
            req = parse_chat(body)
            self._check_model(req.model)
            outcome, _ = self.take_outcome(req.markers, key)
            if outcome in ("429", "non_json"):
                outcome = "500"  # neither exists inside a batch; the line fails instead
            error = self._outcome_error(outcome)
            if error is not None:
                raise error
            answer, tokens = build_completion(
                req,
                outcome,
                completion_id=self.new_id(),
                honour_format=self._config.honour_response_format,
            )
            return True, {"status_code": 200, "request_id": self.new_id(), "body": answer}, tokens
        except OpenAIError as exc:
            response = {"status_code": exc.code, "request_id": self.new_id(), "body": exc.body()}
            return False, {"response": response, "error": exc.line_error()}, {}

    # -- files --

    def upload_file(
        self, key: str | None, filename: str, purpose: str, data: bytes
    ) -> dict[str, Any]:
        t = time.monotonic()
        with self.recording_errors(t=t, key=key, model="", method="files.create"):
            key = self._authenticate(key)
            if purpose not in ("batch", "vision", "user_data", "assistants", "fine-tune", "evals"):
                raise bad_request(f"Invalid purpose: {purpose!r}.", param="purpose")
        file = _File(
            id=f"file-{self.new_id('file')}",
            project=self.project_of(key),
            filename=filename,
            purpose=purpose,
            data=data,
            created_at=int(time.time()),
        )
        self._files[file.id] = file
        self.record(t=t, key=key, model="", method="files.create", status=200, outcome="ok")
        return file.to_json()

    def _file(self, key: str | None, file_id: str) -> _File:
        key = self._authenticate(key)
        self._refresh_outputs()
        file = self._files.get(file_id)
        if file is None or file.project != self.project_of(key):
            raise not_found(f"No such File object: {file_id}")
        return file

    def file_info(self, key: str | None, file_id: str) -> dict[str, Any]:
        return self._file(key, file_id).to_json()

    def file_content(self, key: str | None, file_id: str) -> bytes:
        return self._file(key, file_id).data

    def delete_file(self, key: str | None, file_id: str) -> dict[str, Any]:
        file = self._file(key, file_id)
        del self._files[file.id]
        return {"id": file.id, "object": "file", "deleted": True}

    # -- batches --

    def create_batch(self, key: str | None, body: Mapping[str, Any]) -> dict[str, Any]:
        t = time.monotonic()
        with self.recording_errors(t=t, key=key, model="", method="batches.create"):
            key = self._authenticate(key)
            file_id = body.get("input_file_id")
            endpoint = body.get("endpoint")
            window = body.get("completion_window")
            if endpoint != CHAT_PATH:
                raise bad_request(
                    f"Invalid endpoint {endpoint!r}: the emulator serves {CHAT_PATH}.",
                    param="endpoint",
                )
            if window != "24h":
                raise bad_request("completion_window must be '24h'.", param="completion_window")
            file = self._files.get(str(file_id))
            if file is None or file.project != self.project_of(key):
                raise not_found(f"No such File object: {file_id}")
            limit = self._config.max_concurrent_batches
            project = self.project_of(key)
            unfinished = sum(
                b.project == project and self._batch_status(b, t) in ("validating", "in_progress")
                for b in self._batches.values()
            )
            if limit is not None and unfinished >= limit:
                raise OpenAIError(
                    429,
                    f"Enqueued batches limit reached: {unfinished} of at most {limit}.",
                    "invalid_request_error",
                    "batch_limit_exceeded",
                    outcome="429",
                )
        lines, errors, tokens, model = self._answer_file(key, file)
        metadata = body.get("metadata")
        batch = _Batch(
            id=f"batch_{self.new_id('batch')}",
            project=self.project_of(key),
            input_file_id=file.id,
            endpoint=CHAT_PATH,
            completion_window="24h",
            metadata=dict(metadata) if isinstance(metadata, Mapping) else None,
            created_at=int(time.time()),
            created_mono=t,
            lines=lines,
            errors=errors or None,
        )
        self._batches[batch.id] = batch
        self.record(
            t=t,
            key=key,
            model=model,
            method="batches.create",
            status=200,
            outcome="ok",
            tokens=tokens,
        )
        return self._batch_json(batch)

    def _answer_file(
        self, key: str, file: _File
    ) -> tuple[list[tuple[bool, dict[str, Any]]], list[dict[str, Any]], dict[str, int], str]:
        """Every line answered, or the validation errors that fail the whole batch."""
        errors: list[dict[str, Any]] = []
        requests: list[tuple[str, Any]] = []
        seen: set[str] = set()
        for number, raw in enumerate(file.data.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                line = orjson.loads(raw)
            except orjson.JSONDecodeError:
                errors.append(
                    {
                        "code": "invalid_json_line",
                        "message": "This line is not valid JSON.",
                        "line": number,
                    }
                )
                continue
            custom_id = line.get("custom_id") if isinstance(line, dict) else None
            if not isinstance(custom_id, str) or not custom_id:
                errors.append(
                    {
                        "code": "missing_required_parameter",
                        "message": "Missing custom_id.",
                        "param": "custom_id",
                        "line": number,
                    }
                )
            elif custom_id in seen:
                errors.append(
                    {
                        "code": "duplicate_custom_id",
                        "message": f"The custom_id {custom_id!r} is not unique.",
                        "param": "custom_id",
                        "line": number,
                    }
                )
            elif line.get("url") != CHAT_PATH or line.get("method") != "POST":
                errors.append(
                    {
                        "code": "invalid_url",
                        "message": f"The url must be {CHAT_PATH} with method POST.",
                        "param": "url",
                        "line": number,
                    }
                )
            else:
                seen.add(custom_id)
                requests.append((custom_id, line.get("body")))
        if not requests and not errors:
            errors.append(
                {"code": "empty_file", "message": "The input file has no requests.", "line": None}
            )
        if len(requests) > self._config.max_batch_requests:
            errors.append(
                {
                    "code": "too_many_requests",
                    "message": f"At most {self._config.max_batch_requests} requests per batch.",
                    "line": None,
                }
            )
        if errors:
            return [], errors, {}, ""
        lines: list[tuple[bool, dict[str, Any]]] = []
        total: dict[str, int] = {}
        model = ""
        for custom_id, body in requests:
            ok, result, tokens = self._batch_line(key, body)
            if isinstance(body, Mapping):
                model = model or str(body.get("model") or "")
            for name, value in tokens.items():
                total[name] = total.get(name, 0) + value
            entry: dict[str, Any] = {
                "id": f"batch_req_{self.new_id('line')}",
                "custom_id": custom_id,
            }
            if ok:
                entry |= {"response": result, "error": None}
            else:
                entry |= result
            lines.append((ok, entry))
        return lines, [], total, model

    def _batch_status(self, batch: _Batch, now: float) -> str:
        if batch.errors:
            return "failed"
        if batch.cancelled_mono is not None:
            return "cancelled"
        return {"pending": "validating", "running": "in_progress", "done": "completed"}[
            self.batch_phase(batch.created_mono, now)
        ]

    def _results(self, batch: _Batch) -> list[tuple[bool, dict[str, Any]]]:
        return batch.lines if batch.kept is None else batch.lines[: batch.kept]

    def _refresh_outputs(self) -> None:
        """Write the output and error files of batches that have just finished."""
        now = time.monotonic()
        for batch in self._batches.values():
            if batch.finished_at is not None or self._batch_status(batch, now) not in (
                "completed",
                "cancelled",
            ):
                continue
            batch.finished_at = int(time.time())
            results = list(self._results(batch))
            if self._config.batch_shuffle_output:
                random.Random(batch.id).shuffle(results)
            for ok, name in ((True, "output"), (False, "error")):
                chosen = [line for success, line in results if success is ok]
                if not chosen:
                    continue
                file = _File(
                    id=f"file-{self.new_id('file')}",
                    project=batch.project,
                    filename=f"{batch.id}_{name}.jsonl",
                    purpose="batch_output",
                    data=b"".join(orjson.dumps(line) + b"\n" for line in chosen),
                    created_at=batch.finished_at,
                )
                self._files[file.id] = file
                if ok:
                    batch.output_file_id = file.id
                else:
                    batch.error_file_id = file.id

    def _batch_json(self, batch: _Batch) -> dict[str, Any]:
        self._refresh_outputs()
        now = time.monotonic()
        status = self._batch_status(batch, now)
        done = status in ("completed", "cancelled")
        results = self._results(batch) if done else []
        completed = sum(ok for ok, _ in results)
        started = batch.created_at + int(self._config.batch_pending_seconds)
        return {
            "id": batch.id,
            "object": "batch",
            "endpoint": batch.endpoint,
            "errors": {"object": "list", "data": batch.errors} if batch.errors else None,
            "input_file_id": batch.input_file_id,
            "completion_window": batch.completion_window,
            "status": status,
            "output_file_id": batch.output_file_id,
            "error_file_id": batch.error_file_id,
            "created_at": batch.created_at,
            "in_progress_at": started if status != "validating" and not batch.errors else None,
            "expires_at": batch.created_at + 86_400,
            "finalizing_at": batch.finished_at if status == "completed" else None,
            "completed_at": batch.finished_at if status == "completed" else None,
            "failed_at": batch.created_at if batch.errors else None,
            "expired_at": None,
            "cancelling_at": batch.finished_at if status == "cancelled" else None,
            "cancelled_at": batch.finished_at if status == "cancelled" else None,
            "request_counts": {
                "total": len(batch.lines),
                "completed": completed,
                "failed": len(results) - completed,
            },
            "metadata": batch.metadata,
        }

    def _batch(self, key: str | None, batch_id: str) -> _Batch:
        key = self._authenticate(key)
        batch = self._batches.get(batch_id)
        if batch is None or batch.project != self.project_of(key):
            raise not_found(f"No batch found with id '{batch_id}'.")
        return batch

    def get_batch(self, key: str | None, batch_id: str) -> dict[str, Any]:
        return self._batch_json(self._batch(key, batch_id))

    def cancel_batch(self, key: str | None, batch_id: str) -> dict[str, Any]:
        batch = self._batch(key, batch_id)
        now = time.monotonic()
        status = self._batch_status(batch, now)
        if status in ("validating", "in_progress"):
            cfg = self._config
            running_for = now - batch.created_mono - cfg.batch_pending_seconds
            share = max(0.0, running_for) / max(cfg.batch_running_seconds, 1e-9)
            batch.kept = min(len(batch.lines), int(len(batch.lines) * share))
            batch.cancelled_mono = now
        elif status != "cancelled":
            raise OpenAIError(
                409, f"Cannot cancel a batch with status '{status}'.", outcome="conflict"
            )
        return self._batch_json(batch)

    def list_batches(self, key: str | None, limit: int, after: str | None) -> dict[str, Any]:
        key = self._authenticate(key)
        project = self.project_of(key)
        batches = [b for b in reversed(self._batches.values()) if b.project == project]
        if after is not None:
            ids = [b.id for b in batches]
            batches = batches[ids.index(after) + 1 :] if after in ids else []
        page = batches[:limit]
        data = [self._batch_json(b) for b in page]
        return {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": len(batches) > limit,
        }

    def list_models(self, key: str | None) -> dict[str, Any]:
        self._authenticate(key)
        names = self._config.models or ["gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "gpt-5-mini"]
        return {"object": "list", "data": [self._model_json(n) for n in names]}

    def model_info(self, key: str | None, model: str) -> dict[str, Any]:
        self._authenticate(key)
        self._check_model(model)
        return self._model_json(model)

    def _model_json(self, model: str) -> dict[str, Any]:
        return {"id": model, "object": "model", "created": 1_700_000_000, "owned_by": "emulator"}


# --------------------------------------------------------------------------------------------
# HTTP layer

EMULATOR_KEY = web.AppKey("openai_emulator", OpenAIEmulator)


def _api_key(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip() or None
    return request.headers.get("api-key")  # Azure's spelling


async def _body(request: web.Request) -> dict[str, Any]:
    return await read_json(request, bad_request)


async def _chat(request: web.Request) -> web.StreamResponse:
    emulator = request.app[EMULATOR_KEY]
    status, answer, headers = await emulator.chat_completion(
        _api_key(request), await _body(request)
    )
    if isinstance(answer, bytes):
        return web.Response(body=answer, status=status, content_type="text/html", headers=headers)
    return json_response(answer, status, headers)


async def _models(request: web.Request) -> web.StreamResponse:
    emulator = request.app[EMULATOR_KEY]
    model = request.match_info.get("model")
    if model is None:
        return json_response(emulator.list_models(_api_key(request)))
    return json_response(emulator.model_info(_api_key(request), model))


async def _upload(request: web.Request) -> web.StreamResponse:
    emulator = request.app[EMULATOR_KEY]
    if not request.content_type.startswith("multipart/"):
        raise bad_request("Uploads must be multipart/form-data.")
    purpose, filename, data = "", "upload.jsonl", b""
    reader = await request.multipart()
    async for part in reader:
        if not isinstance(part, BodyPartReader):
            continue
        if part.name == "purpose":
            purpose = (await part.read()).decode()
        elif part.name == "file":
            filename = part.filename or filename
            data = bytes(await part.read())
    return json_response(emulator.upload_file(_api_key(request), filename, purpose, data))


async def _file(request: web.Request) -> web.StreamResponse:
    emulator = request.app[EMULATOR_KEY]
    file_id = request.match_info["file_id"]
    key = _api_key(request)
    if request.method == "DELETE":
        return json_response(emulator.delete_file(key, file_id))
    return json_response(emulator.file_info(key, file_id))


async def _file_content(request: web.Request) -> web.StreamResponse:
    emulator = request.app[EMULATOR_KEY]
    data = emulator.file_content(_api_key(request), request.match_info["file_id"])
    return web.Response(body=data, content_type="application/octet-stream")


async def _batches(request: web.Request) -> web.StreamResponse:
    emulator = request.app[EMULATOR_KEY]
    key = _api_key(request)
    if request.method == "POST":
        return json_response(emulator.create_batch(key, await _body(request)))
    try:
        limit = max(1, min(100, int(request.query.get("limit", "20"))))
    except ValueError:
        raise bad_request("limit must be an integer.", param="limit") from None
    return json_response(emulator.list_batches(key, limit, request.query.get("after")))


async def _batch(request: web.Request) -> web.StreamResponse:
    emulator = request.app[EMULATOR_KEY]
    batch_id = request.match_info["batch_id"]
    if request.match_info.get("action") == "cancel":
        return json_response(emulator.cancel_batch(_api_key(request), batch_id))
    return json_response(emulator.get_batch(_api_key(request), batch_id))


def create_app(emulator: OpenAIEmulator) -> web.Application:
    app = web.Application(
        client_max_size=MAX_BODY_BYTES, middlewares=[error_middleware(server_error)]
    )
    app[EMULATOR_KEY] = emulator
    app.router.add_post(CHAT_PATH, _chat)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/v1/models/{model:.+}", _models)
    app.router.add_post("/v1/files", _upload)
    app.router.add_route("GET", "/v1/files/{file_id}", _file)
    app.router.add_route("DELETE", "/v1/files/{file_id}", _file)
    app.router.add_get("/v1/files/{file_id}/content", _file_content)
    app.router.add_route("*", "/v1/batches", _batches)
    app.router.add_get("/v1/batches/{batch_id}", _batch)
    app.router.add_post("/v1/batches/{batch_id}/{action:cancel}", _batch)
    add_control_routes(app, emulator)
    return app


def running_openai_emulator(
    config: OpenAIConfig | None = None, host: str = "127.0.0.1", port: int = 0
) -> contextlib.AbstractAsyncContextManager[tuple[OpenAIEmulator, str]]:
    """``async with running_openai_emulator(cfg) as (emulator, base_url): ...``

    ``base_url`` is the server's root; the SDK's ``base_url`` is ``base_url + "/v1"``.
    """
    emulator = OpenAIEmulator(config)
    return running(emulator, create_app(emulator), host, port)


# --------------------------------------------------------------------------------------------
# Command line


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="openai-server",
        description="OpenAI-compatible API emulator for tests and benchmarks (no network).",
    )
    add_common_arguments(parser, OUTCOMES, default_port=8791)
    parser.add_argument(
        "--ignore-response-format",
        dest="honour_response_format",
        action="store_false",
        default=None,
        help="answer like a server that ignores response_format (JSON in prose and a fence)",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> OpenAIConfig:
    patch = common_patch(args, OUTCOMES, ("honour_response_format",))
    return OpenAIConfig.from_dict(patch)


def main(argv: list[str] | None = None) -> None:
    """Run the emulator standalone (``imagestream dev openai-server`` calls this)."""

    def build(args: argparse.Namespace) -> Callable[[], web.Application]:
        config = config_from_args(args)
        return lambda: create_app(OpenAIEmulator(config))

    serve_main(build_arg_parser(), argv, "OpenAI-compatible emulator", build)


if __name__ == "__main__":
    main()
