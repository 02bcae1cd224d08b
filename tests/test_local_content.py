"""The local ``content`` profile with its real models (rapidocr's PP-OCRv4, nudenet's 320n)
on real images: scikit-image's photos and text, and words rendered with Pillow on photos
(several fonts, sizes and angles), encoded as the fetcher hands them over.

NSFW: only the safe side is measured here. No unsafe image is shipped or generated, so
the detector's recall on unsafe images was not measured; the tests check that the bundled
photos score below the threshold, the output's shape and the threshold logic.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import jsonschema
import orjson
import pytest
from PIL import Image
from skimage import data as skdata

from imagestream.analyzer.providers import local as local_provider
from imagestream.analyzer.providers.local import content
from imagestream.analyzer.providers.local.facts import COLUMNS
from imagestream.analyzer.providers.local.provider import LocalProvider
from imagestream.api import openapi
from imagestream.common import ledger, providers
from imagestream.common.control import BatchConfig
from imagestream.common.messages import ImageFacts
from imagestream.common.profiles import ProfileError
from imagestream.devtools.imageserver import ImageServer, Reply
from imagestream.devtools.text_images import TextPhoto, found, text_photo
from imagestream.fetcher.image import prepare

from .apiharness import running_api, upload
from .helpers import wait_for
from .procs import pool_workers_outliving

#: skimage's photographs without text (``camera`` and ``astronaut`` have faces; ``moon``
#: reads as a belly to the NSFW detector: all safe).
PHOTOS = ("astronaut", "chelsea", "coffee", "camera", "rocket", "coins", "immunohistochemistry",
          "brick", "grass", "gravel", "moon")  # fmt: skip
THRESHOLD = 0.5


@pytest.fixture(scope="module", autouse=True)
def models() -> Iterator[None]:
    """The models in this process, as a pool worker holds them (loaded once)."""
    content.load_models(threads=1, nsfw_threshold=THRESHOLD)
    yield


def encode(img: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return buf.getvalue()


def facts_of(img: Image.Image) -> ImageFacts:
    return ImageFacts(
        width=img.width, height=img.height, format="JPEG", mode="RGB", bytes=0, sha256="0" * 64
    )


def read(img: Image.Image) -> dict[str, object]:
    return content.analyze_content(encode(img), facts_of(img))


def skimage_photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skdata, name)())


# --- shape ------------------------------------------------------------------------------
def test_fields_are_the_facts_then_the_content_fields_and_fit_their_schema() -> None:
    photo = text_photo(1280, 853, 0, sizes=(40,), per_size=2)
    fields = read(photo.image)
    assert list(fields) == [*COLUMNS, *content.SCHEMA]
    assert orjson.loads(orjson.dumps(fields)) == fields
    for name, schema in content.SCHEMA.items():
        jsonschema.validate(fields[name], schema)
    assert fields["has_text"] is True and fields["text_lines"]


# --- OCR --------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rendered_words_are_read_in_every_font_size_and_angle(seed: int) -> None:
    """At the content profile's analysis size: three fonts, 32 to 60 px, tilted up to 25
    degrees; every word is read, and its line's box is where the word was drawn."""
    photo = text_photo(1280, 853, seed, sizes=(32, 44, 60), angles=(0.0, 12.0, -25.0))
    fields = read(photo.image)
    assert found(photo.words, str(fields["text"])) == [w.text for w in photo.words], fields["text"]
    assert fields["has_text"] is True
    assert isinstance(fields["text_confidence"], float) and fields["text_confidence"] > 0.8
    assert_boxes_on_words(photo, fields, scale=1.0)


def test_boxes_are_in_the_original_images_pixels() -> None:
    """The fetcher hands over a smaller image; boxes come back in the original's pixels."""
    photo = text_photo(2560, 1706, 3, sizes=(80, 120), per_size=2)
    prepared = prepare(encode(photo.image), target_long_side=1280)
    assert prepared.width == 1280
    fields = content.analyze_content(prepared.data, prepared.facts)
    assert found(photo.words, str(fields["text"])) == [w.text for w in photo.words]
    assert_boxes_on_words(photo, fields, scale=1.0)


