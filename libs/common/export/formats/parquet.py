"""Parquet (zstd, row groups of ``ROW_GROUP_ROWS``), typed column by column from the
columns' JSON Schemas: integers, floats, booleans, text, timestamps (``format: date-time``,
as UTC; a time without an offset is read as UTC), lists as Arrow lists and objects as
structs. A field nobody declared a type for is text: a string as it is, any other value as
its JSON. Values that do not have their column's declared type are null. A column whose
integers do not all fit their Arrow type (int64, or int32 for ``format: int32``: a model
answering 2**70 where an integer is declared), anywhere in its lists and structs, is text
like an undeclared one: a query over the batch finds such columns before the first row
is written, as a Parquet file's columns have one type from the first row to the last.

PostgreSQL writes each row as one JSON object (``COPY``, compact ``row_to_json``), and
Arrow's JSON reader turns blocks of them into typed columns in C++, in a worker thread
while the next block arrives: Python never touches a row, so a million rows take about
as long as the CSV export. Memory: one block being read, one being parsed, one row group
(the blocks' tables, written without combining them first). Output leaves as each row
group is written (``ParquetWriter`` on a file-like object). pyarrow is imported on the
first Parquet export: a process that never writes one does not carry its ~50 MB.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import logging
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..columns import Column, Schema, sql_literal
from ..source import RowCounter, Selection

if TYPE_CHECKING:
    import pyarrow as pa

ROW_GROUP_ROWS = 65_536
#: Bytes of JSON rows parsed at a time (about 2,500 rows of a typical export): 4 MiB
#: blocks raised a 1M-row export's peak by ~25 MB and were no faster.
BLOCK_BYTES = 1 << 20
MEDIA_TYPE = "application/vnd.apache.parquet"

log = logging.getLogger(__name__)
# A date-time as Arrow parses it (RFC 3339, or without an offset, or with a space).
_DATE_TIME = r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|[+-]\d{2}(:?\d{2})?)?$"


_JSON_TYPES = {"integer": "number", "number": "number", "boolean": "boolean",
               "string": "string", "array": "array", "object": "object"}  # fmt: skip


def _declared(schema: Schema | None) -> str | None:
    """The JSON type a schema gives its values, if it is one Arrow can type."""
    if schema is None:
        return None
    kind = schema.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        kind = kinds[0] if len(kinds) == 1 else None
    if kind is None and schema.get("enum"):
        kind = "integer" if all(isinstance(v, int) for v in schema["enum"]) else "string"
    if kind == "array" and not isinstance(schema.get("items"), Mapping):
        return None
    if kind == "object" and not (
        isinstance(schema.get("properties"), Mapping) and schema["properties"]
    ):
        return None
    return kind if kind in _JSON_TYPES else None


def _integer_bits(schema: Schema) -> int:
    """The width of the Arrow integer an integer schema's values become."""
    return 32 if schema.get("format") == "int32" else 64


def _integer_paths(schema: Schema | None, path: str = "$") -> list[tuple[str, int]]:
    """(SQL/JSON path, bits) of each place a column's values hold a declared integer."""
    kind = _declared(schema)
    if schema is None or kind not in ("integer", "array", "object"):
        return []
    if kind == "integer":
        return [(path, _integer_bits(schema))]
    if kind == "array":
        return _integer_paths(schema["items"], path + "[*]")
    escape = str.maketrans({"\\": "\\\\", '"': '\\"'})
    return [
        found
        for name, member in schema["properties"].items()
        for found in _integer_paths(member, f'{path}."{name.translate(escape)}"')
    ]


#: Where the rows of each document of a batch are, for ``_fitting_columns``.
_DOCUMENT_ROWS = {"analysis": "results r WHERE r.batch_id = $1",
                  "metadata": "items i WHERE i.batch_id = $1"}  # fmt: skip


async def _fitting_columns(selection: Selection) -> tuple[Column, ...]:
    """The export's columns, those holding an integer beyond their Arrow type made text.
    The whole batch decides, whatever the filters: one table (results, or items) read
    instead of the export's join, and every export of a batch has the same types."""
    columns = selection.layout.columns
    checks: dict[str, list[tuple[int, str]]] = {}
    for at, column in enumerate(columns):
        if column.field is None:
            continue
        outside = [
            f"jsonb_path_exists({column.sql},"
            f" {sql_literal(f'{path} ? (@ < {-(2 ** (bits - 1))} || @ > {2 ** (bits - 1) - 1})')})"
            for path, bits in _integer_paths(column.schema)
        ]
        if outside:
            checks.setdefault(column.field[0], []).append((at, " OR ".join(outside)))
    wide: set[int] = set()
    for document, tests in checks.items():
        aggregates = ", ".join(f"coalesce(bool_or({test}), false)" for _, test in tests)
        found = await selection.pool.fetchrow(
            f"SELECT {aggregates} FROM {_DOCUMENT_ROWS[document]}", selection.batch_id
        )
        wide.update(at for (at, _), hit in zip(tests, found, strict=True) if hit)
    for at in sorted(wide):
        log.info("parquet column %s has integers its type cannot hold: text", columns[at].name)
    return tuple(
        dataclasses.replace(column, schema=None) if at in wide else column
        for at, column in enumerate(columns)
    )


