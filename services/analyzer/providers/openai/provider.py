"""The ``openai`` provider: any OpenAI-compatible chat-completions server (OpenAI itself, a
gateway such as OpenRouter, or vLLM, Ollama, LM Studio, TGI on your own machines).

A call goes as a Gemini call does (docs/PROVIDERS.md): profile and model of the batch ->
input tokens by OpenAI's rules -> the batch's budget reserves the call's worst case ->
a slot of this process's adaptive concurrency -> the shared quota (``limiter``, per
project or endpoint and model, RPM and TPM) -> a key of that project ->
``chat.completions.create`` with the image as a base64 data URL and ``response_format``
``json_schema`` (strict) -> the answer read and validated (``answers``, the one local
repair) -> its real cost replaces the reservation.

Failures: 429 backs the (project, model) off for the server's hint (``retry-after-ms``,
``retry-after``, else ``x-ratelimit-reset-requests``/``-tokens``), shared through Redis;
401/403 quarantine the key; 5xx, timeouts and connection errors are retried with back-off
up to ``OPENAI_ATTEMPTS`` times; other 4xx fail the item. A server that answers something
that is not a chat completion, or a completion without a choice, fails the item as
``analyzer_invalid_output`` and the worker goes on. The SDK's own retries are off.
"""

from __future__ import annotations

import base64
import logging
import re
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Any, Literal

import openai
from openai.types.chat import ChatCompletion
from prometheus_client import Counter

from imagestream.common import pricing, profiles
from imagestream.common.messages import Usage

from ...answers import InvalidOutput, check, decode
from ..keyed import (
    Choice,
    HttpErrors,
    KeyedSettingsStruct,
    StainlessProvider,
    image_mime,
    image_size,
)
from . import pricing as openai_pricing
from .schema import drop_added_nulls, strict_schema

log = logging.getLogger(__name__)

REQUESTS = Counter(
    "imagestream_openai_requests_total",
    "OpenAI-compatible chat-completion calls by outcome (ok, rate_limited, key_rejected,"
    " server_error, timeout, connection_error, rejected, unreadable), per project.",
    ["project", "outcome"],
)
COST = Counter(
    "imagestream_openai_cost_usd_total",
    "What OpenAI-compatible calls cost at the price table's rates, per project.",
    ["project"],
)
DEFAULT_MODEL = "gpt-4.1-mini"
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class OpenAISettings(KeyedSettingsStruct, kw_only=True, frozen=True):
    """Settings of the OpenAI-compatible provider (docs/PROVIDERS.md)."""

    prefix = "openai"

    #: API keys, comma-separated; KEY@PROJECT groups keys that share one quota. A local
    #: server that checks no key still needs one here (any text). Empty: not available.
    openai_api_keys: list[str] = []
    #: PROJECT:rpm=N:tpm=N per project, comma-separated (0 = no limit).
    openai_project_limits: list[str] = []
    #: Default quota of a project per model: requests and input tokens per minute.
    openai_rpm: int = 500
    openai_tpm: int = 200_000
    #: Another endpoint: a gateway, or a self-hosted server (``http://127.0.0.1:8000/v1``);
    #: unset = api.openai.com. Set, a model the price table does not name costs 0.
    openai_base_url: str | None = None
    #: Model of batches that name none.
    openai_model: str = DEFAULT_MODEL
    #: ``detail`` of the image part: low (85 tokens), high, or auto.
    openai_image_detail: Literal["low", "high", "auto"] = "auto"
    openai_timeout_s: float = 120.0
    openai_attempts: int = 4
    openai_backoff_s: float = 1.0
    openai_quota_window_s: float = 60.0
    openai_quota_margin_s: float = 1.0
    openai_quota_burst_s: float = 1.0
    openai_quarantine_s: float = 3600.0
    openai_max_inflight: int = 256
    openai_prices_file: str | None = None
    #: Batch-price mode (the Batch API): most requests in one job, how long a job waits for
    #: more after its first, how often running jobs are polled (s), and jobs per project.
    openai_batch_max_requests: int = 1000
    openai_batch_linger_s: float = 30.0
    openai_batch_poll_s: float = 30.0
    openai_batch_max_jobs: int = 100

    @property
    def self_hosted(self) -> bool:
        return self.openai_base_url is not None

    def prices(self) -> dict[str, pricing.Price]:
        return openai_pricing.cached_prices(self.openai_prices_file)

    def choose(self, profile: str | None, model: str | None) -> Choice:
        """The batch's profile, model and price (ProfileError naming what is wrong)."""
        compiled = profiles.cached_catalog(self.profiles_dir).profile(
            profile or profiles.DEFAULT_PROFILE
        )
        name = (model or self.openai_model).strip()
        try:
            price = openai_pricing.price_for(name, self.prices(), self_hosted=self.self_hosted)
        except pricing.PriceError as exc:
            raise profiles.ProfileError(str(exc)) from None
        return Choice(compiled, name, price, strict_schema(compiled.profile.response_schema))


def settings_from(env: Mapping[str, str]) -> OpenAISettings:
    from imagestream.common import settings

    return settings.load(OpenAISettings, env)


