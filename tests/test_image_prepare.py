"""services/fetcher/image.py: identification, bomb guard, decoding, orientation, output.

Every image is real: generated here with Pillow or made from scikit-image's bundled photos.
"""

from __future__ import annotations

import hashlib
import io
import struct
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageFile, JpegImagePlugin
from skimage import data as skdata

from imagestream.common.errors import ErrorClass, ItemError
from imagestream.fetcher import image
from imagestream.fetcher.image import Prepared, check_head, prepare, sniff

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)


# --------------------------------------------------------------------------------------
# helpers


def encode(im: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, fmt, **params)
    return buffer.getvalue()


def decode(prepared: Prepared) -> Image.Image:
    im = Image.open(io.BytesIO(prepared.data))
    im.load()
    assert im.size == (prepared.width, prepared.height)
    expected = {"image/jpeg": "JPEG", "image/png": "PNG"}[prepared.media_type]
    assert im.format == expected
    return im


def error_of(data: bytes, **params: Any) -> ItemError:
    with pytest.raises(ItemError) as caught:
        prepare(data, **params)
    return caught.value


def mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    assert a.size == b.size
    return float(
        np.mean(
            np.abs(
                np.asarray(a.convert("RGB"), dtype=np.int16)
                - np.asarray(b.convert("RGB"), dtype=np.int16)
            )
        )
    )


@pytest.fixture(scope="module")
def coffee() -> Image.Image:
    """A real 600x400 photo (landscape, so a width/height swap shows)."""
    return Image.fromarray(np.asarray(skdata.coffee()))  # type: ignore[no-untyped-call]


@pytest.fixture(scope="module")
def photo_1200(coffee: Image.Image) -> Image.Image:
    """A 1200x800 photo: larger than the 768 px target in every format."""
    return coffee.resize((1200, 800), Image.Resampling.LANCZOS)


