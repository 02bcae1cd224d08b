"""Gemini prices, the cost of one call, token rules for images, and the arithmetic of estimates.

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
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import msgspec

Mode = Literal["standard", "batch"]
BATCH_DISCOUNT = 0.5
LONG_PROMPT_TOKENS = 200_000
TEXT_CHARS_PER_TOKEN = 4


class Price(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """USD per 1M tokens."""

    input: float
    output: float
    #: Input tokens served from Gemini's context cache (default: 10 % of ``input``).
    cached_input: float | None = None
    #: Prices for prompts above 200k tokens (default: the same as below).
    input_long: float | None = None
    output_long: float | None = None
    #: A promotional price ends after this day; ``then`` applies from the next day.
    until: dt.date | None = None
    then: Price | None = None


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


class PriceError(ValueError):
    """No price for a model, or an unreadable price file (one line)."""


def load_prices(path: str | Path | None = None) -> dict[str, Price]:
    """The shipped table with the entries of the JSON file at ``path`` over it."""
    table = dict(PRICES)
    if not path:
        return table
    try:
        raw = Path(path).read_bytes()
        table.update(msgspec.json.decode(raw, type=dict[str, Price]))
    except OSError as exc:
        raise PriceError(f"cannot read GEMINI_PRICES_FILE {path}: {exc.strerror}") from None
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise PriceError(f"GEMINI_PRICES_FILE {path}: {exc}") from None
    return table


def find_price(
    model: str, table: Mapping[str, Price] = PRICES, *, on: dt.date | None = None
) -> Price | None:
    name = model.removeprefix("models/")
    price = table.get(name)
    if price is None:
        matches = [m for m in table if name.startswith(m + "-")]
        if not matches:
            return None
        price = table[max(matches, key=len)]
    day = on or dt.datetime.now(dt.UTC).date()
    while price.until is not None and price.then is not None and day > price.until:
        price = price.then
    return price


def price_of(model: str, table: Mapping[str, Price] = PRICES) -> Price:
    price = find_price(model, table)
    if price is None:
        raise PriceError(
            f"no price for model {model!r}: add it to GEMINI_PRICES_FILE"
            f" (known: {', '.join(sorted(table))})"
        )
    return price


def cost_usd(
    price: Price,
    *,
    input_tokens: int,
    output_tokens: int,
    cached_tokens: int = 0,
    mode: Mode = "standard",
) -> float:
    """What one call costs. ``input_tokens`` includes ``cached_tokens`` (as Gemini reports
    promptTokenCount); ``output_tokens`` includes thinking tokens."""
    long = input_tokens > LONG_PROMPT_TOKENS
    rate_in = (price.input_long or price.input) if long else price.input
    rate_out = (price.output_long or price.output) if long else price.output
    rate_cached = price.cached_input if price.cached_input is not None else rate_in / 10
    fresh = max(0, input_tokens - cached_tokens)
    usd = (fresh * rate_in + cached_tokens * rate_cached + output_tokens * rate_out) / 1e6
    return usd * (BATCH_DISCOUNT if mode == "batch" else 1.0)


def format_usd(amount: float) -> str:
    """Dollars for people: cents for large amounts, enough digits for a single call."""
    if amount >= 10:
        return f"${amount:,.2f}"
    return f"${amount:.4f}" if amount >= 0.001 or amount == 0 else f"${amount:.6f}"


# ---------------------------------------------------------------- token rules
_GENERATION = re.compile(r"gemini-(\d+)")
GEMINI2_MEDIA_TOKENS = {"low": 64, "medium": 256, "high": 256}
GEMINI3_MEDIA_TOKENS = {"low": 280, "medium": 560, "high": 1120}
MediaResolution = Literal["low", "medium", "high"]


def model_generation(model: str) -> int:
    match = _GENERATION.search(model)
    return int(match.group(1)) if match else 2


def text_tokens(text: str) -> int:
    return math.ceil(len(text) / TEXT_CHARS_PER_TOKEN) if text else 0


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
@dataclass(frozen=True, slots=True)
class Estimate:
    """The expected tokens, cost and duration of analyzing ``images`` images."""

    model: str
    images: int
    input_tokens_per_image: float
    output_tokens_per_image: float
    max_output_tokens: int
    cost_usd: float  # expected, standard price
    cost_usd_max: float  # every answer at the output cap, standard price
    batch_cost_usd: float  # expected, Batch API price
    requests_per_minute: float
    minutes: float | None  # at the quota; None when the quota is unlimited

    @property
    def cost_per_1000_usd(self) -> float:
        return 1000 * self.cost_usd / self.images if self.images else 0.0


def estimate(
    *,
    model: str,
    price: Price,
    images: int,
    input_tokens_per_image: float,
    output_tokens_per_image: float,
    max_output_tokens: int,
    requests_per_minute: float,
) -> Estimate:
    """Cost and duration of a batch from per-image token figures (measured or by the rules)."""

    def total(output: float, mode: Mode = "standard") -> float:
        one = cost_usd(
            price,
            input_tokens=round(input_tokens_per_image),
            output_tokens=round(output),
            mode=mode,
        )
        return one * images

    return Estimate(
        model=model,
        images=images,
        input_tokens_per_image=input_tokens_per_image,
        output_tokens_per_image=output_tokens_per_image,
        max_output_tokens=max_output_tokens,
        cost_usd=total(output_tokens_per_image),
        cost_usd_max=total(max_output_tokens),
        batch_cost_usd=total(output_tokens_per_image, "batch"),
        requests_per_minute=requests_per_minute,
        minutes=images / requests_per_minute if requests_per_minute > 0 else None,
    )
