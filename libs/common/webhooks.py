"""Webhooks: a batch's events (``batch.completed``, ``batch.failed``, ``batch.paused``,
``batch.cancelled``, ``export.completed``) POSTed to its ``webhook_url``, signed the way
Standard Webhooks signs (https://www.standardwebhooks.com/), delivered at least once.

**The outbox.** Events are rows of ``webhook_events``, written by triggers (migration
0011) in the very transaction that changes the batch's or export's state, so a crash or a
Redis loss cannot lose one. ``Deliverer`` (run by every api process, and by ``imagestream
analyze`` for its own run) sends them:

* One process holds an event at a time: it takes a lease (``leased_until``) with ``FOR
  UPDATE SKIP LOCKED``; a process killed mid-send loses the lease after
  ``WEBHOOK_LEASE_S`` and another sends the event again (the same ``webhook-id``, so the
  receiver can drop the repeat). A process that stops gracefully hands its leases back.
* In order per batch: only the oldest pending event of a batch is ever taken, so event
  n + 1 waits until n is delivered (or given up).
* Retried on anything but a 2xx answer (redirects are not followed), after an exponential
  back-off with jitter (``WEBHOOK_RETRY_BASE_S`` doubling up to ``WEBHOOK_RETRY_MAX_S``),
  until ``WEBHOOK_MAX_AGE_S`` (a day) after the event, when it is marked failed. The
  schedule lives in the ledger, not in a process's memory (an in-process retry library
  would forget it at a restart).
* Every attempt is logged in ``webhook_attempts`` (time, duration, HTTP status or error).
* The receiver's address passes the fetcher's guard (guard.py) after DNS, on every
  attempt, unless ``WEBHOOK_ALLOWED_CIDRS`` allows its range.

Signature: ``webhook-signature: v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>``
where ``key`` is the base64-decoded part of the batch's ``whsec_`` secret; the secret is
never logged and never shown by a read.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime
import hashlib
import hmac
import logging
import os
import random
import secrets
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import orjson
from prometheus_client import Counter, Histogram
from yarl import URL

from . import guard

log = logging.getLogger(__name__)

SECRET_PREFIX = "whsec_"  # noqa: S105 - the format's marker, not a secret
EVENT_TYPES = (
    "batch.completed", "batch.failed", "batch.paused", "batch.cancelled", "export.completed",
)  # fmt: skip
MAX_URL = 2000
#: Bytes of a receiver's answer read (and ignored): enough to let the connection be reused.
MAX_ANSWER_BYTES = 64 * 1024

DELIVERIES = Counter(
    "imagestream_webhook_deliveries_total",
    "Webhook delivery attempts, by outcome: delivered (2xx), rejected (another HTTP status),"
    " redirect (3xx, not followed), blocked (address guard), timeout, connection_error,"
    " no_secret.",
    ["outcome"],
)
DELIVERY_SECONDS = Histogram(
    "imagestream_webhook_delivery_duration_seconds",
    "Time of one webhook delivery attempt, until the receiver answered or it failed.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
EVENTS = Counter(
    "imagestream_webhook_events_total",
    "Webhook events finished, by outcome: delivered, or failed (retried for"
    " WEBHOOK_MAX_AGE_S without a 2xx answer).",
    ["outcome"],
)


class WebhookError(ValueError):
    """A webhook URL or secret that cannot be used; the message is one line."""


# ---------------------------------------------------------------- secrets and signatures
def new_secret() -> str:
    """A random secret in the Standard Webhooks form: ``whsec_`` + base64 of 24 bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_`` secret (WebhookError when it is not one)."""
    if not secret.startswith(SECRET_PREFIX):
        raise WebhookError(f"a webhook secret starts with {SECRET_PREFIX} (then base64)")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise WebhookError("a webhook secret is whsec_ followed by base64") from None
    if not 16 <= len(key) <= 64:
        raise WebhookError("a webhook secret's key is 16 to 64 bytes (24 is usual)")
    return key


def sign(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(key: bytes, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(key, message_id, timestamp, body),
        "Content-Type": "application/json",
        "User-Agent": "imagestream-webhooks",
    }


# ---------------------------------------------------------------- targets
async def check_target(url: str, policy: guard.AddressPolicy) -> str:
    """The URL, stripped, if events may be sent there: http(s), and every address its host
    resolves to passes the address guard; WebhookError saying why not."""
    url = url.strip()
    if not url or len(url) > MAX_URL:
        raise WebhookError(f"a webhook URL is an http(s) URL of at most {MAX_URL} characters")
    try:
        parsed = URL(url, encoded=True)
        guard.check_url(parsed, policy)
    except ValueError as exc:
        raise WebhookError(f"unparsable URL ({exc})") from None
    except guard.BlockedAddressError as exc:
        raise WebhookError(str(exc)) from None
    host = parsed.raw_host or ""
    if guard.literal_address(host) is None:
        resolver = guard.GuardedResolver(policy)
        try:
            await resolver.resolve(host, parsed.port or 0, socket.AF_UNSPEC)
        except guard.BlockedAddressError as exc:
            raise WebhookError(str(exc)) from None
        except OSError as exc:
            raise WebhookError(f"{host} does not resolve ({exc.strerror or exc})") from None
        finally:
            await resolver.close()
    return url


# ---------------------------------------------------------------- settings of a deliverer
@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    policy: guard.AddressPolicy
    timeout_s: float = 10.0
    lease_s: float = 60.0
    retry_base_s: float = 5.0
    retry_max_s: float = 3600.0
    max_age_s: float = 86400.0
    concurrency: int = 8
    poll_s: float = 1.0

    def delay_s(self, attempts: int) -> float:
        """Wait before the next attempt after ``attempts`` failed ones: doubling, capped,
        with jitter (half to all of it) so receivers coming back are not hit all at once."""
        ceiling = min(self.retry_max_s, self.retry_base_s * 2.0 ** min(attempts - 1, 40))
        return ceiling * random.uniform(0.5, 1.0)


@dataclass(frozen=True, slots=True)
class Outcome:
    outcome: str
    status: int | None = None
    error: str | None = None

    @property
    def delivered(self) -> bool:
        return self.outcome == "delivered"


# ---------------------------------------------------------------- the ledger
async def claim(
    pool: asyncpg.Pool, pipeline: str, worker: str, limit: int, lease_s: float
) -> list[asyncpg.Record]:
    """Up to ``limit`` due events of ``pipeline``, each the oldest pending one of its batch
    and held by nobody, now leased to ``worker``; with the secret that signs each."""
    return list(
        await pool.fetch(
            """
            WITH picked AS (
                SELECT h.id FROM webhook_events h
                WHERE h.pipeline = $1 AND h.state = 'pending' AND h.next_attempt_at <= now()
                  AND (h.leased_until IS NULL OR h.leased_until < now())
                  AND NOT EXISTS (SELECT 1 FROM webhook_events p
                                  WHERE p.batch_id = h.batch_id AND p.state = 'pending'
                                    AND p.id < h.id)
                ORDER BY h.next_attempt_at, h.id LIMIT $3 FOR UPDATE SKIP LOCKED
            )
            UPDATE webhook_events e
            SET leased_by = $2, leased_until = now() + make_interval(secs => $4)
            FROM picked, batches b
            WHERE e.id = picked.id AND b.id = e.batch_id
            RETURNING e.id, e.message_id, e.batch_id, e.type, e.url, e.payload, e.attempts,
                      b.webhook_secret AS secret
            """,
            pipeline,
            worker,
            limit,
            lease_s,
        )
    )


async def record(
    pool: asyncpg.Pool,
    event: asyncpg.Record,
    *,
    worker: str,
    outcome: Outcome,
    attempted_at: datetime.datetime,
    duration_s: float,
    config: DeliveryConfig,
) -> str | None:
    """Log the attempt and move the event on (delivered, retried later, or failed when it
    is too old or cannot be signed); its new state, or None if this worker no longer held
    it (the lease ran out and another took it)."""
    permanent = outcome.outcome == "no_secret"
    async with pool.acquire() as conn, conn.transaction():
        state: str | None = await conn.fetchval(
            """
            UPDATE webhook_events SET attempts = attempts + 1, leased_by = NULL,
                   leased_until = NULL, last_error = $3,
                   state = CASE WHEN $4 THEN 'delivered'
                                WHEN $5 OR now() >= due_since + make_interval(secs => $6)
                                THEN 'failed' ELSE 'pending' END,
                   next_attempt_at = least(now() + make_interval(secs => $7),
                                           due_since + make_interval(secs => $6))
            WHERE id = $1 AND leased_by = $2 AND state = 'pending'
            RETURNING state
            """,
            event["id"],
            worker,
            None if outcome.delivered else (outcome.error or f"HTTP {outcome.status}"),
            outcome.delivered,
            permanent,
            config.max_age_s,
            config.delay_s(event["attempts"] + 1),
        )
        if state is not None and state != "pending":
            await conn.execute(
                "UPDATE webhook_events SET finished_at = now() WHERE id = $1", event["id"]
            )
        await conn.execute(
            """
            INSERT INTO webhook_attempts (event_id, attempted_at, duration_s, status, error)
            SELECT $1, $2, $3, $4, $5 WHERE EXISTS (SELECT 1 FROM webhook_events WHERE id = $1)
            """,
            event["id"],
            attempted_at,
            duration_s,
            outcome.status,
            outcome.error,
        )
    return state


async def release(pool: asyncpg.Pool, worker: str, event_ids: Sequence[int]) -> None:
    """Hand events back at once (this worker is stopping before their attempt ended)."""
    await pool.execute(
        """
        UPDATE webhook_events SET leased_by = NULL, leased_until = NULL
        WHERE id = ANY($2::bigint[]) AND leased_by = $1 AND state = 'pending'
        """,
        worker,
        list(event_ids),
    )


async def batch_events(
    pool: asyncpg.Pool, batch_id: uuid.UUID, limit: int
) -> list[tuple[asyncpg.Record, list[asyncpg.Record]]]:
    """A batch's events, oldest first, each with its attempts (oldest first)."""
    events = await pool.fetch(
        "SELECT * FROM webhook_events WHERE batch_id = $1 ORDER BY id LIMIT $2", batch_id, limit
    )
    attempts = await pool.fetch(
        """
        SELECT * FROM webhook_attempts WHERE event_id = ANY($1::bigint[]) ORDER BY id
        """,
        [e["id"] for e in events],
    )
    by_event: dict[int, list[asyncpg.Record]] = {e["id"]: [] for e in events}
    for attempt in attempts:
        by_event[attempt["event_id"]].append(attempt)
    return [(e, by_event[e["id"]]) for e in events]


