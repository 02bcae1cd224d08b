"""Export jobs over HTTP: ``POST /api/v1/batches/{id}/exports`` ``{format, destination}``
queues an export to a file or object URL (or part files under a prefix) and answers at
once; ``GET .../exports/{export_id}`` shows its state and progress. Every api process
runs up to ``EXPORT_JOBS`` jobs in the background (``ExportWorker``), taking them from
the ledger, so a 10M-row export holds no request open and survives a restart (see
imagestream.common.export.jobs for what happens to a job whose process died).

Destinations: ``s3://`` / ``gs://`` in a bucket of ``EXPORT_ALLOWED_BUCKETS``, or a file
(path or ``file://``) inside ``EXPORT_DIR``; nothing else, and never a URL carrying
credentials (the storage clients take theirs from the environment).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import uuid
from pathlib import Path
from typing import Any

import asyncpg
from aiohttp import web
from multidict import MultiDict

from imagestream.common import export, ledger, storage
from imagestream.common.export import jobs

from . import params
from .errors import ApiError, bad_request, json_response
from .settings import ApiSettings

log = logging.getLogger(__name__)

MAX_PART_ROWS = 100_000_000


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def job_json(row: asyncpg.Record) -> dict[str, Any]:
    total, written = row["rows_total"], row["rows_written"]
    if row["state"] == "completed":
        progress: float | None = 100.0
    elif total:
        progress = round(min(100.0, 100.0 * written / total), 2)
    else:
        progress = None
    return {
        "id": str(row["id"]),
        "batch_id": str(row["batch_id"]),
        "format": row["format"],
        "destination": row["destination"],
        "filters": row["filters"],
        "part_rows": row["shard_rows"],
        "state": row["state"],
        "rows_total": total,
        "rows_written": written,
        "bytes_written": row["bytes_written"],
        "progress": progress,
        "files": list(row["files"]),
        "error": row["error"],
        "attempts": row["attempts"],
        "created_at": _iso(row["created_at"]),
        "started_at": _iso(row["started_at"]),
        "finished_at": _iso(row["finished_at"]),
    }


class ExportJobs:
    """The HTTP side: create, show and list a batch's export jobs."""

    def __init__(self, pool: asyncpg.Pool, settings: ApiSettings, worker: ExportWorker) -> None:
        self.pool = pool
        self.settings = settings
        self.worker = worker
        self.allowed_buckets = storage.parse_buckets(settings.export_allowed_buckets)

    def destination(self, text: str) -> storage.Location:
        """The destination, if this api may write there (400 saying why not)."""
        export_dir = self.settings.export_dir
        if "://" not in text and export_dir and not os.path.isabs(text):
            text = os.path.join(export_dir, text)  # relative to EXPORT_DIR
        try:
            location = storage.parse(text)
        except storage.StorageError as exc:
            raise bad_request(str(exc)) from None
        if location.scheme != "file":
            if not storage.bucket_allowed(location, self.allowed_buckets):
                raise bad_request(
                    f"{location.scheme}://{location.bucket} is not in EXPORT_ALLOWED_BUCKETS"
                )
            return location
        if not export_dir:
            raise bad_request("file destinations need EXPORT_DIR (the folder exports may go to)")
        root = Path(export_dir).resolve()
        path = Path(location.key).resolve()
        if not path.is_relative_to(root) or (path == root and not location.is_prefix):
            raise bad_request(f"a file destination must be inside EXPORT_DIR ({root})")
        return location

    async def create(self, request: web.Request) -> web.Response:
        batch_id = ledger.parse_batch_id(request.match_info["batch_id"])
        body = params.only(
            await params.json_body(request), "format", "destination", "part_rows",
            *jobs.FILTER_FIELDS,
        )  # fmt: skip
        destination = body.get("destination")
        if not isinstance(destination, str) or not destination.strip():
            raise bad_request('send {"format": "parquet", "destination": "s3://bucket/out/"}')
        location = self.destination(destination.strip())
        sink = self._sink(body.get("format"), location)
        part_rows = body.get("part_rows")
        if part_rows is not None and (
            not isinstance(part_rows, int) or isinstance(part_rows, bool)
            or not 1 <= part_rows <= MAX_PART_ROWS
        ):  # fmt: skip
            raise bad_request(f"part_rows must be a whole number from 1 to {MAX_PART_ROWS:,}")
        filters = self._filters(body)
        await ledger.batch(self.pool, batch_id)  # 404 for an unknown batch
        row = await jobs.create(
            self.pool,
            batch_id,
            sink.name,
            location.url,
            pipeline=self.worker.pipeline,
            filters=filters,
            part_rows=part_rows,
        )
        self.worker.wake.set()
        return json_response(
            job_json(row),
            status=202,
            headers={"Location": f"/api/v1/batches/{batch_id}/exports/{row['id']}"},
        )

    @staticmethod
    def _sink(name: Any, location: storage.Location) -> export.Sink:
        if name is None:
            found = None if location.is_prefix else export.sink_for_path(location.key)
            if found is None:
                raise bad_request(f"name a format: one of {', '.join(export.FORMATS)}")
            return found
        sink = export.SINKS.get(name) if isinstance(name, str) else None
        if sink is None:
            raise bad_request(f"format must be one of {', '.join(export.FORMATS)}")
        return sink

    @staticmethod
    def _filters(body: dict[str, Any]) -> dict[str, Any]:
        """The body's filters, checked as the download's are, in the form jobs keep."""
        query: MultiDict[str] = MultiDict()
        group = body.get("duplicate_group")
        if group is not None:
            if not isinstance(group, int) or isinstance(group, bool):
                raise bad_request("duplicate_group must be an item id (a whole number)")
            query.add("duplicate_group", str(group))
        for name in jobs.FILTER_FIELDS:
            if name != "duplicate_group":
                for value in params.strings(body, name):
                    query.add(name, value)
        checked = params.export_filters(query)
        return {
            "state": list(checked.states),
            "error_class": list(checked.error_classes),
            "field": query.getall("field", []),
            "created_after": _iso(checked.created_after),
            "created_before": _iso(checked.created_before),
            "duplicate_group": checked.duplicate_group,
            "duplicates": checked.duplicates,
        }

    async def get(self, request: web.Request) -> web.Response:
        batch_id = ledger.parse_batch_id(request.match_info["batch_id"])
        raw = request.match_info["export_id"]
        try:
            export_id = uuid.UUID(raw)
        except ValueError:
            raise ApiError(404, f"no export {raw!r}") from None
        row = await jobs.get(self.pool, batch_id, export_id)
        if row is None:
            raise ApiError(404, f"no export {export_id} of batch {batch_id}")
        return json_response(job_json(row))

    async def list(self, request: web.Request) -> web.Response:
        batch_id = ledger.parse_batch_id(request.match_info["batch_id"])
        limit = params.integer(request.query, "limit", 50, 1, 500)
        await ledger.batch(self.pool, batch_id)
        rows = await jobs.list_for_batch(self.pool, batch_id, limit)
        return json_response({"exports": [job_json(r) for r in rows], "limit": limit})


