"""Photographs with words rendered on them, for OCR tests and benchmarks: each image comes
with the words it shows, so what a recognizer read can be scored against what is there.

Fonts: Pillow's bundled one (``ImageFont.load_default(size=...)``, always present) and,
when the Debian packages are installed (``fonts-dejavu-core``; scripts/test installs it),
DejaVu Serif Bold and DejaVu Sans Mono.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .corpus import scene

#: Distinct words of 5 or more letters: one cannot be read inside another by accident.
WORDS = (
    "harbour", "yellow", "market", "bridge", "winter", "garden", "silver", "planet",
    "orange", "castle", "travel", "forest", "number", "coffee", "summer", "window",
    "rocket", "public", "letter", "animal", "circle", "ticket", "police", "museum",
    "simple", "camera", "dinner", "friday", "golden", "hunter", "island", "jungle",
    "kitten", "lemons", "mirror", "nickel", "office", "parrot", "quartz", "ribbon",
    "salmon", "tunnel", "umbrella", "velvet", "walnut", "zipper", "anchor", "button",
)  # fmt: skip

DEJAVU = Path("/usr/share/fonts/truetype/dejavu")
#: Font files beside Pillow's bundled font (None: the bundled one).
FONT_FILES: tuple[Path | None, ...] = (
    None,
    DEJAVU / "DejaVuSerif-Bold.ttf",
    DEJAVU / "DejaVuSansMono.ttf",
)


@dataclass(frozen=True, slots=True)
class Word:
    text: str
    #: Cap height of the letters in pixels, in the image as rendered.
    size: int
    angle: float
    font: str
    #: Where the word's tile (the word with a margin) is: left, top, right, bottom.
    box: tuple[int, int, int, int] = (0, 0, 0, 0)


@dataclass(frozen=True, slots=True)
class TextPhoto:
    image: Image.Image
    words: tuple[Word, ...]


def fonts() -> tuple[Path | None, ...]:
    """The fonts available here: the bundled one always, the Debian ones when installed."""
    return tuple(path for path in FONT_FILES if path is None or path.exists())


@cache
def _font(path: Path | None, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if path is None:
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(str(path), size)


def _label(text: str, path: Path | None, size: int, angle: float) -> Image.Image:
    """The word as an RGBA tile: light letters with a dark outline (legible on any photo,
    as on a meme or a sign), rotated by ``angle`` degrees counter-clockwise."""
    font = _font(path, size)
    stroke = max(1, size // 14)
    left, top, right, bottom = (round(v) for v in font.getbbox(text, stroke_width=stroke))
    pad = stroke + size // 4
    tile = Image.new("RGBA", (right - left + 2 * pad, bottom - top + 2 * pad), (0, 0, 0, 0))
    ImageDraw.Draw(tile).text(
        (pad - left, pad - top),
        text,
        font=font,
        fill=(255, 255, 240, 255),
        stroke_width=stroke,
        stroke_fill=(10, 10, 10, 255),
    )
    return tile.rotate(angle, expand=True, resample=Image.Resampling.BICUBIC) if angle else tile


def text_photo(
    width: int,
    height: int,
    seed: int,
    *,
    sizes: tuple[int, ...],
    angles: tuple[float, ...] = (0.0,),
    per_size: int = 2,
) -> TextPhoto:
    """A photograph (``corpus.scene``) with ``per_size`` words at each font size in
    ``sizes`` (pixels), each at one of ``angles``, in one of ``fonts()``, placed on a
    grid so no two overlap. Deterministic for a seed."""
    rng = random.Random(seed)
    image = scene(width, height, seed).convert("RGB")
    available = fonts()
    chosen = rng.sample(WORDS, len(sizes) * per_size)
    placed: list[Word] = []
    tiles: list[tuple[Image.Image, Word]] = []
    for i, text in enumerate(chosen):
        size = sizes[i // per_size]
        angle = angles[i % len(angles)]
        path = available[i % len(available)]
        word = Word(text, size, angle, path.stem if path else "pillow-default")
        tiles.append((_label(text, path, size, angle), word))
    # A grid of two columns, one cell per word: every word stays clear of the others
    # whatever its angle.
    columns = 2
    cell_w, cell_h = width // columns, height // -(-len(tiles) // columns)
    for i, (tile, word) in enumerate(tiles):
        if tile.width > cell_w or tile.height > cell_h:
            raise ValueError(f"{word.text!r} at {word.size} px does not fit its {cell_w}x{cell_h}")
        row, column = divmod(i, columns)
        left = column * cell_w + rng.randint(0, cell_w - tile.width)
        top = row * cell_h + rng.randint(0, cell_h - tile.height)
        image.paste(tile, (left, top), tile)
        placed.append(replace(word, box=(left, top, left + tile.width, top + tile.height)))
    return TextPhoto(image, tuple(placed))


def found(words: tuple[Word, ...] | list[str], recognized: str) -> list[str]:
    """The words (of a TextPhoto, or plain strings) that occur in the recognized text,
    compared in lower case with everything but letters dropped (OCR joins neighbouring
    words and reads punctuation into the outline's noise)."""
    letters = re.sub(r"[^a-z]", "", recognized.lower())
    texts = [w if isinstance(w, str) else w.text for w in words]
    return [text for text in texts if text in letters]
