"""What the API emulators (Gemini, OpenAI-compatible, Anthropic-compatible) share.

One quota / latency / fault core, so the three servers differ only in their wire format:

* ``CoreConfig``: keys (valid, invalid, revoked), projects and their RPM/TPM/RPD limits,
  latency, error rates per outcome, seed; each emulator subclasses it with its own knobs and
  names its outcomes in ``OUTCOMES``.
* ``EmulatorCore``: key checks, quota admission over sliding windows (``emulator_quota``),
  the next outcome (a ``[[emulate:NAME]]`` marker in the prompt, a queued outcome, or a
  seeded random draw), the request log and counters behind ``/_emulator/stats``.
* The HTTP plumbing: one error middleware, the ``/_emulator/*`` control routes, binding a
  socket (port 0 picks a free one), the standalone command line (loopback only unless asked).

Everything random draws from one RNG seeded by ``seed``, so a run can be repeated.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import io
import ipaddress
import json
import logging
import math
import random
import re
import signal
import socket
import time
import warnings
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, NoReturn, Self, TypeVar, cast

import msgspec
import orjson
import uvloop
from aiohttp import web
from PIL import Image

from .emulator_quota import QuotaBook, QuotaLimits, Violation

log = logging.getLogger(__name__)

MARKER_RE = re.compile(r"\[\[emulate:([a-z0-9_]+)\]\]")
MAX_BODY_BYTES = 64 * 1024 * 1024  # inline images, and batch files of many of them
KeyStatus = Literal["ok", "missing", "invalid", "revoked"]
TEXT_CHARS_PER_TOKEN = 4


class ImageDecodeError(ValueError):
    """The bytes given as an image are not an image Pillow can read the header of."""


def text_tokens(text: str) -> int:
    """About one token per four characters (every provider says so); non-empty text: >= 1."""
    if not text:
        return 0
    return math.ceil(len(text) / TEXT_CHARS_PER_TOKEN)


def image_size(data: bytes) -> tuple[int, int]:
    """Width and height from the image header (Pillow reads the header only)."""
    try:
        with warnings.catch_warnings():
            # A huge image is a legitimate input to count tokens for, not a bomb to refuse.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(str(exc)) from exc
    return int(width), int(height)


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
class CoreConfig:
    """Every knob the emulators share. Changeable at runtime through POST /_emulator/config."""

    OUTCOMES: ClassVar[tuple[str, ...]] = ("ok",)

    # Quota. A key in `key_projects` shares its project's limits (`projects`, else the
    # default) with the project's other keys; any other key is its own project, limited by
    # `key_limits` or the default. None in a QuotaLimits field means unlimited.
    default_limits: QuotaLimits = field(default_factory=_default_limits)
    projects: dict[str, QuotaLimits] = field(default_factory=dict)
    key_projects: dict[str, str] = field(default_factory=dict)
    key_limits: dict[str, QuotaLimits] = field(default_factory=dict)
    window_seconds: float = 60.0  # the "minute" of RPM and TPM (tests shorten it)
    day_seconds: float = 86_400.0  # the "day" of RPD
    quota_per_model: bool = True  # every provider meters each model separately
    # Keys. None: any non-empty key is accepted unless listed as invalid or revoked.
    valid_keys: set[str] | None = None
    invalid_keys: set[str] = field(default_factory=set)  # unknown key (400/401)
    revoked_keys: set[str] = field(default_factory=set)  # known but refused (403)
    models: list[str] | None = None  # the models served (others: 404); None: any name
    # Behaviour.
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    error_rates: dict[str, float] = field(default_factory=dict)  # outcome -> probability
    seed: int = 0
    honour_markers: bool = True
    forced_429_retry_seconds: float = 1.0  # retry hint of an injected (non-quota) 429
    # Batch jobs: how long one stays pending, then running, before its results are ready.
    batch_pending_seconds: float = 1.0
    batch_running_seconds: float = 2.0
    # Batch jobs a project may have unfinished at once; one more is answered 429. None: any.
    max_concurrent_batches: int | None = None
    max_log_entries: int = 200_000

    def validate(self) -> None:
        unknown = set(self.error_rates) - set(self.OUTCOMES)
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

    def merged(self, patch: Mapping[str, Any]) -> Self:
        """A new config: `patch` deep-merged into this one (mappings merge, the rest replaces).

        Two extra keys act on the key sets: ``revoke`` / ``unrevoke`` (lists of keys).
        """
        patch = dict(patch)
        revoke = patch.pop("revoke", None) or []
        unrevoke = patch.pop("unrevoke", None) or []
        data = deep_merge(self.to_dict(), patch)
        revoked = set(data.get("revoked_keys") or [])
        revoked |= set(revoke)
        revoked -= set(unrevoke)
        data["revoked_keys"] = sorted(revoked)
        config = msgspec.convert(data, type(self))
        config.validate()
        return config

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        return cls().merged(data)


ConfigT = TypeVar("ConfigT", bound=CoreConfig)


def deep_merge(base: dict[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in patch.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_keys_file(path: Path) -> dict[str, Any]:
    """A config patch from a keys file.

    JSON: any subset of the config (typically key_projects, projects, key_limits,
    valid_keys, invalid_keys, revoked_keys). Otherwise text, one key per line, optionally
    followed by its project: ``sk-... project-a``; "#" starts a comment. A text file also
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


