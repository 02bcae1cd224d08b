"""The ``anthropic`` provider: Claude through the official ``anthropic`` SDK, standard calls
and Message Batches.

``SPEC`` is what the registry (``imagestream.common.providers``) loads; it imports the SDK
only when an analyzer, ``doctor`` or ``estimate`` asks for the real thing.
"""

from __future__ import annotations

from ..spec import KeyedSpec


class AnthropicSpec(KeyedSpec):
    name = "anthropic"
    title = "Anthropic Claude"
    settings_type = "AnthropicSettings"
    provider_type = "AnthropicProvider"


SPEC = AnthropicSpec()
