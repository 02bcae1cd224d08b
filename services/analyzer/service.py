"""The analyzer service: one AnalyzeTask in, the item's result out.

The image comes from Redis by reference (the fetcher stored it). If it expired before the
analyzer got to it, the item goes back to the fetch stream rather than failing.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence

from prometheus_client import Histogram

from imagestream.common import messages
from imagestream.common.connections import Resources
from imagestream.common.control import BatchConfig, BatchConfigs
from imagestream.common.errors import ErrorClass, ItemError
from imagestream.common.keys import GROUPS
from imagestream.common.metrics import ITEM_OUTCOMES
from imagestream.common.settings import StreamSettings
from imagestream.common.worker import Out, StreamWorker, out

from .providers import LocalProvider, Provider

log = logging.getLogger(__name__)

ANALYZE_SECONDS = Histogram(
    "imagestream_analyze_duration_seconds",
    "Time to analyze one image, by analyzer.",
    ["analyzer"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


class AnalyzerSettings(StreamSettings, kw_only=True, frozen=True):
    #: Images analyzed at once by one process.
    analyze_concurrency: int = 8
    #: Threads for the local analyzer (0 = one per core).
    analyze_threads: int = 0


class Analyzer:
    def __init__(
        self, res: Resources, settings: AnalyzerSettings, providers: dict[str, Provider]
    ) -> None:
        self.res = res
        self.settings = settings
        self.configs = BatchConfigs(res.pool)
        self.providers = providers
        self._columns_recorded: set[str] = set()

    def _result(self, task: messages.AnalyzeTask, error: ItemError) -> Out:
        ITEM_OUTCOMES.labels("analyzer", "failed", error.error_class).inc()
        return out(
            self.res.keys.write,
            messages.ItemResult(
                batch_id=task.batch_id,
                item_id=task.item_id,
                status="failed",
                stage="analyzer",
                error_class=error.error_class.value,
                error_message=error.message,
            ),
        )

    async def handle(self, task: messages.AnalyzeTask) -> Sequence[Out]:
        config = await self.configs.get(task.batch_id)
        if config is None:
            return []  # the batch was deleted
        provider = self.providers.get(config.analyzer)
        if provider is None:
            return [
                self._result(
                    task,
                    ItemError(
                        ErrorClass.ANALYZER_ERROR,
                        f"analyzer {config.analyzer!r} is not available here",
                    ),
                )
            ]
        data: bytes | None = await self.res.redis.get(task.blob_key)  # type: ignore[assignment]
        if data is None:
            log.info("image expired before analysis; fetching again", extra={"item": task.item_id})
            ITEM_OUTCOMES.labels("analyzer", "refetch", "").inc()
            return [
                out(
                    self.res.keys.fetch,
                    messages.FetchTask(batch_id=task.batch_id, item_id=task.item_id, url=task.url),
                )
            ]
        await self._record_columns(provider, config)
        try:
            with ANALYZE_SECONDS.labels(provider.name).time():
                analysis = await provider.analyze(data, task.facts, config)
        except ItemError as error:
            return [self._result(task, error)]
        ITEM_OUTCOMES.labels("analyzer", "succeeded", "").inc()
        return [
            out(
                self.res.keys.write,
                messages.ItemResult(
                    batch_id=task.batch_id,
                    item_id=task.item_id,
                    status="succeeded",
                    stage="analyzer",
                    facts=task.facts,
                    analyzer=provider.name,
                    model=analysis.model,
                    analysis=analysis.fields,
                    usage=analysis.usage,
                ),
            )
        ]

    async def _record_columns(self, provider: Provider, config: BatchConfig) -> None:
        """Tell the ledger which analysis fields this batch's exports will show."""
        if config.id in self._columns_recorded:
            return
        await self.res.pool.execute(
            "UPDATE batches SET analysis_columns = $2 WHERE id = $1 AND analysis_columns = '{}'",
            uuid.UUID(config.id),
            provider.columns(config),
        )
        self._columns_recorded.add(config.id)

    def on_dead(self, task: messages.AnalyzeTask | None, reason: str) -> list[Out]:
        if task is None:
            return []
        return [self._result(task, ItemError(ErrorClass.POISON, reason))]


def create_providers(settings: AnalyzerSettings) -> dict[str, Provider]:
    local = LocalProvider(threads=settings.analyze_threads)
    return {local.name: local}


async def run(res: Resources, settings: AnalyzerSettings, stop: asyncio.Event) -> None:
    providers = create_providers(settings)
    analyzer = Analyzer(res, settings, providers)
    worker: StreamWorker[messages.AnalyzeTask] = StreamWorker(
        res.redis,
        res.keys,
        settings,
        stage="analyzer",
        stream=res.keys.analyze,
        group=GROUPS["analyze"],
        decode=messages.analyze_decoder.decode,
        handle=analyzer.handle,
        on_dead=analyzer.on_dead,
        concurrency=settings.analyze_concurrency,
    )
    try:
        await worker.run(stop)
    finally:
        for provider in providers.values():
            await provider.close()
