"""Reading a model's answer against a profile, the same way for every provider.

Structured output normally arrives as JSON matching the response schema. When it does not
(a server that ignores the schema, a model that wraps its JSON), the answer gets one repair
attempt, and that attempt is local: Markdown fences and the prose around the outermost
``{...}`` are cut off and the rest is parsed again. A second request would cost the whole
call again (the image is most of its tokens) to fix what a string operation fixes for
free; and when the text is not JSON even then (cut short, garbled), a repair by a model
would have to invent what is missing. So after the one local repair the item fails as
``analyzer_invalid_output`` (its tokens stay on the bill), and ``replay`` can retry it on
purpose.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
from prometheus_client import Counter

from imagestream.common.profiles import CompiledProfile

REPAIRED = Counter(
    "imagestream_answers_repaired_total",
    "Model answers that parsed only after the local repair (code fences, prose around),"
    " per provider.",
    ["provider"],
)
_FENCED = re.compile(r"^```[\w-]*[ \t]*\n?(.*?)\n?[ \t]*```$", re.DOTALL)


class InvalidOutput(Exception):
    """The answer is unusable (the message says why); the item fails invalid_output."""


def repair(text: str) -> str | None:
    """The text without code fences or prose around its JSON object; None if unchanged."""
    candidate = text.strip().lstrip("\ufeff").strip()
    fenced = _FENCED.match(candidate)
    if fenced:
        candidate = fenced.group(1).strip()
    start, end = candidate.find("{"), candidate.rfind("}")
    if 0 <= start < end:
        candidate = candidate[start : end + 1]
    return candidate if candidate != text else None


def decode(text: str, provider: str) -> Any:
    """The JSON value of an answer, after the one local repair if needed."""
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError as first:
        repaired = repair(text)
        if repaired is None:
            raise InvalidOutput(f"the answer is not JSON, and not repairable ({first})") from None
        try:
            value = msgspec.json.decode(repaired)
        except msgspec.DecodeError as second:
            raise InvalidOutput(f"the answer is not JSON, even repaired ({second})") from None
        REPAIRED.labels(provider).inc()
        return value


def check(value: Any, profile: CompiledProfile) -> dict[str, Any]:
    """The flattened analysis of a decoded answer, validated against the profile."""
    try:
        return profile.parse(value)
    except msgspec.ValidationError as exc:
        raise InvalidOutput(f"the answer does not match profile {profile.name}: {exc}") from None


def parse(text: str, profile: CompiledProfile, provider: str) -> dict[str, Any]:
    """The flattened, validated analysis of an answer's text; InvalidOutput otherwise."""
    return check(decode(text, provider), profile)
