"""Analysis profiles: what the Gemini analyzer asks about an image and what it must answer.

A profile is a JSON file ``<name>.json`` (the file name is the profile's name)::

    {"prompt": "...", "response_schema": {...JSON Schema...}, "model": "gemini-2.5-flash-lite",
     "media_resolution": "medium", "thinking_budget": 0, "max_output_tokens": 400,
     "expected_output_tokens": 150, "temperature": 0, "safety_threshold": null}

Shipped profiles live in ``imagestream/common/profile_files/``; ``PROFILES_DIR`` adds the
profiles of a directory, a file named like a shipped profile replacing it. A batch names
its profile (``--profile``, API field ``profile``; default ``describe``) and may override the
model. The response schema is sent to Gemini as ``responseJsonSchema`` and every answer is
validated against it here. Validation compiles the schema into msgspec types (our schema
library, and the fastest validator we have), which covers the subset of JSON Schema that
Gemini's structured output accepts: ``type`` (or a list with ``"null"``), ``properties``,
``required``, ``items``, ``enum``, ``minItems``/``maxItems``, ``minLength``/``maxLength``,
``pattern``, ``minimum``/``maximum``, ``additionalProperties: false``, ``nullable``,
``propertyOrdering`` and the annotations ``title``/``description``/``format``. A profile
using anything else is refused when it loads, with the file and the keyword named.

Export columns are the schema's top-level properties in order, an object property
flattened one level (``colors.primary``), then ``blocked`` and ``block_reason`` (an answer
Gemini refused for safety is a result with ``blocked`` true and the reason). The profile's
key (``describe@3f2a...``) hashes everything that changes the answer except the model, so
the analysis cache never serves an answer to another question.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import orjson

from . import pricing
from .settings import environment

DEFAULT_PROFILE = "describe"
#: Columns every Gemini result has after the profile's own.
BLOCK_COLUMNS = ("blocked", "block_reason")
_BLOCK_SCHEMAS: dict[str, dict[str, Any]] = {
    "blocked": {"type": "boolean"},
    "block_reason": {"type": ["string", "null"]},
}
MediaResolution = Literal["low", "medium", "high"]
SafetyThreshold = Literal[
    "BLOCK_NONE", "OFF", "BLOCK_ONLY_HIGH", "BLOCK_MEDIUM_AND_ABOVE", "BLOCK_LOW_AND_ABOVE"
]


class ProfileError(ValueError):
    """A profile file or a batch's analyzer choice is not usable (one line)."""