class ExportWorker:
    """Runs export jobs in this api process: up to ``EXPORT_JOBS`` at once, claimed from
    the ledger when one is created here, and every few seconds (jobs created by other
    processes, or whose process died)."""

    def __init__(self, pool: asyncpg.Pool, pipeline: str, settings: ApiSettings) -> None:
        self.pool = pool
        self.pipeline = pipeline
        self.slots = settings.export_jobs
        self.duplicate_max_distance = settings.duplicate_max_distance
        self.stale_s = settings.export_job_stale_s
        self.heartbeat_s = min(5.0, self.stale_s / 6)
        self.poll_s = min(5.0, self.stale_s / 4)
        self.name = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.wake = asyncio.Event()
        # Strong references: the event loop keeps only weak ones to tasks.
        self.running: dict[uuid.UUID, asyncio.Task[None]] = {}
        self._loop: asyncio.Task[None] | None = None

    async def start(self, _: web.Application) -> None:
        self._loop = asyncio.create_task(self._claim_loop())

    async def stop(self, _: web.Application) -> None:
        """Stop claiming; cancel the running jobs (their files are dropped) and hand them
        back, so another api process (or this one, restarted) runs them again."""
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)
        running = dict(self.running)
        for task in running.values():
            task.cancel()
        await asyncio.gather(*running.values(), return_exceptions=True)
        for job_id in running:
            with contextlib.suppress(asyncpg.PostgresError, OSError):
                await jobs.release(self.pool, job_id, self.name)

    async def _claim_loop(self) -> None:
        while True:
            try:
                while len(self.running) < self.slots:
                    job = await jobs.claim(self.pool, self.name, self.stale_s, self.pipeline)
                    if job is None:
                        break
                    self._start(job)
            except (asyncpg.PostgresError, OSError) as exc:
                log.warning("could not look for export jobs: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.poll_s)
            self.wake.clear()

    def _start(self, job: asyncpg.Record) -> None:
        job_id: uuid.UUID = job["id"]
        log.info("export job started", extra={"job": str(job_id), "attempt": job["attempts"]})
        task = asyncio.create_task(
            jobs.run(self.pool, job, self.name, self.heartbeat_s, self.duplicate_max_distance)
        )
        self.running[job_id] = task

        def ended(done: asyncio.Task[None]) -> None:
            self.running.pop(job_id, None)
            self.wake.set()  # a slot is free
            if not done.cancelled() and (error := done.exception()) is not None:
                # The ledger could not be told (the job is resumed once it looks stale).
                log.error("export job stopped: %s", error, extra={"job": str(job_id)})

        task.add_done_callback(ended)
