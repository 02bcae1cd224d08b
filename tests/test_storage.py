"""libs/common/storage.py against moto's S3 server on 127.0.0.1, reached by obstore over
HTTP; against local files; web URLs through the address guard against a loopback server.
GCS: URL parsing only (no GCS server runs here)."""

from __future__ import annotations

import os
from pathlib import Path

import boto3
import pytest

from imagestream.common import storage
from imagestream.common.guard import AddressPolicy, parse_cidrs
from imagestream.common.storage import StorageError
from imagestream.devtools.imageserver import ImageServer, Reply


def _s3(endpoint: str) -> object:
    return boto3.client("s3", endpoint_url=endpoint)


# ---------------------------------------------------------------- URLs
@pytest.mark.parametrize(
    ("url", "scheme", "bucket", "key"),
    [
        ("s3://photos/lists/urls.csv", "s3", "photos", "lists/urls.csv"),
        ("gs://my_bucket.eu/a%20b.csv", "gs", "my_bucket.eu", "a b.csv"),
        ("s3://photos/out/", "s3", "photos", "out/"),
        ("file:///tmp/x.csv", "file", "", "/tmp/x.csv"),
    ],
)
def test_parse(url: str, scheme: str, bucket: str, key: str) -> None:
    location = storage.parse(url)
    assert (location.scheme, location.bucket, location.key) == (scheme, bucket, key)


def test_plain_paths_are_files(tmp_path: Path) -> None:
    assert storage.parse(str(tmp_path / "r.csv")).key == str(tmp_path / "r.csv")
    assert storage.parse("out/").is_prefix
    assert storage.parse("r.csv").key == os.path.abspath("r.csv")


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("ftp://host/x.csv", "not supported"),
        ("s3://AB/x", "not a valid bucket"),
        ("gs://x/y", "not a valid bucket"),
        ("s3://key:secret@bucket/x", "no credentials"),
        ("s3://bucket/x?versionId=1", "no query"),
        ("file://otherhost/x", "no host"),
        ("", "empty"),
    ],
)
def test_bad_urls(url: str, says: str) -> None:
    with pytest.raises(StorageError, match=says) as caught:
        storage.parse(url)
    assert caught.value.failure == "invalid"
    assert "secret" not in str(caught.value)


def test_join() -> None:
    assert storage.join("s3://bk1/out/", "x.csv") == "s3://bk1/out/x.csv"
    assert storage.join("s3://bk1/out", "x.csv") == "s3://bk1/out/x.csv"
    assert storage.join("s3://bk1", "x.csv") == "s3://bk1/x.csv"
    assert storage.join("gs://bk1/p/", "part-00000.parquet") == "gs://bk1/p/part-00000.parquet"
    assert storage.join("/tmp/out/", "x.csv") == "/tmp/out/x.csv"
    assert storage.join("file:///tmp/out", "x.csv") == "file:///tmp/out/x.csv"


def test_bucket_allow_lists() -> None:
    allowed = storage.parse_buckets(["s3://photos", " gs://thumbs/ ", ""])
    assert allowed == {("s3", "photos"), ("gs", "thumbs")}
    assert storage.bucket_allowed(storage.parse("s3://photos/a.jpg"), allowed)
    assert not storage.bucket_allowed(storage.parse("gs://photos/a.jpg"), allowed)
    assert not storage.bucket_allowed(storage.parse("s3://other/a.jpg"), allowed)
    for bad in ("photos", "s3://photos/prefix", "file:///x"):
        with pytest.raises(ValueError):
            storage.parse_buckets([bad])


# ---------------------------------------------------------------- S3
async def test_write_then_read_s3(s3_endpoint: str, s3_bucket: str) -> None:
    """A multipart upload (several parts) streamed in, streamed back out in pieces."""
    piece = os.urandom(1 << 20)
    pieces = 20  # 20 MiB: three 8 MiB parts
    url = f"s3://{s3_bucket}/exports/big.bin"
    async with storage.open_write(url) as out:
        for _ in range(pieces):
            await out.write(piece)
    sizes = [len(chunk) async for chunk in storage.read_chunks(url, chunk_bytes=3 << 20)]
    assert sum(sizes) == pieces * len(piece)
    assert len(sizes) > 1
    read = b"".join([chunk async for chunk in storage.read_chunks(url)])
    assert read == piece * pieces
    await storage.delete(url)
    await storage.delete(url)  # gone already: nothing to do
    assert boto3.client("s3").list_objects_v2(Bucket=s3_bucket)["KeyCount"] == 0


async def test_failed_write_leaves_nothing(s3_endpoint: str, s3_bucket: str) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for size in (1000, 12 << 20):  # one PUT on close; a multipart upload under way
        with pytest.raises(RuntimeError):
            async with storage.open_write(f"s3://{s3_bucket}/x-{size}.csv") as out:
                await out.write(b"y" * size)
                raise RuntimeError("the export failed half-way")
    assert s3.list_objects_v2(Bucket=s3_bucket)["KeyCount"] == 0
    assert not s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")


