"""The Gemini emulator, driven through the real google-genai SDK (retries off) on loopback."""

from __future__ import annotations

import asyncio
import io
import json
import math
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, Literal

import aiohttp
import msgspec
import pydantic
import pytest
from google import genai
from google.genai import errors, types
from PIL import Image

from imagestream.devtools.gemini_server import (
    Emulator,
    EmulatorConfig,
    LatencyConfig,
    QuotaLimits,
    build_arg_parser,
    config_from_args,
    running_emulator,
)
from imagestream.devtools.schema_fake import generate_for_schema

# google-genai subclasses aiohttp.ClientSession, which aiohttp answers with a
# DeprecationWarning; the repository turns warnings into errors.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Inheritance class AiohttpClientSession from ClientSession:DeprecationWarning"
)

MODEL = "gemini-2.5-flash"
PROMPT = "Describe this image."  # 20 characters: 5 text tokens at ~4 characters per token


def png(width: int, height: int, color: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG")
    return buf.getvalue()


def image_part(width: int = 64, height: int = 48, **kw: Any) -> types.Part:
    color = kw.pop("color", (200, 40, 40))
    return types.Part.from_bytes(data=png(width, height, color), mime_type="image/png", **kw)


def client(base_url: str, key: str = "key-a", version: str = "v1beta") -> genai.Client:
    return genai.Client(
        api_key=key,
        http_options=types.HttpOptions(
            base_url=base_url,
            api_version=version,
            # The SDK must not retry behind the test's back.
            retry_options=types.HttpRetryOptions(attempts=1),
        ),
    )


@pytest.fixture
async def emu() -> AsyncIterator[tuple[Emulator, str]]:
    config = EmulatorConfig(default_limits=QuotaLimits(rpm=None, tpm=None, rpd=None))
    async with running_emulator(config) as pair:
        yield pair


@pytest.fixture
async def sdk(emu: tuple[Emulator, str]) -> AsyncIterator[genai.Client]:
    c = client(emu[1])
    yield c
    await c.aio.aclose()


def retry_delay(exc: errors.APIError) -> float:
    """RetryInfo.retryDelay from the error body the SDK exposes as `details`."""
    for detail in exc.details["error"]["details"]:
        if detail["@type"] == "type.googleapis.com/google.rpc.RetryInfo":
            return float(detail["retryDelay"].rstrip("s"))
    raise AssertionError(f"no RetryInfo in {exc.details}")


def detail_of(exc: errors.APIError, type_suffix: str) -> dict[str, Any]:
    for detail in exc.details["error"]["details"]:
        if detail["@type"].endswith(type_suffix):
            return dict(detail)
    raise AssertionError(f"no {type_suffix} in {exc.details}")


# --------------------------------------------------------------------------------------------
# Structured output


class Thing(pydantic.BaseModel):
    name: str
    confidence: float = pydantic.Field(ge=0, le=1)


class Analysis(pydantic.BaseModel):
    caption: str = pydantic.Field(max_length=120)
    kind: Literal["photo", "illustration", "screenshot"]
    tags: list[str] = pydantic.Field(min_length=1, max_length=5)
    objects: list[Thing]
    nsfw: bool
    people: int = pydantic.Field(ge=0, le=50)
    note: str | None = None


async def test_response_schema_parses_and_validates(sdk: genai.Client) -> None:
    config = types.GenerateContentConfig(
        response_mime_type="application/json", response_schema=Analysis
    )
    first = await sdk.aio.models.generate_content(
        model=MODEL, contents=[image_part(), PROMPT], config=config
    )
    # `parsed` is the SDK's pydantic validation of the text: every constraint was met.
    assert isinstance(first.parsed, Analysis)
    assert first.candidates is not None
    assert first.candidates[0].finish_reason == types.FinishReason.STOP
    assert first.model_version == MODEL
    assert first.response_id
    again = await sdk.aio.models.generate_content(
        model=MODEL, contents=[image_part(), "another prompt"], config=config
    )
    assert again.text == first.text  # same image bytes, same answer
    texts = set()
    for shade in range(6):
        other = await sdk.aio.models.generate_content(
            model=MODEL, contents=[image_part(color=(shade, 90, 200)), PROMPT], config=config
        )
        assert isinstance(other.parsed, Analysis)
        texts.add(other.text)
    assert len(texts) > 1  # other images, other answers


class MObject(msgspec.Struct):
    label: str
    score: Annotated[float, msgspec.Meta(ge=0, le=1)]


class MAnalysis(msgspec.Struct):
    caption: Annotated[str, msgspec.Meta(min_length=3, max_length=80)]
    category: Literal["animal", "landscape", "object", "people"]
    tags: Annotated[list[str], msgspec.Meta(min_length=2, max_length=4)]
    objects: list[MObject]
    width_px: Annotated[int, msgspec.Meta(gt=0, lt=10)]
    taken: Annotated[str, msgspec.Meta(extra_json_schema={"format": "date-time"})]
    alt: str | None = None


async def test_response_json_schema_from_msgspec_struct(sdk: genai.Client) -> None:
    schema = msgspec.json.schema(MAnalysis)  # $ref/$defs, anyOf, exclusive bounds
    config = types.GenerateContentConfig(
        response_mime_type="application/json", response_json_schema=schema
    )
    for shade in range(5):
        response = await sdk.aio.models.generate_content(
            model=MODEL, contents=[image_part(color=(10, shade, 10)), PROMPT], config=config
        )
        assert response.text is not None
        # msgspec checks types, enums, lengths and bounds while decoding.
        decoded = msgspec.json.decode(response.text, type=MAnalysis)
        assert 0 < decoded.width_px < 10
        assert 2 <= len(decoded.tags) <= 4


def test_schema_faker_handles_both_dialects() -> None:
    gemini_schema = {
        "type": "OBJECT",
        "properties": {
            "b": {"type": "INTEGER", "minimum": 5, "maximum": 5},
            "a": {"type": "STRING", "format": "enum", "enum": ["x"]},
            "c": {"type": "ARRAY", "items": {"type": "NUMBER"}, "min_items": 2, "max_items": 2},
            "d": {"type": "STRING", "nullable": True},
        },
        "property_ordering": ["a", "b", "c", "d"],
        "required": ["a", "b", "c"],
    }
    value = generate_for_schema(gemini_schema, seed=1)
    assert list(value) == ["a", "b", "c", "d"]  # propertyOrdering is honoured
    assert value["a"] == "x" and value["b"] == 5 and len(value["c"]) == 2
    assert isinstance(value["d"], str)
    recursive = {
        "$defs": {
            "Node": {
                "type": "object",
                "properties": {"name": {"const": "n"}, "kids": {"$ref": "#/$defs/Node"}},
                "required": ["name", "kids"],
            }
        },
        "$ref": "#/$defs/Node",
    }
    node = generate_for_schema(recursive, seed=2)  # terminates despite the cycle
    depth = 0
    while isinstance(node, dict) and "kids" in node:
        assert node["name"] == "n"
        node, depth = node["kids"], depth + 1
    assert depth >= 2
    enum_text = generate_for_schema({"type": ["string", "null"], "enum": ["p", "q"]}, seed=3)
    assert enum_text in ("p", "q")
    assert generate_for_schema({"type": "array", "maxItems": 0}, seed=4) == []


# --------------------------------------------------------------------------------------------
# Usage metadata and token counting


async def test_usage_metadata_small_image(sdk: genai.Client) -> None:
    response = await sdk.aio.models.generate_content(
        model=MODEL, contents=[image_part(300, 200), PROMPT]
    )
    usage = response.usage_metadata
    assert usage is not None
    assert usage.prompt_token_count == 5 + 258
    details = {d.modality: d.token_count for d in usage.prompt_tokens_details or []}
    assert details == {types.MediaModality.TEXT: 5, types.MediaModality.IMAGE: 258}
    assert response.text
    assert usage.candidates_token_count == math.ceil(len(response.text) / 4)
    assert usage.thoughts_token_count is None  # no thinking asked for
    assert usage.total_token_count == usage.prompt_token_count + usage.candidates_token_count


# Expected values worked out by hand from the published rule: <= 384x384 is 258 tokens;
# otherwise scale to fit 3072x3072, tile = min side / 1.5 clamped to [256, 768], and every
# tile covering the image is 258 tokens.
@pytest.mark.parametrize(
    ("width", "height", "image_tokens"),
    [
        (384, 384, 258),
        (385, 200, 2 * 1 * 258),  # tile 256: 2 x 1
        (1000, 800, 2 * 2 * 258),  # tile 533.3: 2 x 2
        (3000, 1000, 5 * 2 * 258),  # tile 666.7: 5 x 2
        (4000, 3000, 4 * 3 * 258),  # scaled to 3072x2304, tile 768: 4 x 3
    ],
)
async def test_image_tokens_follow_tiling_rule(
    sdk: genai.Client, width: int, height: int, image_tokens: int
) -> None:
    contents = [image_part(width, height), PROMPT]
    response = await sdk.aio.models.generate_content(model=MODEL, contents=contents)
    assert response.usage_metadata is not None
    assert response.usage_metadata.prompt_token_count == 5 + image_tokens
    counted = await sdk.aio.models.count_tokens(model=MODEL, contents=contents)
    assert counted.total_tokens == 5 + image_tokens


async def test_media_resolution(sdk: genai.Client) -> None:
    contents = [image_part(1000, 800), PROMPT]

    async def prompt_tokens(model: str, resolution: str | None, parts: list[Any]) -> int:
        config = types.GenerateContentConfig(media_resolution=resolution) if resolution else None
        response = await sdk.aio.models.generate_content(model=model, contents=parts, config=config)
        assert response.usage_metadata is not None
        assert response.usage_metadata.prompt_token_count is not None
        return response.usage_metadata.prompt_token_count - 5

    assert await prompt_tokens(MODEL, "MEDIA_RESOLUTION_LOW", contents) == 64
    assert await prompt_tokens(MODEL, "MEDIA_RESOLUTION_MEDIUM", contents) == 256
    gemini3 = "gemini-3-pro-preview"
    assert await prompt_tokens(gemini3, None, contents) == 1120
    assert await prompt_tokens(gemini3, "MEDIA_RESOLUTION_LOW", contents) == 280
    per_part = [image_part(1000, 800, media_resolution="MEDIA_RESOLUTION_MEDIUM"), PROMPT]
    assert await prompt_tokens(gemini3, "MEDIA_RESOLUTION_LOW", per_part) == 560


async def test_thinking_tokens(sdk: genai.Client) -> None:
    off = types.GenerateContentConfig(thinking_config=types.ThinkingConfig(thinking_budget=0))
    response = await sdk.aio.models.generate_content(
        model=MODEL, contents=[image_part(), PROMPT], config=off
    )
    assert response.usage_metadata is not None
    assert response.usage_metadata.thoughts_token_count is None
    on = types.GenerateContentConfig(
        thinking_config=types.ThinkingConfig(thinking_budget=200, include_thoughts=True)
    )
    response = await sdk.aio.models.generate_content(
        model=MODEL, contents=[image_part(), PROMPT], config=on
    )
    usage = response.usage_metadata
    assert usage is not None and usage.thoughts_token_count is not None
    assert 0 < usage.thoughts_token_count <= 200
    assert usage.total_token_count == (
        (usage.prompt_token_count or 0)
        + (usage.candidates_token_count or 0)
        + usage.thoughts_token_count
    )
    assert response.candidates and response.candidates[0].content
    parts = response.candidates[0].content.parts or []
    assert [bool(p.thought) for p in parts] == [True, False]
    assert response.text == parts[1].text  # the SDK's .text skips the thought summary


async def test_max_output_tokens_truncates(sdk: genai.Client) -> None:
    config = types.GenerateContentConfig(max_output_tokens=4)
    response = await sdk.aio.models.generate_content(
        model=MODEL, contents=[image_part(), PROMPT], config=config
    )
    assert response.candidates is not None
    assert response.candidates[0].finish_reason == types.FinishReason.MAX_TOKENS
    assert response.usage_metadata is not None
    assert response.usage_metadata.candidates_token_count == 4


async def test_count_tokens_matches_generate(sdk: genai.Client) -> None:
    contents = [image_part(800, 600), image_part(100, 100), "Two images; compare them please."]
    counted = await sdk.aio.models.count_tokens(model=MODEL, contents=contents)
    response = await sdk.aio.models.generate_content(model=MODEL, contents=contents)
    assert response.usage_metadata is not None
    assert counted.total_tokens == response.usage_metadata.prompt_token_count
    assert counted.total_tokens == 8 + 4 * 258 + 258  # 800x600: tile 400 -> 2 x 2


# --------------------------------------------------------------------------------------------
# Quota


async def test_rpm_429_carries_an_honest_retry_delay() -> None:
    config = EmulatorConfig(
        default_limits=QuotaLimits(rpm=3, tpm=None, rpd=None),
        window_seconds=2.0,
        retry_delay_format="exact",
    )
    async with running_emulator(config) as (emulator, base_url):
        c = client(base_url, key="rpm-key")
        for _ in range(3):
            await c.aio.models.generate_content(model=MODEL, contents=[image_part(), PROMPT])
        with pytest.raises(errors.ClientError) as caught:
            await c.aio.models.generate_content(model=MODEL, contents=[image_part(), PROMPT])
        exc = caught.value
        assert exc.code == 429 and exc.status == "RESOURCE_EXHAUSTED"
        violation = detail_of(exc, "QuotaFailure")["violations"][0]
        assert violation["quotaValue"] == "3"
        assert violation["quotaId"] == "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"
        assert violation["quotaDimensions"]["model"] == MODEL
        delay = retry_delay(exc)
        log = emulator.request_log(key="rpm-key")
        admitted = [e for e in log if e["status"] == 200]
        refused = [e for e in log if e["status"] == 429]
        assert len(admitted) == 3 and len(refused) == 1
        # The true wait: until the oldest admission leaves the 2 s window.
        expected = admitted[0]["t"] + 2.0 - refused[0]["t"]
        assert expected <= delay <= expected + 0.002
        # Half-way through the wait the window is still full...
        await asyncio.sleep(delay / 2)
        with pytest.raises(errors.ClientError) as again:
            await c.aio.models.generate_content(model=MODEL, contents=[image_part(), PROMPT])
        assert retry_delay(again.value) <= delay / 2 + 0.002
        # ... and once the announced delay has passed, a request gets through.
        await asyncio.sleep(retry_delay(again.value))
        ok = await c.aio.models.generate_content(model=MODEL, contents=[image_part(), PROMPT])
        assert ok.text
        log = emulator.request_log(key="rpm-key")
        assert [e["status"] for e in log] == [200, 200, 200, 429, 429, 200]
        t429 = refused[0]["t"]
        assert log[-1]["t"] >= t429 + delay - 0.002
        # What a client test asserts: nothing was admitted for this key while it had to wait.
        waiting = emulator.request_log(key="rpm-key", since=t429 + 1e-9, until=t429 + delay)
        assert [e for e in waiting if e["status"] == 200] == []
        await c.aio.aclose()


async def test_retry_delay_is_whole_seconds_by_default() -> None:
    config = EmulatorConfig(default_limits=QuotaLimits(rpm=1), window_seconds=2.0)
    async with running_emulator(config) as (_emulator, base_url):
        c = client(base_url)
        await c.aio.models.generate_content(model=MODEL, contents=[PROMPT])
        with pytest.raises(errors.ClientError) as caught:
            await c.aio.models.generate_content(model=MODEL, contents=[PROMPT])
        raw = detail_of(caught.value, "RetryInfo")["retryDelay"]
        assert raw == "2s"  # 1.99... s rounded up, never down
        await c.aio.aclose()


async def test_tpm_limit_counts_input_tokens() -> None:
    config = EmulatorConfig(
        default_limits=QuotaLimits(rpm=None, tpm=600, rpd=None), window_seconds=2.0
    )
    async with running_emulator(config) as (_emulator, base_url):
        c = client(base_url)
        for _ in range(2):  # 263 input tokens each
            await c.aio.models.generate_content(model=MODEL, contents=[image_part(), PROMPT])
        with pytest.raises(errors.ClientError) as caught:
            await c.aio.models.generate_content(model=MODEL, contents=[image_part(), PROMPT])
        violation = detail_of(caught.value, "QuotaFailure")["violations"][0]
        assert violation["quotaId"] == "GenerateContentInputTokensPerModelPerMinute-FreeTier"
        assert violation["quotaValue"] == "600"
        # A small text-only prompt still fits under the token limit.
        await c.aio.models.generate_content(model=MODEL, contents=["hi"])
        await c.aio.aclose()


async def test_keys_of_one_project_share_its_quota() -> None:
    config = EmulatorConfig(
        default_limits=QuotaLimits(rpm=2),
        key_projects={"shared-1": "proj", "shared-2": "proj"},
        projects={"proj": QuotaLimits(rpm=2)},
        window_seconds=30.0,
    )
    async with running_emulator(config) as (emulator, base_url):
        one, two, other = (client(base_url, k) for k in ("shared-1", "shared-2", "alone"))
        await one.aio.models.generate_content(model=MODEL, contents=[PROMPT])
        await two.aio.models.generate_content(model=MODEL, contents=[PROMPT])
        for c in (one, two):
            with pytest.raises(errors.ClientError) as caught:
                await c.aio.models.generate_content(model=MODEL, contents=[PROMPT])
            assert caught.value.code == 429
        # Another project (a lone key) is untouched, and each model has its own quota.
        await other.aio.models.generate_content(model=MODEL, contents=[PROMPT])
        await one.aio.models.generate_content(model="gemini-2.5-flash-lite", contents=[PROMPT])
        stats = emulator.stats(include_log=False)
        assert stats["projects"]["proj"]["requests"] == 5
        assert stats["projects"]["proj"]["rate_limited"] == 2
        assert stats["keys"]["alone"]["rate_limited"] == 0
        for c in (one, two, other):
            await c.aio.aclose()


# --------------------------------------------------------------------------------------------
# Keys


async def test_invalid_and_revoked_keys(emu: tuple[Emulator, str]) -> None:
    emulator, base_url = emu
    emulator.update_config({"invalid_keys": ["bad-key"]})
    bad = client(base_url, "bad-key")
    with pytest.raises(errors.ClientError) as caught:
        await bad.aio.models.generate_content(model=MODEL, contents=[PROMPT])
    assert caught.value.code == 400 and caught.value.status == "INVALID_ARGUMENT"
    assert caught.value.message == "API key not valid. Please pass a valid API key."
    assert detail_of(caught.value, "ErrorInfo")["reason"] == "API_KEY_INVALID"

    good = client(base_url, "soon-revoked")
    await good.aio.models.generate_content(model=MODEL, contents=[PROMPT])
    async with aiohttp.ClientSession() as http:
        answer = await http.post(f"{base_url}/_emulator/config", json={"revoke": ["soon-revoked"]})
        assert answer.status == 200
    with pytest.raises(errors.ClientError) as caught:
        await good.aio.models.generate_content(model=MODEL, contents=[PROMPT])
    assert caught.value.code == 403 and caught.value.status == "PERMISSION_DENIED"
    assert detail_of(caught.value, "ErrorInfo")["reason"] == "CONSUMER_SUSPENDED"
    emulator.update_config({"unrevoke": ["soon-revoked"]})
    await good.aio.models.generate_content(model=MODEL, contents=[PROMPT])

    emulator.update_config({"valid_keys": ["only-this-one"]})
    with pytest.raises(errors.ClientError) as caught:
        await good.aio.models.generate_content(model=MODEL, contents=[PROMPT])
    assert caught.value.code == 400
    for c in (bad, good):
        await c.aio.aclose()


# --------------------------------------------------------------------------------------------
# Injected outcomes


async def test_server_errors_by_marker_and_by_queue(
    emu: tuple[Emulator, str], sdk: genai.Client
) -> None:
    emulator, base_url = emu
    for code in (500, 503, 504):
        with pytest.raises(errors.ServerError) as caught:
            await sdk.aio.models.generate_content(model=MODEL, contents=[f"[[emulate:{code}]]"])
        assert caught.value.code == code
    assert caught.value.status == "DEADLINE_EXCEEDED"
    async with aiohttp.ClientSession() as http:
        answer = await http.post(
            f"{base_url}/_emulator/outcomes", json={"outcomes": ["503", "500"], "key": "key-a"}
        )
        assert answer.status == 200
    other = client(base_url, "key-b")
    await other.aio.models.generate_content(model=MODEL, contents=[PROMPT])  # not its queue
    statuses = []
    for _ in range(3):
        try:
            await sdk.aio.models.generate_content(model=MODEL, contents=[PROMPT])
            statuses.append(200)
        except errors.ServerError as exc:
            statuses.append(exc.code)
    assert statuses == [503, 500, 200]
    assert emulator.stats(include_log=False)["outcomes"]["503"] == 2
    await other.aio.aclose()


async def test_safety_blocks(sdk: genai.Client) -> None:
    blocked = await sdk.aio.models.generate_content(
        model=MODEL, contents=[image_part(), "[[emulate:safety]] " + PROMPT]
    )
    assert blocked.candidates is not None
    candidate = blocked.candidates[0]
    assert candidate.finish_reason == types.FinishReason.SAFETY
    assert candidate.content is None and blocked.text is None
    assert any(r.blocked for r in candidate.safety_ratings or [])
    prompt_blocked = await sdk.aio.models.generate_content(
        model=MODEL, contents=[image_part(), "[[emulate:prompt_blocked]]"]
    )
    assert prompt_blocked.candidates is None
    assert prompt_blocked.prompt_feedback is not None
    assert prompt_blocked.prompt_feedback.block_reason == types.BlockedReason.SAFETY


async def test_fenced_invalid_and_truncated_json(sdk: genai.Client) -> None:
    def config() -> types.GenerateContentConfig:
        return types.GenerateContentConfig(
            response_mime_type="application/json", response_schema=Analysis
        )

    clean = await sdk.aio.models.generate_content(
        model=MODEL, contents=[image_part(), PROMPT], config=config()
    )
    fenced = await sdk.aio.models.generate_content(
        model=MODEL, contents=[image_part(), "[[emulate:fenced_json]]"], config=config()
    )
    assert fenced.text is not None and clean.text is not None
    assert fenced.text.startswith("```json\n") and fenced.text.endswith("\n```")
    assert fenced.text.removeprefix("```json\n").removesuffix("\n```") == clean.text

    broken = await sdk.aio.models.generate_content(
        model=MODEL, contents=[image_part(), "[[emulate:invalid_json]]"], config=config()
    )
    assert broken.candidates is not None
    assert broken.candidates[0].finish_reason == types.FinishReason.STOP
    assert broken.text is not None and clean.text.startswith(broken.text)
    with pytest.raises(json.JSONDecodeError):
        json.loads(broken.text)

    cut = await sdk.aio.models.generate_content(
        model=MODEL, contents=[image_part(), "[[emulate:max_tokens]]"], config=config()
    )
    assert cut.candidates is not None
    assert cut.candidates[0].finish_reason == types.FinishReason.MAX_TOKENS
    assert cut.text is not None and len(cut.text) < len(clean.text)


async def test_error_rates_are_seeded_and_reproducible() -> None:
    config = EmulatorConfig(error_rates={"503": 0.3, "safety": 0.2}, seed=7)
    async with running_emulator(config) as (emulator, base_url):
        c = client(base_url)

        async def run() -> list[str]:
            seen = []
            for i in range(30):
                try:
                    r = await c.aio.models.generate_content(model=MODEL, contents=[f"p{i}"])
                    assert r.candidates is not None
                    seen.append(str(r.candidates[0].finish_reason))
                except errors.ServerError as exc:
                    seen.append(str(exc.code))
            return seen

        first = await run()
        emulator.reset()
        second = await run()
        assert first == second
        assert {"503", str(types.FinishReason.SAFETY), str(types.FinishReason.STOP)} <= set(first)
        await c.aio.aclose()


# --------------------------------------------------------------------------------------------
# Latency, concurrency, control API, other entry points


async def test_concurrent_requests_are_not_serialised() -> None:
    config = EmulatorConfig(
        default_limits=QuotaLimits(rpm=None, tpm=None, rpd=None),
        latency=LatencyConfig(kind="fixed", median_ms=300),
    )
    body = {"contents": [{"role": "user", "parts": [{"text": PROMPT}]}]}
    async with running_emulator(config) as (emulator, base_url):
        url = f"{base_url}/v1beta/models/{MODEL}:generateContent"
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as http:

            async def one() -> int:
                async with http.post(url, json=body, headers={"x-goog-api-key": "k"}) as r:
                    await r.read()
                    return r.status

            started = time.monotonic()
            statuses = await asyncio.gather(*(one() for _ in range(800)))
            elapsed = time.monotonic() - started
        assert statuses == [200] * 800
        # Serially this would take 240 s; concurrently it is a few multiples of 0.3 s.
        assert elapsed < 30
        stats = emulator.stats(include_log=True)
        assert stats["max_in_flight"] >= 100
        assert {e["latency_ms"] for e in stats["log"]} == {300.0}


async def test_lognormal_latency_is_applied() -> None:
    latency = LatencyConfig(kind="lognormal", median_ms=40, sigma=0.5, max_ms=200)
    async with running_emulator(EmulatorConfig(latency=latency, seed=3)) as (emulator, url):
        c = client(url)
        await asyncio.gather(
            *(c.aio.models.generate_content(model=MODEL, contents=[PROMPT]) for _ in range(40))
        )
        samples = [e["latency_ms"] for e in emulator.request_log()]
        assert len(samples) == 40 and max(samples) <= 200
        assert len(set(samples)) > 30  # drawn, not fixed
        for entry in emulator.request_log():  # each request really waited that long
            assert entry["t_done"] - entry["t"] >= entry["latency_ms"] / 1000 - 0.001
        await c.aio.aclose()


async def test_control_api(emu: tuple[Emulator, str], sdk: genai.Client) -> None:
    _emulator, base_url = emu
    t0 = time.monotonic()
    await sdk.aio.models.generate_content(model=MODEL, contents=[image_part(), PROMPT])
    other = client(base_url, "key-z")
    await other.aio.models.generate_content(model=MODEL, contents=[PROMPT])
    async with aiohttp.ClientSession() as http:
        stats = await (await http.get(f"{base_url}/_emulator/stats")).json()
        assert stats["requests"] == 2
        assert stats["keys"]["key-a"]["tokens"]["prompt"] == 263
        assert stats["tokens"]["total"] > 263
        log = await (await http.get(f"{base_url}/_emulator/log?key=key-z&since={t0}")).json()
        assert [e["key"] for e in log["log"]] == ["key-z"]
        assert log["log"][0]["wall"] == pytest.approx(time.time(), abs=30)
        bad = await http.post(f"{base_url}/_emulator/config", json={"error_rates": {"x": 1}})
        assert bad.status == 400
        patched = await http.post(
            f"{base_url}/_emulator/config",
            json={"latency": {"kind": "fixed", "median_ms": 1}, "projects": {"p": {"rpm": 9}}},
        )
        config = await patched.json()
        assert config["latency"]["median_ms"] == 1 and config["projects"]["p"]["rpm"] == 9
        assert config["latency"]["max_ms"] == 120_000.0  # merged, not replaced
        await http.post(f"{base_url}/_emulator/reset", json={})
        stats = await (await http.get(f"{base_url}/_emulator/stats?log=0")).json()
        assert stats["requests"] == 0 and "log" not in stats
    await other.aio.aclose()


async def test_v1_path_query_key_and_bad_requests(emu: tuple[Emulator, str]) -> None:
    _emulator, base_url = emu
    v1 = client(base_url, version="v1")
    response = await v1.aio.models.generate_content(model=MODEL, contents=[PROMPT])
    assert response.text
    await v1.aio.aclose()
    async with aiohttp.ClientSession() as http:
        url = f"{base_url}/v1beta/models/{MODEL}:generateContent"
        body = {"contents": [{"parts": [{"text": PROMPT}]}]}
        ok = await http.post(f"{url}?key=query-key", json=body)
        assert ok.status == 200
        missing = await http.post(url, json=body)
        assert missing.status == 403
        assert (await missing.json())["error"]["status"] == "PERMISSION_DENIED"
        not_image = {
            "contents": [{"parts": [{"inlineData": {"mimeType": "image/png", "data": "AAAA"}}]}]
        }
        refused = await http.post(f"{url}?key=k", json=not_image)
        assert refused.status == 400
        assert (await refused.json())["error"]["status"] == "INVALID_ARGUMENT"
        empty = await http.post(f"{url}?key=k", json={})
        assert empty.status == 400


async def test_batch_api() -> None:
    config = EmulatorConfig(batch_pending_seconds=0.4, batch_running_seconds=0.4)
    async with running_emulator(config) as (_emulator, base_url):
        c = client(base_url)
        schema_config = types.GenerateContentConfig(
            response_mime_type="application/json", response_schema=Analysis
        )
        image = image_part(1000, 800)
        failing = "[[emulate:500]]"
        job = await c.aio.batches.create(
            model=MODEL,
            src=[
                types.InlinedRequest(
                    contents=[types.Content(role="user", parts=[image, types.Part(text=PROMPT)])],
                    config=schema_config,
                    metadata={"item": "1"},
                ),
                types.InlinedRequest(
                    contents=[types.Content(role="user", parts=[types.Part(text=failing)])],
                    metadata={"item": "2"},
                ),
            ],
            config=types.CreateBatchJobConfig(display_name="emulated"),
        )
        assert job.name is not None and job.name.startswith("batches/")
        assert job.state == types.JobState.JOB_STATE_PENDING
        assert job.display_name == "emulated"
        seen = [job.state]
        for _ in range(100):
            job = await c.aio.batches.get(name=job.name)
            if seen[-1] != job.state:
                seen.append(job.state)
            if job.state == types.JobState.JOB_STATE_SUCCEEDED:
                break
            await asyncio.sleep(0.05)
        assert seen == [
            types.JobState.JOB_STATE_PENDING,
            types.JobState.JOB_STATE_RUNNING,
            types.JobState.JOB_STATE_SUCCEEDED,
        ]
        assert job.dest is not None and job.dest.inlined_responses is not None
        first, second = job.dest.inlined_responses
        assert first.metadata == {"item": "1"} and second.metadata == {"item": "2"}
        assert first.response is not None and first.response.text is not None
        Analysis.model_validate_json(first.response.text)
        assert first.response.usage_metadata is not None
        assert first.response.usage_metadata.prompt_token_count == 5 + 4 * 258
        assert second.error is not None and second.response is None
        listed = await c.aio.batches.list()
        assert [j.name async for j in listed] == [job.name]
        await c.aio.batches.delete(name=job.name)
        with pytest.raises(errors.ClientError) as caught:
            await c.aio.batches.get(name=job.name)
        assert caught.value.code == 404
        await c.aio.aclose()


def test_command_line_builds_config(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("k1 proj-a\nk2 proj-a  # same project\nk3\n")
    args = build_arg_parser().parse_args(
        [
            "--rpm=10",
            "--tpm=0",
            "--latency-median-ms=50",
            "--latency-sigma=0.3",
            "--error-rate-503=0.1",
            "--error-rate-fenced-json=0.05",
            f"--keys-file={keys}",
            "--window-seconds=5",
            "--max-concurrent-batches=3",
        ]
    )
    config = config_from_args(args)
    assert config.max_concurrent_batches == 3
    assert config.default_limits.rpm == 10 and config.default_limits.tpm is None
    assert config.latency.kind == "lognormal" and config.latency.median_ms == 50
    assert config.error_rates == {"503": 0.1, "fenced_json": 0.05}
    assert config.key_projects == {"k1": "proj-a", "k2": "proj-a"}
    assert config.valid_keys == {"k1", "k2", "k3"}
    assert config.window_seconds == 5


async def test_standalone_main_prints_its_url() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "imagestream.devtools.gemini_server",
        "--port=0",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=20)).decode()
        url = line.strip().rsplit(" ", 1)[-1]
        assert url.startswith("http://127.0.0.1:")
        async with aiohttp.ClientSession() as http:
            health = await http.get(f"{url}/_emulator/health")
            assert health.status == 200
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), timeout=20) == 0