def arrow_type(schema: Schema | None) -> pa.DataType:
    """The Arrow type of a column's values; text when the schema declares none."""
    import pyarrow as pa

    kind = _declared(schema)
    if schema is None or kind is None:
        return pa.string()
    if kind == "string" and schema.get("format") == "date-time":
        return pa.timestamp("us", tz="UTC")
    if kind == "integer":
        return pa.int32() if _integer_bits(schema) == 32 else pa.int64()
    if kind == "number":
        return pa.float64()
    if kind == "boolean":
        return pa.bool_()
    if kind == "array":
        return pa.list_(arrow_type(schema["items"]))
    if kind == "object":
        props: Mapping[str, Schema] = schema["properties"]
        order = [p for p in schema.get("propertyOrdering", []) if p in props]
        order += [p for p in props if p not in order]
        return pa.struct([pa.field(p, arrow_type(props[p])) for p in order])
    return pa.string()


def _cells(columns: Sequence[Column]) -> tuple[list[str], str]:
    """Each column's SQL as the JSON value Arrow parses into the column's type, and the
    lateral that computes each JSON field's node (f.nK) once per row."""
    nodes: list[str] = []
    cells: list[str] = []
    for column in columns:
        if column.field is None:
            cells.append(column.sql)  # a ledger column: typed already
            continue
        node = f"f.n{len(nodes)}"
        nodes.append(column.sql)
        kind = _declared(column.schema)
        if kind is None:
            cells.append(
                f"CASE jsonb_typeof({node}) WHEN 'string' THEN {node} #>> '{{}}'"
                f" WHEN 'null' THEN NULL ELSE {node}::text END"
            )
            continue
        test = f"jsonb_typeof({node}) = '{_JSON_TYPES[kind]}'"
        if kind == "integer":
            test += f" AND {node}::numeric = trunc({node}::numeric)"
        elif column.schema is not None and column.schema.get("format") == "date-time":
            test += f" AND {node} #>> '{{}}' ~ '{_DATE_TIME}'"
        cells.append(f"CASE WHEN {test} THEN {node} END")
    laterals = ""
    if nodes:
        laterals = (
            " CROSS JOIN LATERAL (SELECT "
            + ", ".join(f"{n} AS n{k}" for k, n in enumerate(nodes))
            + ") f"
        )
    return cells, laterals


