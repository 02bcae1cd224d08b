"""The ``local`` provider: offline, keyless, deterministic facts about an image."""
