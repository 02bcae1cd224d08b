"""The REST API against the real pipeline: auth on every route, uploads (limits, formats,
validation report), a batch's whole life over HTTP (live events, items, history, replay,
exports, download links), controls, system status, the dead stream and tokens."""

from __future__ import annotations

import asyncio
import csv
import gzip
import io
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import openpyxl
import orjson
import pytest

from imagestream.api.app import FEEDS
from imagestream.api.auth import ROUTE_ROLES
from imagestream.common import ledger, messages, streams
from imagestream.common.inputs import ListParser
from imagestream.common.keys import Keys
from imagestream.devtools import corpus
from imagestream.devtools.imageserver import ImageServer, Reply

from .apiharness import Api, running_api, upload
from .helpers import wait_for

UNSUPPORTED = "unsupported_media_type"
SAMPLES = corpus.mixed(24, sizes=((48, 32), (96, 64)), formats=("JPEG", "PNG"), seed=11)


@pytest.fixture(scope="module")
async def images() -> AsyncIterator[ImageServer]:
    routes = {s.name: Reply(s.data) for s in SAMPLES}
    routes["flaky.jpg"] = Reply(b"down for now", status=404, content_type="text/plain")
    # Slow images: a batch of them runs long enough to pause it.
    routes |= {f"slow/{s.name}": Reply(s.data, drip_s=0.05) for s in SAMPLES}
    server = ImageServer(routes)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(scope="module")
async def api(redis_url: str, database_url: str, pool: asyncpg.Pool) -> AsyncIterator[Api]:
    async with running_api(redis_url, database_url, pool, stages=True, FETCH_PER_HOST="4") as api:
        yield api


def listing(server: ImageServer, names: list[str], *, extra: str = "") -> bytes:
    lines = ["url,sku,note"]
    lines += [f"{server.url(n)},SKU-{i},{'=2+3' if i == 0 else 'ok'}" for i, n in enumerate(names)]
    return ("\n".join(lines) + "\n" + extra).encode()


async def get(api: Api, path: str, token: str | None = None) -> tuple[int, Any]:
    async with api.session(token or api.admin) as http, http.get(path) as r:
        body = await r.read()
        return r.status, orjson.loads(body) if r.content_type == "application/json" else body


