"""Batch-price mode through the emulator: items of a ``mode: batch`` batch are sent as Gemini
Batch API jobs (real google-genai SDK, ``batches.create`` with inline requests), recorded in
the ledger, polled and collected into results at half the price.

The analyzer's own handler sends; ``GeminiBatchJobs.collect`` (what every analyzer replica
runs on a timer) collects; the results are read back from the real write stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from imagestream.analyzer import deferred
from imagestream.analyzer.budget import nano
from imagestream.analyzer.deferred import BatchJobs, ShuttingDown
from imagestream.analyzer.providers.gemini import pricing as gemini_pricing
from imagestream.analyzer.providers.gemini.provider import GeminiProvider
from imagestream.analyzer.service import Analyzer, create_providers
from imagestream.common import control, ledger, messages, pricing, profiles, providers, streams
from imagestream.common.connections import Resources
from imagestream.devtools import corpus
from imagestream.devtools.gemini_server import running_emulator
from imagestream.devtools.imageserver import ImageServer, Reply

from .helpers import wait_for
from .pipeline_harness import finished, running, submit
from .test_gemini_analyzer import (
    MODEL,
    Item,
    Rig,
    analyzer_settings,
    emulator_config,
    make_rig,
    metric,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:Inheritance class AiohttpClientSession from ClientSession:DeprecationWarning"
)

FAST_JOBS = {"GEMINI_BATCH_LINGER_S": "0.2", "GEMINI_BATCH_POLL_S": "0.05"}


def one_project() -> dict[str, str]:
    """One key in a project of its own: the running-jobs limit counts a project's jobs in
    the whole database, and other tests leave jobs running in theirs."""
    return {"GEMINI_API_KEYS": f"key-a@solo-{secrets.token_hex(4)}"}


@contextlib.asynccontextmanager
async def batch_rig(
    res: Resources, pending_s: float = 0.2, running_s: float = 0.2, **env: str
) -> AsyncIterator[Rig]:
    config = emulator_config(batch_pending_seconds=pending_s, batch_running_seconds=running_s)
    async with make_rig(res, config, **{**FAST_JOBS, **env}) as rig:
        yield rig


async def send(rig: Rig, items: Sequence[Item]) -> list[Sequence[object]]:
    return list(await asyncio.gather(*(rig.analyzer.handle(i.task) for i in items)))


async def collect_all(
    analyzer: Analyzer, res: Resources, expected: int, provider: str = "gemini"
) -> list[messages.ItemResult]:
    """Poll until ``expected`` results are in the write stream; record them as the writer does."""
    jobs = analyzer.deferred[provider]
    assert jobs is not None

    async def arrived() -> list[messages.ItemResult] | None:
        await jobs.collect()
        entries = await streams.read_range(res.redis, res.keys.write, "-", 10_000)
        found = [messages.result_decoder.decode(e.payload) for e in entries if e.payload]
        return found if len(found) >= expected else None

    results: list[messages.ItemResult] = await wait_for(arrived)
    async with res.pool.acquire() as conn:
        await ledger.apply_results(conn, results)
    return results


async def jobs_of(res: Resources, batch_id: str) -> list[dict[str, object]]:
    rows = await res.pool.fetch(
        "SELECT name, project, state, job_state, item_ids FROM provider_jobs WHERE batch_id = $1"
        " ORDER BY created_at",
        uuid.UUID(batch_id),
    )
    return [dict(r) for r in rows]


def methods(rig: Rig) -> list[str]:
    return [str(e["method"]) for e in rig.emulator.request_log()]


def billed_usd() -> float:
    """The cost counter, summed over the rigs' two projects."""
    return sum(metric("imagestream_gemini_cost_usd_total", project=p) for p in ("proj-a", "proj-b"))


