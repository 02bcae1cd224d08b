"""The fetcher service: one FetchTask in, an AnalyzeTask (or the item's failure) out.

Downloads go through the guarded client (http.py); decoding, orientation and
downscaling run in a thread pool sized to the cores (Pillow releases the GIL while it
decodes and resizes). The analysis-sized image goes to Redis under a content-addressed
key with a TTL; the stream entry carries only that key.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from urllib.parse import unquote, urlsplit

from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import Counter, Histogram
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt
from tenacity.wait import wait_exponential_jitter

from imagestream.common import messages
from imagestream.common.connections import Resources
from imagestream.common.control import BatchConfigs, HaltedBatches
from imagestream.common.errors import ErrorClass, ItemError
from imagestream.common.keys import GROUPS
from imagestream.common.metrics import ITEM_OUTCOMES
from imagestream.common.settings import StreamSettings
from imagestream.common.worker import Out, StreamWorker, out

from . import image
from .guard import AddressPolicy, parse_cidrs
from .http import Downloaded, Downloader

log = logging.getLogger(__name__)

FETCH_SECONDS = Histogram(
    "imagestream_fetch_duration_seconds",
    "Time to download one image, retries included.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)
DECODE_SECONDS = Histogram(
    "imagestream_decode_duration_seconds",
    "Time to identify, decode, orient and downscale one image.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
FETCH_BYTES = Counter("imagestream_fetch_bytes_total", "Bytes of images downloaded.")
RETRIES = Counter(
    "imagestream_fetch_retries_total", "Download attempts retried, by error class.", ["error_class"]
)


class FetcherSettings(StreamSettings, kw_only=True, frozen=True):
    fetch_concurrency: int = 64
    #: Concurrent connections to one host.
    fetch_per_host: int = 8
    fetch_connect_timeout_s: float = 10.0
    #: Longest silence while reading a response (slow-loris guard).
    fetch_read_timeout_s: float = 20.0
    fetch_total_timeout_s: float = 60.0
    fetch_max_bytes: int = 50 * 1024 * 1024
    fetch_max_redirects: int = 5
    #: Width x height above which an image fails as image_too_large (decompression bombs).
    fetch_max_pixels: int = 50_000_000
    #: Attempts for transient errors (timeouts, resets, 5xx, 429), with backoff.
    fetch_attempts: int = 3
    fetch_backoff_s: float = 0.5
    fetch_user_agent: str = "imagestream/0.1 (image analysis; +https://github.com/imagestream)"
    #: CIDR ranges the fetcher may reach although they are private/loopback (tests, intranets).
    fetch_allowed_cidrs: tuple[str, ...] = ()
    #: Skip images whose server answers X-Robots-Tag: noai / noimageai.
    fetch_respect_noai: bool = True
    #: Read file:// URLs (the local CLI analyzing a folder only).
    fetch_allow_file: bool = False
    #: Long side of the image handed to the analyzer (px), unless the batch says otherwise.
    analysis_long_side: int = 768
    blob_ttl_s: int = 3600
    #: Stop reading while the analyze stream holds this many entries.
    analyze_high_water: int = 256
    #: Decode threads (0 = one per core).
    decode_threads: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            parse_cidrs(self.fetch_allowed_cidrs)
        except ValueError as exc:
            raise ValueError(f"FETCH_ALLOWED_CIDRS: {exc}") from None
        if self.fetch_attempts < 1 or self.fetch_concurrency < 1 or self.fetch_per_host < 1:
            raise ValueError("FETCH_ATTEMPTS, FETCH_CONCURRENCY, FETCH_PER_HOST must be >= 1")


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, ItemError) and exc.transient


class Fetcher:
    def __init__(self, res: Resources, settings: FetcherSettings) -> None:
        self.res = res
        self.settings = settings
        self.halted = HaltedBatches(res.redis, res.keys)
        self.configs = BatchConfigs(res.pool)
        self.pool = ThreadPoolExecutor(
            max_workers=settings.decode_threads or os.cpu_count() or 2,
            thread_name_prefix="decode",
        )
        self.downloader = Downloader(
            policy=AddressPolicy(parse_cidrs(settings.fetch_allowed_cidrs)),
            concurrency=settings.fetch_concurrency,
            per_host=settings.fetch_per_host,
            connect_timeout_s=settings.fetch_connect_timeout_s,
            read_timeout_s=settings.fetch_read_timeout_s,
            total_timeout_s=settings.fetch_total_timeout_s,
            max_bytes=settings.fetch_max_bytes,
            max_redirects=settings.fetch_max_redirects,
            user_agent=settings.fetch_user_agent,
            check_head=image.check_head,
        )

    async def close(self) -> None:
        await self.downloader.close()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _result(
        self, task: messages.FetchTask, status: messages.ItemStatus, error: ItemError | None = None
    ) -> Out:
        ITEM_OUTCOMES.labels("fetcher", status, error.error_class if error else "").inc()
        return out(
            self.res.keys.write,
            messages.ItemResult(
                batch_id=task.batch_id,
                item_id=task.item_id,
                status=status,
                stage="fetcher",
                error_class=error.error_class.value if error else None,
                error_message=error.message if error else None,
            ),
        )

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
        long_side = int(config.options.get("long_side") or self.settings.analysis_long_side)
        try:
            downloaded = await self._download(task.url)
            if self.settings.fetch_respect_noai and _opted_out(downloaded):
                return [
                    self._result(
                        task,
                        "skipped",
                        ItemError(ErrorClass.OPTED_OUT, "X-Robots-Tag opts out of AI use"),
                    )
                ]
            loop = asyncio.get_running_loop()
            with DECODE_SECONDS.time():
                prepared = await loop.run_in_executor(
                    self.pool,
                    partial(
                        image.prepare,
                        downloaded.body,
                        target_long_side=long_side,
                        max_pixels=self.settings.fetch_max_pixels,
                    ),
                )
        except ItemError as error:
            return [self._result(task, "failed", error)]
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

    async def _download(self, url: str) -> Downloaded:
        if url.startswith("file:"):
            return await self._read_file(url)

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            backoff = wait_exponential_jitter(initial=self.settings.fetch_backoff_s, max=30)(state)
            if isinstance(exc, ItemError):
                RETRIES.labels(exc.error_class).inc()
                if exc.retry_after_s is not None:
                    return min(max(exc.retry_after_s, backoff), 120.0)
            return backoff

        with FETCH_SECONDS.time():
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(self.settings.fetch_attempts),
                wait=wait,
                retry=retry_if_exception(_is_transient),
                reraise=True,
            ):
                with attempt:
                    downloaded = await self.downloader.fetch(url)
        FETCH_BYTES.inc(len(downloaded.body))
        return downloaded

    async def _read_file(self, url: str) -> Downloaded:
        if not self.settings.fetch_allow_file:
            raise ItemError(ErrorClass.INVALID_URL, "file URLs are only read by the local CLI")
        path = Path(unquote(urlsplit(url).path))
        loop = asyncio.get_running_loop()
        try:
            size = (await asyncio.to_thread(path.stat)).st_size
            if size > self.settings.fetch_max_bytes:
                raise ItemError(
                    ErrorClass.TOO_LARGE,
                    f"{size} bytes, the limit is {self.settings.fetch_max_bytes}",
                )
            body = await loop.run_in_executor(self.pool, path.read_bytes)
        except FileNotFoundError:
            raise ItemError(ErrorClass.NOT_FOUND, f"no file {path}") from None
        except OSError as exc:
            raise ItemError(
                ErrorClass.CONNECTION_ERROR, f"cannot read {path}: {exc.strerror}"
            ) from None
        image.check_head(body[:64])
        return Downloaded(body, url, CIMultiDictProxy(CIMultiDict()))

    def on_dead(self, task: messages.FetchTask | None, reason: str) -> list[Out]:
        if task is None:
            return []
        return [self._result(task, "failed", ItemError(ErrorClass.POISON, reason))]


def _opted_out(downloaded: Downloaded) -> bool:
    values = ",".join(downloaded.headers.getall("X-Robots-Tag", [])).lower()
    directives = {d.strip() for part in values.split(",") for d in part.split(":")[-1:]}
    return bool(directives & {"noai", "noimageai"})


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
        concurrency=settings.fetch_concurrency,
        high_water=(res.keys.analyze, settings.analyze_high_water),
    )
    try:
        await worker.run(stop)
    finally:
        await fetcher.close()
