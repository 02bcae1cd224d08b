"""Object storage end to end through the CLI, against moto's S3 server on 127.0.0.1: a list
read from s3://, images fetched from s3:// (an allowed bucket and a refused one), results
written to an s3:// prefix; and the credentials never in the output or the logs."""

from __future__ import annotations

import boto3
import orjson
import pytest

from imagestream.devtools import corpus, s3server

from .procs import service_env
from .test_cli import imagestream

SAMPLES = [corpus.sample(f"p{i}.jpg", 64 + 16 * i, 48, "JPEG", seed=i) for i in range(3)]


@pytest.fixture
def other_bucket(s3_endpoint: str, s3_bucket: str) -> str:
    """A second bucket the fetcher is not allowed to read."""
    name = s3_bucket + "-other"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


async def test_list_images_and_results_in_s3(
    redis_url: str,
    database_url: str,
    prefix: str,
    s3_endpoint: str,
    s3_bucket: str,
    other_bucket: str,
) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for sample in SAMPLES:
        s3.put_object(Bucket=s3_bucket, Key=f"images/{sample.name}", Body=sample.data)
    s3.put_object(Bucket=s3_bucket, Key="images/page.jpg", Body=b"<html>not an image</html>")
    s3.put_object(Bucket=other_bucket, Key="secret.jpg", Body=SAMPLES[0].data)
    urls = {f"s3://{s3_bucket}/images/{s.name}": "succeeded" for s in SAMPLES}
    urls |= {
        f"s3://{s3_bucket}/images/page.jpg": "not_an_image",
        f"s3://{s3_bucket}/images/missing.jpg": "not_found",
        f"s3://{other_bucket}/secret.jpg": "bucket_not_allowed",
        # Refused before any request: no GCS server runs here, and none is reached.
        f"gs://{s3_bucket}/images/{SAMPLES[0].name}": "bucket_not_allowed",
    }
    listing = "url,label\n" + "".join(f"{url},x{i}\n" for i, url in enumerate(urls))
    s3.put_object(Bucket=s3_bucket, Key="lists/urls.csv", Body=listing.encode())

    env = service_env(redis_url, database_url, prefix, FETCH_ALLOWED_BUCKETS=f"s3://{s3_bucket}")
    code, out, err = await imagestream(
        env,
        "--verbose",  # the services' logs too: the secret must not be in them either
        "analyze",
        f"s3://{s3_bucket}/lists/urls.csv",
        "-o",
        f"s3://{s3_bucket}/results/",
        "--format",
        "jsonl",
        "--no-progress",
    )
    assert code == 0, err
    assert "7 images: 3 succeeded, 4 failed" in out, out
    assert s3server.SECRET_ACCESS_KEY not in out + err
    listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix="results/")["Contents"]
    assert len(listed) == 1 and listed[0]["Key"].endswith(".jsonl")
    assert f"results: s3://{s3_bucket}/{listed[0]['Key']}" in out
    body = s3.get_object(Bucket=s3_bucket, Key=listed[0]["Key"])["Body"].read()
    rows = {r["url"]: r for r in map(orjson.loads, body.splitlines())}
    assert {url: r["error_class"] or r["status"] for url, r in rows.items()} == urls
    for sample in SAMPLES:
        row = rows[f"s3://{s3_bucket}/images/{sample.name}"]
        assert (row["width"], row["height"], row["format"]) == (sample.width, 48, "JPEG")
    refused = rows[f"s3://{other_bucket}/secret.jpg"]
    assert "FETCH_ALLOWED_BUCKETS" in refused["error_message"]


async def test_bad_locations_get_one_line(
    redis_url: str, database_url: str, prefix: str, s3_endpoint: str, s3_bucket: str
) -> None:
    env = service_env(redis_url, database_url, prefix)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.put_object(Bucket=s3_bucket, Key="urls.txt", Body=b"https://example.org/a.jpg\n")
    for args, message in (
        ([f"s3://{s3_bucket}/missing.csv"], f"s3://{s3_bucket}/missing.csv: not found"),
        (["gs://Bad_Bucket/urls.csv"], "not a valid bucket name"),
        (
            [f"s3://{s3_bucket}/urls.txt", "-o", "s3://no-such-bucket-xyz/out.csv"],
            "bucket s3://no-such-bucket-xyz does not exist",
        ),
        ([f"s3://{s3_bucket}/urls.txt", "-o", f"s3://{s3_bucket}/out.pdf"], "export format"),
    ):
        code, out, err = await imagestream(env, "analyze", *args, "--no-progress")
        lines = err.strip().splitlines()
        assert code != 0 and len(lines) == 1 and message in lines[0], (args, out, err)
        assert "Traceback" not in err
