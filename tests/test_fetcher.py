"""The fetcher stage end to end: the real stage loop (``fetcher.service.run``) reading
FetchTasks from Redis, fetching over real HTTP from servers on loopback, and handing
AnalyzeTasks / ItemResults on, against the real Redis and PostgreSQL.

Content is served on 127.0.0.2, and only 127.0.0.2/32 is allow-listed; a second server
on 127.0.0.1 serves the same image, so a guard that let 127.0.0.1 (or any spelling of it)
through would turn an expected ``blocked_address`` into a success. Forms of addresses
outside loopback are exercised in test_fetcher_netns.py, inside a network namespace.
"""

from __future__ import annotations

import asyncio
import io
import multiprocessing
import struct
import uuid
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from imagestream.common import ledger, messages, streams
from imagestream.common.connections import Resources
from imagestream.devtools import corpus
from imagestream.fetcher import service
from imagestream.fetcher.loader import ImageLoader
from imagestream.fetcher.settings import FetcherSettings

from .fetcher_servers import (
    Handler,
    RawServer,
    chunked,
    gzipped,
    redirect,
    reply,
    stall,
    trickle,
)
from .helpers import wait_for
from .procs import pool_workers_outliving

MAX_BYTES = 2_000_000
MAX_PIXELS = 4_000_000
USER_AGENT = "imagestream-test/1 (+fetcher tests)"
PHOTO = corpus.sample("photo.jpg", 1200, 900, seed=5).data
FRAME_COLOURS = [(220, 30, 30), (30, 220, 30), (30, 30, 220)]


def encode(im: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, fmt, **params)  # type: ignore[arg-type]
    return buffer.getvalue()


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (300, 200), c) for c in FRAME_COLOURS]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header claiming ``width`` x ``height`` pixels, in a few dozen bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


SVG = (
    b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="100" height="100">'
    b'<rect width="100" height="100" fill="red"/></svg>'
)
JPEG_START = PHOTO[:600]  # a real JPEG header: passes the early content check


