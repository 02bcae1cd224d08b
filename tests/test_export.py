"""Exports: formats, types, filters and formula neutralization, from rows written through
the ledger's own functions (no pipeline run needed), plus ``analyze -o results.xlsx``."""

from __future__ import annotations

import asyncio
import csv
import datetime
import io
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import openpyxl
import orjson
import pytest

from imagestream.common import export, ledger, messages
from imagestream.common.export.formats import xlsx
from imagestream.common.inputs import Row
from imagestream.devtools import corpus
from imagestream.devtools.imageserver import ImageServer, Reply

from .helpers import wait_for
from .procs import service_env

ANALYSIS = ["tags", "category", "score", "count", "flag", "nested.a.b"]
#: (url, metadata, outcome): outcome is an analysis dict (succeeded) or an error message.
Items = list[tuple[str, dict[str, Any], dict[str, Any] | str]]
ITEMS: Items = [
    (
        "https://img.example.com/a.jpg",
        {"sku": "=1+2", "note": "-5"},
        {"tags": ["cat", "=evil"], "category": "@SUM(A1)", "score": 0.75, "count": 3,
         "flag": True, "nested": {"a": {"b": "+x"}}},
    ),
    ("https://img.example.com/b.jpg", {"sku": "\tTAB", "note": "\rCR"}, "=HYPERLINK(\"x\")"),
    (
        "https://img.example.com/c.jpg",
        {"sku": "plain", "note": "#N/A"},
        {"tags": ["dog"], "category": "product", "score": 0.1, "count": 12, "flag": False},
    ),
]  # fmt: skip


async def make_batch(
    pool: asyncpg.Pool,
    pipeline: str,
    items: Items = ITEMS,
    analysis_schema: dict[str, Any] | None = None,
    source_format: str = "csv",
) -> uuid.UUID:
    """A finished batch of ``items``, written through the ledger like the pipeline does;
    its analysis columns are ANALYSIS, or the fields of ``analysis_schema``."""
    batch_id = await ledger.create_batch(
        pool,
        ledger.NewBatch(
            name="exports",
            pipeline=pipeline,
            analysis_columns=list(analysis_schema or ANALYSIS),
            analysis_schema=analysis_schema,
        ),
    )
    rows = [Row(line, url, meta) for line, (url, meta, _) in enumerate(items, 2)]
    async with pool.acquire() as conn:
        await ledger.insert_items(conn, batch_id, rows)
        ids = {
            r["url"]: r["id"]
            for r in await conn.fetch("SELECT id, url FROM items WHERE batch_id = $1", batch_id)
        }
        results = []
        for url, _, outcome in items:
            common = {"batch_id": str(batch_id), "item_id": ids[url]}
            if isinstance(outcome, dict):
                results.append(
                    messages.ItemResult(
                        **common,
                        status="succeeded",
                        stage="analyzer",
                        facts=messages.ImageFacts(
                            width=640, height=480, format="JPEG", mode="RGB", bytes=12345,
                            sha256="ab" * 32,
                        ),
                        analyzer="local",
                        analysis=outcome,
                        usage=messages.Usage(input_tokens=258, output_tokens=40, thought_tokens=9, cost_usd=0.00012),
                    )
                )  # fmt: skip
            else:
                results.append(
                    messages.ItemResult(
                        **common,
                        status="failed",
                        stage="fetcher",
                        error_class="not_found",
                        error_message=outcome,
                    )
                )
        await ledger.apply_results(conn, results)
        columns = list(dict.fromkeys(key for _, meta, _ in items for key in meta))
        await ledger.finish_ingest(conn, batch_id, source_format, columns)
    return batch_id


@pytest.fixture
async def batch(pool: asyncpg.Pool, prefix: str) -> uuid.UUID:
    return await make_batch(pool, prefix)


