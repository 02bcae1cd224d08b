"""The ``anthropic`` provider: Claude through the official ``anthropic`` SDK.

A call goes as every keyed provider's does (``keyed``): profile, model and price of the
batch -> input tokens by Anthropic's image rule -> the batch's budget reserves the worst
case -> the shared quota (per project and model, RPM and input TPM) -> a key of that
project -> ``messages.create`` with the image as a base64 ``image`` block and the
profile's schema as the ``input_schema`` of a tool the model is forced to call
(``tool_choice`` ``{"type": "tool"}``) -> the tool call's input validated against the
profile (``answers``; a text answer instead gets the one local repair) -> its real cost
replaces the reservation.

Failures: 429 backs the (project, model) off for ``retry-after``, else until the latest
``anthropic-ratelimit-*-reset`` of a limit with nothing remaining, shared through Redis;
401/403 quarantine the key; 529 (overloaded), 5xx, timeouts and connection errors are
retried with back-off up to ``ANTHROPIC_ATTEMPTS`` times (529 also halves the
concurrency for a while); other 4xx fail the item. A body that is not a Message, or a
Message with no content, fails the item as ``analyzer_invalid_output`` and the worker
goes on. The SDK's own retries are off.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
from collections.abc import Mapping
from typing import Any

import anthropic
from anthropic.types import Message
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
from . import pricing as anthropic_pricing
from .schema import tool_schema

REQUESTS = Counter(
    "imagestream_anthropic_requests_total",
    "Anthropic messages calls by outcome (ok, rate_limited, key_rejected, overloaded,"
    " server_error, timeout, connection_error, rejected, unreadable), per project.",
    ["project", "outcome"],
)
COST = Counter(
    "imagestream_anthropic_cost_usd_total",
    "What Anthropic calls cost at the price table's rates (Message Batches: half), per project.",
    ["project"],
)
DEFAULT_MODEL = "claude-haiku-4-5"
#: The tool the model is made to call; its input is the analysis.
TOOL_NAME = "record_analysis"
_LIMITS = ("requests", "tokens", "input-tokens", "output-tokens")


class AnthropicSettings(KeyedSettingsStruct, kw_only=True, frozen=True):
    """Settings of the Anthropic provider (docs/PROVIDERS.md)."""

    prefix = "anthropic"

    #: API keys, comma-separated; KEY@PROJECT groups keys of one organisation or
    #: workspace (they share its rate limits). Empty: the anthropic analyzer is not available.
    anthropic_api_keys: list[str] = []
    #: PROJECT:rpm=N:tpm=N per project, comma-separated (0 = no limit).
    anthropic_project_limits: list[str] = []
    #: Default limits of a project per model: requests and input tokens per minute
    #: (Anthropic's tier 1 for Sonnet; raise them to your tier's).
    anthropic_rpm: int = 50
    anthropic_tpm: int = 30_000
    #: Another endpoint (a gateway, the emulator); unset = api.anthropic.com.
    anthropic_base_url: str | None = None
    #: Model of batches that name none.
    anthropic_model: str = DEFAULT_MODEL
    anthropic_timeout_s: float = 120.0
    anthropic_attempts: int = 4
    anthropic_backoff_s: float = 1.0
    anthropic_quota_window_s: float = 60.0
    anthropic_quota_margin_s: float = 1.0
    anthropic_quota_burst_s: float = 1.0
    anthropic_quarantine_s: float = 3600.0
    anthropic_max_inflight: int = 256
    anthropic_prices_file: str | None = None
    #: Batch-price mode (Message Batches): most requests in one batch, how long it waits
    #: for more after its first, how often running ones are polled (s), batches per project.
    anthropic_batch_max_requests: int = 1000
    anthropic_batch_linger_s: float = 30.0
    anthropic_batch_poll_s: float = 30.0
    anthropic_batch_max_jobs: int = 100

    def prices(self) -> dict[str, pricing.Price]:
        return anthropic_pricing.cached_prices(self.anthropic_prices_file)

    def choose(self, profile: str | None, model: str | None) -> Choice:
        """The batch's profile, model and price (ProfileError naming what is wrong)."""
        compiled = profiles.cached_catalog(self.profiles_dir).profile(
            profile or profiles.DEFAULT_PROFILE
        )
        name = (model or self.anthropic_model).strip()
        try:
            price = pricing.price_of(name, self.prices(), setting=anthropic_pricing.PRICES_SETTING)
        except pricing.PriceError as exc:
            raise profiles.ProfileError(str(exc)) from None
        return Choice(compiled, name, price, tool_schema(compiled.request_schema))


def settings_from(env: Mapping[str, str]) -> AnthropicSettings:
    from imagestream.common import settings

    return settings.load(AnthropicSettings, env)


def make_client(secret: str, *, base_url: str | None, timeout_s: float) -> anthropic.AsyncAnthropic:
    # max_retries=0: the SDK's retries would ignore our quota and the shared back-off.
    return anthropic.AsyncAnthropic(
        api_key=secret, base_url=base_url, timeout=timeout_s, max_retries=0
    )


