"""Parquet exports: typed columns from the declared schemas, read back with pyarrow and with
DuckDB and compared row by row with the ledger; part files; ``analyze -o x.parquet``."""

from __future__ import annotations

import asyncio
import datetime
import io
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imagestream.common import export, ledger
from imagestream.common.export.formats import parquet
from imagestream.devtools import corpus, ledgerfill
from imagestream.devtools.imageserver import ImageServer, Reply

from .procs import service_env
from .test_export import Items, make_batch

SCHEMA: dict[str, Any] = {
    "caption": {"type": "string"},
    "tags": {"type": "array", "items": {"type": "string"}},
    "score": {"type": "number"},
    "count": {"type": "integer"},
    "flag": {"type": "boolean"},
    "taken_at": {"type": ["string", "null"], "format": "date-time"},
    "colors": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"hex": {"type": "string"}, "share": {"type": "number"}},
        },
    },
    "box": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}}},
    "category": {"type": "string", "enum": ["product", "other"]},
    "extra": None,  # a field nobody declared a type for
}
ITEMS: Items = [
    (
        "https://img.example.com/a.jpg",
        {"sku": "=1+2", "qty": 3, "labels": ["x", "y"]},
        {"caption": "a cat", "tags": ["cat", "=evil"], "score": 0.75, "count": 3, "flag": True,
         "taken_at": "2021-05-01T12:30:00", "colors": [{"hex": "#aa3311", "share": 0.6}],
         "box": {"x": 1, "y": 2}, "category": "product", "extra": {"k": 1}},
    ),
    ("https://img.example.com/b.jpg", {"sku": "B"}, "HTTP 404"),
    (
        "https://img.example.com/c.jpg",
        {"sku": "C", "qty": "many"},
        # Values that do not have their declared type are null in Parquet.
        {"caption": "", "tags": [], "score": "high", "count": 2.5, "flag": False,
         "taken_at": "yesterday", "colors": [], "box": None, "category": "other",
         "extra": "plain"},
    ),
]  # fmt: skip


@pytest.fixture
async def batch(pool: asyncpg.Pool, prefix: str) -> uuid.UUID:
    return await make_batch(pool, prefix, ITEMS, SCHEMA, source_format="jsonl")


def _typed(value: Any, schema: dict[str, Any] | None) -> Any:
    """What a ledger value becomes in Parquet, by its declared type: the test's oracle."""
    if value is None:
        return None
    if schema is None:  # undeclared: text, JSON for anything but a string
        return value if isinstance(value, str) else _json(value)
    kind = schema["type"][0] if isinstance(schema["type"], list) else schema["type"]
    if kind == "string" and schema.get("format") == "date-time":
        try:
            moment = datetime.datetime.fromisoformat(value)
        except (TypeError, ValueError):
            return None
        return moment if moment.tzinfo else moment.replace(tzinfo=datetime.UTC)
    checks = {
        "string": lambda v: isinstance(v, str),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "array": lambda v: isinstance(v, list),
        "object": lambda v: isinstance(v, dict),
    }
    if not checks[kind](value):
        return None
    if kind == "number":
        return float(value)
    if kind == "array":
        return [_typed(v, schema["items"]) for v in value]
    if kind == "object":
        return {k: _typed(value.get(k), s) for k, s in schema["properties"].items()}
    return value


def _json(value: Any) -> str:
    # PostgreSQL's jsonb text: a space after ':' and ','
    import json

    return json.dumps(value, separators=(", ", ": "))


async def ledger_rows(
    pool: asyncpg.Pool, batch_id: uuid.UUID, text: frozenset[str] = frozenset()
) -> list[dict[str, Any]]:
    """The export's rows as the ledger holds them, typed as the schemas say (the analysis
    fields in ``text`` as if nothing declared their type)."""
    batch = await ledger.batch(pool, batch_id)
    metadata_columns = batch["metadata_columns"]
    schema = {k: v for k, v in (batch["analysis_schema"] or {}).items() if k not in text}
    rows = await pool.fetch(
        """
        SELECT i.url, i.state, i.error_class, i.error_message, i.metadata, r.width, r.height,
               r.format, r.bytes, encode(r.sha256, 'hex') AS sha256, r.duplicate_group,
               r.analysis, r.input_tokens,
               r.output_tokens, r.thought_tokens, r.cost_usd, r.cache_hit
        FROM items i LEFT JOIN results r ON r.item_id = i.id
        WHERE i.batch_id = $1 ORDER BY i.line
        """,
        batch_id,
    )
    text_input = batch["source_format"] == "csv"
    out = []
    for r in rows:
        metadata, analysis = r["metadata"] or {}, r["analysis"] or {}
        row: dict[str, Any] = {
            "url": r["url"], "status": r["state"], "error_class": r["error_class"],
            "error_message": r["error_message"], "width": r["width"], "height": r["height"],
            "format": r["format"], "bytes": r["bytes"], "sha256": r["sha256"],
            "duplicate_group": r["duplicate_group"],
        }  # fmt: skip
        for key in metadata_columns:
            row[key] = _typed(metadata.get(key), {"type": "string"} if text_input else None)
        for key in batch["analysis_columns"]:
            row[f"analysis.{key}"] = _typed(analysis.get(key), schema.get(key))
        row |= {
            "input_tokens": r["input_tokens"], "output_tokens": r["output_tokens"],
            "thought_tokens": r["thought_tokens"],
            "cost_usd": float(r["cost_usd"]) if r["cost_usd"] is not None else None,
            "cache_hit": r["cache_hit"],
        }  # fmt: skip
        out.append(row)
    return out