async def redeliver(
    pool: asyncpg.Pool, batch_id: uuid.UUID, event_id: int, pipeline: str
) -> asyncpg.Record | None:
    """Send an event again now (delivered or failed ones too), with a fresh day of
    retries, by the deliverers of ``pipeline``; None if the batch has no such event."""
    row: asyncpg.Record | None = await pool.fetchrow(
        """
        UPDATE webhook_events SET state = 'pending', next_attempt_at = now(),
               due_since = now(), finished_at = NULL, pipeline = $3
        WHERE id = $1 AND batch_id = $2 RETURNING *
        """,
        event_id,
        batch_id,
        pipeline,
    )
    return row


async def hand_over(pool: asyncpg.Pool, batch_id: uuid.UUID, to_pipeline: str) -> int:
    """Give a batch's undelivered events to another pipeline's deliverers (a local run
    that ends before its receiver answered leaves them to the deployment)."""
    status: str = await pool.execute(
        """
        UPDATE webhook_events SET pipeline = $2, leased_by = NULL, leased_until = NULL
        WHERE batch_id = $1 AND state = 'pending'
        """,
        batch_id,
        to_pipeline,
    )
    return int(status.rsplit(maxsplit=1)[-1])


async def pending_count(pool: asyncpg.Pool, batch_id: uuid.UUID) -> int:
    count: int = await pool.fetchval(
        "SELECT count(*) FROM webhook_events WHERE batch_id = $1 AND state = 'pending'", batch_id
    )
    return count


