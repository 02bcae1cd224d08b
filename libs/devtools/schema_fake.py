"""Deterministic, plausible model output for the API emulators.

Given a response schema, in any dialect the APIs accept -- ``responseSchema`` (the
OpenAPI 3.0 subset: upper-case ``type``, ``nullable``, ``format: enum``, ``propertyOrdering``;
the Python SDK sends some keys in snake_case, e.g. ``property_ordering``, ``max_items``) or
``responseJsonSchema`` (JSON Schema: ``$ref``/``$defs``, ``anyOf``, type lists, ``const``) --
produce a value that conforms to it. Every choice comes from one RNG seeded by the caller
(the emulator seeds it with a hash of the request's image bytes), so the same image and the
same schema always give the same answer.

Not honoured: ``pattern`` (a regex cannot be satisfied in general) and ``not``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import random
import re
from collections.abc import Mapping
from typing import Any

_MAX_DEPTH = 12  # deeper than this, objects get their required properties only
_HARD_DEPTH = 24  # a schema that requires itself has no finite instance: stop here

_SUBJECTS = (
    "a tabby cat",
    "a red bicycle",
    "a mountain lake",
    "a busy city street",
    "a bowl of fresh fruit",
    "a wooden rowing boat",
    "a vintage car",
    "a golden retriever",
    "a snowy forest path",
    "a cup of coffee",
    "a lighthouse",
    "a group of hikers",
    "a modern office desk",
    "a field of sunflowers",
    "a stone bridge",
    "a child's drawing",
)
_SETTINGS = (
    "at sunset",
    "on a white background",
    "in soft morning light",
    "under an overcast sky",
    "in a sunny park",
    "on a wooden table",
    "at night with street lights",
    "next to a window",
    "in the rain",
    "photographed from above",
)
_NOUNS = (
    "cat",
    "bicycle",
    "lake",
    "street",
    "fruit",
    "boat",
    "car",
    "dog",
    "forest",
    "coffee",
    "lighthouse",
    "person",
    "desk",
    "flower",
    "bridge",
    "sky",
    "building",
    "tree",
    "water",
    "road",
)
_COLORS = ("red", "blue", "green", "yellow", "white", "black", "gray", "orange", "brown")
_WORDS_RE = re.compile(r"[a-z]+")
_EMPTY: dict[str, Any] = {
    "object": {},
    "array": [],
    "boolean": False,
    "integer": 0,
    "number": 0.0,
    "null": None,
}


def seed_from(*chunks: bytes) -> int:
    """A 64-bit RNG seed from the given byte strings (order matters)."""
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(hashlib.sha256(chunk).digest())
    return int.from_bytes(digest.digest()[:8], "big")


def caption(rng: random.Random) -> str:
    """A short, plausible image caption."""
    subject = rng.choice(_SUBJECTS)
    return f"{subject[0].upper()}{subject[1:]} {rng.choice(_SETTINGS)}."


def plain_text(rng: random.Random) -> str:
    """What the emulated model says when no JSON was asked for."""
    first = caption(rng)
    noun = rng.choice(_NOUNS)
    color = rng.choice(_COLORS)
    return f"{first} The dominant colour is {color}, and the main subject is a {noun}."


def default_json(rng: random.Random) -> dict[str, Any]:
    """JSON output when application/json was asked for without a schema."""
    return {
        "caption": caption(rng),
        "tags": rng.sample(_NOUNS, rng.randint(1, 3)),
    }


def _get(schema: Mapping[str, Any], camel: str) -> Any:
    """A schema keyword in camelCase or the SDK's snake_case spelling."""
    if camel in schema:
        return schema[camel]
    snake = re.sub(r"([A-Z])", r"_\1", camel).lower()
    return schema.get(snake)


