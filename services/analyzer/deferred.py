"""Batch-price mode for every provider with a Batch API: a batch with ``mode: batch`` is
sent as the provider's batch jobs, at half the standard price, answered within hours.

Sending. An item of such a batch is added to the open group of its (batch, model, profile)
as one request line (the provider's ``prepare``), with its worst case reserved in the
batch's budget at the batch price. Its stream entry stays unacknowledged meanwhile. The
group is sent (the provider's ``create``) when it holds ``max_requests`` lines, when one
more would pass the provider's job size limit, or ``linger_s`` after its first line, and
the job is written to the ledger (``provider_jobs``, through ``jobs.JobStore``); only then
are the entries acknowledged, with no output: their items stay ``analyzing``, and the
reconciler leaves items of a running job alone (and those of a group still waiting to
be sent, whose in-flight clock the sender keeps resetting). A group is at most one process's
``ANALYZE_CONCURRENCY`` items, since each holds an entry until it is sent.

Collecting. Every analyzer replica polls the running jobs of its pipeline every
``poll_s`` (the row lock decides who collects a job; the provider's ``poll``). A finished
job's answers are read and validated as a call's are (the provider's ``read``): each item's
result goes to the write stream and its analysis into the cache, the real cost replaces
the reservation, and the job is marked collected, all inside the transaction that holds the
job's row. A crash before the commit sends those results again, which the writer ignores
(the item is already terminal). A job that failed or expired fails its remaining items
(``analyzer_error``; ``replay`` sends them again); a batch cancelled meanwhile has its
running jobs cancelled (the provider's ``cancel``) and their unanswered items cancelled.

What is not covered: a crash between the provider accepting a job and the ledger recording
it leaves that job unrecorded; its entries are delivered again and sent in a new job, so
those images are paid twice (their results are not doubled).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from prometheus_client import Counter

from imagestream.common import ledger, messages, streams
from imagestream.common.connections import Resources
from imagestream.common.control import BatchConfig, BatchConfigs, HaltedBatches
from imagestream.common.errors import ErrorClass, ItemError
from imagestream.common.results import analysis_result, item_result
from imagestream.common.runtime import supervise
from imagestream.common.worker import Out

from .budget import Budgets, Reservation
from .cache import AnalysisCache, ContentKey
from .calls import Failure
from .jobs import JobStore
from .keypool import ApiKey, KeyPool
from .providers.base import Halted, PaidError, pause_batch

log = logging.getLogger(__name__)

#: How often the items of a group waiting to be sent are marked alive (``_alive``).
_ALIVE_EVERY_S = 60.0

Client = TypeVar("Client")
Client_contra = TypeVar("Client_contra", contravariant=True)


class ShuttingDown(Exception):
    pass


class Forgotten(Exception):
    """The provider no longer knows the job (404): its items fail with this reason."""


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """A provider's batch-mode settings, whatever its variables are called."""

    max_requests: int
    linger_s: float
    poll_s: float
    max_jobs: int
    attempts: int
    backoff_s: float


@dataclass(frozen=True, slots=True)
class Prepared:
    """One item's request line, as its provider makes it."""

    model: str
    #: Lines of one batch, model and profile key go in one job.
    profile_key: str
    line: Any
    #: Bytes it adds to the job (for the provider's size limit).
    size: int
    worst_usd: float


@dataclass(frozen=True, slots=True)
class Polled:
    """A running job as the provider reports it."""

    #: The provider's own state name (kept in the ledger row).
    state: str | None
    #: None while it runs; else succeeded, failed, expired or cancelled.
    outcome: str | None
    #: When it ended: each item's answer, by item id.
    answers: dict[int, Any] = field(default_factory=dict)


