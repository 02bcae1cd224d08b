"""``imagestream doctor``'s Anthropic rows: each key checked with one ``models.list`` call
(no tokens spent)."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

from imagestream.common.providers import CHECK_TIMEOUT_S, Check

from ...keypool import KeySpec
from .. import keyed
from .provider import ERRORS, AnthropicSettings, make_client, settings_from


async def check_key(key: KeySpec, config: AnthropicSettings) -> Check:
    client = make_client(key.secret, base_url=config.anthropic_base_url, timeout_s=CHECK_TIMEOUT_S)

    async def probe() -> str:
        page = await client.models.list(limit=100)
        return f"{len(page.data)} models listed"

    async with client:
        return await keyed.probe_key(f"anthropic key {key.short} ({key.project})", probe(), ERRORS)


async def check_keys(env: Mapping[str, str]) -> list[Check]:
    config = settings_from(env)
    return await keyed.check_keys(config.keyed(), "anthropic", partial(check_key, config=config))
