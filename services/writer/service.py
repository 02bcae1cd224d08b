"""The writer service: item results in, ledger rows out, in bulk.

It reads up to ``WRITE_BULK_SIZE`` results at a time and records them in one
transaction (result rows through COPY + upsert, item transitions, batch counters). A bulk
that fails is retried item by item, so one bad result cannot hold the others back: only
it stays pending, to be redelivered and eventually dead-lettered.

Beside it, off that path, one writer process of the deployment (by lease) groups the new
results into near-duplicate groups every second (imagestream.common.duplicates).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from prometheus_client import Counter

from imagestream.common import duplicates, ledger, messages
from imagestream.common.connections import Resources
from imagestream.common.errors import ErrorClass, ItemError
from imagestream.common.keys import GROUPS
from imagestream.common.metrics import ITEM_OUTCOMES
from imagestream.common.results import item_result
from imagestream.common.settings import StreamSettings
from imagestream.common.worker import Out, StreamWorker

log = logging.getLogger(__name__)

ROWS = Counter("imagestream_writer_transitions_total", "Item state changes recorded by the writer.")


class WriterSettings(StreamSettings, kw_only=True, frozen=True):
    write_bulk_size: int = 500


class Writer:
    def __init__(self, res: Resources) -> None:
        self.res = res

    async def handle_bulk(
        self, results: list[messages.ItemResult]
    ) -> list[Sequence[Out] | BaseException]:
        try:
            await self._apply(results)
            return [() for _ in results]
        except Exception as exc:
            if len(results) == 1:
                return [exc]
            log.warning("bulk write failed; writing one by one: %s", exc)
        outcome: list[Sequence[Out] | BaseException] = []
        for result in results:
            try:
                await self._apply([result])
                outcome.append(())
            except Exception as exc:
                outcome.append(exc)
        return outcome

    async def _apply(self, results: list[messages.ItemResult]) -> None:
        async with self.res.pool.acquire() as conn:
            moved = await ledger.apply_results(conn, results)
        ROWS.inc(moved)
        for result in results:
            ITEM_OUTCOMES.labels("writer", result.status, result.error_class or "").inc()

    def on_dead(self, result: messages.ItemResult | None, reason: str) -> list[Out]:
        # A result the ledger keeps refusing is replaced by a plain failure (which carries
        # nothing that could be refused again); a failure that itself fails stops here.
        if result is None or result.error_class == ErrorClass.POISON:
            return []
        error = ItemError(ErrorClass.POISON, reason[:500])
        return [item_result(self.res.keys, "writer", result, "failed", error)]


async def run(res: Resources, settings: WriterSettings, stop: asyncio.Event) -> None:
    writer = Writer(res)
    worker: StreamWorker[messages.ItemResult] = StreamWorker(
        res.redis,
        res.keys,
        settings,
        stage="writer",
        stream=res.keys.write,
        group=GROUPS["write"],
        decode=messages.result_decoder.decode,
        handle_bulk=writer.handle_bulk,
        on_dead=writer.on_dead,
        bulk_size=settings.write_bulk_size,
    )
    grouper = duplicates.Grouper(
        res.pool, res.redis, res.keys, res.keys.prefix, settings.duplicate_max_distance
    )
    await asyncio.gather(worker.run(stop), grouper.run(stop))
