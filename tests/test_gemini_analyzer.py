"""The Gemini analyzer end to end through the emulator: real google-genai SDK, real Redis and
PostgreSQL, the analyzer's own handler (the code path a deployment runs).

Each test drives ``Analyzer.handle`` with AnalyzeTasks whose images sit in Redis, then
records the results with the writer's ``ledger.apply_results``. The emulator's request log
is the witness of what was sent to "Google".
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import io
import logging
import math
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import orjson
import pytest
from PIL import Image
from prometheus_client import REGISTRY

from imagestream.analyzer.providers.gemini import pricing as gemini_pricing
from imagestream.analyzer.service import Analyzer, AnalyzerSettings, create_providers, load_settings
from imagestream.common import control, ledger, messages, pricing, profiles, providers, webhooks
from imagestream.common.connections import Resources, redis_client
from imagestream.common.inputs import Row
from imagestream.common.worker import Out
from imagestream.devtools.gemini_server import (
    Emulator,
    EmulatorConfig,
    LatencyConfig,
    QuotaLimits,
    running_emulator,
)

from .helpers import wait_for

pytestmark = pytest.mark.filterwarnings(
    "ignore:Inheritance class AiohttpClientSession from ClientSession:DeprecationWarning"
)

MODEL = "gemini-2.5-flash-lite"
DESCRIBE = profiles.load_catalog().profile("describe")


def jpeg(index: int, salt: int, size: tuple[int, int] = (96, 72)) -> bytes:
    """A small JPEG, distinct per (index, salt): distinct bytes, so distinct cache keys."""
    image = Image.new("RGB", size, ((index * 37) % 256, (index * 91) % 256, (index * 53) % 256))
    for bit in range(32):  # the salt, then the index, as black and white pixels
        image.putpixel((bit, 0), (255, 255, 255) if salt >> bit & 1 else (0, 0, 0))
    for bit in range(16):
        image.putpixel((bit, 1), (255, 255, 255) if index >> bit & 1 else (0, 0, 0))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


@dataclass
class Item:
    task: messages.AnalyzeTask
    data: bytes


@dataclass
class Rig:
    """An emulator, an analyzer wired to it, and helpers to make batches and items."""

    emulator: Emulator
    base_url: str
    res: Resources
    analyzer: Analyzer
    #: Differs per rig, so that no earlier test's cached analysis answers this one's images.
    salt: int = dataclasses.field(default_factory=lambda: secrets.randbits(32))

    def image(self, index: int) -> bytes:
        return jpeg(index, self.salt)

    async def batch(self, images: Sequence[bytes], **fields: object) -> list[Item]:
        return await make_items(self.res, images, {"analyzer": "gemini", **fields})

    async def run(self, items: Sequence[Item]) -> list[messages.ItemResult]:
        return await analyze_items(self.analyzer, items)

    def sent(self, key: str | None = None) -> list[dict[str, object]]:
        return [e for e in self.emulator.request_log(key=key) if e["method"] == "generateContent"]


async def make_items(
    res: Resources,
    images: Sequence[bytes],
    fields: dict[str, object],
    env: dict[str, str] | None = None,
) -> list[Item]:
    """A running batch of these images, each as the fetcher hands it to the analyzer."""
    choice = providers.resolve_batch(fields, env=env)
    batch_id = await ledger.create_batch(
        res.pool,
        ledger.NewBatch(
            name="t",
            pipeline=res.keys.prefix,
            analyzer=choice.analyzer,
            profile=choice.profile,
            model=choice.model,
            budget_usd=choice.budget_usd,
            options=choice.options,
        ),
    )
    rows = [Row(line=i, url=f"http://127.0.0.1/{i}.jpg", metadata=None) for i in range(len(images))]
    async with res.pool.acquire() as conn:
        await ledger.insert_items(conn, batch_id, rows)
    await ledger.start_batch(res.pool, batch_id)
    ids = await res.pool.fetch(
        "UPDATE items SET state = 'analyzing' WHERE batch_id = $1 RETURNING id, line",
        batch_id,
    )
    by_line = {r["line"]: r["id"] for r in ids}
    items = []
    for line, data in enumerate(images):
        sha = hashlib.sha256(data).hexdigest()
        blob_key = res.keys.blob(sha, 768)
        await res.redis.set(blob_key, data, ex=600)
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
        facts = messages.ImageFacts(
            width=width, height=height, format="JPEG", mode="RGB", bytes=len(data), sha256=sha
        )
        task = messages.AnalyzeTask(
            batch_id=str(batch_id),
            item_id=by_line[line],
            url=rows[line].url,
            facts=facts,
            blob_key=blob_key,
        )
        items.append(Item(task, data))
    return items


async def analyze_items(analyzer: Analyzer, items: Sequence[Item]) -> list[messages.ItemResult]:
    """Handle every item at once, record the results as the writer does."""
    outs = await asyncio.gather(*(analyzer.handle(i.task) for i in items))
    results = [result_of(o) for o in outs]
    async with analyzer.res.pool.acquire() as conn:
        await ledger.apply_results(conn, results)
    return results


def result_of(outs: Sequence[Out]) -> messages.ItemResult:
    assert len(outs) == 1, outs
    return messages.result_decoder.decode(outs[0][1])


def analyzer_settings(base_url: str, prefix: str, **env: str) -> AnalyzerSettings:
    return load_settings(
        {
            "REDIS_PREFIX": prefix,
            "GEMINI_API_KEYS": "key-a@proj-a,key-b@proj-b",
            "GEMINI_BASE_URL": base_url,
            "GEMINI_RPM": "0",
            "GEMINI_TPM": "0",
            "GEMINI_RPD": "0",
            "GEMINI_BACKOFF_S": "0.05",
            **env,
        },
    )


def emulator_config(**changes: object) -> EmulatorConfig:
    config = EmulatorConfig(
        default_limits=QuotaLimits(rpm=None, tpm=None, rpd=None),
        key_projects={"key-a": "proj-a", "key-b": "proj-b"},
    )
    for name, value in changes.items():
        setattr(config, name, value)
    return config


@contextlib.asynccontextmanager
async def make_rig(
    res: Resources, config: EmulatorConfig | None = None, **env: str
) -> AsyncIterator[Rig]:
    async with running_emulator(config or emulator_config()) as (emulator, base_url):
        config_ = analyzer_settings(base_url, res.keys.prefix, **env)
        providers = create_providers(res, config_)
        try:
            yield Rig(emulator, base_url, res, Analyzer(res, config_, providers))
        finally:
            for provider in providers.values():
                await provider.close()


@pytest.fixture
async def rig(res: Resources) -> AsyncIterator[Rig]:
    async with make_rig(res) as made:
        yield made


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# ------------------------------------------------------------------------------ structured output
async def test_structured_output_parsed_validated_and_stored(rig: Rig) -> None:
    items = await rig.batch([rig.image(i) for i in range(3)])
    projects = ("proj-a", "proj-b")
    before = [metric("imagestream_gemini_cost_usd_total", project=p) for p in projects]
    results = await rig.run(items)
    price = pricing.price_of(MODEL, gemini_pricing.PRICES)
    for result in results:
        assert result.status == "succeeded", result
        assert result.analyzer == "gemini" and result.model == MODEL and not result.cache_hit
        analysis = result.analysis or {}
        assert set(analysis) == set(DESCRIBE.columns) - {"block_reason"}
        assert analysis["blocked"] is False
        assert (
            analysis["category"]
            in DESCRIBE.profile.response_schema["properties"]["category"]["enum"]
        )
        assert isinstance(analysis["tags"], list) and isinstance(analysis["is_product_photo"], bool)
        usage = result.usage
        assert usage is not None
        # describe asks for MEDIUM media resolution: 256 image tokens (258 without), plus the
        # prompt's text (and the schema, if the server counts it as Google does).
        text = pricing.text_tokens(DESCRIBE.profile.prompt)
        assert usage.input_tokens - text in (256, 256 + DESCRIBE.schema_tokens)
        assert usage.output_tokens > 0 and usage.thought_tokens == 0
        assert usage.cost_usd == pytest.approx(
            pricing.cost_usd(
                price, input_tokens=usage.input_tokens, output_tokens=usage.output_tokens
            )
        )
    batch_id = uuid.UUID(items[0].task.batch_id)
    batch = await ledger.batch(rig.res.pool, batch_id)
    assert list(batch["analysis_columns"]) == DESCRIBE.columns
    assert batch["succeeded"] == 3
    spent = sum(r.usage.cost_usd for r in results if r.usage)
    assert float(batch["cost_usd"]) == pytest.approx(spent, abs=1e-8)
    # The cost metric names the project whose key was billed.
    after = [metric("imagestream_gemini_cost_usd_total", project=p) for p in projects]
    assert sum(after) - sum(before) == pytest.approx(spent)
    billed_projects = {p for p, a, b in zip(projects, after, before, strict=True) if a > b}
    assert billed_projects == {str(e["project"]) for e in rig.sent()}
    rows = await rig.res.pool.fetch(
        "SELECT analysis, input_tokens, output_tokens, cost_usd, cache_hit FROM results"
        " WHERE batch_id = $1",
        batch_id,
    )
    assert len(rows) == 3 and all(r["analysis"]["caption"] and not r["cache_hit"] for r in rows)
    assert all(r["cost_usd"] > 0 for r in rows)
    # What went over the wire: the schema, the profile's settings, one call per image.
    sent = rig.sent()
    assert len(sent) == 3 and {e["model"] for e in sent} == {MODEL}
    # What was recorded is what the server reported, call by call.
    reported = sorted((e["prompt_tokens"], e["candidates_tokens"]) for e in sent)
    assert reported == sorted(
        (r.usage.input_tokens, r.usage.output_tokens) for r in results if r.usage
    )
    assert all(e["thoughts_tokens"] == 0 for e in sent)


# ------------------------------------------------------------------------------ 429
async def test_429_backs_off_that_project_for_the_retry_delay(res: Resources) -> None:
    config = emulator_config(forced_429_retry_seconds=1.5, retry_delay_format="exact")
    async with make_rig(res, config) as rig:
        rig.emulator.queue_outcomes(["429"], key="key-a")
        # One image first, so that nothing else is in flight when the 429 comes back.
        first = await rig.run(await rig.batch([rig.image(0)]))
        refused = [e for e in rig.sent("key-a") if e["status"] == 429]
        assert len(refused) == 1 and refused[0]["retry_delay_s"] == 1.5
        t0 = float(refused[0]["t"])  # type: ignore[arg-type]
        # While proj-a waits out its delay, proj-b carries the work.
        during = await rig.run(await rig.batch([rig.image(i) for i in range(10, 16)]))
        await asyncio.sleep(max(0.0, t0 + 1.6 - time.monotonic()))
        after = await rig.run(await rig.batch([rig.image(i) for i in range(20, 26)]))
        log = rig.sent()
    assert all(r.status == "succeeded" for r in [*first, *during, *after])
    a_later = [float(e["t"]) for e in log if e["key"] == "key-a" and float(e["t"]) > t0]  # type: ignore[arg-type]
    # No request to proj-a before the delay ended; proj-b worked meanwhile; proj-a after.
    assert a_later and min(a_later) >= t0 + 1.5
    assert any(e["key"] == "key-b" and t0 < float(e["t"]) < t0 + 1.5 for e in log)  # type: ignore[arg-type]
    assert sum(e["status"] == 429 for e in log) == 1


# ------------------------------------------------------------------------------ keys
GOOD, REVOKED = "AIzaSy-good-key-0001", "AIzaSy-revoked-key-0002"


async def test_revoked_key_is_quarantined_while_the_others_carry_on(
    res: Resources, caplog: pytest.LogCaptureFixture
) -> None:
    config = emulator_config(
        key_projects={GOOD: "proj-a", REVOKED: "proj-b"}, revoked_keys={REVOKED}
    )
    before = metric("imagestream_provider_keys_quarantined_total", provider="gemini")
    caplog.set_level(logging.ERROR, logger="imagestream.analyzer")
    async with make_rig(res, config, GEMINI_API_KEYS=f"{GOOD}@proj-a,{REVOKED}@proj-b") as rig:
        # One at a time first (projects take turns), then many at once.
        items = await rig.batch([rig.image(i) for i in range(12)])
        results = [*await rig.run(items[:1]), *await rig.run(items[1:2])]
        more = await rig.run(items[2:])
        log = rig.sent()
        quarantined = await res.redis.hgetall(res.keys.quarantine("gemini"))
        # What the dashboard's admin page shows of the keys.
        await rig.analyzer.providers["gemini"].publish_status()  # type: ignore[attr-defined]
        published = {
            k.decode(): orjson.loads(v)
            for k, v in (await res.redis.hgetall(res.keys.key_status("gemini"))).items()
        }
    assert all(r.status == "succeeded" for r in [*results, *more])
    # One 403 for the revoked key, then never again; every image went through the good one.
    revoked = [e for e in log if e["key"] == REVOKED]
    assert len(revoked) == 1 and revoked[0]["status"] == 403
    assert sum(e["key"] == GOOD and e["status"] == 200 for e in log) == 12
    assert metric("imagestream_provider_keys_quarantined_total", provider="gemini") == before + 1
    short = hashlib.sha256(REVOKED.encode()).hexdigest()[:8]
    assert list(quarantined) == [short.encode()]
    lines = [r.getMessage() for r in caplog.records if "quarantined" in r.getMessage()]
    assert len(lines) == 1 and short in lines[0]
    good_short = hashlib.sha256(GOOD.encode()).hexdigest()[:8]
    assert set(published) == {short, good_short}
    assert (published[short]["state"], published[short]["project"]) == ("quarantined", "proj-b")
    assert published[good_short]["state"] == "ok"
    assert published[good_short]["rpm"]["used"] >= 12
    assert GOOD not in orjson.dumps(published).decode()
    assert all(REVOKED not in r.getMessage() for r in caplog.records)


async def test_no_usable_key_pauses_the_batch(res: Resources) -> None:
    config = emulator_config(key_projects={REVOKED: "proj-b"}, revoked_keys={REVOKED})
    async with make_rig(res, config, GEMINI_API_KEYS=f"{REVOKED}@proj-b") as rig:
        items = await rig.batch([rig.image(1), rig.image(2)])
        results = await rig.run(items)
    assert [r.status for r in results] == ["requeued", "requeued"]
    batch = await ledger.batch(res.pool, uuid.UUID(items[0].task.batch_id))
    assert (batch["state"], batch["state_reason"]) == ("paused", "no_usable_gemini_key")
    assert await res.redis.hget(res.keys.halted, items[0].task.batch_id) == b"paused"
    assert await ledger.state_counts(res.pool, batch["id"]) == {"pending": 2}


# ------------------------------------------------------------------------------ answers
async def test_server_errors_are_retried_then_fail(rig: Rig) -> None:
    rig.emulator.queue_outcomes(["500", "503"])
    (recovered,) = await rig.run(await rig.batch([rig.image(1)]))
    assert recovered.status == "succeeded"
    assert [e["status"] for e in rig.sent()] == [500, 503, 200]
    rig.emulator.queue_outcomes(["503"] * 4)  # GEMINI_ATTEMPTS = 4
    (failed,) = await rig.run(await rig.batch([rig.image(2)]))
    assert (failed.status, failed.error_class) == ("failed", "analyzer_error")
    assert "503" in (failed.error_message or "")
    assert len(rig.sent()) == 3 + 4


async def test_safety_block_is_a_blocked_result_not_a_retry(rig: Rig) -> None:
    rig.emulator.queue_outcomes(["safety", "prompt_blocked"])
    blocked, prompt_blocked = [await rig.run(await rig.batch([rig.image(i)])) for i in (1, 2)]
    for (result,) in (blocked, prompt_blocked):
        assert result.status == "succeeded" and result.analysis is not None
        assert result.analysis["blocked"] is True and result.analysis["caption"] is None
        assert result.usage is not None and result.usage.input_tokens > 0  # billed all the same
    assert blocked[0].analysis["block_reason"] == "SAFETY (dangerous_content)"  # type: ignore[index]
    assert prompt_blocked[0].analysis["block_reason"].startswith("prompt blocked: SAFETY")  # type: ignore[index]
    assert len(rig.sent()) == 2  # one call each, no retry


async def test_fenced_json_is_repaired_without_another_call(rig: Rig) -> None:
    before = metric("imagestream_answers_repaired_total", provider="gemini")
    rig.emulator.queue_outcomes(["fenced_json"])
    (result,) = await rig.run(await rig.batch([rig.image(1)]))
    assert result.status == "succeeded" and result.analysis and result.analysis["caption"]
    assert len(rig.sent()) == 1
    assert metric("imagestream_answers_repaired_total", provider="gemini") == before + 1


async def test_invalid_json_fails_after_one_repair_and_its_cost_is_kept(rig: Rig) -> None:
    rig.emulator.queue_outcomes(["invalid_json", "max_tokens"])
    items = await rig.batch([rig.image(1), rig.image(2)])
    cut, capped = [(await rig.run([item]))[0] for item in items]
    assert (cut.status, cut.error_class) == ("failed", "analyzer_invalid_output")
    # Cut-off JSON: the local repair finds nothing to cut, or cuts to an inner object
    # that is no answer either; then the item fails.
    message = cut.error_message or ""
    assert "not JSON, and not repairable" in message or "not JSON, even repaired" in message
    assert (capped.status, capped.error_class) == ("failed", "analyzer_invalid_output")
    assert "output cap of 400 tokens" in (capped.error_message or "")
    assert len(rig.sent()) == 2  # the repair was local: no second call
    batch = await ledger.batch(rig.res.pool, uuid.UUID(items[0].task.batch_id))
    paid = sum(r.usage.cost_usd for r in (cut, capped) if r.usage)
    assert paid > 0 and float(batch["cost_usd"]) == pytest.approx(paid, abs=1e-8)
    assert batch["failed"] == 2


# ------------------------------------------------------------------------------ budget
async def test_budget_pauses_the_batch_before_it_is_exceeded(rig: Rig) -> None:
    budget = 0.0005
    price = pricing.price_of(MODEL, gemini_pricing.PRICES)
    prompt_tokens = gemini_pricing.input_tokens(DESCRIBE, MODEL, 96, 72)  # with the schema's
    worst = pricing.cost_usd(
        price, input_tokens=math.ceil(prompt_tokens * 1.1) + 16, output_tokens=400
    )
    items = await rig.batch([rig.image(i) for i in range(10)], budget_usd=str(budget))
    batch_id = uuid.UUID(items[0].task.batch_id)
    await rig.res.pool.execute(  # a receiver is told (webhooks.py)
        "UPDATE batches SET webhook_url = 'http://127.0.0.1:9/hooks', webhook_secret = $2"
        " WHERE id = $1",
        batch_id,
        webhooks.new_secret(),
    )
    statuses = [(await rig.run([item]))[0].status for item in items]
    done = statuses.count("succeeded")
    assert 1 <= done < 10 and statuses == ["succeeded"] * done + ["requeued"] * (10 - done)
    batch = await ledger.batch(rig.res.pool, batch_id)
    assert (batch["state"], batch["state_reason"]) == ("paused", "budget_reached")
    [event] = await rig.res.pool.fetch(
        "SELECT type, payload FROM webhook_events WHERE batch_id = $1", batch_id
    )
    assert event["type"] == "batch.paused"
    assert event["payload"]["data"]["reason"] == "budget_reached"
    assert event["payload"]["data"]["cost_usd"] == pytest.approx(float(batch["cost_usd"]))
    assert await rig.res.redis.hget(rig.res.keys.halted, str(batch_id)) == b"paused"
    spent = float(batch["cost_usd"])
    # Under the budget, and stopped only because the next call could have passed it.
    assert 0 < spent <= budget < spent + worst
    assert len(rig.sent()) == done
    assert await ledger.state_counts(rig.res.pool, batch_id) == {
        "succeeded": done,
        "pending": 10 - done,
    }

    # Many calls at once: each reserves its worst case first, so together they stay under.
    items = await rig.batch([rig.image(i) for i in range(100, 120)], budget_usd=str(budget))
    results = await rig.run(items)
    batch = await ledger.batch(rig.res.pool, uuid.UUID(items[0].task.batch_id))
    assert batch["state_reason"] == "budget_reached"
    assert 0 < float(batch["cost_usd"]) <= budget
    assert {r.status for r in results} == {"succeeded", "requeued"}


# ------------------------------------------------------------------------------ cache
async def test_cache_hit_costs_zero_tokens(rig: Rig) -> None:
    image = rig.image(1)
    (first,) = await rig.run(await rig.batch([image]))
    again_items = await rig.batch([image])  # another batch, same profile and model
    (again,) = await rig.run(again_items)
    assert not first.cache_hit and again.cache_hit
    assert again.status == "succeeded" and again.analysis == first.analysis
    assert again.usage == messages.Usage() and again.model == MODEL
    assert len(rig.sent()) == 1
    batch_id = uuid.UUID(again_items[0].task.batch_id)
    row = await rig.res.pool.fetchrow(
        "SELECT cache_hit, input_tokens, output_tokens, cost_usd FROM results WHERE batch_id = $1",
        batch_id,
    )
    assert row is not None and tuple(row) == (True, 0, 0, 0)
    assert (await ledger.batch(rig.res.pool, batch_id))["cost_usd"] == 0
    # Another profile is another question; a batch may bypass the cache.
    (moderated,) = await rig.run(await rig.batch([image], profile="moderation"))
    (fresh,) = await rig.run(await rig.batch([image], cache="false"))
    assert not moderated.cache_hit and not fresh.cache_hit
    assert moderated.analysis and "violence" in moderated.analysis
    assert len(rig.sent()) == 3


async def test_duplicates_arriving_together_are_analyzed_once_across_replicas(
    res: Resources, redis_url: str
) -> None:
    config = emulator_config(latency=LatencyConfig(kind="fixed", median_ms=300))
    async with make_rig(res, config) as rig:
        other_redis = redis_client(redis_url)
        other_res = Resources(other_redis, res.pool, res.keys)
        other_providers = create_providers(
            other_res, analyzer_settings(rig.base_url, res.keys.prefix)
        )
        replicas = [rig.analyzer, Analyzer(other_res, rig.analyzer.settings, other_providers)]
        try:
            items = await rig.batch([rig.image(7)] * 20)
            outs = await asyncio.gather(
                *(replicas[n % 2].handle(item.task) for n, item in enumerate(items))
            )
        finally:
            for provider in other_providers.values():
                await provider.close()
            await other_redis.aclose()
        results = [result_of(o) for o in outs]
        assert len(rig.sent()) == 1
    assert all(r.status == "succeeded" for r in results)
    assert sum(not r.cache_hit for r in results) == 1
    assert all(r.analysis == results[0].analysis for r in results)


async def test_calls_waiting_for_quota_are_not_sent_once_the_batch_is_paused(
    res: Resources,
) -> None:
    config = emulator_config(window_seconds=30.0)
    env = {"GEMINI_RPM": "1", "GEMINI_QUOTA_WINDOW_S": "30", "GEMINI_API_KEYS": "key-a@proj-a"}
    async with make_rig(res, config, **env) as rig:
        items = await rig.batch([rig.image(i) for i in range(3)])
        running = asyncio.ensure_future(rig.run(items))
        await wait_for(lambda: asyncio.sleep(0, result=len(rig.sent()) == 1))
        await ledger.pause_batch(res.pool, uuid.UUID(items[0].task.batch_id), "paused by user")
        await control.set_halted(res.redis, res.keys, items[0].task.batch_id, "paused")
        results = await running
        assert len(rig.sent()) == 1
    assert sorted(r.status for r in results) == ["requeued", "requeued", "succeeded"]
