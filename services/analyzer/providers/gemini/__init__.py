"""The ``gemini`` provider: Google Gemini over google-genai, standard calls and the Batch API.

``SPEC`` is what the registry (``imagestream.common.providers``) loads; it imports
google-genai only when an analyzer, ``doctor`` or ``estimate`` asks for the real thing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from imagestream.common import profiles, settings
from imagestream.common.pricing import PriceError
from imagestream.common.providers import Check, EstimateRequest, ProviderEstimate

from . import pricing as gemini_pricing


class GeminiSpec:
    name = "gemini"
    title = "Google Gemini"
    paid = True
    modes = ("standard", "batch")
    keyed = True

    def choose(
        self, profile: str | None, model: str | None, env: Mapping[str, str]
    ) -> tuple[str | None, str | None]:
        try:
            prices = gemini_pricing.cached_prices(env.get(gemini_pricing.PRICES_SETTING))
        except PriceError as exc:
            raise profiles.ProfileError(str(exc)) from None
        compiled, chosen = profiles.default_catalog(env).choose(profile, model, prices)
        return compiled.name, chosen

    def missing(self, env: Mapping[str, str]) -> str | None:
        return None if env.get("GEMINI_API_KEYS", "").strip() else "set GEMINI_API_KEYS"

    def load_settings(self, env: Mapping[str, str]) -> Any:
        from .provider import GeminiSettings

        return settings.load(GeminiSettings, env)

    def concurrency(self, config: Any) -> int:
        from .provider import GeminiProvider

        return GeminiProvider.wanted_concurrency(config)

    def create(self, res: Any, config: Any) -> Any:
        from .batch import batch_jobs
        from .provider import GeminiProvider

        if not config.gemini_api_keys:
            return None
        provider = GeminiProvider(res, config)
        provider.jobs = batch_jobs(provider)
        return provider

    async def doctor(self, env: Mapping[str, str]) -> list[Check]:
        from .doctor import check_keys

        return await check_keys(env)

    async def estimate(self, env: Mapping[str, str], request: EstimateRequest) -> ProviderEstimate:
        from .estimate import estimate

        return await estimate(env, request)


SPEC = GeminiSpec()
