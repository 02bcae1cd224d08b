"""The whole pipeline, each stage its own process, against the real Redis and PostgreSQL.

300 images of known sizes and formats plus broken URLs go in through the api; every URL
must end in exactly one terminal state with the right facts or error class, and the CSV
export must have one row per URL with the input's extra columns. The same list through
``imagestream analyze`` must give the same results.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from imagestream.common import tokens
from imagestream.devtools import corpus
from imagestream.devtools.imageserver import ImageServer, Reply

from .helpers import wait_for, wait_ready
from .procs import Fleet, free_port, service_env

FORMATS = ("JPEG", "PNG", "GIF", "WEBP")
MEDIA = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp"}


@dataclass
class Corpus:
    server: ImageServer
    listing: bytes
    expected: dict[str, dict[str, object]]  # url -> expected outcome


@pytest.fixture(scope="module")
async def served() -> AsyncIterator[Corpus]:
    routes: dict[str, Reply] = {}
    samples = corpus.mixed(300, sizes=((40, 30), (900, 700)), formats=FORMATS, seed=7)
    for s in samples:
        routes[s.name] = Reply(s.data, content_type=MEDIA[s.format])
    jpeg = samples[0].data
    routes["broken/truncated.jpg"] = Reply(jpeg[: len(jpeg) // 2])
    routes["broken/page.jpg"] = Reply(
        b"<!DOCTYPE html><html><body>hello</body></html>", content_type="image/jpeg"
    )
    routes["broken/notes.jpg"] = Reply(
        b"just some text, not an image at all" * 4, content_type="text/plain"
    )
    routes["broken/error.jpg"] = Reply(b"oops", status=500, content_type="text/plain")
    server = ImageServer(routes)
    await server.start()

    expected: dict[str, dict[str, object]] = {}
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["url", "sku", "color"])
    for i, s in enumerate(samples):
        url = server.url(s.name)
        writer.writerow([url, f"SKU-{i:04d}", ["red", "green", "=1+2"][i % 3]])
        expected[url] = {
            "status": "succeeded",
            "width": s.width,
            "height": s.height,
            "format": s.format,
            "bytes": len(s.data),
        }
    for path, error in [
        ("missing/a.jpg", "not_found"),
        ("missing/b.png", "not_found"),
        ("broken/truncated.jpg", "decode_error"),
        ("broken/page.jpg", "not_an_image"),
        ("broken/notes.jpg", "not_an_image"),
        ("broken/error.jpg", "http_server_error"),
    ]:
        writer.writerow([server.url(path), "SKU-BAD", "none"])
        expected[server.url(path)] = {"status": "failed", "error_class": error}
    # An in-batch duplicate and an invalid row: counted, not processed twice.
    writer.writerow([server.url(samples[0].name), "SKU-DUP", "dup"])
    writer.writerow(["ftp://example.invalid/x.jpg", "SKU-FTP", "bad"])
    yield Corpus(server, out.getvalue().encode(), expected)
    await server.stop()


def check_rows(rows: list[dict[str, str]], served: Corpus) -> None:
    by_url = {r["url"]: r for r in rows}
    assert len(rows) == len(served.expected) == len(by_url), "one row per URL"
    for url, want in served.expected.items():
        row = by_url[url]
        assert row["status"] == want["status"], (url, row)
        if want["status"] == "succeeded":
            assert (int(row["width"]), int(row["height"]), row["format"]) == (
                want["width"],
                want["height"],
                want["format"],
            ), url
            assert int(row["bytes"]) == want["bytes"]
            assert len(row["sha256"]) == 64
            assert row["analysis.phash"] and row["analysis.brightness"]
            assert row["error_class"] == ""
        else:
            assert row["error_class"] == want["error_class"], (url, row)
            assert row["error_message"]
        assert row["sku"].startswith("SKU-") and row["color"]
    # Exports never carry a live formula.
    assert all(not r["color"].startswith("=") for r in rows)
    assert any(r["color"] == "'=1+2" for r in rows)


@dataclass
class ServicesRun:
    status: dict[str, object]
    rows: list[dict[str, str]]
    legacy_rows: list[dict[str, str]]
    states: dict[str, int]
    result_rows: int
    exit_codes: dict[str, int]
    logs: str


@pytest.fixture(scope="module")
async def services_run(
    served: Corpus,
    redis_url: str,
    database_url: str,
    pool: asyncpg.Pool,
    tmp_path_factory: pytest.TempPathFactory,
) -> ServicesRun:
    """Upload the list to separately started services and collect what they produced."""
    prefix = f"e2e{os.getpid()}"
    api_port = free_port()
    logs = tmp_path_factory.mktemp("services")
    fleet = Fleet(service_env(redis_url, database_url, prefix, API_PORT=str(api_port)), logs)
    for stage in ("api", "ingest", "fetcher", "analyzer", "writer"):
        fleet.start(stage)
    _, secret = await tokens.create(pool, "e2e", "admin")
    base = f"http://127.0.0.1:{api_port}"
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {secret}"}) as http:
            await wait_ready(base)
            form = aiohttp.FormData()
            form.add_field("file", served.listing, filename="images.csv", content_type="text/csv")
            form.add_field("batch_name", "e2e")
            async with http.post(f"{base}/api/v1/batches", data=form) as r:
                assert r.status == 201, await r.text()
                batch_id = (await r.json())["id"]

            async def finished() -> dict[str, object] | None:
                async with http.get(f"{base}/api/v1/batches/{batch_id}/status") as r:
                    body: dict[str, object] = await r.json()
                return body if body["state"] not in ("queued", "running") else None

            status = await wait_for(finished, timeout=240, interval=0.5)
            async with http.get(f"{base}/api/v1/batches/{batch_id}/results?format=csv") as r:
                assert r.status == 200 and r.headers["Content-Type"].startswith("text/csv")
                rows = list(csv.DictReader(io.StringIO(await r.text())))
            async with http.get(
                f"{base}/api/v1/batch-data/export?format=csv&batch_id={batch_id}"
            ) as r:
                legacy_rows = list(csv.DictReader(io.StringIO(await r.text())))
        states = await pool.fetch(
            "SELECT state, count(*) AS n FROM items WHERE batch_id = $1 GROUP BY state",
            uuid.UUID(batch_id),
        )
        result_rows = await pool.fetchval(
            "SELECT count(*) FROM results r JOIN items i ON i.id = r.item_id WHERE i.batch_id = $1",
            uuid.UUID(batch_id),
        )
    finally:
        codes = fleet.stop_all()
    return ServicesRun(
        status,
        rows,
        legacy_rows,
        {r["state"]: r["n"] for r in states},
        result_rows,
        codes,
        fleet.logs_text(),
    )


def test_services_as_processes(served: Corpus, services_run: ServicesRun) -> None:
    status = services_run.status
    counts = status["counts"]
    assert isinstance(counts, dict)
    assert status["state"] == "completed_with_errors"
    assert counts["total"] == len(served.expected)
    assert (counts["succeeded"], counts["failed"], counts["skipped"]) == (300, 6, 0)
    assert (counts["duplicates"], counts["invalid"], counts["remaining"]) == (1, 1, 0)
    assert status["progress"] == 100.0
    assert status["errors"] == {
        "not_found": 2,
        "not_an_image": 2,
        "decode_error": 1,
        "http_server_error": 1,
    }
    check_rows(services_run.rows, served)
    assert services_run.legacy_rows == services_run.rows  # the old system's export path
    # Ledger: every item terminal, exactly one result row per succeeded item.
    assert services_run.states == {"succeeded": 300, "failed": 6}
    assert services_run.result_rows == 300
    # Every service stopped cleanly on SIGTERM.
    assert all(code == 0 for code in services_run.exit_codes.values()), services_run.exit_codes
    where = services_run.logs.find("Traceback")
    assert where < 0, services_run.logs[max(0, where - 1500) : where + 2500]


async def test_analyze_cli_gives_the_same_results(
    served: Corpus, services_run: ServicesRun, redis_url: str, database_url: str, tmp_path: Path
) -> None:
    listing = tmp_path / "images.csv"
    listing.write_bytes(served.listing)
    output = tmp_path / "results.csv"
    env = service_env(redis_url, database_url, "is")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "imagestream.cli",
        "analyze",
        str(listing),
        "-o",
        str(output),
        "--no-progress",
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=300)
    assert proc.returncode == 0, stderr.decode()[-3000:]
    text = stdout.decode()
    assert "300 succeeded, 6 failed" in text, text
    assert "duplicate URLs dropped: 1, invalid rows: 1" in text, text
    rows = list(csv.DictReader(output.open(newline="")))
    check_rows(rows, served)
    # Same list, same results: every column of every row (facts and analysis), the
    # analyses this time from the durable cache (the services' run analyzed the same bytes).
    assert {r["cache_hit"] for r in rows if r["status"] == "succeeded"} == {"true"}

    def comparable(found: list[dict[str, str]]) -> list[dict[str, str]]:
        # A duplicate group is named by an item id, and the two batches' ids differ: name it
        # by its first member's URL instead, so the groups themselves are compared.
        first_url: dict[str, str] = {}
        for r in sorted(found, key=lambda r: r["url"]):
            first_url.setdefault(r["duplicate_group"], r["url"])
        return sorted(
            (
                {**r, "cache_hit": "", "duplicate_group": first_url[r["duplicate_group"]]}
                if r["duplicate_group"]
                else {**r, "cache_hit": ""}
                for r in found
            ),
            key=lambda r: r["url"],
        )

    assert comparable(rows) == comparable(services_run.rows)
