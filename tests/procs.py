"""Service processes for tests: the devtools helpers with settings that make recovery fast."""

from __future__ import annotations

from imagestream.devtools import processes
from imagestream.devtools.processes import Fleet, RedisServer, Service, free_port

__all__ = ["Fleet", "RedisServer", "Service", "free_port", "service_env"]

#: Short blocking reads, claim times and retry delays: tests see recovery in seconds.
TEST_SETTINGS = {
    "LOG_FORMAT": "json",
    "LOG_LEVEL": "INFO",
    "METRICS_PORT": "0",
    "READ_BLOCK_MS": "300",
    "CLAIM_IDLE_MS": "5000",
    "CLAIM_INTERVAL_S": "1",
    "DISPATCH_INTERVAL_S": "0.05",
    "RECONCILE_INTERVAL_S": "0.5",
    "FETCH_ATTEMPTS": "2",
    "FETCH_BACKOFF_S": "0.05",
    "SHUTDOWN_GRACE_S": "5",
    # The content profile's model workers (seconds of start, ~250 MB each) only where a
    # test asks for them.
    "LOCAL_MODELS": "false",
}


def service_env(redis_url: str, database_url: str, prefix: str, **extra: str) -> dict[str, str]:
    return processes.service_env(redis_url, database_url, prefix, **{**TEST_SETTINGS, **extra})
