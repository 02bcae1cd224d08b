"""Model prices, the cost of one call, and the arithmetic of estimates, for every provider.

Prices are USD per 1M tokens at the standard (interactive) rate, for prompts up to 200k
tokens (``*_long`` above that). Output prices include thinking (reasoning) tokens. Batch
APIs cost half (Gemini, OpenAI and Anthropic alike), for input and output.

Each provider ships its own table (``providers/<name>/pricing.py``) and reads a price file
over it (``GEMINI_PRICES_FILE``, ``OPENAI_PRICES_FILE``...): a JSON object
``{"model": {"input": 0.1, "output": 0.4, "cached_input": 0.01, ...}}`` (the fields of
``Price``; a model not listed is added). A model name matches its exact entry, else the
longest entry it starts with followed by "-" (``gemini-2.5-flash-lite-preview-09-2025`` is
priced as ``gemini-2.5-flash-lite``).
"""

from __future__ import annotations

import datetime as dt
import math
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


class PriceError(ValueError):
    """No price for a model, or an unreadable price file (one line)."""


def load_prices(
    shipped: Mapping[str, Price], path: str | Path | None, *, setting: str
) -> dict[str, Price]:
    """A provider's shipped table with the entries of the JSON file at ``path`` (named by
    the setting ``setting``) over it."""
    table = dict(shipped)
    if not path:
        return table
    try:
        raw = Path(path).read_bytes()
        table.update(msgspec.json.decode(raw, type=dict[str, Price]))
    except OSError as exc:
        raise PriceError(f"cannot read {setting} {path}: {exc.strerror}") from None
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise PriceError(f"{setting} {path}: {exc}") from None
    return table


def find_price(
    model: str, table: Mapping[str, Price], *, on: dt.date | None = None
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


def price_of(
    model: str, table: Mapping[str, Price], *, setting: str = "GEMINI_PRICES_FILE"
) -> Price:
    price = find_price(model, table)
    if price is None:
        raise PriceError(
            f"no price for model {model!r}: add it to {setting} (known: {', '.join(sorted(table))})"
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


def text_tokens(text: str) -> int:
    """Tokens of a text by the usual rule of about four characters a token."""
    return math.ceil(len(text) / TEXT_CHARS_PER_TOKEN) if text else 0


def format_usd(amount: float) -> str:
    """Dollars for people: cents for large amounts, enough digits for a single call."""
    if amount >= 10:
        return f"${amount:,.2f}"
    return f"${amount:.4f}" if amount >= 0.001 or amount == 0 else f"${amount:.6f}"


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