def marked(size: tuple[int, int]) -> Image.Image:
    """A grey image with a red square in its stored top-left corner."""
    im = Image.new("RGB", size, (128, 128, 128))
    side = max(8, min(size) // 8)
    im.paste(RED, (0, 0, side, side))
    return im


def corner_colours(im: Image.Image) -> dict[str, tuple[int, int, int]]:
    rgb = np.asarray(im.convert("RGB"), dtype=np.int16)
    h, w = rgb.shape[:2]
    d = max(2, min(w, h) // 32)
    patches = {
        "top_left": rgb[:d, :d],
        "top_right": rgb[:d, w - d :],
        "bottom_left": rgb[h - d :, :d],
        "bottom_right": rgb[h - d :, w - d :],
    }
    return {
        name: tuple(int(v) for v in p.reshape(-1, 3).mean(axis=0))  # type: ignore[misc]
        for name, p in patches.items()
    }


def is_red(colour: tuple[int, int, int]) -> bool:
    r, g, b = colour
    return r > 200 and g < 60 and b < 60


def exif_with(**tags: Any) -> Image.Exif:
    exif = Image.Exif()
    for name, value in tags.items():
        exif[getattr(ExifTags.Base, name)] = value
    return exif


# --------------------------------------------------------------------------------------
# formats


FORMATS = [
    pytest.param("JPEG", {"quality": 90}, id="jpeg"),
    pytest.param("PNG", {}, id="png"),
    pytest.param("GIF", {}, id="gif"),
    pytest.param("WEBP", {"quality": 90}, id="webp"),
    pytest.param("BMP", {}, id="bmp"),
    pytest.param("TIFF", {"compression": "tiff_lzw"}, id="tiff"),
    pytest.param("AVIF", {"quality": 90}, id="avif"),
    pytest.param("HEIF", {"quality": 90}, id="heif"),
]


@pytest.mark.parametrize(("fmt", "params"), FORMATS)
def test_format_round_trip(fmt: str, params: dict[str, Any], photo_1200: Image.Image) -> None:
    original = encode(photo_1200, fmt, **params)
    assert sniff(original) == fmt
    check_head(original[:64])  # the fetcher's early check lets every supported format in

    prepared = prepare(original)

    facts = prepared.facts
    assert (facts.width, facts.height) == (1200, 800)
    assert facts.format == fmt
    assert facts.mode == ("P" if fmt == "GIF" else "RGB")
    assert facts.frames == 1
    assert facts.bytes == len(original)
    assert facts.sha256 == hashlib.sha256(original).hexdigest()
    assert facts.exif is None
    assert (prepared.width, prepared.height) == (768, 512)
    assert prepared.media_type == "image/jpeg"
    out = decode(prepared)
    reference = photo_1200.resize((768, 512), Image.Resampling.LANCZOS)
    # Lossy sources (JPEG, WebP, AVIF, HEIF, a 256-colour GIF) plus one JPEG re-encode.
    assert mean_abs_diff(out, reference) < (12 if fmt == "GIF" else 6)


def test_small_images_are_never_upscaled(coffee: Image.Image) -> None:
    small = coffee.resize((120, 80))
    prepared = prepare(encode(small, "PNG"), target_long_side=768)
    assert (prepared.width, prepared.height) == (120, 80)
    assert mean_abs_diff(decode(prepared), small) < 8


def test_target_long_side_is_honoured_for_portrait(coffee: Image.Image) -> None:
    portrait = coffee.transpose(Image.Transpose.ROTATE_90).resize((900, 1350))
    prepared = prepare(encode(portrait, "PNG"), target_long_side=300)
    assert (prepared.width, prepared.height) == (200, 300)


# --------------------------------------------------------------------------------------
# JPEG: reduced-size decoding and passthrough


def test_large_jpeg_uses_draft_and_reaches_the_target(
    photo_1200: Image.Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = photo_1200.resize((4000, 3000), Image.Resampling.BICUBIC)
    original = encode(big, "JPEG", quality=90)
    drafts: list[tuple[str | None, tuple[int, int] | None, Any]] = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(
        self: JpegImagePlugin.JpegImageFile, mode: str | None, size: tuple[int, int] | None
    ) -> Any:
        result = real_draft(self, mode, size)
        drafts.append((mode, size, result))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    prepared = prepare(original, target_long_side=768)

    assert (prepared.facts.width, prepared.facts.height) == (4000, 3000)
    assert (prepared.width, prepared.height) == (768, 576)
    assert len(drafts) == 1
    _, size, result = drafts[0]
    assert size == (768, 576)
    # libjpeg decoded at 1/4 scale: 1000x750, the largest scale still >= the target.
    assert result is not None
    assert result[1] == (0, 0, 1000.0, 750.0)
    reference = big.resize((768, 576), Image.Resampling.LANCZOS)
    assert mean_abs_diff(decode(prepared), reference) < 6


def test_small_upright_jpeg_is_passed_through(coffee: Image.Image) -> None:
    original = encode(coffee, "JPEG", quality=90)
    prepared = prepare(original, target_long_side=768)
    assert prepared.data == original
    assert prepared.media_type == "image/jpeg"
    assert (prepared.width, prepared.height) == (600, 400)


def test_jpeg_larger_than_target_is_not_passed_through(coffee: Image.Image) -> None:
    original = encode(coffee, "JPEG", quality=90)
    prepared = prepare(original, target_long_side=300)
    assert prepared.data != original
    assert (prepared.width, prepared.height) == (300, 200)


def test_bloated_small_jpeg_is_re_encoded(coffee: Image.Image) -> None:
    # A 600x400 JPEG carrying 420 kB of application segments (> 1 byte per pixel).
    original = encode(coffee, "JPEG", quality=90)
    bloated = original[:2] + b"".join(
        b"\xff\xe9" + struct.pack(">H", 60_002) + bytes(60_000) for _ in range(7)
    )
    bloated += original[2:]
    prepared = prepare(bloated)
    assert prepared.data != bloated
    assert len(prepared.data) < len(bloated) // 4
    assert (prepared.width, prepared.height) == (600, 400)


# --------------------------------------------------------------------------------------
# EXIF orientation


@pytest.mark.parametrize(
    ("orientation", "red_corner"),
    [(1, "top_left"), (3, "bottom_right"), (6, "top_right"), (8, "bottom_left")],
)
@pytest.mark.parametrize("stored", [(600, 400), (3000, 2000)], ids=["small", "large"])
def test_exif_orientation_makes_the_output_upright(
    orientation: int, red_corner: str, stored: tuple[int, int]
) -> None:
    exif = exif_with(Orientation=orientation)
    original = encode(marked(stored), "JPEG", quality=95, exif=exif)

    prepared = prepare(original, target_long_side=768)

    swapped = orientation in (6, 8)
    displayed = (stored[1], stored[0]) if swapped else stored
    assert (prepared.facts.width, prepared.facts.height) == displayed
    assert prepared.facts.exif is not None
    assert prepared.facts.exif.orientation == orientation
    long_side = min(max(stored), 768)
    assert max(prepared.width, prepared.height) == long_side
    assert (prepared.width > prepared.height) == (displayed[0] > displayed[1])
    if orientation != 1:
        assert prepared.data != original
    corners = corner_colours(decode(prepared))
    assert is_red(corners[red_corner]), corners
    assert sum(is_red(c) for c in corners.values()) == 1, corners


def test_orientation_in_a_png_exif_chunk_is_applied() -> None:
    original = encode(marked((300, 200)), "PNG", exif=exif_with(Orientation=6))
    prepared = prepare(original)
    assert (prepared.facts.width, prepared.facts.height) == (200, 300)
    assert (prepared.width, prepared.height) == (200, 300)
    assert is_red(corner_colours(decode(prepared))["top_right"])


# --------------------------------------------------------------------------------------
# EXIF summary


def test_exif_summary_fields() -> None:
    exif = exif_with(Make="Canon", Model="Canon EOS 5D", Orientation=1)
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.DateTimeOriginal] = "2021:06:01 12:34:56"
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (52.0, 22.0, 30.0)
    gps[ExifTags.GPS.GPSLongitudeRef] = "E"
    gps[ExifTags.GPS.GPSLongitude] = (4.0, 53.0, 0.0)
    original = encode(Image.new("RGB", (64, 48), BLUE), "JPEG", exif=exif)

    summary = prepare(original).facts.exif

    assert summary is not None
    assert summary.camera == "Canon EOS 5D"
    assert summary.taken_at == "2021-06-01T12:34:56"
    assert summary.orientation == 1
    assert summary.has_gps is True


@pytest.mark.parametrize(
    ("make", "model", "camera"),
    [
        ("Canon", "Canon EOS 5D", "Canon EOS 5D"),
        ("NIKON CORPORATION", "NIKON D750", "NIKON D750"),
        ("Apple", "iPhone 12", "Apple iPhone 12"),
        ("  SONY\x00\x00", " ILCE-7M3 ", "SONY ILCE-7M3"),
        ("", "Pixel 7", "Pixel 7"),
        ("FUJIFILM", "", "FUJIFILM"),
    ],
)
def test_exif_camera_name(make: str, model: str, camera: str) -> None:
    exif = Image.Exif()
    if make:
        exif[ExifTags.Base.Make] = make
    if model:
        exif[ExifTags.Base.Model] = model
    original = encode(Image.new("RGB", (32, 32), GREEN), "JPEG", exif=exif)
    summary = prepare(original).facts.exif
    assert summary is not None
    assert summary.camera == camera


def test_exif_placeholders_are_not_reported() -> None:
    exif = exif_with(Software="editor 1.0")
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.DateTimeOriginal] = "0000:00:00 00:00:00"
    # A GPS IFD with only its version tag has no position.
    exif.get_ifd(ExifTags.IFD.GPSInfo)[ExifTags.GPS.GPSVersionID] = b"\x02\x02\x00\x00"
    original = encode(Image.new("RGB", (32, 32), GREEN), "JPEG", exif=exif)
    assert prepare(original).facts.exif is None

    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.DateTimeOriginal] = "2020:02:30 10:00:00"
    exif[ExifTags.Base.Model] = "X100V"
    summary = prepare(encode(Image.new("RGB", (32, 32), GREEN), "JPEG", exif=exif)).facts.exif
    assert summary is not None
    assert summary.camera == "X100V"
    assert summary.taken_at is None  # February 30th is no date
    assert summary.has_gps is False


