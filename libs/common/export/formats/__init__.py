"""One module per export format, each defining ``SINKS`` (see ../sinks.py)."""
