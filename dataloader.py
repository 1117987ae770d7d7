"""
Streams webdataset shards (KEY.jpg + KEY.txt) into (images, tokens) batches for train.py.

    loader = ShardLoader("data/shapes", "train", batch_size=256, image_size=64, context_length=32)
    for images, tokens in loader:   # images: (B, 3, H, W) uint8, tokens: (B, context_length) int32
        ...
    state = loader.state_dict()     # {"epoch", "position"}: store it in a checkpoint, load_state_dict() to resume

How an epoch is ordered. Every sample of every shard is indexed once at start (tar headers only). An
epoch's order is drawn from (seed, epoch): the shard order is permuted, then the samples are shuffled
within consecutive buffers of `shuffle_buffer` samples, so reads stay local on disk while the mix is
wide. Global batch b is order[b*batch_size : (b+1)*batch_size] and rank r takes its r-th slice, so:
  - every rank sees a disjoint part of the data, and together they see all of it but the final partial batch;
  - every rank runs the same number of steps, and N ranks see exactly the batches one process would;
  - the state is just (epoch, position), and a restored loader yields exactly the batches that follow.
Decoding, cropping and tokenising run in worker processes; images stay uint8 until the model
normalises them on the device. A bad sample (corrupt image, bad caption) is replaced by the next
good one in the epoch's order and counted; a truncated tar keeps the samples it holds in full.
"""
import atexit
import glob
import io
import json
import mmap
import os
import signal
import sys
import weakref
from itertools import count

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from clip import Tokenizer
from prep_dataset import TABLE_EXTENSIONS, not_data, not_data_member, upright_rgb

# a shard key's image: the first of these present (every kind prep_dataset.py reads; other tools' shards hold
# some of them, prep's own only .jpg)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "jpe", "jfif", "avif", "bmp", "gif", "tif", "tiff")
EXIF_ORIENTATION = 0x0112  # the tag that says how a photo's pixels are rotated
MAX_OPEN_SHARDS = 64  # open shard files per loader process (fewer under a low open-files limit: max_open_shards)


def default_num_workers(processes=1, cpu_step=False):
    """Loader processes for each of `processes` processes on this machine (DDP ranks): the cores this
    process may use, shared out, less one for each process's own loop; 1 to 16. cpu_step: the training step
    itself runs on these cores, its threads on every one of them; with two cores or fewer a loader process
    only takes one away from it (the demo's steps on 2 cores, runs alternated: 425-551 samples/s with one,
    498-577 with none), so the batches are decoded in the training process: 0."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if cpu_step and cores // processes <= 2:
        return 0
    return max(1, min(16, cores // processes - 1))


def open_files_limit():
    """This process's limit on open files (`ulimit -n`), or None where there is none (Windows)."""
    try:
        import resource
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return None
    return None if limit == resource.RLIM_INFINITY else limit


