"""Tools for development, tests and benchmarks: a Gemini-compatible server, image servers."""