async def post(api: Api, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
    async with api.session(token or api.admin) as http, http.post(path, json=body) as r:
        return r.status, await r.json()


async def finished(api: Api, batch_id: str, timeout: float = 90) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        _, status = await get(api, f"/api/v1/batches/{batch_id}/status")
        return status if status["state"] not in ledger.ACTIVE_BATCH_STATES else None

    result: dict[str, Any] = await wait_for(done, timeout=timeout, interval=0.2)
    return result


def assert_error(status: int, body: Any, want: int, code: str) -> None:
    assert status == want, body
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


# ------------------------------------------------------------------ auth
async def test_every_route_needs_its_role(api: Api, images: ImageServer) -> None:
    status, created = await upload(api, listing(images, [SAMPLES[0].name]))
    assert status == 201
    values = {"batch_id": created["id"], "item_id": "1", "token_id": "999999", "ticket": "x",
              "export_id": "00000000-0000-0000-0000-000000000000", "event_id": "1"}  # fmt: skip
    checked = 0
    for route, need in api.app[ROUTE_ROLES].items():
        info = route.resource.get_info() if route.resource is not None else {}
        if "formatter" not in info and "path" not in info:
            continue  # the static files
        path = re.sub(r"\{(\w+)\}", lambda m: values[m[1]], info.get("formatter") or info["path"])
        async with aiohttp.ClientSession(api.base) as http:
            async with http.request(route.method, path) as anonymous:
                body = await anonymous.read()
            async with http.request(route.method, path, headers=api.headers(api.viewer)) as viewer:
                viewer_body = await viewer.read()
        if need is None:
            assert anonymous.status != 401, (route.method, path)
            continue
        checked += 1
        assert anonymous.status == 401, (route.method, path, body)
        assert orjson.loads(body)["error"]["code"] == "unauthorized"
        assert anonymous.headers["WWW-Authenticate"] == "Bearer"
        if need == "admin":
            assert viewer.status == 403, (route.method, path, viewer_body)
            assert orjson.loads(viewer_body)["error"]["code"] == "forbidden"
        else:
            assert viewer.status not in (401, 403), (route.method, path, viewer_body)
    assert checked >= 20


async def test_unknown_routes_and_methods_answer_json(api: Api) -> None:
    async with aiohttp.ClientSession(api.base) as http:
        async with http.get("/api/v1/nothing-here") as r:
            assert_error(r.status, await r.json(), 404, "not_found")
        async with http.put("/api/v1/batches") as r:
            assert_error(r.status, await r.json(), 405, "method_not_allowed")
            assert set(r.headers["Allow"].split(",")) == {"GET", "POST"}
    status, body = await get(api, f"/api/v1/batches/{uuid.uuid4()}")
    assert_error(status, body, 404, "not_found")
    status, body = await get(api, "/api/v1/batches/not-a-uuid/status")
    assert_error(status, body, 404, "not_found")
    status, body = await get(api, "/api/v1/batches?limit=0")
    assert_error(status, body, 400, "bad_request")


async def test_revoked_token_stops_working_at_once(api: Api) -> None:
    status, created = await post(api, "/api/v1/tokens", {"name": "script", "role": "viewer"})
    assert status == 201 and created["token"].startswith("ist_")
    assert (await get(api, "/api/v1/session", created["token"]))[1]["role"] == "viewer"
    _, listed = await get(api, "/api/v1/tokens")
    assert created["id"] in [t["id"] for t in listed["tokens"]]
    assert all("token" not in t and "token_hash" not in t for t in listed["tokens"])
    async with api.session(api.admin) as http, http.delete(f"/api/v1/tokens/{created['id']}") as r:
        assert r.status == 200
    status, body = await get(api, "/api/v1/session", created["token"])
    assert_error(status, body, 401, "unauthorized")
    status, body = await post(api, "/api/v1/tokens", {"name": "x", "role": "root"})
    assert_error(status, body, 400, "bad_request")


async def test_auth_can_only_be_turned_off_explicitly(
    redis_url: str, database_url: str, pool: asyncpg.Pool
) -> None:
    async with running_api(redis_url, database_url, pool, AUTH_DISABLED="true") as open_api:
        status, _ = await post(open_api, "/api/v1/tokens", {"name": "n", "role": "viewer"}, "")
        assert status == 201
        session = (await get(open_api, "/api/v1/session", ""))[1]
        assert session["auth_disabled"] is True and session["role"] == "admin"


# ------------------------------------------------------------------ uploads
async def raw_request(base: str, head: str, body: bytes = b"") -> tuple[int, bytes]:
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head.encode() + body)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), timeout=10)
        headers = b""
        while (line := await asyncio.wait_for(reader.readline(), timeout=10)) not in (b"\r\n", b""):
            headers += line
        length = int(re.search(rb"Content-Length: (\d+)", headers, re.I)[1])  # type: ignore[index]
        return int(status_line.split()[1]), await reader.readexactly(length)
    finally:
        writer.close()


