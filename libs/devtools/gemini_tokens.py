"""Token accounting for the Gemini emulator, following the rules Google publishes.

Sources (read November 2026):

* Text: "For Gemini models, a token is equivalent to about 4 characters."
  https://ai.google.dev/gemini-api/docs/tokens
* Images, Gemini 2.x (and 1.5) without a media resolution:
  "If both dimensions of an image are less than or equal to 384 pixels, then 258 tokens are
  used. If one dimension of an image is greater than 384 pixels, then the image is cropped
  into tiles. Each tile size defaults to the smallest dimension (width or height) divided by
  1.5. If necessary, each tile is adjusted so that it's not smaller than 256 pixels and not
  greater than 768 pixels. Each tile is then resized to 768x768 and uses 258 tokens."
  and "larger images are scaled down ... to fit a maximum resolution of 3072 x 3072 while
  preserving their original aspect ratio."
  https://firebase.google.com/docs/ai-logic/input-file-requirements (Images: Tokenization)
  The same 258 / 768x768-tile rule is stated in https://ai.google.dev/gemini-api/docs/tokens.
  The number of tiles is not spelled out; we cover the image with whole tiles:
  ceil(width / tile) * ceil(height / tile).
* Media resolution, Gemini 2.x: the API's own enum documentation (google-genai
  ``types.MediaResolution``, the same text as the REST reference for
  ``GenerationConfig.mediaResolution``): LOW = 64 tokens, MEDIUM = 256 tokens,
  HIGH = "zoomed reframing with 256 tokens".
* Media resolution, Gemini 3: per-image budgets LOW 280, MEDIUM 560, HIGH 1120, ULTRA_HIGH
  2240 (ULTRA_HIGH per part only); unspecified defaults to HIGH for images.
  https://ai.google.dev/gemini-api/docs/media-resolution ("Token counts"). Gemini 3 also
  accepts a per-part ``mediaResolution`` that overrides the request-wide one.
"""

from __future__ import annotations

import math
import re

IMAGE_TILE_TOKENS = 258
SMALL_IMAGE_MAX_SIDE = 384
TILE_MIN_SIDE = 256
TILE_MAX_SIDE = 768
MAX_IMAGE_SIDE = 3072
# What a non-image media part (PDF page, audio clip, file URI we cannot open) is charged:
# the emulator has no way to measure it, so it charges one image's worth.
OPAQUE_MEDIA_TOKENS = 258

GEMINI2_MEDIA_RESOLUTION_TOKENS: dict[str, int] = {
    "MEDIA_RESOLUTION_LOW": 64,
    "MEDIA_RESOLUTION_MEDIUM": 256,
    "MEDIA_RESOLUTION_HIGH": 256,
}
GEMINI3_MEDIA_RESOLUTION_TOKENS: dict[str, int] = {
    "MEDIA_RESOLUTION_LOW": 280,
    "MEDIA_RESOLUTION_MEDIUM": 560,
    "MEDIA_RESOLUTION_HIGH": 1120,
    "MEDIA_RESOLUTION_ULTRA_HIGH": 2240,
}
GEMINI3_DEFAULT_IMAGE_TOKENS = GEMINI3_MEDIA_RESOLUTION_TOKENS["MEDIA_RESOLUTION_HIGH"]

_GENERATION_RE = re.compile(r"gemini-(\d+)")


def model_generation(model: str) -> int:
    """The major version of a Gemini model name: 3 for "gemini-3-pro-preview", else 2."""
    match = _GENERATION_RE.search(model)
    if match is None:
        return 2
    return int(match.group(1))


def tiled_image_tokens(width: int, height: int) -> int:
    """Gemini 2.x default: 258 for small images, else 258 per tile (see module docstring)."""
    if width <= 0 or height <= 0:
        return IMAGE_TILE_TOKENS
    if width <= SMALL_IMAGE_MAX_SIDE and height <= SMALL_IMAGE_MAX_SIDE:
        return IMAGE_TILE_TOKENS
    scale = min(1.0, MAX_IMAGE_SIDE / max(width, height))
    w = max(1.0, width * scale)
    h = max(1.0, height * scale)
    tile = min(max(min(w, h) / 1.5, TILE_MIN_SIDE), TILE_MAX_SIDE)
    tiles = math.ceil(w / tile) * math.ceil(h / tile)
    return tiles * IMAGE_TILE_TOKENS


def normalize_media_resolution(value: object) -> str | None:
    """ "MEDIA_RESOLUTION_LOW", "low", {"level": "..."} -> "MEDIA_RESOLUTION_LOW"; unset -> None."""
    if isinstance(value, dict):
        value = value.get("level")
    if not isinstance(value, str) or not value:
        return None
    name = value.upper()
    if not name.startswith("MEDIA_RESOLUTION_"):
        name = "MEDIA_RESOLUTION_" + name
    if name == "MEDIA_RESOLUTION_UNSPECIFIED":
        return None
    return name


def image_tokens(
    width: int,
    height: int,
    *,
    model: str,
    media_resolution: str | None = None,
    part_media_resolution: str | None = None,
    part_num_tokens: int | None = None,
) -> int:
    """Tokens one image costs on `model` at the request's (or the part's) media resolution.

    `part_num_tokens` is a Gemini 3 part's explicit ``mediaResolution.numTokens``.
    """
    if model_generation(model) >= 3:
        if part_num_tokens:
            return part_num_tokens
        level = part_media_resolution or media_resolution
        if level is None:
            return GEMINI3_DEFAULT_IMAGE_TOKENS
        return GEMINI3_MEDIA_RESOLUTION_TOKENS.get(level, GEMINI3_DEFAULT_IMAGE_TOKENS)
    # Per-part media resolution is a Gemini 3 feature; 2.x only honours the request-wide one.
    if media_resolution is None or media_resolution not in GEMINI2_MEDIA_RESOLUTION_TOKENS:
        return tiled_image_tokens(width, height)
    return GEMINI2_MEDIA_RESOLUTION_TOKENS[media_resolution]