class _Collector(io.RawIOBase):
    """Where ParquetWriter writes: the bytes wait here until taken."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._position = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        piece = bytes(data)
        self._parts.append(piece)
        self._position += len(piece)
        return len(piece)

    def tell(self) -> int:
        return self._position

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


class _Encoder:
    """JSON rows in, Parquet bytes out (one file, or one per ``shard_rows`` rows); used
    by one thread at a time."""

    def __init__(
        self, columns: Sequence[Column], shard_rows: int | None, counter: RowCounter | None
    ) -> None:
        import pyarrow as pa

        self.schema = pa.schema([pa.field(c.name, arrow_type(c.schema)) for c in columns])
        # row_to_json names an anonymous row's fields f1, f2, ...
        self.json_schema = pa.schema(
            [pa.field(f"f{k}", f.type) for k, f in enumerate(self.schema, 1)]
        )
        # Dictionaries only where values repeat by design (enums): for the rest (URLs,
        # hashes, captions) they cost time and, zstd aside, bytes.
        self.dictionary = [c.name for c in columns if c.schema is not None and "enum" in c.schema]
        self.shard_rows = shard_rows
        self.shard = 0
        self.in_shard = 0
        self.counter = counter
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.collector = _Collector()
        self.writer: Any = None

    def feed(self, block: bytes) -> list[tuple[int, bytes]]:
        import pyarrow as pa
        import pyarrow.json as pj

        # Arrow's buffers come from malloc (its "system" pool), not from the mimalloc pool
        # it prefers, which keeps what it freed: an export's peak was ~40 MB higher.
        table = pj.read_json(
            pa.BufferReader(block),
            read_options=pj.ReadOptions(use_threads=False, block_size=len(block) + 1),
            parse_options=pj.ParseOptions(
                explicit_schema=self.json_schema, unexpected_field_behavior="error"
            ),
            memory_pool=pa.system_memory_pool(),
        ).rename_columns(self.schema.names)
        out: list[tuple[int, bytes]] = []
        while table.num_rows:
            room = ROW_GROUP_ROWS - self.pending_rows
            if self.shard_rows is not None:
                room = min(room, self.shard_rows - self.in_shard)
            head, table = table.slice(0, room), table.slice(room)
            self.pending.append(head)
            self.pending_rows += head.num_rows
            self.in_shard += head.num_rows
            if self.counter is not None:
                self.counter.rows += head.num_rows
            if self.pending_rows == ROW_GROUP_ROWS or self.in_shard == self.shard_rows:
                out += self._flush()
            if self.in_shard == self.shard_rows:
                out += self._close_shard()
        return out

    def finish(self) -> list[tuple[int, bytes]]:
        out = self._flush()
        if self.writer is not None or self.shard == 0:
            out += self._close_shard()
        return out

    def _flush(self) -> list[tuple[int, bytes]]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.writer is None:
            self.writer = pq.ParquetWriter(
                self.collector,
                self.schema,
                compression="zstd",
                compression_level=1,
                use_dictionary=self.dictionary,
                memory_pool=pa.system_memory_pool(),
            )
        if self.pending:
            # The blocks' chunks as they are: combining them first would copy the group.
            self.writer.write_table(pa.concat_tables(self.pending), row_group_size=ROW_GROUP_ROWS)
            self.pending.clear()
            self.pending_rows = 0
        return [(self.shard, self.collector.take())]

    def _close_shard(self) -> list[tuple[int, bytes]]:
        if self.writer is None:
            self._flush()  # an empty file still has its schema
        self.writer.close()
        self.writer = None
        out = [(self.shard, self.collector.take())]
        self.shard += 1
        self.in_shard = 0
        return out


async def _blocks(selection: Selection, columns: Sequence[Column]) -> AsyncGenerator[bytes]:
    """The rows as JSON lines, in blocks of about BLOCK_BYTES ending at a line's end."""
    cells, laterals = _cells(columns)
    sql, params = selection.query([f"row_to_json(ROW({', '.join(cells)}))"], laterals)
    # CSV with a quote and a delimiter JSON text never holds (it escapes control
    # characters), so each line is the JSON object verbatim.
    pieces = selection.copy(sql, params, format="csv", quote="\x01", delimiter="\x02")
    block = bytearray()
    async with contextlib.aclosing(pieces):
        async for piece in pieces:
            block += piece
            if len(block) >= BLOCK_BYTES:
                cut = block.rfind(b"\n") + 1
                yield bytes(block[:cut])
                del block[:cut]
    if block:
        yield bytes(block)


async def shards(
    selection: Selection, shard_rows: int | None = None
) -> AsyncGenerator[tuple[int, bytes]]:
    """(file number, piece) of the export as Parquet files of ``shard_rows`` rows each
    (one file if None); a file's pieces come in order, and file n+1 after file n."""
    columns = await _fitting_columns(selection)
    encoder = _Encoder(columns, shard_rows, selection.counter)
    running: asyncio.Future[list[tuple[int, bytes]]] | None = None
    try:
        async with contextlib.aclosing(_blocks(selection, columns)) as blocks:
            async for block in blocks:
                # Parse this block while the next one is read.
                done = await running if running is not None else []
                running = asyncio.ensure_future(asyncio.to_thread(encoder.feed, block))
                for piece in done:
                    yield piece
        done = await running if running is not None else []
        running = None
        for piece in [*done, *await asyncio.to_thread(encoder.finish)]:
            yield piece
    finally:
        if running is not None:
            await asyncio.gather(running, return_exceptions=True)


@dataclass(frozen=True)
class ParquetSink:
    name: str = "parquet"
    media_type: str = MEDIA_TYPE
    suffix: str = ".parquet"

    @property
    def openapi_schema(self) -> dict[str, Any]:
        return {"type": "string", "contentMediaType": self.media_type}

    async def write(self, selection: Selection) -> AsyncGenerator[bytes]:
        async with contextlib.aclosing(shards(selection)) as pieces:
            async for _, piece in pieces:
                if piece:
                    yield piece

    def write_parts(
        self, selection: Selection, part_rows: int
    ) -> AsyncGenerator[tuple[int, bytes]]:
        return shards(selection, part_rows)


SINKS = (ParquetSink(),)
