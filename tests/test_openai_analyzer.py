"""The openai provider through the real ``openai`` SDK over HTTP to a loopback server:
structured output, repair, answers that are not completions, key quarantine, 429 hints,
budgets, and the analysis cache kept apart per provider."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from imagestream.analyzer.providers.openai import pricing as openai_pricing
from imagestream.analyzer.service import Analyzer, create_providers, load_settings
from imagestream.cli import estimate
from imagestream.common import control, pricing, providers
from imagestream.common.connections import Resources

from .openai_server import OpenAIServer, Reply, completion, error, running
from .test_gemini_analyzer import Item, analyze_items, jpeg, make_items, make_rig, metric
from .test_gemini_batch_mode import collect_all, jobs_of

ANSWER = {
    "caption": "A red square.", "tags": ["red"], "objects": ["square"], "visible_text": "",
    "category": "other", "is_product_photo": False, "quality_issues": [],
}  # fmt: skip
MODEL = "gpt-4.1-mini"


def fits(_: dict[str, Any], __: str) -> dict[str, Any]:
    return completion(json.dumps(ANSWER))


@dataclass
class OpenAIRig:
    server: OpenAIServer
    env: dict[str, str]
    res: Resources
    analyzer: Analyzer

    async def batch(self, count: int, salt: int, **fields: object) -> list[Item]:
        images = [jpeg(i, salt) for i in range(count)]
        return await make_items(self.res, images, {"analyzer": "openai", **fields}, self.env)

    async def run(self, items: list[Item]) -> list[Any]:
        return await analyze_items(self.analyzer, items)


@contextlib.asynccontextmanager
async def openai_rig(res: Resources, reply: Reply, **env: str) -> AsyncIterator[OpenAIRig]:
    async with running(reply) as (server, base_url):
        values = {
            "REDIS_PREFIX": res.keys.prefix,
            "OPENAI_API_KEYS": "sk-a@proj-a,sk-b@proj-b",
            "OPENAI_BASE_URL": base_url,
            "OPENAI_RPM": "0",
            "OPENAI_TPM": "0",
            "OPENAI_BACKOFF_S": "0.05",
            **env,
        }
        config = load_settings(values)
        made = create_providers(res, config)
        try:
            yield OpenAIRig(server, values, res, Analyzer(res, config, made))
        finally:
            for provider in made.values():
                await provider.close()


async def test_structured_output_through_the_sdk(res: Resources) -> None:
    usage = {
        "prompt_tokens": 900, "completion_tokens": 60, "total_tokens": 960,
        "completion_tokens_details": {"reasoning_tokens": 20},
        "prompt_tokens_details": {"cached_tokens": 100},
    }  # fmt: skip

    def reply(body: dict[str, Any], key: str) -> dict[str, Any]:
        return completion(json.dumps(ANSWER), usage=usage)

    async with openai_rig(res, reply) as rig:
        items = await rig.batch(2, 11, model=MODEL)
        results = await rig.run(items)
        sent = rig.server.log
    assert [r.status for r in results] == ["succeeded", "succeeded"]
    first = results[0]
    assert first.analyzer == "openai" and first.model == MODEL
    assert first.analysis["caption"] == "A red square." and first.analysis["blocked"] is False
    assert first.usage is not None
    assert (first.usage.input_tokens, first.usage.output_tokens, first.usage.thought_tokens) == (
        900, 40, 20,
    )  # fmt: skip
    price = openai_pricing.PRICES[MODEL]
    expected = pricing.cost_usd(price, input_tokens=900, output_tokens=60, cached_tokens=100)
    assert first.usage.cost_usd == expected > 0
    body = sent[0]["body"]
    assert body["model"] == MODEL and body["max_completion_tokens"] == 400
    fmt = body["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    schema = fmt["json_schema"]["schema"]
    assert schema["additionalProperties"] is False and set(schema["required"]) == set(ANSWER)
    parts = body["messages"][0]["content"]
    image = next(p for p in parts if p["type"] == "image_url")["image_url"]["url"]
    assert image.startswith("data:image/jpeg;base64,")
    # Projects take turns: both keys were used.
    assert {e["key"] for e in sent} == {"sk-a", "sk-b"}


async def test_a_server_that_ignores_the_schema_is_repaired_or_fails_clearly(
    res: Resources,
) -> None:
    answers = iter([
        f"Here you go:\n```json\n{json.dumps(ANSWER)}\n```",  # repaired locally
        "a red square, I think",  # not JSON at all
        json.dumps({**ANSWER, "category": "shapes"}),  # JSON, not the profile's
    ])  # fmt: skip
    before = metric("imagestream_answers_repaired_total", provider="openai")
    async with openai_rig(res, lambda body, key: completion(next(answers))) as rig:
        items = await rig.batch(3, 12, model="llava:13b")  # a model the price table lacks
        results = [*(await rig.run(items[:1])), *(await rig.run(items[1:2]))]
        results += await rig.run(items[2:])
    assert [r.status for r in results] == ["succeeded", "failed", "failed"]
    assert metric("imagestream_answers_repaired_total", provider="openai") == before + 1
    assert results[1].error_class == "analyzer_invalid_output"
    assert "not JSON" in (results[1].error_message or "")
    assert "does not match profile describe" in (results[2].error_message or "")
    # A free self-hosted model: tokens recorded, nothing billed.
    assert results[0].usage is not None and results[0].usage.cost_usd == 0
    assert results[0].usage.input_tokens == 500


async def test_answers_that_are_not_completions_fail_that_item_only(res: Resources) -> None:
    replies = iter([
        web.Response(text="<html>502 Bad Gateway</html>", content_type="text/html"),
        {**completion("{}"), "choices": []},
        completion(json.dumps(ANSWER)),
    ])  # fmt: skip
    async with openai_rig(res, lambda body, key: next(replies), OPENAI_API_KEYS="sk-a") as rig:
        items = await rig.batch(3, 13)
        results = [r for item in items for r in await rig.run([item])]
    assert [r.status for r in results] == ["failed", "failed", "succeeded"]
    assert {r.error_class for r in results[:2]} == {"analyzer_invalid_output"}
    assert "not a chat completion" in (results[0].error_message or "")
    assert "no choice" in (results[1].error_message or "")


async def test_a_revoked_key_is_quarantined_and_the_other_carries_on(res: Resources) -> None:
    def reply(body: dict[str, Any], key: str) -> dict[str, Any] | web.Response:
        return error(401, "Incorrect API key provided") if key == "sk-b" else fits(body, key)

    before = metric("imagestream_provider_keys_quarantined_total", provider="openai")
    async with openai_rig(res, reply) as rig:
        items = await rig.batch(6, 14)
        results = [*(await rig.run(items[:2])), *(await rig.run(items[2:]))]
        quarantined = await res.redis.hgetall(res.keys.quarantine("openai"))
        sent = rig.server.log
    assert all(r.status == "succeeded" for r in results)
    assert sum(e["key"] == "sk-b" for e in sent) == 1
    assert list(quarantined) == [hashlib.sha256(b"sk-b").hexdigest()[:8].encode()]
    assert metric("imagestream_provider_keys_quarantined_total", provider="openai") == before + 1


async def test_429_backs_off_for_the_servers_hint(res: Resources) -> None:
    calls = {"n": 0}

    def reply(body: dict[str, Any], key: str) -> dict[str, Any] | web.Response:
        calls["n"] += 1
        if calls["n"] <= 2:
            return error(429, "Rate limit reached", {"retry-after-ms": "300"})
        return fits(body, key)

    async with openai_rig(res, reply, OPENAI_API_KEYS="sk-a@proj-a") as rig:
        items = await rig.batch(1, 15)
        backoffs = []
        task = rig.run(items)
        results = await task
        backoffs.append(
            await res.redis.exists(f"{res.keys.quota('openai', 'proj-a', 'gpt-4.1-mini')}:backoff")
        )
    assert [r.status for r in results] == ["succeeded"] and calls["n"] == 3
    assert (
        metric("imagestream_openai_requests_total", project="proj-a", outcome="rate_limited") >= 2
    )


async def test_the_budget_pauses_a_batch_before_it_is_exceeded(res: Resources) -> None:
    usage = {"prompt_tokens": 1000, "completion_tokens": 250, "total_tokens": 1250}

    def reply(body: dict[str, Any], key: str) -> dict[str, Any]:
        return completion(json.dumps(ANSWER), usage=usage)

    async with openai_rig(res, reply, OPENAI_API_KEYS="sk-a") as rig:
        # $0.0008 a call at gpt-4.1-mini's prices: a $0.002 budget pays for two, not three.
        items = await rig.batch(4, 16, model=MODEL, budget_usd="0.002")
        results = [r for item in items for r in await rig.run([item])]
        state = await res.pool.fetchval(
            "SELECT state FROM batches WHERE id = $1", uuid.UUID(items[0].task.batch_id)
        )
    statuses = [r.status for r in results]
    assert statuses[0] == "succeeded" and statuses[-1] == "requeued", statuses
    assert sum(r.usage.cost_usd for r in results if r.usage) <= 0.002
    assert state == "paused" and len(rig.server.log) == statuses.count("succeeded")


async def test_the_cache_keeps_providers_and_models_apart(res: Resources) -> None:
    async with openai_rig(res, fits, OPENAI_API_KEYS="sk-a") as rig:
        first = await rig.batch(1, 17, model=MODEL)
        again = await rig.batch(1, 17, model=MODEL)
        other_model = await rig.batch(1, 17, model="gpt-4o")
        results = [r for b in (first, again, other_model) for r in await rig.run(b)]
        sent = len(rig.server.log)
    assert [r.cache_hit for r in results] == [False, True, False] and sent == 2
    async with make_rig(res) as gemini:  # the same image, another provider: analyzed again
        items = await make_items(res, [jpeg(0, 17)], {"analyzer": "gemini"})
        (result,) = await gemini.run(items)
        assert result.status == "succeeded" and not result.cache_hit and len(gemini.sent()) == 1


async def test_doctor_and_estimate_read_the_openai_provider(tmp_path: Path) -> None:
    folder = tmp_path / "few"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(jpeg(1, 18))

    def reply(body: dict[str, Any], key: str) -> web.Response:
        return error(500, "no chat here")

    async with running(reply) as (_, base_url):
        env = {"OPENAI_API_KEYS": "sk-a@p1", "OPENAI_BASE_URL": base_url, "OPENAI_MODEL": "llava"}
        rows = await providers.get("openai").doctor(env)
        report = await estimate.estimate(
            {**env, "FETCH_ALLOW_FILE": "true"}, folder, analyzer="openai", profile=None,
            model=MODEL, sample_size=5,
        )  # fmt: skip
    assert [(r.name, r.status) for r in rows] == [
        (f"openai key {hashlib.sha256(b'sk-a').hexdigest()[:8]} (p1)", "ok")
    ]
    e = report.estimate
    assert (e.model, e.images, report.sampled, report.profile) == (MODEL, 1, 1, "describe")
    assert e.cost_usd > 0 and e.batch_cost_usd == e.cost_usd / 2
    assert report.counted_by == "OpenAI's image token rule"


BATCH_MODE = {"OPENAI_BATCH_LINGER_S": "0.2", "OPENAI_BATCH_POLL_S": "0.05"}


async def test_batch_mode_sends_one_jsonl_job_at_half_price(res: Resources) -> None:
    async with openai_rig(res, fits, OPENAI_API_KEYS="sk-a@p-batch", **BATCH_MODE) as rig:
        items = await rig.batch(3, 19, model=MODEL, mode="batch")
        batch_id = items[0].task.batch_id
        assert await asyncio.gather(*(rig.analyzer.handle(i.task) for i in items)) == [[]] * 3
        (job,) = await jobs_of(res, batch_id)
        assert job["state"] == "running" and len(job["item_ids"]) == 3  # type: ignore[arg-type]
        (sent,) = rig.server.jobs.values()
        lines = [json.loads(x) for x in rig.server.files[sent["input_file_id"]].splitlines()]
        assert sorted(int(x["custom_id"]) for x in lines) == sorted(i.task.item_id for i in items)
        assert {x["url"] for x in lines} == {"/v1/chat/completions"} and not rig.server.log
        assert lines[0]["body"]["response_format"]["json_schema"]["strict"] is True
        results = await collect_all(rig.analyzer, res, 3, "openai")
    assert {(r.status, r.model) for r in results} == {("succeeded", MODEL)}
    price = openai_pricing.PRICES[MODEL]
    for result in results:
        assert result.usage is not None
        standard = pricing.cost_usd(price, input_tokens=500, output_tokens=40)
        assert result.usage.cost_usd == pytest.approx(standard / 2)
    (job,) = await jobs_of(res, batch_id)
    assert (job["state"], job["job_state"]) == ("collected", "completed")


async def test_cancelling_a_batch_cancels_its_openai_job(res: Resources) -> None:
    async with openai_rig(res, fits, OPENAI_API_KEYS="sk-a@p-cancel", **BATCH_MODE) as rig:
        rig.server.polls_to_finish = 1000
        items = await rig.batch(2, 20, model=MODEL, mode="batch")
        batch_id = items[0].task.batch_id
        await asyncio.gather(*(rig.analyzer.handle(i.task) for i in items))
        assert await rig.analyzer.deferred["openai"].collect() == 0  # still running
        await control.cancel(res.redis, res.keys, res.pool, uuid.UUID(batch_id))
        results = await collect_all(rig.analyzer, res, 2, "openai")
        (sent,) = rig.server.jobs.values()
    assert [(r.status, r.error_class) for r in results] == [("cancelled", "cancelled")] * 2
    assert sent["status"] == "cancelled"
    (job,) = await jobs_of(res, batch_id)
    assert (job["state"], job["job_state"]) == ("collected", "cancelled")
