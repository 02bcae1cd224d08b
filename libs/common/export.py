"""Result exports: one row per item, streamed from the ledger in constant memory.

Columns, in order (stable, so scripts can rely on them):
``url, status, error_class, error_message, width, height, format, bytes, sha256``, then the
input's extra columns (renamed ``input.<name>`` if they clash), then the analysis fields
flattened as ``analysis.<field>``, then ``input_tokens, output_tokens, thought_tokens,
cost_usd, cache_hit`` (thinking tokens are billed as output; a cache hit cost nothing).

* CSV is written by PostgreSQL itself (``COPY (query) TO STDOUT``): the query flattens,
  formats and neutralizes every cell, so a million rows stream at the speed of the
  database (several times the rows/s of formatting them in Python; see bench/export.py).
  Lists and objects are JSON text. JSON and JSONL keep native values.
* XLSX (openpyxl write-only) keeps types (numbers, booleans, text), has a bold header row,
  frozen panes (header and URL column) and column widths by kind, and continues on a new
  sheet after 1,048,575 data rows (Excel's row limit, less the header). Sheet XML goes
  into the zip as rows arrive, so the download starts at once.
* Text cells a spreadsheet would run as a formula (starting with ``= + - @``, tab or CR,
  unless the text is a plain number) get a leading ``'`` in CSV and XLSX alike.

Filters (all optional, combined with AND): item states, error classes, when the item's
outcome was recorded (``created_after``/``created_before``), and field conditions on the
analysis (``tags:contains:cat``, ``category:eq:product``, ``brightness:gt:0.5``) or on the
input's columns (``input.sku:eq:A-1``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import csv
import datetime
import io
import re
import threading
import uuid
import zipfile
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, get_args

import asyncpg
import orjson

LEADING = (
    "url", "status", "error_class", "error_message",
    "width", "height", "format", "bytes", "sha256",
)  # fmt: skip
TRAILING = ("input_tokens", "output_tokens", "thought_tokens", "cost_usd", "cache_hit")
ExportFormat = Literal["csv", "json", "jsonl", "xlsx"]
FORMATS: tuple[ExportFormat, ...] = ("csv", "json", "jsonl", "xlsx")
MEDIA_TYPES = {
    "csv": "text/csv; charset=utf-8",
    "json": "application/json",
    "jsonl": "application/x-ndjson",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
}
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_FORMULA_FIRST = frozenset(_FORMULA_START)
#: A plain number ("-5", "+1.5e3") is left alone; the same pattern is used in SQL for CSV.
_NUMBER = r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?$"
_NUMBER_RE = re.compile(_NUMBER)
# The same as SQL literals: constants, inlined so that PostgreSQL plans them once.
_SQL_FORMULA_START = ", ".join(f"E'{c.encode('unicode_escape').decode()}'" for c in _FORMULA_START)
_SQL_NUMBER = f"'{_NUMBER}'"
_SQL_QUOTE = "''''"  # a string literal holding one single quote
_FLUSH_ROWS = 1000

# ---------------------------------------------------------------- filters
Operator = Literal["eq", "ne", "contains", "gt", "gte", "lt", "lte", "exists"]
OPERATORS: tuple[Operator, ...] = get_args(Operator)
_COMPARISONS = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
_NUMERIC_OPERATORS = frozenset(_COMPARISONS)


@dataclass(frozen=True, slots=True)
class Condition:
    """``<field>:<operator>[:<value>]``; a field is an analysis field, or ``input.<column>``."""

    source: Literal["analysis", "input"]
    field: str
    operator: Operator
    value: str = ""

    @classmethod
    def parse(cls, text: str) -> Condition:
        """A condition from its text form; ValueError with a one-line reason."""
        name, _, rest = text.partition(":")
        operator, _, value = rest.partition(":")
        name = name.strip()
        if not name or operator not in OPERATORS:
            raise ValueError(
                f"bad field condition {text!r}: use <field>:<operator>:<value> with an operator"
                f" among {', '.join(OPERATORS)}"
            )
        if operator != "exists" and not value:
            raise ValueError(f"bad field condition {text!r}: {operator} needs a value")
        if operator in _NUMERIC_OPERATORS and _number(value) is None:
            raise ValueError(f"bad field condition {text!r}: {operator} needs a number")
        if name.startswith("input."):
            return cls("input", name.removeprefix("input."), operator, value)
        return cls("analysis", name.removeprefix("analysis."), operator, value)

    def sql(self, param: Callable[[Any], str]) -> str:
        """A boolean SQL expression over ``r.analysis`` / ``i.metadata`` (never NULL)."""
        doc = "r.analysis" if self.source == "analysis" else "i.metadata"
        key = param(self.field)
        node = (
            f"coalesce({doc} -> {key}, {doc} #> string_to_array({key}, '.'))"
            if "." in self.field
            else f"({doc} -> {key})"
        )
        text = f"({node} #>> '{{}}')"
        is_number = f"jsonb_typeof({node}) = 'number'"
        if self.operator == "exists":
            return f"coalesce(jsonb_typeof({node}) <> 'null', false)"
        if self.operator in _COMPARISONS:
            number = param(_number(self.value))
            op = _COMPARISONS[self.operator]
            return f"coalesce(CASE WHEN {is_number} THEN {text}::numeric {op} {number} END, false)"
        value = param(self.value)
        if self.operator == "contains":
            return (
                f"coalesce(CASE jsonb_typeof({node})"
                f" WHEN 'array' THEN EXISTS (SELECT 1 FROM jsonb_array_elements_text({node}) e"
                f" WHERE lower(e) = lower({value}))"
                f" WHEN 'string' THEN strpos(lower({text}), lower({value})) > 0"
                f" END, false)"
            )
        number = param(_number(self.value))
        equal = (
            f"CASE WHEN {is_number} AND {number}::numeric IS NOT NULL"
            f" THEN {text}::numeric = {number}::numeric ELSE lower({text}) = lower({value}) END"
        )
        return (
            f"coalesce({equal}, false)"
            if self.operator == "eq"
            else f"NOT coalesce({equal}, false)"
        )


def _number(text: str) -> Decimal | None:
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


@dataclass(frozen=True, slots=True)
class Filters:
    states: Sequence[str] = ()
    error_classes: Sequence[str] = ()
    conditions: Sequence[Condition] = ()
    #: When the item's outcome was recorded (inclusive lower, exclusive upper bound).
    created_after: datetime.datetime | None = None
    created_before: datetime.datetime | None = None


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


def _where(batch_id: uuid.UUID, filters: Filters) -> tuple[str, list[Any]]:
    params: list[Any] = [batch_id]

    def param(value: Any) -> str:
        params.append(value)
        return f"${len(params)}"

    where = ["i.batch_id = $1"]
    if filters.states:
        where.append(f"i.state = ANY({param(list(filters.states))}::text[])")
    if filters.error_classes:
        where.append(f"i.error_class = ANY({param(list(filters.error_classes))}::text[])")
    if filters.created_after is not None:
        where.append(f"i.finished_at >= {param(filters.created_after)}")
    if filters.created_before is not None:
        where.append(f"i.finished_at < {param(filters.created_before)}")
    where += [c.sql(param) for c in filters.conditions]
    return " AND ".join(where), params


def _query(batch_id: uuid.UUID, filters: Filters) -> tuple[str, list[Any]]:
    where, params = _where(batch_id, filters)
    sql = f"""
        SELECT i.url, i.state, i.error_class, i.error_message, i.metadata,
               r.width, r.height, r.format, r.bytes, encode(r.sha256, 'hex') AS sha256,
               r.analysis, r.input_tokens, r.output_tokens, r.thought_tokens, r.cost_usd,
               r.cache_hit
        FROM items i LEFT JOIN results r ON r.item_id = i.id
        WHERE {where}
        ORDER BY i.line
    """
    return sql, params


def _field(document: dict[str, Any], name: str) -> Any:
    """A top-level field, or a dotted path into nested objects (``safety.violence``)."""
    if name in document:
        return document[name]
    value: Any = document
    for part in name.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


async def records(
    pool: asyncpg.Pool, batch_id: uuid.UUID, shape: Layout, filters: Filters = Filters()
) -> AsyncGenerator[list[Any]]:
    """Rows of typed values in ``shape.columns`` order, read through a server-side cursor."""
    sql, params = _query(batch_id, filters)
    async with pool.acquire() as conn, conn.transaction(readonly=True):
        async for rec in conn.cursor(sql, *params, prefetch=2000):
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
                *(_field(analysis, key) for key, _ in shape.analysis),
                rec["input_tokens"],
                rec["output_tokens"],
                rec["thought_tokens"],
                float(cost) if isinstance(cost, Decimal) else cost,
                rec["cache_hit"],
            ]


# ---------------------------------------------------------------- encoders
def neutralize(value: str) -> str:
    """Make a text cell inert in spreadsheets (a leading quote), unless it is a number."""
    if value[:1] in _FORMULA_FIRST and not _NUMBER_RE.match(value):
        return "'" + value
    return value


async def stream(
    pool: asyncpg.Pool,
    batch_id: uuid.UUID,
    shape: Layout,
    fmt: ExportFormat,
    filters: Filters = Filters(),
) -> AsyncGenerator[bytes]:
    """The export file in pieces, in constant memory whatever the number of rows."""
    if fmt == "csv":
        async with contextlib.aclosing(_csv(pool, batch_id, shape, filters)) as pieces:
            async for piece in pieces:
                yield piece
        return
    rows = records(pool, batch_id, shape, filters)
    async with (
        contextlib.aclosing(rows),
        contextlib.aclosing(_encode(rows, shape.columns, fmt)) as pieces,
    ):
        async for piece in pieces:
            yield piece


# ---------------------------------------------------------------- CSV (by PostgreSQL)
def _csv_query(batch_id: uuid.UUID, shape: Layout, filters: Filters) -> tuple[str, list[Any]]:
    """The export query with every cell as CSV-ready text, for COPY."""
    where, params = _where(batch_id, filters)

    def param(value: Any) -> str:
        params.append(value)
        return f"${len(params)}"

    def inert(text: str) -> str:
        return (
            f"CASE WHEN left({text}, 1) IN ({_SQL_FORMULA_START}) AND {text} !~ {_SQL_NUMBER}"
            f" THEN {_SQL_QUOTE} || {text} ELSE {text} END"
        )

    # Each field's JSON node (f.nK) and its text (g.tK) are computed once per row.
    nodes: list[str] = []
    cells: list[str] = []
    for document, keys in (("i.metadata", shape.metadata), ("r.analysis", shape.analysis)):
        for key, _ in keys:
            k = len(nodes)
            name = param(key)
            # A top-level field, else a dotted path into nested objects (as _field does).
            nodes.append(
                f"coalesce({document} -> {name}, {document} #> string_to_array({name}, '.'))"
                if "." in key
                else f"{document} -> {name}"
            )
            node, text = f"f.n{k}", f"g.t{k}"
            cells.append(
                f"CASE jsonb_typeof({node}) WHEN 'string' THEN {inert(text)}"
                f" WHEN 'array' THEN {node}::text WHEN 'object' THEN {node}::text ELSE {text} END"
            )
    columns = [
        "i.url", "i.state", "i.error_class", inert("i.error_message"),
        "r.width", "r.height", "r.format", "r.bytes", "encode(r.sha256, 'hex')",
        *cells,
        "r.input_tokens", "r.output_tokens", "r.thought_tokens", "r.cost_usd::float8",
        "r.cache_hit::text",
    ]  # fmt: skip
    laterals = ""
    if nodes:
        laterals = (
            " CROSS JOIN LATERAL (SELECT "
            + ", ".join(f"{n} AS n{k}" for k, n in enumerate(nodes))
            + ") f CROSS JOIN LATERAL (SELECT "
            + ", ".join(f"f.n{k} #>> '{{}}' AS t{k}" for k in range(len(nodes)))
            + ") g"
        )
    sql = (
        f"SELECT {', '.join(columns)} FROM items i LEFT JOIN results r ON r.item_id = i.id"
        f"{laterals} WHERE {where} ORDER BY i.line"
    )
    return sql, params


async def _csv(
    pool: asyncpg.Pool, batch_id: uuid.UUID, shape: Layout, filters: Filters
) -> AsyncGenerator[bytes]:
    header = io.StringIO()
    csv.writer(header, lineterminator="\n").writerow(shape.columns)
    yield header.getvalue().encode()
    sql, params = _csv_query(batch_id, shape, filters)
    # A small queue between COPY and the reader: when the reader is slow, COPY waits
    # (and PostgreSQL with it), so memory stays flat.
    pieces: asyncio.Queue[bytes] = asyncio.Queue(maxsize=4)

    async def copy() -> None:
        async with pool.acquire() as conn:
            await conn.copy_from_query(sql, *params, output=pieces.put, format="csv")

    async with contextlib.aclosing(_drain(pieces, asyncio.ensure_future(copy()))) as drained:
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


# ---------------------------------------------------------------- JSON, JSONL, XLSX
async def _encode(
    rows: AsyncIterator[list[Any]], columns: list[str], fmt: ExportFormat
) -> AsyncGenerator[bytes]:
    """JSON, JSONL or XLSX from typed rows (about a thousand rows per piece)."""
    if fmt == "xlsx":
        async with contextlib.aclosing(_xlsx(rows, columns)) as pieces:
            async for piece in pieces:
                yield piece
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


# ---------------------------------------------------------------- XLSX
#: Data rows per sheet: Excel's 1,048,576 rows less the header row.
XLSX_SHEET_ROWS = 1_048_575
_XLSX_PIECE = 256 * 1024
_XLSX_TEXT_LIMIT = 32_767  # Excel's longest cell text


class _Aborted(Exception):
    """The reader of an XLSX export went away; the writer thread stops."""


class _Bridge:
    """The XLSX writer thread's link to the event loop: it pulls rows from the async
    cursor and pushes file pieces to the response, both bounded, so memory stays flat."""

    def __init__(self, loop: asyncio.AbstractEventLoop, rows: AsyncIterator[list[Any]]) -> None:
        self.loop = loop
        self.rows = rows
        self.pieces: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=4)
        self.aborted = threading.Event()
        self._buffer = bytearray()
        self._stopped = False
        self.fetching: asyncio.Task[Any] | None = None

    def _wait(self, future: concurrent.futures.Future[Any]) -> Any:
        """The loop's answer; _Aborted as soon as the reader has gone (checked twice a second)."""
        while not self.aborted.is_set():
            try:
                return future.result(timeout=0.5)
            except concurrent.futures.TimeoutError:
                continue
        future.cancel()
        self._stopped = True
        raise _Aborted

    async def _next_rows(self) -> list[list[Any]]:
        self.fetching = asyncio.current_task()
        batch: list[list[Any]] = []
        try:
            async for row in self.rows:
                batch.append(row)
                if len(batch) >= _FLUSH_ROWS:
                    break
        finally:
            self.fetching = None
        return batch

    async def settle(self) -> None:
        """After an abort: let a read the thread left behind end before rows are closed."""
        if self.fetching is not None:
            self.fetching.cancel()
            await asyncio.gather(self.fetching, return_exceptions=True)

    def next_rows(self) -> list[list[Any]]:
        """Up to a thousand rows; empty at the end (called from the writer thread)."""
        rows: list[list[Any]] = self._wait(
            asyncio.run_coroutine_threadsafe(self._next_rows(), self.loop)
        )
        return rows

    def write(self, data: bytes) -> int:
        """File-like sink of ``Workbook.save`` (an unseekable stream: zipfile copes)."""
        if self.aborted.is_set():
            # Raise once to stop ``save``; an abandoned ZipFile's finalizer writes on.
            if not self._stopped:
                self._stopped = True
                raise _Aborted
            return len(data)
        self._buffer += data
        if len(self._buffer) >= _XLSX_PIECE:
            self._send()
        return len(data)

    def flush(self) -> None:
        # Also called by an abandoned ZipFile's finalizer: after an abort, drop quietly.
        if self.aborted.is_set():
            self._buffer.clear()
        else:
            self._send()

    def close(self) -> None:
        """The zip is finished by ``finish`` (the reader learns the end from it)."""

    def _send(self) -> None:
        if self._buffer:
            piece = bytes(self._buffer)
            self._buffer.clear()
            self._wait(asyncio.run_coroutine_threadsafe(self.pieces.put(piece), self.loop))

    def finish(self) -> None:
        self.flush()
        self._wait(asyncio.run_coroutine_threadsafe(self.pieces.put(None), self.loop))


