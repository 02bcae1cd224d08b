"""Reading a Gemini answer: the analysis, a refusal, or why the answer is unusable; its usage.

Structured output normally arrives as JSON matching the response schema. When it does not:

* A refusal (``promptFeedback.blockReason``, or a candidate finished for SAFETY and the like)
  is a result: ``blocked`` true with the reason, no retry (the same image gets the same
  refusal, and each try is billed).
* JSON wrapped in Markdown fences or in a sentence gets the one local repair every provider
  gets (``answers``), then fails as ``analyzer_invalid_output``.
* An answer cut at the output-token cap (finish reason MAX_TOKENS) fails the same way, with
  a message that names the cap to raise.
"""

from __future__ import annotations

from typing import Any

from google.genai import types

from imagestream.common import pricing
from imagestream.common.messages import Usage
from imagestream.common.profiles import CompiledProfile

from ...answers import InvalidOutput, parse

#: Finish reasons that mean the model refused to answer (google.genai FinishReason).
REFUSALS = frozenset(
    {
        "SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII",
        "IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION",
    }
)  # fmt: skip


def _name(value: Any) -> str:
    return str(getattr(value, "value", value))


def _flagged(ratings: list[types.SafetyRating] | None) -> str:
    names = [
        _name(r.category).removeprefix("HARM_CATEGORY_").lower()
        for r in ratings or []
        if r.blocked or _name(r.probability) == "HIGH"
    ]
    return f" ({', '.join(names)})" if names else ""


def read(response: types.GenerateContentResponse, profile: CompiledProfile) -> dict[str, Any]:
    """The analysis (flattened), or the ``blocked`` analysis; InvalidOutput otherwise."""
    feedback = response.prompt_feedback
    if feedback is not None and feedback.block_reason is not None:
        reason = _name(feedback.block_reason)
        return profile.blocked(f"prompt blocked: {reason}{_flagged(feedback.safety_ratings)}")
    if not response.candidates:
        raise InvalidOutput("Gemini returned no candidate")
    candidate = response.candidates[0]
    finish = _name(candidate.finish_reason) if candidate.finish_reason else "STOP"
    if finish in REFUSALS:
        return profile.blocked(f"{finish}{_flagged(candidate.safety_ratings)}")
    parts = candidate.content.parts if candidate.content and candidate.content.parts else []
    text = "".join(p.text for p in parts if p.text and not p.thought)
    if finish == "MAX_TOKENS":
        cap = profile.profile.max_output_tokens
        raise InvalidOutput(
            f"the answer was cut at the output cap of {cap} tokens"
            f" (raise max_output_tokens of profile {profile.name})"
        )
    return parse(text, profile, "gemini")


def usage_of(
    response: types.GenerateContentResponse,
    price: pricing.Price,
    mode: pricing.Mode = "standard",
) -> Usage:
    """Tokens from usageMetadata (Google omits zero counts) and what they cost."""
    meta = response.usage_metadata
    if meta is None:
        return Usage()
    prompt = meta.prompt_token_count or 0
    output = meta.candidates_token_count or 0
    thoughts = meta.thoughts_token_count or 0
    cached = meta.cached_content_token_count or 0
    cost = pricing.cost_usd(
        price,
        input_tokens=prompt,
        output_tokens=output + thoughts,
        cached_tokens=cached,
        mode=mode,
    )
    return Usage(
        input_tokens=prompt,
        output_tokens=output,
        thought_tokens=thoughts,
        cached_tokens=cached,
        cost_usd=cost,
    )
