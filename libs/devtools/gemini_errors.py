"""Google's error bodies for the Gemini emulator.

Shapes copied from real Gemini API answers quoted in public bug reports:
429 RESOURCE_EXHAUSTED with google.rpc.QuotaFailure (quotaMetric, quotaId, quotaDimensions,
quotaValue), google.rpc.Help and google.rpc.RetryInfo (retryDelay "26s"), e.g.
https://github.com/RooCodeInc/Roo-Code/issues/3883 and
https://github.com/googleapis/python-genai/issues/1875; 400 INVALID_ARGUMENT "API key not
valid. Please pass a valid API key." with ErrorInfo reason API_KEY_INVALID; 403
PERMISSION_DENIED "Permission denied: Consumer 'api_key:...' has been suspended." with
ErrorInfo reason CONSUMER_SUSPENDED (https://github.com/google/generative-ai-docs/issues/356,
https://github.com/continuedev/continue/issues/10902).

The SDK turns these into ``errors.ClientError`` (4xx) / ``errors.ServerError`` (5xx) whose
``.details`` is the whole JSON body, so ``exc.details["error"]["details"]`` is the list above.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

from .emulator_core import EmulatedError
from .emulator_quota import Violation

SERVICE = "generativelanguage.googleapis.com"
RATE_LIMIT_DOC = "https://ai.google.dev/gemini-api/docs/rate-limits"
TROUBLESHOOTING = "https://developers.generativeai.google/guide/troubleshooting"
# google.rpc.Code numbers, used where Google nests a Status inside a resource (batch lines).
_GRPC_CODES = {
    "INVALID_ARGUMENT": 3,
    "DEADLINE_EXCEEDED": 4,
    "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
}


class ApiError(EmulatedError):
    """An error answered with Google's JSON error body."""

    def __init__(
        self,
        code: int,
        status: str,
        message: str,
        details: list[dict[str, Any]] | None = None,
        *,
        outcome: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.message = message
        self.details = details or []
        self.outcome = outcome or status.lower()

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message, "status": self.status}
        if self.details:
            error["details"] = self.details
        return {"error": error}

    def as_status(self) -> dict[str, Any]:
        """The google.rpc.Status form, as nested in batch results."""
        status: dict[str, Any] = {
            "code": _GRPC_CODES.get(self.status, 2),
            "message": self.message,
        }
        if self.details:
            status["details"] = self.details
        return status


def _project_number(project: str) -> int:
    return 100_000_000_000 + int.from_bytes(hashlib.sha256(project.encode()).digest()[:5], "big")


def missing_key_error() -> ApiError:
    message = (
        "Method doesn't allow unregistered callers (callers without established identity)."
        " Please use API Key or other form of API consumer identity to call this API."
    )
    return ApiError(403, "PERMISSION_DENIED", message, outcome="no_key")


def invalid_key_error() -> ApiError:
    message = "API key not valid. Please pass a valid API key."
    details: list[dict[str, Any]] = [
        {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "API_KEY_INVALID",
            "domain": "googleapis.com",
            "metadata": {"service": SERVICE},
        },
        {
            "@type": "type.googleapis.com/google.rpc.LocalizedMessage",
            "locale": "en-US",
            "message": message,
        },
    ]
    return ApiError(400, "INVALID_ARGUMENT", message, details, outcome="invalid_key")


def suspended_key_error(key: str, project: str) -> ApiError:
    message = f"Permission denied: Consumer 'api_key:{key}' has been suspended."
    details: list[dict[str, Any]] = [
        {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "CONSUMER_SUSPENDED",
            "domain": "googleapis.com",
            "metadata": {
                "consumer": f"projects/{_project_number(project)}",
                "service": SERVICE,
                "containerInfo": f"api_key:{key}",
            },
        },
        {
            "@type": "type.googleapis.com/google.rpc.LocalizedMessage",
            "locale": "en-US",
            "message": message,
        },
    ]
    return ApiError(403, "PERMISSION_DENIED", message, details, outcome="revoked_key")


def bad_request(message: str) -> ApiError:
    return ApiError(400, "INVALID_ARGUMENT", message, outcome="bad_request")


def not_found(message: str = "Requested entity was not found.") -> ApiError:
    return ApiError(404, "NOT_FOUND", message, outcome="not_found")


def server_error(outcome: str) -> ApiError:
    if outcome == "503":
        return ApiError(
            503, "UNAVAILABLE", "The model is overloaded. Please try again later.", outcome="503"
        )
    if outcome == "504":
        return ApiError(
            504, "DEADLINE_EXCEEDED", "The request timed out. Please try again.", outcome="504"
        )
    return ApiError(
        500,
        "INTERNAL",
        f"An internal error has occurred. Please retry or report in {TROUBLESHOOTING}",
        outcome="500",
    )


_QUOTA_IDS = {
    "rpm": (
        "generativelanguage.googleapis.com/generate_content_free_tier_requests",
        "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
    ),
    "tpm": (
        "generativelanguage.googleapis.com/generate_content_free_tier_input_token_count",
        "GenerateContentInputTokensPerModelPerMinute-FreeTier",
    ),
    "rpd": (
        "generativelanguage.googleapis.com/generate_content_free_tier_requests",
        "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
    ),
}


def format_retry_delay(seconds: float, fmt: str) -> str:
    """google.protobuf.Duration JSON, never shorter than the true wait."""
    if fmt == "exact":
        return f"{math.ceil(seconds * 1000) / 1000:.3f}s"
    return f"{max(1, math.ceil(seconds))}s"


def quota_error(
    violations: list[Violation], model: str, retry_after: float, retry_fmt: str
) -> ApiError:
    """429 RESOURCE_EXHAUSTED shaped like the Gemini API's (QuotaFailure, Help, RetryInfo)."""
    lines = []
    quota_violations = []
    for v in violations:
        metric, quota_id = _QUOTA_IDS[v.metric]
        lines.append(f"* Quota exceeded for metric: {metric}, limit: {v.limit}, model: {model}")
        quota_violations.append(
            {
                "quotaMetric": metric,
                "quotaId": quota_id,
                "quotaDimensions": {"location": "global", "model": model},
                "quotaValue": str(v.limit),
            }
        )
    message = (
        "You exceeded your current quota, please check your plan and billing details. For more"
        f" information on this error, head to: {RATE_LIMIT_DOC}. To monitor your current"
        " usage, head to: https://ai.dev/usage?tab=rate-limit. \n"
        + "\n".join(lines)
        + f"\nPlease retry in {retry_after:.9f}s."
    )
    details: list[dict[str, Any]] = [
        {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": quota_violations},
        {
            "@type": "type.googleapis.com/google.rpc.Help",
            "links": [{"description": "Learn more about Gemini API quotas", "url": RATE_LIMIT_DOC}],
        },
        {
            "@type": "type.googleapis.com/google.rpc.RetryInfo",
            "retryDelay": format_retry_delay(retry_after, retry_fmt),
        },
    ]
    return ApiError(429, "RESOURCE_EXHAUSTED", message, details, outcome="429")
