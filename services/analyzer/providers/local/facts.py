"""The ``local`` analyzer: offline, keyless, deterministic facts about one image.

The fetcher hands over an analysis-sized image (JPEG or PNG, EXIF orientation applied,
long side at most 768 px by default) and the ``ImageFacts`` of the original. ``analyze``
turns them into one flat, JSON-serialisable dict whose keys are ``COLUMNS`` (typed by
``SCHEMA``).

Determinism: the same bytes and facts give exactly the same dict on every machine with the
same Pillow build (decoders differ between libjpeg versions, not between runs). Pillow
resamples 8-bit images in fixed-point arithmetic, and every statistic below is computed
from integer sums (exact whatever the summation order or SIMD width) before one final
float division or square root, so no result depends on BLAS or on numpy's reduction
order. The DCT of the perceptual hash uses an integer DCT matrix for the same reason.

Thread safety: ``analyze`` touches only its own images and arrays; the module-level
constants are read-only.
"""

from __future__ import annotations

import io
import math
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from PIL import Image

from imagestream.common.messages import ImageFacts

__all__ = ["BLUR_THRESHOLD", "COLUMNS", "SCHEMA", "analyze", "hamming"]

_NUMBER: Final = {"type": "number"}
_OPTIONAL_TEXT: Final = {"type": ["string", "null"]}
#: The analysis fields, in the order exports show them (as flat column names, without the
#: "analysis." prefix), each with the JSON Schema of its values (Parquet exports type their
#: columns by it). Exports rely on this; keep it in sync with analyze().
SCHEMA: Final[dict[str, dict[str, Any]]] = {
    "mode": _OPTIONAL_TEXT,
    "megapixels": _NUMBER,
    "aspect_ratio": {"type": ["number", "null"]},
    "brightness": _NUMBER,
    "contrast": _NUMBER,
    "sharpness": _NUMBER,
    "is_blurry": {"type": "boolean"},
    "is_blank": {"type": "boolean"},
    "dominant_colors": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"hex": {"type": "string"}, "share": _NUMBER},
            "required": ["hex", "share"],
        },
    },
    "phash": {"type": "string"},
    "exif_camera": _OPTIONAL_TEXT,
    # EXIF times carry no zone: the camera's clock, as written.
    "exif_taken_at": {"type": ["string", "null"], "format": "date-time"},
    "exif_orientation": {"type": ["integer", "null"]},
    "exif_has_gps": {"type": "boolean"},
}
COLUMNS: Final[tuple[str, ...]] = tuple(SCHEMA)

#: Long side of the grayscale on which brightness, contrast and sharpness are measured.
#: The variance of the Laplacian grows with the amount of detail per pixel, so it is only
#: comparable between images at one scale. Images smaller than this are upscaled: shown at
#: that size they do look soft, and the measure says so. Resampled with HAMMING: as fast as
#: BILINEAR (1.7 ms for 768 -> 512 here) and nearly as detail-preserving as LANCZOS (4 ms).
SHARPNESS_SIDE: Final = 512
SHARPNESS_RESAMPLE: Final = Image.Resampling.HAMMING

#: ``is_blurry`` is ``sharpness < BLUR_THRESHOLD``. Calibrated with analyze() itself on
#: 16 of scikit-image's bundled photos (astronaut, brick, camera, chelsea, coffee, coins,
#: grass, gravel, hubble_deep_field, immunohistochemistry, logo, moon, page, retina, rocket,
#: text; the two larger than 768 px downscaled to 768), JPEG quality 85 and 60.
#: Sharp originals: lowest moon 61 / 48 (q85 / q60; a low-contrast scene) and retina
#: 64 / 59, then logo 152 / 129; the rest 160-7200 (astronaut 867, camera 1229).
#: Gaussian-blurred copies: radius 3 and 5 at most 9.0 / 14.7 (JPEG blocking adds some
#: edges back), radius 2 at most 26 / 36, radius 1 anywhere in 8-262 (often invisible).
#: 25 splits the radius>=3 copies from every sharp photo with a margin of about 1.7x on
#: either side at q60, more at q85. The usual OpenCV figure of 100 is for full-size camera
#: frames; at 512 px it would call moon and retina blurry. Known limit of the measure:
#: content without edges (a smooth gradient, a blank page) scores low too, so blank
#: images also read as blurry.
BLUR_THRESHOLD: Final = 25.0

