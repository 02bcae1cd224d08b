"""Anthropic prices and the token rule of an image (the arithmetic is ``common.pricing``).

USD per 1M tokens, standard (interactive) rate; the Message Batches API costs half.
``cached_input`` is a prompt-cache read (a tenth of the input price); a cache write costs
1.25 times the input price (``CACHE_WRITE_FACTOR``, 5-minute cache). Sonnet 4 and 4.5
bill prompts above 200k tokens at the ``*_long`` rates. These are the list prices of
claude.com/pricing as known to the author in 2025; this machine cannot reach Anthropic,
so they could not be checked: override what changed with ``ANTHROPIC_PRICES_FILE`` (the
same JSON format as ``GEMINI_PRICES_FILE``). Every Claude model listed reads images.

An image costs about width x height / 750 tokens after it is fitted into 1568 px on its
long side and 1.15 megapixels (Anthropic's published rule); forcing a tool adds the
tool-use system prompt (313 tokens for ``tool_choice`` ``tool``) and the tool's
definition. The figures serve quota pacing, budget reservations and estimates; the bill
is what the answer's ``usage`` reports.
"""

from __future__ import annotations

import functools
import math

from imagestream.common import pricing
from imagestream.common.pricing import Price

PRICES_SETTING = "ANTHROPIC_PRICES_FILE"
CACHE_WRITE_FACTOR = 1.25
#: Input tokens Anthropic adds when a tool is forced (``tool_choice`` any or tool).
FORCED_TOOL_SYSTEM_TOKENS = 313

PRICES: dict[str, Price] = {
    "claude-opus-4-5": Price(input=5.00, output=25.00, cached_input=0.50),
    "claude-opus-4-1": Price(input=15.00, output=75.00, cached_input=1.50),
    "claude-opus-4": Price(input=15.00, output=75.00, cached_input=1.50),
    "claude-sonnet-4-5": Price(
        input=3.00, output=15.00, cached_input=0.30, input_long=6.00, output_long=22.50
    ),
    "claude-sonnet-4": Price(
        input=3.00, output=15.00, cached_input=0.30, input_long=6.00, output_long=22.50
    ),
    "claude-3-7-sonnet": Price(input=3.00, output=15.00, cached_input=0.30),
    "claude-haiku-4-5": Price(input=1.00, output=5.00, cached_input=0.10),
    "claude-3-5-haiku": Price(input=0.80, output=4.00, cached_input=0.08),
    "claude-3-haiku": Price(input=0.25, output=1.25, cached_input=0.03),
}


@functools.lru_cache(maxsize=4)
def cached_prices(path: str | None) -> dict[str, Price]:
    """The table above with the entries of ``ANTHROPIC_PRICES_FILE`` over it, once per file."""
    return pricing.load_prices(PRICES, path or None, setting=PRICES_SETTING)


def image_tokens(width: int, height: int) -> int:
    w, h = float(max(1, width)), float(max(1, height))
    scale = min(1.0, 1568 / max(w, h), math.sqrt(1_150_000 / (w * h)))
    return math.ceil((w * scale) * (h * scale) / 750)
