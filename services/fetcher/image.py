"""Identify, check, decode, orient and downscale one downloaded image.

This is the CPU-bound hot path of the fetcher, pure and synchronous: the service runs
``prepare`` in a thread pool (Pillow releases the GIL while it decodes, resizes and
encodes). Nothing here touches module-level mutable state, so calls are thread-safe, and
the same input bytes always give the same output bytes.

- ``check_head`` looks at the first bytes of a download and rejects what is certainly not
  a supported image (HTML, JSON, PDF, text, SVG...) before the rest of the body arrives.
- ``prepare`` identifies the content by its magic bytes (never by Content-Type), guards
  against decompression bombs from the header, decodes the first frame (JPEGs with
  reduced-size DCT decoding), downscales it with HAMMING, applies the EXIF orientation and
  encodes the analysis image once, as JPEG, or as PNG when it has real transparency. A
  small upright JPEG is passed through as is, never re-encoded.

Decompression bombs. A header can claim 100000 x 100000 pixels in a few hundred bytes.
``prepare`` compares width x height with ``max_pixels`` after the header is parsed and
before any pixel buffer exists. To make that check the first one, the image is opened with
the plugin class of the sniffed format instead of ``Image.open``: ``Image.open`` runs
Pillow's own check against the process-global ``Image.MAX_IMAGE_PIXELS`` first, and that
one only *warns* between 1x and 2x the limit (a warning our tests turn into an error).
Setting ``MAX_IMAGE_PIXELS`` per call to our limit would race between pool threads, and
setting it to ``None`` would switch off the checks Pillow makes inside its decoders (GIF
frames larger than the screen, TIFF tiles), so it is left alone as a second line of
defence; its error and warning still map to IMAGE_TOO_LARGE. WebP is checked before it is
opened at all, because Pillow's WebP plugin allocates the canvas when it opens the file.

``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set here: a truncated image must fail as
DECODE_ERROR instead of being padded with grey.
"""

from __future__ import annotations

import hashlib
import io
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any, Final

import numpy as np
from PIL import (
    AvifImagePlugin,
    BmpImagePlugin,
    ExifTags,
    GifImagePlugin,
    Image,
    ImageFile,
    JpegImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    WebPImagePlugin,
    features,
)

from imagestream.common.errors import ErrorClass, ItemError
from imagestream.common.messages import ExifSummary, ImageFacts

try:
    from PIL import ImageCms
except ImportError:  # Pillow built without LittleCMS: CMYK falls back to a naive conversion
    ImageCms = None  # type: ignore[assignment]

__all__ = [
    "HEIF_AVAILABLE",
    "SNIFF_BYTES",
    "SUPPORTED_FORMATS",
    "Prepared",
    "check_head",
    "prepare",
    "sniff",
]

#: How many leading bytes ``check_head`` needs to tell every non-image it can apart
#: (SVG after an XML prolog and a DOCTYPE). With fewer it still rejects what it can see
#: and leaves the undecidable rest (some XML) to ``prepare``.
SNIFF_BYTES: Final = 512

_Opener = Callable[[IO[bytes]], ImageFile.ImageFile]

_heif_opener: _Opener | None
try:
    # HEIC/HEIF (iPhone photos) needs libheif, which Pillow does not bundle. pillow-heif is
    # its maintained Pillow plugin; without it HEIC fails clearly as UNSUPPORTED_FORMAT.
    import pillow_heif
except ImportError:
    _heif_opener = None
else:
    pillow_heif.register_heif_opener()
    _heif_opener = pillow_heif.HeifImageFile

#: Whether HEIC/HEIF images can be decoded (the optional pillow-heif plugin is installed).
HEIF_AVAILABLE: Final = _heif_opener is not None

# Pillow's plugin class (or factory) for each format we decode, keyed by the name
# ``sniff`` returns. ``jpeg_factory`` returns an MpoImageFile for multi-picture JPEGs.
_OPENERS: dict[str, _Opener] = {
    "JPEG": JpegImagePlugin.jpeg_factory,
    "PNG": PngImagePlugin.PngImageFile,
    "GIF": GifImagePlugin.GifImageFile,
    "BMP": BmpImagePlugin.BmpImageFile,
    "TIFF": TiffImagePlugin.TiffImageFile,
}
if features.check("webp"):
    _OPENERS["WEBP"] = WebPImagePlugin.WebPImageFile
