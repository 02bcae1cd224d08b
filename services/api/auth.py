"""Who may call what: bearer tokens with roles, checked per route.

Every route declares the role it needs (``viewer`` reads and exports, ``admin`` also
changes things) or ``None`` for the public ones (health, metrics, the dashboard's files,
the OpenAPI document). Tokens travel only in the ``Authorization`` header, never in a
cookie, so a browser never attaches them on its own: cross-site request forgery has
nothing to ride on. Unknown routes answer 404 (and wrong methods 405) before any check.

``AUTH_DISABLED=true`` (explicit, for a trusted local setup) makes every caller an admin.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import asyncpg
from aiohttp import web
from aiohttp.typedefs import Middleware

from imagestream.common import tokens

from .errors import ApiError, Handler, error_response

Need = Literal["viewer", "admin"] | None
ROUTE_ROLES = web.AppKey("route_roles", dict[web.AbstractRoute, Need])
#: Set on every authenticated request: who is calling.
TOKEN = web.RequestKey("token", tokens.TokenInfo)
ANONYMOUS_ADMIN = tokens.TokenInfo(0, "auth disabled", "admin")


@dataclass
class Auth:
    pool: asyncpg.Pool
    disabled: bool
    #: Seconds a verified token is trusted without asking the database again; a token
    #: revoked through this process stops working at once, through another within this.
    ttl_s: float = 10.0
    _cache: dict[str, tuple[float, tokens.TokenInfo]] = field(default_factory=dict)

    async def identify(self, request: web.Request) -> tokens.TokenInfo:
        if self.disabled:
            return ANONYMOUS_ADMIN
        header = request.headers.get("Authorization", "")
        scheme, _, secret = header.partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            raise ApiError(401, "missing bearer token (Authorization: Bearer <token>)")
        now = time.monotonic()
        cached = self._cache.get(secret)
        if cached and now - cached[0] < self.ttl_s:
            return cached[1]
        info = await tokens.verify(self.pool, secret)
        if info is None:
            raise ApiError(401, "invalid or revoked token")
        if len(self._cache) > 1000:
            self._cache.clear()
        self._cache[secret] = (now, info)
        return info

    def forget(self, token_id: int) -> None:
        """Drop a revoked token from the cache of this process."""
        self._cache = {s: v for s, v in self._cache.items() if v[1].id != token_id}


def allowed(info: tokens.TokenInfo, need: Need) -> bool:
    return need != "admin" or info.role == "admin"


def auth_middleware(auth: Auth) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route
        need: Need = request.app[ROUTE_ROLES].get(route)
        if request.match_info.http_exception is None and need is not None:
            try:
                info = await auth.identify(request)
            except ApiError as exc:
                headers = {"WWW-Authenticate": "Bearer"}
                return error_response(exc.status, exc.message, headers=headers)
            if not allowed(info, need):
                raise ApiError(403, "this call needs an admin token")
            request[TOKEN] = info
        return await handler(request)

    return middleware


def register(app: web.Application, routes: Iterable[tuple[web.AbstractRouteDef, Need]]) -> None:
    """Add routes with the role each one needs."""
    roles = app.setdefault(ROUTE_ROLES, {})
    for definition, need in routes:
        for route in definition.register(app.router):
            roles[route] = need
