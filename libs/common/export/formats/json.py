"""JSON (one array of objects) and JSONL (one object per line): values as they are (numbers,
booleans, lists, objects; text not neutralized), for programs rather than spreadsheets."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import orjson

from ..source import Selection

#: Rows per piece written.
_PIECE_ROWS = 1000


@dataclass(frozen=True)
class ObjectsSink:
    """One JSON object per row, between an opening and a closing."""

    name: str
    media_type: str
    suffix: str
    openapi_schema: dict[str, Any]
    opening: bytes
    separator: bytes
    terminator: bytes
    closing: bytes

    async def write(self, selection: Selection) -> AsyncGenerator[bytes]:
        names = selection.layout.names
        parts: list[bytes] = [self.opening]
        first = True
        async with contextlib.aclosing(selection.rows()) as rows:
            async for row in rows:
                line = orjson.dumps(dict(zip(names, row, strict=True)))
                parts.append((line if first else self.separator + line) + self.terminator)
                first = False
                if len(parts) >= _PIECE_ROWS:
                    yield b"".join(parts)
                    parts.clear()
        parts.append(self.closing)
        yield b"".join(parts)


SINKS = (
    ObjectsSink(
        name="json",
        media_type="application/json",
        suffix=".json",
        openapi_schema={"type": "array", "items": {"type": "object"}},
        opening=b"[\n",
        separator=b",\n",
        terminator=b"",
        closing=b"\n]\n",
    ),
    ObjectsSink(
        name="jsonl",
        media_type="application/x-ndjson",
        suffix=".jsonl",
        openapi_schema={"type": "string"},
        opening=b"",
        separator=b"",
        terminator=b"\n",
        closing=b"",
    ),
)
