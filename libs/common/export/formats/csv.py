"""CSV, written by PostgreSQL itself (``COPY (query) TO STDOUT``): the query flattens,
formats and neutralizes every cell, so a million rows stream at the speed of the database
(several times the rows/s of formatting them in Python; see bench/export.py). Lists and
objects are JSON text; text from outside is made inert for spreadsheets (formulas.py)."""

from __future__ import annotations

import contextlib
import csv
import io
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from ..columns import Column
from ..formulas import neutralize_sql
from ..source import Selection


def _cells(columns: tuple[Column, ...]) -> tuple[list[str], str]:
    """Every column as CSV-ready text, and the laterals that compute each JSON field's
    node (f.nK) and text (g.tK) once per row."""
    nodes: list[str] = []
    cells: list[str] = []
    for column in columns:
        if column.field is not None:
            k = len(nodes)
            nodes.append(column.sql)
            node, text = f"f.n{k}", f"g.t{k}"
            cells.append(
                f"CASE jsonb_typeof({node}) WHEN 'string' THEN {neutralize_sql(text)}"
                f" WHEN 'array' THEN {node}::text WHEN 'object' THEN {node}::text ELSE {text} END"
            )
        elif column.free_text:
            cells.append(neutralize_sql(column.sql))
        elif (column.schema or {}).get("type") == "boolean":
            cells.append(f"{column.sql}::text")  # true/false, not COPY's t/f
        else:
            cells.append(column.sql)
    laterals = ""
    if nodes:
        laterals = (
            " CROSS JOIN LATERAL (SELECT "
            + ", ".join(f"{n} AS n{k}" for k, n in enumerate(nodes))
            + ") f CROSS JOIN LATERAL (SELECT "
            + ", ".join(f"f.n{k} #>> '{{}}' AS t{k}" for k in range(len(nodes)))
            + ") g"
        )
    return cells, laterals


class _LineCounter:
    """Counts CSV records in COPY's output: line ends outside quoted cells (a quote
    inside one is doubled, so every quote toggles being inside)."""

    def __init__(self) -> None:
        self.quoted = False

    def count(self, piece: bytes) -> int:
        if not self.quoted and b'"' not in piece:
            return piece.count(b"\n")
        segments = piece.split(b'"')
        outside = segments[1::2] if self.quoted else segments[0::2]
        self.quoted ^= len(segments) % 2 == 0
        return sum(segment.count(b"\n") for segment in outside)


@dataclass(frozen=True)
class CsvSink:
    name: str = "csv"
    media_type: str = "text/csv; charset=utf-8"
    suffix: str = ".csv"
    openapi_schema: dict[str, Any] = field(default_factory=lambda: {"type": "string"})

    async def write(self, selection: Selection) -> AsyncGenerator[bytes]:
        header = io.StringIO()
        csv.writer(header, lineterminator="\n").writerow(selection.layout.names)
        yield header.getvalue().encode()
        sql, params = selection.query(*_cells(selection.layout.columns))
        counter, lines = selection.counter, _LineCounter()
        async with contextlib.aclosing(selection.copy(sql, params, format="csv")) as pieces:
            async for piece in pieces:
                if counter is not None:
                    counter.rows += lines.count(piece)
                yield piece


SINKS = (CsvSink(),)