def rfc3339(wall: float) -> str:
    stamp = dt.datetime.fromtimestamp(wall, tz=dt.UTC)
    return stamp.isoformat(timespec="microseconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------------------------
# The core


class EmulatedError(Exception):
    """An error the emulator answers in its provider's own JSON shape."""

    code: int
    outcome: str
    headers: Mapping[str, str] = {}
    retry_delay: float | None = None  # logged with a 429
    source: str | None = None  # what forced it (marker, queue:KEY), logged

    def refused(self, refusal: Refusal) -> Self:
        """This error as the answer to `refusal`: logged with its outcome and retry delay."""
        self.outcome = refusal.outcome
        self.retry_delay = refusal.retry_after
        self.source = refusal.source
        return self

    def body(self) -> Any:
        raise NotImplementedError


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


@dataclass(frozen=True)
class Refusal:
    """A request refused with 429: what was broken and when to come back.

    outcome "quota_exceeded": the windows are full; "429": an injected 429 (`source` says
    what forced it), which leaves the windows alone.
    """

    violations: list[Violation]
    retry_after: float
    outcome: str = "quota_exceeded"
    source: str | None = None


class EmulatorCore(Generic[ConfigT]):
    """Keys, quota, outcomes and traffic records; each emulator adds its API methods."""

    def __init__(self, config: ConfigT) -> None:
        config.validate()
        self._initial = config
        self._config = config
        self._rng = random.Random(config.seed)
        self._quota = QuotaBook(config.window_seconds, config.day_seconds)
        self._queues: dict[str | None, deque[str]] = {}
        self._log: deque[dict[str, Any]] = deque(maxlen=config.max_log_entries or None)
        self._keys: dict[str, _KeyStats] = {}
        self._outcomes: Counter[str] = Counter()
        self._status: Counter[str] = Counter()
        self._tokens: Counter[str] = Counter()
        self._seq = 0
        self._in_flight = 0
        self._max_in_flight = 0
        self.started_wall = time.time()
        self.started_mono = time.monotonic()

    # -- configuration and control --

    @property
    def config(self) -> ConfigT:
        return self._config

    @property
    def rng(self) -> random.Random:
        return self._rng

    def set_config(self, config: ConfigT) -> None:
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

    def update_config(self, patch: Mapping[str, Any]) -> ConfigT:
        self.set_config(self._config.merged(patch))
        return self._config

    def revoke_key(self, key: str) -> None:
        self.update_config({"revoke": [key]})

    def queue_outcomes(self, outcomes: list[str], key: str | None = None) -> None:
        """The next requests (of `key`, or of anyone) get these outcomes, in order."""
        known = self._config.OUTCOMES
        unknown = [o for o in outcomes if o not in known]
        if unknown:
            raise ValueError(f"unknown outcomes: {unknown}; known: {list(known)}")
        self._queues.setdefault(key, deque()).extend(outcomes)

    def reset(self, *, restore_config: bool = False) -> None:
        """Forget all traffic: counters, log, quota windows, queued outcomes, jobs."""
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
        self._max_in_flight = self._in_flight
        self.forget_jobs()

    def forget_jobs(self) -> None:
        """Drop the emulator's own stored state (batch jobs, files) on reset."""

    def extra_stats(self) -> dict[str, Any]:
        """Emulator-specific entries of ``/_emulator/stats``."""
        return {}

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
        name, "invalid_key", "revoked_key", "no_key", "bad_request", ...), token counts
        (``<name>_tokens``), ``latency_ms``, ``retry_delay_s`` on 429s and ``forced_by``
        (marker / queue:KEY).
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
            **self.extra_stats(),
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

    def key_status(self, key: str | None) -> KeyStatus:
        cfg = self._config
        if not key:
            return "missing"
        if key in cfg.invalid_keys:
            return "invalid"
        if cfg.valid_keys is not None and not (
            key in cfg.valid_keys
            or key in cfg.key_projects
            or key in cfg.key_limits
            or key in cfg.revoked_keys
        ):
            return "invalid"
        if key in cfg.revoked_keys:
            return "revoked"
        return "ok"

    def serves(self, model: str) -> bool:
        return self._config.models is None or model in self._config.models

    def quota_scope(self, key: str, model: str) -> tuple[str, str]:
        return self.project_of(key), model if self._config.quota_per_model else "*"

    def admit(self, key: str, model: str, tokens: int, now: float) -> Refusal | None:
        """Count the request against its project's windows, or say why it may not run now."""
        scope = self.quota_scope(key, model)
        violations = self._quota.check(scope, self.limits_of(key), tokens, now)
        if violations:
            wait = max(v.retry_after for v in violations)
            if math.isinf(wait):
                # Larger than the whole TPM limit: it will never fit; say "a window".
                wait = self._config.window_seconds
            return Refusal(violations, wait)
        self._quota.admit(scope, tokens, now)
        return None

    def admit_outcome(
        self, key: str, model: str, tokens: int, now: float, *, outcome: str, source: str
    ) -> Refusal | None:
        """Admit a request whose outcome is drawn, or say why it gets a 429.

        An injected "429" is used up and refused with ``forced_429_retry_seconds``; any other
        outcome is used up only once the windows admit the request.
        """
        if outcome == "429":
            self.consume(source, key)
            wait = self._config.forced_429_retry_seconds
            violation = Violation("rpm", self.limits_of(key).rpm or 0, wait)
            return Refusal([violation], wait, "429", source)
        refusal = self.admit(key, model, tokens, now)
        if refusal is None:
            self.consume(source, key)
        return refusal

    def remaining(self, key: str, model: str, now: float) -> dict[str, tuple[int, int, float]]:
        """Per limited metric: (limit, remaining, seconds until the window is full again).

        What OpenAI's x-ratelimit-* and Anthropic's anthropic-ratelimit-* headers report.
        """
        scope = self.quota_scope(key, model)
        limits = self.limits_of(key)
        out: dict[str, tuple[int, int, float]] = {}
        metrics: tuple[tuple[Literal["requests", "tokens"], int | None], ...] = (
            ("requests", limits.rpm),
            ("tokens", limits.tpm),
        )
        for metric, limit in metrics:
            if limit is None:
                continue
            used, reset = self._quota.window_state(scope, metric, now)
            out[metric] = (limit, max(0, limit - used), reset)
        return out

    # -- outcomes --

    def next_outcome(self, markers: Sequence[str], key: str) -> tuple[str, str]:
        """(outcome, source) without consuming a queued one; source: marker|queue:K|random."""
        cfg = self._config
        if cfg.honour_markers:
            for marker in markers:
                if marker in cfg.OUTCOMES:
                    return marker, "marker"
        for queue_key in (key, None):
            queue = self._queues.get(queue_key)
            if queue:
                return queue[0], f"queue:{queue_key}"
        if cfg.error_rates:
            draw = self._rng.random()
            acc = 0.0
            for outcome in cfg.OUTCOMES:
                acc += cfg.error_rates.get(outcome, 0.0) if outcome != "ok" else 0.0
                if draw < acc:
                    return outcome, "random"
        return "ok", "random"

    def consume(self, source: str, key: str) -> None:
        if source.startswith("queue:"):
            queue_key: str | None = key if source == f"queue:{key}" else None
            queue = self._queues.get(queue_key)
            if queue:
                queue.popleft()

    def take_outcome(self, markers: Sequence[str], key: str) -> tuple[str, str]:
        outcome, source = self.next_outcome(markers, key)
        self.consume(source, key)
        return outcome, source

    def new_id(self, kind: str = "") -> str:
        """A fresh opaque identifier (url-safe, 23 characters)."""
        self._seq += 1
        raw = hashlib.sha256(f"{self.started_wall}-{kind}-{self._seq}".encode()).digest()[:17]
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    def latency(self, output_tokens: int = 0) -> float:
        return self._config.latency.sample(self._rng, output_tokens)

    # -- recording --

    def record(
        self,
        *,
        t: float,
        key: str | None,
        model: str,
        method: str,
        status: int,
        outcome: str,
        tokens: Mapping[str, int] | None = None,
        count_tokens: bool = True,
        latency: float = 0.0,
        retry_delay: float | None = None,
        source: str | None = None,
    ) -> None:
        """One log entry and the counters; `tokens` name -> count ("total" goes to counters)."""
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
        for name, value in (tokens or {}).items():
            if name != "total":
                entry[f"{name}_tokens"] = value
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
        if tokens and count_tokens:
            stats.tokens.update(tokens)
            self._tokens.update(tokens)

    @contextlib.contextmanager
    def recording_errors(
        self, *, t: float, key: str | None, model: str, method: str
    ) -> Iterator[None]:
        """Log an EmulatedError raised inside (bad key, bad request, 429) as the call's entry."""
        try:
            yield
        except EmulatedError as exc:
            self.record(
                t=t,
                key=key,
                model=model,
                method=method,
                status=exc.code,
                outcome=exc.outcome,
                retry_delay=exc.retry_delay,
                source=exc.source,
            )
            raise

    async def fail_late(
        self, error: EmulatedError, *, t: float, key: str, model: str, method: str, source: str
    ) -> NoReturn:
        """Answer `error` (a 5xx, an overload) after the latency a real failure takes."""
        delay = self.latency()
        await asyncio.sleep(delay)
        self.record(
            t=t,
            key=key,
            model=model,
            method=method,
            status=error.code,
            outcome=error.outcome,
            latency=delay,
            source=source,
        )
        raise error

    @contextlib.contextmanager
    def tracking(self) -> Iterator[None]:
        self._in_flight += 1
        self._max_in_flight = max(self._max_in_flight, self._in_flight)
        try:
            yield
        finally:
            self._in_flight -= 1

    # -- batch jobs --

    def batch_phase(self, created_mono: float, now: float) -> Literal["pending", "running", "done"]:
        cfg = self._config
        elapsed = now - created_mono
        if elapsed < cfg.batch_pending_seconds:
            return "pending"
        if elapsed < cfg.batch_pending_seconds + cfg.batch_running_seconds:
            return "running"
        return "done"


