"""An analyzer with one keyed model provider (openai, anthropic) against that provider's
emulator on 127.0.0.1, reached through the provider's real SDK: the harness their tests
share."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from imagestream.analyzer.providers.keyed import KeyedProvider
from imagestream.analyzer.service import Analyzer, create_providers, load_settings
from imagestream.common import messages, pricing
from imagestream.common.connections import Resources
from imagestream.devtools.emulator_core import EmulatorCore

from .test_gemini_analyzer import Item, analyze_items, jpeg, make_items

#: ``async with running(config) as (emulator, base_url)``: an emulator's runner.
Running = Callable[[Any], contextlib.AbstractAsyncContextManager[tuple[Any, str]]]


@dataclass
class KeyedRig:
    name: str
    #: The emulator's request-log method of one analysis call.
    call_method: str
    emulator: EmulatorCore[Any]
    env: dict[str, str]
    res: Resources
    analyzer: Analyzer
    salt: int = field(default_factory=lambda: int(uuid.uuid4()) % 2**32)

    async def batch(self, count: int, **fields: object) -> list[Item]:
        images = [jpeg(i, self.salt) for i in range(count)]
        return await make_items(self.res, images, {"analyzer": self.name, **fields}, self.env)

    async def run(self, items: list[Item]) -> list[messages.ItemResult]:
        return await analyze_items(self.analyzer, items)

    async def one_by_one(self, items: list[Item]) -> list[messages.ItemResult]:
        return [r for item in items for r in await self.run([item])]

    def calls(self) -> list[dict[str, Any]]:
        return [e for e in self.emulator.request_log() if e["method"] == self.call_method]

    def methods(self) -> list[str]:
        return [str(e["method"]) for e in self.emulator.request_log()]

    @property
    def provider(self) -> KeyedProvider[Any, Any, Any]:
        found = self.analyzer.providers[self.name]
        assert isinstance(found, KeyedProvider)
        return found


@contextlib.asynccontextmanager
async def keyed_rig(
    res: Resources,
    name: str,
    call_method: str,
    running: Running,
    config: Any,
    env: Callable[[str], dict[str, str]],
) -> AsyncIterator[KeyedRig]:
    """``env(url)``: the analyzer's settings for the emulator at ``url``."""
    async with running(config) as (emulator, url):
        values = {"REDIS_PREFIX": res.keys.prefix, **env(url)}
        settings = load_settings(values)
        made = create_providers(res, settings)
        try:
            yield KeyedRig(name, call_method, emulator, values, res, Analyzer(res, settings, made))
        finally:
            for provider in made.values():
                await provider.close()


def assert_billed(
    results: list[messages.ItemResult], price: pricing.Price, mode: pricing.Mode = "standard"
) -> None:
    """Every result carries tokens, and costs them at the price (half in batch mode)."""
    for result in results:
        usage = result.usage
        assert usage is not None and usage.input_tokens > 0 and usage.output_tokens > 0
        expected = pricing.cost_usd(
            price,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens + usage.thought_tokens,
            cached_tokens=usage.cached_tokens,
            mode=mode,
        )
        assert usage.cost_usd == pytest.approx(expected) and usage.cost_usd > 0
