"""The openai provider through the real ``openai`` SDK over HTTP to the OpenAI-compatible
emulator (libs/devtools/openai_server.py): structured output in strict mode, repair,
answers that are not completions, key quarantine, 429 hints, budgets, the cache kept apart
per provider and model, doctor and estimate, and the Batch API."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from imagestream.analyzer.providers.openai import pricing as openai_pricing
from imagestream.cli import estimate
from imagestream.common import control, pricing, profiles, providers
from imagestream.common.connections import Resources
from imagestream.devtools.openai_server import OpenAIConfig, running_openai_emulator

from .keyed_rig import KeyedRig, keyed_rig
from .test_gemini_analyzer import jpeg, make_items, make_rig, metric
from .test_gemini_batch_mode import collect_all, jobs_of

MODEL = "gpt-4.1-mini"
BATCH_MODE = {"OPENAI_BATCH_LINGER_S": "0.2", "OPENAI_BATCH_POLL_S": "0.05"}


def emulator_config(**changes: Any) -> OpenAIConfig:
    config = OpenAIConfig(
        key_projects={"sk-a": "proj-a", "sk-b": "proj-b"},
        batch_pending_seconds=0.05,
        batch_running_seconds=0.05,
        forced_429_retry_seconds=0.2,
    )
    for name, value in changes.items():
        setattr(config, name, value)
    return config


def openai_rig(
    res: Resources, config: OpenAIConfig | None = None, **env: str
) -> contextlib.AbstractAsyncContextManager[KeyedRig]:
    return keyed_rig(
        res,
        "openai",
        "chat.completions",
        running_openai_emulator,
        config or emulator_config(),
        lambda url: {
            "OPENAI_API_KEYS": "sk-a@proj-a,sk-b@proj-b",
            "OPENAI_BASE_URL": f"{url}/v1",
            "OPENAI_RPM": "0",
            "OPENAI_TPM": "0",
            "OPENAI_BACKOFF_S": "0.05",
            **env,
        },
    )


async def test_structured_output_in_strict_mode_through_the_sdk(
    res: Resources, tmp_path: Path
) -> None:
    # o4-mini reasons, within the output cap: a describe with room for that.
    describe = json.loads(
        (Path(profiles.__file__).parent / "profile_files/describe.json").read_text()
    )
    (tmp_path / "describe.json").write_text(json.dumps({**describe, "max_output_tokens": 4000}))
    async with openai_rig(res, PROFILES_DIR=str(tmp_path)) as rig:
        items = await rig.batch(4, model="o4-mini")
        results = await rig.run(items)
        calls = rig.calls()
    assert [r.status for r in results] == ["succeeded"] * 4, [r.error_message for r in results]
    first = results[0]
    assert first.analyzer == "openai" and first.model == "o4-mini"
    assert first.analysis and first.analysis["caption"] and first.analysis["blocked"] is False
    # The emulator refuses a schema strict mode would refuse: every call passed.
    assert {c["status"] for c in calls} == {200} and {c["key"] for c in calls} == {"sk-a", "sk-b"}
    price = openai_pricing.PRICES["o4-mini"]
    for result in results:
        usage = result.usage
        assert usage is not None and usage.thought_tokens > 0
        billed = pricing.cost_usd(
            price,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens + usage.thought_tokens,
        )
        assert usage.cost_usd == pytest.approx(billed) and usage.cost_usd > 0
    assert sorted(c["prompt_tokens"] for c in calls) == sorted(
        r.usage.input_tokens for r in results if r.usage
    )


async def test_a_server_that_ignores_the_schema_is_repaired_or_fails_clearly(
    res: Resources,
) -> None:
    before = metric("imagestream_answers_repaired_total", provider="openai")
    async with openai_rig(res) as rig:
        rig.emulator.queue_outcomes(["fenced_json", "invalid_json"])
        # A self-hosted model the price table does not name: free.
        spoiled = await rig.one_by_one(await rig.batch(2, model="llava:13b"))
    async with openai_rig(res, emulator_config(honour_response_format=False)) as rig:
        ollama_ish = await rig.one_by_one(await rig.batch(2, model="llava:13b"))
    assert [r.status for r in spoiled] == ["succeeded", "failed"]
    assert spoiled[1].error_class == "analyzer_invalid_output"
    assert "not JSON" in (spoiled[1].error_message or "")
    assert [r.status for r in ollama_ish] == ["succeeded", "succeeded"]
    assert all(r.usage and r.usage.cost_usd == 0 and r.usage.input_tokens for r in ollama_ish)
    assert metric("imagestream_answers_repaired_total", provider="openai") == before + 3


async def test_answers_that_are_not_completions_fail_that_item_only(res: Resources) -> None:
    async with openai_rig(res, OPENAI_API_KEYS="sk-a") as rig:
        rig.emulator.queue_outcomes(["non_json", "empty_choices"])
        results = await rig.one_by_one(await rig.batch(3))
    assert [r.status for r in results] == ["failed", "failed", "succeeded"]
    assert {r.error_class for r in results[:2]} == {"analyzer_invalid_output"}
    assert "not a chat completion" in (results[0].error_message or "")
    assert "no choice" in (results[1].error_message or "")


async def test_a_revoked_key_is_quarantined_and_the_other_carries_on(res: Resources) -> None:
    before = metric("imagestream_provider_keys_quarantined_total", provider="openai")
    async with openai_rig(res, emulator_config(revoked_keys={"sk-b"})) as rig:
        items = await rig.batch(6)
        results = [*(await rig.run(items[:2])), *(await rig.run(items[2:]))]
        quarantined = await res.redis.hgetall(res.keys.quarantine("openai"))
        calls = rig.calls()
    assert all(r.status == "succeeded" for r in results)
    assert [c["status"] for c in calls if c["key"] == "sk-b"] == [403]
    assert list(quarantined) == [hashlib.sha256(b"sk-b").hexdigest()[:8].encode()]
    assert metric("imagestream_provider_keys_quarantined_total", provider="openai") == before + 1


async def test_429_backs_off_for_the_servers_hint(res: Resources) -> None:
    async with openai_rig(res, OPENAI_API_KEYS="sk-a@proj-a") as rig:
        rig.emulator.queue_outcomes(["429", "429"])
        results = await rig.run(await rig.batch(1))
        calls = rig.calls()
    assert [r.status for r in results] == ["succeeded"]
    assert [c["status"] for c in calls] == [429, 429, 200]
    # The second try waited the emulator's hint (0.2 s), not the 0.05 s back-off.
    assert calls[1]["t"] - calls[0]["t"] >= 0.19 and calls[2]["t"] - calls[1]["t"] >= 0.19


async def test_the_budget_pauses_a_batch_before_it_is_exceeded(res: Resources) -> None:
    async with openai_rig(res, OPENAI_API_KEYS="sk-a") as rig:
        probe = await rig.batch(1, model=MODEL)
        config = await rig.analyzer.configs.get(probe[0].task.batch_id)
        assert config is not None
        choice = rig.provider.choice(config)
        worst = rig.provider.worst_usd(choice, probe[0].data, "standard")
        # Room for the first call's worst case, not for every call's.
        items = await rig.batch(8, model=MODEL, budget_usd=f"{worst * 1.5:.9f}")
        results = await rig.one_by_one(items)
        state = await res.pool.fetchval(
            "SELECT state FROM batches WHERE id = $1", uuid.UUID(items[0].task.batch_id)
        )
        sent = len(rig.calls())
    statuses = [r.status for r in results]
    assert statuses[0] == "succeeded" and statuses[-1] == "requeued", statuses
    assert sum(r.usage.cost_usd for r in results if r.usage) <= worst * 1.5
    assert state == "paused" and sent == statuses.count("succeeded")


async def test_the_cache_keeps_providers_and_models_apart(res: Resources) -> None:
    async with openai_rig(res, OPENAI_API_KEYS="sk-a") as rig:
        salt = rig.salt
        first = await rig.batch(1, model=MODEL)
        again = await rig.batch(1, model=MODEL)
        other_model = await rig.batch(1, model="gpt-4o")
        results = [r for b in (first, again, other_model) for r in await rig.run(b)]
        sent = len(rig.calls())
    assert [r.cache_hit for r in results] == [False, True, False] and sent == 2
    async with make_rig(res) as gemini:  # the same image, another provider: analyzed again
        items = await make_items(res, [jpeg(0, salt)], {"analyzer": "gemini"})
        (result,) = await gemini.run(items)
        assert result.status == "succeeded" and not result.cache_hit and len(gemini.sent()) == 1


async def test_doctor_and_estimate_read_the_openai_provider(tmp_path: Path) -> None:
    folder = tmp_path / "few"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(jpeg(1, 18))
    async with running_openai_emulator(emulator_config(revoked_keys={"sk-b"})) as (_, url):
        env = {"OPENAI_API_KEYS": "sk-a@p1,sk-b@p2", "OPENAI_BASE_URL": f"{url}/v1"}
        rows = await providers.get("openai").doctor(env)
        report = await estimate.estimate(
            {**env, "FETCH_ALLOW_FILE": "true"}, folder, analyzer="openai", profile=None,
            model=MODEL, sample_size=5,
        )  # fmt: skip
    short = {k: hashlib.sha256(k.encode()).hexdigest()[:8] for k in ("sk-a", "sk-b")}
    assert [(r.name, r.status) for r in rows] == [
        (f"openai key {short['sk-a']} (p1)", "ok"),
        (f"openai key {short['sk-b']} (p2)", "fail"),
    ]
    e = report.estimate
    assert (e.model, e.images, report.sampled, report.profile) == (MODEL, 1, 1, "describe")
    assert e.cost_usd > 0 and e.batch_cost_usd == e.cost_usd / 2
    assert report.counted_by == "OpenAI's image token rule"


async def test_batch_mode_sends_one_jsonl_job_at_half_price(res: Resources) -> None:
    async with openai_rig(res, OPENAI_API_KEYS="sk-a@p-batch", **BATCH_MODE) as rig:
        items = await rig.batch(3, model=MODEL, mode="batch")
        batch_id = items[0].task.batch_id
        assert await asyncio.gather(*(rig.analyzer.handle(i.task) for i in items)) == [[]] * 3
        (job,) = await jobs_of(res, batch_id)
        assert job["state"] == "running" and len(job["item_ids"]) == 3  # type: ignore[arg-type]
        results = await collect_all(rig.analyzer, res, 3, "openai")
        methods = [e["method"] for e in rig.emulator.request_log()]
    assert methods[:2] == ["files.create", "batches.create"] and "chat.completions" not in methods
    assert {(r.status, r.model) for r in results} == {("succeeded", MODEL)}
    assert {r.item_id for r in results} == {i.task.item_id for i in items}
    price = openai_pricing.PRICES[MODEL]
    for result in results:
        usage = result.usage
        assert usage is not None and usage.input_tokens > 0
        standard = pricing.cost_usd(
            price, input_tokens=usage.input_tokens, output_tokens=usage.output_tokens
        )
        assert usage.cost_usd == pytest.approx(standard / 2)
    (job,) = await jobs_of(res, batch_id)
    assert (job["state"], job["job_state"]) == ("collected", "completed")


async def test_cancelling_a_batch_cancels_its_openai_job(res: Resources) -> None:
    config = emulator_config(batch_pending_seconds=60, batch_running_seconds=60)
    async with openai_rig(res, config, OPENAI_API_KEYS="sk-a@p-cancel", **BATCH_MODE) as rig:
        items = await rig.batch(2, model=MODEL, mode="batch")
        batch_id = items[0].task.batch_id
        await asyncio.gather(*(rig.analyzer.handle(i.task) for i in items))
        assert await rig.analyzer.deferred["openai"].collect() == 0  # still running
        await control.cancel(res.redis, res.keys, res.pool, uuid.UUID(batch_id))
        results = await collect_all(rig.analyzer, res, 2, "openai")
    assert [(r.status, r.error_class) for r in results] == [("cancelled", "cancelled")] * 2
    (job,) = await jobs_of(res, batch_id)
    assert job["state"] == "collected" and job["job_state"] in ("cancelled", "cancelling")
