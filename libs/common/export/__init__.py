"""Result exports: one row per item, streamed from the ledger in constant memory.

* ``columns``: the one list of columns (name, SQL, JSON Schema) every format writes.
* ``filters``: which items (states, error classes, times, near-duplicate groups, field
  conditions).
* ``source``: reading the rows (typed, or formatted by PostgreSQL's COPY).
* ``sinks`` and ``formats/``: one ``Sink`` per file format, found in one registry.
* ``destinations``: writing an export to a URL (one file, or part files under a prefix).
* ``jobs``: exports run in the background, with their progress in the ledger.
* ``formulas``: text a spreadsheet would run is made inert.
"""

from __future__ import annotations

from .columns import (
    LEADING,
    LEADING_COLUMNS,
    TRAILING,
    TRAILING_COLUMNS,
    Column,
    Layout,
    Schema,
    batch_layout,
    layout,
)
from .destinations import DEFAULT_PART_ROWS, Written, write_to
from .filters import DUPLICATES, OPERATORS, Condition, Filters, Operator
from .formulas import neutralize
from .sinks import DEFAULT_FORMAT, FORMATS, SINKS, Sink, sink_for_path, suffixes
from .source import RowCounter, Selection

__all__ = [
    "DEFAULT_FORMAT",
    "DEFAULT_PART_ROWS",
    "DUPLICATES",
    "FORMATS",
    "LEADING",
    "LEADING_COLUMNS",
    "OPERATORS",
    "SINKS",
    "TRAILING",
    "TRAILING_COLUMNS",
    "Column",
    "Condition",
    "Filters",
    "Layout",
    "Operator",
    "RowCounter",
    "Schema",
    "Selection",
    "Sink",
    "Written",
    "batch_layout",
    "layout",
    "neutralize",
    "sink_for_path",
    "suffixes",
    "write_to",
]
