"""Deterministic test images: real photographs (when scikit-image is installed) or
synthetic scenes, at any size, in any format Pillow writes."""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    data: bytes
    width: int
    height: int
    format: str


@cache
def _photos() -> tuple[np.ndarray, ...]:
    try:
        from skimage import data
    except ImportError:
        return ()
    loaders: tuple[Callable[[], np.ndarray], ...] = (
        data.astronaut,
        data.chelsea,
        data.coffee,
        data.rocket,
        data.hubble_deep_field,
    )
    return tuple(np.asarray(Image.fromarray(load()).convert("RGB")) for load in loaders)


def _colour(rng: random.Random) -> tuple[int, int, int]:
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def scene(width: int, height: int, seed: int) -> Image.Image:
    """A detailed RGB image: a photograph resized and cropped, or a drawn scene."""
    rng = random.Random(seed)
    photos = _photos()
    if photos:
        photo = Image.fromarray(photos[seed % len(photos)])
        scale = max(width / photo.width, height / photo.height) * rng.uniform(1.0, 1.3)
        big = photo.resize(
            (max(width, int(photo.width * scale)), max(height, int(photo.height * scale))),
            Image.Resampling.BILINEAR,
        )
        left = rng.randint(0, big.width - width)
        top = rng.randint(0, big.height - height)
        return big.crop((left, top, left + width, top + height))
    image = Image.new("RGB", (width, height), _colour(rng))
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1, y1 = x0 + rng.randrange(1, width // 2 + 2), y0 + rng.randrange(1, height // 2 + 2)
        draw.ellipse((x0, y0, x1, y1), fill=_colour(rng))
    noise = np.random.default_rng(seed).integers(0, 24, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(np.asarray(image.filter(ImageFilter.SMOOTH)) // 2 + noise + 64)


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        options.setdefault("quality", 90)
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def sample(name: str, width: int, height: int, fmt: str = "JPEG", seed: int = 0) -> Sample:
    image = scene(width, height, seed)
    if fmt == "GIF":
        image = image.convert("P")
    return Sample(name, encode(image, fmt), width, height, fmt)


def mixed(
    count: int,
    *,
    sizes: tuple[tuple[int, int], tuple[int, int]] = ((640, 480), (1920, 1080)),
    formats: tuple[str, ...] = ("JPEG",),
    seed: int = 1,
) -> list[Sample]:
    """``count`` images with sizes drawn between the two corners, formats in turn."""
    rng = random.Random(seed)
    (w0, h0), (w1, h1) = sizes
    out = []
    for i in range(count):
        t = rng.random()
        width, height = int(w0 + (w1 - w0) * t), int(h0 + (h1 - h0) * t)
        fmt = formats[i % len(formats)]
        ext = {"JPEG": "jpg"}.get(fmt, fmt.lower())
        out.append(sample(f"img/{i:06d}.{ext}", width, height, fmt, seed=seed * 100_003 + i))
    return out