class Profile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One profile file."""

    prompt: str
    response_schema: dict[str, Any]
    description: str = ""
    #: Model used when the batch names none.
    model: str = "gemini-2.5-flash-lite"
    #: Image detail: low/medium/high (Gemini 2.x: 64/256/256 tokens; unset: by size).
    media_resolution: MediaResolution | None = None
    #: 0 switches thinking off (2.5 Flash/Flash-Lite), -1 lets the model decide, None = model
    #: default. Thinking tokens are billed as output.
    thinking_budget: int | None = 0
    #: Output-token cap (thinking included on 2.5+); the reservation a budget makes per call.
    max_output_tokens: int = 512
    #: Typical output tokens, for estimates made before anything ran.
    expected_output_tokens: int | None = None
    temperature: float | None = None
    #: Threshold for the four adjustable harm categories (None: Gemini's default).
    safety_threshold: SafetyThreshold | None = None

    def __post_init__(self) -> None:
        if not self.prompt.strip():
            raise ValueError("prompt is empty")
        if self.max_output_tokens < 1:
            raise ValueError("max_output_tokens must be >= 1")
        if self.thinking_budget is not None and self.thinking_budget < -1:
            raise ValueError("thinking_budget must be -1, 0 or a positive number")
        if self.temperature is not None and not 0 <= self.temperature <= 2:
            raise ValueError("temperature must be within 0..2")


@dataclass(frozen=True)
class CompiledProfile:
    name: str
    profile: Profile
    #: ``name@hash`` of everything that changes the answer (the model aside).
    key: str
    columns: list[str]
    #: The JSON Schema of each column's values (a flattened object's children their own).
    column_schemas: dict[str, dict[str, Any]]
    result_type: Any
    nested: frozenset[str]
    #: The schema as sent (``responseJsonSchema`` keeps the order of ``properties``, so
    #: ``propertyOrdering``, an extension of the older ``responseSchema``, is left out).
    request_schema: dict[str, Any]
    #: Gemini counts the response schema as prompt tokens; by the 4-characters rule.
    schema_tokens: int

    def parse(self, value: Any) -> dict[str, Any]:
        """The flattened analysis of a decoded answer; msgspec.ValidationError if it does
        not match the schema."""
        checked = msgspec.to_builtins(msgspec.convert(value, self.result_type))
        flat: dict[str, Any] = {}
        for name, item in checked.items():
            if name in self.nested and isinstance(item, dict):
                flat.update({f"{name}.{child}": v for child, v in item.items()})
            else:
                flat[name] = item
        flat["blocked"] = False
        return flat

    def blocked(self, reason: str) -> dict[str, Any]:
        """The analysis of an answer Gemini refused to give."""
        return {**dict.fromkeys(self.columns), "blocked": True, "block_reason": reason}


# ---------------------------------------------------------------- schema -> msgspec types
_KEYWORDS = frozenset(
    {
        "type", "properties", "required", "items", "enum", "minItems", "maxItems",
        "minLength", "maxLength", "pattern", "minimum", "maximum", "additionalProperties",
        "nullable", "propertyOrdering", "title", "description", "format",
    }
)  # fmt: skip


def _ordered(schema: Mapping[str, Any]) -> list[str]:
    props = schema["properties"]
    order = [p for p in schema.get("propertyOrdering", []) if p in props]
    return order + [p for p in props if p not in order]


def _meta(**limits: Any) -> msgspec.Meta | None:
    given = {k: v for k, v in limits.items() if v is not None}
    return msgspec.Meta(**given) if given else None


def _with(tp: Any, meta: msgspec.Meta | None) -> Any:
    return Annotated[tp, meta] if meta is not None else tp


def _compile(schema: Any, path: str, names: list[str]) -> Any:
    if not isinstance(schema, dict):
        raise ProfileError(f"{path}: a schema must be an object")
    unknown = sorted(set(schema) - _KEYWORDS)
    if unknown:
        raise ProfileError(f"{path}: JSON Schema keyword {unknown[0]!r} is not supported")
    kind = schema.get("type")
    nullable = bool(schema.get("nullable"))
    if isinstance(kind, list):
        nullable = nullable or "null" in kind
        kinds = [k for k in kind if k != "null"]
        if len(kinds) != 1:
            raise ProfileError(f"{path}: a type list may hold one type and 'null'")
        kind = kinds[0]
    if "enum" in schema:
        values = schema["enum"]
        if not values or not all(isinstance(v, str | int) for v in values):
            raise ProfileError(f"{path}: enum needs string or integer values")
        tp: Any = Literal[tuple(values)]
    elif kind == "string":
        tp = _with(
            str,
            _meta(
                min_length=schema.get("minLength"),
                max_length=schema.get("maxLength"),
                pattern=schema.get("pattern"),
            ),
        )
    elif kind in ("integer", "number"):
        base = int if kind == "integer" else float
        tp = _with(base, _meta(ge=schema.get("minimum"), le=schema.get("maximum")))
    elif kind == "boolean":
        tp = bool
    elif kind == "array":
        if "items" not in schema:
            raise ProfileError(f"{path}: an array needs 'items'")
        item = _compile(schema["items"], f"{path}[]", names)
        tp = _with(
            list[item],  # type: ignore[valid-type]
            _meta(min_length=schema.get("minItems"), max_length=schema.get("maxItems")),
        )
    elif kind == "object":
        tp = _compile_object(schema, path, names)
    else:
        raise ProfileError(f"{path}: type must be one of string, integer, number, boolean,"
                           " array, object")  # fmt: skip
    return tp | None if nullable else tp


def _compile_object(schema: dict[str, Any], path: str, names: list[str]) -> Any:
    props = schema.get("properties")
    if not isinstance(props, dict) or not props:
        raise ProfileError(f"{path}: an object needs 'properties'")
    required = set(schema.get("required", []))
    missing = required - set(props)
    if missing:
        raise ProfileError(f"{path}: required property {sorted(missing)[0]!r} is not defined")
    fields: list[tuple[str, Any, Any] | tuple[str, Any]] = []
    rename: dict[str, str] = {}
    for index, prop in enumerate(_ordered(schema)):
        field = f"f{index}"
        rename[field] = prop
        tp = _compile(props[prop], f"{path}.{prop}", names)
        if prop in required:
            fields.append((field, tp))
        else:
            fields.append((field, tp | msgspec.UnsetType, msgspec.UNSET))
    names.append(path)
    return msgspec.defstruct(
        f"Answer{len(names)}",
        fields,
        kw_only=True,
        rename=rename,
        forbid_unknown_fields=schema.get("additionalProperties") is False,
    )


def compile_profile(name: str, profile: Profile) -> CompiledProfile:
    schema = profile.response_schema
    if schema.get("type") != "object":
        raise ProfileError("response_schema: the answer must be an object (type: object)")
    result_type = _compile(schema, "response_schema", [])
    column_schemas: dict[str, dict[str, Any]] = {}
    nested: set[str] = set()
    for prop in _ordered(schema):
        if prop in BLOCK_COLUMNS:
            raise ProfileError(f"response_schema: property {prop!r} is reserved")
        sub = schema["properties"][prop]
        if sub.get("type") == "object" or (
            isinstance(sub.get("type"), list) and "object" in sub["type"]
        ):
            nested.add(prop)
            for child in _ordered(sub):
                column_schemas[f"{prop}.{child}"] = sub["properties"][child]
        else:
            column_schemas[prop] = sub
    column_schemas |= _BLOCK_SCHEMAS
    request_schema = _without_ordering(schema)
    answer_affecting = msgspec.to_builtins(profile)
    for ignored in ("description", "model", "expected_output_tokens"):
        answer_affecting.pop(ignored, None)
    digest = hashlib.sha256(orjson.dumps(answer_affecting, option=orjson.OPT_SORT_KEYS))
    return CompiledProfile(
        name=name,
        profile=profile,
        key=f"{name}@{digest.hexdigest()[:12]}",
        columns=list(column_schemas),
        column_schemas=column_schemas,
        result_type=result_type,
        nested=frozenset(nested),
        request_schema=request_schema,
        schema_tokens=pricing.text_tokens(orjson.dumps(request_schema).decode()),
    )


def _without_ordering(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: _without_ordering(v) for k, v in schema.items() if k != "propertyOrdering"}
    if isinstance(schema, list):
        return [_without_ordering(v) for v in schema]
    return schema


# ---------------------------------------------------------------- the catalog
@dataclass(frozen=True)
class Catalog:
    profiles: Mapping[str, CompiledProfile]

    def profile(self, name: str) -> CompiledProfile:
        found = self.profiles.get(name)
        if found is None:
            raise ProfileError(
                f"no analysis profile {name!r} (available: {', '.join(sorted(self.profiles))})"
            )
        return found

    def choose(
        self, profile: str | None, model: str | None, prices: Mapping[str, pricing.Price]
    ) -> tuple[CompiledProfile, str]:
        """The batch's profile and model (the profile's when none is named), checked
        against the provider's price table (a model without a price is refused)."""
        chosen = self.profile(profile or DEFAULT_PROFILE)
        name = (model or chosen.profile.model).strip()
        try:
            pricing.price_of(name, prices)
        except pricing.PriceError as exc:
            raise ProfileError(str(exc)) from None
        return chosen, name