def assert_boxes_on_words(photo: TextPhoto, fields: dict[str, object], scale: float) -> None:
    lines = fields["text_lines"]
    assert isinstance(lines, list)
    for word in photo.words:
        line = next(line for line in lines if word.text in line["text"].lower())
        xs = [x for x, _ in line["box"]]
        ys = [y for _, y in line["box"]]
        centre = (sum(xs) / 4 * scale, sum(ys) / 4 * scale)
        left, top, right, bottom = word.box
        assert left <= centre[0] <= right and top <= centre[1] <= bottom, (word, line)


def test_skimage_text_is_found() -> None:
    """scikit-image's ``text`` (handwritten formulas photographed at an angle) has text,
    although PP-OCR reads little of it."""
    fields = read(skimage_photo("text"))
    assert fields["has_text"] is True and fields["text"], fields
    lines = fields["text_lines"]
    assert isinstance(lines, list)
    for line in lines:
        assert all(0 <= x <= 448 and 0 <= y <= 172 for x, y in line["box"]), line


def test_skimage_page_is_read() -> None:
    fields = read(skimage_photo("page"))
    text = str(fields["text"]).lower()
    for phrase in ("segmentation", "markers of the coins"):
        assert phrase in text, text


@pytest.mark.parametrize("name", PHOTOS)
def test_photos_without_text_have_none(name: str) -> None:
    fields = read(skimage_photo(name))
    assert fields["has_text"] is False, fields["text_lines"]
    assert (fields["text"], fields["text_lines"], fields["text_confidence"]) == ("", [], None)


# --- NSFW -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PHOTOS)
def test_bundled_photos_are_safe(name: str) -> None:
    fields = read(skimage_photo(name))
    assert fields["nsfw"] is False
    assert isinstance(fields["nsfw_score"], float) and fields["nsfw_score"] < THRESHOLD
    labels = fields["nsfw_labels"]
    assert isinstance(labels, list)
    for label in labels:
        assert label["label"] not in content.UNSAFE_LABELS
        assert 0.2 <= label["score"] <= 1.0  # nudenet reports from 0.2 up


def test_faces_are_labelled_but_not_unsafe() -> None:
    fields = read(skimage_photo("astronaut"))
    labels = fields["nsfw_labels"]
    assert isinstance(labels, list) and labels[0]["label"] == "FACE_FEMALE"
    assert labels[0]["score"] > THRESHOLD and fields["nsfw"] is False


def detection(label: str, score: float) -> dict[str, object]:
    return {"class": label, "score": score, "box": [0, 0, 10, 10]}


def test_threshold_logic_and_label_order() -> None:
    found_parts = [
        detection("FACE_FEMALE", 0.91),
        detection("FEMALE_BREAST_EXPOSED", 0.42),
        detection("FEMALE_BREAST_EXPOSED", 0.61),
        detection("BELLY_EXPOSED", 0.77),
    ]
    fields = content.content_fields([], found_parts, 1.0, 1.0, nsfw_threshold=0.6)
    assert fields["nsfw_labels"] == [
        {"label": "FACE_FEMALE", "score": 0.91},
        {"label": "BELLY_EXPOSED", "score": 0.77},
        {"label": "FEMALE_BREAST_EXPOSED", "score": 0.61},
    ]
    assert (fields["nsfw_score"], fields["nsfw"]) == (0.61, True)
    higher = content.content_fields([], found_parts, 1.0, 1.0, nsfw_threshold=0.62)
    assert (higher["nsfw_score"], higher["nsfw"]) == (0.61, False)
    # Safe classes never make an image unsafe, however sure the detector is.
    safe = content.content_fields([], found_parts[:1] + found_parts[3:], 1.0, 1.0, 0.1)
    assert (safe["nsfw_score"], safe["nsfw"]) == (0.0, False)


def test_text_line_rules() -> None:
    lines = [
        [[[10, 10], [50, 10], [50, 20], [10, 20]], "Harbour", 0.97],
        [[[10, 30], [20, 30], [20, 40], [10, 40]], "O", 0.55],  # a lone unsure character
        [[[10, 50], [20, 50], [20, 60], [10, 60]], "7", 0.93],
    ]
    fields = content.content_fields(lines, [], 2.0, 3.0, THRESHOLD)
    assert fields["text"] == "Harbour\n7"
    assert fields["text_lines"][0] == {
        "text": "Harbour",
        "confidence": 0.97,
        "box": [[20, 30], [100, 30], [100, 60], [20, 60]],
    }
    assert fields["text_confidence"] == round((0.97 * 7 + 0.93) / 8, 3)


