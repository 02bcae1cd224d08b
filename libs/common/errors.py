"""The error taxonomy: every failed item carries one of these classes.

``transient`` errors are retried (with backoff, honouring Retry-After) before the item
fails with that class; ``permanent`` errors fail the item at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class ErrorClass(StrEnum):
    # Input
    INVALID_URL = "invalid_url"
    # Fetch: transport
    TIMEOUT = "timeout"
    CONNECTION_ERROR = "connection_error"
    TOO_MANY_REDIRECTS = "too_many_redirects"
    BLOCKED_ADDRESS = "blocked_address"
    #: An s3:// or gs:// image in a bucket that FETCH_ALLOWED_BUCKETS does not name.
    BUCKET_NOT_ALLOWED = "bucket_not_allowed"
    # Fetch: HTTP status
    NOT_FOUND = "not_found"
    HTTP_CLIENT_ERROR = "http_client_error"
    HTTP_SERVER_ERROR = "http_server_error"
    RATE_LIMITED = "rate_limited"
    # Fetch: content
    TOO_LARGE = "too_large"
    IMAGE_TOO_LARGE = "image_too_large"
    NOT_AN_IMAGE = "not_an_image"
    UNSUPPORTED_FORMAT = "unsupported_format"
    DECODE_ERROR = "decode_error"
    OPTED_OUT = "opted_out"
    # Analysis
    ANALYZER_ERROR = "analyzer_error"
    ANALYZER_INVALID_OUTPUT = "analyzer_invalid_output"
    # Pipeline
    POISON = "poison"
    CANCELLED = "cancelled"
    INTERNAL_ERROR = "internal_error"


TRANSIENT: frozenset[ErrorClass] = frozenset(
    {
        ErrorClass.TIMEOUT,
        ErrorClass.CONNECTION_ERROR,
        ErrorClass.HTTP_SERVER_ERROR,
        ErrorClass.RATE_LIMITED,
        ErrorClass.ANALYZER_ERROR,
    }
)


@dataclass(slots=True)
class ItemError(Exception):
    """A failure that belongs to the item (bad URL, not an image, 404...), not to the worker."""

    error_class: ErrorClass
    message: str
    retry_after_s: float | None = None

    def __str__(self) -> str:
        return f"{self.error_class}: {self.message}"

    @property
    def transient(self) -> bool:
        return self.error_class in TRANSIENT
