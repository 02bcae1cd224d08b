"""One model call under the shared quota, the same loop for every keyed provider.

A call: a slot of this process's adaptive concurrency -> the shared quota admits it into a
project (``limiter``; per provider, project or endpoint, and model) -> a key of that project
(``keypool``) -> the provider's ``send`` -> the answer, or the provider's verdict on what
went wrong (``classify``), each with its own rule:

* rate limited (429): the project and model are backed off for the provider's own retry
  hint (Gemini's ``RetryInfo``, OpenAI's ``retry-after``/``x-ratelimit-reset-*``,
  Anthropic's ``anthropic-ratelimit-*``), shared through Redis, so no replica sends there
  before it ends; the call goes back to the gate, which uses another project meanwhile.
  After ``MAX_RATE_LIMITED`` 429s for one call the item fails as ``rate_limited``.
* key rejected (401/403): the key is quarantined and the call retried with another; with no
  usable key left the batch is paused (``no_usable_<provider>_key``).
* transient (5xx, timeouts, connection errors): retried with exponential back-off and
  jitter up to the provider's ``*_ATTEMPTS``, then the item fails as ``analyzer_error``;
  overload answers (503, 504, timeouts) also halve the concurrency for a while.
* fatal (another 4xx, an unreadable answer): the item fails at once.

The SDKs' own retries are off: they would ignore the server's hint and our quota.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Generic, Literal, TypeVar

import orjson
from prometheus_client import Counter

from imagestream.common.connections import Resources
from imagestream.common.control import BatchConfig, HaltedBatches
from imagestream.common.errors import ErrorClass, ItemError

from .keypool import KeyPool
from .limiter import AdaptiveConcurrency, NeverFits, Project, QuotaGate
from .providers.base import Halted, pause_batch

log = logging.getLogger(__name__)

MAX_RATE_LIMITED = 20

Client = TypeVar("Client")
Answer = TypeVar("Answer")


@dataclass(frozen=True, slots=True)
class Failure:
    """A provider's verdict on an exception of ``send``."""

    kind: Literal["rate_limited", "key_rejected", "transient", "fatal"]
    #: For the metrics' outcome label (rate_limited, server_error, timeout...).
    outcome: str
    message: str
    #: rate_limited: the server's hint in seconds (None: the provider's back-off).
    delay: float | None = None
    #: transient: an overload answer, which halves the concurrency for a while.
    overloaded: bool = False
    #: fatal: the item's error class.
    error_class: ErrorClass = ErrorClass.ANALYZER_ERROR


def quota_rpm(projects: Mapping[str, Project]) -> float:
    """Requests per minute of all projects together (0: some project is unlimited)."""
    rates = [p.limits.rpm for p in projects.values()]
    return float(sum(rates)) if rates and all(rates) else 0.0


def wanted_concurrency(projects: Mapping[str, Project], policy: CallPolicy) -> int:
    """Images an analyzer process holds at once to keep the whole quota busy."""
    rpm = quota_rpm(projects)
    if rpm == 0:  # an unlimited project: as many as one process may send
        return policy.max_inflight
    # Little's law at 6 s per call (latency plus time queued for pacing), at least 16.
    per_second = rpm / policy.window_s
    return max(16, min(policy.max_inflight * 2, math.ceil(per_second * 6)))


@dataclass(frozen=True, slots=True)
class CallPolicy:
    """A provider's quota and retry settings, whatever its variables are called."""

    window_s: float
    margin_s: float
    burst_s: float
    max_inflight: int
    attempts: int
    backoff_s: float


