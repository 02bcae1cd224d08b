"""OpenAI prices and the token rules of an image (the arithmetic is ``common.pricing``).

USD per 1M tokens, standard (interactive) rate; output includes reasoning tokens; cached
input is what OpenAI bills prompt tokens served from its prompt cache. These are the list
prices of openai.com/api/pricing as known to the author in 2025; this machine cannot reach
OpenAI, so they could not be checked: override what changed with ``OPENAI_PRICES_FILE``
(the same JSON format as ``GEMINI_PRICES_FILE``). A self-hosted server (``OPENAI_BASE_URL``
set: vLLM, Ollama, LM Studio, TGI...) costs 0 for a model the table and the file do not
name, so budgets and estimates still work and say $0.

Image tokens follow OpenAI's published rule for the GPT-4o family: ``detail: low`` is 85
tokens; otherwise the image is fitted into 2048x2048, its shorter side scaled to 768 px,
and each 512 px tile costs 170 tokens on top of 85. Other families (4.1-mini, o-series)
count differently; the figure is used for quota pacing and budget reservations only, the
bill is what the server's ``usage`` reports.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

from imagestream.common import pricing
from imagestream.common.pricing import Price

PRICES_SETTING = "OPENAI_PRICES_FILE"

PRICES: dict[str, Price] = {
    "gpt-4o": Price(input=2.50, output=10.00, cached_input=1.25),
    "gpt-4o-mini": Price(input=0.15, output=0.60, cached_input=0.075),
    "gpt-4.1": Price(input=2.00, output=8.00, cached_input=0.50),
    "gpt-4.1-mini": Price(input=0.40, output=1.60, cached_input=0.10),
    "gpt-4.1-nano": Price(input=0.10, output=0.40, cached_input=0.025),
    "o4-mini": Price(input=1.10, output=4.40, cached_input=0.275),
    "gpt-5": Price(input=1.25, output=10.00, cached_input=0.125),
    "gpt-5-mini": Price(input=0.25, output=2.00, cached_input=0.025),
    "gpt-5-nano": Price(input=0.05, output=0.40, cached_input=0.005),
}
#: What a model the tables do not name costs on a self-hosted server.
FREE = Price(input=0.0, output=0.0, cached_input=0.0)


@functools.lru_cache(maxsize=4)
def cached_prices(path: str | None) -> dict[str, Price]:
    """The table above with the entries of ``OPENAI_PRICES_FILE`` over it, once per file."""
    return pricing.load_prices(PRICES, path or None, setting=PRICES_SETTING)


def price_for(model: str, table: Mapping[str, Price], *, self_hosted: bool) -> Price:
    """The model's price; on a self-hosted server an unlisted model is free."""
    found = pricing.find_price(model, table)
    if found is not None:
        return found
    if self_hosted:
        return FREE
    return pricing.price_of(model, table, setting=PRICES_SETTING)  # raises, naming the file


def image_tokens(width: int, height: int, detail: str) -> int:
    if detail == "low":
        return 85
    scale = min(1.0, 2048 / max(width, height))
    w, h = width * scale, height * scale
    shorter = min(w, h)
    if shorter > 768:
        w, h = w * 768 / shorter, h * 768 / shorter
    return 85 + 170 * math.ceil(w / 512) * math.ceil(h / 512)
