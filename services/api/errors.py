"""Errors and JSON responses: every error is ``{"error": {"code", "message"}}``.

``errors_middleware`` turns what handlers raise (ApiError, the ledger's NotFound and
Conflict, aiohttp's HTTP exceptions such as an unknown route's 404 or a wrong method's 405)
into that shape; anything else is logged and answered 500 without details.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from imagestream.common import ledger

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: The ``code`` of each status we answer with.
CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    500: "internal_error",
    503: "unavailable",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or CODES.get(status, "error")
        self.message = message


def bad_request(message: str) -> ApiError:
    return ApiError(400, message)


def json_response(
    value: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(value, default=str),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def error_response(
    status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    body = {"error": {"code": code or CODES.get(status, "error"), "message": message}}
    return json_response(body, status=status, headers=headers)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.message, exc.code)
    except ledger.NotFound as exc:
        return error_response(404, str(exc))
    except ledger.Conflict as exc:
        return error_response(409, str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        message = {
            404: f"no such route: {request.method} {request.path}",
            405: f"{request.method} is not allowed here",
        }.get(exc.status, exc.reason or "error")
        return error_response(exc.status, message, headers=headers)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error", extra={"path": request.path})
        return error_response(500, "internal error; see the api's log")
