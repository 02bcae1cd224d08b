"""The api's settings (environment variables, see settings.py in common)."""

from __future__ import annotations

import msgspec

from imagestream.common import providers, storage
from imagestream.common.settings import CommonSettings


class ApiSettings(CommonSettings, kw_only=True, frozen=True):
    api_host: str = "0.0.0.0"  # noqa: S104 - a service listens on all interfaces
    api_port: int = 5001
    #: Largest accepted upload (bytes); uploads stream, so this can be large.
    max_upload_bytes: int = 2 * 1024**3
    #: Turn token checks off (only for a trusted, local setup): every caller is an admin.
    auth_disabled: bool = False
    #: Analyzer of batches that do not name one.
    analyzer: str = "local"
    #: How often live progress (server-sent events) is refreshed (seconds).
    live_interval_s: float = 1.0
    #: Export jobs this process runs at once (more wait, queued, in the ledger).
    export_jobs: int = 2
    #: A running export job whose process has not reported for this long (seconds) is
    #: taken over by another api process and started again.
    export_job_stale_s: float = 60.0
    #: The folder export jobs may write files to (unset: no file destinations).
    export_dir: str | None = None
    #: Buckets export jobs may write to (s3://name, gs://name; none by default).
    export_allowed_buckets: list[str] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.analyzer not in providers.names():
            raise ValueError(f"ANALYZER must be one of {', '.join(providers.names())}")
        if self.max_upload_bytes < 1:
            raise ValueError("MAX_UPLOAD_BYTES must be at least 1")
        if not 0.05 <= self.live_interval_s <= 60:
            raise ValueError("LIVE_INTERVAL_S must be between 0.05 and 60")
        if not 1 <= self.export_jobs <= 64:
            raise ValueError("EXPORT_JOBS must be between 1 and 64")
        if self.export_job_stale_s < 1:
            raise ValueError("EXPORT_JOB_STALE_S must be at least 1")
        try:
            storage.parse_buckets(self.export_allowed_buckets)
        except ValueError as exc:
            raise ValueError(f"EXPORT_ALLOWED_BUCKETS: {exc}") from None
