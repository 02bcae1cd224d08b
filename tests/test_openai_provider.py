"""The openai provider's pure parts: strict-mode schema, retry hints, usage, answers, choices."""

from __future__ import annotations

from typing import Any

import pytest
from openai.types.chat import ChatCompletion

from imagestream.analyzer.answers import InvalidOutput
from imagestream.analyzer.providers.openai import pricing as openai_pricing
from imagestream.analyzer.providers.openai.provider import (
    Choice,
    read,
    retry_hint,
    settings_from,
    usage_of,
)
from imagestream.analyzer.providers.openai.schema import drop_added_nulls, strict_schema
from imagestream.common import pricing, profiles, providers

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "caption": {"type": "string", "maxLength": 200, "title": "Caption"},
        "mood": {"type": "string", "enum": ["calm", "busy"]},
        "score": {"type": "number", "nullable": True},
        "colors": {
            "type": "object",
            "properties": {"primary": {"type": "string"}, "extra": {"type": "string"}},
            "required": ["primary"],
        },
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    },
    "required": ["caption", "colors"],
}


def compiled() -> profiles.CompiledProfile:
    return profiles.compile_profile("t", profiles.Profile(prompt="Look.", response_schema=SCHEMA))


def completion(content: str | None, *, finish: str = "stop", refusal: str | None = None,
               choices: bool = True, usage: dict[str, Any] | None = None) -> ChatCompletion:  # fmt: skip
    message = {"role": "assistant", "content": content, "refusal": refusal}
    return ChatCompletion.model_validate(
        {
            "id": "c1",
            "object": "chat.completion",
            "created": 0,
            "model": "m",
            "choices": [{"index": 0, "finish_reason": finish, "message": message}]
            if choices
            else [],
            "usage": usage,
        }
    )


def test_strict_schema_closes_every_object_and_requires_every_property() -> None:
    strict = strict_schema(SCHEMA)
    assert strict["additionalProperties"] is False
    assert strict["required"] == ["caption", "mood", "score", "colors", "tags"]
    props = strict["properties"]
    # Optional ones become nullable; the profile's own nullable stays nullable once.
    assert props["mood"]["type"] == ["string", "null"] and None in props["mood"]["enum"]
    assert props["score"]["type"] == ["number", "null"] and "nullable" not in props["score"]
    assert props["tags"]["type"] == ["array", "null"] and props["tags"]["maxItems"] == 3
    assert props["caption"] == {"type": "string"}  # maxLength, title: not strict keywords
    colors = props["colors"]
    assert colors["additionalProperties"] is False and colors["required"] == ["primary", "extra"]
    assert colors["properties"]["extra"]["type"] == ["string", "null"]


def test_the_nulls_strict_mode_adds_are_dropped_before_validation() -> None:
    answer = {"caption": "a dog", "mood": None, "score": None, "tags": None,
              "colors": {"primary": "red", "extra": None}}  # fmt: skip
    cleaned = drop_added_nulls(answer, SCHEMA)
    assert cleaned == {"caption": "a dog", "score": None, "colors": {"primary": "red"}}
    flat = compiled().parse(cleaned)
    assert flat["caption"] == "a dog" and flat["colors.primary"] == "red" and flat["score"] is None


def test_a_profile_strict_mode_cannot_hold_is_refused() -> None:
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(12):
        deep = {"type": "object", "properties": {"x": deep}, "required": ["x"]}
    with pytest.raises(profiles.ProfileError, match="at most 10 levels"):
        strict_schema(deep)


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after": "7"}, 7.0),
        ({"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "6m0s"}, 360.0),
        ({"x-ratelimit-reset-tokens": "20ms"}, 0.02),
        ({}, None),
    ],
)
def test_retry_hints(headers: dict[str, str], seconds: float | None) -> None:
    assert retry_hint(headers) == (pytest.approx(seconds) if seconds is not None else None)


