"""The local analyzer on real images: scikit-image's bundled photos and generated ones,
encoded with Pillow the way the fetcher hands them over (JPEG or PNG bytes)."""

from __future__ import annotations

import functools
import io
import itertools
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter
from skimage import data as skdata

from imagestream.analyzer.providers.local.facts import BLUR_THRESHOLD, COLUMNS, analyze, hamming
from imagestream.common.messages import ExifSummary, ImageFacts

#: Distinct photographs (skimage's "cat" is chelsea again, so it is left out).
PHOTOS = ("astronaut", "chelsea", "coffee", "camera", "rocket", "coins", "immunohistochemistry")


@functools.cache
def photo(name: str) -> Image.Image:
    img = Image.fromarray(getattr(skdata, name)())
    return img.convert("RGB") if img.mode not in ("L", "RGB") else img


def encode(img: Image.Image, fmt: str = "JPEG", **options: Any) -> bytes:
    if fmt == "JPEG":
        options.setdefault("quality", 85)
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def facts_for(img: Image.Image, fmt: str = "JPEG", exif: ExifSummary | None = None) -> ImageFacts:
    return ImageFacts(
        width=img.width,
        height=img.height,
        format=fmt,
        mode=img.mode,
        bytes=0,
        sha256="0" * 64,
        exif=exif,
    )


def run(img: Image.Image, fmt: str = "JPEG", **options: Any) -> dict[str, Any]:
    return analyze(encode(img, fmt, **options), facts_for(img, fmt))


def two_halves(left: tuple[int, int, int], right: tuple[int, int, int]) -> Image.Image:
    img = Image.new("RGB", (300, 200), left)
    ImageDraw.Draw(img).rectangle((150, 0, 299, 199), fill=right)
    return img


def rgb_of(hex_colour: str) -> tuple[int, int, int]:
    assert len(hex_colour) == 7 and hex_colour[0] == "#"
    return (int(hex_colour[1:3], 16), int(hex_colour[3:5], 16), int(hex_colour[5:7], 16))


def close(hex_colour: str, expected: tuple[int, int, int], tolerance: int = 8) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(rgb_of(hex_colour), expected, strict=True))


# --- shape of the result --------------------------------------------------------------


def test_keys_are_columns_in_order_and_json_serialisable() -> None:
    result = run(photo("astronaut"))
    assert list(result) == list(COLUMNS)
    assert len(set(COLUMNS)) == len(COLUMNS)
    assert json.loads(json.dumps(result)) == result


def test_deterministic_for_the_same_bytes_and_facts() -> None:
    blob = encode(photo("coffee"))
    facts = facts_for(photo("coffee"))
    first = analyze(blob, facts)
    second = analyze(blob, facts)
    assert first == second
    assert json.dumps(first) == json.dumps(second)  # same floats, to the last digit


def test_same_results_from_a_thread_pool() -> None:
    blobs = [(encode(photo(name)), facts_for(photo(name))) for name in PHOTOS]
    serial = [analyze(blob, facts) for blob, facts in blobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(pool.map(lambda args: analyze(*args), blobs * 3))
    assert threaded == serial * 3


@pytest.mark.parametrize("name", PHOTOS)
def test_photo_fields_are_in_range(name: str) -> None:
    result = run(photo(name))
    assert 0.0 <= result["brightness"] <= 1.0
    assert 0.05 < result["contrast"] <= 0.5
    colours = result["dominant_colors"]
    assert 1 <= len(colours) <= 5
    shares = [c["share"] for c in colours]
    assert shares == sorted(shares, reverse=True)
    assert sum(shares) == pytest.approx(1.0, abs=0.005)
    assert not result["is_blank"]
    assert len(result["phash"]) == 16
    int(result["phash"], 16)


# --- brightness, contrast, blank ------------------------------------------------------


def test_uniform_grey_is_blank_flat_and_edgeless() -> None:
    result = run(Image.new("RGB", (640, 480), (128, 128, 128)))
    assert result["is_blank"] is True
    assert result["brightness"] == pytest.approx(0.502, abs=0.01)
    assert result["contrast"] < 0.005
    assert result["sharpness"] < 0.5
    assert len(result["dominant_colors"]) == 1
    (colour,) = result["dominant_colors"]
    assert close(colour["hex"], (128, 128, 128), tolerance=2)
    assert colour["share"] == 1.0


def test_black_and_white_brightness() -> None:
    black = run(Image.new("RGB", (200, 100), (0, 0, 0)))
    white = run(Image.new("RGB", (200, 100), (255, 255, 255)))
    assert black["brightness"] <= 0.01
    assert white["brightness"] >= 0.99
    assert black["is_blank"] and white["is_blank"]


def test_noisy_uniform_image_is_blank_but_a_small_mark_is_not() -> None:
    rng = np.random.default_rng(7)
    noise = np.clip(200 + rng.normal(0, 4, (300, 400, 3)), 0, 255).astype(np.uint8)
    noisy = Image.fromarray(noise)
    assert run(noisy)["is_blank"] is True
    marked = noisy.copy()
    ImageDraw.Draw(marked).rectangle((100, 75, 299, 224), fill=(20, 20, 120))  # 25% of it
    result = run(marked)
    assert result["is_blank"] is False
    assert result["dominant_colors"][1]["share"] == pytest.approx(0.25, abs=0.03)


def test_two_colours_of_equal_luminance_are_not_blank() -> None:
    # Luminance is identical on both halves (76/255), so only the colours tell them apart.
    result = run(two_halves((255, 0, 0), (0, 130, 0)), "PNG")
    assert result["contrast"] < 0.01
    assert result["is_blank"] is False


# --- dominant colours -----------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_half_red_half_blue(fmt: str) -> None:
    result = run(two_halves((255, 0, 0), (0, 0, 255)), fmt)
    colours = result["dominant_colors"]
    assert len(colours) == 2
    by_hue = sorted(colours, key=lambda c: rgb_of(c["hex"])[2])  # red first, then blue
    assert close(by_hue[0]["hex"], (255, 0, 0))
    assert close(by_hue[1]["hex"], (0, 0, 255))
    assert by_hue[0]["share"] == pytest.approx(0.5, abs=0.02)
    assert by_hue[1]["share"] == pytest.approx(0.5, abs=0.02)


def test_colour_shares_follow_areas() -> None:
    img = Image.new("RGB", (400, 400), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 0, 399, 199), fill=(20, 120, 40))  # 50% green
    draw.rectangle((0, 200, 199, 399), fill=(240, 200, 0))  # 25% yellow, 25% stays white
    colours = run(img, "PNG")["dominant_colors"]
    # The thumbnail averages areas, so the borders add a sliver of in-between shades.
    main, slivers = colours[:3], colours[3:]
    assert [c["share"] for c in main] == pytest.approx([0.5, 0.25, 0.25], abs=0.015)
    assert sum(c["share"] for c in slivers) < 0.03
    assert close(main[0]["hex"], (20, 120, 40))
    assert {main[1]["hex"], main[2]["hex"]} == {"#f0c800", "#fafafa"}


