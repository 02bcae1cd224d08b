"""The analyzer service: one AnalyzeTask in, the item's result out.

Order of work for an item: a paused batch hands it back (nothing is spent on a paused
batch), a cancelled one cancels it; the analysis cache answers if it can (``cache``), with
duplicates arriving together analyzed once across replicas; otherwise the image comes from
Redis by reference (the fetcher stored it) and the batch's provider analyzes it. If the
image expired before the analyzer got to it, the item goes back to the fetch stream.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
from prometheus_client import Histogram

from imagestream.common import messages, settings
from imagestream.common.connections import Resources
from imagestream.common.control import BatchConfig, BatchConfigs, HaltedBatches
from imagestream.common.errors import ErrorClass, ItemError
from imagestream.common.keys import GROUPS
from imagestream.common.metrics import ITEM_OUTCOMES
from imagestream.common.providers import is_batch_mode, registry
from imagestream.common.results import analysis_result, item_result
from imagestream.common.settings import StreamSettings
from imagestream.common.worker import Out, StreamWorker, out

from .cache import CACHE_LOOKUPS, AnalysisCache, ContentKey
from .providers.base import Analysis, Deferred, Halted, PaidError, Provider

log = logging.getLogger(__name__)

ANALYZE_SECONDS = Histogram(
    "imagestream_analyze_duration_seconds",
    "Time to analyze one image, by analyzer.",
    ["analyzer"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


class AnalyzerSettings(StreamSettings, kw_only=True, frozen=True):
    #: Images one process holds at once (0 = automatic: what the providers configured here
    #: want together, e.g. enough to keep a whole Gemini quota busy, at least 8).
    analyze_concurrency: int = 0
    #: Each registered provider's own settings (its ``load_settings``), by name; filled by
    #: ``load_settings`` below, not from a variable of its own.
    provider_settings: dict[str, Any] = {}

    def concurrency(self) -> int:
        if self.analyze_concurrency > 0:
            return self.analyze_concurrency
        specs = registry()
        wanted = [specs[name].concurrency(s) for name, s in self.provider_settings.items()]
        return max(8, *wanted) if wanted else 8


def load_settings(env: Mapping[str, str] | None = None) -> AnalyzerSettings:
    """The analyzer's settings with those of every registered provider."""
    source = settings.environment() if env is None else env
    base = settings.load(AnalyzerSettings, source)
    loaded = {name: spec.load_settings(source) for name, spec in registry().items()}
    return msgspec.structs.replace(base, provider_settings=loaded)


