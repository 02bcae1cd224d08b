"""OpenAI's Batch API behind the shared batch-price machinery (``deferred``): a batch with
``mode: batch`` is sent as JSONL files of chat-completion requests (``files.create`` with
purpose ``batch``, then ``batches.create`` on ``/v1/chat/completions``, a 24 h window), at
half the standard price.

Each line's ``custom_id`` is its item id, so the lines of a job's output file (and of its
error file) find their items. A group is sent when it holds ``OPENAI_BATCH_MAX_REQUESTS``
lines, when one more would pass OpenAI's 200 MB input file limit, or
``OPENAI_BATCH_LINGER_S`` after its first line; running jobs are polled every
``OPENAI_BATCH_POLL_S``; a project runs at most ``OPENAI_BATCH_MAX_JOBS`` jobs at once. A
job that expired still yields the answers it has. Servers that are only
chat-completions-compatible (most self-hosted ones) have no ``/v1/batches``: a batch job
then fails its items with the server's answer (``analyzer_error``), standard mode works.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec
import openai
from openai.types.chat import ChatCompletion
from prometheus_client import Counter

from imagestream.common import messages
from imagestream.common.control import BatchConfig
from imagestream.common.errors import ErrorClass, ItemError

from ...calls import Failure
from ...deferred import BatchJobs, Forgotten, Polled, Prepared
from .provider import ERRORS, OpenAIProvider

JOBS = Counter(
    "imagestream_openai_batch_jobs_total",
    "OpenAI Batch API jobs by event: submitted, waited (a 429 to a new job), then succeeded,"
    " failed, expired or cancelled when collected.",
    ["event"],
)
#: OpenAI's limit of a batch input file.
MAX_FILE_BYTES = 200 * 1024 * 1024
_ENDPOINT: Final = "/v1/chat/completions"
_DONE = {"completed": "succeeded", "failed": "failed", "expired": "expired",
         "cancelled": "cancelled"}  # fmt: skip


class OpenAIJobApi:
    """OpenAI's half of ``deferred.JobApi``."""

    name = "openai"
    label = "OpenAI"
    max_job_bytes = MAX_FILE_BYTES
    poll_errors: tuple[type[BaseException], ...] = (openai.APIError,)

    def __init__(self, provider: OpenAIProvider) -> None:
        self.provider = provider

    def prepare(self, task: messages.AnalyzeTask, data: bytes, config: BatchConfig) -> Prepared:
        choice = self.provider.choice(config)
        line = {
            "custom_id": str(task.item_id),
            "method": "POST",
            "url": _ENDPOINT,
            "body": self.provider.request(choice, data),
        }
        encoded = msgspec.json.encode(line)
        return Prepared(
            model=choice.model,
            profile_key=choice.compiled.key,
            line=encoded,
            size=len(encoded) + 1,
            worst_usd=self.provider.worst_usd(choice, data, "batch"),
        )

    async def create(self, client: openai.AsyncOpenAI, model: str, lines: list[Any]) -> str:
        jsonl = b"\n".join(lines) + b"\n"
        uploaded = await client.files.create(file=("imagestream.jsonl", jsonl), purpose="batch")
        job = await client.batches.create(
            input_file_id=uploaded.id,
            endpoint=_ENDPOINT,
            completion_window="24h",
            metadata={"source": "imagestream", "model": model},
        )
        return job.id

    def classify(self, exc: Exception) -> Failure | None:
        verdict = ERRORS.classify(exc, "OpenAI refused the batch job")
        if verdict is not None and verdict.kind == "rate_limited":
            return Failure("rate_limited", "waited", verdict.message, delay=verdict.delay)
        return verdict

    async def poll(self, client: openai.AsyncOpenAI, name: str) -> Polled:
        try:
            job = await client.batches.retrieve(name)
        except openai.NotFoundError:
            raise Forgotten("OpenAI no longer knows the batch job (404)") from None
        outcome = _DONE.get(job.status)
        if outcome is None:
            return Polled(job.status, None)
        answers: dict[int, Any] = {}
        for file_id in (job.error_file_id, job.output_file_id):  # answers win over errors
            if file_id:
                content = await client.files.content(file_id)
                for raw in content.content.splitlines():
                    if raw.strip():
                        line = msgspec.json.decode(raw)
                        if str(line.get("custom_id", "")).isdigit():
                            answers[int(line["custom_id"])] = line
        return Polled(job.status, outcome, answers)

    async def cancel(self, client: openai.AsyncOpenAI, name: str) -> None:
        await client.batches.cancel(name)

    def read(
        self, answer: Any, config: BatchConfig, model: str
    ) -> tuple[dict[str, Any], messages.Usage]:
        response = answer.get("response") or {}
        error = answer.get("error") or (response.get("body") or {}).get("error")
        if error or response.get("status_code") != 200:
            code = response.get("status_code")
            message = error.get("message") if isinstance(error, dict) else error
            raise ItemError(
                ErrorClass.ANALYZER_ERROR,
                f"OpenAI failed this request of the batch job: {code} {message or 'no answer'}",
            )
        choice = self.provider.choice(config, model)
        try:
            completion = ChatCompletion.model_validate(response["body"])
        except ValueError as exc:
            raise ItemError(
                ErrorClass.ANALYZER_INVALID_OUTPUT, f"not a chat completion: {exc}"
            ) from None
        usage = self.provider.usage_of(completion, choice.price, "batch")
        return self.provider.analysis(completion, choice, usage), usage

    def cache_key(self, config: BatchConfig) -> tuple[str, str]:
        return self.provider.cache_key(config)


def batch_jobs(provider: OpenAIProvider) -> BatchJobs[openai.AsyncOpenAI]:
    return provider.batch_jobs(OpenAIJobApi(provider), JOBS)