def retry_hint(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait after a 429: ``retry-after``, else until the latest reset of a
    limit with nothing remaining (``anthropic-ratelimit-*``, RFC 3339); None: no hint."""
    if (after := headers.get("retry-after")) is not None:
        try:
            return max(0.0, float(after))
        except ValueError:
            pass
    waits = []
    for limit in _LIMITS:
        prefix = f"anthropic-ratelimit-{limit}"
        if headers.get(f"{prefix}-remaining") != "0":
            continue
        try:
            reset = dt.datetime.fromisoformat(headers.get(f"{prefix}-reset", ""))
        except ValueError:
            continue
        waits.append(max(0.0, reset.timestamp() - time.time()))
    return max(waits) if waits else None


ERRORS = HttpErrors(
    status=anthropic.APIStatusError,
    timeout=anthropic.APITimeoutError,
    connection=anthropic.APIConnectionError,
    validation=anthropic.APIResponseValidationError,
    retry_hint=retry_hint,
    unreadable="Anthropic's answer is not a Message",
)


class AnthropicProvider(StainlessProvider[AnthropicSettings, anthropic.AsyncAnthropic, Message]):
    name = "anthropic"
    errors = ERRORS
    refused = "Anthropic refused the request"
    label = "Anthropic"
    requests = REQUESTS
    cost = COST
    cooling_reason = "Anthropic answered 429: waiting its retry-after"

    def make_client(self, secret: str) -> anthropic.AsyncAnthropic:
        settings = self.settings
        return make_client(
            secret, base_url=settings.anthropic_base_url, timeout_s=settings.anthropic_timeout_s
        )

    def request(self, choice: Choice, data: bytes) -> dict[str, Any]:
        return message_request(choice, data)

    def input_tokens(self, choice: Choice, data: bytes) -> int:
        image = anthropic_pricing.image_tokens(*image_size(data))
        return image + pricing.text_tokens(choice.compiled.profile.prompt) + tool_tokens(choice)

    async def send(self, client: anthropic.AsyncAnthropic, request: dict[str, Any]) -> Message:
        message = await client.messages.create(**request)
        if not isinstance(message, Message):  # a body that is not JSON
            raise ValueError("not JSON")
        return message

    def usage_of(self, answer: Message, price: pricing.Price, mode: pricing.Mode) -> Usage:
        return usage_of(answer, price, mode)

    def read(self, answer: Message, choice: Choice) -> dict[str, Any]:
        return read(answer, choice)


def message_request(choice: Choice, data: bytes) -> dict[str, Any]:
    """The ``messages.create`` arguments for this image: a call's, a Message Batch
    request's ``params``, and (without ``max_tokens``) what ``count_tokens`` counts. The
    profile's ``temperature`` is not sent: the SDK (2.x) no longer takes sampling
    parameters."""
    profile = choice.compiled.profile
    image = {
        "type": "image",
        "source": {
            "type": "base64",
            "media_type": image_mime(data),
            "data": base64.b64encode(data).decode(),
        },
    }
    return {
        "model": choice.model,
        "max_tokens": profile.max_output_tokens,
        "messages": [
            {"role": "user", "content": [image, {"type": "text", "text": profile.prompt}]}
        ],
        "tools": [tool_of(choice)],
        "tool_choice": {"type": "tool", "name": TOOL_NAME},
    }


def tool_of(choice: Choice) -> dict[str, Any]:
    """The tool the model is made to call: its input is the analysis."""
    return {
        "name": TOOL_NAME,
        "description": f"Record the image's analysis ({choice.compiled.name}).",
        "input_schema": choice.schema,
    }


def tool_tokens(choice: Choice) -> int:
    """Input tokens a forced tool adds: its definition, and Anthropic's tool-use system
    prompt."""
    definition = json.dumps([tool_of(choice)])
    return pricing.text_tokens(definition) + anthropic_pricing.FORCED_TOOL_SYSTEM_TOKENS


def usage_of(message: Message, price: pricing.Price, mode: pricing.Mode = "standard") -> Usage:
    """Tokens from ``usage`` and what they cost. Anthropic reports prompt-cache reads and
    writes beside ``input_tokens``: all three are input here, the reads cached."""
    usage = message.usage
    read_tokens = usage.cache_read_input_tokens or 0
    written = usage.cache_creation_input_tokens or 0
    total_input = usage.input_tokens + read_tokens + written
    cost = pricing.cost_usd(
        price,
        input_tokens=total_input,
        output_tokens=usage.output_tokens,
        cached_tokens=read_tokens,
        mode=mode,
    )
    # A cache write costs more than plain input: the part above the input price.
    extra_write = anthropic_pricing.CACHE_WRITE_FACTOR - 1
    cost += extra_write * pricing.cost_usd(price, input_tokens=written, output_tokens=0, mode=mode)
    return Usage(
        input_tokens=total_input,
        output_tokens=usage.output_tokens,
        cached_tokens=read_tokens,
        cost_usd=cost,
    )


def read(message: Message, choice: Choice) -> dict[str, Any]:
    """The analysis (flattened), a refusal as the ``blocked`` analysis; InvalidOutput else."""
    compiled = choice.compiled
    if message.stop_reason == "refusal":
        return compiled.blocked("refused")
    if message.stop_reason == "max_tokens":
        cap = compiled.profile.max_output_tokens
        raise InvalidOutput(
            f"the answer was cut at the output cap of {cap} tokens"
            f" (raise max_output_tokens of profile {compiled.name})"
        )
    if not message.content:
        raise InvalidOutput("Anthropic returned no content")
    for block in message.content:
        if block.type == "tool_use" and block.name == TOOL_NAME:
            return check(block.input, compiled)
    # No tool call (a gateway that dropped the tool): the text, repaired once if needed.
    text = "".join(block.text for block in message.content if block.type == "text")
    return check(decode(text, "anthropic"), compiled)
