"""Text cells a spreadsheet would run as a formula (starting with ``= + - @``, tab or CR,
unless the text is a plain number) get a leading ``'``: the one rule, in Python (XLSX, the
validation report) and in SQL (CSV, formatted by PostgreSQL)."""

from __future__ import annotations

import re

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_FORMULA_FIRST = frozenset(_FORMULA_START)
#: A plain number ("-5", "+1.5e3") is left alone.
_NUMBER = r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?$"
_NUMBER_RE = re.compile(_NUMBER)
# The same as SQL literals: constants, inlined so that PostgreSQL plans them once.
_SQL_FORMULA_START = ", ".join(f"E'{c.encode('unicode_escape').decode()}'" for c in _FORMULA_START)
_SQL_NUMBER = f"'{_NUMBER}'"
_SQL_QUOTE = "''''"  # a string literal holding one single quote


def neutralize(value: str) -> str:
    """Make a text cell inert in spreadsheets (a leading quote), unless it is a number."""
    if value[:1] in _FORMULA_FIRST and not _NUMBER_RE.match(value):
        return "'" + value
    return value


def neutralize_sql(text: str) -> str:
    """``neutralize`` of the SQL text expression ``text``, in SQL."""
    return (
        f"CASE WHEN left({text}, 1) IN ({_SQL_FORMULA_START}) AND {text} !~ {_SQL_NUMBER}"
        f" THEN {_SQL_QUOTE} || {text} ELSE {text} END"
    )
