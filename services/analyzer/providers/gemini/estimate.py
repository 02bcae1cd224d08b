"""``imagestream estimate`` for Gemini: input tokens counted by countTokens, or by the rules.

With keys configured, each sampled image is counted with Gemini's countTokens endpoint (the
image and the prompt when the profile leaves the media resolution to Google; the prompt
alone otherwise, as countTokens cannot be told a media resolution and the image's tokens
are then fixed by the rules), else by Google's published rules. Output tokens cannot be
counted before the model answers: the profile's ``expected_output_tokens`` stands for them,
its cap bounds them. Duration is at the configured quota of all projects together.
"""

from __future__ import annotations

import io
import statistics
from collections.abc import Mapping
from typing import Any

from google.genai import errors, types
from PIL import Image

from imagestream.common import profiles, settings
from imagestream.common.providers import EstimateRequest, ProviderEstimate

from . import pricing as gemini_pricing
from .keys import make_client
from .provider import GeminiSettings


async def _count_online(
    config: GeminiSettings, compiled: profiles.CompiledProfile, model: str, images: list[bytes]
) -> list[int]:
    secret = config.gemini_api_keys[0].partition("@")[0]
    client = make_client(
        secret,
        base_url=config.gemini_base_url,
        api_version=config.gemini_api_version,
        timeout_s=config.gemini_timeout_s,
    )
    prompt = compiled.profile.prompt
    # countTokens takes no generation config in the Gemini API: the response schema is
    # counted by the rules, and so is the image when the profile fixes its resolution.
    schema = compiled.schema_tokens
    counts = []
    try:
        if compiled.profile.media_resolution is not None:
            only_text: list[Any] = [prompt]
            text = await client.aio.models.count_tokens(model=model, contents=only_text)
            for data in images:
                width, height = _size(data)
                image = gemini_pricing.image_tokens(
                    width, height, model, compiled.profile.media_resolution
                )
                counts.append(image + (text.total_tokens or 0) + schema)
        else:
            for data in images:
                contents: list[Any] = [
                    types.Part.from_bytes(data=data, mime_type=_mime(data)),
                    prompt,
                ]
                reply = await client.aio.models.count_tokens(model=model, contents=contents)
                counts.append((reply.total_tokens or 0) + schema)
    except errors.APIError as exc:
        raise profiles.ProfileError(f"Gemini's countTokens failed ({exc.code} {exc.status}); "
                         "try --offline") from None  # fmt: skip
    finally:
        await client.aio.aclose()
    return counts


def _size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:
        return img.size


def _mime(data: bytes) -> str:
    return "image/png" if data.startswith(b"\x89PNG") else "image/jpeg"


async def estimate(env: Mapping[str, str], request: EstimateRequest) -> ProviderEstimate:
    config = settings.load(GeminiSettings, env)
    choice = config.choose(request.profile, request.model)
    compiled, model = choice.compiled, choice.model
    images = request.sample
    if images and config.gemini_api_keys and not request.offline:
        counts = await _count_online(config, compiled, model, images)
        counted_by = "Gemini's countTokens"
    else:
        counts = [gemini_pricing.input_tokens(compiled, model, *_size(d)) for d in images]
        counted_by = "Google's published token rules"
    result = gemini_pricing.estimate_batch(
        config.prices(),
        compiled,
        model,
        images=request.images,
        requests_per_minute=config.keyed().quota_rpm(),
        input_tokens_per_image=statistics.fmean(counts) if counts else None,
    )
    return ProviderEstimate(
        estimate=result,
        profile=compiled.name,
        counted_by=counted_by if images else "the rules, at the default analysis size",
        keys=len(config.gemini_api_keys),
    )
