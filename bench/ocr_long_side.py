"""How many pixels OCR needs: the share of rendered words the ``content`` profile reads at
each analysis long side, and what a side costs.

Photographs of a camera's size (3000 x 2000 by default) with words rendered at several
sizes (``libs/devtools/text_images.py``), made into analysis images by the fetcher's own
``image.prepare`` at each long side, read by the content models in this process (one
onnxruntime thread, as in the analyzer's workers). Prints a table: per long side, the
share of words found per font size and overall, and the CPU seconds an image took (CPU
time, not wall time: the figure holds on a machine other work shares).

    uv run python bench/ocr_long_side.py --images 12
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import machine, median, table

from imagestream.analyzer.providers.local.content import analyze_content, load_models
from imagestream.devtools.text_images import found, text_photo
from imagestream.fetcher.image import prepare

SIDES = (768, 1024, 1280, 1600, 2048)
#: Font sizes in the original, in pixels (a capital letter is about 0.7 of it).
SIZES = (20, 28, 40, 56, 80)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--width", type=int, default=3000)
    parser.add_argument("--height", type=int, default=2000)
    parser.add_argument("--sides", default=",".join(map(str, SIDES)))
    args = parser.parse_args()
    sides = [int(s) for s in args.sides.split(",")]

    load_models(threads=1, nsfw_threshold=0.5)
    photos = []
    for seed in range(args.images):
        photo = text_photo(
            args.width, args.height, seed, sizes=SIZES, angles=(0.0, 8.0, -15.0), per_size=2
        )
        buf = io.BytesIO()
        photo.image.save(buf, "JPEG", quality=90)
        photos.append((photo, buf.getvalue()))

    rows = []
    for side in sides:
        hits = {size: 0 for size in SIZES}
        totals = {size: 0 for size in SIZES}
        seconds = []
        for photo, original in photos:
            prepared = prepare(original, target_long_side=side)
            started = time.process_time()
            fields = analyze_content(prepared.data, prepared.facts)
            seconds.append(time.process_time() - started)
            read = set(found(photo.words, fields["text"]))
            for word in photo.words:
                totals[word.size] += 1
                hits[word.size] += word.text in read
        share = [f"{hits[s] / totals[s]:.0%}" for s in SIZES]
        overall = sum(hits.values()) / sum(totals.values())
        rows.append([side, *share, f"{overall:.0%}", f"{median(seconds):.2f}"])
    print(machine())
    print(
        f"{args.images} photos {args.width}x{args.height}, {len(SIZES) * 2} words each"
        f" (fonts: Pillow's bundled, DejaVu Serif Bold, DejaVu Sans Mono; angles 0, 8, -15)"
    )
    print(
        table(
            ["long side", *[f"{s} px" for s in SIZES], "all words", "CPU s/image (median)"],
            rows,
        )
    )


if __name__ == "__main__":
    main()
