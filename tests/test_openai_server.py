"""The OpenAI-compatible emulator, driven through the real openai SDK (retries off) on loopback."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from PIL import Image

from imagestream.devtools.emulator_quota import QuotaLimits
from imagestream.devtools.openai_server import (
    OpenAIConfig,
    OpenAIEmulator,
    build_arg_parser,
    config_from_args,
    image_tokens,
    running_openai_emulator,
)

MODEL = "gpt-4o-mini"
PROMPT = "Describe this image."  # 20 characters: 5 text tokens
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "caption": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["caption", "tags", "confidence"],
    "additionalProperties": False,
}
STRICT = {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}}


def data_url(width: int = 64, height: int = 48, color: tuple[int, int, int] = (9, 99, 199)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def messages(text: str = PROMPT, url: str | None = None) -> list[Any]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": text},
                {"type": "image_url", "image_url": {"url": url or data_url()}},
            ],
        }
    ]


def client(base_url: str, key: str = "key-a") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0)


@pytest.fixture
async def emu() -> AsyncIterator[tuple[OpenAIEmulator, str]]:
    config = OpenAIConfig(default_limits=QuotaLimits(rpm=None, tpm=None, rpd=None))
    async with running_openai_emulator(config) as pair:
        yield pair


async def test_structured_output_with_usage_and_rate_headers() -> None:
    config = OpenAIConfig(default_limits=QuotaLimits(rpm=10, tpm=100_000))
    async with running_openai_emulator(config) as (emulator, base_url):
        sdk = client(base_url)
        raw = await sdk.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages(), response_format=STRICT, max_completion_tokens=300
        )
        answer = raw.parse()
        value = json.loads(answer.choices[0].message.content or "")
        assert set(value) == {"caption", "tags", "confidence"} and 0 <= value["confidence"] <= 1
        assert answer.choices[0].finish_reason == "stop"
        assert answer.usage is not None
        assert answer.usage.prompt_tokens == 5 + image_tokens(64, 48, "auto", MODEL)
        assert answer.usage.completion_tokens_details is not None
        assert answer.usage.completion_tokens_details.reasoning_tokens == 0
        headers = raw.headers
        assert headers["x-ratelimit-limit-requests"] == "10"
        assert headers["x-ratelimit-remaining-requests"] == "9"
        assert headers["x-ratelimit-limit-tokens"] == "100000"
        weight = answer.usage.prompt_tokens + 300  # the completion budget counts up front
        assert headers["x-ratelimit-remaining-tokens"] == str(100_000 - weight)
        assert headers["x-ratelimit-reset-requests"].endswith("s")
        # The same image gets the same answer; a reasoning model reports reasoning tokens.
        again = await sdk.chat.completions.create(
            model="gpt-5-mini", messages=messages(), response_format=STRICT
        )
        assert json.loads(again.choices[0].message.content or "") == value
        assert again.usage is not None and again.usage.completion_tokens_details is not None
        assert again.usage.completion_tokens_details.reasoning_tokens > 0
        assert emulator.stats()["keys"]["key-a"]["tokens"]["reasoning"] > 0
        await sdk.close()


async def test_strict_mode_refuses_a_schema_it_cannot_enforce(
    emu: tuple[OpenAIEmulator, str],
) -> None:
    loose = {**SCHEMA, "required": ["caption"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": loose, "strict": True}}
    sdk = client(emu[1])
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.chat.completions.create(model=MODEL, messages=messages(), response_format=fmt)
    assert "Missing 'tags'" in caught.value.message
    await sdk.close()


async def test_a_server_that_ignores_response_format(emu: tuple[OpenAIEmulator, str]) -> None:
    emulator, base_url = emu
    emulator.update_config({"honour_response_format": False})
    sdk = client(base_url)
    answer = await sdk.chat.completions.create(
        model=MODEL, messages=messages(), response_format=STRICT
    )
    text = answer.choices[0].message.content or ""
    assert "```json" in text
    inner = text.split("```json", 1)[1].rsplit("```", 1)[0]
    assert set(json.loads(inner)) == {"caption", "tags", "confidence"}
    await sdk.close()


async def test_keys_unknown_401_revoked_403() -> None:
    config = OpenAIConfig(valid_keys={"good", "gone"}, revoked_keys={"gone"})
    async with running_openai_emulator(config) as (emulator, base_url):
        for key, error in (
            ("nope", openai.AuthenticationError),
            ("gone", openai.PermissionDeniedError),
        ):
            sdk = client(base_url, key)
            with pytest.raises(error):
                await sdk.chat.completions.create(model=MODEL, messages=messages())
            await sdk.close()
        outcomes = [e["outcome"] for e in emulator.request_log()]
        assert outcomes == ["invalid_key", "revoked_key"]


async def test_quota_429_carries_retry_after_and_ratelimit_headers() -> None:
    config = OpenAIConfig(default_limits=QuotaLimits(rpm=2, tpm=None), window_seconds=30)
    async with running_openai_emulator(config) as (emulator, base_url):
        sdk = client(base_url)
        for _ in range(2):
            await sdk.chat.completions.create(model=MODEL, messages=messages())
        with pytest.raises(openai.RateLimitError) as caught:
            await sdk.chat.completions.create(model=MODEL, messages=messages())
        headers = caught.value.response.headers
        assert 1 <= int(headers["retry-after"]) <= 30
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert headers["x-ratelimit-limit-requests"] == "2"
        assert caught.value.code == "rate_limit_exceeded"
        # Another model has windows of its own; an injected 429 names a short wait.
        await sdk.chat.completions.create(model="gpt-4o", messages=messages())
        emulator.queue_outcomes(["429"])
        with pytest.raises(openai.RateLimitError) as forced:
            await sdk.chat.completions.create(model="gpt-4.1", messages=messages())
        assert forced.value.response.headers["retry-after"] == "1"
        log = emulator.request_log()
        assert [e["outcome"] for e in log] == ["ok", "ok", "quota_exceeded", "ok", "429"]
        await sdk.close()


async def test_faults_empty_choices_non_json_and_server_errors(
    emu: tuple[OpenAIEmulator, str],
) -> None:
    emulator, base_url = emu
    sdk = client(base_url)
    empty = await sdk.chat.completions.create(
        model=MODEL, messages=messages("[[emulate:empty_choices]] go")
    )
    assert empty.choices == []
    raw = await sdk.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages("[[emulate:non_json]] go")
    )
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/html")
    assert raw.text.startswith("<html>")
    # Not JSON: the SDK hands back the body as a str instead of a ChatCompletion.
    page = await sdk.chat.completions.create(
        model=MODEL, messages=messages("[[emulate:non_json]] go")
    )
    assert isinstance(page, str)
    cut = await sdk.chat.completions.create(
        model=MODEL, messages=messages("[[emulate:max_tokens]] go"), response_format=STRICT
    )
    assert cut.choices[0].finish_reason == "length"
    emulator.queue_outcomes(["503", "invalid_json", "refusal"])
    with pytest.raises(openai.InternalServerError) as caught:
        await sdk.chat.completions.create(model=MODEL, messages=messages())
    assert caught.value.status_code == 503
    broken = await sdk.chat.completions.create(
        model=MODEL, messages=messages(), response_format=STRICT
    )
    with pytest.raises(json.JSONDecodeError):
        json.loads(broken.choices[0].message.content or "")
    refused = await sdk.chat.completions.create(model=MODEL, messages=messages())
    assert refused.choices[0].message.content is None and refused.choices[0].message.refusal
    with pytest.raises(openai.BadRequestError):
        await sdk.chat.completions.create(
            model=MODEL, messages=messages(url="data:image/png;base64,bm90IGFuIGltYWdl")
        )
    await sdk.close()


async def test_models_listed_and_unknown_model_404() -> None:
    async with running_openai_emulator(OpenAIConfig(models=["qwen2-vl"])) as (_, base_url):
        sdk = client(base_url)
        assert [m.id async for m in sdk.models.list()] == ["qwen2-vl"]
        with pytest.raises(openai.NotFoundError):
            await sdk.chat.completions.create(model=MODEL, messages=messages())
        await sdk.close()


def batch_file(count: int) -> bytes:
    lines = []
    for index in range(count):
        body = {
            "model": MODEL,
            "messages": messages(url=data_url(color=(index, 0, 0))),
            "response_format": STRICT,
        }
        lines.append(
            {
                "custom_id": f"item-{index}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": body,
            }
        )
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


async def wait_status(sdk: openai.AsyncOpenAI, batch_id: str, wanted: set[str]) -> Any:
    for _ in range(200):
        batch = await sdk.batches.retrieve(batch_id)
        if batch.status in wanted:
            return batch
        await asyncio.sleep(0.05)
    raise AssertionError(f"batch {batch_id} never reached {wanted}")


async def test_batch_api_upload_create_poll_download() -> None:
    config = OpenAIConfig(batch_pending_seconds=0.1, batch_running_seconds=0.2)
    async with running_openai_emulator(config) as (emulator, base_url):
        sdk = client(base_url)
        emulator.queue_outcomes(["ok", "500"])
        upload = await sdk.files.create(file=("in.jsonl", batch_file(3)), purpose="batch")
        batch = await sdk.batches.create(
            input_file_id=upload.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"batch": "b1"},
        )
        assert batch.status == "validating" and batch.metadata == {"batch": "b1"}
        done = await wait_status(sdk, batch.id, {"completed"})
        assert done.request_counts is not None
        assert (done.request_counts.completed, done.request_counts.failed) == (2, 1)
        assert done.output_file_id and done.error_file_id
        output = (await sdk.files.content(done.output_file_id)).text
        lines = [json.loads(line) for line in output.splitlines()]
        assert sorted(line["custom_id"] for line in lines) == ["item-0", "item-2"]
        for line in lines:
            content = line["response"]["body"]["choices"][0]["message"]["content"]
            assert set(json.loads(content)) == {"caption", "tags", "confidence"}
        errors = (await sdk.files.content(done.error_file_id)).text
        (failed,) = [json.loads(line) for line in errors.splitlines()]
        assert failed["custom_id"] == "item-1" and failed["response"]["status_code"] == 500
        assert [b.id async for b in sdk.batches.list()] == [batch.id]
        await sdk.close()


async def test_batch_cancel_keeps_what_finished_and_bad_files_fail() -> None:
    config = OpenAIConfig(batch_pending_seconds=0.0, batch_running_seconds=3600)
    async with running_openai_emulator(config) as (_, base_url):
        sdk = client(base_url)
        upload = await sdk.files.create(file=("in.jsonl", batch_file(2)), purpose="batch")
        batch = await sdk.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        cancelled = await sdk.batches.cancel(batch.id)
        assert cancelled.status == "cancelled" and cancelled.output_file_id is None
        assert cancelled.request_counts is not None and cancelled.request_counts.total == 2
        bad = b'{"custom_id": "x", "method": "POST", "url": "/v1/embeddings", "body": {}}\n'
        upload = await sdk.files.create(file=("bad.jsonl", bad), purpose="batch")
        failed = await sdk.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        assert failed.status == "failed" and failed.errors is not None
        with pytest.raises(openai.NotFoundError):
            await sdk.batches.retrieve("batch_nope")
        await sdk.close()


def test_command_line_builds_config() -> None:
    args = build_arg_parser().parse_args(
        ["--rpm=300", "--ignore-response-format", "--error-rate-non-json=0.1", "--models=a,b"]
    )
    config = config_from_args(args)
    assert config.default_limits.rpm == 300 and not config.honour_response_format
    assert config.error_rates == {"non_json": 0.1} and config.models == ["a", "b"]