async def test_items_go_through_one_job_at_half_price(res: Resources) -> None:
    before = billed_usd()
    async with batch_rig(res) as rig:
        items = await rig.batch([rig.image(i) for i in range(3)], mode="batch")
        batch_id = items[0].task.batch_id
        # Sent, not answered: the entries are acknowledged with no output.
        assert await send(rig, items) == [[], [], []]
        (job,) = await jobs_of(res, batch_id)
        assert job["state"] == "running" and sorted(job["item_ids"]) == sorted(  # type: ignore[arg-type]
            i.task.item_id for i in items
        )
        assert methods(rig) == ["batchGenerateContent"]  # one job, no single calls
        # The reconciler leaves the job's items alone, however long Google takes.
        await res.pool.execute(
            "UPDATE items SET dispatched_at = now() - interval '1 day' WHERE batch_id = $1",
            uuid.UUID(batch_id),
        )
        async with res.pool.acquire() as conn:
            assert await ledger.requeue_inflight(conn, res.keys.prefix, older_than_s=3600) == 0
        results = await collect_all(rig.analyzer, res, 3)
        assert {r.item_id for r in results} == {i.task.item_id for i in items}
        price = pricing.price_of(MODEL, gemini_pricing.PRICES)
        for result in results:
            assert result.status == "succeeded" and result.model == MODEL, result
            assert result.analysis and result.analysis["caption"] and not result.cache_hit
            usage = result.usage
            assert usage is not None and usage.input_tokens > 0
            standard = pricing.cost_usd(
                price, input_tokens=usage.input_tokens, output_tokens=usage.output_tokens
            )
            assert usage.cost_usd == pytest.approx(standard / 2)
        (job,) = await jobs_of(res, batch_id)
        assert (job["state"], job["job_state"]) == ("collected", "JOB_STATE_SUCCEEDED")
        batch = await ledger.batch(res.pool, uuid.UUID(batch_id))
        assert batch["succeeded"] == 3
        spent = sum(r.usage.cost_usd for r in results if r.usage)
        assert float(batch["cost_usd"]) == pytest.approx(spent, abs=1e-8)
        assert billed_usd() - before == pytest.approx(spent)  # counted once, by project
        # Collected once: polling again sends nothing more.
        assert (
            rig.analyzer.deferred["gemini"] and await rig.analyzer.deferred["gemini"].collect() == 0
        )
        # The answers are in the cache: the same images in a standard batch cost nothing.
        again = await rig.batch([rig.image(i) for i in range(3)])
        assert all(r.cache_hit and r.usage == messages.Usage() for r in await rig.run(again))
        assert methods(rig).count("generateContent") == 0


async def test_another_replica_collects_a_job_its_sender_left(res: Resources) -> None:
    async with batch_rig(res) as rig:
        items = await rig.batch([rig.image(i) for i in range(2)], mode="batch")
        await send(rig, items)
        # The sender is gone; a fresh analyzer process (same settings) finds the job in the
        # ledger and finishes it.
        settings = analyzer_settings(rig.base_url, res.keys.prefix, **FAST_JOBS)
        providers = create_providers(res, settings)
        try:
            other = Analyzer(res, settings, providers)
            results = await collect_all(other, res, 2)
        finally:
            for provider in providers.values():
                await provider.close()
        assert [r.status for r in results] == ["succeeded", "succeeded"]


async def test_answers_already_paid_for_are_read_with_a_quarantined_key(
    res: Resources,
) -> None:
    async with batch_rig(res) as rig:
        items = await rig.batch([rig.image(i) for i in range(2)], mode="batch")
        await send(rig, items)
        gemini = rig.analyzer.providers["gemini"]
        assert isinstance(gemini, GeminiProvider)
        for key in gemini.pool.all_keys():  # say every key was refused meanwhile
            await gemini.pool.quarantine(key, "403 PERMISSION_DENIED")
        results = await collect_all(rig.analyzer, res, 2)
        assert [r.status for r in results] == ["succeeded", "succeeded"]


