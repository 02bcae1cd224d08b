"""Decode + downscale throughput of the fetcher's hot path (services/fetcher/image.py).

    uv run python bench/decode.py [--count 200] [--target 768] [--repeat 3]

Generates ``--count`` realistic JPEGs in memory (mosaics of scikit-image's bundled photos
at their native detail, 640x480 to 3000x2000, landscape and portrait, quality 90) and
times, for one thread and for a pool of two:

  a) full decode + LANCZOS resize + JPEG encode, without reduced-size decoding (the naive
     Pillow pipeline);
  b) ``imagestream.fetcher.image.prepare`` (sniff, bomb guard, draft decode, resize,
     EXIF, sha256, encode);
  c) pyvips ``thumbnail_buffer`` + JPEG encode, when pyvips is importable
     (``uv pip install pyvips pyvips-binary``).

Median milliseconds per image, images per second (wall clock over the whole set; best of
``--repeat`` passes, as the machine may be shared) and the PSNR of each method's encoded
outputs against the unencoded full decode + LANCZOS resize (pooled over the images whose
output size matches), so (a)'s PSNR is the loss of the quality-85 encode alone. libvips
runs its own worker threads; set VIPS_CONCURRENCY=1 to pin it to the pool.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import PIL
from PIL import Image, features
from skimage import data as skdata

from imagestream.fetcher.image import prepare

try:
    import pyvips
except (ImportError, OSError):  # OSError: the binding is there but libvips is not
    pyvips = None

SIZES = [
    (640, 480),
    (800, 600),
    (1024, 768),
    (1280, 960),
    (1600, 1200),
    (1920, 1080),
    (2048, 1536),
    (2400, 1600),
    (3000, 2000),
]
QUALITY = 90
OUT_QUALITY = 85

Transform = Callable[[bytes], bytes]


def photos() -> list[np.ndarray]:
    return [
        np.asarray(skdata.astronaut()),
        np.asarray(skdata.chelsea()),
        np.asarray(skdata.coffee()),
        np.asarray(skdata.rocket()),
        np.asarray(skdata.hubble_deep_field()),
        np.asarray(skdata.immunohistochemistry()),
        np.asarray(skdata.retina()),
        np.asarray(skdata.stereo_motorcycle()[0]),
    ]


def mosaic(sources: list[np.ndarray], width: int, height: int, rng: np.random.Generator) -> bytes:
    """A photo-like JPEG: native-resolution photos tiled, some scaled by 0.75-1.5x."""
    canvas = Image.new("RGB", (width, height))
    y = 0
    while y < height:
        x, row_height = 0, 0
        while x < width:
            tile = Image.fromarray(sources[int(rng.integers(len(sources)))])
            scale = float(rng.uniform(0.75, 1.5))
            tile = tile.resize(
                (int(tile.width * scale), int(tile.height * scale)), Image.Resampling.BICUBIC
            )
            canvas.paste(tile, (x, y))
            x += tile.width
            row_height = max(row_height, tile.height)
        y += row_height
    buffer = io.BytesIO()
    canvas.save(buffer, "JPEG", quality=QUALITY)
    return buffer.getvalue()


def corpus(count: int) -> list[bytes]:
    rng = np.random.default_rng(20240601)
    sources = photos()
    images = []
    for i in range(count):
        width, height = SIZES[i % len(SIZES)]
        if rng.random() < 0.3:
            width, height = height, width
        images.append(mosaic(sources, width, height, rng))
    return images


def target_size(width: int, height: int, long_side: int) -> tuple[int, int]:
    scale = min(1.0, long_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def naive(target: int) -> Transform:
    def run(original: bytes) -> bytes:
        im = Image.open(io.BytesIO(original))
        im.load()
        im = im.resize(target_size(*im.size, target), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        im.save(buffer, "JPEG", quality=OUT_QUALITY)
        return buffer.getvalue()

    return run


def prepared(target: int) -> Transform:
    def run(original: bytes) -> bytes:
        return prepare(original, target_long_side=target, jpeg_quality=OUT_QUALITY).data

    return run


def vips(target: int) -> Transform:
    assert pyvips is not None

    def run(original: bytes) -> bytes:
        thumb = pyvips.Image.thumbnail_buffer(original, target, height=target, size="down")
        return bytes(thumb.jpegsave_buffer(Q=OUT_QUALITY, strip=True))

    return run


def timed(transform: Transform, original: bytes) -> tuple[float, bytes]:
    start = time.perf_counter()
    out = transform(original)
    return time.perf_counter() - start, out


def measure(
    transform: Transform, images: list[bytes], threads: int, repeat: int
) -> tuple[float, float, list[bytes]]:
    """(median seconds per image, images per second, outputs), best of ``repeat`` passes.

    Best-of because the machine may be shared: slower passes measure the neighbours.
    """
    for original in images[:5]:  # warm up: plugin imports, codec tables
        transform(original)
    medians, rates = [], []
    outputs: list[bytes] = []
    for _ in range(repeat):
        start = time.perf_counter()
        if threads == 1:
            results = [timed(transform, original) for original in images]
        else:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                results = list(pool.map(lambda o: timed(transform, o), images))
        rates.append(len(images) / (time.perf_counter() - start))
        medians.append(statistics.median(seconds for seconds, _ in results))
        outputs = [out for _, out in results]
    return min(medians), max(rates), outputs


def reference_pixels(images: list[bytes], target: int) -> list[np.ndarray]:
    """Full decode + LANCZOS, never encoded: what every method's output is compared with."""
    references = []
    for original in images:
        im = Image.open(io.BytesIO(original))
        im.load()
        im = im.resize(target_size(*im.size, target), Image.Resampling.LANCZOS)
        references.append(np.asarray(im.convert("RGB")))
    return references


