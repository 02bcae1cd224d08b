"""A profile's response schema in OpenAI's strict structured-output dialect, and back.

Strict mode (``response_format: {type: json_schema, strict: true}``) wants every object
closed (``additionalProperties: false``) with every property listed in ``required``, and
accepts a subset of JSON Schema. So an optional property becomes required-but-nullable
(``type: [T, "null"]``), and the model's ``null`` for it is dropped again before the answer
is validated against the profile itself, exactly as for every other provider; keywords
strict mode does not take (``minLength``, ``maxLength``, ``title``, ``propertyOrdering``)
are left out of what is sent and still checked here. A profile strict mode cannot hold
(deeper than its nesting limit, more properties or enum values than it allows) is refused
when a batch names it, with the reason.
"""

from __future__ import annotations

from typing import Any

from imagestream.common.profiles import ProfileError

from ...schemas import as_nullable

#: OpenAI's documented limits of a strict schema.
MAX_DEPTH = 10
MAX_PROPERTIES = 5000
MAX_ENUM_VALUES = 1000
_DROPPED = frozenset({"minLength", "maxLength", "title", "propertyOrdering", "nullable"})


def _translate(schema: dict[str, Any], depth: int, counts: dict[str, int]) -> dict[str, Any]:
    if depth > MAX_DEPTH:
        raise ProfileError(f"the openai analyzer takes at most {MAX_DEPTH} levels of nesting")
    out = {k: v for k, v in schema.items() if k not in _DROPPED}
    if len(schema.get("enum", ())) > MAX_ENUM_VALUES:
        raise ProfileError(f"the openai analyzer takes at most {MAX_ENUM_VALUES} enum values")
    if schema.get("nullable"):
        out = as_nullable(out)
    if "items" in schema:
        out["items"] = _translate(schema["items"], depth + 1, counts)
    if "properties" in schema:
        counts["properties"] += len(schema["properties"])
        if counts["properties"] > MAX_PROPERTIES:
            raise ProfileError(f"the openai analyzer takes at most {MAX_PROPERTIES} properties")
        required = set(schema.get("required", []))
        props = {}
        for name, sub in schema["properties"].items():
            translated = _translate(sub, depth + 1, counts)
            props[name] = translated if name in required else as_nullable(translated)
        out["properties"] = props
        out["required"] = list(props)
        out["additionalProperties"] = False
    return out


def strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The profile's schema as strict mode takes it (ProfileError when it cannot)."""
    return _translate(schema, 1, {"properties": 0})


def drop_added_nulls(value: Any, schema: dict[str, Any]) -> Any:
    """The answer without the nulls strict mode made the model give for optional
    properties the profile itself does not allow to be null."""
    if isinstance(value, list) and "items" in schema:
        return [drop_added_nulls(v, schema["items"]) for v in value]
    if not isinstance(value, dict) or "properties" not in schema:
        return value
    required = set(schema.get("required", []))
    kept = {}
    for name, item in value.items():
        sub = schema["properties"].get(name)
        if sub is None:
            kept[name] = item
            continue
        own_null = sub.get("nullable") or (
            isinstance(sub.get("type"), list) and "null" in sub["type"]
        )
        if item is None and name not in required and not own_null:
            continue
        kept[name] = drop_added_nulls(item, sub)
    return kept
