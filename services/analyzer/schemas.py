"""JSON Schema pieces the providers' dialect translations share (each provider's
``schema.py`` makes the profile's schema what its API takes)."""

from __future__ import annotations

from typing import Any


def as_nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with ``null`` allowed too, in standard JSON Schema (a ``type`` list, and
    ``null`` among the ``enum`` values) rather than OpenAPI's ``nullable``."""
    kind = schema.get("type")
    if "enum" in schema:
        return {**schema, "enum": [*schema["enum"], None]} | (
            {"type": [kind, "null"]} if isinstance(kind, str) else {}
        )
    if isinstance(kind, list):
        return schema if "null" in kind else {**schema, "type": [*kind, "null"]}
    return {**schema, "type": [kind, "null"]}
