"""``imagestream doctor``'s OpenAI rows: each key checked with one ``models.retrieve`` call
(no tokens spent)."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

from imagestream.common.providers import CHECK_TIMEOUT_S, Check

from ...keypool import KeySpec
from .. import keyed
from .provider import ERRORS, OpenAISettings, make_client, settings_from


async def check_key(key: KeySpec, config: OpenAISettings) -> Check:
    model = config.openai_model
    client = make_client(key.secret, base_url=config.openai_base_url, timeout_s=CHECK_TIMEOUT_S)

    async def probe() -> str:
        found = await client.models.retrieve(model)
        return f"{found.id or model} answered"

    async with client:
        return await keyed.probe_key(
            f"openai key {key.short} ({key.project})",
            probe(),
            ERRORS,
            {404: f"no model {model!r} on this server (set OPENAI_MODEL)"},
        )


async def check_keys(env: Mapping[str, str]) -> list[Check]:
    config = settings_from(env)
    return await keyed.check_keys(config.keyed(), "openai", partial(check_key, config=config))