#: Side of the square thumbnail the colours are computed on (4096 pixels: enough for
#: shares to 3 decimals to be meaningful, small enough to cluster in well under a ms).
COLOR_SIDE: Final = 64
#: How many colours are reported at most.
COLOR_COUNT: Final = 5
#: Pre-quantization into this many colours (Pillow's fast octree, ~0.25 ms) before the
#: weighted k-means on the palette. Measured on 9 skimage photos: Pillow's MEDIANCUT to 5
#: colours costs ~2.9 ms and fits worse (mean pixel error 38.6 vs 32.1 on astronaut);
#: its k-means refinement costs ~10 ms; FASTOCTREE alone to 5 colours is fast but poor
#: (80.9 on astronaut); k-means directly on the 4096 pixels fits the same but costs ~8 ms.
OCTREE_COLORS: Final = 64
KMEANS_MAX_ITERATIONS: Final = 20
#: Cluster centres closer than this (Euclidean distance in 8-bit RGB, of 441 at most) are
#: one colour: k-means splits a flat or slightly noisy area into near-identical shades.
MERGE_DISTANCE: Final = 24
#: ``is_blank`` when one colour (after merging near-identical shades) covers at least this
#: share of the thumbnail: a uniform or placeholder image, including JPEG noise and a mark
#: of up to ~2% of the area. A two-colour image with equal luminance is not blank, which a
#: luminance-only test would miss.
BLANK_SHARE: Final = 0.98

# pHash, the variant of imagehash.phash (ImageHash 4.x) so hashes are interchangeable:
# grayscale, LANCZOS to 32x32, DCT-II along both axes, keep the top-left 8x8 coefficients
# *including* the DC term, one bit per coefficient set when it is above the median of the
# 64, bits row by row (vertical frequency major), first bit most significant.
# imagehash uses scipy's unnormalised DCT-II; a uniform scale of the matrix does not change
# any comparison with the median, so the integer matrix below (cosines times 2**20,
# rounded) gives the same bits except for coefficients within ~1e-6 relative of the median,
# and is exact integer arithmetic: no platform-dependent float rounding. Bounds: 8 rows x
# 32 px x 255 x 2**20 < 2**33 after the first product, x 32 x 2**20 < 2**58 after the
# second, within int64.
# The one departure: the 32x32 downsample uses Pillow's reducing_gap=3 (an integer box
# reduction before the LANCZOS pass), 0.3 ms instead of 2.4 ms from 768 px. On 17 skimage
# photos at 768 px the hash then equals imagehash.phash of the same image for 12 and is
# 2 bits away for the others (one coefficient crossing the median swaps two bits).
_HASH_REDUCING_GAP: Final = 3.0
_HASH_SIZE: Final = 8
_HASH_SAMPLE: Final = 32
_DCT_SCALE: Final = 1 << 20
_n = np.arange(_HASH_SAMPLE)
_k = np.arange(_HASH_SIZE)[:, None]
_DCT: Final[npt.NDArray[np.int64]] = np.round(
    np.cos(np.pi * _k * (2 * _n + 1) / (2 * _HASH_SAMPLE)) * _DCT_SCALE
).astype(np.int64)
_DCT.setflags(write=False)
del _n, _k

_WHITE: Final = (255, 255, 255, 255)


def analyze(data: bytes, facts: ImageFacts) -> dict[str, Any]:
    """Facts about the analysis image ``data``, plus the original's from ``facts``.

    Raises ``PIL.UnidentifiedImageError`` (an ``OSError``) or ``ValueError`` when ``data``
    cannot be decoded; the fetcher has decoded it already, so that means a corrupt blob.
    """
    # No context manager: closing an Image discards its pixels, and the decoded image may
    # be used as is below; an in-memory buffer holds no resource to release.
    img = Image.open(io.BytesIO(data))
    img.load()
    rgb, gray = _rgb_and_gray(img)

    norm = _resize_long_side(gray, SHARPNESS_SIDE)
    luma = np.asarray(norm, dtype=np.int16)
    brightness, contrast = _mean_std(luma)
    sharpness = _laplacian_variance(luma)
    colors = _dominant_colors(rgb)
    exif = facts.exif
    result: dict[str, Any] = {
        "mode": facts.mode,
        "megapixels": round(facts.width * facts.height / 1_000_000, 2),
        "aspect_ratio": round(facts.width / facts.height, 4) if facts.height else None,
        "brightness": round(brightness / 255, 3),
        "contrast": round(contrast / 255, 3),
        "sharpness": round(sharpness, 2),
        "is_blurry": sharpness < BLUR_THRESHOLD,
        "is_blank": bool(colors) and colors[0]["share"] >= BLANK_SHARE,
        "dominant_colors": colors,
        "phash": _phash(gray),
        "exif_camera": exif.camera if exif else None,
        "exif_taken_at": exif.taken_at if exif else None,
        "exif_orientation": exif.orientation if exif else None,
        "exif_has_gps": exif.has_gps if exif else False,
    }
    return result