# --- models, profiles -----------------------------------------------------------------
def test_model_files_ship_in_the_wheels_and_load() -> None:
    for model in content.model_files():
        assert model.path.is_file(), model
        assert model.path.name in content.check_model(model)


def test_a_missing_or_broken_model_is_one_line(tmp_path: Path) -> None:
    missing = content.ModelFile("nsfw detector", tmp_path / "gone.onnx")
    with pytest.raises(content.ModelError, match=r"^nsfw detector: .*gone\.onnx is missing$"):
        content.check_model(missing)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07not a model at all" * 50)
    with pytest.raises(content.ModelError) as caught:
        content.check_model(content.ModelFile("ocr recognition", broken))
    message = str(caught.value)
    assert message.startswith("ocr recognition: ") and "cannot be loaded" in message
    assert "\n" not in message


def test_nothing_is_downloaded_the_packages_name_no_url_they_fetch() -> None:
    """Both libraries load only files from their package folders: no code path opens a
    URL (their sources mention URLs only in comments and messages)."""
    for model in content.model_files():
        package = model.path.parent
        while package.name not in ("rapidocr_onnxruntime", "nudenet"):
            package = package.parent
        for source in package.rglob("*.py"):
            code = source.read_text()
            for opener in ("urlopen", "urlretrieve", "requests.", "httpx", "download_file"):
                assert opener not in code, (source, opener)


def test_local_profiles_are_chosen_like_gemini_ones() -> None:
    spec = local_provider.SPEC
    assert spec.choose(None, None, {}) == ("facts", None)
    assert spec.choose("content", None, {}) == ("content", None)
    with pytest.raises(ProfileError, match="local profile must be one of facts, content"):
        spec.choose("describe", None, {})
    with pytest.raises(ProfileError, match="takes no model"):
        spec.choose("content", "gpt-4o", {})
    content_batch = providers.resolve_batch({"analyzer": "local", "profile": "content"}, env={})
    assert content_batch.options["long_side"] == local_provider.CONTENT_LONG_SIDE
    facts_batch = providers.resolve_batch({"analyzer": "local"}, env={})
    assert facts_batch.profile == "facts" and "long_side" not in facts_batch.options
    chosen = providers.resolve_batch({"profile": "content", "long_side": "900"}, env={})
    assert chosen.options["long_side"] == 900


def test_the_documented_defaults_are_the_code_s() -> None:
    """The OpenAPI document (the api imports no provider) says the content profile's long
    side in words: kept true here."""
    fields = openapi.DOCUMENT["components"]["schemas"]["BatchUpload"]["properties"]
    side = str(local_provider.CONTENT_LONG_SIDE)
    assert side in fields["profile"]["description"] and side in fields["long_side"]["description"]


def test_columns_and_cache_keys_per_profile() -> None:
    provider = LocalProvider(local_provider.LocalSettings(local_models=False))

    def config(profile: str | None, **options: object) -> BatchConfig:
        return BatchConfig(id="b", analyzer="local", profile=profile, model=None, options=options)

    assert provider.columns(config(None)) == list(COLUMNS) == provider.columns(config("facts"))
    assert provider.columns(config("content")) == [*COLUMNS, *content.SCHEMA]
    assert provider.schema(config("content"))["text_lines"]["type"] == "array"
    # facts batches from before profiles share the cache with new ones.
    assert provider.cache_key(config(None)) == provider.cache_key(config("facts"))
    keys = {provider.cache_key(config("content", long_side=side)) for side in (1280, 1600)}
    assert len(keys) == 2 and provider.cache_key(config("facts")) not in keys


async def test_the_model_pool_reads_in_its_processes_and_stops() -> None:
    pool = content.ModelPool(workers=2, threads=1, nsfw_threshold=THRESHOLD)
    try:
        await pool.start()
        photo = text_photo(1280, 853, 7, sizes=(44,), per_size=2)
        fields = await pool.analyze(encode(photo.image), facts_of(photo.image))
        assert found(photo.words, str(fields["text"])) == [w.text for w in photo.words]
    finally:
        await pool.close()