class QuotaCaller(Generic[Client]):
    def __init__(
        self,
        res: Resources,
        provider: str,
        label: str,
        pool: KeyPool[Client],
        *,
        policy: CallPolicy,
        requests: Counter,
    ) -> None:
        """``label`` names the other side in messages ("Gemini", "the server");
        ``requests`` counts calls by project and outcome."""
        self.res = res
        self.provider = provider
        self.label = label
        self.pool = pool
        self.policy = policy
        self.requests = requests
        self.gate = QuotaGate(
            res.redis,
            res.keys,
            provider,
            window_s=policy.window_s,
            margin_s=policy.margin_s,
            burst_s=policy.burst_s,
        )
        self.concurrency = AdaptiveConcurrency(
            rate_per_s=quota_rpm(pool.projects) / policy.window_s, ceiling=policy.max_inflight
        )
        self.halted = HaltedBatches(res.redis, res.keys)
        self.models_used: set[str] = set()
        #: Called with (project, seconds) after each answer (a latency histogram).
        self.on_answer: Callable[[str, float], None] | None = None

    async def call(
        self,
        config: BatchConfig,
        model: str,
        tokens: int,
        send: Callable[[Client], Awaitable[Answer]],
        classify: Callable[[Exception], Failure | None],
    ) -> tuple[Answer, str]:
        """The answer, and the project whose key got it. ``classify`` returns None for an
        exception that is not the provider's (it propagates)."""
        failures = rate_limited = 0
        failure = ""
        while True:
            await self.pool.refresh()
            projects = self.pool.usable_projects()
            if not projects:
                await pause_batch(self.res, config.id, f"no_usable_{self.provider}_key")
                raise Halted("paused", f"every {self.label} API key is quarantined")
            async with self.concurrency.slot():
                try:
                    self.models_used.add(model)
                    project = await self.gate.admit(
                        model, projects, tokens, still_wanted=partial(self._still_wanted, config)
                    )
                except NeverFits as exc:
                    raise ItemError(ErrorClass.ANALYZER_ERROR, str(exc)) from None
                try:
                    key = self.pool.key_for(project)
                except LookupError:
                    continue  # its last key was quarantined while we waited
                started = time.monotonic()
                try:
                    answer = await send(key.client)
                except Exception as exc:
                    verdict = classify(exc)
                    if verdict is None:
                        raise
                else:
                    latency = time.monotonic() - started
                    self.requests.labels(project.name, "ok").inc()
                    self.concurrency.observe(latency)
                    if self.on_answer is not None:
                        self.on_answer(project.name, latency)
                    return answer, project.name
                self.requests.labels(project.name, verdict.outcome).inc()
                if verdict.kind == "rate_limited":
                    rate_limited += 1
                    if rate_limited > MAX_RATE_LIMITED:
                        raise ItemError(
                            ErrorClass.RATE_LIMITED,
                            f"{self.label} answered 429 {rate_limited} times for this image",
                        )
                    delay = verdict.delay or self.policy.backoff_s
                    await self.gate.back_off(project.name, model, delay)
                    log.info(
                        "429 from project %s; backing off %.1f s",
                        project.name,
                        delay,
                        extra={"project": project.name, "model": model, "provider": self.provider},
                    )
                    continue
                if verdict.kind == "key_rejected":
                    await self.pool.quarantine(key, verdict.message)
                    continue
                if verdict.kind == "fatal":
                    raise ItemError(verdict.error_class, verdict.message)
                if verdict.overloaded:
                    self.concurrency.overloaded()
                failure = verdict.message
            failures += 1
            if failures >= self.policy.attempts:
                raise ItemError(
                    ErrorClass.ANALYZER_ERROR, f"{self.label} failed {failures} times: {failure}"
                )
            backoff = min(30.0, self.policy.backoff_s * 2 ** (failures - 1))
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))

    async def _still_wanted(self, config: BatchConfig) -> None:
        """Calls waiting for quota when their batch is paused or cancelled are not sent."""
        state = await self.halted.state(config.id)
        if state is not None:
            raise Halted(state, f"batch {state} while waiting for quota")

    async def publish_status(self, default_model: str, cooling_reason: str) -> None:
        """``{p}:{provider}:status``: key short hash -> JSON (the api's system view reads it).

        Quota is per (project, model): the figures shown are those of the model the project
        used most in the current window (``default_model`` if none)."""
        await self.pool.refresh()
        models = self.models_used or {default_model}
        now = time.time()
        statuses: dict[str, bytes] = {}
        usage_of: dict[str, tuple[str, dict[str, int]]] = {}
        for name in self.pool.projects:
            uses = [(m, await self.gate.usage(name, m)) for m in sorted(models)]
            usage_of[name] = max(uses, key=lambda pair: pair[1]["rpm"])
        for key in self.pool.all_keys():
            project = self.pool.projects[key.project]
            model, used = usage_of[key.project]
            if self.pool.is_quarantined(key):
                state, reason = "quarantined", "the key was refused (401/403)"
            elif used["backoff_ms"]:
                state, reason = "cooling_down", cooling_reason
            else:
                state, reason = "ok", ""
            limits = project.limits
            statuses[key.short] = orjson.dumps(
                {
                    "project": key.project,
                    "model": model,
                    "state": state,
                    "reason": reason,
                    "rpm": {"used": used["rpm"], "limit": limits.rpm},
                    "tpm": {"used": used["tpm"], "limit": limits.tpm},
                    "rpd": {"used": used["rpd"], "limit": limits.rpd},
                    "retry_at": now + used["backoff_ms"] / 1000 if used["backoff_ms"] else None,
                    "updated_at": now,
                }
            )
        name = self.res.keys.key_status(self.provider)
        async with self.res.redis.pipeline(transaction=True) as pipe:
            pipe.hset(name, mapping=statuses)  # type: ignore[arg-type]
            pipe.expire(name, 60)
            await pipe.execute()
