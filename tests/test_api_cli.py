"""``imagestream submit / status / pause / resume / cancel / replay / export`` against a
running api (URL and token from the environment), as scripts use them."""

from __future__ import annotations

import asyncio
import csv
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import openpyxl
import pytest

from imagestream.devtools import corpus
from imagestream.devtools.imageserver import ImageServer, Reply

from .apiharness import Api, running_api
from .helpers import wait_for

SAMPLES = corpus.mixed(6, sizes=((40, 30), (80, 60)), formats=("JPEG",), seed=5)


@pytest.fixture(scope="module")
async def images() -> AsyncIterator[ImageServer]:
    routes = {s.name: Reply(s.data) for s in SAMPLES}
    # Two seconds a download, two at a time: forty of them outlast four CLI calls however
    # slow a loaded machine starts them (0.2 s did not: the batch ended before its pause).
    routes |= {f"slow/{s.name}": Reply(s.data, drip_s=2.0) for s in SAMPLES}
    server = ImageServer(routes)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(scope="module")
async def api(redis_url: str, database_url: str, pool: asyncpg.Pool) -> AsyncIterator[Api]:
    async with running_api(redis_url, database_url, pool, stages=True, FETCH_PER_HOST="2") as api:
        yield api


async def cli(api: Api, *args: str, token: str | None = None) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGESTREAM_")}
    env |= {
        "IMAGESTREAM_URL": api.base,
        "IMAGESTREAM_TOKEN": token if token is not None else api.admin,
    }
    env["IMAGESTREAM_ENV_FILE"] = "/nonexistent"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "imagestream.cli", *args, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_submit_watch_replay_export(api: Api, images: ImageServer, tmp_path: Path) -> None:
    listing = tmp_path / "urls.csv"
    rows = [f"{images.url(s.name)},=SUM(A1)" for s in SAMPLES] + [f"{images.url('late.jpg')},x"]
    listing.write_text("url,label\n" + "\n".join(rows) + "\n")
    code, out, err = await cli(api, "submit", str(listing), "--name", "from the CLI", "--wait")
    assert code == 0, err
    batch_id = out.strip()
    assert len(batch_id) == 36 and "6 succeeded, 1 failed" in err, err
    code, out, err = await cli(api, "status", batch_id)
    assert code == 0 and "completed_with_errors" in out and "not_found 1" in out, out
    images.routes["late.jpg"] = Reply(SAMPLES[0].data)
    code, out, err = await cli(api, "replay", batch_id, "--error-class", "not_found")
    assert code == 0 and "1 failed image(s) sent through again" in out, out + err

    async def completed() -> bool:
        async with api.session(api.viewer) as http, http.get(f"/api/v1/batches/{batch_id}") as r:
            return bool((await r.json())["state"] == "completed")

    await wait_for(completed, timeout=60, interval=0.2)
    code, out, _ = await cli(api, "status", batch_id, "--json")
    assert '"failed": 0' in out and '"succeeded": 7' in out, out
    target = tmp_path / "results.xlsx"
    code, out, err = await cli(api, "export", batch_id, "-o", str(target))
    assert code == 0, err
    sheet = openpyxl.load_workbook(target)["results"]
    assert sheet.max_row == 8 and sheet["B2"].value == "succeeded"
    label = [c.value for c in sheet[1]].index("label")
    assert {r[label] for r in sheet.iter_rows(min_row=2, values_only=True)} == {"'=SUM(A1)", "x"}
    failed_csv = tmp_path / "failed.csv"
    code, _, err = await cli(api, "export", batch_id, "-o", str(failed_csv), "--state", "failed")
    assert code == 0, err
    assert list(csv.DictReader(failed_csv.open(newline=""))) == []


async def test_pause_resume_cancel(api: Api, images: ImageServer, tmp_path: Path) -> None:
    listing = tmp_path / "slow.txt"
    urls = [images.url(f"slow/{SAMPLES[i % 6].name}?copy={i}") for i in range(40)]
    listing.write_text("\n".join(urls) + "\n")
    code, out, err = await cli(api, "submit", str(listing))
    assert code == 0, err
    batch_id = out.strip()
    code, out, _ = await cli(api, "pause", batch_id)
    assert (code, out.strip()) == (0, f"batch {batch_id}: paused")
    code, out, _ = await cli(api, "resume", batch_id)
    assert code == 0 and out.strip().startswith(f"batch {batch_id}: ")
    code, out, _ = await cli(api, "cancel", batch_id)
    assert code == 0 and ("cancelling" in out or "cancelled" in out), out


async def test_errors_are_one_line(api: Api, tmp_path: Path) -> None:
    code, _, err = await cli(api, "status", "00000000-0000-0000-0000-000000000000")
    assert code == 1 and err.startswith("imagestream: no batch") and "[HTTP 404]" in err
    assert "Traceback" not in err
    code, _, err = await cli(api, "pause", "00000000-0000-0000-0000-000000000000", token="")
    assert code == 1 and "set IMAGESTREAM_TOKEN" in err and "[HTTP 401]" in err
    code, _, err = await cli(api, "submit", str(tmp_path / "missing.csv"))
    assert code == 1 and "is not a file" in err
    code, _, err = await cli(api, "export", "x", "-o", str(tmp_path / "out.pdf"))
    assert code == 1 and "cannot tell the export format" in err
    listing = tmp_path / "viewer.csv"
    listing.write_text("url\nhttp://127.0.0.1:9/a.jpg\n")
    code, _, err = await cli(api, "submit", str(listing), token=api.viewer)
    assert code == 1 and "admin token" in err and "[HTTP 403]" in err
