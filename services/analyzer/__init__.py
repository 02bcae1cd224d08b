"""analyzer: turns a prepared image into a structured result (local or Gemini)."""