async def test_oversized_upload_is_refused_before_its_body(api: Api) -> None:
    declared = 2 * 1024**3 + 1024**2  # over the default 2 GiB limit
    head = (
        "POST /api/v1/batches HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {api.admin}\r\n"
        "Content-Type: multipart/form-data; boundary=b\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    )
    # Only 1 KiB of the 2 GiB is ever sent: the answer comes without the rest.
    status, body = await raw_request(api.base, head, b"--b\r\n" + b"x" * 1024)
    assert_error(status, orjson.loads(body), 413, "payload_too_large")
    # With Expect: 100-continue the body is not even invited.
    status, body = await raw_request(
        api.base, head.replace("\r\n\r\n", "\r\nExpect: 100-continue\r\n\r\n")
    )
    assert_error(status, orjson.loads(body), 413, "payload_too_large")


async def test_streamed_upload_is_cut_off_at_the_limit(
    redis_url: str, database_url: str, pool: asyncpg.Pool
) -> None:
    limit = 1024**2
    async with running_api(redis_url, database_url, pool, MAX_UPLOAD_BYTES=str(limit)) as small:
        host, port = small.base.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            (
                "POST /api/v1/batches HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {small.admin}\r\n"
                "Content-Type: multipart/form-data; boundary=b\r\n"
                "Transfer-Encoding: chunked\r\n\r\n"
            ).encode()
        )
        sent = 0
        answer = asyncio.ensure_future(reader.readline())
        preamble = b'--b\r\nContent-Disposition: form-data; name="file"; filename="u.txt"\r\n\r\n'
        chunk = b"http://127.0.0.1/x.jpg\n" * 2800  # 64 KiB of a list that never ends
        for piece in [preamble] + [chunk] * 16384:  # up to 1 GiB, if nobody stopped us
            writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            sent += len(piece)
            try:
                await asyncio.wait_for(writer.drain(), timeout=5)
            except (ConnectionError, TimeoutError):
                break
            if answer.done():
                break
        status_line = await asyncio.wait_for(answer, timeout=10)
        writer.close()
        assert b" 413 " in status_line, status_line
        assert sent < 64 * limit, sent  # cut off near the limit, not after the whole stream
        # Nothing of the refused upload is kept.
        assert not await pool.fetchval(
            "SELECT count(*) FROM batches WHERE pipeline = $1", small.res.keys.prefix
        )


@pytest.mark.parametrize(
    ("data", "filename", "fields", "status", "code"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(64), "a.png", {}, 415, UNSUPPORTED),
        (b"PK\x03\x04" + bytes(64), "urls.xlsx", {}, 415, UNSUPPORTED),
        (b"", "empty.csv", {}, 400, "bad_request"),
        (b"url\nhttp://127.0.0.1/a.jpg\n", "u.csv", {"budget_usd": "lots"}, 400, "bad_request"),
        (b"url\nhttp://127.0.0.1/a.jpg\n", "u.csv", {"budget_usd": "-1"}, 400, "bad_request"),
        (b"url\nhttp://127.0.0.1/a.jpg\n", "u.csv", {"analyzer": "magic"}, 400, "bad_request"),
        (b"url\nhttp://127.0.0.1/a.jpg\n", "u.csv", {"colour": "red"}, 400, "bad_request"),
        (b"url\nhttp://127.0.0.1/a.jpg\n", "u.csv", {"long_side": "8"}, 400, "bad_request"),
        (b"url\nhttp://127.0.0.1/a.jpg\n", "u.csv", {"long_side": "big"}, 400, "bad_request"),
        (b"url\nhttp://127.0.0.1/a.jpg\n", "u.csv", {"mode": "batch"}, 400, "bad_request"),
        (b"url\nhttp://127.0.0.1/a.jpg\n", "u.csv", {"analyzer": "gemini", "mode": "cheap"}, 400, "bad_request"),
        (b"url\nhttp://127.0.0.1/a.jpg\n", "u.csv", {"analyzer": "openai", "model": "llava"}, 400, "bad_request"),
        (b"url\nhttp://127.0.0.1/a.jpg\n", "u.csv", {"analyzer": "anthropic", "model": "claude-9"}, 400, "bad_request"),
        (b"url\nhttp://127.0.0.1/a.jpg\n", "u.csv", {"analyzer": "anthropic", "profile": "nope"}, 400, "bad_request"),
    ],
)  # fmt: skip
async def test_bad_uploads_say_why(
    api: Api, data: bytes, filename: str, fields: dict[str, str], status: int, code: str
) -> None:
    got, body = await upload(api, data, filename=filename, **fields)
    assert_error(got, body, status, code)


async def test_batch_mode_is_kept_and_shown(api: Api) -> None:
    data = b"url\nhttp://127.0.0.1/a.jpg\n"
    status, created = await upload(api, data, analyzer="gemini", mode="batch")
    assert status == 201 and created["mode"] == "batch", created
    status, standard = await upload(api, data)
    assert status == 201 and standard["mode"] == "standard", standard
    for batch in (created, standard):
        status, _ = await post(api, f"/api/v1/batches/{batch['id']}/cancel")
        assert status in (200, 409)  # 409: it finished first