async def parquet_bytes(pool: asyncpg.Pool, batch_id: uuid.UUID, **filters: Any) -> bytes:
    row = await ledger.batch(pool, batch_id)
    selection = export.Selection(
        pool, batch_id, export.batch_layout(row), export.Filters(**filters)
    )
    return b"".join([piece async for piece in export.SINKS["parquet"].write(selection)])


def duckdb_rows(path: str) -> list[dict[str, Any]]:
    result = duckdb.sql(f"SELECT * FROM read_parquet('{path}')")
    return [dict(zip(result.columns, values, strict=True)) for values in result.fetchall()]


async def test_every_row_reads_back_as_the_ledger_holds_it(
    pool: asyncpg.Pool, batch: uuid.UUID, tmp_path: Path
) -> None:
    path = tmp_path / "results.parquet"
    path.write_bytes(await parquet_bytes(pool, batch))
    expected = await ledger_rows(pool, batch)
    assert [r["analysis.count"] for r in expected] == [3, None, None]  # the oracle types too
    table = pq.read_table(path)
    assert table.column_names == list(expected[0])
    assert table.to_pylist() == expected
    assert duckdb_rows(str(path)) == expected


async def test_columns_are_typed_from_the_schemas(pool: asyncpg.Pool, batch: uuid.UUID) -> None:
    schema = pq.read_schema(io.BytesIO(await parquet_bytes(pool, batch)))
    types = {name: schema.field(name).type for name in schema.names}
    assert types["width"] == pa.int32() and types["bytes"] == pa.int64()
    assert types["duplicate_group"] == pa.int64()
    assert types["cost_usd"] == pa.float64() and types["cache_hit"] == pa.bool_()
    assert types["analysis.tags"] == pa.list_(pa.string())
    assert types["analysis.count"] == pa.int64() and types["analysis.flag"] == pa.bool_()
    assert types["analysis.taken_at"] == pa.timestamp("us", tz="UTC")
    assert types["analysis.colors"] == pa.list_(
        pa.struct([("hex", pa.string()), ("share", pa.float64())])
    )
    assert types["analysis.box"] == pa.struct([("x", pa.int64()), ("y", pa.int64())])
    # Undeclared: text. A JSONL input's extra columns carry no types.
    assert types["analysis.extra"] == types["qty"] == types["labels"] == pa.string()


async def test_integers_beyond_their_type_make_their_column_text(
    pool: asyncpg.Pool, prefix: str, tmp_path: Path
) -> None:
    """A model's uint64 (a hash, say) at the top and deep in a struct, and 2**70 put in
    the ledger by hand: those columns become text, the export does not fail."""
    big = 2**64 - 1
    items: Items = [
        (ITEMS[0][0], {"sku": "A", "qty": big}, {**ITEMS[0][2], "count": big}),  # type: ignore[dict-item]
        ITEMS[1],
        (ITEMS[2][0], ITEMS[2][1], {**ITEMS[2][2], "box": {"x": 1, "y": 2**63}}),  # type: ignore[dict-item]
    ]
    batch_id = await make_batch(pool, prefix, items, SCHEMA, source_format="jsonl")
    await pool.execute(
        "UPDATE results SET analysis = jsonb_set(analysis, '{count}', $2::text::jsonb)"
        " WHERE batch_id = $1 AND analysis->>'count' = $3",
        batch_id,
        str(2**70),
        str(big),
    )
    path = tmp_path / "wide.parquet"
    path.write_bytes(await parquet_bytes(pool, batch_id))
    table = pq.read_table(path)
    types = {name: table.schema.field(name).type for name in table.column_names}
    assert types["analysis.count"] == types["analysis.box"] == types["qty"] == pa.string()
    assert types["analysis.score"] == pa.float64()  # the other columns keep their types
    assert table.column("analysis.count").to_pylist() == [str(2**70), None, "2.5"]
    expected = await ledger_rows(pool, batch_id, text=frozenset({"count", "box"}))
    expected[0]["analysis.count"] = str(2**70)  # the oracle's JSON decoder reads a float
    assert expected[2]["analysis.box"] == '{"x": 1, "y": 9223372036854775808}'
    assert expected[0]["qty"] == str(big)
    assert table.to_pylist() == expected
    assert duckdb_rows(str(path)) == expected


