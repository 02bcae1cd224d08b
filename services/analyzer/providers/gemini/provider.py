"""The ``gemini`` provider: one google-genai async client per key, our quota and retry policy.

A call goes: profile and model of the batch -> input tokens by Google's rules -> the
batch's budget reserves the call's worst case (or pauses the batch) -> a slot of this
process's adaptive concurrency -> the shared quota admits it into a project (``limiter``)
-> a key of that project -> ``client.aio.models.generate_content`` -> the answer read and
validated (``reply``) -> its real cost replaces the reservation.

Failures, each with its own rule, in the loop every keyed provider shares (``calls``):

* 429: the project and model are backed off for the server's ``RetryInfo.retryDelay``
  (shared through Redis, so no replica sends there before it ends); the call goes back to
  the quota gate, which uses another project meanwhile. After ``MAX_RATE_LIMITED`` 429s
  for one call the item fails as ``rate_limited``.
* 401/403, or 400 ``API_KEY_INVALID``: the key is quarantined and the call retried with
  another; with no usable key left the batch is paused (``no_usable_gemini_key``).
* 5xx, timeouts, connection errors: retried with exponential back-off and jitter up to
  ``GEMINI_ATTEMPTS`` times, then the item fails as ``analyzer_error``; 503/504 and
  timeouts also halve the concurrency for a while.
* Other 4xx: the item fails at once (the request itself is wrong).

The SDK's own retries are off: they would ignore the server's retry delay and our quota.
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import aiohttp
from google import genai
from google.genai import errors, types
from PIL import Image
from prometheus_client import Counter, Histogram

from imagestream.common import pricing, profiles
from imagestream.common.connections import Resources
from imagestream.common.control import BatchConfig
from imagestream.common.errors import ErrorClass, ItemError
from imagestream.common.messages import ImageFacts, Usage
from imagestream.common.runtime import supervise
from imagestream.common.settings import StreamSettings

from ...answers import InvalidOutput
from ...budget import Budgets
from ...calls import CallPolicy, Failure, QuotaCaller, quota_rpm, wanted_concurrency
from ...keypool import KeySpec, parse_keys
from ...limiter import Project, QuotaLimits
from ..base import Analysis, Deferred, PaidError
from . import pricing as gemini_pricing
from . import reply
from .keys import GeminiKeys, close_clients, make_client

log = logging.getLogger(__name__)

REQUESTS = Counter(
    "imagestream_gemini_requests_total",
    "Gemini generateContent calls by outcome (ok, rate_limited, key_rejected, server_error,"
    " timeout, connection_error, rejected), per project (a quota holder, from the settings).",
    ["project", "outcome"],
)
REQUEST_SECONDS = Histogram(
    "imagestream_gemini_request_duration_seconds",
    "Time from sending a Gemini call to its answer, per project.",
    ["project"],
    buckets=(0.1, 0.25, 0.5, 1, 1.5, 2, 3, 5, 8, 13, 21, 34, 60, 120),
)
# Billed per project: each Google Cloud project gets its own bill.
INPUT_TOKENS = Counter(
    "imagestream_gemini_input_tokens_total", "Prompt tokens billed, per project.", ["project"]
)
OUTPUT_TOKENS = Counter(
    "imagestream_gemini_output_tokens_total", "Answer tokens billed, per project.", ["project"]
)
THOUGHT_TOKENS = Counter(
    "imagestream_gemini_thought_tokens_total", "Thinking tokens billed, per project.", ["project"]
)
CACHED_TOKENS = Counter(
    "imagestream_gemini_cached_tokens_total",
    "Prompt tokens served from Gemini's cache, per project.",
    ["project"],
)
COST = Counter(
    "imagestream_gemini_cost_usd_total",
    "What Gemini calls cost at list prices (Batch API: half), per project.",
    ["project"],
)
BLOCKED = Counter("imagestream_gemini_blocked_total", "Answers Gemini refused (safety).")

_SAFETY_CATEGORIES = (
    types.HarmCategory.HARM_CATEGORY_HARASSMENT,
    types.HarmCategory.HARM_CATEGORY_HATE_SPEECH,
    types.HarmCategory.HARM_CATEGORY_SEXUALLY_EXPLICIT,
    types.HarmCategory.HARM_CATEGORY_DANGEROUS_CONTENT,
)
_MEDIA = {
    "low": types.MediaResolution.MEDIA_RESOLUTION_LOW,
    "medium": types.MediaResolution.MEDIA_RESOLUTION_MEDIUM,
    "high": types.MediaResolution.MEDIA_RESOLUTION_HIGH,
}


class GeminiSettings(StreamSettings, kw_only=True, frozen=True):
    """Settings of the Gemini provider (see docs/GEMINI.md)."""

    #: API keys, comma-separated; KEY@PROJECT groups the keys of one Google Cloud project
    #: (they share its quota). Empty: the gemini analyzer is not available.
    gemini_api_keys: list[str] = []
    #: PROJECT:rpm=N:tpm=N:rpd=N per project, comma-separated (0 = no limit).
    gemini_project_limits: list[str] = []
    #: Default quota of a project, per model: requests/minute, input tokens/minute, requests/day.
    gemini_rpm: int = 1000
    gemini_tpm: int = 1_000_000
    gemini_rpd: int = 10_000
    #: Another endpoint (the emulator, a proxy); unset = Google.
    gemini_base_url: str | None = None
    gemini_api_version: str = "v1beta"
    gemini_timeout_s: float = 120.0
    #: Tries of one call on 5xx/timeouts/connection errors, and the first back-off (s).
    gemini_attempts: int = 4
    gemini_backoff_s: float = 1.0
    #: The quota window (Google's minute) and the margin added to it against clock drift
    #: and network delay; tests shorten both.
    gemini_quota_window_s: float = 60.0
    gemini_quota_margin_s: float = 1.0
    #: Catch-up a project may send at once after idling (seconds of its rate).
    gemini_quota_burst_s: float = 1.0
    #: How long a key answered with 401/403 stays out of use (seconds).
    gemini_quarantine_s: float = 3600.0
    #: Most Gemini calls one process keeps in flight (the adaptive limit stays below).
    gemini_max_inflight: int = 256
    #: Batch-price mode (docs/GEMINI.md): most requests in one Batch API job, how long a
    #: job waits for more after its first, and how often running jobs are polled (seconds).
    gemini_batch_max_requests: int = 1000
    gemini_batch_linger_s: float = 30.0
    gemini_batch_poll_s: float = 30.0
    #: Batch API jobs one project may have running at once: Google allows 100, shared with
    #: whatever else uses the project. A job over the limit waits for one to finish.
    gemini_batch_max_jobs: int = 100
    #: A directory of extra analysis profiles (*.json), and a JSON file of model prices.
    profiles_dir: str | None = None
    gemini_prices_file: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.gemini_rpm, self.gemini_tpm, self.gemini_rpd) < 0:
            raise ValueError("GEMINI_RPM, GEMINI_TPM and GEMINI_RPD must be >= 0")
        if self.gemini_attempts < 1 or self.gemini_max_inflight < 1:
            raise ValueError("GEMINI_ATTEMPTS and GEMINI_MAX_INFLIGHT must be >= 1")
        if (
            min(self.gemini_batch_max_requests, self.gemini_batch_max_jobs) < 1
            or min(self.gemini_batch_linger_s, self.gemini_batch_poll_s) <= 0
        ):
            raise ValueError(
                "GEMINI_BATCH_MAX_REQUESTS and GEMINI_BATCH_MAX_JOBS must be >= 1,"
                " GEMINI_BATCH_LINGER_S and GEMINI_BATCH_POLL_S > 0"
            )
        if self.gemini_quota_window_s <= 0 or self.gemini_quota_margin_s < 0:
            raise ValueError("GEMINI_QUOTA_WINDOW_S must be > 0, GEMINI_QUOTA_MARGIN_S >= 0")
        self.key_specs()
        try:
            self.catalog()
            self.prices()
        except (profiles.ProfileError, pricing.PriceError) as exc:
            raise ValueError(str(exc)) from None

    def policy(self) -> CallPolicy:
        return CallPolicy(
            window_s=self.gemini_quota_window_s,
            margin_s=self.gemini_quota_margin_s,
            burst_s=self.gemini_quota_burst_s,
            max_inflight=self.gemini_max_inflight,
            attempts=self.gemini_attempts,
            backoff_s=self.gemini_backoff_s,
        )

    def default_limits(self) -> QuotaLimits:
        return QuotaLimits(self.gemini_rpm, self.gemini_tpm, self.gemini_rpd)

    def key_specs(self) -> tuple[list[KeySpec], dict[str, Project]]:
        return parse_keys(self.gemini_api_keys, self.gemini_project_limits, self.default_limits())

    def catalog(self) -> profiles.Catalog:
        return profiles.cached_catalog(self.profiles_dir)

    def prices(self) -> dict[str, pricing.Price]:
        return gemini_pricing.cached_prices(self.gemini_prices_file)

    def choose(
        self, profile: str | None, model: str | None
    ) -> tuple[profiles.CompiledProfile, str]:
        """The profile and model of a batch (ProfileError when unknown or unpriced)."""
        return self.catalog().choose(profile, model, self.prices())


def _details(exc: errors.APIError) -> list[Any]:
    """The google.rpc details of an error (the SDK's ``details`` is the whole JSON body)."""
    body = exc.details if isinstance(exc.details, dict) else {}
    error = body.get("error")
    found = error.get("details") if isinstance(error, dict) else None
    return [d for d in found if isinstance(d, dict)] if isinstance(found, list) else []


def retry_delay(exc: errors.APIError) -> float | None:
    """``RetryInfo.retryDelay`` (e.g. "13s") from the error body, in seconds."""
    for detail in _details(exc):
        if str(detail.get("@type", "")).endswith("RetryInfo"):
            try:
                return float(str(detail.get("retryDelay", "")).rstrip("s"))
            except ValueError:
                return None
    return None


def _rejects_key(exc: errors.APIError) -> bool:
    if exc.code in (401, 403):
        return True
    return exc.code == 400 and any(d.get("reason") == "API_KEY_INVALID" for d in _details(exc))


def _image_size(data: bytes) -> tuple[int, int]:
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            return img.size
    except (OSError, ValueError) as exc:
        raise ItemError(ErrorClass.DECODE_ERROR, f"cannot read the image: {exc}") from None


def thinking_budget(model: str, budget: int | None) -> int | None:
    """What to send for the profile's budget: 2.5 Pro cannot go below 128, Gemini 3 has no
    off switch (it keeps its default), models before 2.5 do not think."""
    if budget is None:
        return None
    if gemini_pricing.model_generation(model) >= 3:
        return budget if budget != 0 else None
    if "2.5" not in model:
        return None
    return max(budget, 128) if model.startswith("gemini-2.5-pro") and budget >= 0 else budget


class GeminiProvider:
    name = "gemini"
    paid = True
    #: Set by the spec (the batch module builds on this one).
    jobs: Deferred | None = None

    def __init__(self, res: Resources, settings: GeminiSettings) -> None:
        self.res = res
        self.settings = settings
        self.catalog = settings.catalog()
        self.prices = settings.prices()
        specs, projects = settings.key_specs()
        self.pool: GeminiKeys = GeminiKeys(
            res.redis,
            res.keys,
            self.name,
            specs,
            projects,
            make_client=partial(
                make_client,
                base_url=settings.gemini_base_url,
                api_version=settings.gemini_api_version,
                timeout_s=settings.gemini_timeout_s,
            ),
            quarantine_s=settings.gemini_quarantine_s,
        )
        self.caller = QuotaCaller(
            res, self.name, "Gemini", self.pool, policy=settings.policy(), requests=REQUESTS
        )
        self.caller.on_answer = lambda project, s: REQUEST_SECONDS.labels(project).observe(s)
        self.budgets = Budgets(res)
        self._configs: dict[tuple[str, str], types.GenerateContentConfig] = {}

    @staticmethod
    def wanted_concurrency(settings: GeminiSettings) -> int:
        """Images an analyzer process holds at once to keep the whole quota busy."""
        if not settings.gemini_api_keys:
            return 0
        return wanted_concurrency(settings.key_specs()[1], settings.policy())

    @staticmethod
    def quota_rpm(settings: GeminiSettings) -> float:
        """Requests per minute of all projects together (0: some project is unlimited)."""
        return quota_rpm(settings.key_specs()[1])

    def _choice(self, config: BatchConfig) -> tuple[profiles.CompiledProfile, str]:
        try:
            return self.catalog.choose(config.profile, config.model, self.prices)
        except profiles.ProfileError as exc:
            raise ItemError(ErrorClass.ANALYZER_ERROR, str(exc)) from None

    def columns(self, config: BatchConfig) -> list[str]:
        return self._choice(config)[0].columns

    def schema(self, config: BatchConfig) -> dict[str, dict[str, Any]]:
        return self._choice(config)[0].column_schemas

    def cache_key(self, config: BatchConfig) -> tuple[str, str]:
        compiled, model = self._choice(config)
        return compiled.key, model

    def _generation_config(
        self, compiled: profiles.CompiledProfile, model: str
    ) -> types.GenerateContentConfig:
        found = self._configs.get((compiled.key, model))
        if found is not None:
            return found
        profile = compiled.profile
        budget = thinking_budget(model, profile.thinking_budget)
        threshold = profile.safety_threshold
        safety = None
        if threshold:
            level = types.HarmBlockThreshold(threshold)
            safety = [types.SafetySetting(category=c, threshold=level) for c in _SAFETY_CATEGORIES]
        made = types.GenerateContentConfig(
            response_mime_type="application/json",
            response_json_schema=compiled.request_schema,
            max_output_tokens=profile.max_output_tokens,
            temperature=profile.temperature,
            media_resolution=_MEDIA.get(profile.media_resolution or ""),
            thinking_config=None
            if budget is None
            else types.ThinkingConfig(thinking_budget=budget),
            safety_settings=safety,
        )
        self._configs[(compiled.key, model)] = made
        return made

    def request(self, data: bytes, config: BatchConfig) -> Request:
        """What to send Gemini for this image: the same for a call and a batch job's line."""
        compiled, model = self._choice(config)
        mime = "image/png" if data.startswith(b"\x89PNG") else "image/jpeg"
        return Request(
            compiled=compiled,
            model=model,
            price=pricing.price_of(model, self.prices),
            tokens=gemini_pricing.input_tokens(compiled, model, *_image_size(data)),
            image=types.Part.from_bytes(data=data, mime_type=mime),
            prompt=compiled.profile.prompt,
            generation=self._generation_config(compiled, model),
        )

    async def analyze(self, data: bytes, facts: ImageFacts, config: BatchConfig) -> Analysis:
        request = self.request(data, config)
        reservation = await self.budgets.reserve_or_pause(config.id, request.worst_usd("standard"))
        usage = Usage()
        try:
            response, project = await self._call(
                config, request.model, request.contents, request.generation, request.tokens
            )
            usage = reply.usage_of(response, request.price)
        finally:
            await self.budgets.settle(reservation, usage.cost_usd)
        count_usage(usage, project)
        return analysis_of(response, request.compiled, request.model, usage)

    async def _call(
        self,
        config: BatchConfig,
        model: str,
        contents: list[Any],
        generation: types.GenerateContentConfig,
        tokens: int,
    ) -> tuple[types.GenerateContentResponse, str]:
        """The answer, and the project whose key got it."""

        async def send(client: genai.Client) -> types.GenerateContentResponse:
            return await client.aio.models.generate_content(
                model=model, contents=contents, config=generation
            )

        return await self.caller.call(config, model, tokens, send, self._classify)

    def _classify(self, exc: Exception) -> Failure | None:
        """What a google-genai exception means for the call (see ``calls``)."""
        if isinstance(exc, errors.APIError):
            if exc.code == 429:
                return Failure("rate_limited", "rate_limited", "429", delay=retry_delay(exc))
            if _rejects_key(exc):
                return Failure("key_rejected", "key_rejected", f"{exc.code} {exc.status}")
            if exc.code < 500 and exc.code != 408:
                message = f"Gemini refused the request: {exc.code} {exc.status}: {exc.message}"
                return Failure("fatal", "rejected", message)
            return Failure(
                "transient",
                "server_error",
                f"{exc.code} {exc.status}: {exc.message}",
                overloaded=exc.code in (503, 504),
            )
        if isinstance(exc, TimeoutError):
            message = f"no answer within {self.settings.gemini_timeout_s:g} s"
            return Failure("transient", "timeout", message, overloaded=True)
        if isinstance(exc, aiohttp.ClientError):
            return Failure("transient", "connection_error", f"connection failed: {exc}")
        return None

    async def report(self, stop: asyncio.Event) -> None:
        """Publish every key's state and its project's quota use for the dashboard."""
        await supervise("gemini-status", self.publish_status, stop, 5.0)

    async def publish_status(self) -> None:
        """``{p}:gemini:status``: key short hash -> JSON (the api's system view reads it)."""
        await self.caller.publish_status(
            self.settings.choose(None, None)[1], "Google answered 429: waiting its retry delay"
        )

    async def close(self) -> None:
        await close_clients(self.pool)


@dataclass(frozen=True, slots=True)
class Request:
    compiled: profiles.CompiledProfile
    model: str
    price: pricing.Price
    tokens: int  # input tokens by Google's rules
    image: types.Part
    prompt: str
    generation: types.GenerateContentConfig

    @property
    def contents(self) -> list[Any]:
        """What a call sends: the image, then the question."""
        return [self.image, self.prompt]

    def content(self) -> types.Content:
        """The same as the one user turn of a Batch API request."""
        return types.Content(role="user", parts=[self.image, types.Part(text=self.prompt)])

    def worst_usd(self, mode: pricing.Mode) -> float:
        """The most the call can cost: its input tokens plus a tenth, the whole output cap."""
        return pricing.cost_usd(
            self.price,
            input_tokens=math.ceil(self.tokens * 1.1) + 16,
            output_tokens=self.compiled.profile.max_output_tokens,
            mode=mode,
        )


def analysis_of(
    response: types.GenerateContentResponse,
    compiled: profiles.CompiledProfile,
    model: str,
    usage: Usage,
) -> Analysis:
    """The answer read and validated; PaidError (its cost kept) when it is unusable."""
    try:
        fields = reply.read(response, compiled)
    except InvalidOutput as exc:
        raise PaidError(ErrorClass.ANALYZER_INVALID_OUTPUT, str(exc), usage=usage) from None
    if fields.get("blocked"):
        BLOCKED.inc()
    return Analysis(fields=fields, usage=usage, model=model)


def count_usage(usage: Usage, project: str) -> None:
    INPUT_TOKENS.labels(project).inc(usage.input_tokens)
    OUTPUT_TOKENS.labels(project).inc(usage.output_tokens)
    THOUGHT_TOKENS.labels(project).inc(usage.thought_tokens)
    CACHED_TOKENS.labels(project).inc(usage.cached_tokens)
    COST.labels(project).inc(usage.cost_usd)
