"""``imagestream estimate``: what a Gemini batch will cost and how long it will take, first.

It reads the whole list (or folder) to count the images, draws a random sample, makes each
sampled image exactly as the fetcher would (download through the same address guard,
downscale to the analysis size) and counts its input tokens: with Gemini's countTokens
endpoint when keys are configured (the image and the prompt when the profile leaves the
media resolution to Google; the prompt alone otherwise, as countTokens cannot be told a
media resolution and the image's tokens are then fixed by the rules), else by Google's
published rules. Output tokens cannot be counted before the model answers: the profile's
``expected_output_tokens`` stands for them, its cap bounds them. Duration is at the
configured quota of all projects together.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import random
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from google.genai import errors, types
from PIL import Image

from imagestream.analyzer.providers.gemini.keys import make_client
from imagestream.analyzer.providers.gemini.provider import GeminiProvider
from imagestream.analyzer.service import AnalyzerSettings
from imagestream.common import pricing, profiles, settings
from imagestream.common.errors import ItemError
from imagestream.common.inputs import InputError, ListParser, Row
from imagestream.fetcher.loader import ImageLoader
from imagestream.fetcher.settings import FetcherSettings

from .local import UsageError, file_chunks, folder_list

OLD_SYSTEM_PER_KEY_PER_MINUTE = 60


@dataclass
class Sample:
    total: int
    urls: list[str]


@dataclass
class Report:
    estimate: pricing.Estimate
    profile: str
    sampled: int
    unusable: int
    counted_by: str
    keys: int


async def read_sample(source: Path, size: int, *, folder: bool, seed: int = 0) -> Sample:
    """Every row counted, ``size`` of them drawn at random (reservoir sampling)."""
    rng = random.Random(seed)
    chosen: list[str] = []
    total = 0

    def take(url: str) -> None:
        nonlocal total
        total += 1
        if len(chosen) < size:
            chosen.append(url)
        elif (slot := rng.randrange(total)) < size:
            chosen[slot] = url

    if folder:
        async for chunk in folder_list(source):
            for line in chunk.decode().splitlines():
                take(line)
        return Sample(total, chosen)
    parser = ListParser(filename=source.name)
    try:
        async for chunk in file_chunks(source):
            for row in parser.feed(chunk):
                if isinstance(row, Row):
                    take(row.url)
        for row in parser.close():
            if isinstance(row, Row):
                take(row.url)
    except InputError as exc:
        raise UsageError(f"cannot read {source}: {exc}") from None
    return Sample(total, chosen)


async def _count_online(
    config: AnalyzerSettings, compiled: profiles.CompiledProfile, model: str, images: list[bytes]
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
                image = pricing.image_tokens(
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
        raise UsageError(f"Gemini's countTokens failed ({exc.code} {exc.status}); "
                         "try --offline") from None  # fmt: skip
    finally:
        await client.aio.aclose()
    return counts


def _size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:
        return img.size


def _mime(data: bytes) -> str:
    return "image/png" if data.startswith(b"\x89PNG") else "image/jpeg"


async def estimate(
    env: Mapping[str, str],
    source: Path,
    *,
    profile: str | None,
    model: str | None,
    sample_size: int = 20,
    offline: bool = False,
) -> Report:
    if not await asyncio.to_thread(source.exists):
        raise UsageError(f"{source} does not exist")
    folder = await asyncio.to_thread(source.is_dir)
    config = settings.load(AnalyzerSettings, env)
    fetch_config = settings.load(FetcherSettings, env)
    if folder:
        fetch_config = msgspec.structs.replace(fetch_config, fetch_allow_file=True)
    catalog = config.catalog()
    try:
        compiled, model_name = catalog.choose(profile, model)
    except profiles.ProfileError as exc:
        raise UsageError(str(exc)) from None
    sample = await read_sample(source, sample_size, folder=folder)
    if sample.total == 0:
        raise UsageError(f"{source} lists no image")
    loader = ImageLoader(fetch_config)
    gate = asyncio.Semaphore(8)

    async def load(url: str) -> bytes | None:
        async with gate:
            try:
                return (await loader.load(url, fetch_config.analysis_long_side)).data
            except ItemError:
                return None

    try:
        loaded = await asyncio.gather(*(load(url) for url in sample.urls))
    finally:
        await loader.close()
    images = [data for data in loaded if data is not None]
    if images and config.gemini_api_keys and not offline:
        counts = await _count_online(config, compiled, model_name, images)
        counted_by = "Gemini's countTokens"
    else:
        counts = [profiles.input_tokens(compiled, model_name, *_size(d)) for d in images]
        counted_by = "Google's published token rules"
    # Without keys: what one project at the default quota would take.
    rpm = GeminiProvider.quota_rpm(config) if config.gemini_api_keys else config.gemini_rpm
    result = profiles.estimate_batch(
        catalog,
        compiled,
        model_name,
        images=sample.total,
        requests_per_minute=float(rpm),
        input_tokens_per_image=statistics.fmean(counts) if counts else None,
    )
    return Report(
        estimate=result,
        profile=compiled.name,
        sampled=len(images),
        unusable=len(sample.urls) - len(images),
        counted_by=counted_by if images else "the rules, at the default analysis size",
        keys=len(config.gemini_api_keys),
    )


def _duration(minutes: float) -> str:
    if minutes < 1:
        return f"{minutes * 60:.0f} s"
    if minutes < 90:
        return f"{minutes:.0f} min"
    if minutes < 48 * 60:
        return f"{minutes / 60:.1f} h"
    return f"{minutes / 1440:.1f} days"


def render(report: Report) -> str:
    e = report.estimate
    usd = pricing.format_usd
    lines = [
        f"estimate for {e.images:,} images, profile {report.profile}, model {e.model}",
        f"  sampled {report.sampled} image(s)"
        + (f" ({report.unusable} could not be fetched)" if report.unusable else "")
        + f"; input tokens counted by {report.counted_by}",
        f"  input tokens per image   {e.input_tokens_per_image:,.0f}",
        f"  output tokens per image  {e.output_tokens_per_image:,.0f} expected,"
        f" at most {e.max_output_tokens:,}",
        f"  tokens in total          {e.images * e.input_tokens_per_image:,.0f} input,"
        f" {e.images * e.output_tokens_per_image:,.0f} output",
        f"  cost                     {usd(e.cost_usd)} expected ({usd(e.cost_per_1000_usd)}"
        f" per 1,000 images), at most {usd(e.cost_usd_max)};"
        f" at the Batch API price {usd(e.batch_cost_usd)}",
    ]
    if e.minutes is not None:
        line = (
            f"  duration                 {_duration(e.minutes)} at {e.requests_per_minute:,.0f}"
            " requests/min"
        )
        if report.keys:
            old = e.images / (OLD_SYSTEM_PER_KEY_PER_MINUTE * report.keys)
            line += f" (the old system: {_duration(old)} at 60 images/min per key)"
        lines.append(line)
    else:
        lines.append("  duration                 unbounded quota: as fast as Gemini answers")
    lines.append("  (cache hits and duplicate images cost nothing and are not deducted here)")
    return "\n".join(lines)


def as_json(report: Report) -> dict[str, Any]:
    return {
        "profile": report.profile,
        "sampled": report.sampled,
        "unusable": report.unusable,
        "counted_by": report.counted_by,
        **dataclasses.asdict(report.estimate),
        "cost_per_1000_usd": report.estimate.cost_per_1000_usd,
    }
