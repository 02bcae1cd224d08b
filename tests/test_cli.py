"""The local command line: analyzing a folder of images, and one-line errors for bad input."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import asyncpg
import orjson
import pyarrow.parquet as pq
import pytest

from imagestream.common import webhooks
from imagestream.devtools import corpus, text_images

from .procs import free_port, service_env
from .webhook_receiver import Receiver, receiving


async def imagestream(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "imagestream.cli", *args,
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout=180)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_analyze_a_folder_of_images(
    redis_url: str, database_url: str, prefix: str, tmp_path: Path
) -> None:
    photos = tmp_path / "photos"
    (photos / "nested").mkdir(parents=True)
    expected = {}
    for i, (w, h, fmt) in enumerate([(320, 200, "JPEG"), (90, 160, "PNG"), (640, 480, "WEBP")]):
        sample = corpus.sample("x", w, h, fmt, seed=i)
        path = (photos if i else photos / "nested") / f"p{i}.{fmt.lower()}"
        path.write_bytes(sample.data)
        expected[path.resolve().as_uri()] = (w, h, fmt)
    (photos / "notes.txt").write_text("not an image, and not listed")
    broken = photos / "broken.jpg"
    broken.write_bytes(b"<html>not really a jpeg</html>")
    output = tmp_path / "out.jsonl"
    code, out, err = await imagestream(
        service_env(redis_url, database_url, prefix),
        "analyze",
        str(photos),
        "-o",
        str(output),
        "--no-progress",
    )
    assert code == 0, err
    assert "4 images: 3 succeeded, 1 failed" in out, out
    rows = {r["url"]: r for r in map(orjson.loads, output.read_text().splitlines())}
    assert set(rows) == {*expected, broken.resolve().as_uri()}
    for url, (w, h, fmt) in expected.items():
        assert (
            rows[url]["status"],
            rows[url]["width"],
            rows[url]["height"],
            rows[url]["format"],
        ) == (
            "succeeded",
            w,
            h,
            fmt,
        )
    assert rows[broken.resolve().as_uri()]["error_class"] == "not_an_image"


async def test_analyze_with_the_content_profile(
    redis_url: str, database_url: str, prefix: str, tmp_path: Path
) -> None:
    """Text read and NSFW scored through the whole pipeline, on the analysis image the
    content profile asks the fetcher for (1280 px from a 2560-px original)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    sign = text_images.text_photo(2560, 1706, 11, sizes=(80, 120), angles=(0.0, 10.0))
    sign.image.save(photos / "sign.jpg", quality=90)
    corpus.scene(900, 600, seed=2).save(photos / "plain.png")
    output = tmp_path / "out.parquet"  # typed columns from the profile's JSON Schema
    env = service_env(redis_url, database_url, prefix, LOCAL_MODELS="true")
    code, out, err = await imagestream(
        env, "analyze", str(photos), "--profile", "content", "-o", str(output), "--no-progress"
    )
    assert code == 0, err
    assert "2 images: 2 succeeded" in out, out
    table = pq.read_table(output)
    assert str(table.schema.field("analysis.text_lines").type) == (
        "list<element: struct<box: list<element: list<element: int64>>,"
        " text: string, confidence: double>>"
    )
    assert str(table.schema.field("analysis.nsfw").type) == "bool"
    rows = {Path(r["url"]).name: r for r in table.to_pylist()}
    text = rows["sign.jpg"]["analysis.text"]
    assert text_images.found(sign.words, text) == [w.text for w in sign.words], text
    assert rows["sign.jpg"]["analysis.has_text"] is True
    for line in rows["sign.jpg"]["analysis.text_lines"]:  # in the original's pixels
        assert all(0 <= x <= 2560 and 0 <= y <= 1706 for x, y in line["box"]), line
    assert max(x for line in rows["sign.jpg"]["analysis.text_lines"] for x, _ in line["box"]) > 1280
    assert rows["plain.png"]["analysis.has_text"] is False
    for row in rows.values():
        assert row["analysis.nsfw"] is False and row["analysis.nsfw_score"] < 0.5
        assert row["analysis.phash"]  # the facts are there too