async def exported(
    pool: asyncpg.Pool,
    batch_id: uuid.UUID,
    fmt: str,
    filters: export.Filters | None = None,
) -> bytes:
    row = await ledger.batch(pool, batch_id)
    selection = export.Selection(
        pool, batch_id, export.batch_layout(row), filters or export.Filters()
    )
    pieces = export.SINKS[fmt].write(selection)
    return b"".join([piece async for piece in pieces])


def csv_rows(data: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(data.decode(), newline="")))


async def test_csv_flattens_and_neutralizes(pool: asyncpg.Pool, batch: uuid.UUID) -> None:
    rows = csv_rows(await exported(pool, batch, "csv"))
    assert [r["url"] for r in rows] == [url for url, _, _ in ITEMS]
    a, b, c = rows
    assert list(a)[: len(export.LEADING)] == list(export.LEADING)
    assert list(a)[-len(export.TRAILING) :] == list(export.TRAILING)
    assert (a["sku"], a["note"]) == ("'=1+2", "-5")  # a plain number stays a number
    assert a["analysis.category"] == "'@SUM(A1)"
    assert a["analysis.nested.a.b"] == "'+x"  # a dotted column reaches into objects
    assert orjson.loads(a["analysis.tags"]) == ["cat", "=evil"]
    assert (a["analysis.score"], a["analysis.count"], a["analysis.flag"]) == ("0.75", "3", "true")
    assert (a["width"], a["height"], a["bytes"], a["sha256"]) == ("640", "480", "12345", "ab" * 32)
    assert (a["input_tokens"], a["output_tokens"], a["thought_tokens"]) == ("258", "40", "9")
    assert (a["cache_hit"], b["cache_hit"]) == ("false", "")  # b failed: no result
    assert float(a["cost_usd"]) == pytest.approx(0.00012)
    assert (b["sku"], b["note"]) == ("'\tTAB", "'\rCR")
    assert b["status"] == "failed" and b["error_class"] == "not_found"
    assert b["error_message"] == '\'=HYPERLINK("x")'
    assert b["width"] == b["analysis.score"] == ""
    assert (c["note"], c["analysis.flag"]) == ("#N/A", "false")
    for row in rows:  # no cell of the file can start a formula
        assert not any(v and v[0] in "=+@\t\r" for v in row.values()), row


async def test_xlsx_keeps_types_and_neutralizes(pool: asyncpg.Pool, batch: uuid.UUID) -> None:
    book = openpyxl.load_workbook(io.BytesIO(await exported(pool, batch, "xlsx")))
    sheet = book["results"]
    assert sheet.freeze_panes == "B2"
    assert sheet.column_dimensions["A"].width == 60
    header = [c.value for c in sheet[1]]
    assert header == list(csv_rows(await exported(pool, batch, "csv"))[0])
    assert all(c.font.bold for c in sheet[1])
    rows = [dict(zip(header, (c for c in r), strict=True)) for r in sheet.iter_rows(min_row=2)]
    a, b, c = rows
    assert a["width"].value == 640 and a["width"].data_type == "n"
    assert a["analysis.score"].value == 0.75 and a["analysis.count"].value == 3
    assert a["analysis.flag"].value is True and a["analysis.flag"].data_type == "b"
    assert a["cost_usd"].value == pytest.approx(0.00012)
    assert a["thought_tokens"].value == 9 and a["cache_hit"].value is False
    assert a["sku"].value == "'=1+2" and a["note"].value == "-5"
    assert a["analysis.category"].value == "'@SUM(A1)"
    assert orjson.loads(a["analysis.tags"].value) == ["cat", "=evil"]
    assert b["error_message"].value == '\'=HYPERLINK("x")'
    assert b["width"].value is None
    # XML reads a stored CR back as LF; either way the cell starts with the quote.
    assert b["sku"].value == "'\tTAB" and b["note"].value in ("'\rCR", "'\nCR")
    assert c["note"].value == "#N/A" and c["note"].data_type == "s"  # text, not an error value
    cells = [cell for row in rows for cell in row.values()]
    assert not any(cell.data_type == "f" for cell in cells)