def test_usage_counts_reasoning_and_cached_tokens_at_the_models_price() -> None:
    price = openai_pricing.PRICES["gpt-4.1-mini"]
    done = completion("{}", usage={
        "prompt_tokens": 1000, "completion_tokens": 300, "total_tokens": 1300,
        "completion_tokens_details": {"reasoning_tokens": 100},
        "prompt_tokens_details": {"cached_tokens": 200},
    })  # fmt: skip
    usage = usage_of(done, price)
    assert (usage.input_tokens, usage.output_tokens, usage.thought_tokens, usage.cached_tokens) == (
        1000, 200, 100, 200,
    )  # fmt: skip
    expected = (800 * 0.40 + 200 * 0.10 + 300 * 1.60) / 1e6
    assert usage.cost_usd == pytest.approx(expected)
    assert usage_of(completion("{}"), price).cost_usd == 0


def test_answers_are_read_repaired_refused_or_failed_like_every_providers() -> None:
    choice = Choice(compiled(), "m", openai_pricing.FREE, strict_schema(SCHEMA))
    good = '{"caption": "a cat", "colors": {"primary": "grey", "extra": null}, "mood": null}'
    assert read(completion(good), choice)["caption"] == "a cat"
    # A server that ignored json_schema and wrapped the JSON: the one local repair.
    assert read(completion(f"Sure!\n```json\n{good}\n```"), choice)["colors.primary"] == "grey"
    assert read(completion(None, refusal="I can't help"), choice)["blocked"] is True
    with pytest.raises(InvalidOutput, match="no choice"):
        read(completion(None, choices=False), choice)
    with pytest.raises(InvalidOutput, match="not JSON"):
        read(completion("a cat, grey"), choice)
    with pytest.raises(InvalidOutput, match="does not match profile t"):
        read(completion('{"caption": 3, "colors": {"primary": "x"}}'), choice)
    with pytest.raises(InvalidOutput, match="output cap of 512"):
        read(completion('{"capt', finish="length"), choice)


def test_batch_choices_name_what_is_wrong() -> None:
    env = {"OPENAI_API_KEYS": "sk-x"}
    chosen = providers.resolve_batch({"analyzer": "openai", "model": "gpt-4o"}, env=env)
    assert (chosen.analyzer, chosen.profile, chosen.model) == ("openai", "describe", "gpt-4o")
    with pytest.raises(
        profiles.ProfileError, match=r"no price for model 'llava'.*OPENAI_PRICES_FILE"
    ):
        providers.resolve_batch({"analyzer": "openai", "model": "llava"}, env=env)
    # A self-hosted server: any model, free unless a price file says otherwise.
    local = {**env, "OPENAI_BASE_URL": "http://127.0.0.1:8000/v1"}
    assert (
        providers.resolve_batch({"analyzer": "openai", "model": "llava"}, env=local).model
        == "llava"
    )
    config = settings_from(local)
    assert config.choose(None, "llava").price == openai_pricing.FREE
    assert config.choose(None, "gpt-4o").price == openai_pricing.PRICES["gpt-4o"]
    batch = providers.resolve_batch({"analyzer": "openai", "mode": "batch"}, env=env)
    assert batch.options == {"mode": "batch"}
    with pytest.raises(
        profiles.ProfileError, match=r"needs analyzer anthropic or gemini or openai"
    ):
        providers.resolve_batch({"analyzer": "local", "mode": "batch"}, env=env)
    with pytest.raises(
        profiles.ProfileError, match="analyzer must be one of local, anthropic, gemini, openai"
    ):
        providers.resolve_batch({"analyzer": "claude"}, env=env)
    with pytest.raises(profiles.ProfileError, match="not configured here: set OPENAI_API_KEYS"):
        providers.resolve_batch({"analyzer": "openai"}, env={}, require_configured=True)
    assert pricing.price_of("gpt-4o", openai_pricing.PRICES).input == 2.50
