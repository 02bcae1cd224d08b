"""Batch-price mode: a batch with ``mode: batch`` goes through the Gemini Batch API, at half
the standard price, answered within hours instead of seconds.

Sending. An item of such a batch is added to the open group of its (batch, model, profile)
as an inline request (the image, the prompt, the schema), with its worst case reserved in
the batch's budget at the batch price. Its stream entry stays unacknowledged meanwhile. The
group is sent (``client.aio.batches.create`` with the inline requests) when it holds
``GEMINI_BATCH_MAX_REQUESTS`` items, when one more image would pass the 20 MB inline limit,
or ``GEMINI_BATCH_LINGER_S`` after its first item, and the job is written to the ledger
(``provider_jobs``, through ``jobs.JobStore``); only then are the entries acknowledged,
with no output: their items stay ``analyzing``, and the reconciler leaves items of a
running job alone. A group is at most one process's ``ANALYZE_CONCURRENCY`` items, since
each holds an entry until it is sent.

Collecting. Every analyzer replica polls the running jobs of its pipeline every
``GEMINI_BATCH_POLL_S`` (the row lock decides who collects a job). A finished job's answers
are read and validated as a call's are (``gemini.analysis_of``): each item's result goes to
the write stream and its analysis into the cache, the real cost replaces the reservation,
and the job is marked collected, all inside the transaction that holds the job's row. A
crash before the commit sends those results again, which the writer ignores (the item is
already terminal). A job that failed or expired fails its remaining items
(``analyzer_error``; ``replay`` sends them again); a batch cancelled meanwhile has its
running jobs cancelled and their unanswered items cancelled.

What is not covered: a crash between Google accepting a job and the ledger recording it
leaves that job unrecorded; its entries are delivered again and sent in a new job, so those
images are paid twice (their results are not doubled).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp
from google.genai import errors, types
from prometheus_client import Counter

from imagestream.common import messages, pricing, streams
from imagestream.common.connections import Resources
from imagestream.common.control import BatchConfig, BatchConfigs, HaltedBatches
from imagestream.common.errors import ErrorClass, ItemError
from imagestream.common.results import analysis_result, item_result
from imagestream.common.runtime import supervise
from imagestream.common.worker import Out

from ...budget import Reservation
from ...cache import AnalysisCache, ContentKey
from ...jobs import JobStore
from ..base import Halted, PaidError, pause_batch
from . import reply
from .keys import GeminiKey
from .provider import GeminiProvider, analysis_of, count_usage, retry_delay

log = logging.getLogger(__name__)

JOBS = Counter(
    "imagestream_gemini_batch_jobs_total",
    "Gemini Batch API jobs by event: submitted, waited (Google answered 429 to a new job),"
    " then succeeded, failed, expired or cancelled when collected.",
    ["event"],
)
#: Google's limit for a job's inline requests; base64 makes the images a third larger.
MAX_INLINE_BYTES = 20 * 1024 * 1024
_OVERHEAD_BYTES = 4096  # prompt, schema and settings of one request, generously
_DONE = {
    types.JobState.JOB_STATE_SUCCEEDED: "succeeded",
    types.JobState.JOB_STATE_FAILED: "failed",
    types.JobState.JOB_STATE_EXPIRED: "expired",
    types.JobState.JOB_STATE_CANCELLED: "cancelled",
}


class ShuttingDown(Exception):
    pass


def is_batch_mode(config: BatchConfig) -> bool:
    return config.options.get("mode") == "batch"


@dataclass
class _Line:
    task: messages.AnalyzeTask
    request: types.InlinedRequest
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


class GeminiBatchJobs:
    def __init__(self, res: Resources, provider: GeminiProvider) -> None:
        self.res = res
        self.provider = provider
        self.settings = provider.settings
        self.configs = BatchConfigs(res.pool)
        self.halted = HaltedBatches(res.redis, res.keys)
        self.cache = AnalysisCache(res)
        self.store = JobStore(res, provider.name)
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
        request = self.provider.request(data, config)
        reservation = await self.provider.reserve(config, request.worst_usd("batch"))
        line = _Line(
            task=task,
            request=types.InlinedRequest(
                contents=[request.content()],
                config=request.generation,
                metadata={"item": str(task.item_id)},
            ),
            size=len(data) * 4 // 3 + _OVERHEAD_BYTES,
            reservation=reservation,
            sent=asyncio.get_running_loop().create_future(),
        )
        key = (config.id, request.model, request.compiled.key)
        group = self._groups.get(key)
        if group is not None and group.size + line.size > MAX_INLINE_BYTES:
            self._send_now(key)
            group = None
        if group is None:
            group = self._groups[key] = _Group(config, request.model)
            group.closer = asyncio.get_running_loop().call_later(
                self.settings.gemini_batch_linger_s, self._send_now, key
            )
        group.lines.append(line)
        group.size += line.size
        if len(group.lines) >= self.settings.gemini_batch_max_requests:
            self._send_now(key)
        try:
            return await asyncio.shield(line.sent)
        except asyncio.CancelledError:
            # Shutting down: an item not yet taken stays out of the job (its entry is
            # delivered again) and frees its share of the budget.
            if not line.taken:
                line.sent.cancel()
                await asyncio.shield(self.provider.budgets.settle(reservation, 0.0))
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
            log.warning("sending a Gemini batch job failed: %s", exc, exc_info=exc)
            with contextlib.suppress(Exception):  # they reserve again when sent again
                await self._settle(lines, 0.0)

    async def _send_lines(self, group: _Group, lines: list[_Line]) -> None:
        config = group.config
        try:
            # One job at a time from this process, from the count of running jobs to the
            # ledger row, so that the count stays true (replicas may still overshoot by a
            # job each; Google's 429 then makes the extra one wait).
            async with self._one_at_a_time:
                job, project = await self._create(config, group.model, [li.request for li in lines])
                await self._record(job, project, group, lines)
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

    async def _record(
        self, job: types.BatchJob, project: str, group: _Group, lines: list[_Line]
    ) -> None:
        await self.store.record(
            str(job.name),
            batch_id=group.config.id,
            project=project,
            model=group.model,
            tasks=[line.task for line in lines],
            reserved_nano=sum(line.reservation.amount for line in lines if line.reservation),
        )
        JOBS.labels("submitted").inc()
        log.info(
            "Gemini batch job sent",
            extra={
                "batch": group.config.id,
                "job": job.name,
                "items": len(lines),
                "project": project,
            },
        )

    def _halted_result(self, task: messages.AnalyzeTask, state: str) -> Out:
        if state == "paused":
            return item_result(self.res.keys, "analyzer", task, "requeued")
        error = ItemError(ErrorClass.CANCELLED, "batch cancelled")
        return item_result(self.res.keys, "analyzer", task, "cancelled", error)

    async def _settle(self, lines: Sequence[_Line], cost_usd: float) -> None:
        for line in lines:
            await self.provider.budgets.settle(line.reservation, cost_usd)

    async def _create(
        self, config: BatchConfig, model: str, requests: list[types.InlinedRequest]
    ) -> tuple[types.BatchJob, str]:
        """Send the job with a usable key of a project with room for another running job.

        Google's 429 (too many running jobs, or its batch quota) and a project at
        ``GEMINI_BATCH_MAX_JOBS`` mean wait, however long: the job goes when one finishes,
        and meanwhile the held entries hold the pipeline back. 5xx and connection errors are
        retried ``GEMINI_ATTEMPTS`` times; a refused key is quarantined and another used.
        Returns the job and the project that holds it."""
        failures = 0
        while True:
            state = await self.halted.state(config.id)
            if state is not None:  # paused or cancelled while its images gathered or waited
                raise Halted(state, f"batch {state} before its Batch API job was sent")
            await self.provider.pool.refresh()
            projects = self.provider.pool.usable_projects()
            if not projects:
                await pause_batch(self.res, config.id, "no_usable_gemini_key")
                raise Halted("paused", "every Gemini API key is quarantined")
            with_room = await self._with_room([p.name for p in projects])
            if not with_room:
                await self._wait_turn(self.settings.gemini_batch_poll_s)
                continue
            chosen = random.choice(with_room)
            project = next(p for p in projects if p.name == chosen)
            key = self.provider.pool.key_for(project)
            try:
                job = await key.client.aio.batches.create(
                    model=model,
                    src=requests,
                    config=types.CreateBatchJobConfig(display_name=f"imagestream {model}"),
                )
            except errors.APIError as exc:
                if exc.code in (401, 403):
                    await self.provider.pool.quarantine(key, f"{exc.code} {exc.status}")
                    continue
                if exc.code == 429:
                    JOBS.labels("waited").inc()
                    delay = retry_delay(exc) or self.settings.gemini_batch_poll_s
                    log.info(
                        "Gemini refused another batch job for now (429); waiting %.0f s",
                        delay,
                        extra={"project": project.name, "batch": config.id},
                    )
                    await self._wait_turn(delay)
                    continue
                if exc.code < 500 and exc.code != 408:
                    raise ItemError(
                        ErrorClass.ANALYZER_ERROR,
                        f"Gemini refused the batch job: {exc.code} {exc.status}: {exc.message}",
                    ) from None
                failure = f"{exc.code} {exc.status}: {exc.message}"
            except (TimeoutError, aiohttp.ClientError) as exc:
                failure = f"connection failed: {exc!r}"
            else:
                if not job.name:
                    raise ItemError(ErrorClass.ANALYZER_ERROR, "Gemini named no batch job")
                return job, project.name
            failures += 1
            if failures >= self.settings.gemini_attempts:
                raise ItemError(
                    ErrorClass.ANALYZER_ERROR,
                    f"sending the Gemini batch job failed {failures} times: {failure}",
                )
            backoff = min(30.0, self.settings.gemini_backoff_s * 2 ** (failures - 1))
            await self._wait_turn(backoff * random.uniform(0.5, 1.0))

    async def _with_room(self, projects: list[str]) -> list[str]:
        """The projects below GEMINI_BATCH_MAX_JOBS running jobs. Every pipeline's jobs
        count (the limit is the project's), except those sent over two days ago: Google
        has expired them by then, even if no analyzer of their pipeline is left to see it."""
        running = await self.store.running_per_project(projects)
        return [p for p in projects if running.get(p, 0) < self.settings.gemini_batch_max_jobs]

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
        await supervise("gemini-batch-jobs", self.collect, stop, self.settings.gemini_batch_poll_s)
        self.send_open_groups()

    async def close(self) -> None:
        self.send_open_groups()
        self._closing.set()  # jobs waiting for their turn give their entries back
        await asyncio.gather(*self._sending, return_exceptions=True)

    # ------------------------------------------------------------------ collecting
    async def collect(self) -> int:
        """Poll this pipeline's running jobs that are due; collect those that ended.
        Returns how many jobs were collected."""
        names = await self.store.due(self.settings.gemini_batch_poll_s * 0.9)
        collected = 0
        for name in names:
            try:
                collected += await self._poll(name)
            except (errors.APIError, aiohttp.ClientError, TimeoutError) as exc:
                log.warning("polling Gemini batch job %s failed: %s", name, exc)
        return collected

    async def _poll(self, name: str) -> int:
        async with self.res.pool.acquire() as conn, conn.transaction():
            row = await self.store.lock_running(conn, name)
            if row is None:
                return 0  # collected meanwhile, or another replica holds it
            key = self._key_of(row["project"])
            batch_id = str(row["batch_id"])
            job: types.BatchJob | None = None
            if key is None:
                reason = f"no key of project {row['project']} is configured to collect the job"
            else:
                try:
                    job = await key.client.aio.batches.get(name=name)
                except errors.ClientError as exc:
                    if exc.code != 404:
                        raise
                    reason = "Google no longer knows the Gemini batch job (404)"
            job_state = job.state.value if job and job.state else None
            if job is not None and key is not None:
                reason = f"the Gemini batch job ended {job_state}"
                if job.state not in _DONE:
                    if await self.halted.state(batch_id) == "cancelled":
                        await key.client.aio.batches.cancel(name=name)
                    await self.store.polled(conn, name, job_state)
                    return 0
            outcome = _DONE.get(job.state, "failed") if job and job.state else "failed"
            tasks = self.store.tasks_of(row)
            answers = _answers_by_item(job)
            results, billed = await self._results(batch_id, row["model"], tasks, answers, reason)
            await streams.append(self.res.redis, self.res.keys.write, [p for _, p in results])
            await self.store.collected(conn, name, job_state)
        count_usage(billed, row["project"])
        reserved = int(row["reserved_nano"])
        if reserved:
            await self.provider.budgets.settle(
                Reservation(self.res.keys.budget(batch_id), reserved), billed.cost_usd
            )
        JOBS.labels(outcome).inc()
        log.info(
            "Gemini batch job collected",
            extra={"batch": batch_id, "job": name, "outcome": outcome, "items": len(tasks)},
        )
        return 1

    def _key_of(self, project: str) -> GeminiKey | None:
        """A key of the job's project (the job is the project's): a usable one if there is
        one, else a quarantined one, which may still read the answers already paid for."""
        keys = [k for k in self.provider.pool.all_keys() if k.project == project]
        usable = [k for k in keys if not self.provider.pool.is_quarantined(k)]
        found = usable or keys
        return found[0] if found else None

    async def _results(
        self,
        batch_id: str,
        model: str,
        tasks: list[messages.AnalyzeTask],
        answers: dict[int, types.InlinedResponse],
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
                if answer.error is not None or answer.response is None:
                    code = answer.error.code if answer.error else None
                    message = answer.error.message if answer.error else "no answer"
                    raise ItemError(
                        ErrorClass.ANALYZER_ERROR,
                        f"Gemini failed this request of the batch job: {code} {message}",
                    )
                analysis, usage = self._read(answer.response, config, model)
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
            content = ContentKey(task.facts.sha256, "gemini", *self.provider.cache_key(config))
            await self.cache.put(content, analysis, usage)
            results.append(
                analysis_result(
                    self.res.keys,
                    task,
                    analyzer="gemini",
                    model=model,
                    analysis=analysis,
                    usage=usage,
                )
            )
        return results, billed

    def _read(
        self, response: types.GenerateContentResponse, config: BatchConfig, model: str
    ) -> tuple[dict[str, object], messages.Usage]:
        compiled, _ = self.provider.catalog.choose(config.profile, model, self.provider.prices)
        price = pricing.price_of(model, self.provider.prices)
        usage = reply.usage_of(response, price, "batch")
        return analysis_of(response, compiled, model, usage).fields, usage


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


def _answers_by_item(job: types.BatchJob | None) -> dict[int, types.InlinedResponse]:
    """The job's answers by item id (each request carried its item in its metadata)."""
    found: dict[int, types.InlinedResponse] = {}
    responses = job.dest.inlined_responses if job and job.dest else None
    for answer in responses or []:
        item = (answer.metadata or {}).get("item")
        if item is not None and str(item).isdigit():
            found[int(item)] = answer
    return found
