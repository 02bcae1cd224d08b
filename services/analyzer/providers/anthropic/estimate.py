"""``imagestream estimate`` for Anthropic: input tokens by Anthropic's image rule plus the
prompt and the forced tool (its definition and the tool-use system prompt), prices from
the table."""

from __future__ import annotations

from collections.abc import Mapping

from imagestream.common import pricing
from imagestream.common.providers import EstimateRequest, ProviderEstimate

from ..keyed import estimate_by_rule
from . import pricing as anthropic_pricing
from .provider import settings_from, tool_tokens


async def estimate(env: Mapping[str, str], request: EstimateRequest) -> ProviderEstimate:
    config = settings_from(env)
    choice = config.choose(request.profile, request.model)
    compiled = choice.compiled
    return estimate_by_rule(
        config.keyed(),
        choice,
        request,
        prompt_tokens=pricing.text_tokens(compiled.profile.prompt) + tool_tokens(choice),
        image_tokens=anthropic_pricing.image_tokens,
        rule="Anthropic's image token rule",
    )