def hamming(a: str, b: str) -> int:
    """Number of differing bits between two hex hashes of the same length (``phash``)."""
    if len(a) != len(b):
        raise ValueError(f"hashes differ in length: {len(a)} and {len(b)} hex digits")
    return (int(a, 16) ^ int(b, 16)).bit_count()


def _rgb_and_gray(img: Image.Image) -> tuple[Image.Image, Image.Image]:
    """The image as RGB and as 8-bit luminance (ITU-R 601-2, Pillow's "L").

    Transparency is composited over white, as a page would usually show it, so a
    transparent placeholder reads as blank and a logo keeps its visible colours.
    """
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, _WHITE)
        flat.alpha_composite(rgba)
        rgb = flat.convert("RGB")
    elif img.mode == "L":
        return img.convert("RGB"), img
    elif img.mode == "RGB":
        rgb = img
    else:
        rgb = img.convert("RGB")
    return rgb, rgb.convert("L")


def _resize_long_side(img: Image.Image, side: int) -> Image.Image:
    width, height = img.size
    scale = side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if size == img.size:
        return img
    return img.resize(size, SHARPNESS_RESAMPLE)


def _mean_std(luma: npt.NDArray[np.int16]) -> tuple[float, float]:
    """Mean and population standard deviation of the pixel values, exactly."""
    n = luma.size
    total, squares = _exact_sums(luma)
    return total / n, math.sqrt(n * squares - total * total) / n


def _laplacian_variance(luma: npt.NDArray[np.int16]) -> float:
    """Variance of the 4-neighbour Laplacian over the interior pixels (0..255 scale)."""
    if luma.shape[0] < 3 or luma.shape[1] < 3:
        return 0.0
    # int16 is enough (|Laplacian| <= 4 x 255) and measured 4x faster here than float64.
    lap = luma[:-2, 1:-1] + luma[2:, 1:-1] + luma[1:-1, :-2] + luma[1:-1, 2:]
    lap -= 4 * luma[1:-1, 1:-1]
    n = lap.size
    total, squares = _exact_sums(lap)
    return (n * squares - total * total) / (n * n)


def _exact_sums(values: npt.NDArray[np.int16]) -> tuple[int, int]:
    """Sum and sum of squares of small integers, as exact Python ints.

    In integers, so the result does not depend on summation order: each square fits int32
    (|value| <= 1020) and the sums an int64 accumulator. Not a float64 dot product: that
    runs in OpenBLAS, whose worker threads spin for every call and made this 15x dearer in
    CPU (2.7 ms instead of 0.2 ms per image on the 2-core benchmark machine; bench/RESULTS.md).
    """
    flat = values.astype(np.int32).ravel()
    return int(flat.sum(dtype=np.int64)), int(np.square(flat).sum(dtype=np.int64))


def _phash(gray: Image.Image) -> str:
    small = gray.resize(
        (_HASH_SAMPLE, _HASH_SAMPLE), Image.Resampling.LANCZOS, reducing_gap=_HASH_REDUCING_GAP
    )
    pixels = np.asarray(small, dtype=np.int64)
    coefficients = (_DCT @ pixels @ _DCT.T).ravel()
    middle = np.sort(coefficients)
    # c > median of 64 values  <=>  2c > sum of the two middle ones (exact in integers).
    twice_median = int(middle[31]) + int(middle[32])
    value = 0
    for bit in (2 * coefficients > twice_median).tolist():
        value = (value << 1) | bit
    return f"{value:016x}"