# --------------------------------------------------------------------------------------------
# HTTP layer


def json_response(
    data: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(data),
        status=status,
        content_type="application/json",
        charset="utf-8",
        headers=headers,
    )


async def read_json(
    request: web.Request, bad_request: Callable[[str], Exception]
) -> dict[str, Any]:
    """The request's JSON object body ({} when empty); `bad_request(message)` otherwise."""
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


def error_middleware(internal_error: Callable[[], EmulatedError]) -> Any:
    """Answers EmulatedError in its own shape and any bug as the provider's 500."""

    @web.middleware
    async def errors(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except EmulatedError as exc:
            return json_response(exc.body(), exc.code, exc.headers)
        except web.HTTPException:
            raise
        except Exception:
            log.exception("emulator: unexpected error on %s %s", request.method, request.path)
            error = internal_error()
            return json_response(error.body(), error.code)

    return errors


def _float_query(request: web.Request, name: str) -> float | None:
    value = request.query.get(name)
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be a number") from None


async def _control_body(request: web.Request) -> dict[str, Any]:
    def bad(message: str) -> web.HTTPBadRequest:
        return web.HTTPBadRequest(text=message)

    return await read_json(request, bad)


def add_control_routes(app: web.Application, core: EmulatorCore[Any]) -> None:
    """``/_emulator/`` (no key needed): stats, log, config, outcomes, reset, health."""

    async def stats(request: web.Request) -> web.StreamResponse:
        include_log = request.query.get("log", "1") not in ("0", "false", "no")
        return json_response(core.stats(include_log=include_log))

    async def request_log(request: web.Request) -> web.StreamResponse:
        limit = _float_query(request, "limit")
        entries = core.request_log(
            key=request.query.get("key"),
            since=_float_query(request, "since"),
            until=_float_query(request, "until"),
            limit=int(limit) if limit is not None else None,
        )
        return json_response({"log": entries})

    async def config(request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            patch = await _control_body(request)
            try:
                core.update_config(patch)
            except (msgspec.ValidationError, ValueError, TypeError) as exc:
                return json_response({"error": str(exc)}, 400)
        return json_response(core.config.to_dict())

    async def outcomes(request: web.Request) -> web.StreamResponse:
        body = await _control_body(request)
        queued = body.get("outcomes")
        key = body.get("key")
        if not isinstance(queued, list) or not all(isinstance(o, str) for o in queued):
            return json_response({"error": "outcomes must be a list of strings"}, 400)
        try:
            core.queue_outcomes(queued, key if isinstance(key, str) else None)
        except ValueError as exc:
            return json_response({"error": str(exc)}, 400)
        return json_response({"queued": core.stats(include_log=False)["queued_outcomes"]})

    async def reset(request: web.Request) -> web.StreamResponse:
        body = await _control_body(request)
        core.reset(restore_config=bool(body.get("config")))
        return json_response({"reset": True})

    async def health(request: web.Request) -> web.StreamResponse:
        return json_response({"ok": True})

    app.router.add_get("/_emulator/stats", stats)
    app.router.add_get("/_emulator/log", request_log)
    app.router.add_route("*", "/_emulator/config", config)
    app.router.add_post("/_emulator/outcomes", outcomes)
    app.router.add_post("/_emulator/reset", reset)
    app.router.add_get("/_emulator/health", health)


def _bind(host: str, port: int) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(4096)
    sock.setblocking(False)
    return sock


async def start_app(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, str]:
    """Serve `app`; returns its runner (``await runner.cleanup()`` stops it) and base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = _bind(host, port)
    site = web.SockSite(runner, sock, backlog=4096)
    await site.start()
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    return runner, f"http://{shown}:{bound_port}"


CoreT = TypeVar("CoreT", bound=EmulatorCore[Any])


@contextlib.asynccontextmanager
async def running(
    core: CoreT, app: web.Application, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[tuple[CoreT, str]]:
    runner, base_url = await start_app(app, host, port)
    try:
        yield core, base_url
    finally:
        await runner.cleanup()


# --------------------------------------------------------------------------------------------
# Command line


def add_common_arguments(
    parser: argparse.ArgumentParser, outcomes: Sequence[str], default_port: int
) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default loopback)")
    parser.add_argument("--port", type=int, default=default_port, help="0 picks a free port")
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
    for outcome in outcomes:
        if outcome == "ok":
            continue
        parser.add_argument(
            f"--error-rate-{outcome.replace('_', '-')}",
            dest=f"rate_{outcome}",
            type=float,
            help=f"probability of outcome {outcome}",
        )
    parser.add_argument("--seed", type=int, help="seed of the latency/error RNG")
    parser.add_argument("--batch-pending-seconds", type=float)
    parser.add_argument("--batch-running-seconds", type=float)
    parser.add_argument(
        "--max-concurrent-batches", type=int, help="unfinished batch jobs per project (429)"
    )
    parser.add_argument("--models", help="comma-separated model names served (default: any)")
    parser.add_argument("--keys-file", type=Path, help="keys/projects: JSON patch or KEY [PROJECT]")
    parser.add_argument("--config-file", type=Path, help="JSON config (or part of one)")


_COMMON_SCALARS = (
    "window_seconds",
    "day_seconds",
    "seed",
    "batch_pending_seconds",
    "batch_running_seconds",
    "max_concurrent_batches",
)


def common_patch(
    args: argparse.Namespace, outcomes: Sequence[str], scalars: Sequence[str] = ()
) -> dict[str, Any]:
    """The config patch the common options (and the named scalar options) ask for."""
    patch: dict[str, Any] = {}
    if args.config_file:
        patch = deep_merge(patch, json.loads(args.config_file.read_text()))
    if args.keys_file:
        patch = deep_merge(patch, load_keys_file(args.keys_file))
    limits: dict[str, Any] = {}
    for name in ("rpm", "tpm", "rpd"):
        value = getattr(args, name)
        if value is not None:
            limits[name] = value or None
    if limits:
        patch = deep_merge(patch, {"default_limits": limits})
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
        patch = deep_merge(patch, {"latency": latency})
    rates = {
        o: getattr(args, f"rate_{o}")
        for o in outcomes
        if o != "ok" and getattr(args, f"rate_{o}") is not None
    }
    if rates:
        patch = deep_merge(patch, {"error_rates": rates})
    if args.models:
        patch["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    for name in (*_COMMON_SCALARS, *scalars):
        value = getattr(args, name)
        if value is not None:
            patch[name] = value
    return patch


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _serve(title: str, app: web.Application, host: str, port: int) -> None:
    runner, base_url = await start_app(app, host, port)
    print(f"{title} listening on {base_url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def serve_main(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    title: str,
    build: Callable[[argparse.Namespace], Callable[[], web.Application]],
) -> None:
    """Parse `argv`, refuse a non-loopback host unless allowed, and serve until SIGTERM.

    `build(args)` validates the options (raising ValueError or OSError for a one-line error)
    and returns what creates the app inside the event loop.
    """
    args = parser.parse_args(argv)
    if not _is_loopback(args.host) and not args.allow_remote:
        parser.error(f"--host {args.host} is not a loopback address; add --allow-remote")
    try:
        make_app = build(args)
    except (OSError, ValueError, msgspec.ValidationError) as exc:
        parser.error(str(exc))

    async def serve() -> None:
        await _serve(title, make_app(), args.host, args.port)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    uvloop.run(serve())


__all__ = [
    "MARKER_RE",
    "CoreConfig",
    "EmulatedError",
    "EmulatorCore",
    "LatencyConfig",
    "QuotaLimits",
    "Refusal",
    "Violation",
    "add_common_arguments",
    "add_control_routes",
    "common_patch",
    "deep_merge",
    "error_middleware",
    "json_response",
    "load_keys_file",
    "read_json",
    "rfc3339",
    "running",
    "serve_main",
    "start_app",
]