class Analyzer:
    def __init__(
        self, res: Resources, settings: AnalyzerSettings, providers: dict[str, Provider]
    ) -> None:
        self.res = res
        self.settings = settings
        self.configs = BatchConfigs(res.pool)
        self.halted = HaltedBatches(res.redis, res.keys)
        self.cache = AnalysisCache(res)
        self.providers = providers
        #: The Batch APIs of the providers that have one, by provider name.
        self.deferred: dict[str, Deferred] = {
            name: p.jobs for name, p in providers.items() if p.jobs is not None
        }
        self._columns_recorded: set[str] = set()

    def _result(
        self,
        task: messages.AnalyzeTask,
        status: messages.ItemStatus,
        error: ItemError | None = None,
    ) -> Out:
        # Tokens spent on an item that then failed are still the batch's cost.
        usage = error.usage if isinstance(error, PaidError) else None
        return item_result(self.res.keys, "analyzer", task, status, error, usage=usage)

    def _succeeded(
        self, task: messages.AnalyzeTask, provider: Provider, analysis: Analysis, cache_hit: bool
    ) -> Out:
        return analysis_result(
            self.res.keys,
            task,
            analyzer=provider.name,
            model=analysis.model,
            analysis=analysis.fields,
            usage=analysis.usage,
            cache_hit=cache_hit,
        )

    async def handle(self, task: messages.AnalyzeTask) -> Sequence[Out]:
        halted = await self.halted.state(task.batch_id)
        if halted == "cancelled":
            error = ItemError(ErrorClass.CANCELLED, "batch cancelled")
            return [self._result(task, "cancelled", error)]
        config = await self.configs.get(task.batch_id)
        if config is None:
            return []  # the batch was deleted
        provider = self.providers.get(config.analyzer)
        if provider is None:
            error = ItemError(
                ErrorClass.ANALYZER_ERROR, f"analyzer {config.analyzer!r} is not available here"
            )
            return [self._result(task, "failed", error)]
        if halted == "paused" and provider.paid:
            # Nothing is spent on a paused batch (it may have reached its budget); free
            # work already fetched finishes and is kept.
            return [self._result(task, "requeued")]
        try:
            await self._record_columns(provider, config)
            profile_key, model = provider.cache_key(config)
        except ItemError as error:
            return [self._result(task, "failed", error)]
        key = ContentKey(task.facts.sha256, provider.name, profile_key, model)
        if config.options.get("cache") is False:
            CACHE_LOOKUPS.labels("bypass").inc()
            return await self._analyze(task, provider, config, key)
        cached = await self.cache.get(key)
        if cached is not None:
            CACHE_LOOKUPS.labels("hit").inc()
            return [self._succeeded(task, provider, _from_cache(cached, key), cache_hit=True)]
        if is_batch_mode(config.options):
            # A Batch API job answers within hours: no single-flight lease is held that long.
            CACHE_LOOKUPS.labels("miss").inc()
            return await self._analyze(task, provider, config, key)
        async with self.cache.claim(key) as shared:
            if shared is not None:
                return [self._succeeded(task, provider, _from_cache(shared, key), cache_hit=True)]
            CACHE_LOOKUPS.labels("miss").inc()
            return await self._analyze(task, provider, config, key)

    async def _analyze(
        self, task: messages.AnalyzeTask, provider: Provider, config: BatchConfig, key: ContentKey
    ) -> Sequence[Out]:
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
        try:
            if provider.jobs is not None and is_batch_mode(config.options):
                return await provider.jobs.submit(task, data, config)
            with ANALYZE_SECONDS.labels(provider.name).time():
                analysis = await provider.analyze(data, task.facts, config)
        except ItemError as error:
            return [self._result(task, "failed", error)]
        except Halted as halted:
            if halted.state == "paused":
                return [self._result(task, "requeued")]
            return [self._result(task, "cancelled", ItemError(ErrorClass.CANCELLED, str(halted)))]
        await self.cache.put(key, analysis.fields, analysis.usage)
        return [self._succeeded(task, provider, analysis, cache_hit=False)]

    async def _record_columns(self, provider: Provider, config: BatchConfig) -> None:
        """Tell the ledger which analysis fields this batch's exports will show, and their
        types."""
        if config.id in self._columns_recorded:
            return
        await self.res.pool.execute(
            "UPDATE batches SET analysis_columns = $2, analysis_schema = $3"
            " WHERE id = $1 AND analysis_columns = '{}'",
            uuid.UUID(config.id),
            provider.columns(config),
            provider.schema(config),
        )
        self._columns_recorded.add(config.id)

    def on_dead(self, task: messages.AnalyzeTask | None, reason: str) -> list[Out]:
        if task is None:
            return []
        return [self._result(task, "failed", ItemError(ErrorClass.POISON, reason))]


def _from_cache(fields: dict[str, object], key: ContentKey) -> Analysis:
    # A cache hit costs nothing: zero tokens, zero dollars.
    return Analysis(fields=dict(fields), usage=messages.Usage(), model=key.model or None)


def create_providers(res: Resources, config: AnalyzerSettings) -> dict[str, Provider]:
    """The runtime providers configured here (one without its keys is left out)."""
    made: dict[str, Provider] = {}
    for name, spec in registry().items():
        provider = spec.create(res, config.provider_settings[name])
        if provider is not None:
            made[name] = provider
    return made


async def run(res: Resources, settings: AnalyzerSettings, stop: asyncio.Event) -> None:
    running = create_providers(res, settings)
    analyzer = Analyzer(res, settings, running)
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
        concurrency=settings.concurrency(),
    )
    reporters = [asyncio.create_task(p.report(stop)) for p in running.values()]
    reporters += [asyncio.create_task(jobs.run(stop)) for jobs in analyzer.deferred.values()]
    try:
        for provider in running.values():
            await provider.start()  # models loaded before the first item is taken
        await worker.run(stop)
    finally:
        for reporter in reporters:
            reporter.cancel()
        await asyncio.gather(*reporters, return_exceptions=True)
        for jobs in analyzer.deferred.values():
            await jobs.close()
        for provider in running.values():
            await provider.close()