def _read_profile(path: Path | Any) -> CompiledProfile:
    name = Path(str(path.name)).stem
    try:
        profile = msgspec.json.decode(path.read_bytes(), type=Profile)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        raise ProfileError(f"profile {path.name}: {exc}") from None
    try:
        return compile_profile(name, profile)
    except ProfileError as exc:
        raise ProfileError(f"profile {path.name}: {exc}") from None


def load_catalog(profiles_dir: str | None = None) -> Catalog:
    """The shipped profiles and those of ``profiles_dir`` over them."""
    found: dict[str, CompiledProfile] = {}
    shipped = resources.files("imagestream.common").joinpath("profile_files")
    for entry in sorted(shipped.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            compiled = _read_profile(entry)
            found[compiled.name] = compiled
    if profiles_dir:
        folder = Path(profiles_dir)
        if not folder.is_dir():
            raise ProfileError(f"PROFILES_DIR {profiles_dir} is not a directory")
        for path in sorted(folder.glob("*.json")):
            compiled = _read_profile(path)
            found[compiled.name] = compiled
    return Catalog(found)


@functools.lru_cache(maxsize=4)
def cached_catalog(profiles_dir: str | None) -> Catalog:
    """``load_catalog``, once per process for the same directory."""
    return load_catalog(profiles_dir or None)


def default_catalog(env: Mapping[str, str] | None = None) -> Catalog:
    """The catalog of this environment (``PROFILES_DIR``), loaded once."""
    source = environment() if env is None else env
    return cached_catalog(source.get("PROFILES_DIR"))
