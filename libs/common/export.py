"""Result exports: one row per item, streamed from the ledger in constant memory.

Columns, in order (stable, so scripts can rely on them):
``url, status, error_class, error_message, width, height, format, bytes, sha256``, then the
input's extra columns (renamed ``input.<name>`` if they clash), then the analysis fields
flattened as ``analysis.<field>``, then ``input_tokens, output_tokens, cost_usd``.
JSON and JSONL use the same keys with native values; CSV writes lists and objects as JSON.
Text cells that a spreadsheet would run as a formula are neutralized in CSV.
"""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

import asyncpg
import orjson

LEADING = (
    "url", "status", "error_class", "error_message",
    "width", "height", "format", "bytes", "sha256",
)  # fmt: skip
TRAILING = ("input_tokens", "output_tokens", "cost_usd")
ExportFormat = Literal["csv", "json", "jsonl"]
FORMATS: tuple[ExportFormat, ...] = ("csv", "json", "jsonl")
MEDIA_TYPES = {
    "csv": "text/csv; charset=utf-8",
    "json": "application/json",
    "jsonl": "application/x-ndjson",
}
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_FLUSH_ROWS = 1000


@dataclass(frozen=True, slots=True)
class Filters:
    states: Sequence[str] = ()
    error_classes: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class Layout:
    columns: list[str]
    metadata: list[tuple[str, str]]  # (input key, column name)
    analysis: list[tuple[str, str]]  # (analysis field, column name)


def layout(metadata_columns: Sequence[str], analysis_columns: Sequence[str]) -> Layout:
    taken = set(LEADING) | set(TRAILING)
    metadata = [(name, f"input.{name}" if name in taken else name) for name in metadata_columns]
    analysis = [(name, f"analysis.{name}") for name in analysis_columns]
    columns = [*LEADING, *(c for _, c in metadata), *(c for _, c in analysis), *TRAILING]
    return Layout(columns, metadata, analysis)


_QUERY = """
SELECT i.url, i.state, i.error_class, i.error_message, i.metadata,
       r.width, r.height, r.format, r.bytes, encode(r.sha256, 'hex') AS sha256,
       r.analysis, r.input_tokens, r.output_tokens, r.cost_usd
FROM items i LEFT JOIN results r ON r.item_id = i.id
WHERE i.batch_id = $1
  AND (cardinality($2::text[]) = 0 OR i.state = ANY($2::text[]))
  AND (cardinality($3::text[]) = 0 OR i.error_class = ANY($3::text[]))
ORDER BY i.line
"""


async def records(
    pool: asyncpg.Pool, batch_id: uuid.UUID, shape: Layout, filters: Filters = Filters()
) -> AsyncIterator[list[Any]]:
    """Rows of typed values in ``shape.columns`` order, read through a server-side cursor."""
    async with pool.acquire() as conn, conn.transaction(readonly=True):
        cursor = conn.cursor(
            _QUERY, batch_id, list(filters.states), list(filters.error_classes), prefetch=2000
        )
        async for rec in cursor:
            metadata = rec["metadata"] or {}
            analysis = rec["analysis"] or {}
            cost = rec["cost_usd"]
            yield [
                rec["url"],
                rec["state"],
                rec["error_class"],
                rec["error_message"],
                rec["width"],
                rec["height"],
                rec["format"],
                rec["bytes"],
                rec["sha256"],
                *(metadata.get(key) for key, _ in shape.metadata),
                *(analysis.get(key) for key, _ in shape.analysis),
                rec["input_tokens"],
                rec["output_tokens"],
                float(cost) if isinstance(cost, Decimal) else cost,
            ]


def neutralize(value: str) -> str:
    """Make a text cell inert in spreadsheets (a leading quote), unless it is a number."""
    if value.startswith(_FORMULA_START):
        try:
            float(value)
        except ValueError:
            return "'" + value
    return value


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, str):
        return neutralize(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return neutralize(orjson.dumps(value).decode())
    return value


async def encode(
    rows: AsyncIterator[list[Any]], columns: list[str], fmt: ExportFormat
) -> AsyncIterator[bytes]:
    """The export file, in pieces of about a thousand rows."""
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\r\n")
        writer.writerow(columns)
        count = 0
        async for row in rows:
            writer.writerow([_csv_cell(v) for v in row])
            count += 1
            if count % _FLUSH_ROWS == 0:
                yield buffer.getvalue().encode()
                buffer.seek(0)
                buffer.truncate()
        yield buffer.getvalue().encode()
        return
    parts: list[bytes] = []
    first = True
    if fmt == "json":
        parts.append(b"[")
    async for row in rows:
        line = orjson.dumps(dict(zip(columns, row, strict=True)))
        if fmt == "json":
            parts.append(b"\n" + line if first else b",\n" + line)
        else:
            parts.append(line + b"\n")
        first = False
        if len(parts) >= _FLUSH_ROWS:
            yield b"".join(parts)
            parts.clear()
    if fmt == "json":
        parts.append(b"\n]\n")
    yield b"".join(parts)


def format_from_path(path: str) -> str | None:
    lowered = path.lower()
    for fmt in ("csv", "jsonl", "json", "xlsx"):
        if lowered.endswith("." + fmt):
            return fmt
    return None
