"""Gemini's client of one API key (the keys are pooled by ``keypool``)."""

from __future__ import annotations

from google import genai
from google.genai import types


def make_client(
    secret: str, *, base_url: str | None, api_version: str, timeout_s: float
) -> genai.Client:
    return genai.Client(
        api_key=secret,
        http_options=types.HttpOptions(
            base_url=base_url,
            api_version=api_version,
            timeout=int(timeout_s * 1000),
            # The SDK's retries would ignore the server's retry delay and our quota: off.
            retry_options=types.HttpRetryOptions(attempts=1),
        ),
    )