def psnr(outputs: list[bytes], references: list[np.ndarray]) -> str:
    """PSNR of the pooled mean squared error over the images whose output sizes match."""
    errors = []
    for out, ref in zip(outputs, references, strict=True):
        pixels = np.asarray(Image.open(io.BytesIO(out)).convert("RGB"), dtype=np.float64)
        if pixels.shape == ref.shape:
            errors.append(float(np.mean((pixels - ref) ** 2)))
    if not errors:
        return "n/a"
    mse = statistics.mean(errors)
    value = 99.0 if mse == 0 else 10 * np.log10(255**2 / mse)
    return f"{value:.1f} dB ({len(errors)}/{len(outputs)})"


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    libjpeg = features.version("libjpeg_turbo") or features.version("jpg")
    vips_version = (
        f"libvips {pyvips.version(0)}.{pyvips.version(1)}.{pyvips.version(2)}"
        if pyvips is not None
        else "pyvips not installed"
    )
    return (
        f"{model}; {os.cpu_count()} logical CPUs ({usable} usable); Python "
        f"{platform.python_version()}; Pillow {PIL.__version__} with libjpeg-turbo {libjpeg}; "
        f"{vips_version}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200, help="number of JPEGs (200)")
    parser.add_argument("--target", type=int, default=768, help="long side in pixels (768)")
    parser.add_argument("--repeat", type=int, default=3, help="passes, best kept (3)")
    args = parser.parse_args()

    print(machine())
    start = time.perf_counter()
    images = corpus(args.count)
    megapixels = []
    for original in images:
        with Image.open(io.BytesIO(original)) as im:
            megapixels.append(im.width * im.height / 1e6)
    print(
        f"{len(images)} JPEGs (q{QUALITY}), {statistics.mean(megapixels):.1f} MP and "
        f"{statistics.mean(len(i) for i in images) / 1024:.0f} KiB on average, "
        f"made in {time.perf_counter() - start:.1f} s; target long side {args.target} px\n"
    )

    methods: list[tuple[str, Transform]] = [
        ("a) full decode + resize (no draft)", naive(args.target)),
        ("b) image.prepare (draft)", prepared(args.target)),
    ]
    if pyvips is not None:
        pyvips.cache_set_max(0)  # every image is new in production: no operation cache
        methods.append(("c) pyvips thumbnail_buffer", vips(args.target)))

    references = reference_pixels(images, args.target)
    header = f"{'method':38s} {'threads':>7s} {'median ms/img':>14s} {'images/s':>9s}  PSNR"
    print(header)
    print("-" * len(header))
    for threads in (1, 2):
        for name, transform in methods:
            median_s, rate, outputs = measure(transform, images, threads, args.repeat)
            quality = psnr(outputs, references) if threads == 1 else ""
            print(f"{name:38s} {threads:7d} {median_s * 1000:14.1f} {rate:9.1f}  {quality}")


if __name__ == "__main__":
    main()
