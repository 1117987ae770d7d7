"""
Data loader throughput: decoded images per second per worker, ours against a plain webdataset + PIL
pipeline (decode, resize the shorter side, centre crop, to a float tensor), side by side on the same
shards in the same run (interleaved repeats, medians). One process each (num_workers=0), so the figure is per worker (per core).

    python benchmarks/bench_loader.py                      # makes 256-px shards of photo-like images, then measures
    python benchmarks/bench_loader.py --data_dir data/t2i  # your own prepared shards (its train split)

First it times tokenising a batch of captions (ours, one caption at a time, against tiktoken's
encode_ordinary_batch) and indexing the shards (where every sample's bytes sit, read from the tar
headers; ours against listing them with the tarfile module).

Ours also tokenises the captions, which the plain pipeline does not do. A third figure is ours as
training reads (augment: a random resized crop, so every image is resampled; shuffled order).
"""
import argparse
import glob
import io
import os
import sys
import tarfile
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from clip import Tokenizer  # noqa: E402
from dataloader import ShardDataset, index_shard  # noqa: E402


def make_shards(out_dir, n, size=256, shard_size=500):
    """Smooth random colour fields plus noise: closer to photos than flat shapes (JPEG cost depends on it)."""
    os.makedirs(os.path.join(out_dir, "train"), exist_ok=True)
    rng = np.random.default_rng(0)
    for s in range(0, n, shard_size):
        with tarfile.open(os.path.join(out_dir, "train", f"shard-{s // shard_size:06d}.tar"), "w") as tf:
            for i in range(s, min(n, s + shard_size)):
                low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                img = Image.fromarray(low).resize((size, size), Image.BICUBIC)
                arr = np.clip(np.asarray(img).astype(int) + rng.integers(-25, 26, (size, size, 3)), 0, 255)
                buf = io.BytesIO()
                Image.fromarray(arr.astype(np.uint8)).save(buf, "JPEG", quality=90)
                for ext, data in (("jpg", buf.getvalue()), ("txt", f"a photo number {i}".encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))


def plain_pipeline(paths, size):
    import webdataset as wds

    def to_tensor(sample):
        img, _ = sample
        w, h = img.size
        s = size / min(w, h)
        img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
        img = img.crop((left, top, left + size, top + size))
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)

    return wds.WebDataset(paths, shardshuffle=False, empty_check=False).decode("pil").to_tuple("jpg", "txt").map(to_tensor)


def time_plain(paths, size, n):
    t = time.perf_counter()
    count = 0
    for _ in plain_pipeline(paths, size):
        count += 1
        if count == n:
            break
    return count / (time.perf_counter() - t)


def time_ours(paths, size, n, batch=64, augment=False):
    ds = ShardDataset(paths, batch, size, 32, "cl100k_base", train=augment, seed=0, rank=0, world_size=1,
                      augment=augment, crop_scale=(0.8, 1.0), shuffle_buffer=10_000, drop_last=True,
                      with_labels=False, trim_tokens=False, all_captions=False)
    ds[0]  # load the tokenizer outside the timing
    t = time.perf_counter()
    count = 0
    for k in range(1, len(ds)):
        count += ds[k][0].shape[0]
        if count >= n:
            break
    return count / (time.perf_counter() - t)


def time_index(paths):
    """(ours, tarfile) seconds to find every file of every shard."""
    t = time.perf_counter()
    n = sum(len(index_shard(p)[0]) for p in paths)
    ours = time.perf_counter() - t
    t = time.perf_counter()
    for p in paths:
        with tarfile.open(p) as tf:
            [(m.offset_data, m.size) for m in tf if m.isfile()]
    return ours, time.perf_counter() - t, n


def time_tokenize(reps=20):
    """(ours, tiktoken's encode_ordinary_batch) seconds to tokenise a batch of 256 captions."""
    tokenizer = Tokenizer("cl100k_base", 77)
    captions = [f"a photo number {i} of a small red circle in the top left, and a few more words" for i in range(256)]
    tokenizer(captions)
    t = time.perf_counter()
    for _ in range(reps):
        tokenizer(captions)
    ours = (time.perf_counter() - t) / reps
    t = time.perf_counter()
    for _ in range(reps):
        tokenizer.enc.encode_ordinary_batch(captions)
    return ours, (time.perf_counter() - t) / reps


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=None)
    p.add_argument("--n", type=int, default=2000, help="images timed per measurement")
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 64])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or tmp
        if not args.data_dir:
            make_shards(tmp, args.n + 200)
        paths = sorted(glob.glob(os.path.join(data_dir, "train", "*.tar")))
        runs = [time_tokenize() for _ in range(args.repeats)]
        ours, batch = (float(np.median([r[i] for r in runs])) for i in (0, 1))
        print(f"tokenise 256 captions: ours {1000 * ours:.2f} ms | encode_ordinary_batch {1000 * batch:.2f} ms "
              f"| ratio {batch / ours:.2f}x")
        runs = [time_index(paths) for _ in range(args.repeats)]
        ours, plain = (float(np.median([r[i] for r in runs])) for i in (0, 1))
        print(f"index {runs[0][2]} samples: ours {ours:.3f} s | tarfile {plain:.3f} s | ratio {plain / ours:.2f}x")
        for size in args.sizes:
            # interleaved repeats, median of each: a shared or throttled machine skews a single pair
            runs = [(time_plain(paths, size, args.n), time_ours(paths, size, args.n),
                     time_ours(paths, size, args.n, augment=True)) for _ in range(args.repeats)]
            plain, ours, train = (float(np.median([r[i] for r in runs])) for i in (0, 1, 2))
            print(f"{size:>4} px: ours {ours:7.0f} img/s/worker | plain webdataset+PIL {plain:7.0f} img/s/worker "
                  f"| ratio {ours / plain:.2f}x | ours with training's random crop {train:7.0f} img/s/worker")


if __name__ == "__main__":
    main()
