"""``imagestream doctor``'s OpenAI rows: each key checked with one ``models.retrieve`` call
(no tokens spent)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from functools import partial

import openai

from imagestream.common.providers import CHECK_TIMEOUT_S, Check, failure_reason

from ...keypool import KeySpec
from .. import keyed
from .provider import OpenAISettings, make_client, settings_from


async def check_key(key: KeySpec, config: OpenAISettings) -> Check:
    name = f"openai key {key.short} ({key.project})"
    model = config.openai_model
    client = make_client(key.secret, base_url=config.openai_base_url, timeout_s=CHECK_TIMEOUT_S)
    try:
        started = time.perf_counter()
        found = await client.models.retrieve(model)
        rtt_ms = 1000 * (time.perf_counter() - started)
        return Check(name, "ok", f"{found.id or model} answered in {rtt_ms:.0f} ms")
    except openai.APIStatusError as exc:
        hint = {
            401: "the key is not valid",
            403: "the key is not allowed",
            404: f"no model {model!r} on this server (set OPENAI_MODEL)",
            429: "the key is out of quota now",
        }.get(exc.status_code)
        reason = failure_reason(exc)
        return Check(name, "fail", f"{hint}: {reason}" if hint else reason)
    finally:
        await client.close()


async def check_keys(env: Mapping[str, str]) -> list[Check]:
    config = settings_from(env)
    return await keyed.check_keys(config.keyed(), "openai", partial(check_key, config=config))
