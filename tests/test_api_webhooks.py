"""Webhooks through the api: a batch created with a webhook_url and analyzed by the real
pipeline (local analyzer) ends in a batch.completed event that the receiver verifies with
the reference verifier; its secret is returned once and never by a read; the delivery log
and a redelivery; a token's secret; receivers at private addresses refused at creation;
and an api process killed (kill -9) mid-delivery loses no event."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from imagestream.common import ledger, webhooks
from imagestream.devtools import corpus
from imagestream.devtools.imageserver import ImageServer, Reply

from .apiharness import Api, running_api, upload
from .helpers import wait_for, wait_ready
from .procs import Fleet, free_port, service_env
from .webhook_receiver import Receiver, receiving

SAMPLES = corpus.mixed(4, sizes=((48, 32), (64, 48)), formats=("JPEG", "PNG"), seed=3)
FAST = {
    "WEBHOOK_ALLOWED_CIDRS": "127.0.0.0/8",
    "WEBHOOK_RETRY_BASE_S": "0.05",
    "WEBHOOK_RETRY_MAX_S": "0.3",
    "WEBHOOK_POLL_S": "0.05",
}


@pytest.fixture(scope="module")
async def images() -> AsyncIterator[ImageServer]:
    server = ImageServer({s.name: Reply(s.data) for s in SAMPLES})
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(scope="module")
async def api(redis_url: str, database_url: str, pool: asyncpg.Pool) -> AsyncIterator[Api]:
    async with running_api(redis_url, database_url, pool, stages=True, **FAST) as api:
        yield api


def listing(server: ImageServer) -> bytes:
    return ("url\n" + "".join(server.url(s.name) + "\n" for s in SAMPLES)).encode()


async def call(
    api: Api, method: str, path: str, token: str | None = None, **kwargs: Any
) -> tuple[int, Any]:
    async with (
        api.session(token or api.admin) as http,
        http.request(method, path, **kwargs) as r,
    ):
        return r.status, await r.json()


async def events(api: Api, batch_id: str) -> list[dict[str, Any]]:
    status, body = await call(api, "GET", f"/api/v1/batches/{batch_id}/webhooks", api.viewer)
    assert status == 200, body
    found: list[dict[str, Any]] = body["events"]
    return found


async def test_a_batch_analyzed_by_the_pipeline_ends_in_a_signed_batch_completed(
    api: Api, images: ImageServer
) -> None:
    async with receiving("whsec_" + "A" * 32) as receiver:
        status, created = await upload(
            api, listing(images), batch_name="hooked", webhook_url=receiver.url
        )
        assert status == 201, created
        secret = created["webhook_secret"]
        assert webhooks.secret_key(secret) and created["webhook_url"] == receiver.url
        receiver.secret = secret
        batch_id = created["id"]

        async def delivered() -> list[dict[str, Any]] | None:
            found = await events(api, batch_id)
            return found if found and found[0]["state"] == "delivered" else None

        [event] = await wait_for(delivered, timeout=90)
        [got] = receiver.accepted
        assert got.webhook_id == event["webhook_id"]
        assert got.body == event["payload"] and got.body["type"] == "batch.completed"
        data = got.body["data"]
        assert data["batch_id"] == batch_id and data["name"] == "hooked"
        assert data["state"] == "completed" and data["counts"]["succeeded"] == len(SAMPLES)
        assert data["cost_usd"] == 0
        [attempt] = event["deliveries"]
        assert attempt["status"] == 204 and attempt["error"] is None

        # The secret is never read back.
        for path in (f"/api/v1/batches/{batch_id}", f"/api/v1/batches/{batch_id}/status"):
            status, body = await call(api, "GET", path, api.viewer)
            assert status == 200 and "webhook_secret" not in body
            assert secret not in str(body)
        _, page = await call(api, "GET", "/api/v1/batches?limit=500", api.viewer)
        assert secret not in str(page)

        # Redelivered by an admin: the same webhook-id again.
        path = f"/api/v1/batches/{batch_id}/webhooks/{event['id']}/redeliver"
        status, body = await call(api, "POST", path, api.viewer)
        assert status == 403, body
        status, body = await call(api, "POST", path)
        assert status == 202 and body["state"] == "pending", body
        await wait_for(lambda: _count(receiver, 2), timeout=30)
        assert [r.webhook_id for r in receiver.accepted] == [event["webhook_id"]] * 2
        [again] = await events(api, batch_id)
        assert len(again["deliveries"]) == 2 and again["state"] == "delivered"
        status, body = await call(
            api, "POST", f"/api/v1/batches/{batch_id}/webhooks/99999999/redeliver"
        )
        assert status == 404 and body["error"]["code"] == "not_found"


async def _count(receiver: Receiver, n: int) -> bool:
    return len(receiver.accepted) >= n


async def test_a_tokens_secret_signs_its_batches(api: Api, images: ImageServer) -> None:
    secret = webhooks.new_secret()
    status, token = await call(
        api,
        "POST",
        "/api/v1/tokens",
        json={"name": "hooks", "role": "admin", "webhook_secret": secret},
    )
    assert status == 201, token
    _, listed = await call(api, "GET", "/api/v1/tokens")
    assert [t["has_webhook_secret"] for t in listed["tokens"] if t["id"] == token["id"]] == [True]
    assert secret not in str(listed)
    async with receiving(secret) as receiver:
        status, created = await upload(
            api, listing(images), token=token["token"], webhook_url=receiver.url
        )
        assert status == 201 and "webhook_secret" not in created, created
        await wait_for(lambda: _count(receiver, 1), timeout=90)
    assert receiver.forged == 0 and receiver.accepted[0].body["type"] == "batch.completed"
    status, body = await call(
        api, "POST", "/api/v1/tokens", json={"name": "x", "role": "admin", "webhook_secret": "s"}
    )
    assert status == 400 and body["error"]["message"].startswith("webhook_secret:")


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"webhook_url": "ftp://example.org/hooks"}, "webhook_url: not an http(s) URL"),
        ({"webhook_url": "http://10.0.0.7/hooks"}, "webhook_url: address 10.0.0.7 is not public"),
        ({"webhook_url": "http://[::1]:9/hooks"}, "webhook_url: address ::1 is not public"),
        ({"webhook_url": "http://0x7f.1/hooks"}, "webhook_url: host '0x7f.1' is an integer"),
        ({"webhook_secret": webhooks.new_secret()}, "webhook_secret needs a webhook_url"),
        (
            {"webhook_url": "http://127.0.0.1:9/h", "webhook_secret": "whsec_***"},
            "webhook_secret: a webhook secret is whsec_ followed by base64",
        ),
    ],
)
async def test_bad_webhook_fields_are_refused(
    api: Api, images: ImageServer, fields: dict[str, str], says: str
) -> None:
    status, body = await upload(api, listing(images), **fields)
    assert status == 400, body
    assert body["error"]["message"].startswith(says), body
    assert "\n" not in body["error"]["message"]


async def test_a_name_resolving_to_a_private_address_is_refused(
    redis_url: str, database_url: str, pool: asyncpg.Pool, images: ImageServer
) -> None:
    """Without WEBHOOK_ALLOWED_CIDRS, localhost (127.0.0.1, ::1) is no receiver."""
    async with running_api(redis_url, database_url, pool) as strict:
        status, body = await upload(
            strict, listing(images), webhook_url="http://localhost:8080/hooks"
        )
    assert status == 400, body
    message = body["error"]["message"]
    assert message.startswith("webhook_url: localhost resolves to non-public 127.0.0.1"), message


async def test_the_apis_default_receiver_and_secret(
    redis_url: str, database_url: str, pool: asyncpg.Pool, images: ImageServer
) -> None:
    """WEBHOOK_URL and WEBHOOK_SECRET serve batches that bring neither."""
    secret = webhooks.new_secret()
    async with receiving(secret) as receiver:
        env = FAST | {"WEBHOOK_URL": receiver.url, "WEBHOOK_SECRET": secret}
        async with running_api(redis_url, database_url, pool, **env) as defaults:
            status, created = await upload(defaults, listing(images))
            assert status == 201, created
            assert created["webhook_url"] == receiver.url and "webhook_secret" not in created
            status, body = await call(defaults, "POST", f"/api/v1/batches/{created['id']}/pause")
            assert status == 200 and body["state"] == "paused", body
            await wait_for(lambda: _count(receiver, 1), timeout=30)
    assert receiver.forged == 0
    [got] = receiver.accepted
    assert got.body["type"] == "batch.paused" and got.body["data"]["reason"] == "paused by user"


async def test_an_api_killed_mid_delivery_loses_no_event(
    redis_url: str, database_url: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    prefix = f"hook{uuid.uuid4().hex[:6]}"
    secret = webhooks.new_secret()
    async with receiving(secret, hold_first=True) as receiver:
        batch_ids = []
        for name in ("first", "second"):
            batch_id = await ledger.create_batch(
                pool,
                ledger.NewBatch(
                    name=name, pipeline=prefix, webhook_url=receiver.url, webhook_secret=secret
                ),
            )
            await ledger.start_batch(pool, batch_id)
            await ledger.pause_batch(pool, batch_id, "budget_reached")
            async with pool.acquire() as conn:
                await ledger.cancel_batch(conn, batch_id)
            batch_ids.append(batch_id)
        env = service_env(
            redis_url, database_url, prefix, **FAST, WEBHOOK_TIMEOUT_S="3",
            WEBHOOK_LEASE_S="4", API_HOST="127.0.0.1",
        )  # fmt: skip
        fleet = Fleet(env | {"API_PORT": str(free_port())}, tmp_path)
        victim = fleet.start("api")
        try:
            await asyncio.wait_for(receiver.held.wait(), 60)
            victim.kill()  # kill -9, its attempt under way and its lease in the ledger
            leased = await pool.fetchval(
                "SELECT count(*) FROM webhook_events WHERE leased_by IS NOT NULL"
                " AND state = 'pending' AND batch_id = ANY($1)",
                batch_ids,
            )
            assert leased >= 1
            # The lease outlives the dead process: the next api waits it out, then sends.
            port = free_port()
            fleet.env["API_PORT"] = str(port)
            fleet.start("api")
            await wait_ready(f"http://127.0.0.1:{port}")

            async def all_delivered() -> bool:
                left = [await webhooks.pending_count(pool, b) for b in batch_ids]
                return sum(left) == 0

            await wait_for(all_delivered, timeout=60)
        finally:
            receiver.release.set()
            fleet.stop_all()
    assert receiver.forged == 0
    for batch_id in batch_ids:
        got = [
            r.body["type"] for r in receiver.unique() if r.body["data"]["batch_id"] == str(batch_id)
        ]
        assert got == ["batch.paused", "batch.cancelled"], fleet.logs_text()
