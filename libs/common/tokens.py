"""API tokens: random secrets shown once, stored as SHA-256 hashes, with a role.

``admin`` may change things (create, pause, resume, cancel, replay, delete, tokens);
``viewer`` may read and export.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Literal

import asyncpg

Role = Literal["admin", "viewer"]
ROLES: tuple[Role, ...] = ("admin", "viewer")
PREFIX = "ist_"


@dataclass(frozen=True, slots=True)
class TokenInfo:
    id: int
    name: str
    role: Role


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


async def create(
    conn: asyncpg.Connection | asyncpg.Pool,
    name: str,
    role: Role,
    *,
    webhook_secret: str | None = None,
) -> tuple[int, str]:
    """A new token; the secret is returned here and never again. ``webhook_secret`` (a
    ``whsec_`` secret) signs the webhooks of the batches created with it."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    secret = PREFIX + secrets.token_urlsafe(32)
    token_id: int = await conn.fetchval(
        "INSERT INTO api_tokens (name, role, token_hash, webhook_secret) VALUES ($1, $2, $3, $4)"
        " RETURNING id",
        name,
        role,
        digest(secret),
        webhook_secret,
    )
    return token_id, secret


async def webhook_secret(conn: asyncpg.Connection | asyncpg.Pool, token_id: int) -> str | None:
    secret: str | None = await conn.fetchval(
        "SELECT webhook_secret FROM api_tokens WHERE id = $1", token_id
    )
    return secret


async def verify(pool: asyncpg.Pool, token: str) -> TokenInfo | None:
    row = await pool.fetchrow(
        """
        UPDATE api_tokens SET last_used_at = now()
        WHERE token_hash = $1 AND revoked_at IS NULL
        RETURNING id, name, role
        """,
        digest(token),
    )
    return TokenInfo(row["id"], row["name"], row["role"]) if row else None


async def revoke(conn: asyncpg.Connection | asyncpg.Pool, token_id: int) -> bool:
    status = await conn.execute(
        "UPDATE api_tokens SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL", token_id
    )
    return str(status).endswith(" 1")


async def list_tokens(conn: asyncpg.Connection | asyncpg.Pool) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            "SELECT id, name, role, created_at, last_used_at, revoked_at,"
            " webhook_secret IS NOT NULL AS has_webhook_secret FROM api_tokens ORDER BY id"
        )
    )
