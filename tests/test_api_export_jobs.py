"""Export jobs through a real api: queued, run in the background with progress, written to
files under EXPORT_DIR and to moto's S3 server; bad requests refused in one line; a job
whose api died is resumed, one an api hands back when it stops is queued again."""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import boto3
import duckdb
import pytest

from imagestream.devtools import ledgerfill

from .apiharness import Api, running_api
from .helpers import wait_for


@pytest.fixture
async def api(
    redis_url: str, database_url: str, pool: asyncpg.Pool, tmp_path: Path, s3_bucket: str
) -> AsyncIterator[Api]:
    async with running_api(
        redis_url,
        database_url,
        pool,
        EXPORT_DIR=str(tmp_path),
        EXPORT_ALLOWED_BUCKETS=f"s3://{s3_bucket},s3://missing-bucket",
        EXPORT_JOB_STALE_S="2",
    ) as running:
        yield running


async def start(api: Api, batch_id: uuid.UUID, body: dict[str, Any]) -> dict[str, Any]:
    async with (
        api.session(api.admin) as http,
        http.post(f"/api/v1/batches/{batch_id}/exports", json=body) as r,
    ):
        assert r.status == 202, await r.text()
        job: dict[str, Any] = await r.json()
        assert r.headers["Location"] == f"/api/v1/batches/{batch_id}/exports/{job['id']}"
        return job


async def finished(api: Api, batch_id: uuid.UUID, job_id: str) -> dict[str, Any]:
    async def state() -> dict[str, Any] | None:
        async with (
            api.session(api.viewer) as http,
            http.get(f"/api/v1/batches/{batch_id}/exports/{job_id}") as r,
        ):
            assert r.status == 200, await r.text()
            job: dict[str, Any] = await r.json()
        return job if job["state"] in ("completed", "failed") else None

    result: dict[str, Any] = await wait_for(state, timeout=60)
    return result


async def test_parquet_parts_under_a_prefix(api: Api, pool: asyncpg.Pool, tmp_path: Path) -> None:
    # A batch another pipeline (a CLI run) analyzed: this api's workers run the job.
    batch_id = await ledgerfill.finished_batch(pool, 5000, pipeline="a-cli-run")
    job = await start(
        api, batch_id, {"format": "parquet", "destination": "out/", "part_rows": 2000}
    )
    assert job["state"] == "queued" and job["destination"] == f"file://{tmp_path}/out/"
    done = await finished(api, batch_id, job["id"])
    assert done["state"] == "completed", done
    assert done["files"] == [f"file://{tmp_path}/out/part-{n:05d}.parquet" for n in range(3)]
    assert done["rows_written"] == done["rows_total"] == 5000 and done["progress"] == 100
    assert done["bytes_written"] == sum(p.stat().st_size for p in (tmp_path / "out").iterdir())
    urls = [r[0] for r in duckdb.sql(f"SELECT url FROM '{tmp_path}/out/part-*.parquet'").fetchall()]
    expected = await pool.fetch("SELECT url FROM items WHERE batch_id = $1 ORDER BY line", batch_id)
    assert urls == [r["url"] for r in expected]
    async with (
        api.session(api.viewer) as http,
        http.get(f"/api/v1/batches/{batch_id}/exports") as r,
    ):
        listed = await r.json()
    assert [j["id"] for j in listed["exports"]] == [job["id"]]