# --- sharpness ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee", "camera", "rocket"])
def test_blur_lowers_sharpness_and_flips_is_blurry(name: str) -> None:
    sharp = run(photo(name))
    blurred = run(photo(name).filter(ImageFilter.GaussianBlur(3)))
    assert sharp["is_blurry"] is False
    assert sharp["sharpness"] >= BLUR_THRESHOLD * 2
    assert blurred["is_blurry"] is True
    assert blurred["sharpness"] < sharp["sharpness"] / 10


def test_sharpness_is_comparable_across_sizes() -> None:
    # The same photo at two analysis sizes: normalised to one scale, the score stays of
    # the same order (the raw Laplacian variance would differ several-fold).
    img = photo("astronaut")
    small = run(img.resize((384, 384), Image.Resampling.LANCZOS))["sharpness"]
    large = run(img.resize((768, 768), Image.Resampling.LANCZOS))["sharpness"]
    assert 0.5 < small / large < 2


def test_a_uniform_image_has_no_sharpness() -> None:
    assert run(Image.new("L", (512, 512), 90))["sharpness"] == 0.0


# --- perceptual hash ------------------------------------------------------------------


@pytest.mark.parametrize("name", PHOTOS)
def test_phash_survives_recompression_and_resizing(name: str) -> None:
    img = photo(name)
    original = run(img, quality=95)["phash"]
    assert hamming(original, run(img, quality=60)["phash"]) <= 6
    for factor in (0.8, 1.2):
        size = (round(img.width * factor), round(img.height * factor))
        resized = run(img.resize(size, Image.Resampling.LANCZOS))["phash"]
        assert hamming(original, resized) <= 6, factor


def test_phash_tells_different_photos_apart() -> None:
    hashes = {name: run(photo(name))["phash"] for name in PHOTOS}
    for a, b in itertools.combinations(PHOTOS, 2):
        assert hamming(hashes[a], hashes[b]) >= 20, (a, b)


def test_phash_of_flat_images() -> None:
    # Only the DC term carries energy (the integer DCT's AC rows sum to exactly zero), so
    # it alone is above the median of 0; a black image has no bit set at all.
    assert run(Image.new("RGB", (300, 200), (90, 140, 200)), "PNG")["phash"] == "8" + "0" * 15
    assert run(Image.new("L", (300, 200), 0), "PNG")["phash"] == "0" * 16


def _imagehash_phash(img: Image.Image) -> str:
    """imagehash.phash (ImageHash 4.3), line for line, with scipy's DCT."""
    fftpack = pytest.importorskip("scipy.fftpack")
    pixels = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.LANCZOS))
    dct = fftpack.dct(fftpack.dct(pixels, axis=0), axis=1)
    low = dct[:8, :8]
    bits = "".join(str(b) for b in 1 * (low > np.median(low)).flatten())
    return f"{int(bits, 2):0>16x}"