class SchemaFaker:
    """Generates values conforming to a response schema, drawing choices from `rng`."""

    def __init__(self, root: Mapping[str, Any], rng: random.Random) -> None:
        self._root = root
        self._rng = rng

    def generate(self) -> Any:
        return self._value(self._root, name="", depth=0)

    def _resolve(self, schema: Mapping[str, Any]) -> Mapping[str, Any]:
        seen = 0
        while isinstance(schema.get("$ref"), str) and seen < 32:
            ref: str = schema["$ref"]
            target: Any = self._root
            if not ref.startswith("#"):
                return {}
            for raw in ref.lstrip("#").strip("/").split("/"):
                if not raw:
                    continue
                part = raw.replace("~1", "/").replace("~0", "~")
                target = target.get(part, {}) if isinstance(target, Mapping) else {}
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            schema = {**target, **rest} if isinstance(target, Mapping) else rest
            seen += 1
        all_of = _get(schema, "allOf")
        if isinstance(all_of, list) and all_of:
            merged: dict[str, Any] = {
                k: v for k, v in schema.items() if k not in ("allOf", "all_of")
            }
            for branch in all_of:
                if not isinstance(branch, Mapping):
                    continue
                sub = self._resolve(branch)
                for key, val in sub.items():
                    if key == "properties" and isinstance(val, Mapping):
                        merged["properties"] = {**merged.get("properties", {}), **val}
                    elif key == "required" and isinstance(val, list):
                        merged["required"] = [*merged.get("required", []), *val]
                    else:
                        merged.setdefault(key, val)
            schema = merged
        return schema

    def _value(self, schema: Any, *, name: str, depth: int) -> Any:
        if not isinstance(schema, Mapping):
            # `true` / `{}` schemas accept anything: answer with a string.
            return self._string({}, name)
        schema = self._resolve(schema)
        if "const" in schema:
            return schema["const"]
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            return self._rng.choice(enum)
        branches = _get(schema, "anyOf") or _get(schema, "oneOf")
        if isinstance(branches, list) and branches:
            candidates = [b for b in branches if not _is_null_schema(b)] or branches
            return self._value(self._rng.choice(candidates), name=name, depth=depth + 1)
        kind = _type_of(schema)
        if depth >= _HARD_DEPTH:
            return _EMPTY.get(kind, "")
        if kind == "null":
            return None
        if kind == "object":
            return self._object(schema, depth)
        if kind == "array":
            return self._array(schema, name, depth)
        if kind == "boolean":
            return self._rng.random() < 0.5
        if kind == "integer":
            return self._integer(schema)
        if kind == "number":
            return self._number(schema, name)
        return self._string(schema, name)

    def _object(self, schema: Mapping[str, Any], depth: int) -> dict[str, Any]:
        props = schema.get("properties")
        props = props if isinstance(props, Mapping) else {}
        required = schema.get("required")
        required_set = set(required) if isinstance(required, list) else set()
        ordering = _get(schema, "propertyOrdering")
        names: list[str] = [n for n in ordering if n in props] if isinstance(ordering, list) else []
        names += [n for n in props if n not in names]
        if depth >= _MAX_DEPTH:
            # Recursive schemas: stop at the required properties only.
            names = [n for n in names if n in required_set]
        out: dict[str, Any] = {}
        for prop in names:
            out[prop] = self._value(props[prop], name=prop, depth=depth + 1)
        extra = _get(schema, "additionalProperties")
        if not props and isinstance(extra, Mapping) and depth < _MAX_DEPTH:
            for _ in range(self._rng.randint(1, 2)):
                key = self._rng.choice(_NOUNS)
                out[key] = self._value(extra, name=key, depth=depth + 1)
        return out

    def _array(self, schema: Mapping[str, Any], name: str, depth: int) -> list[Any]:
        lo = _int_or(_get(schema, "minItems"), 0)
        hi = _int_or(_get(schema, "maxItems"), max(lo, 3))
        prefix = _get(schema, "prefixItems")
        prefix_list = list(prefix) if isinstance(prefix, list) else []
        if depth >= _MAX_DEPTH:
            count = lo
        else:
            count = self._rng.randint(max(lo, 1), max(lo, 1, min(hi, 3))) if hi > 0 else 0
        count = max(lo, min(count, hi))
        items = schema.get("items")
        item_name = name[:-1] if name.endswith("s") else name
        unique = bool(_get(schema, "uniqueItems"))
        out: list[Any] = []
        attempts = 0
        while len(out) < count and attempts < count * 20 + 20:
            attempts += 1
            index = len(out)
            sub = prefix_list[index] if index < len(prefix_list) else items
            value = self._value(sub if sub is not None else {}, name=item_name, depth=depth + 1)
            if (unique or _looks_like_tags(name)) and value in out:
                continue
            out.append(value)
        return out

    def _integer(self, schema: Mapping[str, Any]) -> int:
        lo, hi = _bounds(schema)
        lo_i = math.ceil(lo) if lo is not None else 0
        hi_i = math.floor(hi) if hi is not None else max(lo_i, 0) + 100
        if _exclusive(schema, "Minimum", lo) and lo is not None and lo_i == lo:
            lo_i += 1
        if _exclusive(schema, "Maximum", hi) and hi is not None and hi_i == hi:
            hi_i -= 1
        if hi_i < lo_i:
            return lo_i
        return self._rng.randint(lo_i, hi_i)

    def _number(self, schema: Mapping[str, Any], name: str) -> float:
        lo, hi = _bounds(schema)
        lowered = name.lower()
        if lo is None and hi is None and any(w in lowered for w in ("conf", "score", "prob")):
            lo, hi = 0.5, 0.99
        lo_f = lo if lo is not None else 0.0
        hi_f = hi if hi is not None else lo_f + 100.0
        if hi_f < lo_f:
            return lo_f
        value = round(self._rng.uniform(lo_f, hi_f), 2)
        # Rounding or exclusive bounds can push the value out of range: pull it back in.
        if value < lo_f or (_exclusive(schema, "Minimum", lo) and value <= lo_f):
            value = lo_f + (hi_f - lo_f) / 2
        if value > hi_f or (_exclusive(schema, "Maximum", hi) and value >= hi_f):
            value = lo_f + (hi_f - lo_f) / 2
        return value

    def _string(self, schema: Mapping[str, Any], name: str) -> str:
        fmt = schema.get("format")
        lowered = name.lower()
        rng = self._rng
        if fmt == "date-time":
            text = _timestamp(rng).isoformat().replace("+00:00", "Z")
        elif fmt == "date":
            text = _timestamp(rng).date().isoformat()
        elif fmt == "time":
            text = _timestamp(rng).time().isoformat(timespec="seconds")
        elif fmt == "email":
            text = f"{rng.choice(_NOUNS)}@example.com"
        elif fmt in ("uri", "url") or lowered.endswith("url") or lowered.endswith("uri"):
            text = f"https://example.com/{rng.choice(_NOUNS)}/{rng.randint(1, 9999)}"
        elif fmt == "uuid":
            text = str(_uuid(rng))
        elif "colo" in lowered:
            text = rng.choice(_COLORS)
        elif _looks_like_tags(lowered):
            text = rng.choice(_NOUNS)
        elif lowered in ("language", "lang", "locale"):
            text = "en"
        elif lowered == "id" or lowered.endswith("_id"):
            text = f"{rng.getrandbits(48):012x}"
        elif "title" in lowered or lowered == "name" or lowered.endswith("name"):
            words = rng.choice(_SUBJECTS).split(" ")[1:]
            text = " ".join(w[:1].upper() + w[1:] for w in words)
        else:
            text = caption(rng)
        return _fit_length(text, schema, rng)


