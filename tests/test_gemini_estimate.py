"""``imagestream estimate``: counting a list, sampling it through the fetcher, counting tokens
by the rules or with countTokens (through the emulator), and the cost arithmetic."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from imagestream.analyzer.providers.gemini import pricing as gemini_pricing
from imagestream.cli import estimate
from imagestream.common import pricing, profiles
from imagestream.devtools.gemini_server import EmulatorConfig, running_emulator
from imagestream.devtools.imageserver import ImageServer, Reply

pytestmark = pytest.mark.filterwarnings(
    "ignore:Inheritance class AiohttpClientSession from ClientSession:DeprecationWarning"
)


def jpeg(width: int, height: int, shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (shade, 90, 160)).save(buf, "JPEG")
    return buf.getvalue()


def env(**extra: str) -> dict[str, str]:
    return {"FETCH_ALLOWED_CIDRS": "127.0.0.1/32", **extra}


async def test_a_url_list_is_counted_sampled_and_priced_by_the_rules(tmp_path: Path) -> None:
    routes = {
        f"img/{i}.jpg": Reply(jpeg(1600, 1200, i), content_type="image/jpeg") for i in range(6)
    }
    server = ImageServer(routes)
    await server.start()
    try:
        listing = tmp_path / "list.csv"
        urls = [server.url(f"img/{i % 6}.jpg") + f"?n={i}" for i in range(30)]
        urls += [server.url("missing.jpg")] * 1
        listing.write_text("url,sku\n" + "".join(f"{u},S{i}\n" for i, u in enumerate(urls)))
        report = await estimate.estimate(
            env(), listing, profile=None, model=None, sample_size=31, offline=True
        )
    finally:
        await server.stop()
    e = report.estimate
    describe = profiles.load_catalog().profile("describe")
    # MEDIUM: 256 image tokens whatever the size, then the prompt and the response schema.
    per_image = 256 + pricing.text_tokens(describe.profile.prompt) + describe.schema_tokens
    assert (e.images, report.sampled, report.unusable) == (31, 30, 1)
    assert e.model == "gemini-2.5-flash-lite" and e.input_tokens_per_image == per_image
    expected = describe.profile.expected_output_tokens or 0
    one = pricing.cost_usd(
        pricing.price_of(e.model, gemini_pricing.PRICES),
        input_tokens=per_image,
        output_tokens=expected,
    )
    assert e.cost_usd == pytest.approx(31 * one)
    assert e.batch_cost_usd == pytest.approx(e.cost_usd / 2)
    assert e.minutes == pytest.approx(31 / 1000)  # one project at the default GEMINI_RPM
    text = estimate.render(report)
    assert "31 images" in text and "1 could not be fetched" in text


async def test_count_tokens_endpoint_counts_what_would_be_sent(tmp_path: Path) -> None:
    """A profile without a media resolution: the images are counted by Gemini, tile by tile."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i, size in enumerate([(300, 200), (1600, 1200), (700, 2000)]):
        (folder / f"{i}.jpg").write_bytes(jpeg(*size, shade=i * 30))
    profiles_dir = tmp_path / "profiles"
    profiles_dir.mkdir()
    describe = json.loads(
        (Path(profiles.__file__).parent / "profile_files" / "describe.json").read_text()
    )
    describe.pop("media_resolution")
    (profiles_dir / "tiles.json").write_text(json.dumps(describe))
    async with running_emulator(EmulatorConfig()) as (emulator, base_url):
        report = await estimate.estimate(
            env(
                GEMINI_API_KEYS="k-estimate",
                GEMINI_BASE_URL=base_url,
                PROFILES_DIR=str(profiles_dir),
                GEMINI_RPM="600",
            ),
            folder,
            profile="tiles",
            model="gemini-2.5-flash",
            sample_size=5,
        )
        counted = [e for e in emulator.request_log() if e["method"] == "countTokens"]
    assert report.counted_by == "Gemini's countTokens" and len(counted) == 3
    # The analysis images are at most 768 px on their long side (the fetcher's default).
    sizes = [(300, 200), (768, 576), (269, 768)]
    tiles = profiles.cached_catalog(str(profiles_dir)).profile("tiles")
    prompt = pricing.text_tokens(describe["prompt"]) + tiles.schema_tokens
    expected = [
        gemini_pricing.image_tokens(w, h, "gemini-2.5-flash", None) + prompt for w, h in sizes
    ]
    assert report.estimate.input_tokens_per_image == pytest.approx(sum(expected) / 3)
    assert report.estimate.minutes == pytest.approx(3 / 600)


def test_the_command_line(tmp_path: Path) -> None:
    folder = tmp_path / "few"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(jpeg(64, 48, 1))
    run_env = {"IMAGESTREAM_ENV_FILE": "/nonexistent", "PATH": "/usr/bin:/bin"}
    command = [sys.executable, "-m", "imagestream.cli", "estimate"]
    ok = subprocess.run(
        [*command, str(folder), "--profile", "moderation", "--json"],
        capture_output=True, text=True, env=run_env, check=False,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    data = json.loads(ok.stdout)
    assert data["profile"] == "moderation" and data["images"] == 1
    moderation = profiles.load_catalog().profile("moderation")
    assert (
        data["input_tokens_per_image"]
        == 64 + pricing.text_tokens(moderation.profile.prompt) + moderation.schema_tokens
    )
    bad = subprocess.run(
        [*command, str(folder), "--model", "gpt-4o"],
        capture_output=True, text=True, env=run_env, check=False,
    )  # fmt: skip
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().startswith("imagestream: no price for model 'gpt-4o'")
    assert len(bad.stderr.strip().splitlines()) == 1
