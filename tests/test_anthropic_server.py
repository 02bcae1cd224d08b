"""The Anthropic-compatible emulator, driven through the real anthropic SDK (retries off)."""

from __future__ import annotations

import asyncio
import base64
import io
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import pytest
from PIL import Image

from imagestream.devtools.anthropic_server import (
    FORCED_TOOL_SYSTEM_TOKENS,
    AnthropicConfig,
    AnthropicEmulator,
    build_arg_parser,
    config_from_args,
    image_tokens,
    running_anthropic_emulator,
)
from imagestream.devtools.emulator_quota import QuotaLimits

MODEL = "claude-haiku-4-5"
PROMPT = "Describe this image."  # 20 characters: 5 text tokens
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "caption": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["caption", "tags"],
}
TOOLS: list[Any] = [{"name": "record", "description": "Record it.", "input_schema": SCHEMA}]
FORCED: Any = {"type": "tool", "name": "record"}


def png(width: int = 64, height: int = 48, color: tuple[int, int, int] = (9, 99, 199)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def messages(text: str = PROMPT, data: str | None = None) -> list[Any]:
    image = {"type": "base64", "media_type": "image/png", "data": data or png()}
    return [
        {
            "role": "user",
            "content": [{"type": "image", "source": image}, {"type": "text", "text": text}],
        }
    ]


def client(base_url: str, key: str = "key-a") -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=base_url, api_key=key, max_retries=0)


@pytest.fixture
async def emu() -> AsyncIterator[tuple[AnthropicEmulator, str]]:
    config = AnthropicConfig(default_limits=QuotaLimits(rpm=None, tpm=None))
    async with running_anthropic_emulator(config) as pair:
        yield pair


async def ask(sdk: anthropic.AsyncAnthropic, text: str = PROMPT, choice: Any = FORCED) -> Any:
    return await sdk.messages.create(
        model=MODEL, max_tokens=512, messages=messages(text), tools=TOOLS, tool_choice=choice
    )


async def test_forced_tool_answers_with_input_that_fits_and_usage() -> None:
    config = AnthropicConfig(default_limits=QuotaLimits(rpm=10, tpm=100_000))
    async with running_anthropic_emulator(config) as (_, base_url):
        sdk = client(base_url)
        raw = await sdk.messages.with_raw_response.create(
            model=MODEL, max_tokens=512, messages=messages(), tools=TOOLS, tool_choice=FORCED
        )
        message = await raw.parse()
        assert message.stop_reason == "tool_use"
        (block,) = message.content
        assert block.type == "tool_use" and block.name == "record"
        assert isinstance(block.input, dict) and set(block.input) == {"caption", "tags"}
        count = await sdk.messages.count_tokens(
            model=MODEL, messages=messages(), tools=TOOLS, tool_choice=FORCED
        )
        assert message.usage.input_tokens == count.input_tokens
        assert count.input_tokens > 5 + image_tokens(64, 48) + FORCED_TOOL_SYSTEM_TOKENS
        assert message.usage.output_tokens > 0
        headers = raw.headers
        assert headers["anthropic-ratelimit-requests-limit"] == "10"
        assert headers["anthropic-ratelimit-requests-remaining"] == "9"
        assert headers["anthropic-ratelimit-input-tokens-limit"] == "100000"
        remaining = int(headers["anthropic-ratelimit-tokens-remaining"])
        assert remaining == 100_000 - message.usage.input_tokens
        assert headers["anthropic-ratelimit-requests-reset"].endswith("Z")
        again = await ask(sdk)
        assert again.content[0].input == block.input  # the same image, the same answer
        await sdk.close()


async def test_bad_requests_are_400(emu: tuple[AnthropicEmulator, str]) -> None:
    sdk = client(emu[1])
    with pytest.raises(anthropic.BadRequestError):
        await ask(sdk, choice={"type": "tool", "name": "missing"})
    with pytest.raises(anthropic.BadRequestError):
        await sdk.messages.create(model=MODEL, max_tokens=9, messages=messages(data="bm9wZQ=="))
    await sdk.close()


async def test_keys_unknown_401_revoked_403() -> None:
    config = AnthropicConfig(valid_keys={"good", "gone"}, revoked_keys={"gone"})
    async with running_anthropic_emulator(config) as (emulator, base_url):
        for key, error in (
            ("nope", anthropic.AuthenticationError),
            ("gone", anthropic.PermissionDeniedError),
        ):
            sdk = client(base_url, key)
            with pytest.raises(error):
                await ask(sdk)
            await sdk.close()
        assert [e["outcome"] for e in emulator.request_log()] == ["invalid_key", "revoked_key"]