def max_open_shards():
    """MAX_OPEN_SHARDS, or a quarter of the open-files limit where that is lower (`ulimit -n 64`)."""
    limit = open_files_limit()
    return MAX_OPEN_SHARDS if limit is None else max(1, min(MAX_OPEN_SHARDS, limit // 4))


def room_for_loader_processes(num_workers, batch_bytes, wanted=4096, low=256):
    """Readies this process for `num_workers` loader processes that hand it batches of `batch_bytes` -> how many
    batches each may keep ready (prefetch_in_shared_memory). A loader process that cannot hand its batch over leaves
    the training process waiting for it forever. It keeps shards open and hands each batch's tensors over as open
    files (torch's default way on Linux): under a low open-files limit it runs out of them. So the limit is raised
    to `wanted` where the hard limit allows it (any process may raise its own so far; other training frameworks do
    the same), and where it stays low, the tensors travel as named shared-memory files instead, which hold no open
    file (torch's way on macOS)."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY else
                                                        max(soft, min(wanted, hard)), hard))
    except (ImportError, OSError, ValueError):  # Windows has no such limit; a system that refuses keeps its own
        pass
    limit = open_files_limit()
    if limit is not None and limit < low and torch.multiprocessing.get_sharing_strategy() == "file_descriptor":
        torch.multiprocessing.set_sharing_strategy("file_system")
    return prefetch_in_shared_memory(num_workers, batch_bytes)


PREFETCH = 4  # batches each loader process keeps ready


def prefetch_in_shared_memory(num_workers, batch_bytes, shm="/dev/shm"):
    """How many batches each loader process may keep ready: PREFETCH, or fewer where the shared memory that batches
    travel through would not hold them all (Docker gives a container 64 MB of /dev/shm unless it is started with
    --ipc=host or --shm-size). A loader process that finds no room there cannot hand its batch over, and training
    waited for it forever. A node's processes share that memory, and each has a train and a val loader: a loader
    counts on its part. Where not even one batch per loader process fits: a ValueError that says what to do."""
    try:
        disk = os.statvfs(shm)
    except (OSError, AttributeError):  # not Linux: no such memory to count
        return PREFETCH
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    fits = int(disk.f_bavail * disk.f_frsize / (2 * processes) // batch_bytes) - 2  # beside a step's batch and the next
    if fits < num_workers:
        raise ValueError(
            f"{shm} has {disk.f_bavail * disk.f_frsize / 2 ** 20:.0f} MB free, too little for the batches of "
            f"{batch_bytes / 2 ** 20:.1f} MB that {num_workers} loader processes" + (
                f" in each of {processes} processes" if processes > 1 else "") + " hand over through it. In Docker, "
            "start the container with --ipc=host (or --shm-size=16g); or give --num_workers "
            f"{max(fits, 0)}{' (no loader processes: slower)' if fits <= 0 else ''}")
    return min(PREFETCH, fits // num_workers)


def data_dirs(data_dir):
    """The prepared sets a --data_dir lists, comma-separated: data/coco,data/t2i -> [data/coco, data/t2i].
    evaluate.py's --zeroshot and --retrieval lists of sets are read the same way."""
    return [d.strip() for d in str(data_dir).split(",") if d.strip()]


def expand_home(paths):
    """`~` expanded in each of a comma-separated list of paths where the shell leaves it, after an = sign
    (--data_dir=~/coco,~/t2i), rather than read as a folder named ~. A hub set's name stays as it is."""
    return ",".join(os.path.expanduser(d) for d in data_dirs(paths))


def shard_paths(data_dir, split):
    """DIR/split/*.tar, over every prepared set that data_dir lists."""
    return sorted(p for d in data_dirs(data_dir) for p in glob.glob(os.path.join(glob.escape(d), split, "*.tar")))


def find_shards(data_dir, split):
    """shard_paths, where every listed set must have some: else an error that says how to make them."""
    if not data_dirs(data_dir):
        raise FileNotFoundError(f"no data folder named ({data_dir!r}): give the folder of a set that prep_dataset.py "
                                "made, e.g. --data_dir data/shapes")
    for d in data_dirs(data_dir):
        if shard_paths(d, split):
            continue
        if os.path.isfile(d):  # a table or an archive of the data itself, given where its prepared set goes
            table = os.path.splitext(d)[1].lower() in TABLE_EXTENSIONS
            raise FileNotFoundError(
                f"{d} is a file: training reads the folder of shards that prep_dataset.py makes"
                + (f". Prepare this table into one first: python prep_dataset.py --source table --input {d} "
                   f"--out_dir {os.path.splitext(d)[0]}-prepared" if table else ", given as --data_dir FOLDER"))
        if os.path.isdir(os.path.join(d, ".stage")):  # prep_dataset.py's work in progress
            raise FileNotFoundError(f"no shards in {os.path.join(d, split)} yet: prep_dataset.py has not finished "
                                    f"making {d} (it was stopped, or still runs). Rerun its command: it goes on from "
                                    "what is finished")
        made = [s for s in ("train", "val") if shard_paths(d, s)]  # the splits it has, where it is a prepared set
        if split == "train" and made:  # val/ alone: prepared with --val_fraction 1
            raise FileNotFoundError(
                f"{d} holds val/ shards only: an evaluation set (prepared with --val_fraction 1). Train on a set "
                f"with train/ shards, and evaluate on this one with: python evaluate.py RUN --retrieval {d}")
        if split == "val" and made:  # train/ alone: prepared with --val_fraction 0
            raise FileNotFoundError(
                f"{d} has no val/ shards (prepared with --val_fraction 0): evaluate on a held-out set, e.g. one "
                f"prepared with --val_fraction 1, or on the training images as {os.path.join(d, 'train')}")
        if made:  # a prepared set, asked for a split of another name (evaluate.py --split)
            raise FileNotFoundError(f"no shards in {os.path.join(d, split)}: the prepared set {d} has the split"
                                    f"{'s' * (len(made) > 1)} {' and '.join(made)}")
        loose = glob.glob(os.path.join(glob.escape(d), "*.tar"))
        parent = os.path.dirname(os.path.normpath(d))
        if loose and os.path.basename(os.path.normpath(d)) in ("train", "val") and \
                os.path.isfile(os.path.join(parent, "manifest.json")):  # a split's folder, given for the set
            raise FileNotFoundError(f"{d} is the {os.path.basename(os.path.normpath(d))} split of the prepared set "
                                    f"{parent}: give the set's folder, --data_dir {parent}")
        if loose:  # shards from another tool (img2dataset), not split into train/ and val/
            raise FileNotFoundError(
                f"no shards in {os.path.join(d, split)}, but {len(loose)} .tar files in {d} itself. Shards "
                f"are read from DIR/train/*.tar and DIR/val/*.tar; make those from these with\n"
                f"  python prep_dataset.py --source webdataset --input '{os.path.join(d, '*.tar')}' --out_dir DIR")
        raw = set()  # the kinds of file in its first 1,000 folders: a look, not a crawl
        for _, (_, folders, files) in zip(range(1000), os.walk(d) if os.path.isdir(d) else ()):
            folders[:] = [f for f in folders if not not_data(f)]  # an interrupted prep's .stage is no data
            raw |= {os.path.splitext(f)[1].lower() for f in files if not not_data(f)}
        images, tables = raw & {"." + e for e in IMAGE_EXTENSIONS}, raw & TABLE_EXTENSIONS
        if images or tables:  # the data itself, not yet prepared
            pairs = bool(images and raw & {".txt", ".caption"}) or not tables  # x.jpg + x.txt, or x.json records
            raise FileNotFoundError(
                f"no shards in {os.path.join(d, split)}: {d} holds {'images' if images else 'tables'}, not the shards "
                "that training reads. Prepare them into a folder of their own, then train on that:\n"
                f"  python prep_dataset.py --source {'folder' if pairs else 'table'} --input "
                f"{d if pairs else 'TABLE'} --out_dir {d.rstrip(os.sep)}-prepared"
                + ("" if pairs else f"   (TABLE: the file in {d} that pairs image paths and captions)"))
        if "text-to-image-2m" in os.path.basename(os.path.normpath(d)).lower():  # train.py's default: that set
            raise FileNotFoundError(
                f"no shards in {os.path.join(d, split)}. Make them first (from the Hugging Face hub):\n"
                f"  python prep_dataset.py --out_dir {d}                  (all of text-to-image-2M)\n"
                f"  python prep_dataset.py --out_dir {d} --limit 100000   (a subset)\n"
                "or name your own prepared set with --data_dir")
        raise FileNotFoundError(
            f"no shards in {os.path.join(d, split)}. Make them first, e.g.\n"
            f"  python prep_dataset.py --source shapes --out_dir {d}            (the synthetic demo set)\n"
            f"  python prep_dataset.py --out_dir {d} --limit 100000             (text-to-image-2M)\n"
            f"  python prep_dataset.py --source folder --input PAIRS --out_dir {d}   (your x.jpg + x.txt pairs)")
    return shard_paths(data_dir, split)


def index_shard(path):
    """-> ({key: {ext: (offset, size)}}, n_truncated): where each file's bytes sit inside the tar.
    It reads the 512-byte tar headers itself (ustar, GNU long names, pax paths) through a memory map:
    about 3x faster than listing with the tarfile module (benchmarks/bench_loader.py), which counts with
    millions of samples indexed at every start.
    A damaged header ends the shard there, like a truncated file."""
    samples, truncated = {}, 0
    size = os.path.getsize(path)
    if size == 0:
        return samples, 0
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as tar:
        offset, next_name = 0, None
        while True:
            if offset + 512 > size:  # no end-of-archive marker: the file was cut, maybe inside a header
                if offset != size:
                    print(f"warning: {path} is cut short; using the samples before the cut", file=sys.stderr)
                    truncated += 1
                break
            header = tar[offset:offset + 512]
            if header == bytes(512):  # the end-of-archive marker
                break
            try:
                checksum = int(header[148:156].strip(b"\0 ") or b"0", 8)
                length = int(header[124:136].strip(b"\0 ") or b"0", 8)
            except ValueError:
                checksum, length = -1, 0
            unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])  # the checksum field counts as spaces
            # some old tar programs sum the bytes as signed
            if checksum != unsigned and checksum != unsigned - 256 * sum(b > 127 for b in header):
                print(f"warning: {path} is damaged at byte {offset}; using the samples before it", file=sys.stderr)
                truncated += 1
                break
            kind, data = header[156:157], offset + 512
            name = header[:100].split(b"\0", 1)[0]
            if header[257:263] == b"ustar\0" and header[345]:  # POSIX: a path prefix for long names
                name = header[345:500].split(b"\0", 1)[0] + b"/" + name
            if kind == b"L":  # GNU: the next entry's long name
                next_name = tar[data:data + length].split(b"\0", 1)[0]
            elif kind == b"x":  # pax: "LEN key=value\n" records, of which the path names the next entry
                for record in tar[data:data + length].split(b"\n"):
                    key, _, value = record.partition(b" ")[2].partition(b"=")
                    if key == b"path":
                        next_name = value
            else:
                name, next_name = next_name or name, None  # a long name belongs to this entry, whatever it is
            if kind in (b"0", b"\0"):  # a regular file; anything else (folders, links) holds no sample
                if data + length > size:  # cut off by a truncated file: nothing after it either
                    truncated += 1
                    break
                # webdataset's convention: the key is the path up to the first dot of the file name
                path = name.decode("utf-8", "replace")
                folder, _, base = path.rpartition("/")
                stem, _, ext = base.partition(".")
                if not not_data_member(path):
                    samples.setdefault(f"{folder}/{stem}" if folder else stem, {})[ext.lower()] = (data, length)
            offset = data + (length + 511) // 512 * 512
    return samples, truncated


