"""XLSX (openpyxl write-only): types kept (numbers, booleans, text), a bold header row,
frozen panes (header and URL column), column widths by kind, and a new sheet after
1,048,575 data rows (Excel's row limit, less the header). Sheet XML goes into the zip as
rows arrive, so the download starts at once. Text is made inert (formulas.py); lists and
objects are JSON text."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime
import threading
import zipfile
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from ..columns import Column
from ..formulas import neutralize
from ..source import Selection

#: Rows handed to the writer thread at a time.
_PULL_ROWS = 1000
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
                if len(batch) >= _PULL_ROWS:
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


_WIDTHS = {"url": 60, "error_message": 40, "sha256": 24, "status": 16, "error_class": 16,
           "format": 16}  # fmt: skip


def _column_width(column: Column) -> float:
    if column.name in _WIDTHS:
        return _WIDTHS[column.name]
    if (column.schema or {}).get("type") in ("integer", "number", "boolean"):
        return 12
    return 20


def _write_xlsx(bridge: _Bridge, columns: Sequence[Column]) -> None:
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
        for index, column in enumerate(columns, 1):
            sheet.column_dimensions[get_column_letter(index)].width = _column_width(column)
        sheet.freeze_panes = "B2"
        sheet._id = number  # as ExcelWriter numbers them: its path in the package
        entry = archive.open(sheet.path[1:], "w", force_zip64=True)
        sheet._writer = WorksheetWriter(sheet, out=entry)
        sheet._writer.write_top()
        header = []
        for column in columns:
            title = WriteOnlyCell(sheet, column.name)
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


async def encode(
    rows: AsyncIterator[list[Any]], columns: Sequence[Column]
) -> AsyncGenerator[bytes]:
    """The workbook of ``rows`` in pieces, as the writer thread makes them."""
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


@dataclass(frozen=True)
class XlsxSink:
    name: str = "xlsx"
    media_type: str = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
    suffix: str = ".xlsx"

    @property
    def openapi_schema(self) -> dict[str, Any]:
        return {"type": "string", "contentMediaType": self.media_type}

    async def write(self, selection: Selection) -> AsyncGenerator[bytes]:
        async with (
            contextlib.aclosing(selection.rows()) as rows,
            contextlib.aclosing(encode(rows, selection.layout.columns)) as pieces,
        ):
            async for piece in pieces:
                yield piece


SINKS = (XlsxSink(),)
