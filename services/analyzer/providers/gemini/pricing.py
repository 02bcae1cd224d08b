"""Gemini prices and Google's token rules for images (the arithmetic is ``common.pricing``).

Prices are list prices in USD per 1M tokens at the standard (interactive) rate, for prompts
up to 200k tokens (``*_long`` above that). Output prices include thinking tokens. The Batch
API costs half ("Batch API (50% cost reduction)"), for input and output alike.

Source: the Gemini Developer API pricing page, https://ai.google.dev/gemini-api/docs/pricing,
as transcribed verbatim on 2026-10-07 by github.com/api-evangelist/deepmind
(plans/deepmind-plans-pricing.yml: "every price_text was found verbatim in the fetched page
text"); the 2.5 Flash-Lite input price ($0.10) and the cached-input rate (a 90 % discount on
the input price) from the secondary summaries of the same page at deploybase.ai and
nicolalazzari.ai (2026). Looked up on 2026-11-24. This machine cannot reach Google: check the
page before relying on a figure, and override what changed with ``GEMINI_PRICES_FILE``, a JSON
object ``{"model": {"input": 0.1, "output": 0.4, "cached_input": 0.01, ...}}`` merged over the
table below (the fields of ``Price``; a model not listed is added).

A model name matches its exact entry, else the longest entry it starts with followed by "-"
(``gemini-2.5-flash-lite-preview-09-2025`` is priced as ``gemini-2.5-flash-lite``).

Image tokens follow Google's published rules (https://ai.google.dev/gemini-api/docs/tokens,
https://ai.google.dev/gemini-api/docs/media-resolution and the ``MediaResolution`` enum of
the API): Gemini 2.x charges 64 / 256 / 256 tokens per image at media resolution LOW /
MEDIUM / HIGH, and without one 258 tokens for an image whose sides are both <= 384 px, else
258 per 768x768 tile (tile side = shorter side / 1.5, kept within 256..768, the image first
fitted into 3072x3072); Gemini 3 charges 280 / 560 / 1120 at LOW / MEDIUM / HIGH (HIGH when
unset). Text is about four characters per token.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
import re
from collections.abc import Mapping

from imagestream.common import pricing
from imagestream.common.pricing import Price
from imagestream.common.profiles import CompiledProfile, MediaResolution

#: The setting that names a price file read over the table below.
PRICES_SETTING = "GEMINI_PRICES_FILE"

PRICES: dict[str, Price] = {
    "gemini-2.5-flash-lite": Price(input=0.10, output=0.40),
    "gemini-2.5-flash": Price(input=0.30, output=2.50),
    "gemini-2.5-pro": Price(input=1.25, output=10.00, input_long=2.50, output_long=15.00),
    "gemini-3.1-pro-preview": Price(input=2.00, output=12.00, input_long=4.00, output_long=18.00),
    "gemini-3.5-flash-lite": Price(input=0.30, output=2.50),
    "gemini-3.5-flash": Price(input=1.50, output=9.00),
    # "$0.75 through December 31, 2026", "$1.50 starting January 1, 2027" (output 3.75 / 7.50).
    "gemini-3.8-flash": Price(
        input=0.75,
        output=3.75,
        until=dt.date(2026, 12, 31),
        then=Price(input=1.50, output=7.50),
    ),
}


def load_prices(path: str | None) -> dict[str, Price]:
    """The table above with the entries of ``GEMINI_PRICES_FILE`` over it."""
    return pricing.load_prices(PRICES, path, setting=PRICES_SETTING)


@functools.lru_cache(maxsize=4)
def cached_prices(path: str | None) -> dict[str, Price]:
    """``load_prices``, once per process for the same file."""
    return load_prices(path or None)


# ---------------------------------------------------------------- token rules
_GENERATION = re.compile(r"gemini-(\d+)")
GEMINI2_MEDIA_TOKENS = {"low": 64, "medium": 256, "high": 256}
GEMINI3_MEDIA_TOKENS = {"low": 280, "medium": 560, "high": 1120}


def model_generation(model: str) -> int:
    match = _GENERATION.search(model)
    return int(match.group(1)) if match else 2


def image_tokens(width: int, height: int, model: str, media: MediaResolution | None) -> int:
    """Tokens Gemini charges for one image of this size (see the module docstring)."""
    if model_generation(model) >= 3:
        return GEMINI3_MEDIA_TOKENS[media or "high"]
    if media is not None:
        return GEMINI2_MEDIA_TOKENS[media]
    if width <= 384 and height <= 384:
        return 258
    scale = min(1.0, 3072 / max(width, height))
    w, h = max(1.0, width * scale), max(1.0, height * scale)
    tile = min(max(min(w, h) / 1.5, 256), 768)
    return math.ceil(w / tile) * math.ceil(h / tile) * 258


# ---------------------------------------------------------------- estimates
def input_tokens(compiled: CompiledProfile, model: str, width: int, height: int) -> int:
    """A call's prompt tokens by Google's published rules: the image, the prompt text and
    the response schema (which Gemini counts as input too)."""
    media = compiled.profile.media_resolution
    image = image_tokens(width, height, model, media)
    return image + pricing.text_tokens(compiled.profile.prompt) + compiled.schema_tokens


def estimate_batch(
    prices: Mapping[str, pricing.Price],
    compiled: CompiledProfile,
    model: str,
    *,
    images: int,
    requests_per_minute: float,
    input_tokens_per_image: float | None = None,
    image_size: tuple[int, int] = (768, 576),
) -> pricing.Estimate:
    """Tokens, cost and duration of ``images`` images with this profile and model.

    Input tokens per image are measured ones (``imagestream estimate`` samples the list) or
    else the rules applied to ``image_size`` (the fetcher's default analysis size); output
    tokens are the profile's ``expected_output_tokens`` (else half its cap).
    """
    profile = compiled.profile
    measured = input_tokens_per_image
    return pricing.estimate(
        model=model,
        price=pricing.price_of(model, prices),
        images=images,
        input_tokens_per_image=measured
        if measured is not None
        else input_tokens(compiled, model, *image_size),
        output_tokens_per_image=profile.expected_output_tokens or profile.max_output_tokens / 2,
        max_output_tokens=profile.max_output_tokens,
        requests_per_minute=requests_per_minute,
    )
