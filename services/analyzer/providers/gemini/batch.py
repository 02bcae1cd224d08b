"""Gemini's Batch API behind the shared batch-price machinery (``deferred``): a batch with
``mode: batch`` is sent as ``batches.create`` jobs of inline requests (the image, the
prompt, the schema), at half the standard price, answered within hours instead of seconds.

A group is sent when it holds ``GEMINI_BATCH_MAX_REQUESTS`` items, when one more image
would pass Google's 20 MB inline limit, or ``GEMINI_BATCH_LINGER_S`` after its first item;
running jobs are polled every ``GEMINI_BATCH_POLL_S``; a project runs at most
``GEMINI_BATCH_MAX_JOBS`` jobs at once. Each request carries its item id in its metadata,
so the answers of a finished job find their items. What happens around that (the ledger
row, budgets, cancelling, collecting, shutdown) is ``deferred``'s, the same for every
provider.
"""

from __future__ import annotations

from typing import Any

import aiohttp
from google import genai
from google.genai import errors, types
from prometheus_client import Counter

from imagestream.common import messages
from imagestream.common.control import BatchConfig
from imagestream.common.errors import ErrorClass, ItemError

from ...calls import Failure
from ...deferred import BatchJobs, Forgotten, Polled, Prepared
from .provider import GeminiProvider, retry_delay

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


class GeminiJobApi:
    """Gemini's half of ``deferred.JobApi``."""

    name = "gemini"
    label = "Gemini"
    max_job_bytes = MAX_INLINE_BYTES
    poll_errors: tuple[type[BaseException], ...] = (
        errors.APIError,
        aiohttp.ClientError,
        TimeoutError,
    )

    def __init__(self, provider: GeminiProvider) -> None:
        self.provider = provider

    def prepare(self, task: messages.AnalyzeTask, data: bytes, config: BatchConfig) -> Prepared:
        choice = self.provider.choice(config)
        request = self.provider.request(choice, data)
        image, prompt = request["contents"]
        line = types.InlinedRequest(
            contents=[types.Content(role="user", parts=[image, types.Part(text=prompt)])],
            config=request["config"],
            metadata={"item": str(task.item_id)},
        )
        return Prepared(
            model=choice.model,
            profile_key=choice.compiled.key,
            line=line,
            size=len(data) * 4 // 3 + _OVERHEAD_BYTES,
            worst_usd=self.provider.worst_usd(choice, data, "batch"),
        )

    async def create(self, client: genai.Client, model: str, lines: list[Any]) -> str:
        job = await client.aio.batches.create(
            model=model,
            src=lines,
            config=types.CreateBatchJobConfig(display_name=f"imagestream {model}"),
        )
        if not job.name:
            raise ItemError(ErrorClass.ANALYZER_ERROR, "Gemini named no batch job")
        return job.name

    def classify(self, exc: Exception) -> Failure | None:
        if isinstance(exc, errors.APIError):
            if exc.code in (401, 403):
                return Failure("key_rejected", "key_rejected", f"{exc.code} {exc.status}")
            if exc.code == 429:
                return Failure("rate_limited", "waited", "429", delay=retry_delay(exc))
            if exc.code < 500 and exc.code != 408:
                message = f"Gemini refused the batch job: {exc.code} {exc.status}: {exc.message}"
                return Failure("fatal", "rejected", message)
            return Failure("transient", "server_error", f"{exc.code} {exc.status}: {exc.message}")
        if isinstance(exc, TimeoutError | aiohttp.ClientError):
            return Failure("transient", "connection_error", f"connection failed: {exc!r}")
        return None

    async def poll(self, client: genai.Client, name: str) -> Polled:
        try:
            job = await client.aio.batches.get(name=name)
        except errors.ClientError as exc:
            if exc.code != 404:
                raise
            raise Forgotten("Google no longer knows the Gemini batch job (404)") from None
        state = job.state.value if job.state else None
        outcome = _DONE.get(job.state) if job.state else None
        return Polled(state, outcome, _answers_by_item(job) if outcome else {})

    async def cancel(self, client: genai.Client, name: str) -> None:
        await client.aio.batches.cancel(name=name)

    def read(
        self, answer: Any, config: BatchConfig, model: str
    ) -> tuple[dict[str, Any], messages.Usage]:
        if answer.error is not None or answer.response is None:
            code = answer.error.code if answer.error else None
            message = answer.error.message if answer.error else "no answer"
            raise ItemError(
                ErrorClass.ANALYZER_ERROR,
                f"Gemini failed this request of the batch job: {code} {message}",
            )
        choice = self.provider.choice(config, model)
        usage = self.provider.usage_of(answer.response, choice.price, "batch")
        return self.provider.analysis(answer.response, choice, usage), usage

    def cache_key(self, config: BatchConfig) -> tuple[str, str]:
        return self.provider.cache_key(config)


def batch_jobs(provider: GeminiProvider) -> BatchJobs[genai.Client]:
    return provider.batch_jobs(GeminiJobApi(provider), JOBS)


def _answers_by_item(job: types.BatchJob | None) -> dict[int, Any]:
    """The job's answers by item id (each request carried its item in its metadata)."""
    found: dict[int, Any] = {}
    responses = job.dest.inlined_responses if job and job.dest else None
    for answer in responses or []:
        item = (answer.metadata or {}).get("item")
        if item is not None and str(item).isdigit():
            found[int(item)] = answer
    return found
