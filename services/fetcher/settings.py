"""The fetcher's settings (environment variables of the same name, upper-cased)."""

from __future__ import annotations

from imagestream.common import storage
from imagestream.common.guard import parse_cidrs
from imagestream.common.settings import StreamSettings


class FetcherSettings(StreamSettings, kw_only=True, frozen=True):
    #: Downloads in progress at once (connections, bodies in memory).
    fetch_concurrency: int = 64
    #: Entries the fetcher holds at once: downloading, decoding, or waiting for their host
    #: (per-host limit, backoff). Larger than FETCH_CONCURRENCY, so that items of a slow or
    #: cooling-down host wait without a download slot while other hosts keep going.
    fetch_window: int = 256
    #: Concurrent requests to one host (host:port).
    fetch_per_host: int = 8
    fetch_connect_timeout_s: float = 10.0
    #: Longest silence while reading a response (a stalled server).
    fetch_read_timeout_s: float = 20.0
    #: Longest time for one download, redirects included (a server that trickles bytes
    #: just fast enough to beat the read timeout: slow-loris).
    fetch_total_timeout_s: float = 60.0
    #: Largest body, counted after Content-Encoding is undone, enforced while streaming.
    fetch_max_bytes: int = 50 * 1024 * 1024
    fetch_max_redirects: int = 5
    #: Width x height above which an image fails as image_too_large (decompression bombs).
    fetch_max_pixels: int = 50_000_000
    #: Attempts for transient errors (timeouts, resets, 5xx, 429), with backoff.
    fetch_attempts: int = 3
    #: First retry delay (doubled per attempt, with jitter); also the first cooldown of a
    #: host that answers 429/503 without Retry-After.
    fetch_backoff_s: float = 0.5
    #: Longest host cooldown (Retry-After) an item waits out; longer ones fail the item at
    #: once as rate_limited, to be replayed later.
    fetch_max_host_wait_s: float = 60.0
    #: How long resolved (and checked) addresses are reused.
    fetch_dns_cache_s: int = 300
    fetch_user_agent: str = "imagestream/0.1 (image analysis; +https://github.com/imagestream)"
    #: CIDR ranges the fetcher may reach although they are private/loopback (tests, intranets).
    fetch_allowed_cidrs: tuple[str, ...] = ()
    #: Skip images whose server answers X-Robots-Tag: noai / noimageai.
    fetch_respect_noai: bool = True
    #: The user-agent name X-Robots-Tag directives may be scoped to ("imagestream: noai").
    fetch_robots_agent: str = "imagestream"
    #: Buckets (``s3://name``, ``gs://name``) whose images may be fetched with the
    #: service's own storage credentials; none by default (such images fail as
    #: bucket_not_allowed).
    fetch_allowed_buckets: tuple[str, ...] = ()
    #: Read file:// URLs (the local CLI analyzing a folder only).
    fetch_allow_file: bool = False
    #: Long side of the image handed to the analyzer (px), unless the batch says otherwise.
    analysis_long_side: int = 768
    blob_ttl_s: int = 3600
    #: Stop reading while the analyze stream holds this many entries.
    analyze_high_water: int = 256
    #: Decode worker processes (0 = one per core).
    decode_workers: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            parse_cidrs(self.fetch_allowed_cidrs)
        except ValueError as exc:
            raise ValueError(f"FETCH_ALLOWED_CIDRS: {exc}") from None
        try:
            storage.parse_buckets(self.fetch_allowed_buckets)
        except ValueError as exc:
            raise ValueError(f"FETCH_ALLOWED_BUCKETS: {exc}") from None
        if min(self.fetch_attempts, self.fetch_concurrency, self.fetch_per_host) < 1:
            raise ValueError("FETCH_ATTEMPTS, FETCH_CONCURRENCY, FETCH_PER_HOST must be >= 1")
        if self.fetch_window < self.fetch_concurrency:
            raise ValueError("FETCH_WINDOW must be at least FETCH_CONCURRENCY")
        if min(self.fetch_max_bytes, self.fetch_max_pixels, self.analysis_long_side) < 1:
            raise ValueError("FETCH_MAX_BYTES, FETCH_MAX_PIXELS, ANALYSIS_LONG_SIDE must be >= 1")
        if self.fetch_max_redirects < 0 or self.decode_workers < 0:
            raise ValueError("FETCH_MAX_REDIRECTS and DECODE_WORKERS must be >= 0")
        if (
            min(self.fetch_connect_timeout_s, self.fetch_read_timeout_s, self.fetch_total_timeout_s)
            <= 0
        ):
            raise ValueError("FETCH_*_TIMEOUT_S must be > 0")