# ---------------------------------------------------------------- delivering
class Deliverer:
    """Delivers the events of one pipeline from the outbox, up to ``concurrency`` at once
    (each of a different batch), looking for due events every ``poll_s`` and whenever an
    attempt ends (the batch's next event may go now)."""

    def __init__(self, pool: asyncpg.Pool, pipeline: str, config: DeliveryConfig) -> None:
        self.pool = pool
        self.pipeline = pipeline
        self.config = config
        self.name = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.wake = asyncio.Event()
        # Strong references: the event loop keeps only weak ones to tasks.
        self.sending: dict[int, asyncio.Task[None]] = {}
        self._loop: asyncio.Task[None] | None = None
        self._http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(
            connector=guard.guarded_connector(self.config.policy, limit=self.config.concurrency),
            timeout=aiohttp.ClientTimeout(total=self.config.timeout_s),
            # No proxy the guard cannot see, no cookies carried from one receiver to another.
            trust_env=False,
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self._loop = asyncio.create_task(self._claim_loop())

    async def stop(self) -> None:
        """Stop taking events; cut the attempts under way short and hand their events back
        (the receiver may have had one: it is sent again, with the same webhook-id)."""
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)
        sending = dict(self.sending)
        for task in sending.values():
            task.cancel()
        await asyncio.gather(*sending.values(), return_exceptions=True)
        if sending:
            with contextlib.suppress(asyncpg.PostgresError, OSError):
                await release(self.pool, self.name, list(sending))
        if self._http is not None:
            await self._http.close()

    async def _claim_loop(self) -> None:
        while True:
            try:
                free = self.config.concurrency - len(self.sending)
                if free > 0:
                    events = await claim(
                        self.pool, self.pipeline, self.name, free, self.config.lease_s
                    )
                    for event in events:
                        self._start(event)
            except (asyncpg.PostgresError, OSError) as exc:
                log.warning("could not look for webhook events: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.config.poll_s)
            self.wake.clear()

    def _start(self, event: asyncpg.Record) -> None:
        event_id: int = event["id"]
        task = asyncio.create_task(self._deliver(event))
        self.sending[event_id] = task

        def ended(done: asyncio.Task[None]) -> None:
            self.sending.pop(event_id, None)
            self.wake.set()
            if not done.cancelled() and (error := done.exception()) is not None:
                # The ledger could not be told; the lease runs out and it is sent again.
                log.error("webhook attempt not recorded: %s", error, extra={"event": event_id})

        task.add_done_callback(ended)

    async def _deliver(self, event: asyncpg.Record) -> None:
        attempted_at = datetime.datetime.now(datetime.UTC)
        started = time.perf_counter()
        outcome = await self.send(event)
        duration = time.perf_counter() - started
        DELIVERIES.labels(outcome.outcome).inc()
        DELIVERY_SECONDS.observe(duration)
        state = await record(
            self.pool,
            event,
            worker=self.name,
            outcome=outcome,
            attempted_at=attempted_at,
            duration_s=duration,
            config=self.config,
        )
        extra = {"event": event["id"], "type": event["type"], "batch": str(event["batch_id"])}
        if state in ("delivered", "failed"):
            EVENTS.labels(state).inc()
        if state == "failed":
            log.warning("webhook event given up: %s", outcome.error or outcome.status, extra=extra)
        elif not outcome.delivered:
            log.info("webhook attempt failed: %s", outcome.error or outcome.status, extra=extra)

    async def send(self, event: asyncpg.Record) -> Outcome:
        """One attempt: POST the event's body, signed, to its URL."""
        assert self._http is not None, "start() first"
        try:
            key = secret_key(event["secret"] or "")
        except WebhookError:  # checked when the batch was made: only a hand-edited row
            return Outcome("no_secret", error="the batch has no usable webhook secret")
        body = orjson.dumps(event["payload"])
        headers = signed_headers(key, event["message_id"], int(time.time()), body)
        try:
            url = URL(event["url"], encoded=True)
            guard.check_url(url, self.config.policy)
            async with self._http.post(
                url, data=body, headers=headers, allow_redirects=False
            ) as answer:
                await answer.content.read(MAX_ANSWER_BYTES)
                status = answer.status
        except guard.BlockedAddressError as exc:
            return Outcome("blocked", error=f"blocked: {exc}")
        except TimeoutError:
            return Outcome("timeout", error=f"no answer within {self.config.timeout_s:g} s")
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            blocked = guard.blocked_cause(exc)
            if blocked is not None:
                return Outcome("blocked", error=f"blocked: {blocked}")
            return Outcome("connection_error", error=_one_line(exc))
        if 200 <= status < 300:
            return Outcome("delivered", status=status)
        if 300 <= status < 400:
            error = f"HTTP {status}: redirects are not followed"
            return Outcome("redirect", status=status, error=error)
        return Outcome("rejected", status=status, error=f"HTTP {status}")

    async def drain(self, batch_id: uuid.UUID, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for a batch's events to be delivered or given up; how
        many are still pending."""
        deadline = time.monotonic() + timeout_s
        while (left := await pending_count(self.pool, batch_id)) and time.monotonic() < deadline:
            self.wake.set()
            await asyncio.sleep(min(0.1, self.config.poll_s))
        return left


def _one_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0] or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def event_json(event: asyncpg.Record, attempts: Sequence[asyncpg.Record]) -> dict[str, Any]:
    """An event and its delivery log as the API shows them (never the secret)."""
    return {
        "id": event["id"],
        "webhook_id": event["message_id"],
        "type": event["type"],
        "state": event["state"],
        "attempts": event["attempts"],
        "next_attempt_at": event["next_attempt_at"].isoformat()
        if event["state"] == "pending"
        else None,
        "last_error": event["last_error"],
        "created_at": event["created_at"].isoformat(),
        "finished_at": event["finished_at"].isoformat() if event["finished_at"] else None,
        "payload": event["payload"],
        "deliveries": [
            {
                "at": a["attempted_at"].isoformat(),
                "duration_s": round(a["duration_s"], 4),
                "status": a["status"],
                "error": a["error"],
            }
            for a in attempts
        ],
    }
