"""``imagestream estimate`` for OpenAI-compatible servers: input tokens by OpenAI's image
rule (no counting endpoint exists), prices from the table (self-hosted: 0 unless listed)."""

from __future__ import annotations

import io
import statistics
from collections.abc import Mapping

from PIL import Image

from imagestream.common import pricing
from imagestream.common.providers import EstimateRequest, ProviderEstimate

from . import pricing as openai_pricing
from .provider import settings_from


def estimate(env: Mapping[str, str], request: EstimateRequest) -> ProviderEstimate:
    config = settings_from(env)
    choice = config.choose(request.profile, request.model)
    prompt = pricing.text_tokens(choice.compiled.profile.prompt) + choice.compiled.schema_tokens

    def tokens(data: bytes) -> int:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
        return prompt + openai_pricing.image_tokens(width, height, config.openai_image_detail)

    counts = [tokens(d) for d in request.sample] or [
        prompt + openai_pricing.image_tokens(768, 576, config.openai_image_detail)
    ]
    profile = choice.compiled.profile
    result = pricing.estimate(
        model=choice.model,
        price=choice.price,
        images=request.images,
        input_tokens_per_image=statistics.fmean(counts),
        output_tokens_per_image=profile.expected_output_tokens or profile.max_output_tokens / 2,
        max_output_tokens=profile.max_output_tokens,
        requests_per_minute=config.keyed().quota_rpm(),
    )
    return ProviderEstimate(
        estimate=result,
        profile=choice.compiled.name,
        counted_by="OpenAI's image token rule" if request.sample else "the rule, at 768x576",
        keys=len(config.openai_api_keys),
    )