async def test_quota_429_retry_after_and_overload_529() -> None:
    config = AnthropicConfig(default_limits=QuotaLimits(rpm=1, tpm=None), window_seconds=20)
    async with running_anthropic_emulator(config) as (emulator, base_url):
        sdk = client(base_url)
        await ask(sdk)
        with pytest.raises(anthropic.RateLimitError) as caught:
            await ask(sdk)
        headers = caught.value.response.headers
        assert 1 <= int(headers["retry-after"]) <= 20
        assert headers["anthropic-ratelimit-requests-remaining"] == "0"
        emulator.update_config({"default_limits": {"rpm": None}})
        emulator.queue_outcomes(["529", "500"])
        with pytest.raises(anthropic.InternalServerError) as overloaded:
            await ask(sdk)
        assert overloaded.value.status_code == 529
        with pytest.raises(anthropic.InternalServerError):
            await ask(sdk)
        outcomes = [e["outcome"] for e in emulator.request_log()]
        assert outcomes == ["ok", "quota_exceeded", "529", "500"]
        await sdk.close()


async def test_answers_that_do_not_fit(emu: tuple[AnthropicEmulator, str]) -> None:
    sdk = client(emu[1])
    mismatch = await ask(sdk, "[[emulate:schema_mismatch]]")
    assert mismatch.content[0].type == "tool_use"
    assert set(mismatch.content[0].input) < {"caption", "tags"}
    fenced = await ask(sdk, "[[emulate:fenced_json]]")
    assert fenced.content[0].type == "text" and fenced.content[0].text.startswith("```json")
    cut = await ask(sdk, "[[emulate:max_tokens]]")
    assert cut.stop_reason == "max_tokens"
    refused = await ask(sdk, "[[emulate:refusal]]")
    assert refused.stop_reason == "refusal" and refused.content == []
    empty = await ask(sdk, "[[emulate:empty_content]]")
    assert empty.content == []
    raw = await sdk.messages.with_raw_response.create(
        model=MODEL, max_tokens=9, messages=messages("[[emulate:non_json]]")
    )
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/html")
    await sdk.close()


async def test_message_batches_results_and_cancel() -> None:
    config = AnthropicConfig(
        batch_pending_seconds=0.05, batch_running_seconds=0.15, batch_cancel_seconds=0.0
    )
    async with running_anthropic_emulator(config) as (emulator, base_url):
        sdk = client(base_url)
        emulator.queue_outcomes(["ok", "500"])
        requests: list[Any] = [
            {
                "custom_id": f"item-{i}",
                "params": {
                    "model": MODEL,
                    "max_tokens": 256,
                    "messages": messages(data=png(color=(i, 1, 2))),
                    "tools": TOOLS,
                    "tool_choice": FORCED,
                },
            }
            for i in range(3)
        ]
        batch = await sdk.messages.batches.create(requests=requests)
        assert batch.processing_status == "in_progress" and batch.results_url is None
        for _ in range(100):
            batch = await sdk.messages.batches.retrieve(batch.id)
            if batch.processing_status == "ended":
                break
            await asyncio.sleep(0.05)
        counts = batch.request_counts
        assert (counts.succeeded, counts.errored) == (2, 1)
        results = {
            r.custom_id: r.result async for r in await sdk.messages.batches.results(batch.id)
        }
        assert sorted(results) == ["item-0", "item-1", "item-2"]
        assert results["item-1"].type == "errored"
        ok = results["item-0"]
        assert ok.type == "succeeded" and set(ok.message.content[0].input) == {"caption", "tags"}
        await sdk.messages.batches.delete(batch.id)
        with pytest.raises(anthropic.NotFoundError):
            await sdk.messages.batches.retrieve(batch.id)
        emulator.update_config({"batch_running_seconds": 3600})
        slow = await sdk.messages.batches.create(requests=requests[:2])
        cancelled = await sdk.messages.batches.cancel(slow.id)
        assert cancelled.processing_status == "ended"
        assert cancelled.request_counts.canceled == 2
        kinds = [r.result.type async for r in await sdk.messages.batches.results(slow.id)]
        assert kinds == ["canceled", "canceled"]
        assert [b.id async for b in sdk.messages.batches.list()] == [slow.id]
        await sdk.close()


def test_command_line_builds_config() -> None:
    args = build_arg_parser().parse_args(
        ["--rpm=300", "--error-rate-529=0.1", "--models=a", "--batch-cancel-seconds=0"]
    )
    config = config_from_args(args)
    assert config.default_limits.rpm == 300 and config.error_rates == {"529": 0.1}
    assert config.models == ["a"] and config.batch_cancel_seconds == 0


@pytest.mark.parametrize("tool", ["openai-server", "anthropic-server"])
async def test_dev_command_serves_until_sigterm(tool: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "imagestream"),
        "dev",
        tool,
        "--port=0",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=30)).decode()
        url = line.strip().rsplit(" ", 1)[-1]
        assert url.startswith("http://127.0.0.1:")
        async with aiohttp.ClientSession() as http:
            health = await http.get(f"{url}/_emulator/health")
            assert health.status == 200
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), timeout=20) == 0
