"""Running services: one per process (``serve``), or all in one process (``up``, ``analyze``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import msgspec

from imagestream.analyzer import service as analyzer
from imagestream.api import app as api
from imagestream.common import db, settings
from imagestream.common.connections import ConnectError, Resources, open_postgres, open_redis
from imagestream.common.keys import Keys
from imagestream.common.metrics import start_metrics_server
from imagestream.common.observe import Observer
from imagestream.fetcher import service as fetcher
from imagestream.ingest import service as ingest
from imagestream.writer import service as writer

from .embedded import servers

log = logging.getLogger(__name__)

Runner = Callable[[Resources, Any, asyncio.Event], Coroutine[Any, Any, None]]


@dataclass(frozen=True)
class Stage:
    #: The stage's settings from the environment (settings.SettingsError when invalid).
    load: Callable[[Mapping[str, str]], Any]
    run: Runner
    metrics_port: int


STAGES: dict[str, Stage] = {
    "ingest": Stage(partial(settings.load, ingest.IngestSettings), ingest.run, 9101),
    "fetcher": Stage(partial(settings.load, fetcher.FetcherSettings), fetcher.run, 9102),
    # The analyzer's settings include those of every registered provider.
    "analyzer": Stage(analyzer.load_settings, analyzer.run, 9103),
    "writer": Stage(partial(settings.load, writer.WriterSettings), writer.run, 9104),
    "api": Stage(partial(settings.load, api.ApiSettings), api.run, -1),
}
PIPELINE = ("ingest", "fetcher", "analyzer", "writer")


def load_all(env: Mapping[str, str], names: tuple[str, ...]) -> dict[str, Any]:
    """Every stage's settings, checked before anything starts."""
    return {name: STAGES[name].load(env) for name in names}


@contextlib.asynccontextmanager
async def connected(
    common: settings.CommonSettings, *, pool_size: int = 20, migrate: bool = True
) -> AsyncIterator[Resources]:
    """Redis and PostgreSQL (embedded when not configured), migrated, for the block."""
    async with servers(common.redis_url, common.database_url) as found:
        redis = await open_redis(found.redis_url)
        try:
            pool = await open_postgres(found.database_url, max_size=pool_size)
            try:
                if migrate:
                    async with pool.acquire() as conn:
                        await db.migrate(conn)
                yield Resources(redis, pool, Keys(common.redis_prefix))
            finally:
                await pool.close()
        finally:
            await redis.aclose()


async def run_stages(
    res: Resources, configured: dict[str, Any], stop: asyncio.Event, *, observe: bool = True
) -> None:
    """Run the named stages in this process until ``stop``; a stage that crashes stops all.

    With ``observe``, the process also exports the pipeline-wide gauges (observe.py)."""
    tasks = {
        name: asyncio.create_task(STAGES[name].run(res, config, stop), name=name)
        for name, config in configured.items()
    }
    if observe:
        interval = next(iter(configured.values())).observe_interval_s
        observer = Observer(res.redis, res.pool, res.keys, interval)
        tasks["observe"] = asyncio.create_task(observer.run(stop), name="observe")
    stopper = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait(
            [*tasks.values(), stopper], return_when=asyncio.FIRST_COMPLETED
        )
        for task in done:
            if task is not stopper and task.exception() is not None:
                # A stage that cannot start (a setting, a model file) says why in one
                # line where the error is raised to; anything else is a crash to debug.
                if not isinstance(task.exception(), settings.SettingsError):
                    log.error(
                        "stage crashed",
                        exc_info=task.exception(),
                        extra={"stage": task.get_name()},
                    )
                stop.set()
    finally:
        stop.set()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        stopper.cancel()
    for task in tasks.values():
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


async def serve(name: str, config: Any, stop: asyncio.Event) -> None:
    """One stage as its own process (what a container runs)."""
    stage = STAGES[name]
    if not config.redis_url or not config.database_url:
        raise ConnectError(
            f"set REDIS_URL and DATABASE_URL to serve {name}"
            " (embedded servers are only for analyze, up and demo)"
        )
    async with connected(config, pool_size=10, migrate=config.auto_migrate) as res:
        port = stage.metrics_port if config.metrics_port is None else config.metrics_port
        runner = None
        if name != "api":

            async def ready() -> bool:
                return bool(await res.redis.ping())

            runner = await start_metrics_server(port, ready)
        try:
            await run_stages(res, {name: config}, stop)
        finally:
            if runner is not None:
                await runner.cleanup()


def replace(config: Any, **changes: Any) -> Any:
    return msgspec.structs.replace(config, **changes)