def prepare_image(image, size, rng=None, crop_scale=(0.8, 1.0)):
    """Encoded image bytes (or a PIL image) -> (size, size, 3) uint8 array. With an rng: a random resized
    crop (crop_scale of the area, aspect ratio in [3/4, 4/3]); without: a centre crop. Evaluation
    everywhere (val loss, zero-shot, retrieval) goes through here, so it matches training's eval path."""
    img = Image.open(io.BytesIO(image)) if isinstance(image, (bytes, bytearray)) else image
    if img.mode not in ("RGB", "L") or "transparency" in img.info or img.getexif().get(EXIF_ORIENTATION, 1) != 1:
        # what prep_dataset.py never writes but other tools' shards hold: a rotation tag, transparency, CMYK,
        # 16 bits. Seen as prep shows an image (upright, transparency on white), as evaluation sees it too
        img = upright_rgb(img)
    w, h = img.size
    if rng is not None:
        area = w * h * rng.uniform(*crop_scale)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = min(w, np.sqrt(area * ratio)), min(h, np.sqrt(area / ratio))
        left, top = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
    else:
        # the centre square; when the image is at most 8/7 of the target (256-px shards for a 224-px model)
        # just the centre size x size pixels, as they are: the usual 224-of-256 crop, with no resampling
        cw = ch = size if size <= min(w, h) <= size * 8 / 7 else min(w, h)
        left, top = (w - cw) // 2, (h - ch) // 2
    if img.format == "JPEG" and min(cw, ch) >= 2 * size:
        # JPEG can decode at 1/2, 1/4, 1/8 scale almost for free: the cheapest way to shrink big images
        img.draft("RGB", (max(size, round(w * size / cw)), max(size, round(h * size / ch))))
        # each side is rounded up on its own (501 x 375 at 1/4: 126 x 94), so each keeps its own scale
        sx, sy = img.size[0] / w, img.size[1] / h
        left, top, cw, ch, w, h = left * sx, top * sy, cw * sx, ch * sy, *img.size
    img = img.convert("RGB")
    if (cw, ch) == (size, size) and left == int(left) and top == int(top):
        img = img.crop((left, top, left + size, top + size)) if (w, h) != (size, size) else img
    else:
        img = img.resize((size, size), Image.BICUBIC, box=(left, top, left + cw, top + ch))
    return np.asarray(img)