def _is_null_schema(schema: Any) -> bool:
    return isinstance(schema, Mapping) and str(schema.get("type", "")).lower() == "null"


def _type_of(schema: Mapping[str, Any]) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        non_null = [str(k).lower() for k in kind if str(k).lower() != "null"]
        kind = non_null[0] if non_null else "null"
    if isinstance(kind, str) and kind:
        return kind.lower()
    if "properties" in schema or _get(schema, "additionalProperties") is not None:
        return "object"
    if "items" in schema or _get(schema, "prefixItems") is not None:
        return "array"
    return "string"


def _int_or(value: Any, default: int) -> int:
    try:
        return int(value) if value is not None else default
    except (TypeError, ValueError):
        return default


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _bounds(schema: Mapping[str, Any]) -> tuple[float | None, float | None]:
    lo = _num(schema.get("minimum"))
    hi = _num(schema.get("maximum"))
    # JSON Schema 2019+: exclusiveMinimum/Maximum are numbers; OpenAPI 3.0: booleans.
    ex_lo = _num(_get(schema, "exclusiveMinimum"))
    ex_hi = _num(_get(schema, "exclusiveMaximum"))
    if ex_lo is not None:
        lo = ex_lo if lo is None else max(lo, ex_lo)
    if ex_hi is not None:
        hi = ex_hi if hi is None else min(hi, ex_hi)
    return lo, hi


def _exclusive(schema: Mapping[str, Any], which: str, bound: float | None) -> bool:
    flag = _get(schema, "exclusive" + which)
    if flag is True:
        return True
    return bound is not None and _num(flag) == bound


def _looks_like_tags(name: str) -> bool:
    words = set(_WORDS_RE.findall(name.lower()))
    return bool(
        words
        & {"tag", "tags", "label", "labels", "keyword", "keywords", "object", "objects", "item"}
    )


def _fit_length(text: str, schema: Mapping[str, Any], rng: random.Random) -> str:
    lo = _int_or(_get(schema, "minLength"), 0)
    hi = _get(schema, "maxLength")
    while len(text) < lo:
        text = f"{text} {rng.choice(_NOUNS)}"
    if hi is not None:
        limit = _int_or(hi, len(text))
        if len(text) > limit:
            text = text[:limit].rstrip() if limit > 0 else ""
            text = text + "x" * max(0, lo - len(text))
    return text


def _timestamp(rng: random.Random) -> dt.datetime:
    base = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    return base + dt.timedelta(seconds=rng.randint(0, 5 * 365 * 86400))


def _uuid(rng: random.Random) -> str:
    raw = f"{rng.getrandbits(128):032x}"
    return f"{raw[:8]}-{raw[8:12]}-4{raw[13:16]}-a{raw[17:20]}-{raw[20:32]}"


def spoil(text: str, outcome: str) -> tuple[str, bool]:
    """The answer as the outcome damages it, and whether the model was cut off.

    fenced_json: wrapped in a Markdown fence (the local repair fixes it); invalid_json: cut
    short at 60 % although the model says it finished; max_tokens: cut in half, cut off.
    """
    if outcome == "fenced_json":
        return f"```json\n{text}\n```", False
    if outcome == "invalid_json":
        return text[: max(1, int(len(text) * 0.6))], False
    if outcome == "max_tokens":
        return text[: max(1, len(text) // 2)], True
    return text, False


def generate_for_schema(schema: Mapping[str, Any], seed: int) -> Any:
    """A value conforming to `schema`, the same for the same seed."""
    return SchemaFaker(schema, random.Random(seed)).generate()