async def test_a_failed_part_takes_the_finished_parts_with_it(
    api: Api, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    batch_id = await ledgerfill.finished_batch(pool, 5000, pipeline=api.res.keys.prefix)
    # The second part cannot be written: a folder sits where its file is written.
    obstacle = tmp_path / "out" / "part-00001.parquet.partial"
    obstacle.mkdir(parents=True)
    job = await start(
        api, batch_id, {"format": "parquet", "destination": "out/", "part_rows": 2000}
    )
    done = await finished(api, batch_id, job["id"])
    assert done["state"] == "failed" and done["files"] == [], done
    assert done["error"] == f"file://{obstacle.parent}/part-00001.parquet: not a file"
    assert list((tmp_path / "out").iterdir()) == [obstacle]


async def test_filtered_csv_to_s3(api: Api, pool: asyncpg.Pool, s3_bucket: str) -> None:
    batch_id = await ledgerfill.finished_batch(pool, 3000, pipeline=api.res.keys.prefix)
    destination = f"s3://{s3_bucket}/exports/failed.csv"
    job = await start(api, batch_id, {"destination": destination, "state": "failed"})
    done = await finished(api, batch_id, job["id"])
    assert done["state"] == "completed" and done["format"] == "csv", done
    body = boto3.client("s3").get_object(Bucket=s3_bucket, Key="exports/failed.csv")["Body"]
    rows = list(csv.DictReader(io.StringIO(body.read().decode())))
    assert len(rows) == 300 and {r["status"] for r in rows} == {"failed"}
    # Rows are counted in COPY's output, where some cells hold quotes and line breaks.
    assert done["rows_written"] == done["rows_total"] == 300
    assert done["files"] == [destination]


async def test_a_failed_write_is_one_line(api: Api, pool: asyncpg.Pool) -> None:
    batch_id = await ledgerfill.finished_batch(pool, 10, pipeline=api.res.keys.prefix)
    job = await start(api, batch_id, {"destination": "s3://missing-bucket/x.jsonl"})
    done = await finished(api, batch_id, job["id"])
    assert done["state"] == "failed" and done["files"] == []
    assert done["error"].startswith("s3://missing-bucket/x.jsonl") and "\n" not in done["error"]


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"destination": "/etc/x.csv"}, "inside EXPORT_DIR"),
        ({"destination": "../x.csv"}, "inside EXPORT_DIR"),
        ({"destination": "s3://other-bucket/x.csv"}, "not in EXPORT_ALLOWED_BUCKETS"),
        ({"destination": "s3://key:secret@bucket/x.csv"}, "carry no credentials"),
        ({"destination": "x.pdf"}, "name a format"),
        ({"destination": "out/"}, "name a format"),
        ({"destination": "x.csv", "format": "pdf"}, "format must be one of"),
        ({"destination": "x.parquet", "part_rows": 0}, "part_rows"),
        ({"destination": "x.csv", "field": "tags"}, "bad field condition"),
        ({"destination": "x.csv", "state": "gone"}, "state must be among"),
        ({"destination": "x.csv", "colour": "red"}, "unknown field"),
        ({"format": "csv"}, "destination"),
    ],
)
async def test_bad_requests_say_why(
    api: Api, pool: asyncpg.Pool, body: dict[str, Any], says: str
) -> None:
    batch_id = await ledgerfill.finished_batch(pool, 1, pipeline=api.res.keys.prefix)
    async with (
        api.session(api.admin) as http,
        http.post(f"/api/v1/batches/{batch_id}/exports", json=body) as r,
    ):
        assert r.status == 400
        message = (await r.json())["error"]["message"]
    assert says in message and "secret" not in message and "\n" not in message


async def test_roles_and_unknown_ids(api: Api, pool: asyncpg.Pool) -> None:
    batch_id = await ledgerfill.finished_batch(pool, 1, pipeline=api.res.keys.prefix)
    path = f"/api/v1/batches/{batch_id}/exports"
    async with api.session(api.viewer) as http, http.post(path, json={"destination": "x.csv"}) as r:
        assert r.status == 403  # starting an export writes somewhere: admin only
    async with api.session(api.viewer) as http, http.get(f"{path}/{uuid.uuid4()}") as r:
        assert r.status == 404
    other = f"/api/v1/batches/{uuid.uuid4()}/exports"
    async with api.session(api.admin) as http, http.post(other, json={"destination": "x.csv"}) as r:
        assert r.status == 404


async def test_a_job_whose_api_died_is_resumed(
    api: Api, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    batch_id = await ledgerfill.finished_batch(pool, 100, pipeline=api.res.keys.prefix)
    ids = {}
    for name, attempts in (("resumed.csv", 1), ("given-up.csv", 3)):
        ids[name] = await pool.fetchval(
            """
            INSERT INTO export_jobs (batch_id, pipeline, format, destination, state, attempts,
                                     worker, heartbeat_at, started_at)
            VALUES ($1, $2, 'csv', $3, 'running', $4, 'a-process-that-died',
                    now() - interval '1 hour', now() - interval '1 hour')
            RETURNING id
            """,
            batch_id,
            api.res.keys.prefix,
            f"file://{tmp_path}/{name}",
            attempts,
        )
    resumed = await finished(api, batch_id, str(ids["resumed.csv"]))
    assert resumed["state"] == "completed" and resumed["attempts"] == 2, resumed
    assert len((tmp_path / "resumed.csv").read_text().splitlines()) == 101
    given_up = await finished(api, batch_id, str(ids["given-up.csv"]))
    assert given_up["state"] == "failed" and "interrupted 3 times" in given_up["error"]
    assert not (tmp_path / "given-up.csv").exists()


async def test_a_stopping_api_hands_its_job_back(
    redis_url: str, database_url: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    async with running_api(redis_url, database_url, pool, EXPORT_DIR=str(tmp_path)) as api:
        batch_id = await ledgerfill.finished_batch(pool, 100, pipeline=api.res.keys.prefix)
        async with pool.acquire() as conn, conn.transaction():
            # The job's reading waits behind this lock: it is running when the api stops.
            await conn.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
            job = await start(api, batch_id, {"destination": "held.csv"})

            async def running() -> bool:
                state = await conn.fetchval(
                    "SELECT state FROM export_jobs WHERE id = $1", uuid.UUID(job["id"])
                )
                return bool(state == "running")

            await wait_for(running, timeout=30)
            await api.app.shutdown()  # what a SIGTERM does to the api
    row = await pool.fetchrow("SELECT * FROM export_jobs WHERE id = $1", uuid.UUID(job["id"]))
    assert (row["state"], row["worker"], row["attempts"]) == ("queued", None, 0)
    assert list(tmp_path.iterdir()) == []  # no file, not even a partial one
    await pool.execute("DELETE FROM export_jobs WHERE id = $1", row["id"])
