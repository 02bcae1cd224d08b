"""What a format reads: the rows of one export, as typed Python values through a
server-side cursor, or as text PostgreSQL formats itself (COPY), in constant memory."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from . import filters as filtering
from .columns import Layout, field_value

_CURSOR_PREFETCH = 2000
#: Where the two JSON documents are in a row of ``Selection.rows``' query (from the end).
_METADATA, _ANALYSIS = -2, -1


@dataclass(slots=True)
class RowCounter:
    """Rows read so far (by whichever format reads them), for an export job's progress."""

    rows: int = 0


@dataclass(frozen=True, slots=True)
class Selection:
    """One export's rows: a batch's items in input order, narrowed by ``filters``."""

    pool: asyncpg.Pool
    batch_id: uuid.UUID
    layout: Layout
    filters: filtering.Filters = field(default_factory=filtering.Filters)
    #: Counted when given (export jobs); downloads do without.
    counter: RowCounter | None = None

    def count_query(self) -> tuple[str, list[Any]]:
        """How many rows the export holds."""
        where, params = filtering.where(self.batch_id, self.filters)
        sql = f"SELECT count(*) FROM items i LEFT JOIN results r ON r.item_id = i.id WHERE {where}"
        return sql, params

    def query(self, cells: Sequence[str], laterals: str = "") -> tuple[str, list[Any]]:
        """``SELECT cells`` over items ``i`` and results ``r`` (and ``laterals``) in order."""
        where, params = filtering.where(self.batch_id, self.filters)
        sql = (
            f"SELECT {', '.join(cells)} FROM items i LEFT JOIN results r ON r.item_id = i.id"
            f"{laterals} WHERE {where} ORDER BY i.line"
        )
        return sql, params

    async def rows(self) -> AsyncGenerator[list[Any]]:
        """Rows of typed values in column order (JSON fields decoded)."""
        columns = self.layout.columns
        # Ledger columns by position; JSON fields from the two documents, read whole
        # (one decode per document, not one per field).
        plan: list[tuple[int, str]] = []
        cells: list[str] = []
        for column in columns:
            if column.field is None:
                plan.append((len(cells), ""))
                cells.append(column.sql)
            else:
                document, key = column.field
                plan.append((_METADATA if document == "metadata" else _ANALYSIS, key))
        sql, params = self.query([*cells, "i.metadata", "r.analysis"])
        async with self.pool.acquire() as conn, conn.transaction(readonly=True):
            async for rec in conn.cursor(sql, *params, prefetch=_CURSOR_PREFETCH):
                if self.counter is not None:
                    self.counter.rows += 1
                values = tuple(rec)
                metadata, analysis = values[-2] or {}, values[-1] or {}
                yield [
                    values[at]
                    if at >= 0
                    else field_value(metadata if at == _METADATA else analysis, key)
                    for at, key in plan
                ]

    async def copy(self, sql: str, params: Sequence[Any], **options: Any) -> AsyncGenerator[bytes]:
        """The output of ``COPY (sql) TO STDOUT`` with ``options`` (asyncpg's), in pieces."""
        # A small queue between COPY and the reader: when the reader is slow, COPY waits
        # (and PostgreSQL with it), so memory stays flat.
        pieces: asyncio.Queue[bytes] = asyncio.Queue(maxsize=4)

        async def copy() -> None:
            async with self.pool.acquire() as conn:
                try:
                    await conn.copy_from_query(sql, *params, output=pieces.put, **options)
                except BaseException:
                    # Cut off mid-COPY (the reader left): the connection may still be in the
                    # COPY, and the pool's reset sends no statement that would notice, so it
                    # must not serve the next acquirer.
                    conn.terminate()
                    raise

        producer = asyncio.ensure_future(copy())
        async with contextlib.aclosing(_drain(pieces, producer)) as drained:
            async for piece in drained:
                yield piece


async def _drain(
    pieces: asyncio.Queue[bytes], producer: asyncio.Future[None]
) -> AsyncGenerator[bytes]:
    """What ``producer`` puts in ``pieces`` until it ends (its error is raised here);
    the producer is cancelled if the reader stops early."""
    try:
        while True:
            getter = asyncio.ensure_future(pieces.get())
            waiting: list[asyncio.Future[Any]] = [getter, producer]
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield getter.result()
                continue
            getter.cancel()
            producer.result()
            while not pieces.empty():
                yield pieces.get_nowait()
            return
    finally:
        if not producer.done():
            producer.cancel()
        await asyncio.gather(producer, return_exceptions=True)