async def test_content_items_fail_when_the_models_are_not_loaded() -> None:
    from imagestream.common.errors import ItemError

    provider = LocalProvider(local_provider.LocalSettings(local_models=False))
    await provider.start()
    image = skimage_photo("coffee")
    config = BatchConfig(id="b", analyzer="local", profile="content", model=None, options={})
    try:
        with pytest.raises(ItemError, match="LOCAL_MODELS=false") as caught:
            await provider.analyze(encode(image), facts_of(image), config)
        assert caught.value.error_class == "analyzer_error"
        facts_only = BatchConfig(id="b", analyzer="local", profile="facts", model=None, options={})
        analysis = await provider.analyze(encode(image), facts_of(image), facts_only)
        assert list(analysis.fields) == list(COLUMNS)
    finally:
        await provider.close()


# --- through the api and the pipeline -----------------------------------------------------
async def test_a_content_batch_through_the_api(
    redis_url: str, database_url: str, pool: asyncpg.Pool
) -> None:
    sign = text_photo(1600, 1066, 12, sizes=(48, 64), angles=(0.0, -12.0))
    server = ImageServer(
        {
            "sign.jpg": Reply(encode(sign.image)),
            "coffee.jpg": Reply(encode(skimage_photo("coffee"))),
        }
    )
    await server.start()
    listing = f"url\n{server.url('sign.jpg')}\n{server.url('coffee.jpg')}\n".encode()
    try:
        async with running_api(
            redis_url, database_url, pool, stages=True, LOCAL_MODELS="true"
        ) as api:
            status, refused = await upload(api, listing, analyzer="local", profile="describe")
            assert status == 400 and refused["error"]["code"] == "bad_request", refused
            assert "local profile must be one of facts, content" in refused["error"]["message"]

            status, created = await upload(api, listing, analyzer="local", profile="content")
            assert status == 201 and created["profile"] == "content", created
            options = await pool.fetchval(
                "SELECT options FROM batches WHERE id = $1", uuid.UUID(created["id"])
            )
            assert options["long_side"] == local_provider.CONTENT_LONG_SIDE

            async def done() -> bool:
                state = await pool.fetchval(
                    "SELECT state FROM batches WHERE id = $1", uuid.UUID(created["id"])
                )
                return state in ledger.FINISHED_BATCH_STATES

            await wait_for(done, timeout=180, interval=0.2)
            path = f"/api/v1/batches/{created['id']}/results?format=jsonl"
            async with api.session(api.viewer) as http, http.get(path) as r:
                assert r.status == 200
                rows = [orjson.loads(line) for line in (await r.read()).splitlines()]
    finally:
        await server.stop()
    by_name = {row["url"].rsplit("/", 1)[1]: row for row in rows}
    assert {row["status"] for row in rows} == {"succeeded"}, rows
    sign_row, coffee_row = by_name["sign.jpg"], by_name["coffee.jpg"]
    assert found(sign.words, sign_row["analysis.text"]) == [w.text for w in sign.words]
    assert sign_row["analysis.has_text"] is True and coffee_row["analysis.has_text"] is False
    assert {sign_row["analysis.nsfw"], coffee_row["analysis.nsfw"]} == {False}
    assert all(f"analysis.{name}" in sign_row for name in content.SCHEMA)


async def test_model_workers_end_when_their_analyzer_is_killed() -> None:
    """A SIGKILLed analyzer never stops its pool: its model workers notice they lost their
    parent and exit instead of idling on with their models' memory."""
    script = (
        "import asyncio, os\n"
        "from imagestream.analyzer.providers.local.content import ModelPool\n"
        "async def main():\n"
        "    pool = ModelPool(2, 1, 0.5)\n"
        "    await pool.start()\n"
        "    print('ready', flush=True)\n"
        "    await asyncio.sleep(600)\n"
        "if __name__ == '__main__':\n"
        "    asyncio.run(main())\n"
    )
    assert await pool_workers_outliving(script, least=2) == []
