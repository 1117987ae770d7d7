"""
Zero-shot classification throughput (evaluate.py --zeroshot on an image folder): images per second with
the decoding and cropping in the main process (--num_workers 0) against worker processes, side by side
on the same folder (interleaved rounds, medians). ImageNet-sized photo-like JPEGs (500x375), a random
model, so the figure is the evaluation's own cost and not the model's.

    python benchmarks/bench_zeroshot.py                        # tiny model, 0 against 1 and 2 workers
    python benchmarks/bench_zeroshot.py --model base --workers 0 4 8 --images 2000
    python benchmarks/bench_zeroshot.py --workers 0 --decode reduced,full   # JPEGs decoded at 1/2-1/8 scale or whole
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluate  # noqa: E402
from bench_prep import photo_like  # noqa: E402
from clip import CLIP, get_config  # noqa: E402
from evaluate import zeroshot_classification  # noqa: E402
from prep_dataset import upright_rgb  # noqa: E402

REDUCED = evaluate.image_batch


def full_size(images, size):
    """evaluate.image_batch as it was before it let the JPEG decoder shrink big images: each decoded whole."""
    return REDUCED([upright_rgb(img) for img in images], size)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--images", type=int, default=400, help="images in the folder (4 classes)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--decode", default="reduced", help="reduced (the JPEG decoder shrinks what the crop allows), "
                   "full (every image decoded whole), or both: reduced,full")
    args = p.parse_args()
    settings = [(w, d) for w in args.workers for d in args.decode.split(",")]
    cfg = get_config(args.model)
    model = CLIP(cfg).eval()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as root:
        for i in range(args.images):
            os.makedirs(os.path.join(root, f"class{i % 4}"), exist_ok=True)
            with open(os.path.join(root, f"class{i % 4}", f"{i}.jpg"), "wb") as f:
                f.write(photo_like(500, 375, rng))
        rates = {s: [] for s in settings}
        for _ in range(args.rounds):  # the settings take turns, so a slow minute weighs on all of them
            for w, decode in settings:
                evaluate.image_batch = REDUCED if decode == "reduced" else full_size  # the workers fork with it
                t = time.perf_counter()
                zeroshot_classification(model, root, cfg, torch.device("cpu"), torch.autocast("cpu", enabled=False),
                                        templates=["a photo of a {}."], batch_size=args.batch_size, num_workers=w)
                rates[w, decode].append(args.images / (time.perf_counter() - t))
    base = statistics.median(rates[settings[0]])
    for w, decode in settings:
        rate = statistics.median(rates[w, decode])
        print(f"{args.model}, {cfg.image_size} px: {w} workers, {decode} decode {rate:7.1f} img/s | "
              f"{rate / base:.2f}x {settings[0][0]} workers, {settings[0][1]} decode")


if __name__ == "__main__":
    main()