@pytest.mark.parametrize("name", PHOTOS)
def test_phash_bits_equal_imagehash_on_the_same_32px_input(name: str) -> None:
    # At 32x32 no resampling happens, so this checks the integer DCT, the median
    # threshold (DC included) and the bit order exactly against imagehash's recipe.
    tiny = photo(name).convert("L").resize((32, 32), Image.Resampling.LANCZOS)
    assert run(tiny, "PNG")["phash"] == _imagehash_phash(tiny)


@pytest.mark.parametrize("name", PHOTOS)
def test_phash_is_close_to_imagehash_on_full_images(name: str) -> None:
    blob = encode(photo(name))
    decoded = Image.open(io.BytesIO(blob))
    assert hamming(analyze(blob, facts_for(decoded))["phash"], _imagehash_phash(decoded)) <= 4


def test_hamming() -> None:
    assert hamming("0000000000000000", "0000000000000000") == 0
    assert hamming("0000000000000000", "ffffffffffffffff") == 64
    assert hamming("8000000000000001", "0000000000000000") == 2
    assert hamming("F0", "f1") == 1
    with pytest.raises(ValueError, match="length"):
        hamming("00", "000")
    with pytest.raises(ValueError):
        hamming("zz", "00")


# --- facts and modes ------------------------------------------------------------------


def test_exif_and_original_facts_are_copied() -> None:
    img = photo("chelsea")
    exif = ExifSummary(
        camera="Canon EOS 5D", taken_at="2021-06-01T12:30:00", orientation=6, has_gps=True
    )
    facts = ImageFacts(
        width=4000, height=3000, format="JPEG", mode="CMYK", bytes=5_000_000,
        sha256="ab" * 32, exif=exif,
    )  # fmt: skip
    result = analyze(encode(img), facts)
    assert result["mode"] == "CMYK"
    assert result["exif_camera"] == "Canon EOS 5D"
    assert result["exif_taken_at"] == "2021-06-01T12:30:00"
    assert result["exif_orientation"] == 6
    assert result["exif_has_gps"] is True
    assert result["megapixels"] == 12.0
    assert result["aspect_ratio"] == pytest.approx(1.3333)


def test_missing_exif_gives_none_and_false() -> None:
    result = run(photo("coffee"))
    assert result["exif_camera"] is None
    assert result["exif_taken_at"] is None
    assert result["exif_orientation"] is None
    assert result["exif_has_gps"] is False
    assert result["mode"] == "RGB"
    assert result["aspect_ratio"] == pytest.approx(1.5)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_grayscale_input(fmt: str) -> None:
    img = photo("camera")
    assert img.mode == "L"
    result = run(img, fmt)
    assert result["mode"] == "L"
    assert result["is_blurry"] is False
    assert result["is_blank"] is False
    for colour in result["dominant_colors"]:
        r, g, b = rgb_of(colour["hex"])
        assert r == g == b
    # Same luminance whether it arrives as L or as RGB.
    as_rgb = run(img.convert("RGB"), fmt)
    assert result["brightness"] == as_rgb["brightness"]
    assert result["phash"] == as_rgb["phash"]


def test_rgba_png_is_composited_over_white() -> None:
    logo = Image.fromarray(skdata.logo())
    assert logo.mode == "RGBA"
    result = run(logo, "PNG")
    assert result["mode"] == "RGBA"
    assert not result["is_blank"]
    assert 0.0 < result["brightness"] < 1.0

    clear = run(Image.new("RGBA", (120, 80), (255, 0, 0, 0)), "PNG")
    assert clear["is_blank"] is True
    assert clear["dominant_colors"] == [{"hex": "#ffffff", "share": 1.0}]

    half = Image.new("RGBA", (200, 100), (0, 0, 0, 0))
    ImageDraw.Draw(half).rectangle((0, 0, 99, 99), fill=(0, 0, 255, 255))
    colours = run(half, "PNG")["dominant_colors"]
    assert sorted(c["hex"] for c in colours) == ["#0000ff", "#ffffff"]


def test_palette_png_with_transparency() -> None:
    img = Image.new("P", (200, 100), 0)
    img.putpalette([255, 0, 0, 0, 0, 255])
    ImageDraw.Draw(img).rectangle((100, 0, 199, 99), fill=1)
    buf = io.BytesIO()
    img.save(buf, "PNG", transparency=0)  # the red half is see-through
    result = analyze(buf.getvalue(), facts_for(img, "PNG"))
    assert sorted(c["hex"] for c in result["dominant_colors"]) == ["#0000ff", "#ffffff"]


@pytest.mark.parametrize("size", [(1, 1), (1000, 1), (2, 700)])
def test_degenerate_sizes(size: tuple[int, int]) -> None:
    result = run(Image.new("RGB", size, (10, 20, 30)), "PNG")
    assert result["sharpness"] == 0.0
    assert result["is_blank"] is True
    assert close(result["dominant_colors"][0]["hex"], (10, 20, 30), tolerance=0)


def test_undecodable_bytes_raise() -> None:
    with pytest.raises(OSError):
        analyze(b"definitely not an image", facts_for(Image.new("RGB", (1, 1))))
