"""The fetcher service: one FetchTask in, an AnalyzeTask (or the item's outcome) out.

The work itself (guarded, polite download; decode, orient, downscale in the decode pool)
is ``ImageLoader`` (loader.py). The analysis-sized image goes to Redis under a
content-addressed key with a TTL; the stream entry carries only that key.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from imagestream.common import messages
from imagestream.common.connections import Resources
from imagestream.common.control import BatchConfigs, HaltedBatches
from imagestream.common.errors import ErrorClass, ItemError
from imagestream.common.keys import GROUPS
from imagestream.common.metrics import ITEM_OUTCOMES
from imagestream.common.results import item_result
from imagestream.common.worker import Out, StreamWorker, out

from .loader import ImageLoader
from .settings import FetcherSettings

__all__ = ["Fetcher", "FetcherSettings", "run"]

log = logging.getLogger(__name__)

#: Bounds of a batch's ``long_side`` option (px).
LONG_SIDE_RANGE = (32, 4096)


class Fetcher:
    def __init__(self, res: Resources, settings: FetcherSettings) -> None:
        self.res = res
        self.settings = settings
        self.halted = HaltedBatches(res.redis, res.keys)
        self.configs = BatchConfigs(res.pool)
        self.loader = ImageLoader(settings)

    async def close(self) -> None:
        await self.loader.close()

    def _result(
        self, task: messages.FetchTask, status: messages.ItemStatus, error: ItemError | None = None
    ) -> Out:
        return item_result(self.res.keys, "fetcher", task, status, error)

    async def handle(self, task: messages.FetchTask) -> Sequence[Out]:
        halted = await self.halted.state(task.batch_id)
        if halted == "paused":
            return [self._result(task, "requeued")]
        if halted == "cancelled":
            return [
                self._result(task, "cancelled", ItemError(ErrorClass.CANCELLED, "batch cancelled"))
            ]
        config = await self.configs.get(task.batch_id)
        if config is None:
            return []  # the batch was deleted
        try:
            long_side = self._long_side(config.options)
            prepared = await self.loader.load(task.url, long_side)
        except ItemError as error:
            status: messages.ItemStatus = (
                "skipped" if error.error_class is ErrorClass.OPTED_OUT else "failed"
            )
            return [self._result(task, status, error)]
        blob_key = self.res.keys.blob(prepared.facts.sha256, long_side)
        await self.res.redis.set(blob_key, prepared.data, ex=self.settings.blob_ttl_s)
        ITEM_OUTCOMES.labels("fetcher", "forwarded", "").inc()
        return [
            out(
                self.res.keys.analyze,
                messages.AnalyzeTask(
                    batch_id=task.batch_id,
                    item_id=task.item_id,
                    url=task.url,
                    facts=prepared.facts,
                    blob_key=blob_key,
                ),
            )
        ]

    def _long_side(self, options: Mapping[str, Any]) -> int:
        """The batch's ``long_side`` option, or ANALYSIS_LONG_SIDE when it has none.

        The api validates the option; a value outside the range here means the ledger was
        written some other way, so the item fails rather than guessing a size.
        """
        value = options.get("long_side")
        if value is None:
            return self.settings.analysis_long_side
        low, high = LONG_SIDE_RANGE
        if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
            return value
        raise ItemError(
            ErrorClass.INTERNAL_ERROR,
            f"batch option long_side={value!r} is not within {low}..{high}",
        )

    def on_dead(self, task: messages.FetchTask | None, reason: str) -> list[Out]:
        if task is None:
            return []
        return [self._result(task, "failed", ItemError(ErrorClass.POISON, reason))]


async def run(res: Resources, settings: FetcherSettings, stop: asyncio.Event) -> None:
    fetcher = Fetcher(res, settings)
    worker: StreamWorker[messages.FetchTask] = StreamWorker(
        res.redis,
        res.keys,
        settings,
        stage="fetcher",
        stream=res.keys.fetch,
        group=GROUPS["fetch"],
        decode=messages.fetch_decoder.decode,
        handle=fetcher.handle,
        on_dead=fetcher.on_dead,
        concurrency=settings.fetch_window,
        high_water=(res.keys.analyze, settings.analyze_high_water),
    )
    try:
        await worker.run(stop)
    finally:
        await fetcher.close()