def make_client(secret: str, *, base_url: str | None, timeout_s: float) -> openai.AsyncOpenAI:
    # max_retries=0: the SDK's retries would ignore our quota and the shared back-off.
    return openai.AsyncOpenAI(api_key=secret, base_url=base_url, timeout=timeout_s, max_retries=0)


def retry_hint(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait after a 429, from the server's headers (None: no hint)."""
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    if (after := headers.get("retry-after")) is not None:
        try:
            return float(after)
        except ValueError:
            try:
                return max(0.0, parsedate_to_datetime(after).timestamp() - time.time())
            except (TypeError, ValueError):
                pass
    resets = [
        duration_s(value)
        for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")
        if (value := headers.get(name)) is not None
    ]
    found = [r for r in resets if r is not None]
    return max(found) if found else None


def duration_s(text: str) -> float | None:
    """OpenAI's reset durations ("1s", "6m0s", "20ms") in seconds."""
    parts = _DURATION_PART.findall(text.strip())
    if not parts:
        return None
    return sum(float(number) * _UNIT_S[unit] for number, unit in parts)


ERRORS = HttpErrors(
    status=openai.APIStatusError,
    timeout=openai.APITimeoutError,
    connection=openai.APIConnectionError,
    validation=openai.APIResponseValidationError,
    retry_hint=retry_hint,
    unreadable="the server's answer is not a chat completion",
)


class OpenAIProvider(StainlessProvider[OpenAISettings, openai.AsyncOpenAI, ChatCompletion]):
    name = "openai"
    errors = ERRORS
    refused = "the server refused the request"
    label = "the server"
    requests = REQUESTS
    cost = COST
    cooling_reason = "the server answered 429: waiting its retry hint"

    def make_client(self, secret: str) -> openai.AsyncOpenAI:
        settings = self.settings
        return make_client(
            secret, base_url=settings.openai_base_url, timeout_s=settings.openai_timeout_s
        )

    def request(self, choice: Choice, data: bytes) -> dict[str, Any]:
        profile = choice.compiled.profile
        url = f"data:{image_mime(data)};base64,{base64.b64encode(data).decode()}"
        request: dict[str, Any] = {
            "model": choice.model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": profile.prompt},
                        {
                            "type": "image_url",
                            "image_url": {"url": url, "detail": self.settings.openai_image_detail},
                        },
                    ],
                }
            ],
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": choice.compiled.name,
                    "strict": True,
                    "schema": choice.schema,
                },
            },
            "max_completion_tokens": profile.max_output_tokens,
        }
        if profile.temperature is not None:
            request["temperature"] = profile.temperature
        return request

    def input_tokens(self, choice: Choice, data: bytes) -> int:
        width, height = image_size(data)
        image = openai_pricing.image_tokens(width, height, self.settings.openai_image_detail)
        prompt = pricing.text_tokens(choice.compiled.profile.prompt)
        return image + prompt + choice.compiled.schema_tokens

    async def send(self, client: openai.AsyncOpenAI, request: dict[str, Any]) -> ChatCompletion:
        completion = await client.chat.completions.create(**request)
        if not isinstance(completion, ChatCompletion):  # a body that is not JSON
            raise ValueError("not JSON")
        return completion

    def usage_of(self, answer: ChatCompletion, price: pricing.Price, mode: pricing.Mode) -> Usage:
        return usage_of(answer, price, mode)

    def read(self, answer: ChatCompletion, choice: Choice) -> dict[str, Any]:
        return read(answer, choice)


def usage_of(
    completion: ChatCompletion, price: pricing.Price, mode: pricing.Mode = "standard"
) -> Usage:
    """Tokens from ``usage`` (prompt, completion, reasoning, cached) and what they cost."""
    usage = completion.usage
    if usage is None:
        return Usage()
    details = usage.completion_tokens_details
    reasoning = (details.reasoning_tokens or 0) if details else 0
    prompt_details = usage.prompt_tokens_details
    cached = (prompt_details.cached_tokens or 0) if prompt_details else 0
    completion_tokens = usage.completion_tokens or 0
    cost = pricing.cost_usd(
        price,
        input_tokens=usage.prompt_tokens or 0,
        output_tokens=completion_tokens,
        cached_tokens=cached,
        mode=mode,
    )
    return Usage(
        input_tokens=usage.prompt_tokens or 0,
        output_tokens=max(0, completion_tokens - reasoning),
        thought_tokens=reasoning,
        cached_tokens=cached,
        cost_usd=cost,
    )


def read(completion: ChatCompletion, choice: Choice) -> dict[str, Any]:
    """The analysis (flattened), a refusal as the ``blocked`` analysis; InvalidOutput else."""
    compiled = choice.compiled
    if not completion.choices:
        raise InvalidOutput("the server returned no choice")
    first = completion.choices[0]
    message = first.message
    if message.refusal:
        return compiled.blocked(f"refused: {message.refusal}")
    if first.finish_reason == "content_filter":
        return compiled.blocked("content_filter")
    if first.finish_reason == "length":
        cap = compiled.profile.max_output_tokens
        raise InvalidOutput(
            f"the answer was cut at the output cap of {cap} tokens"
            f" (raise max_output_tokens of profile {compiled.name})"
        )
    value = decode(message.content or "", "openai")
    return check(drop_added_nulls(value, compiled.profile.response_schema), compiled)