async def test_csv_and_xlsx_agree_cell_for_cell(pool: asyncpg.Pool, batch: uuid.UUID) -> None:
    """CSV comes from SQL, XLSX from Python: the same text either way."""
    from_csv = csv_rows(await exported(pool, batch, "csv"))
    sheet = openpyxl.load_workbook(io.BytesIO(await exported(pool, batch, "xlsx")))["results"]
    header = [c.value for c in sheet[1]]
    for csv_row, xlsx_row in zip(
        from_csv, sheet.iter_rows(min_row=2, values_only=True), strict=True
    ):
        for name, value in zip(header, xlsx_row, strict=True):
            if isinstance(value, str) and not value.startswith("["):
                assert csv_row[name].replace("\r", "\n") == value, name  # XML: CR reads as LF
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                assert float(csv_row[name]) == pytest.approx(value), name


async def test_json_and_jsonl_keep_native_values(pool: asyncpg.Pool, batch: uuid.UUID) -> None:
    as_json = orjson.loads(await exported(pool, batch, "json"))
    as_jsonl = [orjson.loads(line) for line in (await exported(pool, batch, "jsonl")).splitlines()]
    assert as_json == as_jsonl
    a = as_json[0]
    assert a["analysis.tags"] == ["cat", "=evil"] and a["analysis.flag"] is True
    assert a["sku"] == "=1+2"  # JSON is for programs: values as they are
    assert as_json[1]["width"] is None


@pytest.mark.parametrize(
    ("conditions", "urls"),
    [
        (["tags:contains:CAT"], ["a"]),
        (["category:eq:product"], ["c"]),
        (["category:contains:sum"], ["a"]),
        (["score:gt:0.5"], ["a"]),
        (["count:lte:3"], ["a"]),
        (["count:gte:3", "flag:eq:false"], ["c"]),
        (["flag:ne:true"], ["b", "c"]),
        (["input.sku:eq:plain"], ["c"]),
        (["nested.a.b:exists"], ["a"]),
        (["count:eq:12.0"], ["c"]),
    ],
)
async def test_field_conditions(
    pool: asyncpg.Pool, batch: uuid.UUID, conditions: list[str], urls: list[str]
) -> None:
    filters = export.Filters(conditions=[export.Condition.parse(c) for c in conditions])
    rows = csv_rows(await exported(pool, batch, "csv", filters))
    assert [r["url"].rsplit("/", 1)[1][0] for r in rows] == urls


async def test_state_class_and_time_filters(pool: asyncpg.Pool, batch: uuid.UUID) -> None:
    async def urls(**kwargs: Any) -> list[str]:
        rows = csv_rows(await exported(pool, batch, "csv", export.Filters(**kwargs)))
        return [r["url"].rsplit("/", 1)[1][0] for r in rows]

    now = datetime.datetime.now(datetime.UTC)
    assert await urls(states=["failed"]) == ["b"]
    assert await urls(states=["succeeded"], error_classes=["not_found"]) == []
    assert await urls(error_classes=["not_found"]) == ["b"]
    assert await urls(created_after=now - datetime.timedelta(hours=1)) == ["a", "b", "c"]
    assert await urls(created_before=now - datetime.timedelta(hours=1)) == []


@pytest.mark.parametrize("text", ["tags", "tags:like:x", "score:gt:abc", "category:eq:", ":eq:1"])
def test_bad_conditions_say_why(text: str) -> None:
    with pytest.raises(ValueError, match="bad field condition"):
        export.Condition.parse(text)


