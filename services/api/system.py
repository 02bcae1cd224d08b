"""Health, readiness and system status; the admin's tools: API tokens, the dead stream
(browse, replay, discard), the providers and their keys' state."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import orjson
from aiohttp import web
from redis.exceptions import RedisError

from imagestream.common import (
    control,
    ledger,
    messages,
    observe,
    providers,
    streams,
    tokens,
    webhooks,
)
from imagestream.common.connections import Resources

from . import params
from .auth import TOKEN, Auth
from .errors import ApiError, bad_request, json_response
from .live import Monitor

log = logging.getLogger(__name__)

#: The message inside a dead letter: whatever the stream it came from carried.
_inner_decoder = msgspec.msgpack.Decoder(messages.BatchSubmitted | messages.WorkMessage)
REPLAY_AT_MOST = 10_000


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _iso_from_entry_id(entry_id: str) -> str:
    seconds = int(entry_id.split("-", 1)[0]) / 1000
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _quarantined(key: str, value: str) -> dict[str, Any]:
    """A quarantine entry as the analyzers write it: ``<until, unix time>|<reason>``."""
    until, _, reason = value.partition("|")
    try:
        return {"key": key, "reason": reason or value, "until": float(until)}
    except ValueError:
        return {"key": key, "reason": value, "until": None}


class System:
    def __init__(self, res: Resources, auth: Auth, monitor: Monitor) -> None:
        self.res = res
        self.auth = auth
        self.monitor = monitor

    # ------------------------------------------------------------ health
    async def healthz(self, _: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def readyz(self, _: web.Request) -> web.Response:
        checks = await self.dependency_checks()
        ok = all(c["ok"] for c in checks.values())
        return json_response({"ready": ok, "checks": checks}, status=200 if ok else 503)

    async def dependency_checks(self) -> dict[str, dict[str, Any]]:
        async def timed(probe: Callable[[], Awaitable[Any]]) -> dict[str, Any]:
            started = time.perf_counter()
            try:
                await asyncio.wait_for(probe(), timeout=2.0)
            except Exception as exc:
                return {"ok": False, "error": str(exc) or type(exc).__name__}
            return {"ok": True, "latency_ms": round(1000 * (time.perf_counter() - started), 2)}

        redis_check, pg_check = await asyncio.gather(
            timed(self.res.redis.ping), timed(lambda: self.res.pool.fetchval("SELECT 1"))
        )
        return {"redis": redis_check, "postgres": pg_check}

    async def session(self, request: web.Request) -> web.Response:
        """Who the caller is (the dashboard's login check)."""
        info: tokens.TokenInfo = request[TOKEN]
        return json_response(
            {
                "id": info.id,
                "name": info.name,
                "role": info.role,
                "auth_disabled": self.auth.disabled,
            }
        )

    # ------------------------------------------------------------ system status
    async def status(self, _: web.Request) -> web.Response:
        checks, pipeline, analyzers = await asyncio.gather(
            self.dependency_checks(), self.monitor.snapshot(), self.providers()
        )
        redis: dict[str, Any] = dict(checks["redis"])
        postgres: dict[str, Any] = dict(checks["postgres"])
        if redis["ok"]:
            try:
                info = await self.res.redis.info("server")
                redis["version"] = _text(info.get("redis_version", ""))
                redis["uptime_s"] = int(info.get("uptime_in_seconds", 0))
            except (RedisError, OSError) as exc:
                redis |= {"ok": False, "error": str(exc)}
            redis["used_memory_bytes"] = pipeline.get("redis_memory_bytes")
        ledger_view: dict[str, Any] | None = None
        if postgres["ok"]:
            try:
                postgres["version"] = await self.res.pool.fetchval("SHOW server_version")
                batches, items, cost, ratio, size = await observe.collect_ledger(
                    self.res.pool, self.res.keys.prefix
                )
                postgres["database_bytes"] = size
                ledger_view = {
                    "batches_by_state": batches,
                    "active_items": items,
                    "active_cost_usd": cost,
                    "budget_used_max_ratio": ratio,
                }
            except Exception as exc:
                postgres |= {"ok": False, "error": str(exc) or type(exc).__name__}
        return json_response(
            {
                "redis": redis,
                "postgres": postgres,
                "pipeline": pipeline,
                "ledger": ledger_view,
                "providers": analyzers,
            }
        )

    async def providers(self) -> list[dict[str, Any]]:
        """Every registered provider (the dashboard's analyzer choice), with the state of
        its API keys when it has some."""
        found = []
        for spec in providers.registry().values():
            entry: dict[str, Any] = {
                "name": spec.name,
                "title": spec.title,
                "paid": spec.paid,
                "modes": list(spec.modes),
                "keyed": spec.keyed,
            }
            if spec.keyed:
                entry |= await self.key_states(spec.name)
            found.append(entry)
        return found

    async def key_states(self, provider: str) -> dict[str, Any]:
        """A provider's keys as the analyzers report them (``{p}:{provider}:status``: key
        short hash -> JSON), and the keys they quarantined (``{p}:{provider}:quarantine``)."""
        keys = self.res.keys
        try:
            async with self.res.redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(keys.key_status(provider))
                pipe.hgetall(keys.quarantine(provider))
                reported, quarantined = await pipe.execute()
        except (RedisError, OSError) as exc:
            return {"ok": False, "error": str(exc), "keys": [], "quarantined": []}
        found = []
        for key, value in sorted(reported.items()):
            try:
                status = orjson.loads(value)
            except orjson.JSONDecodeError:
                continue
            if isinstance(status, dict):
                found.append({"key": _text(key), **status})
        return {
            "ok": True,
            "keys": found,
            "quarantined": [
                _quarantined(_text(k), _text(v)) for k, v in sorted(quarantined.items())
            ],
        }

    # ------------------------------------------------------------ tokens
    async def list_tokens(self, _: web.Request) -> web.Response:
        rows = await tokens.list_tokens(self.res.pool)
        return json_response(
            {
                "tokens": [
                    {
                        "id": r["id"],
                        "name": r["name"],
                        "role": r["role"],
                        "created_at": r["created_at"].isoformat(),
                        "last_used_at": r["last_used_at"].isoformat()
                        if r["last_used_at"]
                        else None,
                        "revoked_at": r["revoked_at"].isoformat() if r["revoked_at"] else None,
                        "has_webhook_secret": r["has_webhook_secret"],
                    }
                    for r in rows
                ]
            }
        )

    async def create_token(self, request: web.Request) -> web.Response:
        body = params.only(await params.json_body(request), "name", "role", "webhook_secret")
        name, role = body.get("name"), body.get("role")
        if not isinstance(name, str) or not name.strip() or len(name) > 100:
            raise bad_request("name must be a text of 1 to 100 characters")
        if role not in tokens.ROLES:
            raise bad_request(f"role must be one of {', '.join(tokens.ROLES)}")
        hook_secret = body.get("webhook_secret")
        if "webhook_secret" in body:
            try:
                webhooks.secret_key(hook_secret if isinstance(hook_secret, str) else "")
            except webhooks.WebhookError as exc:
                raise bad_request(f"webhook_secret: {exc}") from None
        token_id, secret = await tokens.create(
            self.res.pool, name.strip(), role, webhook_secret=hook_secret
        )
        log.info("token created", extra={"token_id": token_id, "role": role})
        return json_response(
            {"id": token_id, "name": name.strip(), "role": role, "token": secret}, status=201
        )

    async def revoke_token(self, request: web.Request) -> web.Response:
        try:
            token_id = int(request.match_info["token_id"])
        except ValueError:
            raise ApiError(404, "no such token") from None
        if not 0 < token_id < 2**63 or not await tokens.revoke(self.res.pool, token_id):
            raise ApiError(404, f"no active token {token_id}")
        self.auth.forget(token_id)
        log.info("token revoked", extra={"token_id": token_id})
        return json_response({"id": token_id, "revoked": True})

    # ------------------------------------------------------------ dead stream
    async def dead(self, request: web.Request) -> web.Response:
        limit = params.integer(request.query, "limit", 50, 1, 500)
        after = request.query.get("after") or "-"
        start = f"({after}" if after != "-" else "-"
        try:
            entries = await streams.read_range(self.res.redis, self.res.keys.dead, start, limit)
            total = int(await self.res.redis.xlen(self.res.keys.dead))
        except RedisError as exc:
            if "Invalid stream ID" in str(exc):
                raise bad_request(
                    "after must be a stream entry id such as 1700000000000-0"
                ) from None
            raise
        letters = [self._letter(e) for e in entries]
        return json_response(
            {
                "entries": letters,
                "total": total,
                "limit": limit,
                "next_after": entries[-1].id if len(entries) == limit else None,
            }
        )

    @staticmethod
    def _letter(entry: streams.Entry) -> dict[str, Any]:
        view: dict[str, Any] = {"id": entry.id, "at": _iso_from_entry_id(entry.id)}
        try:
            letter = messages.dead_decoder.decode(entry.payload or b"")
        except (msgspec.DecodeError, msgspec.ValidationError):
            return view | {"stage": None, "reason": "undecodable dead letter", "message": None}
        view |= {
            "stream": letter.stream,
            "stage": letter.stage,
            "deliveries": letter.deliveries,
            "reason": letter.reason,
            "message": None,
        }
        try:
            inner = _inner_decoder.decode(letter.payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return view
        view["message"] = {
            "type": type(inner).__name__,
            "batch_id": inner.batch_id,
            "item_id": getattr(inner, "item_id", None),
            "url": getattr(inner, "url", None),
        }
        return view

    async def replay_dead(self, request: web.Request) -> web.Response:
        """Send dead entries' items through the pipeline again (all, or the given ids).

        An item's entry is replayed through the ledger: its failed item goes back to
        pending, and the dispatcher sends it again like any replayed item. A lost batch
        submission is re-submitted. Entries whose item is no longer failed are dropped
        (already replayed or finished); entries that cannot be replayed are kept.
        """
        body = params.only(await params.json_body(request), "ids", "all")
        ids = params.strings(body, "ids")
        if not ids and body.get("all") is not True:
            raise bad_request('send {"ids": [...]} or {"all": true}')
        entries = await self._dead_entries(ids)
        replayed, dropped, skipped = 0, 0, []
        for entry in entries:
            outcome = await self._replay_one(entry)
            if outcome == "replayed":
                replayed += 1
            elif outcome == "dropped":
                dropped += 1
            else:
                skipped.append({"id": entry.id, "reason": outcome})
            if outcome in ("replayed", "dropped"):
                await streams.delete(self.res.redis, self.res.keys.dead, [entry.id])
        remaining = int(await self.res.redis.xlen(self.res.keys.dead))
        return json_response(
            {
                "replayed": replayed,
                "dropped": dropped,
                "skipped": skipped[:100],
                "remaining": remaining,
            }
        )

    async def discard_dead(self, request: web.Request) -> web.Response:
        body = params.only(await params.json_body(request), "ids")
        ids = params.strings(body, "ids")
        if not ids:
            raise bad_request('send {"ids": [...]}')
        await self._dead_entries(ids)  # 400 on a malformed id
        removed = await streams.delete(self.res.redis, self.res.keys.dead, ids)
        return json_response({"discarded": removed})

    async def _dead_entries(self, ids: list[str]) -> list[streams.Entry]:
        dead = self.res.keys.dead
        try:
            if not ids:
                return await streams.read_range(self.res.redis, dead, "-", REPLAY_AT_MOST)
            found = []
            for entry_id in ids[:REPLAY_AT_MOST]:
                entries = await streams.read_range(self.res.redis, dead, entry_id, 1)
                found += [e for e in entries if e.id == entry_id]
            return found
        except RedisError as exc:
            if "Invalid stream ID" in str(exc):
                raise bad_request("ids must be stream entry ids such as 1700000000000-0") from None
            raise

    async def _replay_one(self, entry: streams.Entry) -> str:
        try:
            letter = messages.dead_decoder.decode(entry.payload or b"")
            inner = _inner_decoder.decode(letter.payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return "undecodable: discard it"
        if isinstance(inner, messages.BatchSubmitted):
            await streams.append(self.res.redis, self.res.keys.batches, [letter.payload])
            return "replayed"
        try:
            batch_id = uuid.UUID(inner.batch_id)
        except ValueError:
            return "bad batch id: discard it"
        try:
            count = await control.replay(self.res.pool, batch_id, item_ids=[inner.item_id])
        except ledger.NotFound:
            return "its batch was deleted: discard it"
        except ledger.Conflict as exc:
            return str(exc)
        return "replayed" if count else "dropped"