class ShardDataset(torch.utils.data.Dataset):
    """Item k is the k-th local batch from the start of epoch 0 (epochs of `batches_per_epoch`)."""

    def __init__(self, paths, batch_size, image_size, context_length, encoding, train, seed, rank,
                 world_size, augment, crop_scale, shuffle_buffer, drop_last, with_labels, trim_tokens, all_captions):
        assert batch_size % world_size == 0, f"batch_size {batch_size} must divide by the {world_size} ranks"
        self.paths, self.image_size, self.train, self.seed, self.rank = paths, image_size, train, seed, rank
        self.global_batch, self.local_batch = batch_size, batch_size // world_size
        self.augment, self.crop_scale, self.shuffle_buffer = augment, crop_scale, shuffle_buffer
        self.context_length, self.encoding, self.tokenizer = context_length, encoding, None
        self.with_labels, self.trim_tokens, self.all_captions = with_labels, trim_tokens, all_captions
        # the index: one row per complete sample: shard, then (offset, size) of its image, caption and labels
        rows, self.shard_rows, self.skipped_at_index, kinds = [], [], 0, None
        # the full text-to-image-2M takes about half a minute to index: a bar, on one rank, where it is long, on a
        # terminal (disable=None: not in a batch job's log file)
        for s, path in enumerate(tqdm(paths, desc="index shards", unit=" shards", leave=False,
                                      disable=True if rank != 0 or len(paths) < 50 else None)):
            samples, truncated = index_shard(path)
            self.skipped_at_index += truncated
            start = len(rows)
            for key in sorted(samples):
                files = samples[key]
                image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
                if image is None or "txt" not in files:
                    self.skipped_at_index += 1
                    kinds = set(files)  # what an incomplete sample holds, for the error below
                    continue
                rows.append((s, *image, *files["txt"], *files.get("json", (-1, -1))))
            self.shard_rows.append(np.arange(start, len(rows)))
        if not rows:
            folder = os.path.dirname(paths[0])
            raise ValueError(
                f"the shards in {folder} hold no complete sample (an image and its caption in KEY.txt)"
                + (f"; their samples have {', '.join('.' + k for k in sorted(kinds))} files" if kinds else "")
                + f". Shards from another tool (captions in .json, as img2dataset and text-to-image-2M write them) are "
                f"made into training shards by: python prep_dataset.py --source webdataset --input '{folder}/*.tar' "
                "--out_dir NEW_DIR")
        self.index = np.array(rows, dtype=np.int64)
        self.num_samples = len(rows)
        if drop_last and self.num_samples < batch_size:
            raise ValueError(f"batch_size {batch_size} is larger than the {self.num_samples} samples in "
                             f"{', '.join(sorted({os.path.dirname(p) for p in paths}))}: use a smaller --batch_size "
                             "or more data")
        self.batches_per_epoch = self.num_samples // batch_size if drop_last else -(-self.num_samples // batch_size)
        self._order, self._files, self.max_open = (None, None), {}, max_open_shards()

    def __len__(self):
        return self.batches_per_epoch

    def __getstate__(self):
        # a copy for a loader process started by spawn or forkserver (macOS; Linux from Python 3.14) opens its own
        # files: the numbers of this process's handles mean nothing there, or another file
        return {**self.__dict__, "_files": {}, "_order": (None, None)}

    def epoch_order(self, epoch):
        if self._order[0] != epoch:
            if not self.train:
                order = np.arange(self.num_samples)
            else:
                rng = np.random.default_rng([self.seed, epoch])
                order = np.concatenate([self.shard_rows[s] for s in rng.permutation(len(self.shard_rows))])
                for start in range(0, len(order), self.shuffle_buffer):
                    rng.shuffle(order[start:start + self.shuffle_buffer])
            self._order = (epoch, order)
        return self._order[1]

    def read(self, shard, offset, size):
        if shard not in self._files:  # opened lazily, so every worker process has its own handles
            if len(self._files) >= self.max_open:  # a big dataset has thousands: stay under the usual 1024
                os.close(self._files.pop(next(iter(self._files))))  # the least recently read
            binary = getattr(os, "O_BINARY", 0)  # Windows: bytes as they are, no newline translation
            self._files[shard] = os.open(self.paths[shard], os.O_RDONLY | binary)
        self._files[shard] = fd = self._files.pop(shard)  # to the end: the most recently read
        if hasattr(os, "pread"):  # one call, no shared file position
            return os.pread(fd, size, offset)
        os.lseek(fd, offset, os.SEEK_SET)  # Windows has no pread; each worker process has its own handles
        return os.read(fd, size)

    def load(self, row, rng):
        """One sample -> ((H, W, 3) uint8 array, caption, labels or None); raises on bad data."""
        shard, img_off, img_len, txt_off, txt_len, json_off, json_len = self.index[row]
        # "utf-8-sig" and strip(): other tools' shards may hold a byte-order mark or Windows line ends
        lines = [line.strip() for line in self.read(shard, txt_off, txt_len).decode("utf-8-sig").splitlines()]
        lines = [line for line in lines if line]
        if not lines:
            raise ValueError("empty caption")
        # several lines: several captions, one drawn per epoch in training (retrieval scores them all)
        caption = lines if self.all_captions else lines[rng.integers(len(lines))] if self.train else lines[0]
        labels = json.loads(self.read(shard, json_off, json_len)) if self.with_labels and json_len >= 0 else None
        image = prepare_image(self.read(shard, img_off, img_len), self.image_size,
                              rng if self.train and self.augment else None, self.crop_scale)
        return image, caption, labels

    def __getitem__(self, k):
        epoch, b = divmod(k, self.batches_per_epoch)
        order = self.epoch_order(epoch)
        if self.tokenizer is None:
            self.tokenizer = Tokenizer(self.encoding, self.context_length)
        start = b * self.global_batch + self.rank * self.local_batch
        positions = range(start, min(start + self.local_batch, self.num_samples))
        images = np.empty((len(positions), self.image_size, self.image_size, 3), dtype=np.uint8)
        captions, labels, skipped = [], [], 0
        for j, pos in enumerate(positions):
            for attempt in range(100):  # a bad sample is replaced by the next good one in the epoch's order
                row = order[(pos + attempt) % self.num_samples]
                try:
                    images[j], caption, label = self.load(row, np.random.default_rng([self.seed, epoch, row]))
                    break
                except Exception:  # corrupt image, bad caption bytes: skip and count, never crash
                    skipped += 1
            else:
                raise RuntimeError(f"100 bad samples in a row around position {pos} of {self.paths[0]}...: "
                                   "the shards look broken; rebuild them with prep_dataset.py")
            captions.append(caption)
            labels.append(label)
        images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)
        counts = None
        if self.all_captions:  # every caption of every image, in order, and how many each image has
            counts, captions = [len(c) for c in captions], [c for cs in captions for c in cs]
        return images, self.tokenizer(captions, trim=self.trim_tokens), skipped, labels, counts