async def test_an_input_column_declared_integer_falls_back_too(
    pool: asyncpg.Pool, prefix: str
) -> None:
    items: Items = [
        ("https://img.example.com/a.jpg", {"qty": 2**64 - 1}, "HTTP 404"),
        ("https://img.example.com/b.jpg", {"qty": 7}, "HTTP 404"),
    ]
    batch_id = await make_batch(pool, prefix, items, SCHEMA, source_format="jsonl")
    row = await ledger.batch(pool, batch_id)
    typed = export.layout(
        row["metadata_columns"], row["analysis_columns"], SCHEMA, {"qty": {"type": "integer"}}
    )

    async def qty() -> pa.ChunkedArray:
        pieces = export.SINKS["parquet"].write(export.Selection(pool, batch_id, typed))
        return pq.read_table(io.BytesIO(b"".join([p async for p in pieces]))).column("qty")

    assert (await qty()).to_pylist() == [str(2**64 - 1), "7"]
    await pool.execute(
        "UPDATE items SET metadata = '{\"qty\": 5}' WHERE batch_id = $1 AND line = 2", batch_id
    )
    column = await qty()
    assert column.type == pa.int64() and column.to_pylist() == [5, 7]


async def test_a_text_input_keeps_its_columns_as_text(pool: asyncpg.Pool, prefix: str) -> None:
    batch_id = await make_batch(pool, prefix, ITEMS[:1], SCHEMA, source_format="csv")
    table = pq.read_table(io.BytesIO(await parquet_bytes(pool, batch_id)))
    assert table.schema.field("sku").type == pa.string()
    assert table.to_pylist() == await ledger_rows(pool, batch_id)


async def test_an_empty_selection_is_a_file_with_the_columns(
    pool: asyncpg.Pool, batch: uuid.UUID
) -> None:
    table = pq.read_table(io.BytesIO(await parquet_bytes(pool, batch, states=["skipped"])))
    assert table.num_rows == 0 and "analysis.colors" in table.column_names


async def test_big_exports_split_into_part_files(
    pool: asyncpg.Pool, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The code paths of a million rows (many blocks, row groups, parts) over 5,000.
    monkeypatch.setattr(parquet, "ROW_GROUP_ROWS", 1000)
    monkeypatch.setattr(parquet, "BLOCK_BYTES", 64 * 1024)
    batch_id = await ledgerfill.finished_batch(pool, 5000, pipeline=prefix)
    row = await ledger.batch(pool, batch_id)
    selection = export.Selection(pool, batch_id, export.batch_layout(row))
    files: dict[int, bytearray] = {}
    order = []
    async for number, piece in parquet.shards(selection, 2000):
        if number not in files:
            order.append(number)
            files[number] = bytearray()
        files[number] += piece
    assert order == [0, 1, 2]
    for number, data in files.items():
        (tmp_path / f"part-{number:05d}.parquet").write_bytes(data)
    metadata = [pq.read_metadata(tmp_path / f"part-{n:05d}.parquet") for n in order]
    assert [m.num_rows for m in metadata] == [2000, 2000, 1000]
    assert [m.num_row_groups for m in metadata] == [2, 2, 1]
    expected = await ledger_rows(pool, batch_id)
    assert duckdb_rows(str(tmp_path / "part-*.parquet")) == expected


async def test_analyze_writes_parquet(redis_url: str, database_url: str, tmp_path: Path) -> None:
    """The local analyzer's fields arrive typed: its declared schema reaches the export."""
    samples = corpus.mixed(3, sizes=((64, 48), (64, 48)), formats=("JPEG", "PNG"), seed=5)
    server = ImageServer({s.name: Reply(s.data) for s in samples})
    await server.start()
    try:
        listing = tmp_path / "urls.csv"
        listing.write_text("url,title\n" + "".join(f"{server.url(s.name)},t\n" for s in samples))
        output = tmp_path / "results.parquet"
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
    table = pq.read_table(output)
    assert table.num_rows == 3 and set(table.column("status").to_pylist()) == {"succeeded"}
    types = {name: table.schema.field(name).type for name in table.column_names}
    assert types["analysis.brightness"] == pa.float64()
    assert types["analysis.is_blurry"] == pa.bool_()
    assert types["analysis.exif_taken_at"] == pa.timestamp("us", tz="UTC")
    assert types["analysis.dominant_colors"] == pa.list_(
        pa.struct([("hex", pa.string()), ("share", pa.float64())])
    )
    colors = table.column("analysis.dominant_colors").to_pylist()
    assert all(c and 0 < c[0]["share"] <= 1 for c in colors)
