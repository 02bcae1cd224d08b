"""``imagestream demo``: the first thing a new user runs.

Serves the bundled sample images on 127.0.0.1, writes a list of their URLs (plus one
missing image and one web page pretending to be a JPEG), runs ``analyze`` on it and shows
the results.
"""

from __future__ import annotations

import asyncio
import csv
import tempfile
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web

from . import local

_NOT_AN_IMAGE = b"<!doctype html><html><body>Sorry, this page moved.</body></html>"


async def serve_samples() -> tuple[web.AppRunner, str, list[str]]:
    samples = resources.files("imagestream.cli").joinpath("samples")
    names = sorted(p.name for p in samples.iterdir() if p.name.endswith((".jpg", ".png")))

    async def sample(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in names:
            raise web.HTTPNotFound()
        media = "image/png" if name.endswith(".png") else "image/jpeg"
        return web.Response(body=samples.joinpath(name).read_bytes(), content_type=media)

    async def fake(_: web.Request) -> web.Response:
        return web.Response(body=_NOT_AN_IMAGE, content_type="image/jpeg")

    app = web.Application()
    app.add_routes([web.get("/images/moved.jpg", fake), web.get("/images/{name}", sample)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}", names


async def demo(env: Mapping[str, str], stop: asyncio.Event) -> int:
    runner, base, names = await serve_samples()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            listing = Path(tmp) / "demo-images.csv"
            with listing.open("w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["url", "title"])
                for name in names:
                    writer.writerow([f"{base}/images/{name}", name.rsplit(".", 1)[0]])
                writer.writerow([f"{base}/images/missing.jpg", "an image that is not there"])
                writer.writerow([f"{base}/images/moved.jpg", "a web page served as image/jpeg"])
            output = Path.cwd() / "imagestream-demo-results.csv"
            # The samples are served on loopback, which the fetcher refuses by default.
            demo_env = {**env, "FETCH_ALLOWED_CIDRS": "127.0.0.1/32"}
            options = local.RunOptions(input=str(listing), output=str(output), name="demo")
            report = await local.analyze(demo_env, options, stop)
    finally:
        await runner.cleanup()
    print(_table(output))
    print(local.summary(report))
    print(
        "\nNext: `imagestream analyze your-list.csv -o results.xlsx` for your own images,"
        " or `imagestream up` for the dashboard on http://127.0.0.1:5001/."
    )
    return 0


def _table(path: Path) -> str:
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    lines = [f"{'title':<26} {'status':<10} {'size':>9}  details"]
    for row in rows:
        lines.append(
            f"{row['title'][:26]:<26} {row['status']:<10} {_size(row):>9}  {_details(row)}"
        )
    return "\n".join(lines)


def _size(row: dict[str, Any]) -> str:
    return f"{row['width']}x{row['height']}" if row["width"] else "-"


def _details(row: dict[str, Any]) -> str:
    if row["status"] != "succeeded":
        return f"{row['error_class']}: {row['error_message']}"
    parts = [row["format"]]
    for field, label in (
        ("analysis.brightness", "brightness"),
        ("analysis.sharpness", "sharpness"),
        ("analysis.is_blurry", "blurry"),
        ("analysis.is_blank", "blank"),
    ):
        if row.get(field) not in (None, ""):
            parts.append(f"{label} {row[field]}")
    return ", ".join(parts)
