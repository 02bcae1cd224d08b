"""Running the pipeline's stages inside the test process (fast), with real Redis and
PostgreSQL, for tests of controls and recovery."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

from imagestream.cli import pipeline
from imagestream.common import ledger
from imagestream.common.connections import Resources
from imagestream.ingest.service import ingest_list

FAST = {
    "FETCH_ALLOWED_CIDRS": "127.0.0.1/32",
    "READ_BLOCK_MS": "200",
    "CLAIM_IDLE_MS": "2000",
    "CLAIM_INTERVAL_S": "0.5",
    "DISPATCH_INTERVAL_S": "0.05",
    "RECONCILE_INTERVAL_S": "0.2",
    "FETCH_ATTEMPTS": "1",
    "SHUTDOWN_GRACE_S": "5",
    "METRICS_PORT": "-1",
    "LOCAL_MODELS": "false",  # the content profile's models only where a test asks
}


@contextlib.asynccontextmanager
async def running(res: Resources, **env: str) -> AsyncIterator[asyncio.Event]:
    """ingest, fetcher, analyzer and writer running in this process until the block ends."""
    settings = {**FAST, "REDIS_PREFIX": res.keys.prefix, **env}
    configured = pipeline.load_all(settings, pipeline.PIPELINE)
    stop = asyncio.Event()
    task = asyncio.create_task(pipeline.run_stages(res, configured, stop))
    try:
        yield stop
    finally:
        stop.set()
        await task


async def submit(res: Resources, urls: list[str], **batch: Any) -> uuid.UUID:
    """A batch of these URLs, read into the ledger (as ingest does with an upload)."""
    batch_id = await ledger.create_batch(
        res.pool, ledger.NewBatch(name="test", pipeline=res.keys.prefix, **batch)
    )

    async def chunks() -> AsyncIterator[bytes]:
        yield ("\n".join(urls) + "\n").encode()

    await ingest_list(res, batch_id, chunks(), filename="list.txt")
    return batch_id


async def finished(res: Resources, batch_id: uuid.UUID) -> Any:
    row = await ledger.batch(res.pool, batch_id)
    return row if row["state"] in ledger.FINISHED_BATCH_STATES else None