def prefetch(batches, device):
    """Yields `batches` with their first two tensors (images and token ids, or labels) on `device`, copied
    one batch ahead.

    On CUDA the next batch's copy runs on a side stream while the current batch's step computes: a
    224-px batch of 256 is 38 MB of uint8, which copied on the compute stream sits between two steps
    (1.3% of the `base` step on an H100). Each batch carries an event recorded after its copy, and the
    compute stream waits on that event alone (waiting on the side stream would also wait for the copy
    queued after it). record_stream tells the allocator that the compute stream uses the memory, so it
    is not handed to the next copy while a step still reads it; torch's pinned-memory allocator likewise
    keeps a host buffer until its copy has ended."""
    if device is None:
        yield from batches
        return
    device = torch.device(device)
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def issue(batch):
        images, tokens, *rest = batch
        if stream is None:
            return images.to(device), tokens.to(device), rest, None
        with torch.cuda.stream(stream):
            images, tokens = images.to(device, non_blocking=True), tokens.to(device, non_blocking=True)
            return images, tokens, rest, stream.record_event()

    def ready(pending):
        images, tokens, rest, copied = pending
        if copied is not None:
            compute = torch.cuda.current_stream(device)
            compute.wait_event(copied)
            images.record_stream(compute)
            tokens.record_stream(compute)
        return (images, tokens, *rest)

    pending = None
    for batch in batches:
        batch = issue(batch)  # the next batch's copy starts before the current batch is handed over
        if pending is not None:
            yield ready(pending)
        pending = batch
    if pending is not None:
        yield ready(pending)