class JobApi(Protocol[Client_contra]):
    """What a provider's Batch API must do; ``BatchJobs`` does the rest."""

    name: str
    label: str
    #: The most bytes one job may carry.
    max_job_bytes: int
    #: Exceptions of ``poll`` that mean "try again at the next poll".
    poll_errors: tuple[type[BaseException], ...]

    def prepare(self, task: messages.AnalyzeTask, data: bytes, config: BatchConfig) -> Prepared: ...

    async def create(self, client: Client_contra, model: str, lines: list[Any]) -> str:
        """Send a job of these lines; its name."""
        ...

    def classify(self, exc: Exception) -> Failure | None:
        """What an exception of ``create`` means (rate_limited: wait for a turn)."""
        ...

    async def poll(self, client: Client_contra, name: str) -> Polled:
        """The job's state (and answers once ended); Forgotten if the provider lost it."""
        ...

    async def cancel(self, client: Client_contra, name: str) -> None: ...

    def read(
        self, answer: Any, config: BatchConfig, model: str
    ) -> tuple[dict[str, Any], messages.Usage]:
        """An answer's analysis and usage at the batch price (ItemError, PaidError)."""
        ...

    def cache_key(self, config: BatchConfig) -> tuple[str, str]: ...


@dataclass
class _Line:
    task: messages.AnalyzeTask
    line: Any
    size: int
    reservation: Reservation | None
    sent: asyncio.Future[Sequence[Out]]
    taken: bool = False  # in a job being sent


@dataclass
class _Group:
    config: BatchConfig
    model: str
    lines: list[_Line] = field(default_factory=list)
    size: int = 0
    closer: asyncio.TimerHandle | None = None


