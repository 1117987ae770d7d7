"""
prep_dataset.py's work per image (decode, upright, resize + centre crop, JPEG encode), with the JPEG
decoder asked to shrink big images by 1/2, 1/4 or 1/8 as it decodes, against a full-size decode
followed by the same resize. Photo-like JPEGs of a few sizes, interleaved repeats, medians; one process,
so the figures are per worker.

    python benchmarks/bench_prep.py
    python benchmarks/bench_prep.py --sizes 512x384 1024x768 2048x1536 --image_size 256
"""
import argparse
import io
import os
import statistics
import sys
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from prep_dataset import resize_and_crop  # noqa: E402


def photo_like(w, h, rng):
    """Smooth colour fields plus noise, as a camera would save them (JPEG cost depends on content)."""
    low = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    arr = np.clip(np.asarray(low).astype(int) + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def process(data, image_size, reduced_decode):
    img = Image.open(io.BytesIO(data))
    if not reduced_decode:
        img.load()  # decoded at full size: too late for the decoder to shrink it
    out = io.BytesIO()
    resize_and_crop(img, image_size).save(out, "JPEG", quality=90)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["512x384", "1024x768", "2048x1536"])
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--images", type=int, default=24, help="distinct images per size")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    for size in args.sizes:
        w, h = map(int, size.split("x"))
        images = [photo_like(w, h, rng) for _ in range(args.images)]
        rates = {True: [], False: []}
        for _ in range(args.rounds):  # the two paths take turns, so a slow minute weighs on both
            for reduced in (True, False):
                t = time.perf_counter()
                for data in images:
                    process(data, args.image_size, reduced)
                rates[reduced].append(len(images) / (time.perf_counter() - t))
        fast, slow = statistics.median(rates[True]), statistics.median(rates[False])
        print(f"{size:>10} -> {args.image_size} px: reduced-scale decode {fast:6.0f} img/s | full-size decode "
              f"{slow:6.0f} img/s | {fast / slow:.2f}x")


if __name__ == "__main__":
    main()