def routes(loopback_port: int) -> dict[str, Handler | list[Handler]]:
    """Every scenario the stage must handle, by path on the 127.0.0.2 server."""
    over_cap = JPEG_START + bytes(MAX_BYTES + 100_000)
    return {
        # served
        "photo.jpg": reply(PHOTO),
        "png-as-text": reply(
            encode(Image.new("RGB", (500, 400), (10, 120, 200)), "PNG"), content_type="text/plain"
        ),
        "anim.gif": reply(animated_gif(), content_type="image/gif"),
        "photo.heic": reply(
            encode(Image.new("RGB", (640, 480), (200, 150, 40)), "HEIF"), content_type="image/heic"
        ),
        "gzip.jpg": gzipped(PHOTO),
        "chunked.jpg": chunked(PHOTO),
        "other-bot-noai": reply(PHOTO, headers={"X-Robots-Tag": "otherbot: noai, noimageai"}),
        "moved": redirect("/photo.jpg", status=301),
        # content
        "page.jpg": reply(b"<!DOCTYPE html><html><body>hi</body></html>" * 20),
        "logo.svg": reply(SVG, content_type="image/svg+xml"),
        "truncated.jpg": reply(PHOTO[: len(PHOTO) // 2]),
        "bomb-header.png": reply(png_claiming(100_000, 100_000), content_type="image/png"),
        "bomb.png": reply(encode(Image.new("L", (3000, 2000)), "PNG"), content_type="image/png"),
        # byte cap
        "big-declared": reply(over_cap),
        "big-chunked": chunked(over_cap),
        "big-no-length": reply(over_cap, length=None),
        "gzip-bomb": gzipped(JPEG_START + bytes(64 * 1024 * 1024)),
        "length-lie": reply(PHOTO + bytes(MAX_BYTES), length=1000),
        "short-body": reply(PHOTO[:5000], length=len(PHOTO)),
        # time
        "slow-loris": trickle(JPEG_START, every_s=0.1),
        "stall": stall(),
        # status
        "missing": reply(b"no", status=404, content_type="text/plain"),
        "error": reply(b"oops", status=500, content_type="text/plain"),
        # opt-out
        "noai": reply(PHOTO, headers={"X-Robots-Tag": "noai"}),
        "noai-scoped": reply(PHOTO, headers={"X-Robots-Tag": "imagestream: noimageai"}),
        "noai-list": reply(PHOTO, headers={"X-Robots-Tag": "noindex, NoAI"}),
        # redirects
        "to-loopback": redirect(f"http://127.0.0.1:{loopback_port}/photo.jpg"),
        "to-localhost": redirect(f"http://localhost:{loopback_port}/photo.jpg"),
        "to-integer": redirect(f"http://2130706433:{loopback_port}/photo.jpg"),
        "loop": redirect("/loop"),
        "to-ftp": redirect("ftp://127.0.0.2/photo.jpg"),
    }


# (path or absolute URL template, status, error class); {lo} is the 127.0.0.1 server's port.
EXPECTED: list[tuple[str, str, str | None]] = [
    ("photo.jpg", "succeeded", None),
    ("png-as-text", "succeeded", None),
    ("anim.gif", "succeeded", None),
    ("photo.heic", "succeeded", None),
    ("gzip.jpg", "succeeded", None),
    ("chunked.jpg", "succeeded", None),
    ("other-bot-noai", "succeeded", None),
    ("moved", "succeeded", None),
    ("page.jpg", "failed", "not_an_image"),
    ("logo.svg", "failed", "unsupported_format"),
    ("truncated.jpg", "failed", "decode_error"),
    ("bomb-header.png", "failed", "image_too_large"),
    ("bomb.png", "failed", "image_too_large"),
    ("big-declared", "failed", "too_large"),
    ("big-chunked", "failed", "too_large"),
    ("big-no-length", "failed", "too_large"),
    ("gzip-bomb", "failed", "too_large"),
    # A body longer than its Content-Length is a malformed response (never read past
    # the length); a shorter one is an interrupted transfer. Both are retried.
    ("length-lie", "failed", "connection_error"),
    ("short-body", "failed", "connection_error"),
    ("slow-loris", "failed", "timeout"),
    ("stall", "failed", "timeout"),
    ("missing", "failed", "not_found"),
    ("error", "failed", "http_server_error"),
    ("noai", "skipped", "opted_out"),
    ("noai-scoped", "skipped", "opted_out"),
    ("noai-list", "skipped", "opted_out"),
    ("to-loopback", "failed", "blocked_address"),
    ("to-localhost", "failed", "blocked_address"),
    ("to-integer", "failed", "blocked_address"),
    ("loop", "failed", "too_many_redirects"),
    ("to-ftp", "failed", "invalid_url"),
    # Refused address forms, all meaning this machine (the 127.0.0.1 server answers there).
    ("http://127.0.0.1:{lo}/photo.jpg", "failed", "blocked_address"),
    ("http://127.0.0.3:{lo}/photo.jpg", "failed", "blocked_address"),
    ("http://localhost:{lo}/photo.jpg", "failed", "blocked_address"),
    ("http://2130706433:{lo}/photo.jpg", "failed", "blocked_address"),
    ("http://0x7f000001:{lo}/photo.jpg", "failed", "blocked_address"),
    ("http://0x7f.1:{lo}/photo.jpg", "failed", "blocked_address"),
    ("http://017700000001:{lo}/photo.jpg", "failed", "blocked_address"),
    ("http://0177.0.0.1:{lo}/photo.jpg", "failed", "blocked_address"),
    ("http://127.1:{lo}/photo.jpg", "failed", "blocked_address"),
    ("http://127.0.1:{lo}/photo.jpg", "failed", "blocked_address"),
    ("http://127.0.0.2.:{lo}/photo.jpg", "failed", "blocked_address"),
    ("http://0.0.0.0:{lo}/photo.jpg", "failed", "blocked_address"),
    ("http://[::1]:{lo}/photo.jpg", "failed", "blocked_address"),
    ("http://[::]:{lo}/photo.jpg", "failed", "blocked_address"),
    ("http://[::ffff:127.0.0.1]:{lo}/photo.jpg", "failed", "blocked_address"),
    ("http://[::ffff:7f00:1]:{lo}/photo.jpg", "failed", "blocked_address"),
    ("file:///etc/passwd", "failed", "invalid_url"),
]


@dataclass
class Stage:
    res: Resources
    server: RawServer
    loopback: RawServer
    batch_id: str
    task: asyncio.Task[None]
    next_item: int = 0

    def url(self, target: str) -> str:
        if "://" in target:
            return target.format(lo=self.loopback.port)
        return self.server.url(target)

    async def run(
        self, targets: list[str], batch_id: str | None = None
    ) -> dict[int, messages.ItemResult | messages.AnalyzeTask]:
        """Feed one FetchTask per target; the outcome of each, by item id."""
        first = self.next_item
        self.next_item += len(targets)
        tasks = [
            messages.FetchTask(
                batch_id=batch_id or self.batch_id, item_id=first + i, url=self.url(t)
            )
            for i, t in enumerate(targets)
        ]
        await streams.append(
            self.res.redis, self.res.keys.fetch, [messages.encode(t) for t in tasks]
        )
        wanted = {t.item_id for t in tasks}

        async def outcomes() -> dict[int, messages.ItemResult | messages.AnalyzeTask] | None:
            found: dict[int, messages.ItemResult | messages.AnalyzeTask] = {}
            for stream, decoder in (
                (self.res.keys.write, messages.result_decoder),
                (self.res.keys.analyze, messages.analyze_decoder),
            ):
                for entry in await streams.read_range(self.res.redis, stream, "-", 10_000):
                    assert entry.payload is not None
                    message: messages.ItemResult | messages.AnalyzeTask = decoder.decode(
                        entry.payload
                    )
                    if message.item_id in wanted:
                        assert message.item_id not in found, "one outcome per item"
                        found[message.item_id] = message
            return found if len(found) == len(wanted) else None

        found = await wait_for(outcomes, timeout=60, interval=0.1)
        assert not self.task.done(), "the stage stopped"
        return {item - first: message for item, message in found.items()}


def settings_for(prefix: str) -> FetcherSettings:
    return FetcherSettings(
        redis_prefix=prefix,
        fetch_allowed_cidrs=("127.0.0.2/32",),
        fetch_user_agent=USER_AGENT,
        fetch_attempts=2,
        fetch_backoff_s=0.05,
        fetch_max_bytes=MAX_BYTES,
        fetch_max_pixels=MAX_PIXELS,
        fetch_read_timeout_s=0.5,
        fetch_total_timeout_s=1.5,
        fetch_connect_timeout_s=2.0,
        fetch_max_redirects=3,
        read_block_ms=100,
        claim_idle_ms=10_000,
        claim_interval_s=0.5,
        shutdown_grace_s=2.0,
        metrics_port=-1,
    )


@pytest.fixture
async def stage(res: Resources, prefix: str) -> AsyncIterator[Stage]:
    loopback = await RawServer({"photo.jpg": reply(PHOTO)}, host="127.0.0.1").start()
    server = await RawServer(routes(loopback.port)).start()
    batch_id = await ledger.create_batch(res.pool, ledger.NewBatch(name="fetch", pipeline=prefix))
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(res, settings_for(prefix), stop))
    try:
        yield Stage(res, server, loopback, str(batch_id), task)
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        await server.stop()
        await loopback.stop()


async def blob_image(res: Resources, message: messages.AnalyzeTask) -> Image.Image:
    data = await res.redis.get(message.blob_key)
    assert data is not None, "the analysis image is in Redis"
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


async def test_every_outcome_has_its_state_and_error_class(stage: Stage) -> None:
    targets = [target for target, _, _ in EXPECTED]
    outcomes = await stage.run(targets)
    for i, (target, status, error_class) in enumerate(EXPECTED):
        message = outcomes[i]
        if status == "succeeded":
            assert isinstance(message, messages.AnalyzeTask), (target, message)
        else:
            assert isinstance(message, messages.ItemResult), (target, message)
            assert (message.status, message.error_class) == (status, error_class), target
            assert message.error_message, target
    # Nothing reached the 127.0.0.1 server, by whatever spelling or redirect.
    assert stage.loopback.hits == {}
    # Transient errors were retried (FETCH_ATTEMPTS=2); permanent ones were not.
    assert stage.server.hits["error"] == 2
    assert stage.server.hits["missing"] == 1
    # Opted-out items are skipped on the headers; the redirect loop stopped at the cap.
    assert stage.server.hits["loop"] == 4
    assert stage.server.user_agents == {USER_AGENT}

    by_target = dict(zip(targets, (outcomes[i] for i in range(len(targets))), strict=True))
    photo = by_target["photo.jpg"]
    assert isinstance(photo, messages.AnalyzeTask)
    assert (photo.facts.width, photo.facts.height, photo.facts.format) == (1200, 900, "JPEG")
    assert (await blob_image(stage.res, photo)).size == (768, 576)
    png = by_target["png-as-text"]
    assert isinstance(png, messages.AnalyzeTask) and png.facts.format == "PNG"
    gif = by_target["anim.gif"]
    assert isinstance(gif, messages.AnalyzeTask) and gif.facts.frames == 3
    first = (await blob_image(stage.res, gif)).convert("RGB").getpixel((150, 100))
    assert isinstance(first, tuple)
    assert all(abs(a - b) < 12 for a, b in zip(first, FRAME_COLOURS[0], strict=True)), first
    heic = by_target["photo.heic"]
    assert isinstance(heic, messages.AnalyzeTask) and heic.facts.format == "HEIF"
    for same in ("gzip.jpg", "chunked.jpg", "other-bot-noai", "moved"):
        message = by_target[same]
        assert isinstance(message, messages.AnalyzeTask)
        assert message.facts.sha256 == photo.facts.sha256, same

    # The stage keeps serving after all of that.
    again = await stage.run(["photo.jpg", "png-as-text"])
    assert all(isinstance(m, messages.AnalyzeTask) for m in again.values())


async def test_the_batch_chooses_the_analysis_size(stage: Stage) -> None:
    small = await ledger.create_batch(
        stage.res.pool,
        ledger.NewBatch(name="small", pipeline=stage.res.keys.prefix, options={"long_side": 512}),
    )
    bad = await ledger.create_batch(
        stage.res.pool,
        ledger.NewBatch(name="bad", pipeline=stage.res.keys.prefix, options={"long_side": "x"}),
    )
    outcome = (await stage.run(["photo.jpg"], batch_id=str(small)))[0]
    assert isinstance(outcome, messages.AnalyzeTask)
    # The result reports the original's size; the analyzer gets the batch's size.
    assert (outcome.facts.width, outcome.facts.height) == (1200, 900)
    assert (await blob_image(stage.res, outcome)).size == (512, 384)
    assert outcome.blob_key.endswith(":512")
    failed = (await stage.run(["photo.jpg"], batch_id=str(bad)))[0]
    assert isinstance(failed, messages.ItemResult)
    assert (failed.status, failed.error_class) == ("failed", "internal_error")
    assert uuid.UUID(failed.batch_id) == bad


async def test_a_dead_decode_worker_is_replaced(tmp_path: Path) -> None:
    """A decoder that crashes (here: its process is killed) costs a pool, not the service."""
    path = tmp_path / "photo.jpg"
    path.write_bytes(PHOTO)
    before = {p.pid for p in multiprocessing.active_children()}
    loader = ImageLoader(FetcherSettings(fetch_allow_file=True, decode_workers=2))
    try:
        first = await loader.load(path.as_uri(), 768)
        broken = loader.pool
        workers = [p for p in multiprocessing.active_children() if p.pid not in before]
        assert workers, "the decode pool runs in worker processes"
        for worker in workers:
            worker.kill()
            worker.join()
        again = await loader.load(path.as_uri(), 768)
    finally:
        await loader.close()
    assert loader.pool is not broken
    assert again.data == first.data and again.facts == first.facts


async def test_decode_workers_end_when_their_fetcher_is_killed() -> None:
    """A SIGKILLed fetcher never stops its decode pool: the workers notice they lost their
    parent and exit instead of idling on forever (the chaos test kills fetchers so)."""
    script = (
        "import asyncio, os\n"
        "from imagestream.fetcher.loader import ImageLoader\n"
        "from imagestream.fetcher.settings import FetcherSettings\n"
        "async def main():\n"
        "    loader = ImageLoader(FetcherSettings(decode_workers=2))\n"
        "    loop = asyncio.get_running_loop()\n"
        "    await asyncio.gather(*(loop.run_in_executor(loader.pool, os.getpid) for _ in range(4)))\n"
        "    print('ready', flush=True)\n"
        "    await asyncio.sleep(600)\n"
        "if __name__ == '__main__':\n"
        "    asyncio.run(main())\n"
    )
    assert await pool_workers_outliving(script, least=1) == []
