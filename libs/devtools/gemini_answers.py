"""Reading GenerateContentRequests and writing GenerateContentResponses for the emulator.

Token counts follow ``gemini_tokens``; answers come from ``schema_fake``, seeded by a hash
of the request's image bytes so the same image always gets the same answer.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import random
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from .emulator_core import MARKER_RE, ImageDecodeError, image_size, text_tokens
from .gemini_errors import TROUBLESHOOTING, bad_request
from .gemini_tokens import (
    OPAQUE_MEDIA_TOKENS,
    image_tokens,
    model_generation,
    normalize_media_resolution,
)
from .schema_fake import (
    caption,
    default_json,
    generate_for_schema,
    plain_text,
    seed_from,
    spoil,
)

Outcome = Literal[
    "ok",
    "429",
    "500",
    "503",
    "504",
    "safety",
    "prompt_blocked",
    "fenced_json",
    "invalid_json",
    "max_tokens",
]
# ok: a normal answer. 429: RESOURCE_EXHAUSTED without touching the quota windows.
# 500/503/504: INTERNAL / UNAVAILABLE / DEADLINE_EXCEEDED. safety: the candidate is blocked
# (finishReason SAFETY, safetyRatings, no content). prompt_blocked: promptFeedback.blockReason
# and no candidates. fenced_json: the JSON wrapped in ```json fences. invalid_json: the JSON
# cut short, finishReason STOP. max_tokens: the answer cut short, finishReason MAX_TOKENS.
OUTCOMES: tuple[Outcome, ...] = get_args(Outcome)
SAFETY_CATEGORIES = (
    "HARM_CATEGORY_SEXUALLY_EXPLICIT",
    "HARM_CATEGORY_HATE_SPEECH",
    "HARM_CATEGORY_HARASSMENT",
    "HARM_CATEGORY_DANGEROUS_CONTENT",
)


def field_of(obj: Mapping[str, Any], camel: str) -> Any:
    """A request field under its camelCase name or the snake_case one the SDK sometimes uses."""
    if camel in obj:
        return obj[camel]
    return obj.get(re.sub(r"([A-Z])", r"_\1", camel).lower())


def _modality(mime: str) -> str:
    if mime.startswith("image/"):
        return "IMAGE"
    if mime.startswith("video/"):
        return "VIDEO"
    if mime.startswith("audio/"):
        return "AUDIO"
    if mime == "application/pdf":
        return "DOCUMENT"
    return "TEXT"


@dataclass
class ParsedRequest:
    """What the emulator needs from a GenerateContentRequest."""

    model: str
    text_tokens: int
    media_tokens: dict[str, int]  # modality -> tokens
    seed: int
    markers: list[str]
    generation_config: dict[str, Any]
    safety_settings: list[dict[str, Any]]

    @property
    def prompt_tokens(self) -> int:
        return self.text_tokens + sum(self.media_tokens.values())

    def prompt_details(self) -> list[dict[str, Any]]:
        details = []
        if self.text_tokens:
            details.append({"modality": "TEXT", "tokenCount": self.text_tokens})
        details += [{"modality": m, "tokenCount": n} for m, n in self.media_tokens.items() if n]
        return details


def _contents_of(body: Mapping[str, Any]) -> list[Any]:
    contents = body.get("contents")
    if contents is None:
        raise bad_request("* GenerateContentRequest.contents: contents is not specified\n")
    if isinstance(contents, dict):
        contents = [contents]
    if not isinstance(contents, list):
        raise bad_request("Invalid JSON payload received. 'contents' must be a list.")
    return contents


def parse_request(body: Mapping[str, Any], model: str) -> ParsedRequest:
    """Count the prompt's tokens by Google's rules and derive the answer's seed.

    Raises ApiError (400) for what Gemini refuses: no contents, bad base64, an image part
    that is not a decodable image.
    """
    gen_config = field_of(body, "generationConfig") or {}
    if not isinstance(gen_config, dict):
        raise bad_request("Invalid JSON payload received. 'generationConfig' must be an object.")
    media_resolution = normalize_media_resolution(field_of(gen_config, "mediaResolution"))
    texts: list[str] = []
    media: Counter[str] = Counter()
    media_hashes: list[bytes] = []
    sources: list[tuple[str, Any]] = []
    system = field_of(body, "systemInstruction")
    if isinstance(system, dict):
        sources.append(("systemInstruction", system))
    elif isinstance(system, str):
        sources.append(("systemInstruction", {"parts": [{"text": system}]}))
    for index, content in enumerate(_contents_of(body)):
        sources.append((f"contents[{index}]", content))
    for where, content in sources:
        parts = content.get("parts") if isinstance(content, dict) else None
        if not isinstance(parts, list):
            continue
        for p_index, part in enumerate(parts):
            if not isinstance(part, dict) or part.get("thought"):
                continue
            text = part.get("text")
            if isinstance(text, str):
                texts.append(text)
            inline = field_of(part, "inlineData")
            if isinstance(inline, dict):
                location = f"{where}.parts[{p_index}].inline_data.data"
                data = _decode_base64(inline.get("data"), location)
                mime = str(field_of(inline, "mimeType") or "application/octet-stream")
                media_hashes.append(hashlib.sha256(data).digest())
                modality = _modality(mime)
                if modality == "IMAGE":
                    try:
                        width, height = image_size(data)
                    except ImageDecodeError:
                        raise bad_request(
                            "Unable to process input image. Please retry or report in "
                            + TROUBLESHOOTING
                        ) from None
                    part_setting = field_of(part, "mediaResolution")
                    media["IMAGE"] += image_tokens(
                        width,
                        height,
                        model=model,
                        media_resolution=media_resolution,
                        part_media_resolution=normalize_media_resolution(part_setting),
                        part_num_tokens=_num_tokens(part_setting),
                    )
                else:
                    media[modality if modality != "TEXT" else "DOCUMENT"] += OPAQUE_MEDIA_TOKENS
            file_data = field_of(part, "fileData")
            if isinstance(file_data, dict):
                uri = str(field_of(file_data, "fileUri") or "")
                mime = str(field_of(file_data, "mimeType") or "")
                media_hashes.append(hashlib.sha256(uri.encode()).digest())
                modality = _modality(mime)
                media[modality if modality != "TEXT" else "DOCUMENT"] += OPAQUE_MEDIA_TOKENS
    markers = [m for t in texts for m in MARKER_RE.findall(t)]
    # The answer depends on the images only (so a re-run with another prompt version still
    # gives the same facts for the same picture); text-only prompts seed from their text.
    seed = seed_from(*media_hashes) if media_hashes else seed_from(*(t.encode() for t in texts))
    safety = field_of(body, "safetySettings")
    safety = safety if isinstance(safety, list) else []
    return ParsedRequest(
        model=model,
        text_tokens=text_tokens("".join(texts)),
        media_tokens=dict(media),
        seed=seed,
        markers=markers,
        generation_config=gen_config,
        safety_settings=[s for s in safety if isinstance(s, dict)],
    )


def _num_tokens(setting: Any) -> int | None:
    value = field_of(setting, "numTokens") if isinstance(setting, dict) else None
    return int(value) if isinstance(value, int) and value > 0 else None


def _decode_base64(value: Any, location: str) -> bytes:
    if not isinstance(value, str):
        raise bad_request(f"Invalid value at '{location}' (TYPE_BYTES): missing data")
    try:
        return base64.b64decode(value, altchars=b"-_" if ("-" in value or "_" in value) else None)
    except (binascii.Error, ValueError):
        message = f"Invalid value at '{location}' (TYPE_BYTES), Base64 decoding failed"
        raise bad_request(f'{message} for "{value[:20]}"') from None


@dataclass
class Usage:
    prompt: int = 0
    candidates: int = 0
    thoughts: int = 0

    @property
    def total(self) -> int:
        return self.prompt + self.candidates + self.thoughts


def _thought_tokens(req: ParsedRequest, default_thinking: bool) -> tuple[int, bool]:
    """Thinking tokens spent and whether a thought summary was asked for."""
    thinking = field_of(req.generation_config, "thinkingConfig")
    thinking = thinking if isinstance(thinking, dict) else {}
    include = bool(field_of(thinking, "includeThoughts"))
    budget = field_of(thinking, "thinkingBudget")
    level = field_of(thinking, "thinkingLevel")
    rng = random.Random(req.seed ^ 0x7468696E6B)  # independent of the answer's draws
    dynamic = 120 + rng.randrange(400)
    if isinstance(budget, int | float) and not isinstance(budget, bool):
        if budget == 0:
            # Gemini 3 cannot switch thinking off; 2.x can.
            return (min(dynamic, 128) if model_generation(req.model) >= 3 else 0), include
        if budget < 0:
            return dynamic, include
        return min(int(budget), 64 + rng.randrange(max(1, int(budget)))), include
    if level is not None:
        low = str(level).upper() in ("LOW", "MINIMAL", "THINKING_LEVEL_LOW")
        return (dynamic // 4 if low else dynamic), include
    if default_thinking or model_generation(req.model) >= 3:
        return dynamic, include
    return 0, include


def _answer_text(req: ParsedRequest) -> str:
    rng = random.Random(req.seed)
    cfg = req.generation_config
    mime = str(field_of(cfg, "responseMimeType") or "text/plain")
    schema = field_of(cfg, "responseJsonSchema") or field_of(cfg, "responseSchema")
    if mime == "text/x.enum" and isinstance(schema, dict) and isinstance(schema.get("enum"), list):
        return str(rng.choice(schema["enum"]))
    if mime == "application/json":
        if isinstance(schema, dict):
            value = generate_for_schema(schema, req.seed)
        else:
            value = default_json(rng)
        return json.dumps(value, ensure_ascii=False)
    return plain_text(rng)


def _truncate_to_tokens(text: str, tokens: int) -> str:
    return text[: max(0, tokens) * 4]


def _safety_ratings(blocked: str | None) -> list[dict[str, Any]]:
    ratings = []
    for category in SAFETY_CATEGORIES:
        rating: dict[str, Any] = {"category": category, "probability": "NEGLIGIBLE"}
        if category == blocked:
            rating = {"category": category, "probability": "HIGH", "blocked": True}
        ratings.append(rating)
    return ratings


def _blockable_category(req: ParsedRequest, rng: random.Random) -> str | None:
    """A category the request's safetySettings still block (None: everything is off)."""
    off = {
        str(s.get("category"))
        for s in req.safety_settings
        if str(s.get("threshold", "")).upper() in ("BLOCK_NONE", "OFF")
    }
    open_categories = [c for c in SAFETY_CATEGORIES if c not in off]
    return rng.choice(open_categories) if open_categories else None


