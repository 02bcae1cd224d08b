"""Which items an export holds: item states, error classes, when the outcome was
recorded, near-duplicate groups, and field conditions on the analysis or on the input's
columns, combined with AND."""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, get_args

from .columns import json_node

Operator = Literal["eq", "ne", "contains", "gt", "gte", "lt", "lte", "exists"]
#: ``first``: only the first item of each near-duplicate group (one image per group,
#: images without near-duplicates included).
Duplicates = Literal["first"]
DUPLICATES: tuple[Duplicates, ...] = get_args(Duplicates)
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
        node = json_node(doc, self.field, param(self.field))
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
    #: Only the members of this near-duplicate group (the id of its first item).
    duplicate_group: int | None = None
    duplicates: Duplicates | None = None


def where(batch_id: uuid.UUID, filters: Filters) -> tuple[str, list[Any]]:
    """The WHERE clause over items ``i`` and results ``r``, and its parameters ($1 first)."""
    params: list[Any] = [batch_id]

    def param(value: Any) -> str:
        params.append(value)
        return f"${len(params)}"

    clauses = ["i.batch_id = $1"]
    if filters.states:
        clauses.append(f"i.state = ANY({param(list(filters.states))}::text[])")
    if filters.error_classes:
        clauses.append(f"i.error_class = ANY({param(list(filters.error_classes))}::text[])")
    if filters.created_after is not None:
        clauses.append(f"i.finished_at >= {param(filters.created_after)}")
    if filters.created_before is not None:
        clauses.append(f"i.finished_at < {param(filters.created_before)}")
    if filters.duplicate_group is not None:
        clauses.append(f"r.duplicate_group = {param(filters.duplicate_group)}::bigint")
    if filters.duplicates == "first":
        clauses.append("r.duplicate_group = r.item_id")
    clauses += [c.sql(param) for c in filters.conditions]
    return " AND ".join(clauses), params