async def test_uploads_that_are_not_forms(api: Api) -> None:
    async with api.session(api.admin) as http:
        async with http.post("/api/v1/batches", data=b"url\nhttp://a/b.jpg\n") as r:
            assert_error(r.status, await r.json(), 415, "unsupported_media_type")
        form = aiohttp.MultipartWriter("form-data")
        form.append("no file").set_content_disposition("form-data", name="batch_name")
        async with http.post("/api/v1/batches", data=form) as r:
            assert_error(r.status, await r.json(), 400, "bad_request")


async def test_gzip_txt_and_jsonl_lists(api: Api, images: ImageServer) -> None:
    names = [s.name for s in SAMPLES[:3]]
    urls = [images.url(n) for n in names]
    cases = [
        (gzip.compress("\n".join(urls).encode()), "urls.txt.gz", "txt"),
        (b"\n".join(orjson.dumps({"url": u}) for u in urls), "u.jsonl", "jsonl"),
        (gzip.compress(listing(images, names)), "upload.bin", "csv"),  # format sniffed
    ]  # fmt: skip
    for data, filename, fmt in cases:
        status, created = await upload(api, data, filename=filename)
        assert status == 201, created
        assert created["source_format"] == fmt and created["upload_bytes"] == len(data)
        done = await finished(api, created["id"])
        assert done["state"] == "completed" and done["counts"]["succeeded"] == 3, done


# ------------------------------------------------------------------ a batch's life
async def events(api: Api, batch_id: str) -> list[tuple[str, Any]]:
    """Every server-sent event of a batch until its ``end`` event."""
    found: list[tuple[str, Any]] = []
    async with api.session(api.viewer) as http, http.get(f"/api/v1/batches/{batch_id}/events") as r:
        assert r.status == 200 and r.content_type == "text/event-stream"
        event = ""
        async for raw in r.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                found.append((event, orjson.loads(line[6:])))
                if event == "end":
                    break
    return found


