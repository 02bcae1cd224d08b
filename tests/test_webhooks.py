"""Webhooks from the outbox: events written with the state changes that cause them, signed
as Standard Webhooks (checked by the reference verifier), delivered in order per batch to
a receiver on 127.0.0.1 that fails its first answers and is down for a while, retried with
back-off, given up after the maximum age, and sent again (same webhook-id) after the
delivering process died mid-attempt. None of it touches Redis: the outbox and the
deliverer live in PostgreSQL alone, so a Redis loss cannot lose or stall an event."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from standardwebhooks.webhooks import Webhook

from imagestream.common import guard, ledger, webhooks
from imagestream.common.export import jobs

from .helpers import wait_for
from .webhook_receiver import Receiver, receiving

LOOPBACK = guard.AddressPolicy(guard.parse_cidrs(["127.0.0.0/8"]))
FAST = webhooks.DeliveryConfig(
    policy=LOOPBACK, timeout_s=1.0, lease_s=1.5, retry_base_s=0.05, retry_max_s=0.3, poll_s=0.05
)


@contextlib.asynccontextmanager
async def delivering(
    pool: asyncpg.Pool, pipeline: str, config: webhooks.DeliveryConfig = FAST
) -> AsyncIterator[webhooks.Deliverer]:
    deliverer = webhooks.Deliverer(pool, pipeline, config)
    await deliverer.start()
    try:
        yield deliverer
    finally:
        await deliverer.stop()


async def new_batch(
    pool: asyncpg.Pool, pipeline: str, url: str | None, secret: str, name: str = "hooked"
) -> uuid.UUID:
    return await ledger.create_batch(
        pool,
        ledger.NewBatch(name=name, pipeline=pipeline, webhook_url=url, webhook_secret=secret),
    )


async def complete(pool: asyncpg.Pool, batch_id: uuid.UUID) -> None:
    """An empty list fully read: the batch completes (settle)."""
    await ledger.start_batch(pool, batch_id)
    async with pool.acquire() as conn:
        await ledger.finish_ingest(conn, batch_id, "txt", [])


async def events_of(pool: asyncpg.Pool, batch_id: uuid.UUID) -> list[asyncpg.Record]:
    return list(
        await pool.fetch("SELECT * FROM webhook_events WHERE batch_id = $1 ORDER BY id", batch_id)
    )


def test_signature_is_the_reference_one() -> None:
    secret = webhooks.new_secret()
    body = b'{"type":"batch.completed","data":{"name":"caf\xc3\xa9"}}'
    now = int(datetime.datetime.now(datetime.UTC).timestamp())
    headers = webhooks.signed_headers(webhooks.secret_key(secret), "msg_1", now, body)
    assert Webhook(secret).verify(body, headers)["type"] == "batch.completed"
    expected = Webhook(secret).sign(
        "msg_1", datetime.datetime.fromtimestamp(now, datetime.UTC), body
    )
    assert headers["webhook-signature"] == expected
    with pytest.raises(Exception, match="signature"):
        Webhook(webhooks.new_secret()).verify(body, headers)
    for bad in ("nope", "whsec_!!!", "whsec_" + "QUJD"):
        with pytest.raises(webhooks.WebhookError):
            webhooks.secret_key(bad)


async def test_state_changes_write_their_events(pool: asyncpg.Pool, prefix: str) -> None:
    secret = webhooks.new_secret()
    hooked = await new_batch(pool, prefix, "http://127.0.0.1:9/hooks", secret)
    silent = await new_batch(pool, prefix, None, secret)
    for batch_id in (hooked, silent):
        await ledger.start_batch(pool, batch_id)
        await ledger.pause_batch(pool, batch_id, "budget_reached")
        await ledger.resume_batch(pool, batch_id)
        async with pool.acquire() as conn:
            await ledger.cancel_batch(conn, batch_id)
    failed = await new_batch(pool, prefix, "http://127.0.0.1:9/hooks", secret)
    await ledger.fail_batch(pool, failed, "cannot read the list: 404")
    done = await new_batch(pool, prefix, "http://127.0.0.1:9/hooks", secret)
    await complete(pool, done)
    job = await jobs.create(
        pool, done, "csv", "file:///tmp/x.csv", pipeline=prefix, filters={}, part_rows=None
    )
    claimed = await jobs.claim(pool, "w", 60, prefix)
    assert claimed is not None and claimed["id"] == job["id"]
    assert await jobs.complete(pool, job["id"], "w", rows=0, size=5, files=["file:///tmp/x.csv"])

    assert await events_of(pool, silent) == []
    paused, cancelled = await events_of(pool, hooked)
    assert (paused["type"], cancelled["type"]) == ("batch.paused", "batch.cancelled")
    assert paused["payload"]["data"]["reason"] == "budget_reached"
    assert paused["payload"]["data"]["state"] == "paused"
    assert cancelled["payload"]["data"]["state"] == "cancelled"
    [fail] = await events_of(pool, failed)
    assert fail["type"] == "batch.failed"
    assert fail["payload"]["data"]["reason"] == "cannot read the list: 404"
    completed, exported = await events_of(pool, done)
    assert completed["type"] == "batch.completed" and exported["type"] == "export.completed"
    data = completed["payload"]["data"]
    assert data["batch_id"] == str(done) and data["name"] == "hooked"
    assert data["counts"]["total"] == 0 and data["cost_usd"] == 0
    assert exported["payload"]["data"]["export"]["files"] == ["file:///tmp/x.csv"]
    assert exported["payload"]["type"] == "export.completed"
    assert {e["pipeline"] for e in await events_of(pool, done)} == {prefix}
    assert all(e["state"] == "pending" and e["message_id"].startswith("msg_") for e in [fail])


async def test_every_event_arrives_in_order_through_failures_and_downtime(
    pool: asyncpg.Pool, prefix: str
) -> None:
    secret = webhooks.new_secret()
    receiver = Receiver(secret, fail_first=4)  # not listening yet: down
    batches = [await new_batch(pool, prefix, receiver.url, secret, f"b{i}") for i in range(3)]
    for batch_id in batches:
        await ledger.start_batch(pool, batch_id)
        await ledger.pause_batch(pool, batch_id, "paused by user")
        await ledger.resume_batch(pool, batch_id)
        await ledger.pause_batch(pool, batch_id, "budget_reached")
        await ledger.resume_batch(pool, batch_id)
        await complete(pool, batch_id)
    async with delivering(pool, prefix):
        # Down: attempts fail with connection errors and are retried with back-off.
        await wait_for(lambda: _attempted(pool, batches, 3), timeout=20)
        await receiver.up()
        try:

            async def all_delivered() -> bool:
                counts = [await webhooks.pending_count(pool, b) for b in batches]
                return sum(counts) == 0

            await wait_for(all_delivered, timeout=30)
        finally:
            await receiver.down()
    assert receiver.forged == 0 and receiver.refused == 4
    for batch_id in batches:
        got = [r.body for r in receiver.unique() if r.body["data"]["batch_id"] == str(batch_id)]
        assert [b["type"] for b in got] == [
            "batch.paused", "batch.paused", "batch.completed",
        ]  # fmt: skip
        assert [b["data"]["reason"] for b in got[:2]] == ["paused by user", "budget_reached"]
        rows = await events_of(pool, batch_id)
        assert [r["message_id"] for r in rows] == [
            r.webhook_id for r in receiver.unique() if r.body["data"]["batch_id"] == str(batch_id)
        ]
        assert all(r["state"] == "delivered" and r["finished_at"] for r in rows)
        log = await webhooks.batch_events(pool, batch_id, 10)
        first_attempts = log[0][1]
        assert first_attempts[-1].get("status") == 204
        assert any(a["error"] and a["status"] is None for a in first_attempts)  # down
    # Every event was sent once it was accepted; a 500 or a refused connection is retried.
    assert len(receiver.accepted) == 9


async def _attempted(pool: asyncpg.Pool, batches: list[uuid.UUID], n: int) -> bool:
    count = await pool.fetchval(
        """
        SELECT count(*) FROM webhook_attempts a JOIN webhook_events e ON e.id = a.event_id
        WHERE e.batch_id = ANY($1::uuid[])
        """,
        batches,
    )
    return bool(count >= n)


async def test_an_event_too_old_is_given_up_and_can_be_redelivered(
    pool: asyncpg.Pool, prefix: str
) -> None:
    secret = webhooks.new_secret()
    receiver = Receiver(secret)  # never up until the redelivery
    batch_id = await new_batch(pool, prefix, receiver.url, secret)
    await complete(pool, batch_id)
    short = webhooks.DeliveryConfig(
        policy=LOOPBACK, timeout_s=0.5, lease_s=1, retry_base_s=0.05, retry_max_s=0.1,
        max_age_s=0.6, poll_s=0.05,
    )  # fmt: skip
    async with delivering(pool, prefix, short):

        async def gave_up() -> bool:
            [event] = await events_of(pool, batch_id)
            return bool(event["state"] == "failed")

        await wait_for(gave_up, timeout=20)
        [(event, attempts)] = await webhooks.batch_events(pool, batch_id, 10)
        assert len(attempts) >= 2 and event["attempts"] == len(attempts)
        assert event["last_error"] and all(a["status"] is None for a in attempts)
        await receiver.up()
        try:
            again = await webhooks.redeliver(pool, batch_id, event["id"], prefix)
            assert again is not None and again["state"] == "pending"

            async def arrived() -> bool:
                return len(receiver.accepted) == 1

            await wait_for(arrived, timeout=20)
        finally:
            await receiver.down()
    assert receiver.accepted[0].webhook_id == event["message_id"]
    assert await webhooks.redeliver(pool, uuid.uuid4(), event["id"], prefix) is None


async def test_a_deliverer_that_dies_mid_attempt_loses_nothing(
    pool: asyncpg.Pool, prefix: str
) -> None:
    """The first deliverer is cut off while the receiver holds its request, without
    handing its lease back (as kill -9 would); another sends the event after the lease."""
    secret = webhooks.new_secret()
    async with receiving(secret, hold_first=True) as receiver:
        batch_id = await new_batch(pool, prefix, receiver.url, secret)
        await complete(pool, batch_id)
        first = webhooks.Deliverer(pool, prefix, FAST)
        await first.start()
        await asyncio.wait_for(receiver.held.wait(), 10)
        # Dies: its tasks stop, its connection closes, its lease stays in the ledger.
        assert first._loop is not None and first._http is not None
        first._loop.cancel()
        for task in list(first.sending.values()):
            task.cancel()
        await asyncio.gather(first._loop, *first.sending.values(), return_exceptions=True)
        await first._http.close()
        [event] = await events_of(pool, batch_id)
        assert event["leased_by"] == first.name and event["state"] == "pending"
        async with delivering(pool, prefix):

            async def delivered() -> bool:
                [row] = await events_of(pool, batch_id)
                return bool(row["state"] == "delivered")

            await wait_for(delivered, timeout=20)
        receiver.release.set()
    assert [r.webhook_id for r in receiver.unique()] == [event["message_id"]]


async def test_the_guard_refuses_a_private_receiver(pool: asyncpg.Pool, prefix: str) -> None:
    strict = guard.AddressPolicy()
    for url, why in [
        ("http://127.0.0.1:8080/hooks", "loopback"),
        ("http://localhost:8080/hooks", "non-public"),
        ("http://169.254.169.254/latest", "link-local"),
        ("http://10.1.2.3/hooks", "private"),
        ("ftp://example.org/hooks", "http"),
    ]:
        with pytest.raises(webhooks.WebhookError, match=why):
            await webhooks.check_target(url, strict)
    assert await webhooks.check_target(" http://127.0.0.1:1/h ", LOOPBACK) == "http://127.0.0.1:1/h"
    # At delivery too: a process without the allow-list does not send to loopback.
    secret = webhooks.new_secret()
    async with receiving(secret) as receiver:
        batch_id = await new_batch(pool, prefix, receiver.url, secret)
        await complete(pool, batch_id)
        config = webhooks.DeliveryConfig(
            policy=strict, timeout_s=1, lease_s=2, retry_base_s=5, retry_max_s=5, poll_s=0.05
        )
        async with delivering(pool, prefix, config):

            async def refused() -> bool:
                [(_, attempts)] = await webhooks.batch_events(pool, batch_id, 1)
                return bool(attempts)

            await wait_for(refused, timeout=10)
        [(event, attempts)] = await webhooks.batch_events(pool, batch_id, 1)
    assert attempts[0]["error"].startswith("blocked:") and "loopback" in attempts[0]["error"]
    assert event["state"] == "pending" and receiver.accepted == []
    assert event["url"] == receiver.url


async def test_an_event_that_cannot_be_signed_fails_at_once(
    pool: asyncpg.Pool, prefix: str
) -> None:
    async with receiving(webhooks.new_secret()) as receiver:
        batch_id = await ledger.create_batch(
            pool, ledger.NewBatch(name="unsigned", pipeline=prefix, webhook_url=receiver.url)
        )
        await complete(pool, batch_id)
        async with delivering(pool, prefix):

            async def finished() -> bool:
                [event] = await events_of(pool, batch_id)
                return bool(event["state"] != "pending")

            await wait_for(finished, timeout=10)
    [(event, attempts)] = await webhooks.batch_events(pool, batch_id, 1)
    assert event["state"] == "failed" and len(attempts) == 1
    assert attempts[0]["error"] == "the batch has no usable webhook secret"
    assert receiver.accepted == [] and receiver.forged == 0  # nothing unsigned was sent