class BatchJobs(Generic[Client]):
    """The ``Deferred`` of a provider with a Batch API (``providers.base.Deferred``)."""

    def __init__(
        self,
        res: Resources,
        api: JobApi[Client],
        pool: KeyPool[Client],
        policy: BatchPolicy,
        *,
        events: Counter,
        on_billed: Callable[[messages.Usage, str], None] | None = None,
    ) -> None:
        """``events`` counts jobs by event (submitted, waited, then their outcome);
        ``on_billed`` is told what each collected job billed and to which project."""
        self.res = res
        self.api = api
        self.pool = pool
        self.policy = policy
        self.events = events
        self.on_billed = on_billed
        self.budgets = Budgets(res)
        self.configs = BatchConfigs(res.pool)
        self.halted = HaltedBatches(res.redis, res.keys)
        self.cache = AnalysisCache(res)
        self.store = JobStore(res, api.name)
        self._groups: dict[tuple[str, str, str], _Group] = {}
        self._sending: set[asyncio.Task[None]] = set()
        self._closing = asyncio.Event()
        self._one_at_a_time = asyncio.Lock()

    # ------------------------------------------------------------------ sending
    async def submit(
        self, task: messages.AnalyzeTask, data: bytes, config: BatchConfig
    ) -> Sequence[Out]:
        """Add the item to a job; returns when the job is sent (no output: the collector
        makes the item's result) or the item's result if it could not be sent."""
        prepared = self.api.prepare(task, data, config)
        reservation = await self.budgets.reserve_or_pause(config.id, prepared.worst_usd)
        line = _Line(
            task=task,
            line=prepared.line,
            size=prepared.size,
            reservation=reservation,
            sent=asyncio.get_running_loop().create_future(),
        )
        key = (config.id, prepared.model, prepared.profile_key)
        group = self._groups.get(key)
        if group is not None and group.size + line.size > self.api.max_job_bytes:
            self._send_now(key)
            group = None
        if group is None:
            group = self._groups[key] = _Group(config, prepared.model)
            group.closer = asyncio.get_running_loop().call_later(
                self.policy.linger_s, self._send_now, key
            )
        group.lines.append(line)
        group.size += line.size
        if len(group.lines) >= self.policy.max_requests:
            self._send_now(key)
        try:
            return await asyncio.shield(line.sent)
        except asyncio.CancelledError:
            # Shutting down: an item not yet taken stays out of the job (its entry is
            # delivered again) and frees its share of the budget.
            if not line.taken:
                line.sent.cancel()
                await asyncio.shield(self.budgets.settle(reservation, 0.0))
            raise

    def _send_now(self, key: tuple[str, str, str]) -> None:
        group = self._groups.pop(key, None)
        if group is None:
            return
        if group.closer is not None:
            group.closer.cancel()
        task = asyncio.create_task(self._send(group))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, group: _Group) -> None:
        lines = [line for line in group.lines if not line.sent.cancelled()]
        for line in lines:
            line.taken = True
        try:
            if lines:
                await self._send_lines(group, lines)
        except BaseException as exc:
            for line in lines:
                if not line.sent.done():
                    line.sent.set_exception(exc)  # the entries stay pending: sent again later
            if not isinstance(exc, Exception):
                raise
            log.warning("sending a %s batch job failed: %s", self.api.label, exc, exc_info=exc)
            with contextlib.suppress(Exception):  # they reserve again when sent again
                await self._settle(lines, 0.0)

    async def _send_lines(self, group: _Group, lines: list[_Line]) -> None:
        config = group.config
        try:
            # One job at a time from this process, from the count of running jobs to the
            # ledger row, so that the count stays true (replicas may still overshoot by a
            # job each; the provider's 429 then makes the extra one wait).
            async with self._alive([li.task.item_id for li in lines]), self._one_at_a_time:
                name, project = await self._create(config, group.model, [li.line for li in lines])
                await self._record(name, project, group, lines)
        except ItemError as error:
            await self._settle(lines, 0.0)
            for line in lines:
                _resolve(line, [item_result(self.res.keys, "analyzer", line.task, "failed", error)])
            return
        except Halted as stopped:
            await self._settle(lines, 0.0)
            for line in lines:
                _resolve(line, [self._halted_result(line.task, stopped.state)])
            return
        for line in lines:
            _resolve(line, [])

    async def _record(self, name: str, project: str, group: _Group, lines: list[_Line]) -> None:
        await self.store.record(
            name,
            batch_id=group.config.id,
            project=project,
            model=group.model,
            tasks=[line.task for line in lines],
            reserved_nano=sum(line.reservation.amount for line in lines if line.reservation),
        )
        self.events.labels("submitted").inc()
        log.info(
            "%s batch job sent",
            self.api.label,
            extra={"batch": group.config.id, "job": name, "items": len(lines), "project": project},
        )

    @contextlib.asynccontextmanager
    async def _alive(self, item_ids: list[int]) -> AsyncIterator[None]:
        """Until the job is recorded, its items are in no job: the reconciler would take them
        for stuck after STALE_AFTER_S and send them again (paid twice). Waiting for a turn
        may take hours, so their in-flight clock is reset now and every minute meanwhile."""

        async def beat() -> None:
            while True:
                await asyncio.sleep(_ALIVE_EVERY_S)
                await ledger.touch_inflight(self.res.pool, item_ids)

        await ledger.touch_inflight(self.res.pool, item_ids)
        beating = asyncio.create_task(beat())
        try:
            yield
        finally:
            beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beating

    def _halted_result(self, task: messages.AnalyzeTask, state: str) -> Out:
        if state == "paused":
            return item_result(self.res.keys, "analyzer", task, "requeued")
        error = ItemError(ErrorClass.CANCELLED, "batch cancelled")
        return item_result(self.res.keys, "analyzer", task, "cancelled", error)

    async def _settle(self, lines: Sequence[_Line], cost_usd: float) -> None:
        for line in lines:
            await self.budgets.settle(line.reservation, cost_usd)

    async def _create(self, config: BatchConfig, model: str, lines: list[Any]) -> tuple[str, str]:
        """Send the job with a usable key of a project with room for another running job.

        The provider's 429 (too many running jobs, or its batch quota) and a project at
        ``max_jobs`` mean wait, however long: the job goes when one finishes, and meanwhile
        the held entries hold the pipeline back. 5xx and connection errors are retried
        ``attempts`` times; a refused key is quarantined and another used. Returns the
        job's name and the project that holds it."""
        failures = 0
        failure = ""
        while True:
            state = await self.halted.state(config.id)
            if state is not None:  # paused or cancelled while its images gathered or waited
                raise Halted(state, f"batch {state} before its Batch API job was sent")
            await self.pool.refresh()
            projects = self.pool.usable_projects()
            if not projects:
                await pause_batch(self.res, config.id, f"no_usable_{self.api.name}_key")
                raise Halted("paused", f"every {self.api.label} API key is quarantined")
            with_room = await self._with_room([p.name for p in projects])
            if not with_room:
                await self._wait_turn(self.policy.poll_s)
                continue
            chosen = random.choice(with_room)
            project = next(p for p in projects if p.name == chosen)
            key = self.pool.key_for(project)
            try:
                name = await self.api.create(key.client, model, lines)
            except Exception as exc:
                verdict = self.api.classify(exc)
                if verdict is None:
                    raise
                if verdict.kind == "key_rejected":
                    await self.pool.quarantine(key, verdict.message)
                    continue
                if verdict.kind == "rate_limited":
                    self.events.labels("waited").inc()
                    delay = verdict.delay or self.policy.poll_s
                    log.info(
                        "%s refused another batch job for now (429); waiting %.0f s",
                        self.api.label,
                        delay,
                        extra={"project": project.name, "batch": config.id},
                    )
                    await self._wait_turn(delay)
                    continue
                if verdict.kind == "fatal":
                    raise ItemError(verdict.error_class, verdict.message) from None
                failure = verdict.message
            else:
                return name, project.name
            failures += 1
            if failures >= self.policy.attempts:
                raise ItemError(
                    ErrorClass.ANALYZER_ERROR,
                    f"sending the {self.api.label} batch job failed {failures} times: {failure}",
                )
            backoff = min(30.0, self.policy.backoff_s * 2 ** (failures - 1))
            await self._wait_turn(backoff * random.uniform(0.5, 1.0))

    async def _with_room(self, projects: list[str]) -> list[str]:
        """The projects below ``max_jobs`` running jobs (in every pipeline: the limit is
        the project's)."""
        running = await self.store.running_per_project(projects)
        return [p for p in projects if running.get(p, 0) < self.policy.max_jobs]

    async def _wait_turn(self, seconds: float) -> None:
        """Wait before trying again; ShuttingDown if the analyzer is stopping meanwhile (the
        entries are delivered again)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), timeout=seconds)
        if self._closing.is_set():
            raise ShuttingDown("the analyzer is stopping; the job was not sent")

    @property
    def waiting(self) -> int:
        """Requests in groups not sent yet."""
        return sum(len(group.lines) for group in self._groups.values())

    def send_open_groups(self) -> None:
        for key in list(self._groups):
            self._send_now(key)

    async def run(self, stop: asyncio.Event) -> None:
        """Collect ended jobs until ``stop``; then send the open groups at once, so that their
        held entries are acknowledged within the shutdown grace instead of sent again."""
        await supervise(f"{self.api.name}-batch-jobs", self.collect, stop, self.policy.poll_s)
        self.send_open_groups()

    async def close(self) -> None:
        self.send_open_groups()
        self._closing.set()  # jobs waiting for their turn give their entries back
        await asyncio.gather(*self._sending, return_exceptions=True)

    # ------------------------------------------------------------------ collecting
    async def collect(self) -> int:
        """Poll this pipeline's running jobs that are due; collect those that ended.
        Returns how many jobs were collected."""
        names = await self.store.due(self.policy.poll_s * 0.9)
        collected = 0
        for name in names:
            try:
                collected += await self._poll(name)
            except self.api.poll_errors as exc:
                log.warning("polling %s batch job %s failed: %s", self.api.label, name, exc)
        return collected

    async def _poll(self, name: str) -> int:
        async with self.res.pool.acquire() as conn, conn.transaction():
            row = await self.store.lock_running(conn, name)
            if row is None:
                return 0  # collected meanwhile, or another replica holds it
            key = self._key_of(row["project"])
            batch_id = str(row["batch_id"])
            polled: Polled | None = None
            if key is None:
                reason = f"no key of project {row['project']} is configured to collect the job"
            else:
                try:
                    polled = await self.api.poll(key.client, name)
                except Forgotten as exc:
                    reason = str(exc)
            if polled is not None and key is not None:
                reason = f"the {self.api.label} batch job ended {polled.state}"
                if polled.outcome is None:
                    if await self.halted.state(batch_id) == "cancelled":
                        await self.api.cancel(key.client, name)
                    await self.store.polled(conn, name, polled.state)
                    return 0
            outcome = (polled.outcome if polled else None) or "failed"
            tasks = self.store.tasks_of(row)
            answers = polled.answers if polled else {}
            results, billed = await self._results(batch_id, row["model"], tasks, answers, reason)
            await streams.append(self.res.redis, self.res.keys.write, [p for _, p in results])
            await self.store.collected(conn, name, polled.state if polled else None)
        if self.on_billed is not None:
            self.on_billed(billed, row["project"])
        reserved = int(row["reserved_nano"])
        if reserved:
            await self.budgets.settle(
                Reservation(self.res.keys.budget(batch_id), reserved), billed.cost_usd
            )
        self.events.labels(outcome).inc()
        log.info(
            "%s batch job collected",
            self.api.label,
            extra={"batch": batch_id, "job": name, "outcome": outcome, "items": len(tasks)},
        )
        return 1

    def _key_of(self, project: str) -> ApiKey[Client] | None:
        """A key of the job's project (the job is the project's): a usable one if there is
        one, else a quarantined one, which may still read the answers already paid for."""
        keys = [k for k in self.pool.all_keys() if k.project == project]
        usable = [k for k in keys if not self.pool.is_quarantined(k)]
        found = usable or keys
        return found[0] if found else None

    async def _results(
        self,
        batch_id: str,
        model: str,
        tasks: list[messages.AnalyzeTask],
        answers: dict[int, Any],
        reason: str,
    ) -> tuple[list[Out], messages.Usage]:
        """Each item's result, and what the job billed in all."""
        billed = messages.Usage()
        config = await self.configs.get(batch_id)
        if config is None:
            return [], billed  # the batch was deleted
        cancelled = await self.halted.state(batch_id) == "cancelled"
        results: list[Out] = []
        for task in tasks:
            answer = answers.get(task.item_id)
            try:
                if answer is None:
                    if cancelled:
                        raise ItemError(ErrorClass.CANCELLED, "batch cancelled")
                    raise ItemError(ErrorClass.ANALYZER_ERROR, reason)
                analysis, usage = self.api.read(answer, config, model)
            except ItemError as error:
                paid = error.usage if isinstance(error, PaidError) else None
                billed = _sum(billed, paid) if paid else billed
                status: messages.ItemStatus = (
                    "cancelled" if error.error_class == ErrorClass.CANCELLED else "failed"
                )
                failed = item_result(self.res.keys, "analyzer", task, status, error, usage=paid)
                results.append(failed)
                continue
            billed = _sum(billed, usage)
            content = ContentKey(task.facts.sha256, self.api.name, *self.api.cache_key(config))
            await self.cache.put(content, analysis, usage)
            results.append(
                analysis_result(
                    self.res.keys,
                    task,
                    analyzer=self.api.name,
                    model=model,
                    analysis=analysis,
                    usage=usage,
                )
            )
        return results, billed


def _sum(a: messages.Usage, b: messages.Usage) -> messages.Usage:
    return messages.Usage(
        input_tokens=a.input_tokens + b.input_tokens,
        output_tokens=a.output_tokens + b.output_tokens,
        thought_tokens=a.thought_tokens + b.thought_tokens,
        cached_tokens=a.cached_tokens + b.cached_tokens,
        cost_usd=a.cost_usd + b.cost_usd,
    )


def _resolve(line: _Line, outs: Sequence[Out]) -> None:
    if not line.sent.done():  # not cancelled by a shutdown meanwhile
        line.sent.set_result(outs)