def _column_width(name: str) -> float:
    if name == "url":
        return 60
    if name in ("error_message", "sha256"):
        return 40 if name == "error_message" else 24
    if name in ("status", "error_class", "format"):
        return 16
    if name in ("width", "height", "bytes", *TRAILING):
        return 12
    return 20


def _write_xlsx(bridge: _Bridge, columns: list[str]) -> None:
    """Runs in a worker thread. openpyxl's write-only mode writes each sheet's rows as
    XML; here that XML goes straight into the zip as it is produced (openpyxl would first
    write it to a temporary file and zip it at the end), so the first bytes leave at once
    and memory and disk stay flat. openpyxl then writes the rest of the package."""
    from openpyxl import Workbook
    from openpyxl.cell import WriteOnlyCell
    from openpyxl.cell.cell import ERROR_CODES, ILLEGAL_CHARACTERS_RE
    from openpyxl.drawing.spreadsheet_drawing import SpreadsheetDrawing
    from openpyxl.styles import Font
    from openpyxl.utils import get_column_letter
    from openpyxl.worksheet._writer import WorksheetWriter
    from openpyxl.writer.excel import ExcelWriter

    class PackageWriter(ExcelWriter):  # type: ignore[misc]
        """openpyxl's package writer for sheets whose XML is already in the archive
        (the same steps as ``ExcelWriter.write_worksheet`` in openpyxl 3.1, less the copy)."""

        def write_worksheet(self, ws: Any) -> None:
            ws._drawing = SpreadsheetDrawing()
            ws._drawing.charts = ws._charts
            ws._drawing.images = ws._images
            ws._rels = ws._writer._rels
            self.manifest.append(ws)

    workbook = Workbook(write_only=True)
    archive = zipfile.ZipFile(bridge, "w", zipfile.ZIP_DEFLATED, allowZip64=True)
    bold = Font(bold=True)

    def cell(sheet: Any, value: Any) -> Any:
        """Numbers and booleans as they are; text cleaned, bounded and neutralized."""
        if isinstance(value, (list, dict)):
            value = orjson.dumps(value).decode()
        if not isinstance(value, str):
            return value
        text = neutralize(ILLEGAL_CHARACTERS_RE.sub("", value)[:_XLSX_TEXT_LIMIT])
        if text.startswith("#") and text in ERROR_CODES:
            # openpyxl would store "#N/A" as an error value: keep it text.
            kept = WriteOnlyCell(sheet, text)
            kept.data_type = "s"
            return kept
        return text

    def open_sheet(number: int) -> tuple[Any, Any]:
        sheet = workbook.create_sheet("results" if number == 1 else f"results {number}")
        for index, name in enumerate(columns, 1):
            sheet.column_dimensions[get_column_letter(index)].width = _column_width(name)
        sheet.freeze_panes = "B2"
        sheet._id = number  # as ExcelWriter numbers them: its path in the package
        entry = archive.open(sheet.path[1:], "w", force_zip64=True)
        sheet._writer = WorksheetWriter(sheet, out=entry)
        sheet._writer.write_top()
        header = []
        for name in columns:
            title = WriteOnlyCell(sheet, name)
            title.font = bold
            header.append(title)
        sheet.append(header)
        return sheet, entry

    sheet, entry = open_sheet(1)
    in_sheet = 0
    try:
        while rows := bridge.next_rows():
            for row in rows:
                if in_sheet == XLSX_SHEET_ROWS:
                    sheet.close()
                    entry.close()
                    sheet, entry = open_sheet(len(workbook.worksheets) + 1)
                    in_sheet = 0
                sheet.append([cell(sheet, value) for value in row])
                in_sheet += 1
        sheet.close()
        entry.close()
    except BaseException:
        # The reader left (or a read failed): wind down the sheet's XML writers, then the
        # zip, in that order, so that nothing writes to a closed file later.
        for step in (
            getattr(sheet._rows, "close", None),
            sheet._writer.xf.close,
            entry.close,
            archive.close,
        ):
            with contextlib.suppress(Exception):
                if step is not None:
                    step()
        raise
    workbook.properties.modified = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    PackageWriter(workbook, archive).save()
    bridge.finish()


async def _xlsx(rows: AsyncIterator[list[Any]], columns: list[str]) -> AsyncGenerator[bytes]:
    bridge = _Bridge(asyncio.get_running_loop(), rows)
    writer = asyncio.ensure_future(asyncio.to_thread(_write_xlsx, bridge, columns))
    try:
        while True:
            getter = asyncio.ensure_future(bridge.pieces.get())
            await asyncio.wait([getter, writer], return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                writer.result()  # the writer failed: raise its error
                raise RuntimeError("the XLSX writer stopped without finishing")
            piece = getter.result()
            if piece is None:
                break
            yield piece
        await writer
    finally:
        bridge.aborted.set()
        await asyncio.wait([writer])  # the thread notices an abort within half a second
        await bridge.settle()
        if not writer.cancelled():
            writer.exception()  # retrieved; after an abort it is the expected _Aborted
