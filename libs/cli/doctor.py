"""``imagestream doctor``: is this machine ready to run imagestream? (the old ``--health-check``)

Checks Redis, PostgreSQL, the schema migrations, each provider's keys (the provider's own
check, e.g. one Gemini ``models.get`` call: no tokens, no quota spent) and the free disk of
the temporary and state folders, then prints one row per check. The exit status is 0 only
when every required check passed; a check that cannot run (no key configured, PostgreSQL
down for the migrations check) says why and does not count. No check raises: every failure is a row.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import asyncpg
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from imagestream.common import db, providers, settings
from imagestream.common.connections import redact
from imagestream.common.providers import CHECK_TIMEOUT_S as TIMEOUT_S
from imagestream.common.providers import Check, CheckStatus, failure_reason, guarded

#: Oldest servers the pipeline runs on: XAUTOCLAIM (Redis 6.2), gen_random_uuid() (PostgreSQL 13).
MIN_REDIS = (6, 2)
MIN_POSTGRES = 130000
#: Below either, a disk check fails; below twice either, it warns.
MIN_FREE_BYTES = 1 << 30
MIN_FREE_SHARE = 0.05


# ---------------------------------------------------------------- checks
async def check_redis(url: str | None) -> Check:
    if not url:
        return Check(
            "redis", "warn", "REDIS_URL not set: only analyze/up/demo run (on an embedded Redis)"
        )
    client = Redis.from_url(
        url,
        socket_connect_timeout=3,
        socket_timeout=TIMEOUT_S,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        started = time.perf_counter()
        await client.ping()
        rtt_ms = 1000 * (time.perf_counter() - started)
        info = await client.info("server")
        version = str(info.get("redis_version", "0"))
        notes = [f"Redis {version}", f"{rtt_ms:.1f} ms"]
        status: CheckStatus = "ok"
        if tuple(int(p) for p in version.split(".")[:2]) < MIN_REDIS:
            return Check("redis", "fail", f"Redis {version}: 6.2 or newer is needed (XAUTOCLAIM)")
        try:
            policy = (await client.config_get("maxmemory-policy")).get("maxmemory-policy")
        except Exception:
            policy = None  # CONFIG is often disabled on managed Redis
        if policy is not None:
            notes.append(f"maxmemory-policy {policy}")
            if policy != "noeviction":
                status = "warn"
                notes.append("(use noeviction: evicted stream entries are re-driven late)")
        return Check("redis", status, f"{redact(url)}: " + ", ".join(notes))
    except Exception as exc:
        return Check("redis", "fail", f"cannot reach {redact(url)}: {failure_reason(exc)}")
    finally:
        await client.aclose()


async def check_postgres(dsn: str | None) -> tuple[Check, Check]:
    """The server check and the migrations check (which needs the server)."""
    if not dsn:
        note = "DATABASE_URL not set: only analyze/up/demo run (on an embedded PostgreSQL)"
        return (
            Check("postgresql", "warn", note),
            Check("migrations", "skip", "no DATABASE_URL", required=False),
        )
    try:
        started = time.perf_counter()
        conn = await asyncpg.connect(dsn, timeout=5, command_timeout=TIMEOUT_S)
    except Exception as exc:
        return (
            Check("postgresql", "fail", f"cannot reach {redact(dsn)}: {failure_reason(exc)}"),
            Check("migrations", "skip", "needs PostgreSQL", required=False),
        )
    try:
        rtt_ms = 1000 * (time.perf_counter() - started)
        version_num = int(await conn.fetchval("SHOW server_version_num"))
        version = str(await conn.fetchval("SHOW server_version")).split()[0]
        if version_num < MIN_POSTGRES:
            server = Check("postgresql", "fail", f"PostgreSQL {version}: 13 or newer is needed")
        else:
            detail = f"{redact(dsn)}: PostgreSQL {version}, connected in {rtt_ms:.0f} ms"
            server = Check("postgresql", "ok", detail)
        pending = await db.pending_migrations(conn)
        applied = len(db.migrations()) - len(pending)
        if pending:
            migrations = Check(
                "migrations",
                "fail",
                f"{len(pending)} pending ({', '.join(pending)}): run `imagestream db migrate`"
                " (services apply them at start unless AUTO_MIGRATE=false)",
            )
        else:
            migrations = Check("migrations", "ok", f"{applied} applied, none pending")
        return server, migrations
    finally:
        await conn.close()


def check_disk(label: str, path: Path) -> Check:
    # The nearest folder that exists: the doctor creates nothing.
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    share = usage.free / usage.total if usage.total else 0.0
    detail = f"{path}: {usage.free / (1 << 30):.1f} GiB free ({share:.0%})"
    if usage.free < MIN_FREE_BYTES or share < MIN_FREE_SHARE:
        return Check(f"disk ({label})", "fail", detail)
    if usage.free < 2 * MIN_FREE_BYTES or share < 2 * MIN_FREE_SHARE:
        return Check(f"disk ({label})", "warn", detail)
    return Check(f"disk ({label})", "ok", detail)


def state_path(env: Mapping[str, str]) -> Path:
    """Where the embedded servers keep their data (as embedded.state_dir, without creating it)."""
    if env.get("IMAGESTREAM_HOME"):
        return Path(env["IMAGESTREAM_HOME"])
    xdg = env.get("XDG_STATE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "imagestream"


async def run_checks(config: settings.CommonSettings, env: Mapping[str, str]) -> list[Check]:
    async def postgres_pair() -> tuple[Check, Check]:
        try:
            return await asyncio.wait_for(check_postgres(config.database_url), TIMEOUT_S + 5)
        except Exception as exc:
            failed = Check("postgresql", "fail", failure_reason(exc))
            return failed, Check("migrations", "skip", "needs PostgreSQL", required=False)

    async def provider_rows(spec: providers.ProviderSpec) -> list[Check]:
        try:
            return await spec.doctor(env)
        except Exception as exc:  # a bad setting of that provider: its row says which
            return [Check(spec.name, "fail", failure_reason(exc))]

    redis_check, (pg_check, migrations_check), provider_checks = await asyncio.gather(
        guarded("redis", lambda: check_redis(config.redis_url)),
        postgres_pair(),
        asyncio.gather(*[provider_rows(spec) for spec in providers.registry().values()]),
    )
    checks = [redis_check, pg_check, migrations_check]
    for rows in provider_checks:
        checks += rows
    checks.append(check_disk("temp", Path(tempfile.gettempdir())))
    checks.append(check_disk("state", state_path(env)))
    return checks


# ---------------------------------------------------------------- output
_COLOURS = {"ok": "32", "warn": "33", "fail": "31", "skip": "90"}


def render(checks: list[Check], colour: bool) -> str:
    width = max(len("CHECK"), *(len(c.name) for c in checks))
    lines = [f"{'CHECK':<{width}}  STATUS  DETAIL"]
    for check in checks:
        status = f"{check.status.upper():<6}"
        if colour:
            status = f"\033[{_COLOURS[check.status]}m{status}\033[0m"
        lines.append(f"{check.name:<{width}}  {status}  {check.detail}")
    failed = [c.name for c in checks if c.status == "fail" and c.required]
    lines.append("")
    lines.append(f"not ready: {', '.join(failed)} failed" if failed else "ready")
    return "\n".join(lines)


def exit_code(checks: list[Check]) -> int:
    return 1 if any(c.status == "fail" and c.required for c in checks) else 0


def doctor(env: dict[str, str]) -> int:
    config = settings.load(settings.CommonSettings, env)
    checks = asyncio.run(run_checks(config, env))
    colour = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    print(render(checks, colour))
    return exit_code(checks)
