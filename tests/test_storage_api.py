"""Lists at a URL through the api (``list_url``), read by ingest from moto's S3 server and
from a web server on 127.0.0.1; and ``imagestream export -o s3://…/`` against the api."""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import boto3
import orjson
import pytest

from imagestream.common import messages, settings
from imagestream.common.keys import FIELD
from imagestream.devtools import corpus
from imagestream.devtools.imageserver import ImageServer, Reply
from imagestream.ingest.service import Ingest, IngestSettings

from .apiharness import Api, running_api
from .helpers import wait_for
from .procs import service_env
from .test_cli import imagestream

SAMPLES = [corpus.sample(f"p{i}.jpg", 40 + 8 * i, 30, "JPEG", seed=i) for i in range(3)]


@pytest.fixture(scope="module")
def bucket(s3_endpoint: str) -> str:
    name = f"lists-{secrets.token_hex(4)}"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket=name)
    for sample in SAMPLES:
        s3.put_object(Bucket=name, Key=f"images/{sample.name}", Body=sample.data)
    listing = "url\n" + "".join(f"s3://{name}/images/{s.name}\n" for s in SAMPLES)
    s3.put_object(Bucket=name, Key="urls.csv", Body=listing.encode())
    s3.put_object(Bucket=name, Key="not-a-list.csv", Body=b"\x89PNG\r\n\x1a\n\x00\x00binary")
    return name


@pytest.fixture(scope="module")
async def web() -> AsyncIterator[ImageServer]:
    server = ImageServer({s.name: Reply(s.data) for s in SAMPLES})
    await server.start()
    server.routes["urls.txt"] = Reply(
        "".join(server.url(s.name) + "\n" for s in SAMPLES).encode(), content_type="text/plain"
    )
    yield server
    await server.stop()


@pytest.fixture(scope="module")
async def api(
    redis_url: str, database_url: str, pool: asyncpg.Pool, bucket: str
) -> AsyncIterator[Api]:
    async with running_api(
        redis_url,
        database_url,
        pool,
        stages=True,
        LIST_ALLOWED_BUCKETS=f"s3://{bucket}",
        LIST_ALLOWED_CIDRS="127.0.0.1/32",
        FETCH_ALLOWED_BUCKETS=f"s3://{bucket}",
    ) as api:
        yield api


async def create(api: Api, **fields: str) -> tuple[int, dict[str, Any]]:
    form = aiohttp.FormData(fields, default_to_multipart=True)
    async with api.session(api.admin) as http, http.post("/api/v1/batches", data=form) as r:
        return r.status, await r.json()


async def finished(api: Api, batch_id: str) -> dict[str, Any]:
    body: dict[str, Any] = {}

    async def done() -> bool:
        nonlocal body
        async with api.session(api.viewer) as http, http.get(f"/api/v1/batches/{batch_id}") as r:
            body = await r.json()
        return body["state"] in ("completed", "completed_with_errors", "failed")

    await wait_for(done, timeout=60, interval=0.2)
    return body


async def test_lists_from_s3_and_the_web(api: Api, bucket: str, web: ImageServer) -> None:
    status, body = await create(api, list_url=f"s3://{bucket}/urls.csv", batch_name="from s3")
    assert status == 201, body
    assert (body["list_url"], body["source_name"]) == (f"s3://{bucket}/urls.csv", "urls.csv")
    batch = await finished(api, body["id"])
    assert (batch["state"], batch["counts"]["succeeded"]) == ("completed", 3), batch

    # A signed URL's query is a credential: kept to read the list, never shown.
    status, body = await create(api, list_url=web.url("urls.txt") + "?signature=sekrit")
    assert status == 201, body
    assert body["list_url"] == web.url("urls.txt") and "sekrit" not in orjson.dumps(body).decode()
    batch = await finished(api, body["id"])
    assert (batch["state"], batch["counts"]["succeeded"]) == ("completed", 3), batch

    for url, reason in (
        (f"s3://{bucket}/missing.csv", "not found"),
        (f"s3://{bucket}/not-a-list.csv", "binary"),
    ):
        status, body = await create(api, list_url=url)
        assert status == 201, body
        batch = await finished(api, body["id"])
        assert batch["state"] == "failed" and reason in batch["state_reason"], batch


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"list_url": "s3://someone-elses-bucket/urls.csv"}, "not in LIST_ALLOWED_BUCKETS"),
        ({"list_url": "http://169.254.169.254/latest/urls.txt"}, "is not public"),
        ({"list_url": "http://10.1.2.3/urls.txt"}, "is not public"),
        ({"list_url": "ftp://example.org/urls.txt"}, "not supported"),
        ({"list_url": "file:///etc/passwd"}, "s3://, gs:// or https://"),
        ({"list_url": "gs://Bad/urls.csv"}, "not a valid bucket name"),
        ({"batch_name": "nothing"}, "no 'file' part (or 'list_url' field)"),
    ],
)
async def test_bad_list_urls_are_400(api: Api, fields: dict[str, str], message: str) -> None:
    status, body = await create(api, **fields)
    assert status == 400 and message in body["error"]["message"], body


