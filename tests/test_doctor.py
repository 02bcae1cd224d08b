"""``imagestream doctor`` against the real Redis and PostgreSQL and the Gemini emulator:
all green when everything answers; a red row, a non-zero exit and no traceback when
Redis is down, the database URL is wrong, a key is refused or migrations are pending."""

from __future__ import annotations

import asyncio
import re
import secrets
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from imagestream.analyzer.keypool import short_hash
from imagestream.analyzer.providers.local.content import model_files
from imagestream.cli import doctor
from imagestream.common import providers
from imagestream.devtools.gemini_server import EmulatorConfig, running_emulator

from .procs import free_port, service_env

GOOD_KEY = "doctor-good-key"
BAD_KEY = "doctor-bad-key"
ROW = re.compile(r"^(\S.*?)\s{2,}(OK|WARN|FAIL|SKIP)\s{2,}(.*)$")


@dataclass
class Result:
    code: int
    rows: dict[str, tuple[str, str]]  # check -> (status, detail)
    output: str


@pytest.fixture(scope="module")
async def gemini_url() -> AsyncIterator[str]:
    config = EmulatorConfig(invalid_keys={BAD_KEY}, key_projects={GOOD_KEY: "project-doctor"})
    async with running_emulator(config) as (_, url):
        yield url


async def run_doctor(env: dict[str, str]) -> Result:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "imagestream.cli",
        "doctor",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=90)
    output = out.decode() + err.decode()
    rows = {}
    for line in out.decode().splitlines():
        match = ROW.match(line)
        if match:
            rows[match.group(1)] = (match.group(2), match.group(3))
    assert proc.returncode is not None
    return Result(proc.returncode, rows, output)


def doctor_env(redis_url: str, database_url: str, home: Path, **extra: str) -> dict[str, str]:
    env = service_env(redis_url, database_url, "doctor", IMAGESTREAM_HOME=str(home), **extra)
    env.pop("GEMINI_API_KEYS", None)
    env.update(extra)
    return env


def statuses(result: Result) -> dict[str, str]:
    return {name: status for name, (status, _) in result.rows.items()}


async def test_all_green(
    redis_url: str, database_url: str, gemini_url: str, tmp_path: Path
) -> None:
    env = doctor_env(
        redis_url, database_url, tmp_path, GEMINI_API_KEYS=f"{GOOD_KEY}@project-doctor",
        GEMINI_BASE_URL=gemini_url, LOCAL_MODELS="true",
    )  # fmt: skip
    result = await run_doctor(env)
    assert result.code == 0, result.output
    key_row = f"gemini key {short_hash(GOOD_KEY)} (project-doctor)"
    assert statuses(result) == {
        "redis": "OK",
        "postgresql": "OK",
        "migrations": "OK",
        key_row: "OK",
        # Each model file of the local content profile, loaded.
        **{f"local model: {m.name}": "OK" for m in model_files()},
        # Every other keyed provider is not configured here: a row that does not count.
        **{s.name: "SKIP" for s in providers.registry().values() if s.keyed and s.name != "gemini"},
        "disk (temp)": "OK",
        "disk (state)": "OK",
    }, result.output
    assert GOOD_KEY not in result.output, "a key is never printed"
    assert "none pending" in result.rows["migrations"][1]
    assert result.output.rstrip().endswith("ready")


async def test_no_keys_is_not_a_failure(redis_url: str, database_url: str, tmp_path: Path) -> None:
    result = await run_doctor(doctor_env(redis_url, database_url, tmp_path))
    assert result.code == 0, result.output
    assert result.rows["gemini"][0] == "SKIP"


async def test_stopped_redis(redis_url: str, database_url: str, tmp_path: Path) -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"
    result = await run_doctor(doctor_env(closed, database_url, tmp_path))
    assert result.code == 1
    assert result.rows["redis"][0] == "FAIL"
    assert "cannot reach" in result.rows["redis"][1]
    assert statuses(result)["postgresql"] == "OK"
    assert "Traceback" not in result.output
    assert "not ready: redis failed" in result.output


@pytest.mark.parametrize("problem", ["unknown database", "closed port", "wrong password"])
async def test_wrong_database_url(
    redis_url: str, database_url: str, tmp_path: Path, problem: str
) -> None:
    parts = urlsplit(database_url)
    if problem == "unknown database":
        wrong = urlunsplit(parts._replace(path="/imagestream_no_such_database"))
    elif problem == "closed port":
        wrong = urlunsplit(parts._replace(netloc=f"127.0.0.1:{free_port()}"))
    else:
        # Trust authentication accepts any password: name a role that does not exist.
        host = f"{parts.hostname}:{parts.port or 5432}"
        wrong = urlunsplit(parts._replace(netloc=f"nobody_here:secret@{host}"))
    result = await run_doctor(doctor_env(redis_url, wrong, tmp_path))
    assert result.code == 1, result.output
    assert result.rows["postgresql"][0] == "FAIL"
    assert result.rows["migrations"][0] == "SKIP"
    assert statuses(result)["redis"] == "OK"
    assert "Traceback" not in result.output
    assert "secret" not in result.output, "the password is redacted"


async def test_refused_gemini_key(
    redis_url: str, database_url: str, gemini_url: str, tmp_path: Path
) -> None:
    env = doctor_env(
        redis_url, database_url, tmp_path, GEMINI_API_KEYS=f"{GOOD_KEY},{BAD_KEY}",
        GEMINI_BASE_URL=gemini_url,
    )  # fmt: skip
    result = await run_doctor(env)
    assert result.code == 1
    rows = {name.split(" (")[0]: row for name, row in result.rows.items()}
    assert rows[f"gemini key {short_hash(GOOD_KEY)}"][0] == "OK"
    status, detail = rows[f"gemini key {short_hash(BAD_KEY)}"]
    assert status == "FAIL" and "refused" in detail, detail
    assert BAD_KEY not in result.output
    assert "Traceback" not in result.output


async def test_pending_migrations(redis_url: str, database_url: str, tmp_path: Path) -> None:
    name = f"imagestream_doctor_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    fresh = urlunsplit(urlsplit(database_url)._replace(path=f"/{name}"))
    try:
        result = await run_doctor(doctor_env(redis_url, fresh, tmp_path))
    finally:
        admin = await asyncpg.connect(database_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
    assert result.code == 1
    status, detail = result.rows["migrations"]
    assert status == "FAIL" and "imagestream db migrate" in detail
    assert result.rows["postgresql"][0] == "OK"


def test_disk_check_thresholds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert doctor.check_disk("here", tmp_path).status == "ok"
    # A folder that does not exist yet is judged by the disk it will be created on.
    assert doctor.check_disk("later", tmp_path / "not" / "yet").status == "ok"
    assert not (tmp_path / "not").exists()
    monkeypatch.setattr(doctor, "MIN_FREE_BYTES", 1 << 62)
    failed = doctor.check_disk("here", tmp_path)
    assert failed.status == "fail" and "GiB free" in failed.detail
    assert doctor.exit_code([failed]) == 1
    assert doctor.exit_code([doctor.Check("x", "skip", "", required=False)]) == 0