def test_no_exif_gives_none(coffee: Image.Image) -> None:
    assert prepare(encode(coffee, "JPEG")).facts.exif is None
    assert prepare(encode(coffee, "PNG")).facts.exif is None


# --------------------------------------------------------------------------------------
# corrupt, non-image and unsupported content


@pytest.mark.parametrize("size", [(600, 400), (3000, 2000)], ids=["passthrough", "draft"])
@pytest.mark.parametrize("keep", [0.5, 0.95])
def test_truncated_jpeg_is_a_decode_error(
    coffee: Image.Image, size: tuple[int, int], keep: float
) -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    original = encode(coffee.resize(size), "JPEG", quality=90)
    error = error_of(original[: int(len(original) * keep)])
    assert error.error_class is ErrorClass.DECODE_ERROR
    assert "JPEG" in error.message
    assert "truncated" in error.message


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "GIF"])
def test_truncated_images_are_decode_errors(coffee: Image.Image, fmt: str) -> None:
    original = encode(coffee, fmt)
    error = error_of(original[: len(original) // 2])
    assert error.error_class is ErrorClass.DECODE_ERROR


def test_corrupt_png_is_a_decode_error(coffee: Image.Image) -> None:
    original = bytearray(encode(coffee, "PNG"))
    idat = original.index(b"IDAT")
    original[idat + 100 : idat + 140] = bytes(40)  # breaks the zlib stream and the CRC
    error = error_of(bytes(original))
    assert error.error_class is ErrorClass.DECODE_ERROR


def test_header_only_png_is_a_decode_error() -> None:
    ihdr = struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")
    error = error_of(png)
    assert error.error_class is ErrorClass.DECODE_ERROR


NOT_IMAGES = [
    pytest.param(
        b"<!DOCTYPE html>\n<html lang='en'><head><title>Not found</title></head></html>",
        "HTML page",
        id="html",
    ),
    pytest.param(b"\n\n  <html><body>302 Found</body></html>", "HTML page", id="html-blank"),
    pytest.param(b"\xef\xbb\xbf<!doctype HTML><meta charset=utf-8>", "HTML page", id="html-bom"),
    pytest.param(b'{"error": "not found", "status": 404}', "JSON document", id="json"),
    pytest.param(b'[{"url": "https://example.com/a.jpg"}]', "JSON document", id="json-list"),
    pytest.param(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>", "PDF", id="pdf"),
    pytest.param(b"Access denied. Your IP has been blocked.\n", "plain text", id="text"),
    pytest.param("Zugriff verweigert: ä ö ü ß\n".encode(), "plain text", id="text-utf8"),
    pytest.param(b"PK\x03\x04\x14\x00\x00\x00\x08\x00", "ZIP archive", id="zip"),
    pytest.param(b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom", "MP4", id="mp4"),
    pytest.param(b"\x00\x01\x02\x03\x04\x05\x06\x07\xfe\xfd", "unrecognised", id="binary"),
    pytest.param(b"", "empty", id="empty"),
]


@pytest.mark.parametrize(("body", "kind"), NOT_IMAGES)
def test_non_images_are_rejected_early_and_on_prepare(body: bytes, kind: str) -> None:
    assert sniff(body) is None
    with pytest.raises(ItemError) as early:
        check_head(body[:64])
    assert early.value.error_class is ErrorClass.NOT_AN_IMAGE
    assert kind in early.value.message
    assert early.value.message.endswith("not an image")
    error = error_of(body)
    assert error.error_class is ErrorClass.NOT_AN_IMAGE
    assert kind in error.message


SVG = (
    b'<?xml version="1.0" encoding="UTF-8" standalone="no"?>\n'
    b'<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" '
    b'"http://www.w3.org/Graphics/SVG/1.1/DTD/svg11.dtd">\n'
    b"<!-- Generator: a drawing program -->\n"
    b'<svg xmlns="http://www.w3.org/2000/svg" width="100" height="100">'
    b'<circle cx="50" cy="50" r="40" fill="red"/></svg>\n'
)


@pytest.mark.parametrize(
    "body", [SVG, b'<svg xmlns="http://www.w3.org/2000/svg"><rect/></svg>'], ids=["xml", "bare"]
)
def test_svg_is_unsupported(body: bytes) -> None:
    assert sniff(body) == "SVG"
    with pytest.raises(ItemError) as early:
        check_head(body[: image.SNIFF_BYTES])
    assert early.value.error_class is ErrorClass.UNSUPPORTED_FORMAT
    assert "vector" in early.value.message
    error = error_of(body)
    assert error.error_class is ErrorClass.UNSUPPORTED_FORMAT
    assert "SVG" in error.message


def test_svg_past_a_short_head_is_left_to_prepare() -> None:
    # The first 64 bytes are only the XML declaration: undecidable, so not rejected yet.
    check_head(SVG[:64])
    assert error_of(SVG).error_class is ErrorClass.UNSUPPORTED_FORMAT
    # An XML document that is no SVG is no image.
    rss = b'<?xml version="1.0"?>\n<rss version="2.0"><channel><title>x</title></channel></rss>'
    check_head(rss[:32])
    error = error_of(rss)
    assert error.error_class is ErrorClass.NOT_AN_IMAGE
    assert "XML" in error.message


def test_unsupported_raster_formats(coffee: Image.Image) -> None:
    ico = encode(coffee.resize((64, 64)), "ICO")
    psd_head = b"8BPS\x00\x01\x00\x00\x00\x00\x00\x00\x00\x03"
    jp2_head = b"\x00\x00\x00\x0cjP  \r\n\x87\n\x00\x00\x00\x14ftypjp2 "
    for body, name in [(ico, "ICO"), (psd_head, "PSD"), (jp2_head, "JPEG2000")]:
        assert sniff(body) == name
        with pytest.raises(ItemError) as early:
            check_head(body[:64])
        assert early.value.error_class is ErrorClass.UNSUPPORTED_FORMAT
        assert error_of(body).error_class is ErrorClass.UNSUPPORTED_FORMAT


def test_heif_without_or_with_the_plugin() -> None:
    heic_head = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(40)
    assert sniff(heic_head) == "HEIF"
    if image.HEIF_AVAILABLE:
        check_head(heic_head)
        assert error_of(heic_head).error_class is ErrorClass.DECODE_ERROR
    else:
        with pytest.raises(ItemError) as early:
            check_head(heic_head)
        assert early.value.error_class is ErrorClass.UNSUPPORTED_FORMAT
        assert "pillow-heif" in early.value.message


def test_avif_is_told_apart_from_heif_and_video() -> None:
    avif = b"\x00\x00\x00\x20ftypavif\x00\x00\x00\x00avifmif1miafMA1B"
    assert sniff(avif) == "AVIF"
    assert sniff(b"\x00\x00\x00\x1cftypmif1\x00\x00\x00\x00mif1avifmiaf") == "AVIF"
    assert sniff(b"\x00\x00\x00\x14ftypqt  \x00\x00\x00\x00qt  ") is None


def test_text_starting_like_a_bitmap_is_not_a_bitmap() -> None:
    assert sniff(b"BMW dealers near you, open on Sundays") is None
    with pytest.raises(ItemError) as early:
        check_head(b"BMW dealers near you, open on Sundays")
    assert early.value.error_class is ErrorClass.NOT_AN_IMAGE


# --------------------------------------------------------------------------------------
# decompression bombs


def chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


def png_bomb(width: int, height: int) -> bytes:
    """A valid grayscale PNG of zeros: a few hundred kB that decode to width*height bytes."""
    compressor = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte + pixels
    parts = [compressor.compress(row) for _ in range(height)]
    parts.append(compressor.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", b"".join(parts))
        + chunk(b"IEND", b"")
    )


@pytest.fixture
def no_pixel_buffers(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, int]]]:
    """Records every pixel buffer an ImageFile allocates for decoding."""
    allocations: list[tuple[int, int]] = []
    real = ImageFile.ImageFile.load_prepare

    def spy(self: ImageFile.ImageFile) -> None:
        allocations.append(self.size)
        real(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load_prepare", spy)
    yield allocations


@pytest.mark.parametrize(
    ("width", "height"),
    [(100_000, 100_000), (12_000, 12_000), (8_000, 8_000)],
    ids=["10G-pixels", "144M-pixels", "64M-pixels"],
)
def test_png_bomb_is_refused_from_its_header(
    width: int, height: int, no_pixel_buffers: list[tuple[int, int]]
) -> None:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(bytes(width + 1) * 4)  # a few rows: the header is what counts
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    error = error_of(bomb, max_pixels=50_000_000)
    assert error.error_class is ErrorClass.IMAGE_TOO_LARGE
    assert f"{width}x{height}" in error.message
    assert no_pixel_buffers == []


def test_bomb_limit_is_the_callers(coffee: Image.Image) -> None:
    original = encode(coffee, "PNG")  # 600x400 = 240,000 pixels
    assert error_of(original, max_pixels=239_999).error_class is ErrorClass.IMAGE_TOO_LARGE
    assert prepare(original, max_pixels=240_000).facts.width == 600


def test_webp_bomb_is_refused_before_pillow_opens_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An extended-format (VP8X) header claiming a 16000x16000 canvas; Pillow's WebP plugin
    # would allocate that canvas (1 GB) on open, so it must never be reached.
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00\x00\x00\x00"
    vp8x += (16000 - 1).to_bytes(3, "little") + (16000 - 1).to_bytes(3, "little")
    body = b"WEBP" + vp8x + bytes(64)
    webp = b"RIFF" + struct.pack("<I", len(body)) + body
    opened: list[bool] = []
    monkeypatch.setitem(image._OPENERS, "WEBP", lambda fp: opened.append(True))
    error = error_of(webp)
    assert error.error_class is ErrorClass.IMAGE_TOO_LARGE
    assert "16000x16000" in error.message
    assert opened == []


_BOMB_CHILD = textwrap.dedent(
    """
    import sys, struct, zlib
    from imagestream.fetcher.image import prepare
    from imagestream.common.errors import ItemError
    def peak_rss_kb():
        # VmHWM belongs to this process image. ru_maxrss would not do: Linux carries the
        # parent's peak over into a child started with vfork + exec.
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    width = height = 12_000
    compressor = zlib.compressobj(9)
    row = bytes(width + 1)
    parts = [compressor.compress(row) for _ in range(height)] + [compressor.flush()]
    def chunk(kind, payload):
        crc = struct.pack(">I", zlib.crc32(kind + payload))
        return struct.pack(">I", len(payload)) + kind + payload + crc
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    bomb = (b"\\x89PNG\\r\\n\\x1a\\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts))
            + chunk(b"IEND", b""))
    del parts
    before = peak_rss_kb()
    try:
        prepare(bomb, max_pixels=int(sys.argv[1]))
        outcome = "ok"
    except ItemError as error:
        outcome = str(error.error_class)
    after = peak_rss_kb()
    print(outcome, len(bomb), (after - before) // 1024)
    """
)


def run_bomb_child(max_pixels: int) -> tuple[str, int, int]:
    done = subprocess.run(
        [sys.executable, "-c", _BOMB_CHILD, str(max_pixels)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    outcome, size, grown_mb = done.stdout.split()
    return outcome, int(size), int(grown_mb)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_real_png_bomb_uses_no_memory() -> None:
    # A real 12000x12000 PNG (144 M pixels, over Pillow's own warning threshold) of a few
    # hundred kB: refused from its header, the peak RSS of the process does not move.
    outcome, size, grown_mb = run_bomb_child(max_pixels=50_000_000)
    assert outcome == "image_too_large"
    assert size < 1_000_000
    assert grown_mb < 16
    # Control: with the guard lifted the same file does allocate its 144 MB, so the
    # measurement above would have seen it.
    outcome, _, grown_mb = run_bomb_child(max_pixels=10**9)
    assert outcome == "ok"
    assert grown_mb > 100


# --------------------------------------------------------------------------------------
# animation


def frames_of(colours: list[tuple[int, int, int]], size: tuple[int, int]) -> list[Image.Image]:
    return [Image.new("RGB", size, colour) for colour in colours]


@pytest.mark.parametrize(
    ("fmt", "params"),
    [
        ("GIF", {"duration": 100, "loop": 0}),
        ("WEBP", {"duration": 100, "loop": 0, "lossless": True}),
        ("PNG", {"duration": 100, "loop": 0}),  # APNG
    ],
)
def test_animated_images_give_their_first_frame(fmt: str, params: dict[str, Any]) -> None:
    first, *rest = frames_of([RED, GREEN, BLUE, GREEN, BLUE], (320, 200))
    original = encode(first, fmt, save_all=True, append_images=rest, **params)

    prepared = prepare(original)

    assert prepared.facts.frames == 5
    assert prepared.facts.format == fmt
    assert (prepared.width, prepared.height) == (320, 200)
    colours = corner_colours(decode(prepared))
    assert all(is_red(c) for c in colours.values()), colours


# --------------------------------------------------------------------------------------
# modes


def test_rgba_with_transparency_stays_png_with_alpha(coffee: Image.Image) -> None:
    rgba = coffee.convert("RGBA")
    alpha = Image.new("L", rgba.size, 255)
    alpha.paste(0, (0, 0, 300, 400))  # the left half is fully transparent
    rgba.putalpha(alpha)

    prepared = prepare(encode(rgba, "PNG"))

    assert prepared.facts.mode == "RGBA"
    assert prepared.media_type == "image/png"
    out = decode(prepared)
    assert out.mode == "RGBA"
    out_alpha = np.asarray(out.getchannel("A"))
    assert out_alpha[:, :280].max() == 0
    assert out_alpha[:, 320:].min() == 255


def test_opaque_rgba_becomes_jpeg(coffee: Image.Image) -> None:
    prepared = prepare(encode(coffee.convert("RGBA"), "PNG"))
    assert prepared.facts.mode == "RGBA"
    assert prepared.media_type == "image/jpeg"
    assert mean_abs_diff(decode(prepared), coffee) < 4


def test_palette_with_and_without_transparency(coffee: Image.Image) -> None:
    palette = coffee.quantize(64)
    opaque = prepare(encode(palette, "PNG"))
    assert opaque.facts.mode == "P"
    assert opaque.media_type == "image/jpeg"
    assert mean_abs_diff(decode(opaque), palette) < 5

    transparent_index = int(np.asarray(palette)[0, 0])
    clear = prepare(encode(palette, "PNG", transparency=transparent_index))
    assert clear.media_type == "image/png"
    out = decode(clear)
    assert out.mode == "RGBA"
    r, g, b = np.asarray(palette.convert("RGB"))[0, 0]
    assert out.getpixel((0, 0)) == (r, g, b, 0)


def test_transparent_gif_becomes_png() -> None:
    im = Image.new("P", (100, 60), 0)
    im.putpalette([*RED, *BLUE] + [0] * 762)
    im.paste(1, (50, 0, 100, 60))
    prepared = prepare(encode(im, "GIF", transparency=1))
    assert prepared.facts.format == "GIF"
    assert prepared.media_type == "image/png"
    out = decode(prepared).convert("RGBA")
    assert out.getpixel((10, 10)) == (*RED, 255)
    assert out.getpixel((90, 10))[3] == 0  # type: ignore[index]


def test_la_with_transparency_stays_png() -> None:
    la = Image.merge(
        "LA", [Image.new("L", (80, 40), 200), Image.linear_gradient("L").resize((80, 40))]
    )
    prepared = prepare(encode(la, "PNG"))
    assert prepared.facts.mode == "LA"
    assert prepared.media_type == "image/png"
    assert decode(prepared).mode == "LA"


def test_cmyk_jpeg_and_tiff_become_rgb() -> None:
    cmyk = Image.new("CMYK", (200, 100), (0, 255, 255, 0))  # red ink
    cmyk.paste((255, 255, 0, 0), (100, 0, 200, 100))  # blue ink
    for fmt in ("JPEG", "TIFF"):
        prepared = prepare(encode(cmyk, fmt))
        assert prepared.facts.mode == "CMYK"
        out = decode(prepared)
        assert out.mode == "RGB"
        left = out.getpixel((20, 50))
        right = out.getpixel((180, 50))
        assert is_red(left), left  # type: ignore[arg-type]
        assert right[2] > 200 and right[0] < 60, right  # type: ignore[index]


def test_16_bit_grayscale_is_scaled_not_clipped() -> None:
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (64, 1))
    im16 = Image.fromarray(ramp)
    assert im16.mode == "I;16"
    prepared = prepare(encode(im16, "PNG"))
    assert prepared.facts.mode == "I;16"
    out = np.asarray(decode(prepared), dtype=np.int16)
    assert decode(prepared).mode == "L"
    # Pillow's own I;16 -> L conversion would clip: everything above 255/65535 white.
    assert abs(int(out[:, 128].mean()) - 128) <= 3
    assert out[:, 0].mean() < 3
    assert out[:, 255].mean() > 252


def test_float_and_bilevel_images() -> None:
    grad = np.tile(np.linspace(-1.0, 3.0, 200, dtype=np.float32), (50, 1))
    prepared = prepare(encode(Image.fromarray(grad), "TIFF"))
    assert prepared.facts.mode == "F"
    out = np.asarray(decode(prepared), dtype=np.int16)
    assert out[:, 0].mean() < 4 and out[:, -1].mean() > 251

    bilevel = Image.new("1", (64, 64), 0)
    bilevel.paste(1, (32, 0, 64, 64))
    prepared = prepare(encode(bilevel, "PNG"))
    assert prepared.facts.mode == "1"
    out = np.asarray(decode(prepared), dtype=np.int16)
    assert out[:, :28].max() < 30 and out[:, 36:].min() > 225


# --------------------------------------------------------------------------------------
# determinism and threads


def test_same_bytes_give_the_same_output(photo_1200: Image.Image) -> None:
    original = encode(photo_1200, "JPEG", quality=90)
    first, second = prepare(original), prepare(original)
    assert first.data == second.data
    assert first.facts == second.facts
    again = encode(photo_1200, "PNG")
    assert prepare(again).data == prepare(again).data


def test_threads_give_the_sequential_results(photo_1200: Image.Image) -> None:
    originals = [
        encode(photo_1200.resize((1200 + 40 * i, 800)), fmt)
        for i, fmt in enumerate(["JPEG", "PNG", "WEBP", "JPEG", "GIF", "TIFF"] * 2)
    ]
    sequential = [prepare(o).data for o in originals]
    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(pool.map(lambda o: prepare(o).data, originals))
    assert threaded == sequential
    assert len(set(sequential)) == len(originals)


def test_invalid_arguments_are_programming_errors(coffee: Image.Image) -> None:
    original = encode(coffee, "PNG")
    with pytest.raises(ValueError, match="target_long_side"):
        prepare(original, target_long_side=0)
    with pytest.raises(ValueError, match="jpeg_quality"):
        prepare(original, jpeg_quality=101)


# --------------------------------------------------------------------------------------
# corrupt input never escapes as anything but ItemError


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"])
def test_mutated_files_fail_only_as_item_errors(coffee: Image.Image, fmt: str) -> None:
    original = encode(coffee.resize((150, 100)), fmt)
    rng = np.random.default_rng(sum(fmt.encode()))
    classes: set[ErrorClass] = set()
    for i in range(60):
        data = bytearray(original)
        if i % 3 == 0:  # flip a few bytes anywhere, headers included
            for at in rng.integers(0, len(data), size=4):
                data[int(at)] = int(rng.integers(256))
        elif i % 3 == 1:  # cut short
            data = data[: int(rng.integers(1, len(data)))]
        else:  # overwrite a run with noise
            at = int(rng.integers(0, len(data)))
            data[at : at + 32] = rng.integers(0, 256, size=32, dtype=np.uint8).tobytes()
        try:
            prepared = prepare(bytes(data))
        except ItemError as error:
            classes.add(error.error_class)
        else:  # damage the decoder cannot see (e.g. in pixel data) still gives an image
            assert 1 <= max(prepared.width, prepared.height) <= 768
            decode(prepared)
    assert ErrorClass.DECODE_ERROR in classes
    assert classes <= {
        ErrorClass.DECODE_ERROR,
        ErrorClass.NOT_AN_IMAGE,
        ErrorClass.UNSUPPORTED_FORMAT,
        ErrorClass.IMAGE_TOO_LARGE,
    }