def build_response(
    req: ParsedRequest,
    outcome: str,
    *,
    response_id: str,
    default_thinking: bool,
    forced: bool,
) -> tuple[dict[str, Any], Usage, str]:
    """The GenerateContentResponse JSON, its usage, and the outcome actually produced."""
    usage = Usage(prompt=req.prompt_tokens)
    envelope: dict[str, Any] = {"modelVersion": req.model, "responseId": response_id}
    rng = random.Random(req.seed ^ 0x5AFE)
    if outcome in ("safety", "prompt_blocked"):
        category = SAFETY_CATEGORIES[-1] if forced else _blockable_category(req, rng)
        if category is None:
            outcome = "ok"  # the caller switched every filter off: nothing to block
        elif outcome == "prompt_blocked":
            body = {
                "promptFeedback": {
                    "blockReason": "SAFETY",
                    "safetyRatings": _safety_ratings(category),
                },
                "usageMetadata": _usage_json(req, usage),
                **envelope,
            }
            return body, usage, outcome
        else:
            candidate = {
                "finishReason": "SAFETY",
                "index": 0,
                "safetyRatings": _safety_ratings(category),
            }
            body = {"candidates": [candidate], "usageMetadata": _usage_json(req, usage), **envelope}
            return body, usage, outcome

    text = _answer_text(req)
    text, cut_off = spoil(text, outcome)
    finish = "MAX_TOKENS" if cut_off else "STOP"
    thoughts, include_thoughts = _thought_tokens(req, default_thinking)
    max_output = field_of(req.generation_config, "maxOutputTokens")
    answer_tokens = text_tokens(text)
    if isinstance(max_output, int) and not isinstance(max_output, bool) and max_output > 0:
        # Gemini 2.5 and later count thinking against maxOutputTokens.
        if thoughts >= max_output:
            thoughts, text, finish = max_output, "", "MAX_TOKENS"
        elif answer_tokens > max_output - thoughts:
            text, finish = _truncate_to_tokens(text, max_output - thoughts), "MAX_TOKENS"
        answer_tokens = text_tokens(text)
    usage.candidates = answer_tokens
    usage.thoughts = thoughts
    parts: list[dict[str, Any]] = []
    if include_thoughts and thoughts:
        summary = f"**Looking at the image**\n\nI see {caption(rng).lower()} I describe it."
        parts.append({"text": summary, "thought": True})
    if text:
        parts.append({"text": text})
    content: dict[str, Any] = {"role": "model"}
    if parts:
        content["parts"] = parts
    candidate = {"content": content, "finishReason": finish, "index": 0}
    body = {"candidates": [candidate], "usageMetadata": _usage_json(req, usage), **envelope}
    return body, usage, outcome


def _usage_json(req: ParsedRequest, usage: Usage) -> dict[str, Any]:
    # Google omits zero-valued fields (proto3 JSON): no candidatesTokenCount on a blocked
    # answer, no thoughtsTokenCount when the model did not think.
    out: dict[str, Any] = {"promptTokenCount": usage.prompt}
    if usage.candidates:
        out["candidatesTokenCount"] = usage.candidates
    out["totalTokenCount"] = usage.total
    out["promptTokensDetails"] = req.prompt_details()
    if usage.thoughts:
        out["thoughtsTokenCount"] = usage.thoughts
    return out
