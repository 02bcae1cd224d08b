"""Near-duplicate groups through the real pipeline and api: scikit-image's photographs and
their resized, recompressed, cropped and converted copies, served over HTTP, fetched,
analyzed by the local analyzer and grouped by the writer's grouper; read back through
``GET /duplicates``, the export filters and the export column; a replayed failure joins
its group."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest
from PIL import Image
from skimage import data as skdata

from imagestream.devtools.imageserver import ImageServer, Reply

from .apiharness import Api, running_api, upload
from .test_api import finished, get, post

PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "rocket")
MEDIA = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}


def encoded(img: Image.Image, fmt: str, **options: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def copies(name: str) -> dict[str, tuple[bytes, str]]:
    """path -> (bytes, format): the photograph first, then its near-copies."""
    img = Image.fromarray(getattr(skdata, name)()).convert("RGB")
    w, h = img.size
    dx, dy = w * 2 // 100, h * 2 // 100
    return {
        f"{name}/original.jpg": (encoded(img, "JPEG", quality=95), "JPEG"),
        f"{name}/half.jpg": (encoded(img.resize((w // 2, h // 2)), "JPEG", quality=85), "JPEG"),
        f"{name}/q30.jpg": (encoded(img, "JPEG", quality=30), "JPEG"),
        f"{name}/crop.jpg": (encoded(img.crop((dx, dy, w, h)), "JPEG", quality=85), "JPEG"),
        f"{name}/converted.png": (encoded(img, "PNG"), "PNG"),
        f"{name}/converted.webp": (encoded(img, "WEBP", quality=70), "WEBP"),
    }


@pytest.fixture(scope="module")
async def images() -> AsyncIterator[ImageServer]:
    routes: dict[str, Reply] = {}
    for name in PHOTOS:
        for path, (data, fmt) in copies(name).items():
            routes[path] = Reply(data, content_type=MEDIA[fmt])
    # The same bytes at another address: an exact duplicate.
    routes["elsewhere/astronaut.jpg"] = routes["astronaut/original.jpg"]
    server = ImageServer(routes)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(scope="module")
async def api(redis_url: str, database_url: str, pool: asyncpg.Pool) -> AsyncIterator[Api]:
    async with running_api(redis_url, database_url, pool, stages=True) as api:
        yield api


def expected_groups(server: ImageServer) -> dict[str, set[str]]:
    groups = {name: {server.url(p) for p in copies(name)} for name in PHOTOS}
    groups["astronaut"].add(server.url("elsewhere/astronaut.jpg"))
    return groups


async def test_copies_share_their_original_group_and_different_photos_do_not(
    api: Api, images: ImageServer, pool: asyncpg.Pool
) -> None:
    urls = [images.url(p) for name in PHOTOS for p in copies(name)]
    late = "late/chelsea.png"  # fails first, succeeds when replayed
    urls += [images.url("elsewhere/astronaut.jpg"), images.url(late)]
    status, created = await upload(api, ("url\n" + "\n".join(urls) + "\n").encode())
    assert status == 201, created
    batch_id = created["id"]
    done = await finished(api, batch_id)
    assert done["counts"]["succeeded"] == len(urls) - 1, done

    status, body = await get(api, f"/api/v1/batches/{batch_id}/duplicates?members=100")
    assert status == 200, body
    want = expected_groups(images)
    found = {frozenset(m["url"] for m in g["members"]) for g in body["duplicate_groups"]}
    assert found == {frozenset(v) for v in want.values()}
    assert body["groups"] == len(PHOTOS) and body["pending"] == 0
    assert body["items"] == sum(len(v) for v in want.values()) and body["max_distance"] == 8
    firsts = {images.url(f"{name}/original.jpg") for name in PHOTOS}
    for group in body["duplicate_groups"]:
        assert group["size"] == len(group["members"])
        first = group["members"][0]
        assert first["item_id"] == group["group"] and first["url"] in firsts
        assert [m["item_id"] for m in group["members"]] == sorted(
            m["item_id"] for m in group["members"]
        )

    # Paged: one group at a time, in order of their first item.
    seen, after = [], 0
    while True:
        status, page = await get(
            api, f"/api/v1/batches/{batch_id}/duplicates?limit=1&members=1&after={after}"
        )
        seen += [g["group"] for g in page["duplicate_groups"]]
        if page["next_after"] is None:
            break
        after = page["next_after"]
    assert seen == sorted(g["group"] for g in body["duplicate_groups"])

    # Exports: the column, "the first of each group", one group.
    status, data = await get(api, f"/api/v1/batches/{batch_id}/results?format=jsonl")
    rows = [orjson.loads(line) for line in data.splitlines()]
    by_url = {r["url"]: r for r in rows}
    assert by_url[images.url(late)]["duplicate_group"] is None  # failed: no image, no group
    for members in want.values():
        assert len({by_url[u]["duplicate_group"] for u in members}) == 1
    status, data = await get(
        api, f"/api/v1/batches/{batch_id}/results?format=jsonl&duplicates=first"
    )
    assert status == 200
    assert {orjson.loads(line)["url"] for line in data.splitlines()} == firsts
    group = by_url[images.url("coffee/original.jpg")]["duplicate_group"]
    status, data = await get(
        api, f"/api/v1/batches/{batch_id}/results?format=csv&duplicate_group={group}"
    )
    listed = list(csv.DictReader(io.StringIO(data.decode())))
    assert {r["url"] for r in listed} == want["coffee"]
    assert {r["duplicate_group"] for r in listed} == {str(group)}

    # A replayed failure joins its original's group, and nothing else moves.
    before = {u: r["duplicate_group"] for u, r in by_url.items() if u != images.url(late)}
    images.routes[late] = Reply(
        copies("chelsea")["chelsea/converted.png"][0], content_type="image/png"
    )
    status, replayed = await post(api, f"/api/v1/batches/{batch_id}/replay")
    assert status == 200 and replayed["replayed"] == 1, replayed
    await finished(api, batch_id)
    status, data = await get(api, f"/api/v1/batches/{batch_id}/results?format=jsonl")
    after_replay = {r["url"]: r["duplicate_group"] for r in map(orjson.loads, data.splitlines())}
    chelsea = after_replay[images.url("chelsea/original.jpg")]
    assert after_replay.pop(images.url(late)) == chelsea
    assert after_replay == before


async def test_bad_duplicate_parameters_are_one_line_errors(api: Api, images: ImageServer) -> None:
    status, created = await upload(api, f"url\n{images.url('rocket/q30.jpg')}\n".encode())
    batch_id = created["id"]
    for query, words in [
        ("duplicates=last", "duplicates must be one of first"),
        ("duplicate_group=zero", "duplicate_group must be an integer"),
        ("duplicate_group=0", "duplicate_group must be between 1"),
    ]:
        status, body = await get(api, f"/api/v1/batches/{batch_id}/results?{query}")
        assert status == 400 and words in body["error"]["message"], (query, body)
    status, body = await get(api, f"/api/v1/batches/{batch_id}/duplicates?limit=0")
    assert status == 400 and "limit" in body["error"]["message"]
    status, body = await get(api, "/api/v1/batches/00000000-0000-0000-0000-000000000000/duplicates")
    assert status == 404
