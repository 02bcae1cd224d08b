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

import logging
from typing import Any

import aiohttp
from google import genai
from google.genai import errors, types
from prometheus_client import Counter, Histogram

from imagestream.common import pricing, profiles
from imagestream.common.connections import Resources
from imagestream.common.messages import Usage
from imagestream.common.settings import StreamSettings

from ...calls import Failure
from ..keyed import Choice, KeyedConfig, KeyedProvider, image_mime, image_size
from . import pricing as gemini_pricing
from . import reply
from .keys import make_client

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
        self.keyed().check()
        try:
            self.catalog()
            self.prices()
        except (profiles.ProfileError, pricing.PriceError) as exc:
            raise ValueError(str(exc)) from None

    def keyed(self) -> KeyedConfig:
        return KeyedConfig.of(self, "gemini")

    @property
    def default_model(self) -> str:
        """The model of the default profile."""
        return self.choose(None, None).model

    def catalog(self) -> profiles.Catalog:
        return profiles.cached_catalog(self.profiles_dir)

    def prices(self) -> dict[str, pricing.Price]:
        return gemini_pricing.cached_prices(self.gemini_prices_file)

    def choose(self, profile: str | None, model: str | None) -> Choice:
        """The profile, model and price of a batch (ProfileError when unknown or unpriced);
        Gemini takes the profile's schema as it is (``responseJsonSchema``)."""
        prices = self.prices()
        compiled, chosen = self.catalog().choose(profile, model, prices)
        price = pricing.price_of(chosen, prices)
        return Choice(compiled, chosen, price, compiled.request_schema)


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


class GeminiProvider(KeyedProvider[GeminiSettings, genai.Client, types.GenerateContentResponse]):
    name = "gemini"
    label = "Gemini"
    requests = REQUESTS
    cost = COST
    cooling_reason = "Google answered 429: waiting its retry delay"

    def __init__(self, res: Resources, settings: GeminiSettings) -> None:
        super().__init__(res, settings)
        self.caller.on_answer = lambda project, s: REQUEST_SECONDS.labels(project).observe(s)
        self._configs: dict[tuple[str, str], types.GenerateContentConfig] = {}

    def make_client(self, secret: str) -> genai.Client:
        settings = self.settings
        return make_client(
            secret,
            base_url=settings.gemini_base_url,
            api_version=settings.gemini_api_version,
            timeout_s=settings.gemini_timeout_s,
        )

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

    def request(self, choice: Choice, data: bytes) -> dict[str, Any]:
        """``generate_content``'s arguments: the image, then the question; a batch job's
        line is made of the same."""
        image = types.Part.from_bytes(data=data, mime_type=image_mime(data))
        return {
            "model": choice.model,
            "contents": [image, choice.compiled.profile.prompt],
            "config": self._generation_config(choice.compiled, choice.model),
        }

    def input_tokens(self, choice: Choice, data: bytes) -> int:
        return gemini_pricing.input_tokens(choice.compiled, choice.model, *image_size(data))

    async def send(
        self, client: genai.Client, request: dict[str, Any]
    ) -> types.GenerateContentResponse:
        return await client.aio.models.generate_content(**request)

    def classify(self, exc: Exception) -> Failure | None:
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

    def usage_of(
        self, answer: types.GenerateContentResponse, price: pricing.Price, mode: pricing.Mode
    ) -> Usage:
        return reply.usage_of(answer, price, mode)

    def read(self, answer: types.GenerateContentResponse, choice: Choice) -> dict[str, Any]:
        fields = reply.read(answer, choice.compiled)
        if fields.get("blocked"):
            BLOCKED.inc()
        return fields

    def count_usage(self, usage: Usage, project: str) -> None:
        INPUT_TOKENS.labels(project).inc(usage.input_tokens)
        OUTPUT_TOKENS.labels(project).inc(usage.output_tokens)
        THOUGHT_TOKENS.labels(project).inc(usage.thought_tokens)
        CACHED_TOKENS.labels(project).inc(usage.cached_tokens)
        COST.labels(project).inc(usage.cost_usd)

    async def close_client(self, client: genai.Client) -> None:
        await client.aio.aclose()
