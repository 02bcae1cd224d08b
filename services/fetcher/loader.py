"""The fetch stage's work without the streams: download an image (or read a local file, or
an s3:// or gs:// object) and make its analysis image in the decode pool. The service
(service.py) wraps it with batch controls and the hand-off; bench/fetch.py measures it.

Decode pool: processes, one per core. Measured on this 2-core machine (docs/FETCHER.md):
with other work running on it, a ProcessPoolExecutor(2) prepared about a third more
images per second than a ThreadPoolExecutor(2) (medians of alternating runs); on a quiet
machine the two were within noise, threads ~7 % cheaper in CPU (no pickling of bodies and
results). Pillow and hashlib release the GIL for most of ``image.prepare``, but each
image still takes and releases it dozens of times (between decoder chunks, for EXIF and
the Python glue); whenever the event loop thread holds it for the download side, a decode
thread waits up to the switch interval (5 ms), and on a busy machine a descheduled GIL
holder stalls the others. Processes share no GIL, and they contain a native decoder
crash on hostile input: the pool breaks, is replaced, and the images in it are retried
once (see ``_prepare``), instead of the whole service dying.

Small images go to the pool in batches: the images whose downloads finish in the same
turn of the event loop are prepared by one pool call, up to ``BATCH_BYTES`` of bodies.
A pool call costs a fixed ~0.4 ms of CPU (queueing, pipe writes and wake-ups on both
sides, the pool's manager thread), more than a tiny image's decode: with a million 1 KB
PNGs it was half of the fetcher's CPU. A photograph (hundreds of KB) still goes alone, so
both workers stay busy.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from urllib.parse import unquote, urlsplit

from prometheus_client import Counter, Histogram

from imagestream.common import pools, storage
from imagestream.common.errors import ErrorClass, ItemError
from imagestream.common.storage import StorageError

from . import image
from .http import FETCH_BYTES, Downloader
from .settings import FetcherSettings

log = logging.getLogger(__name__)

DECODE_SECONDS = Histogram(
    "imagestream_decode_duration_seconds",
    "Time to identify, decode, orient, downscale and encode one image (queueing included).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
DECODE_CALLS = Counter(
    "imagestream_decode_pool_calls_total",
    "Calls to the decode pool (each prepares one image, or a batch of small ones).",
)
POOL_RESTARTS = Counter(
    "imagestream_decode_pool_restarts_total",
    "Decode pools replaced after a worker process died (a decoder crash or a kill).",
)


#: The error class of an image that could not be read from object storage.
_OBJECT_ERRORS: dict[str, ErrorClass] = {
    "invalid": ErrorClass.INVALID_URL,
    "not_found": ErrorClass.NOT_FOUND,
    "denied": ErrorClass.HTTP_CLIENT_ERROR,  # S3/GCS answered 403
    "blocked": ErrorClass.BLOCKED_ADDRESS,
    "too_large": ErrorClass.TOO_LARGE,
    # Transport failures the client's own retries did not overcome.
    "failed": ErrorClass.CONNECTION_ERROR,
}


#: Most bytes of bodies sent to the decode pool in one call (one larger image goes alone).
BATCH_BYTES = 256 * 1024
#: Most images prepared by one pool call.
BATCH_IMAGES = 64

_Job = tuple[bytes, int, int]  # body, long side, max pixels


def _prepare_batch(jobs: list[_Job]) -> list[image.Prepared | ItemError]:
    """``image.prepare`` for each job, in a decode worker; an image's ItemError is its
    result, so one bad image does not fail the others."""
    results: list[image.Prepared | ItemError] = []
    for body, long_side, max_pixels in jobs:
        try:
            results.append(image.prepare(body, target_long_side=long_side, max_pixels=max_pixels))
        except ItemError as error:
            results.append(error)
    return results


class ImageLoader:
    def __init__(self, settings: FetcherSettings) -> None:
        self.settings = settings
        self.workers = settings.decode_workers or os.cpu_count() or 2
        self.pool = self._new_pool()
        # Jobs waiting for the end of this event-loop turn to go to the pool together.
        self._batch: list[tuple[_Job, asyncio.Future[image.Prepared | ItemError]]] = []
        self._batch_bytes = 0
        self.downloader = Downloader(
            settings, check_head=image.check_head, head_bytes=image.SNIFF_BYTES
        )
        self.buckets = storage.parse_buckets(settings.fetch_allowed_buckets)
        self.object_slots = asyncio.Semaphore(settings.fetch_concurrency)

    def _new_pool(self) -> ProcessPoolExecutor:
        # "spawn": a fresh interpreter per worker; forking a process that runs an event
        # loop and threads is unsafe. Workers start on first use.
        return ProcessPoolExecutor(
            self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=pools.watch_parent,
            initargs=(os.getpid(),),
        )

    async def close(self) -> None:
        await self.downloader.close()
        # Wait for the workers to exit here: left to the interpreter's exit hook, the
        # pool's wake-up pipe can be closed under it, which prints a spurious traceback.
        await asyncio.to_thread(self.pool.shutdown, wait=True, cancel_futures=True)

    async def load(self, url: str, long_side: int) -> image.Prepared:
        """The analysis image of ``url``, or ItemError saying why there is none."""
        if url.startswith("file:"):
            body = await self._read_file(url)
        elif url.startswith(("s3:", "gs:")):
            body = await self._read_object(url)
        else:
            body = (await self.downloader.fetch(url)).body
        with DECODE_SECONDS.time():
            return await self._prepare(body, long_side)

    async def _prepare(self, body: bytes, long_side: int) -> image.Prepared:
        job: _Job = (body, long_side, self.settings.fetch_max_pixels)
        try:
            outcome = await self._batched(job)
        except BrokenProcessPool:
            # A worker died, and every job in its pool failed with it. The culprit is
            # unknown, so each job gets one more try, alone, in a fresh pool; an image
            # that breaks that one too is taken for the culprit.
            pool = self.pool
            try:
                outcome = (await self._submit(pool, [job]))[0]
            except BrokenProcessPool:
                self._replace(pool)
                raise ItemError(
                    ErrorClass.DECODE_ERROR, "the decoder crashed on this image"
                ) from None
        if isinstance(outcome, ItemError):
            raise outcome
        return outcome

    def _batched(self, job: _Job) -> asyncio.Future[image.Prepared | ItemError]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[image.Prepared | ItemError] = loop.create_future()
        if len(job[0]) >= BATCH_BYTES:
            self._send([(job, done)])
            return done
        if not self._batch:
            loop.call_soon(self._send_batch)
        self._batch.append((job, done))
        self._batch_bytes += len(job[0])
        if self._batch_bytes >= BATCH_BYTES or len(self._batch) >= BATCH_IMAGES:
            self._send_batch()
        return done

    def _send_batch(self) -> None:
        if self._batch:
            batch, self._batch, self._batch_bytes = self._batch, [], 0
            self._send(batch)

    def _send(self, batch: list[tuple[_Job, asyncio.Future[image.Prepared | ItemError]]]) -> None:
        pool = self.pool
        try:
            call = self._submit(pool, [job for job, _ in batch])
        except Exception as exc:  # the pool broke or shut down before this call
            call = asyncio.get_running_loop().create_future()
            call.set_exception(exc)

        def settle(call: asyncio.Future[list[image.Prepared | ItemError]]) -> None:
            if call.cancelled():  # the pool shut down with the call still queued
                for _, done in batch:
                    done.cancel()
                return
            error = call.exception()
            if isinstance(error, BrokenProcessPool):
                self._replace(pool)
            for index, (_, done) in enumerate(batch):
                if done.done():
                    continue  # its handler was cancelled
                if error is not None:
                    done.set_exception(error)
                else:
                    done.set_result(call.result()[index])

        call.add_done_callback(settle)

    def _submit(
        self, pool: ProcessPoolExecutor, jobs: list[_Job]
    ) -> asyncio.Future[list[image.Prepared | ItemError]]:
        DECODE_CALLS.inc()
        return asyncio.get_running_loop().run_in_executor(pool, _prepare_batch, jobs)

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        if broken is self.pool:  # the first of its jobs to notice replaces it
            POOL_RESTARTS.inc()
            log.warning("a decode worker died; replacing the decode pool")
            broken.shutdown(wait=False, cancel_futures=True)
            self.pool = self._new_pool()

    async def _read_object(self, url: str) -> bytes:
        """An image in object storage, read with this service's credentials: only from
        the buckets FETCH_ALLOWED_BUCKETS names, under the same byte cap and content
        check as a download (the pixel cap is the decoder's, as for every image)."""
        try:
            location = storage.parse(url)
        except StorageError as exc:
            raise ItemError(ErrorClass.INVALID_URL, str(exc)) from None
        if not storage.bucket_allowed(location, self.buckets):
            raise ItemError(
                ErrorClass.BUCKET_NOT_ALLOWED,
                f"bucket {location.scheme}://{location.bucket} is not in FETCH_ALLOWED_BUCKETS",
            )
        try:
            async with self.object_slots:
                body = await storage.read_capped(url, self.settings.fetch_max_bytes)
        except StorageError as exc:
            raise ItemError(_OBJECT_ERRORS[exc.failure], str(exc)) from None
        FETCH_BYTES.inc(len(body))
        image.check_head(body[: image.SNIFF_BYTES])
        return body

    async def _read_file(self, url: str) -> bytes:
        if not self.settings.fetch_allow_file:
            raise ItemError(ErrorClass.INVALID_URL, "file URLs are only read by the local CLI")
        path = Path(unquote(urlsplit(url).path))
        limit = self.settings.fetch_max_bytes
        try:
            size = (await asyncio.to_thread(path.stat)).st_size
            if size > limit:
                raise ItemError(ErrorClass.TOO_LARGE, f"{size} bytes, the limit is {limit}")
            body = await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            raise ItemError(ErrorClass.NOT_FOUND, f"no file {path}") from None
        except OSError as exc:
            raise ItemError(
                ErrorClass.CONNECTION_ERROR, f"cannot read {path}: {exc.strerror}"
            ) from None
        image.check_head(body[: image.SNIFF_BYTES])
        return body
