"""The ``gemini`` provider: Google Gemini over google-genai, standard calls and the Batch API."""