if features.check("avif"):
    _OPENERS["AVIF"] = AvifImagePlugin.AvifImageFile
if _heif_opener is not None:
    _OPENERS["HEIF"] = _heif_opener

#: The formats ``prepare`` decodes, as ``sniff`` names them (Pillow's format names).
SUPPORTED_FORMATS: Final = frozenset(_OPENERS)

# Raster formats we recognise but do not decode, with the name users know them by.
# ICO/CUR hold several images whose real sizes are only known once each is decoded, so
# the header check cannot guard them (and favicons are not analysis material); JPEG 2000
# decoding is slow and has a long history of decoder CVEs; the rest are niche or layered
# formats whose rendering would not match what a browser shows.
_UNSUPPORTED_RASTER: dict[str, str] = {
    "JPEG2000": "JPEG 2000",
    "JPEGXL": "JPEG XL",
    "PSD": "Photoshop (PSD)",
    "ICO": "ICO icon",
    "CUR": "CUR cursor",
    "QOI": "QOI",
    "DDS": "DDS texture",
    "EXR": "OpenEXR",
    "HDR": "Radiance HDR",
    "PNM": "Netpbm (PNM)",
    "CR2": "Canon CR2 camera raw",
}
_VECTOR: dict[str, str] = {"SVG": "SVG", "EPS": "PostScript/EPS"}