async def test_a_batch_from_upload_to_export(api: Api, images: ImageServer) -> None:
    names = [s.name for s in SAMPLES[:12]] + ["flaky.jpg"]
    bad_rows = "ftp://127.0.0.1/x.jpg,BAD,x\nnot a url,BAD,y\n"
    status, created = await upload(
        api, listing(images, names, extra=bad_rows), batch_name="Spring catalogue"
    )
    assert status == 201 and created["name"] == "Spring catalogue" and created["state"] == "queued"
    batch_id = created["id"]

    # Live progress: status events until the end, with the pipeline beside them.
    seen = await events(api, batch_id)
    statuses = [data for event, data in seen if event == "status"]
    assert seen[-1] == ("end", {"state": "completed_with_errors"})
    assert any(event == "pipeline" and data["ok"] for event, data in seen)
    final = statuses[-1]
    assert final["progress"] == 100.0 and final["counts"]["succeeded"] == 12
    assert final["counts"]["failed"] == 1 and final["counts"]["invalid"] == 2
    assert final["errors"] == {"not_found": 1}
    assert [s["progress"] for s in statuses] == sorted(s["progress"] for s in statuses)
    assert api.app[FEEDS].watched == 0  # the poll loop ended with its last subscriber

    # Items: pages in input order, filters, one item with its history.
    _, page = await get(api, f"/api/v1/batches/{batch_id}/items?limit=5")
    assert [i["line"] for i in page["items"]] == [2, 3, 4, 5, 6] and page["next_after"] == 6
    _, rest = await get(api, f"/api/v1/batches/{batch_id}/items?limit=50&after=6")
    assert len(rest["items"]) == 8 and rest["next_after"] is None
    _, failed = await get(api, f"/api/v1/batches/{batch_id}/items?state=failed")
    (flaky,) = failed["items"]
    assert flaky["error_class"] == "not_found" and flaky["error_stage"] == "fetcher"
    _, ok = await get(api, f"/api/v1/batches/{batch_id}/items/{page['items'][1]['id']}")
    assert ok["result"]["width"] == SAMPLES[1].width and ok["result"]["analysis"]["phash"]
    assert ok["metadata"] == {"sku": "SKU-1", "note": "ok"} and ok["history"] == []

    # The validation report, as JSON pages and as a CSV file.
    _, report = await get(api, f"/api/v1/batches/{batch_id}/rejects")
    assert [r["line"] for r in report["rejects"]] == [15, 16] and report["total"] == 2
    _, report_csv = await get(api, f"/api/v1/batches/{batch_id}/rejects?format=csv")
    assert [r["line"] for r in csv.DictReader(io.StringIO(report_csv.decode()))] == ["15", "16"]

    # Replay by error class once the image is there: the failure stays in the history.
    images.routes["flaky.jpg"] = Reply(SAMPLES[0].data)
    status, replay = await post(
        api, f"/api/v1/batches/{batch_id}/replay", {"error_class": "not_found"}
    )
    assert status == 200 and replay["replayed"] == 1
    done = await finished(api, batch_id)
    assert done["state"] == "completed" and done["counts"]["failed"] == 0, done
    _, again = await get(api, f"/api/v1/batches/{batch_id}/items/{flaky['id']}")
    assert again["state"] == "succeeded" and again["result"] is not None
    assert [h["error_class"] for h in again["history"]] == ["not_found"]

    # Exports: every format, filters, the old path, a one-time download link.
    base = f"/api/v1/batches/{batch_id}/results"
    _, as_csv = await get(api, f"{base}?format=csv", api.viewer)
    rows = list(csv.DictReader(io.StringIO(as_csv.decode())))
    assert len(rows) == 13 and rows[0]["note"] == "'=2+3"
    _, legacy = await get(api, f"/api/v1/batch-data/export?format=csv&batch_id={batch_id}")
    assert legacy == as_csv
    _, as_json = await get(api, f"{base}?format=json&field=input.sku:eq:sku-3")
    assert [r["sku"] for r in as_json] == ["SKU-3"]
    _, lines = await get(api, f"{base}?format=jsonl&field=phash:exists")
    assert len(lines.splitlines()) == 13
    status, body = await get(api, f"{base}?format=pdf")
    assert_error(status, body, 400, "bad_request")
    status, body = await get(api, f"{base}?field=tags:like:x")
    assert_error(status, body, 400, "bad_request")
    status, link = await post(api, "/api/v1/downloads", {"path": f"{base}?format=xlsx"}, api.viewer)
    assert status == 201
    async with aiohttp.ClientSession(api.base) as http:  # no token: the link is the key
        async with http.get(link["url"]) as r:
            assert r.status == 200 and "attachment" in r.headers["Content-Disposition"]
            sheet = openpyxl.load_workbook(io.BytesIO(await r.read()))["results"]
        async with http.get(link["url"]) as r:
            assert_error(r.status, await r.json(), 404, "not_found")  # single use
    assert sheet.max_row == 14 and sheet["A1"].value == "url"


async def test_controls_and_delete(api: Api, images: ImageServer) -> None:
    names = [f"slow/{s.name}" for s in SAMPLES]
    status, created = await upload(api, listing(images, names))
    batch_id = created["id"]
    path = f"/api/v1/batches/{batch_id}"
    status, body = await post(api, f"{path}/resume")
    assert_error(status, body, 409, "conflict")  # not paused
    status, paused = await post(api, f"{path}/pause")
    assert status == 200 and paused == {"id": batch_id, "state": "paused"}
    _, view = await get(api, path)
    assert view["state"] == "paused" and view["state_reason"] == "paused by user"
    status, body = await delete(api, path)
    assert_error(status, body, 409, "conflict")  # active batches are cancelled first
    status, resumed = await post(api, f"{path}/resume")
    assert status == 200 and resumed["state"] in ("queued", "running")
    status, cancelled = await post(api, f"{path}/cancel")
    assert status == 200 and cancelled["state"] in ("cancelling", "cancelled")
    done = await finished(api, batch_id)
    assert done["state"] == "cancelled"
    status, deleted = await delete(api, path)
    assert status == 200 and deleted == {"id": batch_id, "deleted": True}
    status, body = await get(api, path)
    assert_error(status, body, 404, "not_found")