async def test_jobs_are_split_at_the_request_limit(res: Resources) -> None:
    async with batch_rig(res, GEMINI_BATCH_MAX_REQUESTS="2") as rig:
        items = await rig.batch([rig.image(i) for i in range(5)], mode="batch")
        await send(rig, items)
        jobs = await jobs_of(res, items[0].task.batch_id)
        assert sorted(len(j["item_ids"]) for j in jobs) == [1, 2, 2]  # type: ignore[arg-type]
        assert methods(rig) == ["batchGenerateContent"] * 3
        results = await collect_all(rig.analyzer, res, 5)
        assert sorted(r.status for r in results) == ["succeeded"] * 5


async def test_a_project_runs_at_most_max_jobs_at_once(res: Resources) -> None:
    # One project (the limit is per project), one image per job.
    env = {**one_project(), "GEMINI_BATCH_MAX_REQUESTS": "1", "GEMINI_BATCH_MAX_JOBS": "1"}
    async with batch_rig(res, **env) as rig:
        items = await rig.batch([rig.image(i) for i in range(2)], mode="batch")
        # One job per image; the second waits for the first to be collected.
        results = await asyncio.gather(send(rig, items), collect_all(rig.analyzer, res, 2))
        assert results[0] == [[], []]
        assert sorted(r.status for r in results[1]) == ["succeeded", "succeeded"]
        rows = await res.pool.fetch(
            "SELECT created_at, finished_at FROM provider_jobs WHERE batch_id = $1"
            " ORDER BY created_at",
            uuid.UUID(items[0].task.batch_id),
        )
        assert len(rows) == 2 and rows[0]["finished_at"] <= rows[1]["created_at"]
        assert methods(rig) == ["batchGenerateContent"] * 2  # waiting sent nothing


async def test_google_refusing_another_job_means_wait_not_fail(res: Resources) -> None:
    waited = metric("imagestream_gemini_batch_jobs_total", event="waited")
    async with batch_rig(res, **one_project(), GEMINI_BATCH_MAX_REQUESTS="1") as rig:
        rig.emulator.update_config({"max_concurrent_batches": 1})
        items = await rig.batch([rig.image(i) for i in range(2)], mode="batch")
        results = await asyncio.gather(send(rig, items), collect_all(rig.analyzer, res, 2))
        assert sorted(r.status for r in results[1]) == ["succeeded", "succeeded"]
        creates = [e for e in rig.emulator.request_log() if e["method"] == "batchGenerateContent"]
        assert [e["status"] for e in creates].count(200) == 2
        assert 429 in [e["status"] for e in creates]  # Google said "not now", and we waited
        assert metric("imagestream_gemini_batch_jobs_total", event="waited") > waited


@contextlib.asynccontextmanager
async def one_job_out_one_waiting(
    res: Resources,
) -> AsyncIterator[tuple[Rig, BatchJobs[Any], list[Item], asyncio.Future[list[Any]]]]:
    """Two images, one job at a time in a project of their own: the first image's job is
    running (for a minute), the second's waits for its turn. Yields the rig, its jobs, the
    items and the gathering of their handlers (exceptions returned)."""
    env = {**one_project(), "GEMINI_BATCH_MAX_REQUESTS": "1", "GEMINI_BATCH_MAX_JOBS": "1"}
    async with batch_rig(res, pending_s=60, running_s=60, **env) as rig:
        jobs = rig.analyzer.deferred["gemini"]
        assert jobs is not None
        items = await rig.batch([rig.image(i) for i in range(2)], mode="batch")
        handled = asyncio.gather(
            *(rig.analyzer.handle(i.task) for i in items), return_exceptions=True
        )

        async def one_sent() -> bool:
            return methods(rig) == ["batchGenerateContent"] and jobs.waiting == 0

        await wait_for(one_sent)
        yield rig, jobs, items, handled