# the iterators over loaders with loader processes that are still open, closed as Python exits
open_iterators = weakref.WeakSet()


@atexit.register  # after multiprocessing's own exit handler, so it runs before that one
def close_open_iterators():
    """Python's exit asks the loader processes still running to stop with a SIGTERM, which they ignore
    (ignore_sigterm), then waits for them: an iterator still open then (`batches = iter(loader)` at the top of a
    script) would keep the script from ever ending. Closing it ends its loader processes the usual way."""
    for batches in list(open_iterators):
        batches.close()


def ignore_sigterm(worker_id):
    """In each loader process: a SIGTERM sent to the whole process group (torchrun's and SLURM's way of
    stopping a job) is for the training process to handle (it saves a checkpoint first); a loader process that
    died of it would end the run before that. The loader processes still exit with the training process."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class ShardLoader:
    """Iterating a train loader goes on forever, epoch after epoch, from its state; an eval loader
    (train=False) makes one pass in order, with no augmentation. Token ids come as (B, context_length);
    with trim_tokens=True only up to the batch's longest caption, which is all the causal text tower
    reads (training and evaluation use that: short captions then cost their own length). With
    all_captions=True (evaluation) a sample gives all of its captions, not one: the batch's token ids then
    have a row per caption, and a list of how many captions each image has comes last. Given a device,
    the images and token ids arrive on it, copied a batch ahead (see prefetch)."""

    def __init__(self, data_dir, split, batch_size, image_size, context_length, encoding="cl100k_base",
                 train=True, seed=0, rank=0, world_size=1, num_workers=2, augment=False, crop_scale=(0.8, 1.0),
                 shuffle_buffer=10_000, drop_last=True, with_labels=False, trim_tokens=False, all_captions=False,
                 device=None):
        # in training a partial last batch would give the ranks unequal shares (evaluation gathers them: see
        # evaluate.embed_shards)
        assert drop_last or world_size == 1 or not train, "a partial last batch would differ across ranks"
        self.prefetch = None  # batches each loader process keeps ready
        if num_workers > 0:  # before the shards are indexed: how many a process keeps open depends on it
            batch_bytes = batch_size // world_size * (3 * image_size ** 2 + 4 * context_length)  # uint8, int32 ids
            self.prefetch = room_for_loader_processes(num_workers, batch_bytes)
        self.dataset = ShardDataset(find_shards(data_dir, split), batch_size, image_size, context_length,
                                    encoding, train, seed, rank, world_size, augment, crop_scale,
                                    shuffle_buffer, drop_last, with_labels, trim_tokens, all_captions)
        self.train, self.num_workers, self.with_labels = train, num_workers, with_labels
        self.all_captions, self.device = all_captions, device
        # pinned (page-locked) host memory is what lets prefetch's copy to a GPU run asynchronously
        self.pin_memory = device is not None and torch.device(device).type == "cuda"
        self.step = 0  # batches handed out since the start of epoch 0
        self.skipped_in_batches = 0

    def __len__(self):
        return len(self.dataset)

    @property
    def epoch(self):
        return self.step // len(self.dataset)

    @property
    def skipped(self):
        return self.dataset.skipped_at_index + self.skipped_in_batches

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.step % len(self.dataset), "num_samples": self.dataset.num_samples,
                "batch_size": self.dataset.global_batch}

    def load_state_dict(self, state):
        if state.get("num_samples", self.dataset.num_samples) != self.dataset.num_samples:
            print(f"warning: the data changed since this state was saved ({state['num_samples']} samples, now "
                  f"{self.dataset.num_samples}): the order will not match the original run", file=sys.stderr)
        position = state["position"]
        if state.get("batch_size", self.dataset.global_batch) != self.dataset.global_batch:
            # a run resumed with another batch size goes on from the same sample of the epoch's order
            # (to a whole batch): the order does not depend on the batch size
            position = position * state["batch_size"] // self.dataset.global_batch
        self.step = state["epoch"] * len(self.dataset) + position

    def __iter__(self):
        batches = self.batches()
        if self.num_workers:
            open_iterators.add(batches)
        return batches

    def batches(self):
        steps = count(self.step) if self.train else range(len(self.dataset))
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=None, sampler=steps, num_workers=self.num_workers,
            pin_memory=self.pin_memory, prefetch_factor=self.prefetch,
            persistent_workers=False, worker_init_fn=ignore_sigterm)
        # counted here, as each batch is handed over: prefetch has already fetched the next one, and a
        # checkpoint taken now must resume from that batch, not after it
        for images, tokens, skipped, labels, counts in prefetch(loader, self.device):
            self.skipped_in_batches += skipped
            if self.train:
                self.step += 1
            # labels: the KEY.json of each sample (the shapes set's classes), for zero-shot evaluation
            yield (images, tokens) + ((labels,) if self.with_labels else ()) + ((counts,) if self.all_captions else ())
