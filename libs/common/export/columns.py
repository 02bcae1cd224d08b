"""The columns of an export, in order, each once: its name, the SQL that reads it and the
JSON Schema of its values, which every format reads (CSV cells, XLSX cell types, Parquet
column types).

Order (stable, so scripts can rely on it): ``LEADING_COLUMNS``, then the input's extra
columns (renamed ``input.<name>`` if they clash), then the analysis fields as
``analysis.<field>``, then ``TRAILING_COLUMNS``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

#: A JSON Schema of one column's values (the subset profiles use; see profiles.py).
Schema = Mapping[str, Any]
Document = Literal["metadata", "analysis"]

STRING: Schema = {"type": "string"}
INT32: Schema = {"type": "integer", "format": "int32"}
INT64: Schema = {"type": "integer", "format": "int64"}
NUMBER: Schema = {"type": "number"}
BOOLEAN: Schema = {"type": "boolean"}

_DOCUMENT_SQL: dict[Document, str] = {"metadata": "i.metadata", "analysis": "r.analysis"}


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    #: A typed SQL expression over items ``i`` and results ``r``; for a field of a JSON
    #: document (``field`` set), its jsonb node.
    sql: str
    #: The values' JSON Schema; None when nothing declared it (values of any JSON type).
    schema: Schema | None
    #: (document, key) of a field of the item's input row or of its analysis.
    field: tuple[Document, str] | None = None
    #: Text that comes from outside (an error message): spreadsheets must not run it.
    free_text: bool = False


LEADING_COLUMNS: tuple[Column, ...] = (
    Column("url", "i.url", STRING),
    Column("status", "i.state", STRING),
    Column("error_class", "i.error_class", STRING),
    Column("error_message", "i.error_message", STRING, free_text=True),
    Column("width", "r.width", INT32),
    Column("height", "r.height", INT32),
    Column("format", "r.format", STRING),
    Column("bytes", "r.bytes", INT64),
    Column("sha256", "encode(r.sha256, 'hex')", STRING),
    # The id of the first item of the image's near-duplicate group (duplicates.py).
    Column("duplicate_group", "r.duplicate_group", INT64),
)
#: Thinking tokens are billed as output; a cache hit cost nothing.
TRAILING_COLUMNS: tuple[Column, ...] = (
    Column("input_tokens", "r.input_tokens", INT32),
    Column("output_tokens", "r.output_tokens", INT32),
    Column("thought_tokens", "r.thought_tokens", INT32),
    Column("cost_usd", "r.cost_usd::float8", NUMBER),
    Column("cache_hit", "r.cache_hit", BOOLEAN),
)
LEADING = tuple(c.name for c in LEADING_COLUMNS)
TRAILING = tuple(c.name for c in TRAILING_COLUMNS)


def sql_literal(text: str) -> str:
    """``text`` as a PostgreSQL string constant (standard_conforming_strings is on)."""
    return "'" + text.replace("'", "''") + "'"


def json_node(document_sql: str, key: str, key_sql: str | None = None) -> str:
    """The jsonb node of a top-level field, or else of a dotted path into nested objects
    (``safety.violence``), of ``document_sql``; ``key_sql`` is the key as SQL (a literal
    unless given, e.g. a query parameter)."""
    name = key_sql or sql_literal(key)
    if "." in key:
        return f"coalesce({document_sql} -> {name}, {document_sql} #> string_to_array({name}, '.'))"
    return f"({document_sql} -> {name})"


def field_value(document: Mapping[str, Any], key: str) -> Any:
    """A top-level field, or a dotted path into nested objects, as ``json_node`` reads it."""
    if key in document:
        return document[key]
    value: Any = document
    for part in key.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


@dataclass(frozen=True, slots=True)
class Layout:
    columns: tuple[Column, ...]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]


def layout(
    metadata_columns: Sequence[str],
    analysis_columns: Sequence[str],
    analysis_schema: Mapping[str, Schema] | None = None,
    metadata_schema: Mapping[str, Schema] | None = None,
) -> Layout:
    """The columns of a batch's export; the schemas say what each field holds, where known."""
    analysis_names = [f"analysis.{key}" for key in analysis_columns]
    taken = {*LEADING, *TRAILING, *analysis_names}

    def field(document: Document, key: str, name: str, schema: Schema | None) -> Column:
        return Column(name, json_node(_DOCUMENT_SQL[document], key), schema, (document, key))

    metadata = [
        field(
            "metadata",
            key,
            f"input.{key}" if key in taken else key,
            (metadata_schema or {}).get(key),
        )
        for key in metadata_columns
    ]
    analysis = [
        field("analysis", key, name, (analysis_schema or {}).get(key))
        for key, name in zip(analysis_columns, analysis_names, strict=True)
    ]
    return Layout((*LEADING_COLUMNS, *metadata, *analysis, *TRAILING_COLUMNS))


#: Input formats whose extra columns are always text.
_TEXT_INPUTS = frozenset({"csv", "txt"})


def batch_layout(batch: Mapping[str, Any]) -> Layout:
    """The export columns of a batch, from its ledger row."""
    metadata: Sequence[str] = batch["metadata_columns"]
    text_input = batch.get("source_format") in _TEXT_INPUTS
    return layout(
        metadata,
        batch["analysis_columns"],
        batch.get("analysis_schema"),
        dict.fromkeys(metadata, STRING) if text_input else None,
    )
