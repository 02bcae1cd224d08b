"""``imagestream estimate``: what a batch will cost and how long it will take, first.

It reads the whole list (or folder) to count the images, draws a random sample, makes each
sampled image exactly as the fetcher would (download through the same address guard,
downscale to the analysis size) and hands them to the analyzer's provider, which counts
their input tokens its own way (Gemini: countTokens, or Google's published rules) and
prices the batch. Output tokens cannot be counted before the model answers: the profile's
``expected_output_tokens`` stands for them, its cap bounds them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from imagestream.common import pricing, profiles, providers, settings
from imagestream.common.errors import ItemError
from imagestream.common.inputs import InputError, ListParser, Row
from imagestream.common.providers import EstimateRequest
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


async def estimate(
    env: Mapping[str, str],
    source: Path,
    *,
    analyzer: str = "gemini",
    profile: str | None,
    model: str | None,
    sample_size: int = 20,
    offline: bool = False,
) -> Report:
    try:
        spec = providers.get(analyzer)
    except profiles.ProfileError as exc:
        raise UsageError(str(exc)) from None
    if not await asyncio.to_thread(source.exists):
        raise UsageError(f"{source} does not exist")
    folder = await asyncio.to_thread(source.is_dir)
    fetch_config = settings.load(FetcherSettings, env)
    if folder:
        fetch_config = msgspec.structs.replace(fetch_config, fetch_allow_file=True)
    try:  # the profile and model first: a wrong name is said before any download
        spec.choose(profile, model, env)
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
    request = EstimateRequest(profile, model, sample.total, images, offline)
    try:
        made = await spec.estimate(env, request)
    except profiles.ProfileError as exc:
        raise UsageError(str(exc)) from None
    return Report(
        estimate=made.estimate,
        profile=made.profile,
        sampled=len(images),
        unusable=len(sample.urls) - len(images),
        counted_by=made.counted_by,
        keys=made.keys,
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
        lines.append("  duration                 unbounded quota: as fast as the model answers")
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
