"""Anthropic's Message Batches behind the shared batch-price machinery (``deferred``): a
batch with ``mode: batch`` is sent as ``messages.batches.create`` jobs of the same
requests a call sends (``custom_id`` = the item), at half the standard price, answered
within 24 hours.

A group is sent when it holds ``ANTHROPIC_BATCH_MAX_REQUESTS`` requests, when one more
would pass Anthropic's 256 MB limit of a batch, or ``ANTHROPIC_BATCH_LINGER_S`` after its
first; running batches are polled every ``ANTHROPIC_BATCH_POLL_S``; a project runs at most
``ANTHROPIC_BATCH_MAX_JOBS`` at once. An ended batch's results (JSONL, in any order) find
their items by ``custom_id``: ``succeeded`` is read as a call's answer, ``errored`` fails
the item with Anthropic's error, ``canceled`` cancels it, ``expired`` fails it.
"""

from __future__ import annotations

from typing import Any

import anthropic
import msgspec
from anthropic.types.messages import MessageBatchIndividualResponse
from prometheus_client import Counter

from imagestream.common import messages
from imagestream.common.control import BatchConfig
from imagestream.common.errors import ErrorClass, ItemError

from ...calls import Failure
from ...deferred import BatchJobs, Forgotten, Polled, Prepared
from .provider import ERRORS, AnthropicProvider

JOBS = Counter(
    "imagestream_anthropic_batch_jobs_total",
    "Anthropic Message Batches by event: submitted, waited (a 429 to a new batch), then"
    " succeeded or cancelled when collected.",
    ["event"],
)
#: Anthropic's limit of one Message Batch.
MAX_BATCH_BYTES = 256 * 1024 * 1024


class AnthropicJobApi:
    """Anthropic's half of ``deferred.JobApi``."""

    name = "anthropic"
    label = "Anthropic"
    max_job_bytes = MAX_BATCH_BYTES
    poll_errors: tuple[type[BaseException], ...] = (anthropic.APIError,)

    def __init__(self, provider: AnthropicProvider) -> None:
        self.provider = provider

    def prepare(self, task: messages.AnalyzeTask, data: bytes, config: BatchConfig) -> Prepared:
        choice = self.provider.choice(config)
        line = {"custom_id": str(task.item_id), "params": self.provider.request(choice, data)}
        return Prepared(
            model=choice.model,
            profile_key=choice.compiled.key,
            line=line,
            size=len(msgspec.json.encode(line)) + 1,
            worst_usd=self.provider.worst_usd(choice, data, "batch"),
        )

    async def create(self, client: anthropic.AsyncAnthropic, model: str, lines: list[Any]) -> str:
        job = await client.messages.batches.create(requests=lines)
        return job.id

    def classify(self, exc: Exception) -> Failure | None:
        verdict = ERRORS.classify(exc, "Anthropic refused the Message Batch")
        if verdict is not None and verdict.kind == "rate_limited":
            return Failure("rate_limited", "waited", verdict.message, delay=verdict.delay)
        return verdict

    async def poll(self, client: anthropic.AsyncAnthropic, name: str) -> Polled:
        try:
            job = await client.messages.batches.retrieve(name)
        except anthropic.NotFoundError:
            raise Forgotten("Anthropic no longer knows the Message Batch (404)") from None
        if job.processing_status != "ended":
            return Polled(job.processing_status, None)
        answers: dict[int, Any] = {}
        async for line in await client.messages.batches.results(name):
            if line.custom_id.isdigit():
                answers[int(line.custom_id)] = line
        outcome = "cancelled" if job.cancel_initiated_at is not None else "succeeded"
        return Polled(job.processing_status, outcome, answers)

    async def cancel(self, client: anthropic.AsyncAnthropic, name: str) -> None:
        await client.messages.batches.cancel(name)

    def read(
        self, answer: MessageBatchIndividualResponse, config: BatchConfig, model: str
    ) -> tuple[dict[str, Any], messages.Usage]:
        result = answer.result
        if result.type == "canceled":
            raise ItemError(ErrorClass.CANCELLED, "batch cancelled")
        if result.type == "expired":
            raise ItemError(
                ErrorClass.ANALYZER_ERROR, "the Message Batch expired before this request ran"
            )
        if result.type == "errored":
            error = result.error.error
            raise ItemError(
                ErrorClass.ANALYZER_ERROR,
                "Anthropic failed this request of the Message Batch:"
                f" {error.type}: {error.message}",
            )
        choice = self.provider.choice(config, model)
        usage = self.provider.usage_of(result.message, choice.price, "batch")
        return self.provider.analysis(result.message, choice, usage), usage

    def cache_key(self, config: BatchConfig) -> tuple[str, str]:
        return self.provider.cache_key(config)


def batch_jobs(provider: AnthropicProvider) -> BatchJobs[anthropic.AsyncAnthropic]:
    return provider.batch_jobs(AnthropicJobApi(provider), JOBS)