async def test_xlsx_continues_on_a_new_sheet(
    pool: asyncpg.Pool, batch: uuid.UUID, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Excel's limit is 1,048,575 data rows per sheet; the same code path with a limit of 2.
    monkeypatch.setattr(xlsx, "XLSX_SHEET_ROWS", 2)
    book = openpyxl.load_workbook(io.BytesIO(await exported(pool, batch, "xlsx")))
    assert book.sheetnames == ["results", "results 2"]
    first, second = (list(book[n].iter_rows(values_only=True)) for n in book.sheetnames)
    assert first[0] == second[0] and first[0][0] == "url"  # a header on every sheet
    assert [r[0] for r in first[1:] + second[1:]] == [url for url, _, _ in ITEMS]


async def test_an_abandoned_export_releases_its_connection(pool: asyncpg.Pool, prefix: str) -> None:
    from imagestream.devtools import ledgerfill

    batch_id = await ledgerfill.finished_batch(pool, 20_000, pipeline=prefix)
    row = await ledger.batch(pool, batch_id)
    selection = export.Selection(pool, batch_id, export.batch_layout(row))
    in_use = pool.get_size() - pool.get_idle_size()
    for fmt in export.FORMATS:
        pieces = export.SINKS[fmt].write(selection)
        if fmt == "xlsx":  # the reader goes away while the workbook is being written
            first = asyncio.ensure_future(anext(pieces))
            await asyncio.sleep(0.3)
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
        else:  # the reader goes away mid-file
            await anext(pieces)
            await anext(pieces)
        await pieces.aclose()

    async def released() -> bool:
        # A connection whose COPY was cut off may be closed rather than reused: count the
        # connections in use, not the idle ones.
        return pool.get_size() - pool.get_idle_size() <= in_use

    await wait_for(released, timeout=10)
    assert await pool.fetchval("SELECT count(*) FROM items WHERE batch_id = $1", batch_id) == 20_000


async def test_analyze_writes_xlsx(redis_url: str, database_url: str, tmp_path: Path) -> None:
    samples = corpus.mixed(6, sizes=((64, 48), (64, 48)), formats=("JPEG", "PNG"), seed=3)
    server = ImageServer({s.name: Reply(s.data) for s in samples})
    await server.start()
    try:
        listing = tmp_path / "urls.csv"
        listing.write_text(
            "url,title\n"
            + "".join(f"{server.url(s.name)},=cmd|' /C calc'!A0\n" for s in samples)
            + f"{server.url('missing.jpg')},gone\n"
        )
        output = tmp_path / "results.xlsx"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "imagestream.cli", "analyze", str(listing), "-o", str(output),
            "--no-progress",
            env=service_env(redis_url, database_url, "is"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        _, stderr = await asyncio.wait_for(proc.communicate(), timeout=180)
    finally:
        await server.stop()
    assert proc.returncode == 0, stderr.decode()[-2000:]
    sheet = openpyxl.load_workbook(output)["results"]
    rows = list(sheet.iter_rows(values_only=True))
    header, body = rows[0], rows[1:]
    assert len(body) == 7
    by_status = {r[header.index("status")] for r in body}
    assert by_status == {"succeeded", "failed"}
    ok = next(r for r in body if r[header.index("status")] == "succeeded")
    assert isinstance(ok[header.index("width")], int) and ok[header.index("width")] == 64
    assert all(
        r[header.index("title")].startswith("'=")
        for r in body
        if r[header.index("title")] != "gone"
    )


async def test_xlsx_streams_before_the_last_row_is_read() -> None:
    """The first bytes of the workbook leave while rows are still being read."""
    pulled = 0
    total = 30_000

    async def rows() -> AsyncIterator[list[Any]]:
        nonlocal pulled
        for i in range(total):
            pulled += 1
            yield [f"https://img.example.com/{i}.jpg", "succeeded", None, None, i, i, "JPEG", i,
                   "ab" * 32, f"note {i} " * 8, 0, 0, 0, 0.0, False]  # fmt: skip

    note = export.Column("note", "", export.columns.STRING)
    columns = [*export.LEADING_COLUMNS, note, *export.TRAILING_COLUMNS]
    pieces = xlsx.encode(rows(), columns)
    await anext(pieces)
    assert pulled < total
    rest = b"".join([piece async for piece in pieces])
    assert pulled == total and b"PK\x05\x06" in rest  # ...and the zip's end record came last