async def test_a_job_waiting_for_its_turn_gives_its_entries_back_at_shutdown(
    res: Resources,
) -> None:
    async with one_job_out_one_waiting(res) as (rig, jobs, _items, handled):
        await jobs.close()
        outcomes = await asyncio.wait_for(handled, timeout=30)
        # One image is in the running job; the other's entry stays pending for redelivery.
        assert sorted(map(repr, outcomes)) == sorted(
            ["[]", repr(ShuttingDown("the analyzer is stopping; the job was not sent"))]
        )
        assert methods(rig) == ["batchGenerateContent"]


async def test_a_group_waiting_for_its_turn_is_not_taken_for_stuck(
    res: Resources, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reconciler re-drives items in flight for over STALE_AFTER_S unless a job holds
    them; a group still waiting to be sent keeps its items' clock reset, or they would be
    sent again in a second job and paid twice."""
    monkeypatch.setattr(deferred, "_ALIVE_EVERY_S", 0.1)
    async with one_job_out_one_waiting(res) as (rig, jobs, items, handled):
        # Both items were dispatched two hours ago: one is in the running job, the other
        # waits for that job to end.
        ids = [i.task.item_id for i in items]
        await res.pool.execute(
            "UPDATE items SET dispatched_at = now() - interval '2 hours' WHERE id = ANY($1)", ids
        )

        async def waiting_one_alive() -> bool:
            alive = await res.pool.fetchval(
                "SELECT count(*) FROM items WHERE id = ANY($1)"
                " AND dispatched_at > now() - interval '1 hour'",
                ids,
            )
            return bool(alive == 1)

        await wait_for(waiting_one_alive, timeout=10, interval=0.05)
        assert await ledger.requeue_inflight(res.pool, res.keys.prefix, older_than_s=3600) == 0
        await jobs.close()
        await asyncio.wait_for(handled, timeout=30)
        assert methods(rig) == ["batchGenerateContent"]


async def test_pausing_a_batch_whose_job_waits_for_its_turn_hands_its_images_back(
    res: Resources,
) -> None:
    env = {**one_project(), "GEMINI_BATCH_MAX_REQUESTS": "1", "GEMINI_BATCH_MAX_JOBS": "1"}
    async with batch_rig(res, pending_s=60, running_s=60, **env) as rig:
        items = await rig.batch([rig.image(i) for i in range(2)], mode="batch")
        handled = asyncio.gather(*(rig.analyzer.handle(i.task) for i in items))

        async def one_sent() -> bool:
            return methods(rig) == ["batchGenerateContent"]

        await wait_for(one_sent)
        batch_id = uuid.UUID(items[0].task.batch_id)
        await control.pause(res.redis, res.keys, res.pool, batch_id, "by a user")
        outcomes = await asyncio.wait_for(handled, timeout=30)
        assert [] in outcomes  # the first went to Google before the pause
        (waiting,) = [o for o in outcomes if o]
        assert messages.result_decoder.decode(waiting[0][1]).status == "requeued"
        assert methods(rig) == ["batchGenerateContent"]


async def test_failed_lines_fail_their_items_and_keep_their_cost(res: Resources) -> None:
    async with batch_rig(res) as rig:
        rig.emulator.queue_outcomes(["500", "invalid_json", "safety"])
        items = await rig.batch([rig.image(i) for i in range(4)], mode="batch")
        await send(rig, items)
        results = {r.item_id: r for r in await collect_all(rig.analyzer, res, 4)}
        (job,) = await jobs_of(res, items[0].task.batch_id)
        order = job["item_ids"]
        assert isinstance(order, list)
        server, invalid, blocked, fine = (results[i] for i in order)
        assert (server.status, server.error_class) == ("failed", "analyzer_error")
        assert "batch job" in (server.error_message or "")
        assert (invalid.status, invalid.error_class) == ("failed", "analyzer_invalid_output")
        assert invalid.usage is not None and invalid.usage.cost_usd > 0  # billed all the same
        assert blocked.status == "succeeded" and blocked.analysis
        assert blocked.analysis["blocked"] is True
        assert fine.status == "succeeded" and fine.analysis and not fine.analysis["blocked"]


async def test_a_job_google_no_longer_knows_fails_its_items(res: Resources) -> None:
    async with batch_rig(res, pending_s=60, running_s=60) as rig:
        items = await rig.batch([rig.image(i) for i in range(2)], mode="batch")
        await send(rig, items)
        (job,) = await jobs_of(res, items[0].task.batch_id)
        key = {"proj-a": "key-a", "proj-b": "key-b"}[str(job["project"])]
        rig.emulator.delete_batch(key, str(job["name"]).removeprefix("batches/"))
        results = await collect_all(rig.analyzer, res, 2)
        assert [(r.status, r.error_class) for r in results] == [("failed", "analyzer_error")] * 2
        assert all("no longer knows" in (r.error_message or "") for r in results)
        (job,) = await jobs_of(res, items[0].task.batch_id)
        assert job["state"] == "collected"


async def test_cancelling_the_batch_cancels_its_running_job(res: Resources) -> None:
    async with batch_rig(res, pending_s=60, running_s=60) as rig:
        items = await rig.batch([rig.image(i) for i in range(2)], mode="batch")
        batch_id = items[0].task.batch_id
        await send(rig, items)
        assert rig.analyzer.deferred["gemini"] is not None
        assert await rig.analyzer.deferred["gemini"].collect() == 0  # still pending at Google
        await control.cancel(res.redis, res.keys, res.pool, uuid.UUID(batch_id))
        results = await collect_all(rig.analyzer, res, 2)
        assert [(r.status, r.error_class) for r in results] == [("cancelled", "cancelled")] * 2
        (job,) = await jobs_of(res, batch_id)
        assert (job["state"], job["job_state"]) == ("collected", "JOB_STATE_CANCELLED")
        batch = await ledger.batch(res.pool, uuid.UUID(batch_id))
        assert batch["state"] == "cancelled" and batch["cancelled"] == 2


async def test_stopping_sends_the_open_group_at_once(res: Resources) -> None:
    async with batch_rig(res, GEMINI_BATCH_LINGER_S="600") as rig:
        jobs = rig.analyzer.deferred["gemini"]
        assert jobs is not None
        items = await rig.batch([rig.image(i) for i in range(2)], mode="batch")
        handled = asyncio.gather(*(rig.analyzer.handle(i.task) for i in items))

        async def both_waiting() -> bool:
            return jobs.waiting == 2

        await wait_for(both_waiting)
        assert methods(rig) == []  # the group waits for more (10 minutes)
        stop = asyncio.Event()
        stop.set()
        await jobs.run(stop)  # what the analyzer does on SIGTERM
        # Sent within the shutdown grace: the entries are acknowledged, not sent again later.
        assert await asyncio.wait_for(handled, timeout=30) == [[], []]
        assert methods(rig) == ["batchGenerateContent"]
        assert jobs.waiting == 0


async def test_the_budget_counts_batch_prices_and_pauses_before_it_is_passed(
    res: Resources,
) -> None:
    async with batch_rig(res) as rig:
        items = await rig.batch([rig.image(i) for i in range(2)], mode="batch", budget_usd=1)
        batch_id = items[0].task.batch_id
        config = await rig.analyzer.configs.get(batch_id)
        gemini = rig.analyzer.providers["gemini"]
        assert config is not None and isinstance(gemini, GeminiProvider)
        worst = gemini.worst_usd(gemini.choice(config), items[0].data, "batch")
        # Room for one image's worst case at the batch price, not for two.
        await res.pool.execute(
            "UPDATE batches SET budget_usd = $2 WHERE id = $1", uuid.UUID(batch_id), worst * 1.5
        )
        assert await rig.analyzer.handle(items[0].task) == []
        (requeued,) = await rig.analyzer.handle(items[1].task)
        assert messages.result_decoder.decode(requeued[1]).status == "requeued"
        paused = await ledger.batch(res.pool, uuid.UUID(batch_id))
        assert (paused["state"], paused["state_reason"]) == ("paused", "budget_reached")
        (result,) = await collect_all(rig.analyzer, res, 1)
        assert result.status == "succeeded" and result.usage is not None
        # The reservation became the real cost.
        budget = await res.redis.hgetall(res.keys.budget(batch_id))
        assert int(budget[b"reserved"]) == 0
        assert int(budget[b"spent"]) == nano(result.usage.cost_usd)
        assert 0 < result.usage.cost_usd <= worst


async def test_a_paused_batch_sends_nothing(res: Resources) -> None:
    async with batch_rig(res) as rig:
        items = await rig.batch([rig.image(1)], mode="batch")
        await control.pause(res.redis, res.keys, res.pool, uuid.UUID(items[0].task.batch_id), "t")
        (outs,) = await send(rig, items)
        assert len(outs) == 1
        assert messages.result_decoder.decode(outs[0][1]).status == "requeued"  # type: ignore[index]
        assert methods(rig) == []


async def test_the_running_pipeline_finishes_a_batch_mode_batch(res: Resources) -> None:
    """All four stages in this process: the analyzer's collector loop finishes the items,
    while the reconciler, told to re-drive whatever is in flight for over 5 s, leaves the
    items of a job that takes Google 8 s alone."""
    seed = secrets.randbits(30)  # new images: no cached analysis from an earlier run
    server = ImageServer(
        {
            f"img/{i}.png": Reply(
                corpus.sample("x", 64, 48, "PNG", seed=seed + i).data, content_type="image/png"
            )
            for i in range(12)
        }
    )
    await server.start()
    config = emulator_config(batch_pending_seconds=4, batch_running_seconds=4)
    try:
        async with running_emulator(config) as (emulator, base_url):
            env = {
                "GEMINI_API_KEYS": "key-a@proj-a,key-b@proj-b",
                "GEMINI_BASE_URL": base_url,
                **{name: "0" for name in ("GEMINI_RPM", "GEMINI_TPM", "GEMINI_RPD")},
                **FAST_JOBS,
                "STALE_AFTER_S": "5",
            }
            async with running(res, **env):
                choice = providers.resolve_batch({"analyzer": "gemini", "mode": "batch"})
                batch_id = await submit(
                    res,
                    [server.url(p) for p in server.routes],
                    analyzer=choice.analyzer,
                    profile=choice.profile,
                    model=choice.model,
                    options=choice.options,
                )
                done = await wait_for(lambda: finished(res, batch_id), timeout=60)
            sent = [str(e["method"]) for e in emulator.request_log()]
        assert done["state"] == "completed" and done["succeeded"] == 12, dict(done)
        assert float(done["cost_usd"]) > 0
        assert set(sent) == {"batchGenerateContent"}
        jobs = await jobs_of(res, str(batch_id))
        assert {j["state"] for j in jobs} == {"collected"}
        in_jobs = [i for j in jobs for i in j["item_ids"]]  # type: ignore[attr-defined]
        items = await res.pool.fetch(
            "SELECT id, attempts FROM items WHERE batch_id = $1 ORDER BY id", batch_id
        )
        # Every item sent in exactly one job, dispatched and fetched once.
        assert sorted(in_jobs) == [r["id"] for r in items]
        assert {r["attempts"] for r in items} == {1}
        assert max(server.hits.values()) == 1 and len(server.hits) == 12
    finally:
        await server.stop()


def test_mode_is_checked_when_the_batch_is_made() -> None:
    chosen = providers.resolve_batch({"analyzer": "gemini", "mode": "batch"})
    assert chosen.options == {"mode": "batch"}
    assert providers.resolve_batch({"analyzer": "gemini", "mode": "standard"}).options == {}
    with pytest.raises(profiles.ProfileError, match=r"needs analyzer .*gemini"):
        providers.resolve_batch({"analyzer": "local", "mode": "batch"})
    with pytest.raises(profiles.ProfileError, match="mode must be one of standard, batch"):
        providers.resolve_batch({"analyzer": "gemini", "mode": "cheap"})
