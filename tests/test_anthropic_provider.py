"""The anthropic provider's pure parts: the tool's schema, retry hints, usage and prices,
answers, batch choices."""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any

import pytest
from anthropic.types import Message

from imagestream.analyzer.answers import InvalidOutput
from imagestream.analyzer.providers.anthropic import pricing as anthropic_pricing
from imagestream.analyzer.providers.anthropic.provider import (
    TOOL_NAME,
    read,
    retry_hint,
    settings_from,
    usage_of,
)
from imagestream.analyzer.providers.anthropic.schema import tool_schema
from imagestream.analyzer.providers.keyed import Choice
from imagestream.common import pricing, profiles, providers

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "caption": {"type": "string", "maxLength": 200},
        "mood": {"type": "string", "enum": ["calm", "busy"], "nullable": True},
        "score": {"type": "number", "nullable": True},
        "tags": {"type": "array", "items": {"type": "string", "nullable": True}},
    },
    "required": ["caption"],
}


def message(*content: dict[str, Any], stop: str = "tool_use", usage: dict[str, int] | None = None) -> Message:  # fmt: skip
    return Message.model_validate(
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-haiku-4-5",
            "content": list(content),
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": usage or {"input_tokens": 10, "output_tokens": 5},
        }
    )


def tool_use(value: Any) -> dict[str, Any]:
    return {"type": "tool_use", "id": "toolu_1", "name": TOOL_NAME, "input": value}


def choice() -> Choice:
    compiled = profiles.compile_profile(
        "t", profiles.Profile(prompt="Look.", response_schema=SCHEMA)
    )
    return Choice(compiled, "claude-haiku-4-5", anthropic_pricing.PRICES["claude-haiku-4-5"], tool_schema(compiled.request_schema))  # fmt: skip


def test_the_tool_schema_is_standard_json_schema_with_an_object_at_the_top() -> None:
    translated = tool_schema(SCHEMA)
    props = translated["properties"]
    assert props["score"] == {"type": ["number", "null"]}
    assert props["mood"]["type"] == ["string", "null"] and props["mood"]["enum"][-1] is None
    assert props["tags"]["items"] == {"type": ["string", "null"]}
    assert props["caption"] == {"type": "string", "maxLength": 200}  # kept: Anthropic takes it
    assert translated["required"] == ["caption"] and "additionalProperties" not in translated
    with pytest.raises(profiles.ProfileError, match="response_schema is an object"):
        tool_schema({"type": "array", "items": {"type": "string"}})


def rfc3339_in(seconds: float) -> str:
    return dt.datetime.fromtimestamp(time.time() + seconds, dt.UTC).isoformat()


def test_retry_hints_from_retry_after_or_the_exhausted_limits_reset() -> None:
    assert retry_hint({"retry-after": "7"}) == 7.0
    exhausted = {
        "anthropic-ratelimit-requests-remaining": "12",
        "anthropic-ratelimit-requests-reset": rfc3339_in(50),
        "anthropic-ratelimit-input-tokens-remaining": "0",
        "anthropic-ratelimit-input-tokens-reset": rfc3339_in(20),
    }
    # Only the limit with nothing left counts: 20 s, not the 50 s of the other one.
    assert retry_hint(exhausted) == pytest.approx(20, abs=1.5)
    assert retry_hint({"anthropic-ratelimit-requests-remaining": "3"}) is None
    assert retry_hint({}) is None


def test_usage_counts_prompt_cache_reads_and_writes_at_their_prices() -> None:
    price = anthropic_pricing.PRICES["claude-sonnet-4-5"]
    usage = usage_of(
        message(
            tool_use({}),
            usage={
                "input_tokens": 700,
                "output_tokens": 100,
                "cache_read_input_tokens": 200,
                "cache_creation_input_tokens": 100,
            },
        ),
        price,
    )
    assert (usage.input_tokens, usage.output_tokens, usage.cached_tokens) == (1000, 100, 200)
    expected = (700 * 3.00 + 200 * 0.30 + 100 * 3.00 * 1.25 + 100 * 15.00) / 1e6
    assert usage.cost_usd == pytest.approx(expected)
    batch = usage_of(message(tool_use({})), price, "batch")
    assert batch.cost_usd == pytest.approx((10 * 3.00 + 5 * 15.00) / 1e6 / 2)


def test_answers_are_read_repaired_refused_or_failed_like_every_providers() -> None:
    good = {"caption": "a cat", "score": None, "tags": ["cat"]}
    assert read(message(tool_use(good)), choice())["caption"] == "a cat"
    # No tool call, the JSON in text (a gateway that dropped the tool): the local repair.
    fenced = {"type": "text", "text": 'Here:\n```json\n{"caption": "a dog"}\n```'}
    assert read(message(fenced, stop="end_turn"), choice())["caption"] == "a dog"
    assert read(message(stop="refusal"), choice())["blocked"] is True
    with pytest.raises(InvalidOutput, match="no content"):
        read(message(stop="end_turn"), choice())
    with pytest.raises(InvalidOutput, match="does not match profile t"):
        read(message(tool_use({"caption": 3})), choice())
    with pytest.raises(InvalidOutput, match="output cap of 512"):
        read(message(tool_use({}), stop="max_tokens"), choice())
    with pytest.raises(InvalidOutput, match="not JSON"):
        read(message({"type": "text", "text": "a cat"}, stop="end_turn"), choice())


def test_batch_choices_name_what_is_wrong() -> None:
    env = {"ANTHROPIC_API_KEYS": "sk-x"}
    chosen = providers.resolve_batch({"analyzer": "anthropic"}, env=env)
    assert (chosen.analyzer, chosen.profile, chosen.model) == ("anthropic", "describe", "claude-haiku-4-5")  # fmt: skip
    # A dated model id is priced as its family.
    dated = settings_from(env).choose(None, "claude-sonnet-4-5-20250929")
    assert dated.price == anthropic_pricing.PRICES["claude-sonnet-4-5"]
    assert providers.resolve_batch({"analyzer": "anthropic", "mode": "batch"}, env=env).options == {"mode": "batch"}  # fmt: skip
    with pytest.raises(profiles.ProfileError, match=r"no price for model 'gpt-4o'.*ANTHROPIC_PRICES_FILE \(known: claude-3-5-haiku"):  # fmt: skip
        providers.resolve_batch({"analyzer": "anthropic", "model": "gpt-4o"}, env=env)
    with pytest.raises(profiles.ProfileError, match="not configured here: set ANTHROPIC_API_KEYS"):
        providers.resolve_batch({"analyzer": "anthropic"}, env={}, require_configured=True)
    with pytest.raises(profiles.ProfileError, match="one of local, anthropic, gemini, openai"):
        providers.resolve_batch({"analyzer": "claude"}, env=env)
    assert pricing.price_of("claude-3-5-haiku-20241022", anthropic_pricing.PRICES).input == 0.80


def test_the_openapi_document_offers_anthropic_from_the_registry() -> None:
    from imagestream.api import openapi

    document = json.dumps(openapi.DOCUMENT)
    assert '"enum": ["local", "anthropic", "gemini", "openai"]' in document
    assert "(analyzers: anthropic, gemini, openai)" in document
