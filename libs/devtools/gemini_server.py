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

Endpoints for tests and benchmarks live under ``/_emulator/`` (no key needed):
``GET stats`` (counters per key, project and outcome, token totals, the request log with
monotonic and wall-clock timestamps), ``GET log``, ``GET|POST config``, ``POST outcomes``
(queue the next outcomes, for everyone or one key), ``POST reset``, ``GET health``.

Outcomes can be forced per request with a marker in any text part, e.g. ``[[emulate:503]]``;
see ``OUTCOMES``. Everything random (latency, error injection) draws from one seeded RNG.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import ipaddress
import json
import logging
import math
import random
import signal
import socket
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import msgspec
import orjson
import uvloop
from aiohttp import web

from .gemini_answers import (
    OUTCOMES,
    ParsedRequest,
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
from .gemini_quota import QuotaBook, QuotaLimits, Violation
from .gemini_tokens import model_generation

log = logging.getLogger(__name__)

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
MAX_BODY_BYTES = 64 * 1024 * 1024  # Gemini takes up to 20 MB inline; batches carry many.


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass
class LatencyConfig:
    """Time each admitted request takes. kind "lognormal": median * exp(sigma * N(0, 1))."""

    kind: Literal["none", "fixed", "lognormal"] = "none"
    median_ms: float = 0.0
    sigma: float = 0.5
    max_ms: float = 120_000.0
    per_output_token_ms: float = 0.0  # added per generated token, like a real decoder

    def sample(self, rng: random.Random, output_tokens: int = 0) -> float:
        """Seconds to wait."""
        if self.kind == "none":
            base = 0.0
        elif self.kind == "fixed":
            base = self.median_ms
        else:
            base = self.median_ms * math.exp(self.sigma * rng.gauss(0.0, 1.0))
        total = base + self.per_output_token_ms * output_tokens
        return max(0.0, min(total, self.max_ms)) / 1000.0


def _default_limits() -> QuotaLimits:
    # Roughly Tier 1 for gemini-2.5-flash (https://ai.google.dev/gemini-api/docs/rate-limits).
    return QuotaLimits(rpm=1000, tpm=1_000_000, rpd=10_000)


@dataclass
class EmulatorConfig:
    """Every knob of the emulator. Changeable at runtime through POST /_emulator/config."""

    # Quota. A key in `key_projects` shares its project's limits (`projects`, else the
    # default) with the project's other keys; any other key is its own project, limited by
    # `key_limits` or the default. None in a QuotaLimits field means unlimited.
    default_limits: QuotaLimits = field(default_factory=_default_limits)
    projects: dict[str, QuotaLimits] = field(default_factory=dict)
    key_projects: dict[str, str] = field(default_factory=dict)
    key_limits: dict[str, QuotaLimits] = field(default_factory=dict)
    window_seconds: float = 60.0  # the "minute" of RPM and TPM (tests shorten it)
    day_seconds: float = 86_400.0  # the "day" of RPD
    quota_per_model: bool = True  # Google meters each model separately
    # Keys. None: any non-empty key is accepted unless listed as invalid or revoked.
    valid_keys: set[str] | None = None
    invalid_keys: set[str] = field(default_factory=set)  # 400 API_KEY_INVALID
    revoked_keys: set[str] = field(default_factory=set)  # 403 PERMISSION_DENIED
    # Behaviour.
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    error_rates: dict[str, float] = field(default_factory=dict)  # outcome -> probability
    seed: int = 0
    honour_markers: bool = True
    # "ceil": whole seconds rounded up ("13s", as Google formats it); "exact": milliseconds.
    retry_delay_format: Literal["ceil", "exact"] = "ceil"
    forced_429_retry_seconds: float = 1.0  # RetryInfo of an injected (non-quota) 429
    # Real 2.5 Flash/Pro and Gemini 3 think by default; off here unless asked, so token
    # counts stay predictable.
    default_thinking: bool = False
    batch_pending_seconds: float = 1.0
    batch_running_seconds: float = 2.0
    # Batch API jobs a project may have pending or running at once (Google: 100); one more
    # is answered 429 RESOURCE_EXHAUSTED. None: no limit.
    max_concurrent_batches: int | None = None
    max_log_entries: int = 200_000

    def validate(self) -> None:
        unknown = set(self.error_rates) - set(OUTCOMES)
        if unknown:
            raise ValueError(f"unknown outcomes in error_rates: {sorted(unknown)}")
        if any(p < 0 for p in self.error_rates.values()):
            raise ValueError("error rates must be >= 0")
        if sum(p for o, p in self.error_rates.items() if o != "ok") > 1.0 + 1e-9:
            raise ValueError("error rates add up to more than 1")
        if self.window_seconds <= 0 or self.day_seconds <= 0:
            raise ValueError("window_seconds and day_seconds must be > 0")
        if self.max_log_entries < 0:
            raise ValueError("max_log_entries must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return cast(dict[str, Any], msgspec.to_builtins(self))

    def merged(self, patch: Mapping[str, Any]) -> EmulatorConfig:
        """A new config: `patch` deep-merged into this one (mappings merge, the rest replaces).

        Two extra keys act on the key sets: ``revoke`` / ``unrevoke`` (lists of keys).
        """
        patch = dict(patch)
        revoke = patch.pop("revoke", None) or []
        unrevoke = patch.pop("unrevoke", None) or []
        data = _deep_merge(self.to_dict(), patch)
        revoked = set(data.get("revoked_keys") or [])
        revoked |= set(revoke)
        revoked -= set(unrevoke)
        data["revoked_keys"] = sorted(revoked)
        config = msgspec.convert(data, EmulatorConfig)
        config.validate()
        return config

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EmulatorConfig:
        return cls().merged(data)


def _deep_merge(base: dict[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in patch.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_keys_file(path: Path) -> dict[str, Any]:
    """A config patch from a keys file.

    JSON: any subset of EmulatorConfig (typically key_projects, projects, key_limits,
    valid_keys, invalid_keys, revoked_keys). Otherwise text, one key per line, optionally
    followed by its project: ``AIza... project-a``; "#" starts a comment. A text file also
    makes its keys the only valid ones.
    """
    raw = path.read_text()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        return data
    keys: list[str] = []
    projects: dict[str, str] = {}
    for line in raw.splitlines():
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        keys.append(fields[0])
        if len(fields) > 1:
            projects[fields[0]] = fields[1]
    return {"valid_keys": keys, "key_projects": projects}


# --------------------------------------------------------------------------------------------
# The emulator


def rfc3339(wall: float) -> str:
    stamp = dt.datetime.fromtimestamp(wall, tz=dt.UTC)
    return stamp.isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass
class _KeyStats:
    project: str
    requests: int = 0
    status: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    tokens: Counter[str] = field(default_factory=Counter)
    first_t: float | None = None
    last_t: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "project": self.project,
            "requests": self.requests,
            "rate_limited": self.status.get("429", 0),
            "status": dict(self.status),
            "outcomes": dict(self.outcomes),
            "tokens": dict(self.tokens),
            "first_t": self.first_t,
            "last_t": self.last_t,
        }


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


class Emulator:
    """The emulator's state and behaviour; the aiohttp handlers are thin wrappers around it."""

    def __init__(self, config: EmulatorConfig | None = None) -> None:
        self._initial = config or EmulatorConfig()
        self._initial.validate()
        self._config = self._initial
        self._rng = random.Random(self._config.seed)
        self._quota = QuotaBook(self._config.window_seconds, self._config.day_seconds)
        self._queues: dict[str | None, deque[str]] = {}
        self._log: deque[dict[str, Any]] = deque(maxlen=self._config.max_log_entries or None)
        self._keys: dict[str, _KeyStats] = {}
        self._outcomes: Counter[str] = Counter()
        self._status: Counter[str] = Counter()
        self._tokens: Counter[str] = Counter()
        self._batches: dict[str, _BatchJob] = {}
        self._seq = 0
        self._in_flight = 0
        self._max_in_flight = 0
        self.started_wall = time.time()
        self.started_mono = time.monotonic()

    # -- configuration and control --

    @property
    def config(self) -> EmulatorConfig:
        return self._config

    def set_config(self, config: EmulatorConfig) -> None:
        config.validate()
        old = self._config
        self._config = config
        if (old.window_seconds, old.day_seconds) != (config.window_seconds, config.day_seconds):
            # Windows of another length cannot be carried over meaningfully.
            self._quota = QuotaBook(config.window_seconds, config.day_seconds)
        if old.seed != config.seed:
            self._rng = random.Random(config.seed)
        if old.max_log_entries != config.max_log_entries:
            self._log = deque(self._log, maxlen=config.max_log_entries or None)

    def update_config(self, patch: Mapping[str, Any]) -> EmulatorConfig:
        self.set_config(self._config.merged(patch))
        return self._config

    def revoke_key(self, key: str) -> None:
        self.update_config({"revoke": [key]})

    def queue_outcomes(self, outcomes: list[str], key: str | None = None) -> None:
        """The next requests (of `key`, or of anyone) get these outcomes, in order."""
        unknown = [o for o in outcomes if o not in OUTCOMES]
        if unknown:
            raise ValueError(f"unknown outcomes: {unknown}; known: {list(OUTCOMES)}")
        self._queues.setdefault(key, deque()).extend(outcomes)

    def reset(self, *, restore_config: bool = False) -> None:
        """Forget all traffic: counters, log, quota windows, queued outcomes, batches."""
        config = self._initial if restore_config else self._config
        self._config = config
        self._rng = random.Random(config.seed)
        self._quota = QuotaBook(config.window_seconds, config.day_seconds)
        self._queues.clear()
        self._log = deque(maxlen=config.max_log_entries or None)
        self._keys.clear()
        self._outcomes.clear()
        self._status.clear()
        self._tokens.clear()
        self._batches.clear()
        self._max_in_flight = self._in_flight

    # -- inspection --

    def request_log(
        self,
        *,
        key: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Log entries (oldest first) filtered by key and monotonic time ``t`` in [since, until].

        One entry per API call: ``t`` (arrival, ``time.monotonic()`` of this host, so a test
        in another process on the same machine can compare), ``wall`` (the same instant as
        Unix time), ``t_done``, ``key``, ``project``, ``model``, ``method``, ``status``,
        ``outcome`` ("ok", "quota_exceeded" for a real quota refusal, an injected outcome
        name, "invalid_key", "revoked_key", "no_key", "bad_request", ...), token counts,
        ``latency_ms``, ``retry_delay_s`` on 429s and ``forced_by`` (marker / queue:KEY).
        """
        out = [
            e
            for e in self._log
            if (key is None or e["key"] == key)
            and (since is None or e["t"] >= since)
            and (until is None or e["t"] <= until)
        ]
        if limit is not None and limit >= 0:
            out = out[-limit:] if limit else []
        return out

    def stats(self, *, include_log: bool = True) -> dict[str, Any]:
        now = time.monotonic()
        projects: dict[str, dict[str, Any]] = {}
        for ks in self._keys.values():
            agg = projects.setdefault(
                ks.project, {"keys": 0, "requests": 0, "rate_limited": 0, "tokens": Counter()}
            )
            agg["keys"] += 1
            agg["requests"] += ks.requests
            agg["rate_limited"] += ks.status.get("429", 0)
            agg["tokens"].update(ks.tokens)
        for agg in projects.values():
            agg["tokens"] = dict(agg["tokens"])
        out: dict[str, Any] = {
            "started_wall": self.started_wall,
            "started_t": self.started_mono,
            "now_t": now,
            "requests": sum(self._status.values()),
            "status": dict(self._status),
            "outcomes": dict(self._outcomes),
            "rate_limited": self._status.get("429", 0),
            "tokens": dict(self._tokens),
            "in_flight": self._in_flight,
            "max_in_flight": self._max_in_flight,
            "keys": {k: v.to_json() for k, v in self._keys.items()},
            "projects": projects,
            "quota_windows": self._quota.usage(now),
            "queued_outcomes": {str(k): list(q) for k, q in self._queues.items() if q},
            "batches": len(self._batches),
        }
        if include_log:
            out["log"] = list(self._log)
        return out

    # -- keys and quota --

    def project_of(self, key: str) -> str:
        return self._config.key_projects.get(key) or f"key:{key}"

    def limits_of(self, key: str) -> QuotaLimits:
        cfg = self._config
        project = cfg.key_projects.get(key)
        if project is not None:
            return cfg.projects.get(project, cfg.default_limits)
        return cfg.key_limits.get(key, cfg.default_limits)

    def _authenticate(self, key: str | None) -> str:
        cfg = self._config
        if not key:
            raise missing_key_error()
        if key in cfg.invalid_keys:
            raise invalid_key_error()
        if cfg.valid_keys is not None and not (
            key in cfg.valid_keys
            or key in cfg.key_projects
            or key in cfg.key_limits
            or key in cfg.revoked_keys
        ):
            raise invalid_key_error()
        if key in cfg.revoked_keys:
            raise suspended_key_error(key, self.project_of(key))
        return key

    def _next_outcome(self, req: ParsedRequest, key: str) -> tuple[str, str]:
        """(outcome, source) without consuming a queued one; source: marker|queue:K|random."""
        cfg = self._config
        if cfg.honour_markers:
            for marker in req.markers:
                if marker in OUTCOMES:
                    return marker, "marker"
        for queue_key in (key, None):
            queue = self._queues.get(queue_key)
            if queue:
                return queue[0], f"queue:{queue_key}"
        if cfg.error_rates:
            draw = self._rng.random()
            acc = 0.0
            for outcome in OUTCOMES:
                acc += cfg.error_rates.get(outcome, 0.0) if outcome != "ok" else 0.0
                if draw < acc:
                    return outcome, "random"
        return "ok", "random"

    def _consume(self, source: str, key: str) -> None:
        if source.startswith("queue:"):
            queue_key: str | None = key if source == f"queue:{key}" else None
            queue = self._queues.get(queue_key)
            if queue:
                queue.popleft()

    def _new_response_id(self) -> str:
        self._seq += 1
        raw = hashlib.sha256(f"{self.started_wall}-{self._seq}".encode()).digest()[:17]
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    # -- recording --

    def _record(
        self,
        *,
        t: float,
        key: str | None,
        model: str,
        method: str,
        status: int,
        outcome: str,
        usage: Usage | None = None,
        latency: float = 0.0,
        retry_delay: float | None = None,
        source: str | None = None,
    ) -> None:
        key_name = key or ""
        project = self.project_of(key_name) if key_name else ""
        entry: dict[str, Any] = {
            "t": t,
            "wall": self.started_wall + (t - self.started_mono),
            "t_done": time.monotonic(),
            "key": key_name,
            "project": project,
            "model": model,
            "method": method,
            "status": status,
            "outcome": outcome,
        }
        if usage is not None:
            entry["prompt_tokens"] = usage.prompt
            entry["candidates_tokens"] = usage.candidates
            entry["thoughts_tokens"] = usage.thoughts
        if latency:
            entry["latency_ms"] = round(latency * 1000, 3)
        if retry_delay is not None:
            entry["retry_delay_s"] = retry_delay
        if source is not None and source != "random":
            entry["forced_by"] = source
        self._log.append(entry)
        self._status[str(status)] += 1
        self._outcomes[outcome] += 1
        stats = self._keys.get(key_name)
        if stats is None:
            stats = self._keys[key_name] = _KeyStats(project=project)
        stats.requests += 1
        stats.status[str(status)] += 1
        stats.outcomes[outcome] += 1
        stats.first_t = t if stats.first_t is None else stats.first_t
        stats.last_t = t
        if usage is not None and method != "countTokens":
            for name, value in (
                ("prompt", usage.prompt),
                ("candidates", usage.candidates),
                ("thoughts", usage.thoughts),
                ("total", usage.total),
            ):
                stats.tokens[name] += value
                self._tokens[name] += value

    @contextlib.contextmanager
    def _tracking(self) -> Iterator[None]:
        self._in_flight += 1
        self._max_in_flight = max(self._max_in_flight, self._in_flight)
        try:
            yield
        finally:
            self._in_flight -= 1

    # -- API methods -----------------------------------------------------------------------

    async def generate_content(
        self, key: str | None, model: str, body: Mapping[str, Any], *, method: str
    ) -> dict[str, Any]:
        t = time.monotonic()
        cfg = self._config
        source: str | None = None
        try:
            key = self._authenticate(key)
            req = parse_request(body, model)
            outcome, source = self._next_outcome(req, key)
            if outcome == "429":
                self._consume(source, key)
                error = quota_error(
                    [Violation("rpm", self.limits_of(key).rpm or 0, cfg.forced_429_retry_seconds)],
                    model,
                    cfg.forced_429_retry_seconds,
                    cfg.retry_delay_format,
                )
                self._record(
                    t=t,
                    key=key,
                    model=model,
                    method=method,
                    status=429,
                    outcome="429",
                    retry_delay=cfg.forced_429_retry_seconds,
                    source=source,
                )
                raise error
            scope = (self.project_of(key), model if cfg.quota_per_model else "*")
            violations = self._quota.check(scope, self.limits_of(key), req.prompt_tokens, t)
            if violations:
                wait = max(v.retry_after for v in violations)
                if math.isinf(wait):
                    # Larger than the whole TPM limit: it will never fit; say "a window".
                    wait = cfg.window_seconds
                self._record(
                    t=t,
                    key=key,
                    model=model,
                    method=method,
                    status=429,
                    outcome="quota_exceeded",
                    retry_delay=wait,
                )
                raise quota_error(violations, model, wait, cfg.retry_delay_format)
            self._quota.admit(scope, req.prompt_tokens, t)
            self._consume(source, key)
        except ApiError as exc:
            if exc.code != 429:
                self._record(
                    t=t, key=key, model=model, method=method, status=exc.code, outcome=exc.outcome
                )
            raise
        with self._tracking():
            forced = source == "marker" or (source or "").startswith("queue:")
            if outcome in ("500", "503", "504"):
                delay = cfg.latency.sample(self._rng)
                await asyncio.sleep(delay)
                error = server_error(outcome)
                self._record(
                    t=t,
                    key=key,
                    model=model,
                    method=method,
                    status=error.code,
                    outcome=outcome,
                    latency=delay,
                    source=source,
                )
                raise error
            body_out, usage, produced = build_response(
                req,
                outcome,
                response_id=self._new_response_id(),
                default_thinking=cfg.default_thinking,
                forced=forced,
            )
            delay = cfg.latency.sample(self._rng, usage.candidates + usage.thoughts)
            await asyncio.sleep(delay)
            self._record(
                t=t,
                key=key,
                model=model,
                method=method,
                status=200,
                outcome=produced,
                usage=usage,
                latency=delay,
                source=source,
            )
            return body_out

    async def count_tokens(
        self, key: str | None, model: str, body: Mapping[str, Any]
    ) -> dict[str, Any]:
        t = time.monotonic()
        try:
            key = self._authenticate(key)
            inner = field_of(body, "generateContentRequest")
            req = parse_request(inner if isinstance(inner, dict) else body, model)
        except ApiError as exc:
            self._record(
                t=t,
                key=key,
                model=model,
                method="countTokens",
                status=exc.code,
                outcome=exc.outcome,
            )
            raise
        usage = Usage(prompt=req.prompt_tokens)
        self._record(
            t=t, key=key, model=model, method="countTokens", status=200, outcome="ok", usage=usage
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
        try:
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
        except ApiError as exc:
            self._record(
                t=t,
                key=key,
                model=model,
                method="batchGenerateContent",
                status=exc.code,
                outcome=exc.outcome,
            )
            raise
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
                outcome, source = self._next_outcome(req, key)
                self._consume(source, key)
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
                    response_id=self._new_response_id(),
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
        self._seq += 1
        batch_id = hashlib.sha256(f"{self.started_wall}-batch-{self._seq}".encode()).hexdigest()
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
        self._record(
            t=t,
            key=key,
            model=model,
            method="batchGenerateContent",
            status=200,
            outcome="ok",
            usage=total,
        )
        return self._batch_operation(job)

    def _batch_state(self, job: _BatchJob, now: float) -> str:
        if job.cancelled_mono is not None:
            return "BATCH_STATE_CANCELLED"
        elapsed = now - job.created_mono
        if elapsed < self._config.batch_pending_seconds:
            return "BATCH_STATE_PENDING"
        if elapsed < self._config.batch_pending_seconds + self._config.batch_running_seconds:
            return "BATCH_STATE_RUNNING"
        return "BATCH_STATE_SUCCEEDED"

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


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", charset="utf-8"
    )


def _api_key(request: web.Request) -> str | None:
    return request.headers.get("x-goog-api-key") or request.query.get("key")


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw:
        return {}
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"Invalid JSON payload received. {exc}") from None
    if not isinstance(data, dict):
        raise bad_request("Invalid JSON payload received. Expected an object.")
    return data


def _version(request: web.Request) -> str:
    version = request.match_info["version"]
    if version not in API_VERSIONS:
        raise web.HTTPNotFound()
    return version


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return _json(exc.body(), exc.code)
    except web.HTTPException:
        raise
    except Exception:
        log.exception("emulator: unexpected error on %s %s", request.method, request.path)
        return _json(server_error("500").body(), 500)


async def _model_action(request: web.Request) -> web.StreamResponse:
    _version(request)
    emulator = request.app[EMULATOR_KEY]
    model, _, action = request.match_info["model_action"].partition(":")
    key = _api_key(request)
    if request.method == "GET":
        if action:
            raise web.HTTPNotFound()
        return _json(emulator.model_info(key, model))
    body = await _body(request)
    if action == "generateContent":
        return _json(await emulator.generate_content(key, model, body, method=action))
    if action == "streamGenerateContent":
        # One chunk holding the whole answer: enough for clients that stream.
        answer = await emulator.generate_content(key, model, body, method=action)
        if request.query.get("alt") == "sse":
            payload = b"data: " + orjson.dumps(answer) + b"\r\n\r\n"
            return web.Response(body=payload, content_type="text/event-stream")
        return _json([answer])
    if action == "countTokens":
        return _json(await emulator.count_tokens(key, model, body))
    if action == "batchGenerateContent":
        return _json(emulator.create_batch(key, model, body))
    raise web.HTTPNotFound()


async def _batches(request: web.Request) -> web.StreamResponse:
    _version(request)
    emulator = request.app[EMULATOR_KEY]
    key = _api_key(request)
    name = request.match_info.get("batch_action")
    if name is None:
        return _json(emulator.list_batches(key))
    batch_id, _, action = name.partition(":")
    if request.method == "GET" and not action:
        return _json(emulator.get_batch(key, batch_id))
    if request.method == "DELETE" and not action:
        return _json(emulator.delete_batch(key, batch_id))
    if request.method == "POST" and action == "cancel":
        return _json(emulator.cancel_batch(key, batch_id))
    raise web.HTTPNotFound()


async def _control_stats(request: web.Request) -> web.StreamResponse:
    emulator = request.app[EMULATOR_KEY]
    include_log = request.query.get("log", "1") not in ("0", "false", "no")
    return _json(emulator.stats(include_log=include_log))


def _float_query(request: web.Request, name: str) -> float | None:
    value = request.query.get(name)
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be a number") from None


async def _control_log(request: web.Request) -> web.StreamResponse:
    emulator = request.app[EMULATOR_KEY]
    limit = _float_query(request, "limit")
    entries = emulator.request_log(
        key=request.query.get("key"),
        since=_float_query(request, "since"),
        until=_float_query(request, "until"),
        limit=int(limit) if limit is not None else None,
    )
    return _json({"log": entries})


async def _control_config(request: web.Request) -> web.StreamResponse:
    emulator = request.app[EMULATOR_KEY]
    if request.method == "POST":
        patch = await _body(request)
        try:
            emulator.update_config(patch)
        except (msgspec.ValidationError, ValueError, TypeError) as exc:
            return _json({"error": str(exc)}, 400)
    return _json(emulator.config.to_dict())


async def _control_outcomes(request: web.Request) -> web.StreamResponse:
    emulator = request.app[EMULATOR_KEY]
    body = await _body(request)
    outcomes = body.get("outcomes")
    key = body.get("key")
    if not isinstance(outcomes, list) or not all(isinstance(o, str) for o in outcomes):
        return _json({"error": "outcomes must be a list of strings"}, 400)
    try:
        emulator.queue_outcomes(outcomes, key if isinstance(key, str) else None)
    except ValueError as exc:
        return _json({"error": str(exc)}, 400)
    return _json({"queued": emulator.stats(include_log=False)["queued_outcomes"]})


async def _control_reset(request: web.Request) -> web.StreamResponse:
    emulator = request.app[EMULATOR_KEY]
    body = await _body(request)
    emulator.reset(restore_config=bool(body.get("config")))
    return _json({"reset": True})


async def _control_health(request: web.Request) -> web.StreamResponse:
    return _json({"ok": True})


def create_app(emulator: Emulator) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_errors])
    app[EMULATOR_KEY] = emulator
    app.router.add_route("*", "/{version}/models/{model_action}", _model_action)
    app.router.add_get("/{version}/batches", _batches)
    app.router.add_route("*", "/{version}/batches/{batch_action}", _batches)
    app.router.add_get("/_emulator/stats", _control_stats)
    app.router.add_get("/_emulator/log", _control_log)
    app.router.add_route("*", "/_emulator/config", _control_config)
    app.router.add_post("/_emulator/outcomes", _control_outcomes)
    app.router.add_post("/_emulator/reset", _control_reset)
    app.router.add_get("/_emulator/health", _control_health)
    return app


def _bind(host: str, port: int) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(4096)
    sock.setblocking(False)
    return sock


async def start_emulator(
    config: EmulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, str]:
    """Start the emulator; returns its runner (``await runner.cleanup()`` stops it) and base URL.

    The Emulator object is ``emulator_of(runner)``. Port 0 picks a free port.
    """
    emulator = Emulator(config)
    runner = web.AppRunner(create_app(emulator), access_log=None)
    await runner.setup()
    sock = _bind(host, port)
    site = web.SockSite(runner, sock, backlog=4096)
    await site.start()
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    return runner, f"http://{shown}:{bound_port}"


def emulator_of(runner: web.AppRunner) -> Emulator:
    app = runner.app
    return app[EMULATOR_KEY]


@contextlib.asynccontextmanager
async def running_emulator(
    config: EmulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[tuple[Emulator, str]]:
    """``async with running_emulator(cfg) as (emulator, base_url): ...``"""
    runner, base_url = await start_emulator(config, host, port)
    try:
        yield emulator_of(runner), base_url
    finally:
        await runner.cleanup()


# --------------------------------------------------------------------------------------------
# Command line


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gemini-server",
        description="Gemini API emulator for tests and benchmarks (no network access needed).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default loopback)")
    parser.add_argument("--port", type=int, default=8790, help="0 picks a free port")
    parser.add_argument("--allow-remote", action="store_true", help="allow a non-loopback host")
    parser.add_argument("--rpm", type=int, help="requests per window per project (0: unlimited)")
    parser.add_argument("--tpm", type=int, help="input tokens per window per project (0: none)")
    parser.add_argument("--rpd", type=int, help="requests per day per project (0: unlimited)")
    parser.add_argument("--window-seconds", type=float, help="length of the RPM/TPM window")
    parser.add_argument("--day-seconds", type=float, help="length of the RPD window")
    parser.add_argument("--latency-median-ms", type=float, help="median latency (lognormal)")
    parser.add_argument("--latency-sigma", type=float, help="lognormal sigma; 0 = fixed latency")
    parser.add_argument("--latency-max-ms", type=float, help="latency cap")
    parser.add_argument("--latency-per-token-ms", type=float, help="extra per output token")
    for outcome in OUTCOMES:
        if outcome == "ok":
            continue
        parser.add_argument(
            f"--error-rate-{outcome.replace('_', '-')}",
            dest=f"rate_{outcome}",
            type=float,
            help=f"probability of outcome {outcome}",
        )
    parser.add_argument("--seed", type=int, help="seed of the latency/error RNG")
    parser.add_argument("--retry-delay-format", choices=["ceil", "exact"])
    parser.add_argument("--batch-pending-seconds", type=float)
    parser.add_argument("--batch-running-seconds", type=float)
    parser.add_argument(
        "--max-concurrent-batches", type=int, help="unfinished Batch API jobs per project (429)"
    )
    parser.add_argument("--default-thinking", action="store_true", default=None)
    parser.add_argument("--keys-file", type=Path, help="keys/projects: JSON patch or KEY [PROJECT]")
    parser.add_argument("--config-file", type=Path, help="JSON EmulatorConfig (or part of one)")
    return parser


def config_from_args(args: argparse.Namespace) -> EmulatorConfig:
    patch: dict[str, Any] = {}
    if args.config_file:
        patch = _deep_merge(patch, json.loads(args.config_file.read_text()))
    if args.keys_file:
        patch = _deep_merge(patch, load_keys_file(args.keys_file))
    limits: dict[str, Any] = {}
    for name in ("rpm", "tpm", "rpd"):
        value = getattr(args, name)
        if value is not None:
            limits[name] = value or None
    if limits:
        patch = _deep_merge(patch, {"default_limits": limits})
    latency: dict[str, Any] = {}
    if args.latency_median_ms is not None:
        latency["median_ms"] = args.latency_median_ms
        latency["kind"] = "lognormal"
    if args.latency_sigma is not None:
        latency["sigma"] = args.latency_sigma
        if args.latency_sigma == 0:
            latency["kind"] = "fixed"
    if args.latency_max_ms is not None:
        latency["max_ms"] = args.latency_max_ms
    if args.latency_per_token_ms is not None:
        latency["per_output_token_ms"] = args.latency_per_token_ms
    if latency:
        patch = _deep_merge(patch, {"latency": latency})
    rates = {
        o: getattr(args, f"rate_{o}")
        for o in OUTCOMES
        if o != "ok" and getattr(args, f"rate_{o}") is not None
    }
    if rates:
        patch = _deep_merge(patch, {"error_rates": rates})
    for name in (
        "window_seconds",
        "day_seconds",
        "seed",
        "retry_delay_format",
        "batch_pending_seconds",
        "batch_running_seconds",
        "max_concurrent_batches",
        "default_thinking",
    ):
        value = getattr(args, name)
        if value is not None:
            patch[name] = value
    return EmulatorConfig.from_dict(patch)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _serve(config: EmulatorConfig, host: str, port: int) -> None:
    runner, base_url = await start_emulator(config, host, port)
    print(f"Gemini emulator listening on {base_url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    """Run the emulator standalone (``imagestream dev gemini-server`` calls this)."""
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    if not _is_loopback(args.host) and not args.allow_remote:
        parser.error(f"--host {args.host} is not a loopback address; add --allow-remote")
    try:
        config = config_from_args(args)
    except (OSError, ValueError, msgspec.ValidationError) as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    uvloop.run(_serve(config, args.host, args.port))


if __name__ == "__main__":
    main()
