"""``imagestream estimate`` for Anthropic: with a key, each sampled image's call counted by
Anthropic's free ``count_tokens`` (``--offline``: by its image rule plus the prompt and the
forced tool); prices from the table."""

from __future__ import annotations

from collections.abc import Mapping

import anthropic

from imagestream.common import pricing, profiles
from imagestream.common.providers import CHECK_TIMEOUT_S, EstimateRequest, ProviderEstimate

from ..keyed import Choice, estimate_by_rule, estimate_from_counts
from . import pricing as anthropic_pricing
from .provider import AnthropicSettings, make_client, message_request, settings_from, tool_tokens


async def _count_online(
    config: AnthropicSettings, choice: Choice, images: list[bytes]
) -> list[int]:
    keys, _ = config.keyed().key_specs()
    client = make_client(
        keys[0].secret, base_url=config.anthropic_base_url, timeout_s=CHECK_TIMEOUT_S
    )
    counts = []
    async with client:
        for data in images:
            params = message_request(choice, data)
            del params["max_tokens"]  # not a count_tokens argument
            try:
                counted = await client.messages.count_tokens(**params)
            except anthropic.APIError as exc:
                raise profiles.ProfileError(
                    f"Anthropic's count_tokens failed ({exc}); try --offline"
                ) from None
            counts.append(counted.input_tokens)
    return counts


async def estimate(env: Mapping[str, str], request: EstimateRequest) -> ProviderEstimate:
    config = settings_from(env)
    choice = config.choose(request.profile, request.model)
    if request.sample and config.anthropic_api_keys and not request.offline:
        counts = await _count_online(config, choice, request.sample)
        return estimate_from_counts(
            config.keyed(), choice, request, counts, "Anthropic's count_tokens"
        )
    return estimate_by_rule(
        config.keyed(),
        choice,
        request,
        prompt_tokens=pricing.text_tokens(choice.compiled.profile.prompt) + tool_tokens(choice),
        image_tokens=anthropic_pricing.image_tokens,
        rule="Anthropic's image token rule",
    )