async def delete(api: Api, path: str) -> tuple[int, Any]:
    async with api.session(api.admin) as http, http.delete(path) as r:
        return r.status, await r.json()


async def test_subscribers_of_a_batch_share_one_poll_loop(api: Api, images: ImageServer) -> None:
    _, created = await upload(api, listing(images, [f"slow/{s.name}" for s in SAMPLES[:8]]))
    watchers = [asyncio.ensure_future(events(api, created["id"])) for _ in range(3)]

    async def all_connected() -> bool:
        return api.app[FEEDS].watched == 1 and all(not w.done() for w in watchers)

    await wait_for(all_connected, timeout=10)
    results = await asyncio.gather(*watchers)
    assert all(r[-1][0] == "end" for r in results)
    assert api.app[FEEDS].watched == 0


async def test_a_client_leaving_the_event_stream_ends_it_quietly(
    api: Api, images: ImageServer, caplog: pytest.LogCaptureFixture
) -> None:
    _, created = await upload(api, listing(images, [f"slow/{s.name}" for s in SAMPLES[:8]]))
    async with (
        api.session(api.viewer) as http,
        http.get(f"/api/v1/batches/{created['id']}/events") as r,
    ):
        assert (await r.content.readuntil(b"\n\n")).startswith(b"retry:")
        r.connection.transport.abort()  # type: ignore[union-attr]  # the browser tab closed

    async def unwatched() -> bool:
        return api.app[FEEDS].watched == 0

    # The server notices at its next write, then the feed of the batch stops.
    await wait_for(unwatched, timeout=10)
    assert not [r for r in caplog.records if r.exc_info], caplog.text
    assert "Cannot write to closing transport" not in caplog.text


async def test_status_places_in_flight_items_by_the_streams_that_hold_them(
    api: Api, pool: asyncpg.Pool
) -> None:
    """The ledger records only that an item is in flight; /status finds its stage in the
    batch's pipeline's streams (a pipeline without services here, so nothing moves)."""
    pipeline = f"held{uuid.uuid4().hex[:6]}"
    batch_id = await ledger.create_batch(pool, ledger.NewBatch(name="held", pipeline=pipeline))
    parser = ListParser(filename="u.txt")
    rows = parser.feed(b"".join(b"http://127.0.0.1:9/%d.png\n" % n for n in range(6)))
    async with pool.acquire() as conn:
        await ledger.insert_items(conn, batch_id, rows + parser.close())
        await ledger.start_batch(conn, batch_id)
        async with conn.transaction():
            claimed = await ledger.claim_pending(conn, batch_id, 4)
    ids = [r["id"] for r in claimed]
    keys = Keys(pipeline)
    try:
        await streams.append(
            api.res.redis,
            keys.fetch,
            [messages.encode(messages.FetchTask(batch_id=str(batch_id), item_id=ids[0], url="x"))],
        )
        written = messages.ItemResult(
            batch_id=str(batch_id), item_id=ids[1], status="failed", stage="fetcher"
        )
        other = messages.ItemResult(
            batch_id=str(uuid.uuid4()), item_id=1, status="failed", stage="x"
        )
        await streams.append(
            api.res.redis, keys.write, [messages.encode(written), messages.encode(other)]
        )
        status, body = await get(api, f"/api/v1/batches/{batch_id}/status", api.viewer)
        assert status == 200, body
        # 4 in flight: 1 in the fetch stream, 1 in the write stream, the other 2 between.
        assert body["stages"] == {"pending": 2, "fetching": 1, "analyzing": 2, "writing": 1}
    finally:
        for stream in keys.work_streams:
            await api.res.redis.delete(stream)


