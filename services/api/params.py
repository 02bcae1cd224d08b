"""Reading query parameters and JSON bodies, with a 400 naming what is wrong."""

from __future__ import annotations

import datetime
import re
from collections.abc import Sequence
from typing import Any

import orjson
from aiohttp import web
from multidict import MultiMapping

from imagestream.common import export, ledger

from .errors import bad_request

Query = MultiMapping[str]
ITEM_STATES = ("pending", "fetching", "analyzing", "writing", *ledger.TERMINAL_ITEM_STATES)
BATCH_STATES = (*ledger.ACTIVE_BATCH_STATES, *ledger.FINISHED_BATCH_STATES)
_SPACED_OFFSET = re.compile(r" (\d{2}:?\d{2})$")
#: Item ids are PostgreSQL bigints.
MAX_ITEM_ID = 2**63 - 1


def integer(query: Query, name: str, default: int, low: int, high: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise bad_request(f"{name} must be an integer") from None
    if not low <= value <= high:
        raise bad_request(f"{name} must be between {low} and {high}")
    return value


def text(query: Query, name: str, max_length: int) -> str | None:
    raw = (query.get(name) or "").strip()
    if len(raw) > max_length:
        raise bad_request(f"{name} is longer than {max_length} characters")
    return raw or None


def values(query: Query, name: str, allowed: Sequence[str] | None = None) -> list[str]:
    """A repeatable, comma-separable parameter: ``state=a&state=b`` or ``state=a,b``."""
    found = [v.strip() for raw in query.getall(name, []) for v in raw.split(",")]
    if "" in found:
        raise bad_request(f"{name} must not be empty")
    if allowed is not None:
        wrong = [v for v in found if v not in allowed]
        if wrong:
            raise bad_request(f"{name} must be among {', '.join(allowed)} (got {wrong[0]!r})")
    return found


def timestamp(query: Query, name: str) -> datetime.datetime | None:
    raw = query.get(name)
    if not raw:
        return None
    try:
        # An unencoded "+02:00" arrives as " 02:00".
        text = _SPACED_OFFSET.sub(r"+\1", raw.strip()).replace("Z", "+00:00")
        value = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise bad_request(
            f"{name} must be an ISO 8601 date or time, e.g. 2025-01-31T12:00:00Z"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=datetime.UTC)


def export_sink(query: Query) -> export.Sink:
    """The format asked for (``format``, CSV by default)."""
    sink = export.SINKS.get(query.get("format", export.DEFAULT_FORMAT))
    if sink is None:
        raise bad_request(f"format must be one of {', '.join(export.FORMATS)}")
    return sink


def export_filters(query: Query) -> export.Filters:
    conditions = []
    for text in query.getall("field", []):
        try:
            conditions.append(export.Condition.parse(text))
        except ValueError as exc:
            raise bad_request(str(exc)) from None
    duplicates = query.get("duplicates")
    if duplicates is not None and duplicates not in export.DUPLICATES:
        raise bad_request(f"duplicates must be one of {', '.join(export.DUPLICATES)}")
    return export.Filters(
        states=values(query, "state", ITEM_STATES),
        error_classes=values(query, "error_class"),
        conditions=conditions,
        created_after=timestamp(query, "created_after"),
        created_before=timestamp(query, "created_before"),
        duplicate_group=integer(query, "duplicate_group", 0, 1, MAX_ITEM_ID) or None,
        duplicates=duplicates,
    )


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object; an empty body is ``{}``."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise bad_request("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object")
    return body


def only(body: dict[str, Any], *allowed: str) -> dict[str, Any]:
    """The body, if it has no field besides ``allowed``."""
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise bad_request(f"unknown field(s) {', '.join(unknown)}; use {', '.join(allowed)}")
    return body


def strings(body: dict[str, Any], name: str) -> list[str]:
    """A body field that may be one string or a list of strings."""
    value = body.get(name)
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [v for v in value if v]
    raise bad_request(f"{name} must be a string or a list of strings")