def _dominant_colors(rgb: Image.Image) -> list[dict[str, Any]]:
    """Up to ``COLOR_COUNT`` colours with their share of the image, largest first.

    Thumbnail, octree palette, k-means of the palette weighted by pixel counts, merge of
    near-identical centres. All integer arithmetic: deterministic.
    """
    # reducing_gap: a cheap integer box reduction first, then the exact resize (2x faster).
    thumb = rgb.resize((COLOR_SIDE, COLOR_SIDE), Image.Resampling.BOX, reducing_gap=2.0)
    quantized = thumb.quantize(
        colors=OCTREE_COLORS, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE
    )
    used = quantized.getcolors(OCTREE_COLORS) or []  # (pixel count, palette index)
    weights = np.array([count for count, _ in used], dtype=np.int64)
    palette = np.array(quantized.getpalette() or [], dtype=np.int64).reshape(-1, 3)
    points = palette[np.array([index for _, index in used], dtype=np.intp)]
    centres, counts = _weighted_kmeans(points, weights, COLOR_COUNT)

    clusters: list[tuple[int, list[int]]] = []  # (pixel count, [r, g, b])
    for j in np.argsort(-counts, kind="stable").tolist():
        count, centre = int(counts[j]), [int(c) for c in centres[j]]
        if count == 0:
            continue
        for i, (kept_count, kept) in enumerate(clusters):
            if sum((a - b) ** 2 for a, b in zip(kept, centre, strict=True)) < MERGE_DISTANCE**2:
                merged = kept_count + count
                mean = [
                    (2 * (a * kept_count + b * count) + merged) // (2 * merged)
                    for a, b in zip(kept, centre, strict=True)
                ]
                clusters[i] = (merged, mean)
                break
        else:
            clusters.append((count, centre))
    clusters.sort(key=lambda c: -c[0])  # stable: equal counts keep k-means order

    total = int(weights.sum())
    return [
        {"hex": "#{:02x}{:02x}{:02x}".format(*centre), "share": round(count / total, 3)}
        for count, centre in clusters
    ]


def _weighted_kmeans(
    points: npt.NDArray[np.int64], weights: npt.NDArray[np.int64], k: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Lloyd's k-means of weighted RGB points; returns centres and their total weights.

    Deterministic seeding: the heaviest point, then repeatedly the point with the largest
    weight x squared distance to the chosen ones (k-means++ taking the maximum instead of
    sampling), stopping early when every point coincides with a seed.
    """
    if len(points) <= k:
        return points, weights
    seeds = [int(np.argmax(weights))]
    nearest = np.square(points - points[seeds[0]]).sum(axis=1)
    while len(seeds) < k:
        pull = weights * nearest
        j = int(np.argmax(pull))
        if pull[j] == 0:
            break
        seeds.append(j)
        nearest = np.minimum(nearest, np.square(points - points[j]).sum(axis=1))
    centres = points[seeds]
    for _ in range(KMEANS_MAX_ITERATIONS):
        labels = _nearest(points, centres)
        counts, sums = _cluster_sums(labels, points, weights, len(centres))
        moved = centres.copy()
        filled = counts > 0
        # Rounded integer mean: (2s + n) // 2n == round(s / n), halves up.
        moved[filled] = (2 * sums[filled] + counts[filled, None]) // (2 * counts[filled, None])
        if np.array_equal(moved, centres):
            break
        centres = moved
    labels = _nearest(points, centres)
    counts, _ = _cluster_sums(labels, points, weights, len(centres))
    return centres, counts


def _nearest(points: npt.NDArray[np.int64], centres: npt.NDArray[np.int64]) -> npt.NDArray[np.intp]:
    distances = np.square(points[:, None, :] - centres[None, :, :]).sum(axis=2)
    labels: npt.NDArray[np.intp] = distances.argmin(axis=1)  # ties go to the first centre
    return labels


def _cluster_sums(
    labels: npt.NDArray[np.intp],
    points: npt.NDArray[np.int64],
    weights: npt.NDArray[np.int64],
    k: int,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    counts = np.zeros(k, dtype=np.int64)
    np.add.at(counts, labels, weights)
    sums = np.zeros((k, 3), dtype=np.int64)
    np.add.at(sums, labels, points * weights[:, None])
    return counts, sums
