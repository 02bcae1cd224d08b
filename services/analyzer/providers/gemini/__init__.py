"""The ``gemini`` provider: Google Gemini over google-genai, standard calls and the Batch API.

``SPEC`` is what the registry (``imagestream.common.providers``) loads; it imports
google-genai only when an analyzer, ``doctor`` or ``estimate`` asks for the real thing.
"""

from __future__ import annotations

from collections.abc import Mapping

from imagestream.common import profiles
from imagestream.common.pricing import PriceError

from ..spec import KeyedSpec
from . import pricing as gemini_pricing


class GeminiSpec(KeyedSpec):
    name = "gemini"
    title = "Google Gemini"
    settings_type = "GeminiSettings"
    provider_type = "GeminiProvider"

    def choose(
        self, profile: str | None, model: str | None, env: Mapping[str, str]
    ) -> tuple[str | None, str | None]:
        # Without loading every Gemini setting: the api checks each new batch here.
        try:
            prices = gemini_pricing.cached_prices(env.get(gemini_pricing.PRICES_SETTING))
        except PriceError as exc:
            raise profiles.ProfileError(str(exc)) from None
        compiled, chosen = profiles.default_catalog(env).choose(profile, model, prices)
        return compiled.name, chosen


SPEC = GeminiSpec()