@pytest.mark.parametrize(
    ("args", "env_changes", "code", "message"),
    [
        (["analyze", "missing.csv", "-o", "x.csv"], {}, 2, "missing.csv does not exist"),
        (["analyze", "{list}", "-o", "out.pdf"], {}, 2, "cannot tell the export format"),
        (["analyze", "{list}", "-o", "x.csv"], {"MAX_DELIVERIES": "zero"}, 2, "invalid setting MAX_DELIVERIES"),
        (["analyze", "{list}", "-o", "x.csv"], {"DATABASE_URL": "postgresql://nobody:secret@127.0.0.1:{port}/x"}, 1, "cannot reach PostgreSQL"),
        (["analyze", "{list}", "-o", "x.csv", "--analyzer", "magic"], {}, 2, "analyzer must be one of"),
        (["analyze", "{list}", "--webhook-url", "http://10.0.0.1/h"], {}, 2, "webhook: address 10.0.0.1 is not public"),
        (["analyze", "{list}", "-o", "x.csv", "--long-side", "5"], {}, 2, "long_side must be"),
        (["analyze", "{list}", "-o", "x.csv", "--profile", "describe"], {}, 2, "local profile must be one of facts, content"),
        (["analyze", "{list}", "-o", "x.csv", "--model", "gpt-4o"], {}, 2, "the local analyzer takes no model"),
        (["analyze", "{list}", "-o", "x.csv", "--mode", "batch"], {}, 2, "mode batch (a Batch API) needs analyzer anthropic or gemini or openai"),
        (["analyze", "{list}", "-o", "x.csv", "--analyzer", "openai"], {}, 2, "analyzer openai is not configured here: set OPENAI_API_KEYS"),
        (["analyze", "{list}", "-o", "x.csv", "--analyzer", "openai", "--model", "llava"], {"OPENAI_API_KEYS": "sk-x"}, 2, "no price for model 'llava': add it to OPENAI_PRICES_FILE"),
        (["analyze", "{list}", "-o", "x.csv", "--analyzer", "anthropic"], {}, 2, "analyzer anthropic is not configured here: set ANTHROPIC_API_KEYS"),
        (["analyze", "{list}", "-o", "x.csv", "--analyzer", "anthropic", "--model", "claude-9"], {"ANTHROPIC_API_KEYS": "sk-x"}, 2, "no price for model 'claude-9': add it to ANTHROPIC_PRICES_FILE (known: claude-3-5-haiku"),
    ],
)  # fmt: skip
async def test_bad_input_gets_one_line_and_an_exit_status(
    redis_url: str,
    database_url: str,
    prefix: str,
    tmp_path: Path,
    args: list[str],
    env_changes: dict[str, str],
    code: int,
    message: str,
) -> None:
    listing = tmp_path / "list.csv"
    listing.write_text("url\nhttp://127.0.0.1:9/a.jpg\n")
    port = str(free_port())  # nothing listens there
    env = service_env(redis_url, database_url, prefix)
    env.update({k: v.replace("{port}", port) for k, v in env_changes.items()})
    args = [a.replace("{list}", str(listing)) for a in args]
    got, out, err = await imagestream(env, *args)
    assert got == code, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imagestream: ") and message in lines[0], err
    assert "Traceback" not in err and "secret" not in err


async def test_analyze_sends_its_webhooks_and_leaves_the_rest_to_the_deployment(
    redis_url: str, database_url: str, pool: asyncpg.Pool, prefix: str, tmp_path: Path
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.png").write_bytes(corpus.sample("a", 40, 30, "PNG", seed=1).data)
    secret = webhooks.new_secret()
    env = service_env(redis_url, database_url, prefix, WEBHOOK_ALLOWED_CIDRS="127.0.0.0/8")
    async with receiving(secret) as receiver:
        code, out, err = await imagestream(
            env, "analyze", str(photos), "--no-progress", "--webhook-url", receiver.url,
            "--webhook-secret", secret,
        )  # fmt: skip
    assert code == 0, err
    assert receiver.forged == 0 and secret not in out + err
    [got] = receiver.accepted
    assert got.body["type"] == "batch.completed" and got.body["data"]["counts"]["succeeded"] == 1
    assert "webhooks:" not in out

    # Nobody listening: the run ends after its grace period and hands the event over.
    down = Receiver(secret)
    code, out, err = await imagestream(
        env | {"SHUTDOWN_GRACE_S": "1"}, "analyze", str(photos), "--no-progress",
        "--webhook-url", down.url,
    )  # fmt: skip
    assert code == 0, err
    assert "webhooks: 1 event(s) not delivered yet" in out, out
    shown = [line for line in err.splitlines() if line.startswith("webhook secret (shown once): ")]
    assert len(shown) == 1
    row = await pool.fetchrow(
        "SELECT * FROM webhook_events WHERE url = $1 ORDER BY id DESC LIMIT 1", down.url
    )
    assert row["pipeline"] == prefix and row["state"] == "pending" and row["attempts"] >= 1
    batch_secret = await pool.fetchval(
        "SELECT webhook_secret FROM batches WHERE id = $1", row["batch_id"]
    )
    assert shown[0].endswith(batch_secret)


async def test_tokens_create_with_a_webhook_secret(
    redis_url: str, database_url: str, pool: asyncpg.Pool, prefix: str
) -> None:
    env = service_env(redis_url, database_url, prefix)
    secret = webhooks.new_secret()
    code, out, err = await imagestream(
        env, "tokens", "create", "--role", "admin", "--name", f"hooks-{prefix}",
        "--webhook-secret", secret,
    )  # fmt: skip
    assert code == 0, err
    assert secret not in out + err
    stored = await pool.fetchval(
        "SELECT webhook_secret FROM api_tokens WHERE name = $1", f"hooks-{prefix}"
    )
    assert stored == secret
    code, out, err = await imagestream(
        env, "tokens", "create", "--role", "admin", "--name", "x", "--webhook-secret", "whsec_!"
    )
    assert code == 2 and out == ""
    assert (
        err.strip()
        == "imagestream: --webhook-secret: a webhook secret is whsec_ followed by base64"
    )