async def test_file_and_list_url_together_are_400(api: Api, bucket: str) -> None:
    form = aiohttp.FormData()
    form.add_field("file", b"url\nhttps://example.org/a.jpg\n", filename="urls.csv")
    form.add_field("list_url", f"s3://{bucket}/urls.csv")
    async with api.session(api.admin) as http, http.post("/api/v1/batches", data=form) as r:
        body = await r.json()
    assert r.status == 400 and "not both" in body["error"]["message"], body


async def test_export_to_an_s3_prefix(api: Api, bucket: str, s3_endpoint: str) -> None:
    status, body = await create(api, list_url=f"s3://{bucket}/urls.csv")
    assert status == 201, body
    await finished(api, body["id"])
    env = {**os.environ, "IMAGESTREAM_URL": api.base, "IMAGESTREAM_TOKEN": api.admin}
    env["IMAGESTREAM_ENV_FILE"] = "/nonexistent"
    prefix = f"s3://{bucket}/exports/"
    code, _, err = await imagestream(env, "export", body["id"], "-o", prefix, "--format", "jsonl")
    assert code == 0, err
    key = f"exports/{body['id']}.jsonl"
    assert f"to s3://{bucket}/{key}" in err
    data = boto3.client("s3", endpoint_url=s3_endpoint).get_object(Bucket=bucket, Key=key)
    rows = [orjson.loads(line) for line in data["Body"].read().splitlines()]
    assert sorted(r["url"] for r in rows) == sorted(
        f"s3://{bucket}/images/{s.name}" for s in SAMPLES
    )
    assert {r["status"] for r in rows} == {"succeeded"}


async def test_a_list_url_whose_reader_died_is_read_again(
    redis_url: str, database_url: str, pool: asyncpg.Pool, bucket: str
) -> None:
    """No stages run: the announcement is lost and the first reader stopped after two rows.
    The reconciler submits the batch again, and the list is read from its third row."""
    async with running_api(
        redis_url, database_url, pool, LIST_ALLOWED_BUCKETS=f"s3://{bucket}"
    ) as api:
        status, body = await create(api, list_url=f"s3://{bucket}/urls.csv")
        assert status == 201, body
        batch_id = uuid.UUID(body["id"])
        await api.res.redis.delete(api.res.keys.batches)
        await pool.execute("UPDATE batches SET ingest_line = 3 WHERE id = $1", batch_id)
        env = service_env(
            redis_url, database_url, api.res.keys.prefix, LIST_ALLOWED_BUCKETS=f"s3://{bucket}"
        )
        ingest = Ingest(api.res, settings.load(IngestSettings, env))
        await ingest.reconcile_once()
        entries = await api.res.redis.xrange(api.res.keys.batches)
        submitted = [messages.batch_decoder.decode(fields[FIELD]) for _, fields in entries]
        assert [m.batch_id for m in submitted] == [str(batch_id)]
        await ingest.handle(submitted[0])
        urls = await pool.fetch("SELECT url FROM items WHERE batch_id = $1", batch_id)
        # Line 1 is the header; lines 2 and 3 were stored by the reader that died.
        assert [r["url"] for r in urls] == [f"s3://{bucket}/images/{SAMPLES[2].name}"]
