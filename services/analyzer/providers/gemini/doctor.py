"""``imagestream doctor``'s Gemini rows: each key checked with one ``models.get`` call
(no tokens, no quota spent)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from functools import partial

from imagestream.common import settings
from imagestream.common.providers import CHECK_TIMEOUT_S, Check, failure_reason

from ...keypool import KeySpec
from .. import keyed
from .keys import make_client
from .provider import GeminiSettings


class DoctorSettings(GeminiSettings, kw_only=True, frozen=True):
    """The analyzer's Gemini settings, plus the model the key check reads."""

    #: Default: the model of the default analysis profile.
    gemini_model: str | None = None


async def check_key(key: KeySpec, config: DoctorSettings, model: str) -> Check:
    name = f"gemini key {key.short} ({key.project})"
    client = make_client(
        key.secret,
        base_url=config.gemini_base_url,
        api_version=config.gemini_api_version,
        timeout_s=CHECK_TIMEOUT_S,
    )
    try:
        started = time.perf_counter()
        found = await client.aio.models.get(model=model)
        rtt_ms = 1000 * (time.perf_counter() - started)
        return Check(name, "ok", f"{found.name or model} answered in {rtt_ms:.0f} ms")
    except Exception as exc:
        code = getattr(exc, "code", None)
        hint = {
            400: "the key or the request was refused",
            401: "the key is not valid",
            403: "the key is not allowed (revoked, or the API is not enabled for its project)",
            404: f"no model {model!r} (set GEMINI_MODEL)",
            429: "the key is out of quota now",
        }.get(code if isinstance(code, int) else 0)
        reason = failure_reason(exc)
        return Check(name, "fail", f"{hint}: {reason}" if hint else reason)
    finally:
        await client.aio.aclose()


async def check_keys(env: Mapping[str, str]) -> list[Check]:
    config = settings.load(DoctorSettings, env)
    model = config.gemini_model or config.default_model
    return await keyed.check_keys(
        config.keyed(), "gemini", partial(check_key, config=config, model=model)
    )
