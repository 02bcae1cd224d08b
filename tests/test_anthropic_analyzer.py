"""The anthropic provider through the real ``anthropic`` SDK over HTTP to the
Anthropic-compatible emulator (libs/devtools/anthropic_server.py): structured output by a
forced tool, repair, answers that are not Messages, key quarantine, 429 and 529, budgets,
the cache kept apart per provider and model, doctor and estimate, and Message Batches
(half price, pause, cancel, a Redis loss while they are out)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import uuid
from pathlib import Path
from typing import Any

import anthropic
import pytest

from imagestream.analyzer.providers.anthropic import pricing as anthropic_pricing
from imagestream.cli import estimate
from imagestream.common import control, ledger, providers
from imagestream.common.connections import Resources
from imagestream.devtools.anthropic_server import AnthropicConfig, running_anthropic_emulator

from .keyed_rig import KeyedRig, assert_billed, keyed_rig
from .test_gemini_analyzer import jpeg, make_items, metric
from .test_gemini_batch_mode import collect_all, jobs_of
from .test_openai_analyzer import openai_rig

MODEL = "claude-haiku-4-5"
BATCH_MODE = {"ANTHROPIC_BATCH_LINGER_S": "0.2", "ANTHROPIC_BATCH_POLL_S": "0.05"}


def emulator_config(**changes: Any) -> AnthropicConfig:
    """Three keys in three projects, Message Batches that end at once."""
    fast = {f"batch_{phase}_seconds": 0.05 for phase in ("pending", "running", "cancel")}
    projects = {f"sk-{k}": f"proj-{k}" for k in "abc"}
    return AnthropicConfig(**{"key_projects": projects, **fast, **changes})


def anthropic_rig(
    res: Resources, config: AnthropicConfig | None = None, **env: str
) -> contextlib.AbstractAsyncContextManager[KeyedRig]:
    return keyed_rig(
        res,
        "anthropic",
        "messages",
        running_anthropic_emulator,
        config or emulator_config(),
        lambda url: {
            "ANTHROPIC_API_KEYS": "sk-a@proj-a,sk-b@proj-b",
            "ANTHROPIC_BASE_URL": url,
            "ANTHROPIC_RPM": "0",
            "ANTHROPIC_TPM": "0",
            "ANTHROPIC_BACKOFF_S": "0.05",
            **env,
        },
    )


async def test_structured_output_through_a_forced_tool(res: Resources) -> None:
    async with anthropic_rig(res) as rig:
        items = await rig.batch(4)
        results = await rig.run(items)
        calls = rig.calls()
        config = await rig.analyzer.configs.get(items[0].task.batch_id)
        assert config is not None
        provider = rig.provider
        estimated = provider.input_tokens(provider.choice(config), items[0].data)
    assert [r.status for r in results] == ["succeeded"] * 4, [r.error_message for r in results]
    first = results[0]
    assert first.analyzer == "anthropic" and first.model == MODEL
    assert first.analysis and first.analysis["caption"] and first.analysis["blocked"] is False
    # The emulator answers a tool_use only for a forced tool with an object input_schema.
    assert {c["status"] for c in calls} == {200} and {c["key"] for c in calls} == {"sk-a", "sk-b"}
    assert {c["outcome"] for c in calls} == {"ok"}
    assert_billed(results, anthropic_pricing.PRICES[MODEL])
    assert sorted(c["input_tokens"] for c in calls) == sorted(
        r.usage.input_tokens for r in results if r.usage
    )
    # Our image rule and tool overhead (quota pacing, reservations) match what was billed.
    assert estimated == pytest.approx(calls[0]["input_tokens"], rel=0.02)


async def test_answers_are_repaired_once_or_fail_clearly(res: Resources) -> None:
    before = metric("imagestream_answers_repaired_total", provider="anthropic")
    async with anthropic_rig(res, ANTHROPIC_API_KEYS="sk-a") as rig:
        rig.emulator.queue_outcomes(
            ["fenced_json", "invalid_json", "schema_mismatch", "max_tokens", "refusal"]
        )
        results = await rig.one_by_one(await rig.batch(5))
    assert [r.status for r in results] == ["succeeded", "failed", "failed", "failed", "succeeded"]
    assert {r.error_class for r in results[1:4]} == {"analyzer_invalid_output"}
    assert "not JSON" in (results[1].error_message or "")
    assert "does not match profile describe" in (results[2].error_message or "")
    assert "output cap of 400" in (results[3].error_message or "")
    assert results[4].analysis and results[4].analysis["blocked"] is True
    # Tokens spent on an unusable answer stay on the bill.
    assert all(r.usage and r.usage.cost_usd > 0 for r in results[1:4])
    assert metric("imagestream_answers_repaired_total", provider="anthropic") == before + 1


async def test_answers_that_are_not_messages_fail_that_item_only(res: Resources) -> None:
    async with anthropic_rig(res, ANTHROPIC_API_KEYS="sk-a") as rig:
        rig.emulator.queue_outcomes(["non_json", "empty_content"])
        results = await rig.one_by_one(await rig.batch(3))
    assert [r.status for r in results] == ["failed", "failed", "succeeded"]
    assert {r.error_class for r in results[:2]} == {"analyzer_invalid_output"}
    assert "not a Message" in (results[0].error_message or "")
    assert "no content" in (results[1].error_message or "")


async def test_refused_keys_are_quarantined_and_the_other_carries_on(res: Resources) -> None:
    before = metric("imagestream_provider_keys_quarantined_total", provider="anthropic")
    config = emulator_config(revoked_keys={"sk-b"}, invalid_keys={"sk-c"})
    keys = "sk-a@proj-a,sk-b@proj-b,sk-c@proj-c"
    async with anthropic_rig(res, config, ANTHROPIC_API_KEYS=keys) as rig:
        items = await rig.batch(6)
        results = [*(await rig.run(items[:3])), *(await rig.run(items[3:]))]
        quarantined = await res.redis.hgetall(res.keys.quarantine("anthropic"))
        calls = rig.calls()
    assert all(r.status == "succeeded" for r in results)
    assert [c["status"] for c in calls if c["key"] == "sk-b"] == [403]
    assert [c["status"] for c in calls if c["key"] == "sk-c"] == [401]
    short = {hashlib.sha256(k.encode()).hexdigest()[:8].encode() for k in ("sk-b", "sk-c")}
    assert set(quarantined) == short
    after = metric("imagestream_provider_keys_quarantined_total", provider="anthropic")
    assert after == before + 2


async def test_every_key_refused_pauses_the_batch(res: Resources) -> None:
    async with anthropic_rig(res, emulator_config(revoked_keys={"sk-a"}), ANTHROPIC_API_KEYS="sk-a") as rig:  # fmt: skip
        items = await rig.batch(1)
        (result,) = await rig.run(items)
        row = await ledger.batch(res.pool, uuid.UUID(items[0].task.batch_id))
    assert result.status == "requeued"
    assert (row["state"], row["state_reason"]) == ("paused", "no_usable_anthropic_key")


async def test_429_waits_for_retry_after_and_529_is_retried(res: Resources) -> None:
    before = metric("imagestream_anthropic_requests_total", project="proj-a", outcome="overloaded")
    async with anthropic_rig(res, ANTHROPIC_API_KEYS="sk-a@proj-a") as rig:
        rig.emulator.queue_outcomes(["429", "529"])
        results = await rig.run(await rig.batch(1))
        calls = rig.calls()
    assert [r.status for r in results] == ["succeeded"]
    assert [c["status"] for c in calls] == [429, 529, 200]
    # retry-after is whole seconds (1 here), not the 0.05 s back-off.
    assert calls[1]["t"] - calls[0]["t"] >= 0.95
    after = metric("imagestream_anthropic_requests_total", project="proj-a", outcome="overloaded")
    assert after == before + 1


async def test_the_budget_pauses_a_batch_before_it_is_exceeded(res: Resources) -> None:
    async with anthropic_rig(res, ANTHROPIC_API_KEYS="sk-a") as rig:
        probe = await rig.batch(1)
        config = await rig.analyzer.configs.get(probe[0].task.batch_id)
        assert config is not None
        worst = rig.provider.worst_usd(rig.provider.choice(config), probe[0].data, "standard")
        # Room for the first call's worst case, not for every call's.
        items = await rig.batch(8, budget_usd=f"{worst * 1.5:.9f}")
        results = await rig.one_by_one(items)
        row = await ledger.batch(res.pool, uuid.UUID(items[0].task.batch_id))
        sent = len(rig.calls())
    statuses = [r.status for r in results]
    assert statuses[0] == "succeeded" and statuses[-1] == "requeued", statuses
    assert sum(r.usage.cost_usd for r in results if r.usage) <= worst * 1.5
    assert row["state"] == "paused" and sent == statuses.count("succeeded")


async def test_the_cache_keeps_providers_and_models_apart(res: Resources) -> None:
    async with anthropic_rig(res, ANTHROPIC_API_KEYS="sk-a") as rig:
        salt = rig.salt
        first = await rig.batch(1)
        again = await rig.batch(1)
        other_model = await rig.batch(1, model="claude-sonnet-4-5")
        results = [r for b in (first, again, other_model) for r in await rig.run(b)]
        sent = len(rig.calls())
    assert [r.cache_hit for r in results] == [False, True, False] and sent == 2
    async with openai_rig(res, OPENAI_API_KEYS="sk-a") as other:  # another provider
        items = await make_items(res, [jpeg(0, salt)], {"analyzer": "openai"}, other.env)
        (result,) = await other.run(items)
        assert result.status == "succeeded" and not result.cache_hit and len(other.calls()) == 1


async def test_doctor_and_estimate_read_the_anthropic_provider(tmp_path: Path) -> None:
    folder = tmp_path / "few"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(jpeg(1, 19))
    config = emulator_config(revoked_keys={"sk-b"})
    async with running_anthropic_emulator(config) as (emulator, url):
        env = {"ANTHROPIC_API_KEYS": "sk-a@p1,sk-b@p2", "ANTHROPIC_BASE_URL": url,
               "FETCH_ALLOW_FILE": "true"}  # fmt: skip
        rows = await providers.get("anthropic").doctor(env)
        reports = [
            await estimate.estimate(
                env,
                folder,
                analyzer="anthropic",
                profile=None,
                model=None,
                sample_size=5,
                offline=offline,
            )
            for offline in (False, True)
        ]
        counted = [e for e in emulator.request_log() if e["method"] == "count_tokens"]
    short = {k: hashlib.sha256(k.encode()).hexdigest()[:8] for k in ("sk-a", "sk-b")}
    assert [(r.name, r.status) for r in rows] == [
        (f"anthropic key {short['sk-a']} (p1)", "ok"),
        (f"anthropic key {short['sk-b']} (p2)", "fail"),
    ]
    assert "not allowed" in rows[1].detail
    online, offline = reports
    assert [r.counted_by for r in reports] == [
        "Anthropic's count_tokens", "Anthropic's image token rule",
    ]  # fmt: skip
    # One count_tokens call for the one sampled image; the rule gives the same count.
    assert [c["input_tokens"] for c in counted] == [online.estimate.input_tokens_per_image]
    assert offline.estimate.input_tokens_per_image == online.estimate.input_tokens_per_image
    e = online.estimate
    assert (e.model, e.images, online.sampled, online.profile) == (MODEL, 1, 1, "describe")
    assert e.cost_usd > 0 and e.batch_cost_usd == pytest.approx(e.cost_usd / 2)


async def test_batch_mode_sends_one_message_batch_at_half_price(res: Resources) -> None:
    async with anthropic_rig(res, ANTHROPIC_API_KEYS="sk-a@p-batch", **BATCH_MODE) as rig:
        items = await rig.batch(3, mode="batch")
        batch_id = items[0].task.batch_id
        assert await asyncio.gather(*(rig.analyzer.handle(i.task) for i in items)) == [[]] * 3
        (job,) = await jobs_of(res, batch_id)
        assert job["state"] == "running" and len(job["item_ids"]) == 3  # type: ignore[arg-type]
        results = await collect_all(rig.analyzer, res, 3, "anthropic")
        methods = rig.methods()
    assert methods[0] == "batches.create" and "messages" not in methods
    assert {(r.status, r.model) for r in results} == {("succeeded", MODEL)}
    assert {r.item_id for r in results} == {i.task.item_id for i in items}
    assert_billed(results, anthropic_pricing.PRICES[MODEL], "batch")
    (job,) = await jobs_of(res, batch_id)
    assert (job["state"], job["job_state"]) == ("collected", "ended")


async def test_errored_requests_of_a_message_batch_fail_their_items(res: Resources) -> None:
    async with anthropic_rig(res, ANTHROPIC_API_KEYS="sk-a@p-err", **BATCH_MODE) as rig:
        rig.emulator.queue_outcomes(["500", "schema_mismatch"])
        items = await rig.batch(3, mode="batch")
        await asyncio.gather(*(rig.analyzer.handle(i.task) for i in items))
        results = await collect_all(rig.analyzer, res, 3, "anthropic")
    by_class = sorted((r.status, r.error_class or "") for r in results)
    assert by_class == [
        ("failed", "analyzer_error"), ("failed", "analyzer_invalid_output"), ("succeeded", ""),
    ]  # fmt: skip
    errored = next(r for r in results if r.error_class == "analyzer_error")
    assert "api_error" in (errored.error_message or "")


async def test_a_paused_batch_still_gets_the_answers_of_its_message_batch(
    res: Resources,
) -> None:
    """Answers already paid for are kept: pausing stops new sends, not a job that is out."""
    config = emulator_config(batch_pending_seconds=0.5, batch_running_seconds=0.1)
    async with anthropic_rig(res, config, ANTHROPIC_API_KEYS="sk-a@p-pause", **BATCH_MODE) as rig:
        items = await rig.batch(2, mode="batch")
        batch_id = items[0].task.batch_id
        await asyncio.gather(*(rig.analyzer.handle(i.task) for i in items))
        await control.pause(res.redis, res.keys, res.pool, uuid.UUID(batch_id), "by a test")
        results = await collect_all(rig.analyzer, res, 2, "anthropic")
        row = await ledger.batch(res.pool, uuid.UUID(batch_id))
    assert [r.status for r in results] == ["succeeded"] * 2
    assert row["state"] == "paused" and row["succeeded"] == 2


async def test_cancelling_a_batch_cancels_its_message_batch(res: Resources) -> None:
    config = emulator_config(batch_pending_seconds=60, batch_running_seconds=60)
    async with anthropic_rig(res, config, ANTHROPIC_API_KEYS="sk-a@p-cancel", **BATCH_MODE) as rig:
        items = await rig.batch(2, mode="batch")
        batch_id = items[0].task.batch_id
        await asyncio.gather(*(rig.analyzer.handle(i.task) for i in items))
        assert await rig.analyzer.deferred["anthropic"].collect() == 0  # still running
        await control.cancel(res.redis, res.keys, res.pool, uuid.UUID(batch_id))
        results = await collect_all(rig.analyzer, res, 2, "anthropic")
        (job,) = await jobs_of(res, batch_id)
        sdk = anthropic.AsyncAnthropic(
            base_url=rig.env["ANTHROPIC_BASE_URL"], api_key="sk-a", max_retries=0
        )
        async with sdk:
            at_anthropic = await sdk.messages.batches.retrieve(str(job["name"]))
    assert [(r.status, r.error_class) for r in results] == [("cancelled", "cancelled")] * 2
    assert job["state"] == "collected" and job["job_state"] == "ended"
    assert at_anthropic.cancel_initiated_at is not None
    assert at_anthropic.request_counts.canceled == 2


async def test_a_redis_loss_while_a_message_batch_is_out_loses_nothing(res: Resources) -> None:
    config = emulator_config(batch_pending_seconds=0.5, batch_running_seconds=0.1)
    async with anthropic_rig(res, config, ANTHROPIC_API_KEYS="sk-a@p-loss", **BATCH_MODE) as rig:
        items = await rig.batch(3, mode="batch")
        batch_id = uuid.UUID(items[0].task.batch_id)
        await asyncio.gather(*(rig.analyzer.handle(i.task) for i in items))
        # Redis loses everything of this deployment: streams, flags, budgets.
        async for name in res.redis.scan_iter(match=f"{res.keys.prefix}:*"):
            await res.redis.delete(name)
        # The reconciler's re-drive after a loss leaves the items of a running job alone.
        assert await ledger.requeue_inflight(res.pool, res.keys.prefix) == 0
        results = await collect_all(rig.analyzer, res, 3, "anthropic")
        sent = [m for m in rig.methods() if m == "batches.create"]
        states = await res.pool.fetch(
            "SELECT i.state, count(r.item_id) AS n FROM items i"
            " LEFT JOIN results r ON r.item_id = i.id WHERE i.batch_id = $1 GROUP BY i.id",
            batch_id,
        )
    assert sorted(r.item_id for r in results) == sorted(i.task.item_id for i in items)
    assert len(sent) == 1  # sent once, paid once
    assert [(r["state"], r["n"]) for r in states] == [("succeeded", 1)] * 3
