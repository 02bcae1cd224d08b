"""``imagestream estimate`` for OpenAI-compatible servers: input tokens by OpenAI's image
rule (no counting endpoint exists), prices from the table (self-hosted: 0 unless listed)."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

from imagestream.common import pricing
from imagestream.common.providers import EstimateRequest, ProviderEstimate

from ..keyed import estimate_by_rule
from . import pricing as openai_pricing
from .provider import settings_from


async def estimate(env: Mapping[str, str], request: EstimateRequest) -> ProviderEstimate:
    config = settings_from(env)
    choice = config.choose(request.profile, request.model)
    return estimate_by_rule(
        config.keyed(),
        choice,
        request,
        prompt_tokens=pricing.text_tokens(choice.compiled.profile.prompt)
        + choice.compiled.schema_tokens,
        image_tokens=partial(openai_pricing.image_tokens, detail=config.openai_image_detail),
        rule="OpenAI's image token rule",
    )