_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00\x10\x00\x00\x00CR", "CR2"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),  # BigTIFF
    (b"MM\x00+", "TIFF"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG2000"),
    (b"\xff\x4f\xff\x51", "JPEG2000"),  # bare codestream
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEGXL"),
    (b"\xff\x0a", "JPEGXL"),  # bare codestream
    (b"8BPS", "PSD"),
    (b"qoif", "QOI"),
    (b"DDS ", "DDS"),
    (b"v/1\x01", "EXR"),
    (b"#?RADIANCE", "HDR"),
    (b"#?RGBE", "HDR"),
    (b"%!PS", "EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),  # DOS EPS binary header
)
# ISO base media file format ("ftyp" box) brands: AVIF and HEIF are stills in the same
# container as MP4 and QuickTime video, told apart by the major and compatible brands.
_AVIF_BRANDS: Final = frozenset({b"avif", b"avis"})
_HEIF_BRANDS: Final = frozenset(
    {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}
)
# BITMAPINFOHEADER sizes (OS/2 v1, v2, Windows v3, v4, v5 and the Adobe variants); checked
# so that text starting with "BM" is not taken for a bitmap.
_BMP_HEADER_SIZES: Final = frozenset({12, 16, 40, 52, 56, 64, 108, 124})
_PNM = re.compile(rb"P[1-7][ \t\r\n]")
_BINARY_KINDS: tuple[tuple[bytes, str], ...] = (
    (b"PK\x03\x04", "ZIP archive"),
    (b"\x1f\x8b", "gzip data"),
    (b"7z\xbc\xaf\x27\x1c", "7-Zip archive"),
    (b"Rar!", "RAR archive"),
    (b"\x1a\x45\xdf\xa3", "WebM/Matroska video"),
    (b"OggS", "Ogg media"),
    (b"ID3", "MP3 audio"),
    (b"fLaC", "FLAC audio"),
    (b"MZ", "Windows executable"),
    (b"\x7fELF", "ELF executable"),
    (b"\x00asm", "WebAssembly module"),
    (b"wOFF", "WOFF font"),
    (b"wOF2", "WOFF2 font"),
)
_HTML_MARKERS: Final = (
    b"<!doctype html",
    b"<html",
    b"<head",
    b"<body",
    b"<meta",
    b"<title",
    b"<script",
    b"<link",
    b"<style",
    b"<div",
    b"<p>",
    b"<iframe",
    b"<h1",
    b"<table",
    b"<form",
)
# How much of the body ``prepare`` sniffs: enough for an XML prolog, a DOCTYPE and a long
# licence comment before an <svg> element.
_SNIFF_WINDOW: Final = 4096

#: Output encodings. PNG is fast-but-larger level 1: 3x faster than the default level 6
#: for ~25% more bytes (768 px RGBA: 35 ms vs 106 ms here), and bytes matter less than
#: CPU on this stage, as Gemini bills an image by its pixel size, not its file size.
_PNG_COMPRESS_LEVEL: Final = 1
#: Resampling: HAMMING after a reduced-size JPEG decode. On bench/decode.py's photo JPEGs
#: (640x480..3000x2000 -> 768 px), draft decode + resize takes 18.5 ms with LANCZOS,
#: 15.2 ms with BICUBIC and 12.3 ms with HAMMING, at 47.9, 44.5 and 40.4 dB PSNR against a
#: full decode + LANCZOS. This is the hot path of the whole pipeline (with the local
#: analyzer at ~5 ms per image, preparing is what bounds images/s per core), and 40 dB is
#: far above what the analyzers can tell apart, so the fastest filter wins.
_RESAMPLE: Final = Image.Resampling.HAMMING
#: For formats without reduced-size decoding (PNG, WebP...), ``reducing_gap`` first
#: shrinks by an integer factor with a box filter (``Image.reduce``), then the filter does
#: the rest (measured with LANCZOS: 4000x3000 -> 768 px in 88 ms instead of 154 ms, 55.6 dB).
_REDUCING_GAP: Final = 2.0
#: A small upright JPEG is passed through only when it carries at most this many bytes per
#: pixel: a photo at quality 95 stays well under it; heavier files carry big metadata
#: (Photoshop XMP, previews) or near-lossless data that one re-encode makes much smaller.
_PASSTHROUGH_MAX_BYTES_PER_PIXEL: Final = 1.0

# EXIF orientation -> the transpose that makes the image upright (as ImageOps.exif_transpose).
_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_DATETIME = re.compile(r"\s*(\d{4})[:\-](\d{2})[:\-](\d{2})[ T](\d{2}):(\d{2}):(\d{2})")
_CAMERA_MAX_CHARS: Final = 128


@dataclass(frozen=True, slots=True)
class Prepared:
    """The original's facts and the analysis image made from it."""

    facts: ImageFacts
    data: bytes
    media_type: str
    width: int
    height: int


# --------------------------------------------------------------------------------------
# Identification


def sniff(head: bytes) -> str | None:
    """The image format of content starting with ``head``, by magic bytes only.

    Returns Pillow's format name for raster formats ("JPEG", "PNG", "GIF", "WEBP", "BMP",
    "TIFF", "AVIF", "HEIF"; recognised but unsupported ones such as "JPEG2000", "PSD",
    "ICO"), "SVG" or "EPS" for vector images, and None for anything that is not an image.
    """
    for signature, name in _SIGNATURES:
        if head.startswith(signature):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp":
        brands = _ftyp_brands(head)
        if brands & _AVIF_BRANDS:
            return "AVIF"
        if brands & _HEIF_BRANDS:
            return "HEIF"
        return None
    if (
        head[:2] == b"BM"
        and len(head) >= 18
        and int.from_bytes(head[14:18], "little") in _BMP_HEADER_SIZES
    ):
        return "BMP"
    if head[:4] in (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00") and head[4:6] != b"\x00\x00":
        return "ICO" if head[2] == 1 else "CUR"
    if _PNM.match(head):
        return "PNM"
    markup = _markup(head)
    if markup is not None and (b"<svg" in markup or b"<!doctype svg" in markup):
        return None if _is_html(markup) else "SVG"
    return None


def check_head(head: bytes) -> None:
    """Reject early, from the first bytes of a download, what is certainly not an image.

    Raises ``ItemError``: NOT_AN_IMAGE for HTML, JSON, PDF, text, archives, video...;
    UNSUPPORTED_FORMAT for SVG and other vector formats, recognised raster formats that
    are not decoded, and HEIC when the plugin is missing. Content that cannot be told
    apart from a prefix this short (some XML) passes; ``prepare`` decides on the full body.
    Pass at least ``SNIFF_BYTES`` bytes, or the whole body when it is shorter.
    """
    _identify(head, complete=False)


def _identify(head: bytes, *, complete: bool) -> str | None:
    """The supported format of ``head``, or an ItemError saying why it cannot be analyzed.

    Returns None only when ``complete`` is false and the prefix is undecidable.
    """
    fmt = sniff(head)
    if fmt in SUPPORTED_FORMATS:
        return fmt
    if fmt == "HEIF":
        raise ItemError(
            ErrorClass.UNSUPPORTED_FORMAT,
            "HEIC/HEIF images need the pillow-heif plugin, which is not installed",
        )
    if fmt in ("WEBP", "AVIF"):
        raise ItemError(
            ErrorClass.UNSUPPORTED_FORMAT, f"this Pillow build cannot decode {fmt} images"
        )
    if fmt in _VECTOR:
        raise ItemError(
            ErrorClass.UNSUPPORTED_FORMAT,
            f"{_VECTOR[fmt]} is a vector format; only raster images are analyzed",
        )
    if fmt is not None:
        raise ItemError(
            ErrorClass.UNSUPPORTED_FORMAT,
            f"{_UNSUPPORTED_RASTER[fmt]} images are not supported "
            f"(supported: {', '.join(sorted(SUPPORTED_FORMATS))})",
        )
    kind = _non_image_kind(head, complete=complete)
    if kind is None:
        return None
    raise ItemError(ErrorClass.NOT_AN_IMAGE, f"{kind}, not an image")


def _ftyp_brands(head: bytes) -> set[bytes]:
    size = int.from_bytes(head[0:4], "big")
    end = min(size, len(head)) if size >= 16 else len(head)
    brands = {head[8:12]}
    brands.update(head[i : i + 4] for i in range(16, end - 3, 4))
    return brands


def _markup(head: bytes) -> bytes | None:
    """The lower-cased start of ``head`` when it is markup (after any BOM and blanks)."""
    text = _as_utf8(head).lstrip(b" \t\r\n\x0c")
    return text.lower() if text.startswith(b"<") else None


def _as_utf8(head: bytes) -> bytes:
    if head.startswith(b"\xef\xbb\xbf"):
        return head[3:]
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        usable = len(head) - len(head) % 2  # a cut may split the last code unit
        return head[:usable].decode("utf-16", errors="replace").encode()
    return head


def _is_html(markup: bytes) -> bool:
    return any(marker in markup for marker in _HTML_MARKERS[:2]) or markup.startswith(_HTML_MARKERS)


def _non_image_kind(head: bytes, *, complete: bool) -> str | None:
    """What ``head`` is when it is no image, for the error message; None if undecidable."""
    if not head:
        return "empty body"
    for signature, kind in _BINARY_KINDS:
        if head.startswith(signature):
            return kind
    if head[4:8] == b"ftyp":
        return "MP4/QuickTime media"
    if head[:4] == b"RIFF":
        return f"RIFF {head[8:12].decode('latin-1').strip() or 'data'} file"
    text = _as_utf8(head)
    stripped = text.lstrip(b" \t\r\n\x0c")
    lowered = stripped[:_SNIFF_WINDOW].lower()
    if lowered.startswith(b"%pdf-"):
        return "PDF document"
    markup = _markup(head)
    if markup is not None:
        if _is_html(markup):
            return "HTML page"
        if complete:
            return "XML document" if markup.startswith(b"<?xml") else "markup text"
        return None  # maybe an SVG whose <svg> element is past this prefix
    if not _is_text(text):
        return f"unrecognised content (starts with {head[:8].hex(' ')})"
    if not stripped:
        return "blank text" if complete else None
    if stripped[:1] in (b"{", b"["):
        return "JSON document"
    return "plain text"


def _is_text(data: bytes) -> bool:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        # The prefix may end inside a multi-byte character.
        if exc.start < len(data) - 3 or exc.reason != "unexpected end of data":
            return False
        text = data[: exc.start].decode("utf-8")
    return all(ch.isprintable() or ch in "\t\n\r\x0c" for ch in text)


# --------------------------------------------------------------------------------------
# Preparation


def prepare(
    original: bytes,
    *,
    target_long_side: int = 768,
    max_pixels: int = 50_000_000,
    jpeg_quality: int = 85,
) -> Prepared:
    """Identify, check and downscale ``original`` for analysis.

    The analysis image is the first frame, upright (EXIF orientation applied), with its
    long side at most ``target_long_side`` (never upscaled), encoded as JPEG at
    ``jpeg_quality``, or as PNG when it has real transparency. Raises ``ItemError``
    (NOT_AN_IMAGE, UNSUPPORTED_FORMAT, IMAGE_TOO_LARGE or DECODE_ERROR).

    ``facts`` describe the original: its displayed size (after EXIF orientation), Pillow's
    format name and mode, its length and sha256, and ``frames`` = Pillow's ``n_frames``
    (animation frames, TIFF pages, the pictures of a multi-picture "MPO" JPEG).
    """
    if target_long_side < 1 or max_pixels < 1 or not 1 <= jpeg_quality <= 100:
        raise ValueError(
            "target_long_side and max_pixels must be positive, jpeg_quality within 1..100"
        )
    fmt = _identify(original[:_SNIFF_WINDOW], complete=True)
    if fmt is None:  # not reached: a complete sniff always decides
        raise ItemError(ErrorClass.NOT_AN_IMAGE, "unrecognised content, not an image")
    if fmt == "WEBP":
        # Pillow's WebP plugin allocates the whole canvas when it opens the file.
        size = _webp_canvas_size(original)
        if size is not None:
            _check_pixels(size, max_pixels)

    try:
        im = _OPENERS[fmt](io.BytesIO(original))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ItemError(ErrorClass.IMAGE_TOO_LARGE, str(exc)) from None
    except MemoryError:
        raise  # the worker is short of memory: not the item's fault
    except Exception as exc:  # Pillow has no single error type for a corrupt file
        raise _decode_error(fmt, exc) from None

    with im:
        _check_pixels(im.size, max_pixels)
        try:
            return _prepare_opened(im, original, target_long_side, jpeg_quality)
        except ItemError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ItemError(ErrorClass.IMAGE_TOO_LARGE, str(exc)) from None
        except MemoryError:
            raise
        except Exception as exc:  # corrupt data surfaces at load() as many error types
            raise _decode_error(fmt, exc) from None


def _prepare_opened(
    im: ImageFile.ImageFile, original: bytes, target_long_side: int, jpeg_quality: int
) -> Prepared:
    fmt = im.format or "unknown"
    mode = im.mode
    stored_w, stored_h = im.size
    # n_frames walks a GIF's frame headers (not its pixels) and seeks back to frame 0.
    frames = int(getattr(im, "n_frames", 1))
    # PngImageFile.getexif() decodes the image when the file has no eXIf chunk before its
    # pixels; that load is needed anyway, since PNG has no reduced-size decoding.
    exif = _read_exif(im)
    orientation = _orientation(exif)
    transpose = _TRANSPOSE.get(orientation or 1)
    # facts report the displayed size (orientation applied): what a browser shows and
    # what users compare with; the stored size is recoverable from exif.orientation.
    swapped = orientation is not None and orientation >= 5
    facts = ImageFacts(
        width=stored_h if swapped else stored_w,
        height=stored_w if swapped else stored_h,
        format=fmt,
        mode=mode,
        bytes=len(original),
        sha256=hashlib.sha256(original).hexdigest(),
        frames=frames,
        exif=_exif_summary(exif, orientation),
    )

    target = _target_size(stored_w, stored_h, target_long_side)
    if (
        fmt == "JPEG"
        and target == (stored_w, stored_h)
        and transpose is None
        and mode in ("RGB", "L")
        and len(original) <= _PASSTHROUGH_MAX_BYTES_PER_PIXEL * stored_w * stored_h
    ):
        # Pass the original through. It is still decoded, at 1/8 scale (the cheapest DCT
        # scaling), because every entropy-coded byte is parsed: a truncated or corrupt file
        # fails here and never reaches the analyzer.
        im.draft(mode, (1, 1))
        im.load()
        return Prepared(facts, original, "image/jpeg", stored_w, stored_h)

    if isinstance(im, JpegImagePlugin.JpegImageFile):
        # Reduced-size DCT decoding (libjpeg scale 1/2, 1/4 or 1/8): the largest scale that
        # still gives at least the target size, e.g. 1/2 for 3000x2000 -> 768 px. Over
        # bench/decode.py's photos this halves the time of a full decode + resize.
        im.draft("RGB", target)
    im.load()
    frame: Image.Image = _normalise_mode(im)
    if frame.size != target:
        frame = frame.resize(target, _RESAMPLE, reducing_gap=_REDUCING_GAP)
    if transpose is not None:
        # Transposed after resizing: the same result, on the small image.
        frame = frame.transpose(transpose)
    if frame.mode == "CMYK":
        frame = _cmyk_to_rgb(frame, im.info.get("icc_profile"))
    return _encode(frame, facts, jpeg_quality, _carried_icc(im, frame.mode))


def _decode_error(fmt: str, exc: BaseException) -> ItemError:
    reason = str(exc) or type(exc).__name__
    return ItemError(ErrorClass.DECODE_ERROR, f"cannot decode {fmt} data: {reason}")


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise ItemError(ErrorClass.DECODE_ERROR, f"invalid image size {width}x{height}")
    if width * height > max_pixels:
        raise ItemError(
            ErrorClass.IMAGE_TOO_LARGE,
            f"{width}x{height} is {width * height:,} pixels; the limit is {max_pixels:,}",
        )


def _webp_canvas_size(data: bytes) -> tuple[int, int] | None:
    """The canvas size from a WebP header (simple lossy, lossless or extended)."""
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        width = int.from_bytes(data[26:28], "little") & 0x3FFF
        height = int.from_bytes(data[28:30], "little") & 0x3FFF
        return width, height
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        return (
            int.from_bytes(data[24:27], "little") + 1,
            int.from_bytes(data[27:30], "little") + 1,
        )
    return None


def _target_size(width: int, height: int, long_side: int) -> tuple[int, int]:
    """``(width, height)`` scaled so its long side is ``long_side``; never upscaled."""
    longest = max(width, height)
    if longest <= long_side:
        return width, height
    scale = long_side / longest
    return (
        long_side if width == longest else max(1, round(width * scale)),
        long_side if height == longest else max(1, round(height * scale)),
    )


def _normalise_mode(im: Image.Image) -> Image.Image:
    """The decoded frame in L, RGB, CMYK (converted after resizing, on fewer pixels), or
    LA/RGBA only when its alpha is not fully opaque.

    Palette images become RGB(A) before resizing, because Pillow resizes "P" with NEAREST.
    """
    mode = im.mode
    if mode in ("L", "RGB", "CMYK"):
        return im
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _high_depth_to_l(im)
    if mode == "1":
        return im.convert("L")
    if mode in ("LA", "La", "PA") or (mode == "P" and im.has_transparency_data):
        im = im.convert("LA" if mode in ("LA", "La") else "RGBA")
    elif mode in ("RGBA", "RGBa"):
        im = im.convert("RGBA") if mode == "RGBa" else im
    else:  # P without transparency, RGBX, YCbCr, LAB, HSV
        return im.convert("RGB")
    alpha_min, _ = im.getchannel("A").getextrema()
    if alpha_min == 255:  # an alpha channel with nothing transparent in it
        return im.convert("L" if im.mode == "LA" else "RGB")
    return im


def _high_depth_to_l(im: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float grayscale as 8-bit "L".

    Pillow's own conversion clips 16-bit values at 255 (everything above 0.4% is white);
    this scales them instead: 16-bit by its full range, other depths by their own range.
    """
    arr = np.asarray(im)
    if im.mode.startswith("I;16"):
        out = (arr.astype(np.uint16) >> 8).astype(np.uint8)
    else:
        values = arr.astype(np.float64)
        low, high = float(values.min()), float(values.max())
        if im.mode == "I" and low >= 0 and high <= 255:
            out = values.astype(np.uint8)
        elif im.mode == "I" and low >= 0 and high <= 65535:
            out = (values.astype(np.uint32) >> 8).astype(np.uint8)
        elif high > low:
            out = np.round((values - low) * (255 / (high - low))).astype(np.uint8)
        else:
            out = np.zeros(arr.shape, np.uint8)
    return Image.fromarray(out)  # 2-D uint8: mode "L"


def _cmyk_to_rgb(im: Image.Image, icc: Any) -> Image.Image:
    """CMYK through its embedded ICC profile when it has one, else Pillow's naive formula."""
    if ImageCms is not None and isinstance(icc, bytes) and icc[16:20] == b"CMYK":
        try:
            converted = ImageCms.profileToProfile(
                im,
                ImageCms.ImageCmsProfile(io.BytesIO(icc)),
                ImageCms.createProfile("sRGB"),
                outputMode="RGB",
            )
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # a broken profile: the naive conversion below is still a fair rendering
        else:
            if converted is not None:
                return converted
    return im.convert("RGB")


def _carried_icc(im: Image.Image, out_mode: str) -> bytes | None:
    """The original's ICC profile when it describes the output's colour space.

    Kept (a few hundred bytes) rather than converting to sRGB, which would cost a colour
    transform per image: colour-managed consumers still see the right colours.
    """
    icc = im.info.get("icc_profile")
    if not isinstance(icc, bytes) or len(icc) < 20:
        return None
    space = icc[16:20]
    if (out_mode in ("RGB", "RGBA") and space == b"RGB ") or (
        out_mode in ("L", "LA") and space == b"GRAY"
    ):
        return icc
    return None


def _encode(frame: Image.Image, facts: ImageFacts, quality: int, icc: bytes | None) -> Prepared:
    """JPEG for opaque images; PNG only for real transparency.

    Transparency is kept rather than flattened on a colour: a white logo on a transparent
    background would vanish on white, and the analyzer decides how to composite. Gemini
    takes both; for a 768 px photo JPEG is ~10x smaller and ~30x faster to encode, so it
    is the default.
    """
    buffer = io.BytesIO()
    extra: dict[str, Any] = {"icc_profile": icc} if icc else {}
    if frame.mode in ("RGBA", "LA"):
        frame.save(buffer, "PNG", compress_level=_PNG_COMPRESS_LEVEL, **extra)
        media_type = "image/png"
    else:
        frame.save(buffer, "JPEG", quality=quality, **extra)
        media_type = "image/jpeg"
    return Prepared(facts, buffer.getvalue(), media_type, frame.width, frame.height)


# --------------------------------------------------------------------------------------
# EXIF


def _read_exif(im: Image.Image) -> Image.Exif | None:
    try:
        exif = im.getexif()
    except (SyntaxError, ValueError, TypeError, KeyError, IndexError, struct.error):
        return None  # malformed EXIF does not make the image unusable
    return exif if len(exif) else None


def _orientation(exif: Image.Exif | None) -> int | None:
    value = exif.get(ExifTags.Base.Orientation) if exif is not None else None
    return value if isinstance(value, int) and 1 <= value <= 8 else None


def _exif_summary(exif: Image.Exif | None, orientation: int | None) -> ExifSummary | None:
    """Camera, capture time, orientation and GPS presence; None when none is known."""
    if exif is None:
        return None
    try:
        details = exif.get_ifd(ExifTags.IFD.Exif)
        gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    except (SyntaxError, ValueError, TypeError, KeyError, IndexError, OSError, struct.error):
        details, gps = {}, {}
    taken = details.get(ExifTags.Base.DateTimeOriginal) or details.get(
        ExifTags.Base.DateTimeDigitized
    )
    summary = ExifSummary(
        camera=_camera(exif.get(ExifTags.Base.Make), exif.get(ExifTags.Base.Model)),
        taken_at=_iso_datetime(taken),
        orientation=orientation,
        has_gps=ExifTags.GPS.GPSLatitude in gps and ExifTags.GPS.GPSLongitude in gps,
    )
    return None if summary == ExifSummary() else summary


def _exif_text(value: object) -> str:
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if not isinstance(value, str):
        return ""
    return " ".join(value.replace("\x00", " ").split())[:_CAMERA_MAX_CHARS]


def _camera(make_value: object, model_value: object) -> str | None:
    """Make and Model as one name, without the maker twice.

    "Canon" + "Canon EOS 5D" -> "Canon EOS 5D"; "NIKON CORPORATION" + "NIKON D750" ->
    "NIKON D750"; "Apple" + "iPhone 12" -> "Apple iPhone 12".
    """
    make, model = _exif_text(make_value), _exif_text(model_value)
    if not model:
        return make or None
    if not make:
        return model
    lowered = model.lower()
    if lowered.startswith(make.lower()) or any(
        lowered.startswith(word.lower()) for word in make.split() if len(word) >= 3
    ):
        return model
    return f"{make} {model}"


def _iso_datetime(value: object) -> str | None:
    """An EXIF "YYYY:MM:DD HH:MM:SS" as ISO 8601 "YYYY-MM-DDTHH:MM:SS", if it is a date."""
    text = _exif_text(value)
    match = _EXIF_DATETIME.match(text)
    if match is None:
        return None
    try:
        year, month, day, hour, minute, second = (int(part) for part in match.groups())
        moment = datetime(year, month, day, hour, minute, second)
    except ValueError:  # "0000:00:00 00:00:00" and other placeholders
        return None
    return moment.isoformat()
