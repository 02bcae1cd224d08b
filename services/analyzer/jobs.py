"""The ledger of Batch API jobs (table ``provider_jobs``), the same for every provider.

A provider's ``Deferred`` (its Batch API, ``providers/<name>/batch.py``) decides how items
are grouped and sent; what a job is once sent lives here: which items it holds (so the
reconciler leaves them alone), which project's keys may poll it, its budget reservation,
and whether it is still running. Any analyzer replica of the pipeline collects it.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg
import msgspec

from imagestream.common import messages
from imagestream.common.connections import Resources

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(list[messages.AnalyzeTask])


class JobStore:
    """The rows of one provider's jobs."""

    def __init__(self, res: Resources, provider: str) -> None:
        self.res = res
        self.provider = provider

    async def record(
        self,
        name: str,
        *,
        batch_id: str,
        project: str,
        model: str,
        tasks: Sequence[messages.AnalyzeTask],
        reserved_nano: int,
    ) -> None:
        """A job the provider accepted: from now on its items are its collector's."""
        await self.res.pool.execute(
            """
            INSERT INTO provider_jobs
                (provider, name, batch_id, project, model, tasks, item_ids, reserved_nano)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
            """,
            self.provider,
            name,
            uuid.UUID(batch_id),
            project,
            model,
            _encoder.encode(list(tasks)),
            [t.item_id for t in tasks],
            reserved_nano,
        )

    async def running_per_project(self, projects: Sequence[str]) -> dict[str, int]:
        """Running jobs of each project, in every pipeline (the limit is the project's),
        except those sent over two days ago: the provider has expired them by then, even
        if no analyzer of their pipeline is left to see it."""
        rows = await self.res.pool.fetch(
            "SELECT project, count(*) AS n FROM provider_jobs"
            " WHERE provider = $1 AND state = 'running' AND project = ANY($2::text[])"
            " AND created_at > now() - interval '2 days' GROUP BY project",
            self.provider,
            list(projects),
        )
        return {r["project"]: r["n"] for r in rows}

    async def due(self, poll_s: float, limit: int = 50) -> list[str]:
        """Names of this pipeline's running jobs not polled for ``poll_s``, marked polled."""
        rows = await self.res.pool.fetch(
            """
            UPDATE provider_jobs SET polled_at = now()
            WHERE provider = $1 AND name IN (
                SELECT j.name FROM provider_jobs j JOIN batches b ON b.id = j.batch_id
                WHERE j.provider = $1 AND j.state = 'running' AND b.pipeline = $2
                  AND j.polled_at <= now() - make_interval(secs => $3)
                ORDER BY j.polled_at LIMIT $4 FOR UPDATE OF j SKIP LOCKED)
            RETURNING name
            """,
            self.provider,
            self.res.keys.prefix,
            poll_s,
            limit,
        )
        return [r["name"] for r in rows]

    async def lock_running(self, conn: asyncpg.Connection, name: str) -> asyncpg.Record | None:
        """The job's row, locked for this transaction; None if collected or held elsewhere."""
        row: asyncpg.Record | None = await conn.fetchrow(
            "SELECT * FROM provider_jobs WHERE provider = $1 AND name = $2 AND state = 'running'"
            " FOR UPDATE SKIP LOCKED",
            self.provider,
            name,
        )
        return row

    @staticmethod
    def tasks_of(row: asyncpg.Record) -> list[messages.AnalyzeTask]:
        return _decoder.decode(row["tasks"])

    async def polled(self, conn: asyncpg.Connection, name: str, job_state: Any) -> None:
        await conn.execute(
            "UPDATE provider_jobs SET job_state = $3 WHERE provider = $1 AND name = $2",
            self.provider,
            name,
            job_state,
        )

    async def collected(self, conn: asyncpg.Connection, name: str, job_state: Any) -> None:
        # The tasks are done with; the row stays, naming the job's items.
        await conn.execute(
            "UPDATE provider_jobs SET state = 'collected', job_state = $3, finished_at = now(),"
            " tasks = '' WHERE provider = $1 AND name = $2",
            self.provider,
            name,
            job_state,
        )
