"""A profile's response schema as the ``input_schema`` of the tool Anthropic is forced to
call (structured output by tool use).

Anthropic takes standard JSON Schema there, with an object at the top. So the profile's
OpenAPI-style ``nullable`` becomes a ``type`` list with ``"null"`` (``schemas.as_nullable``);
Gemini's ``propertyOrdering`` is already left out of the request schema; the rest is sent
as it is and every answer is still validated here against the profile itself. A profile
whose answer is not an object is refused when a batch names it.
"""

from __future__ import annotations

from typing import Any

from imagestream.common.profiles import ProfileError

from ...schemas import as_nullable


def _translate(schema: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in schema.items() if k != "nullable"}
    if schema.get("nullable"):
        out = as_nullable(out)
    if "items" in schema:
        out["items"] = _translate(schema["items"])
    if "properties" in schema:
        out["properties"] = {name: _translate(sub) for name, sub in schema["properties"].items()}
    return out


def tool_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The tool's ``input_schema`` (ProfileError when the answer is not an object)."""
    if schema.get("type") != "object":
        raise ProfileError(
            "the anthropic analyzer needs a profile whose response_schema is an object"
            " (a tool's input)"
        )
    return _translate(schema)