async def test_a_store_failing_mid_write_is_one_line(
    s3_endpoint: str, s3_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The bucket disappears while parts go out: the next write, not the open, fails."""
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    url = f"s3://{s3_bucket}/x.parquet"
    with pytest.raises(StorageError) as caught:
        async with storage.open_write(url) as out:
            await out.write(b"y" * (9 << 20))  # a first part is under way
            for upload in s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []):
                s3.abort_multipart_upload(
                    Bucket=s3_bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                )
            s3.delete_bucket(Bucket=s3_bucket)
            for _ in range(8):
                await out.write(b"y" * (8 << 20))
    message = str(caught.value)
    assert message.startswith(url) and "\n" not in message, message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    ours = [r for r in caplog.records if r.name.startswith("imagestream")]
    assert all(r.exc_info is None and "\n" not in r.getMessage() for r in ours)


async def test_missing_objects_and_buckets(s3_endpoint: str, s3_bucket: str) -> None:
    for url in (f"s3://{s3_bucket}/nothing.csv", "s3://no-such-bucket-here/x.csv"):
        with pytest.raises(StorageError, match="not found") as caught:
            async for _ in storage.read_chunks(url):
                pass
        assert caught.value.failure == "not_found"
        assert str(caught.value).count("\n") == 0
    with pytest.raises(StorageError) as caught:
        async with storage.open_write("s3://no-such-bucket-here/x.csv") as out:
            await out.write(b"x")
    assert "\n" not in str(caught.value)


async def test_read_capped(s3_endpoint: str, s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/img.jpg"
    async with storage.open_write(url) as out:
        await out.write(b"\xff\xd8" + b"0" * 5000)
    assert len(await storage.read_capped(url, 6000)) == 5002
    with pytest.raises(StorageError, match="5002 bytes, the limit is 5001") as caught:
        await storage.read_capped(url, 5001)
    assert caught.value.failure == "too_large"


# ---------------------------------------------------------------- files
async def test_files(tmp_path: Path) -> None:
    target = tmp_path / "r.csv"
    async with storage.open_write(target.as_uri()) as out:
        await out.write(b"a,b\n")
        await out.write(b"1,2\n")
    assert target.read_bytes() == b"a,b\n1,2\n"
    assert [c async for c in storage.read_chunks(str(target), chunk_bytes=3)] == [
        b"a,b",
        b"\n1,",
        b"2\n",
    ]
    with pytest.raises(RuntimeError):
        async with storage.open_write(str(tmp_path / "s.csv")) as out:
            await out.write(b"half")
            raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv"]
    with pytest.raises(StorageError, match="does not exist"):
        async with storage.open_write(str(tmp_path / "nope" / "x.csv")):
            pass
    with pytest.raises(StorageError, match="folder or prefix"):
        async with storage.open_write(str(tmp_path) + "/"):
            pass
    with pytest.raises(StorageError, match="not found"):
        async for _ in storage.read_chunks(str(tmp_path / "missing.csv")):
            pass


# ---------------------------------------------------------------- web URLs (lists)
async def test_web_urls_pass_the_address_guard() -> None:
    listing = b"url\n" + b"".join(b"https://example.org/%d.jpg\n" % i for i in range(5000))
    server = ImageServer(
        {
            "urls.csv": Reply(listing, content_type="text/csv"),
            "moved": Reply(status=302, headers={"Location": "/urls.csv"}),
            "to-metadata": Reply(
                status=302, headers={"Location": "http://169.254.169.254/latest/meta-data/"}
            ),
            "private": Reply(status=403),
        }
    )
    await server.start()
    loopback = AddressPolicy(parse_cidrs(["127.0.0.1/32"]))
    try:

        async def read(url: str, policy: AddressPolicy | None) -> bytes:
            return b"".join([p async for p in storage.read_chunks(url, policy=policy)])

        # Loopback is refused by default, before any request is sent.
        with pytest.raises(StorageError, match="not public") as caught:
            await read(server.url("urls.csv") + "?token=sekrit", None)
        assert caught.value.failure == "blocked"
        assert "sekrit" not in str(caught.value)
        assert server.hits == {}
        assert await read(server.url("urls.csv"), loopback) == listing
        assert await read(server.url("moved"), loopback) == listing
        # A redirect is checked again: the metadata address is never connected to.
        with pytest.raises(StorageError, match=r"169\.254\.169\.254 is not public") as caught:
            await read(server.url("to-metadata"), loopback)
        assert caught.value.failure == "blocked"
        with pytest.raises(StorageError, match="HTTP 403") as caught:
            await read(server.url("private"), loopback)
        assert caught.value.failure == "denied"
        with pytest.raises(StorageError, match="HTTP 404") as caught:
            await read(server.url("gone"), loopback)
        assert caught.value.failure == "not_found"
    finally:
        await server.stop()