# ------------------------------------------------------------------ system and dead stream
async def test_system_status(api: Api) -> None:
    await api.res.redis.hset(
        api.res.keys.key_status("gemini"),
        "k-1a2b",
        orjson.dumps({"project": "p1", "state": "ok", "rpm": {"used": 12, "limit": 600}}),
    )

    async def four_stages() -> dict[str, Any] | None:
        _, body = await get(api, "/api/v1/system", api.viewer)
        return body if len(body["pipeline"]["services"]) >= 4 else None

    body = await wait_for(four_stages, timeout=20)
    assert body["redis"]["ok"] and body["postgres"]["ok"] and body["redis"]["version"]
    stages = {s["stage"]: s for s in body["pipeline"]["stages"]}
    assert set(stages) == {"ingest", "fetcher", "analyzer", "writer"}
    assert all(s["services"] >= 1 and s["capacity"] > 0 for s in stages.values())
    assert {s["stage"] for s in body["pipeline"]["services"]} == set(stages)
    offered = {p["name"]: p for p in body["providers"]}
    assert next(iter(offered)) == "local" and {"local", "gemini"} <= set(offered)
    assert offered["local"] == {
        "name": "local", "title": "Local (offline, free)", "paid": False,
        "modes": ["standard"], "keyed": False,
    }  # fmt: skip
    assert offered["gemini"]["modes"] == ["standard", "batch"]
    assert offered["anthropic"]["modes"] == ["standard", "batch"] and offered["anthropic"]["paid"]
    assert offered["gemini"]["keys"] == [
        {"key": "k-1a2b", "project": "p1", "state": "ok", "rpm": {"used": 12, "limit": 600}}
    ]
    status, ready = await get(api, "/readyz")
    assert status == 200 and ready["ready"] is True


async def test_dead_stream_replay_and_discard(api: Api, images: ImageServer) -> None:
    status, created = await upload(api, listing(images, ["flaky-dead.jpg"]))
    done = await finished(api, created["id"])
    assert done["counts"]["failed"] == 1
    _, failed = await get(api, f"/api/v1/batches/{created['id']}/items?state=failed")
    item = failed["items"][0]
    images.routes["flaky-dead.jpg"] = Reply(SAMPLES[2].data)
    task = messages.FetchTask(batch_id=created["id"], item_id=item["id"], url=item["url"])
    letter = messages.DeadLetter(
        stream=api.res.keys.fetch, entry_id="1-1", stage="fetcher", deliveries=6,
        reason="delivered 6 times without completing", payload=messages.encode(task),
    )  # fmt: skip
    await streams.append(api.res.redis, api.res.keys.dead, [messages.encode(letter)] * 2)
    _, dead = await get(api, "/api/v1/dead", api.viewer)
    assert dead["total"] == 2
    first = dead["entries"][0]
    assert first["stage"] == "fetcher" and first["message"]["item_id"] == item["id"]
    assert first["message"]["url"] == item["url"]
    status, body = await post(api, "/api/v1/dead/replay", {"ids": [first["id"]]}, api.viewer)
    assert_error(status, body, 403, "forbidden")
    status, result = await post(api, "/api/v1/dead/replay", {"ids": [first["id"]]})
    assert status == 200 and result["replayed"] == 1 and result["remaining"] == 1
    assert (await finished(api, created["id"]))["counts"]["succeeded"] == 1
    # The second letter is about an item that is no longer failed: replaying drops it.
    status, result = await post(api, "/api/v1/dead/replay", {"all": True})
    assert result == {"replayed": 0, "dropped": 1, "skipped": [], "remaining": 0}
    await streams.append(api.res.redis, api.res.keys.dead, [b"garbage"])
    _, dead = await get(api, "/api/v1/dead")
    status, result = await post(api, "/api/v1/dead/discard", {"ids": [dead["entries"][0]["id"]]})
    assert result == {"discarded": 1}
    status, body = await post(api, "/api/v1/dead/replay", {"ids": ["nonsense"]})
    assert_error(status, body, 400, "bad_request")


async def test_an_unknown_anthropic_model_is_refused_naming_the_known_ones(api: Api) -> None:
    data = b"url\nhttp://127.0.0.1/a.jpg\n"
    status, body = await upload(api, data, analyzer="anthropic", model="claude-9")
    assert_error(status, body, 400, "bad_request")
    message = body["error"]["message"]
    assert "claude-9" in message and "claude-haiku-4-5" in message and "\n" not in message
