"""
Turns image-caption pairs into training shards: resized, re-encoded, shuffled globally, split into
train and val, in webdataset layout (KEY.jpg + KEY.txt [+ KEY.json]) that any webdataset tool reads.

    python prep_dataset.py --source shapes --out_dir data/shapes                  # the built-in demo data
    python prep_dataset.py --out_dir data/text-to-image-2M                         # the full 2M (streamed)
    python prep_dataset.py --out_dir data/t2i-100k --limit 100000                  # a subset, from each tar file
    python prep_dataset.py --source folder --input ~/pics --out_dir data/pics      # x.jpg + x.txt pairs
    python prep_dataset.py --source webdataset --input 'shards/*.tar' --out_dir data/mine
    python prep_dataset.py --source webdataset --input 'pipe:aws s3 cp s3://bucket/{000..099}.tar -' --out_dir data/s3
    python prep_dataset.py --source table --input pairs.csv --out_dir data/mine    # csv/tsv/jsonl/json/parquet
    python prep_dataset.py --source table --input captions_train2017.json --image_root train2017 --out_dir data/coco
    python prep_dataset.py --source hub --input NAME --split train --out_dir data/x # any datasets image+text set
    python prep_dataset.py --source table --input cc3m.tsv --out_dir data/cc3m        # image URLs: downloaded
    python prep_dataset.py --source table --input 'laion/*.parquet' --out_dir data/laion   # a table in parts

It works in two passes, each resumable (rerun the same command after an interrupt):
  1. process: read the source in chunks (downloading images given as URLs), decode + resize + centre-crop +
     re-encode in parallel, and stage each finished chunk under OUT/.stage/ (written to a temporary name,
     then renamed); a rerun reuses the finished chunks, and a streamed source (text-to-image-2M, hub,
     webdataset) goes on where they end in the stream instead of downloading them again;
  2. shuffle: make the samples that show the same picture one sample with all their captions, draw one
     global permutation from the seed and write the final shards OUT/train/*.tar and OUT/val/*.tar by
     reading the staged samples in that order, then OUT/manifest.json.
Bad input (an undecodable, missing or undownloadable image, a missing/empty/non-UTF-8 caption) is skipped and
counted in the manifest.
"""
import argparse
import ast
import base64
import binascii
import csv
import errno
import glob
import hashlib
import html
import http.client
import io
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections import deque
from concurrent.futures import CancelledError, Future
from itertools import chain, islice
from multiprocessing import Pool

import numpy as np
from PIL import Image, ImageDraw, ImageOps
from tqdm import tqdm

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".avif", ".bmp", ".gif", ".tif", ".tiff"}
TABLE_EXTENSIONS = {".csv", ".tsv", ".jsonl", ".json", ".parquet"}
T2I_FILES = "hf://datasets/jackyhate/text-to-image-2M/data_512_2M/*.tar"

# -----------------------------------------------------------------------------
# the shapes set: synthetic, compositional, generated from a seed; the demo's and the tests' data

SHAPES = ["circle", "square", "triangle", "star", "cross"]
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 230),
          "yellow": (235, 215, 40), "purple": (150, 60, 200), "white": (240, 240, 240)}
SIZES = ["small", "large"]
POSITIONS = ["top left", "top right", "bottom left", "bottom right", "center"]


def shapes_sample(seed, index):
    """The index-th sample of the shapes set: (caption, labels). Deterministic in (seed, index).
    Colour and shape are always named; size and position each half of the time, as real captions
    mention some details and not others. This also speeds learning up a lot: a batch is full of pairs
    that differ in shape alone, so the contrastive loss cannot ignore shape for long."""
    rng = np.random.default_rng([seed, index])
    labels = {"shape": SHAPES[rng.integers(len(SHAPES))], "color": list(COLORS)[rng.integers(len(COLORS))],
              "size": SIZES[rng.integers(len(SIZES))], "position": POSITIONS[rng.integers(len(POSITIONS))]}
    with_size, with_position = rng.random(2) < 0.5
    size = f"{labels['size']} " if with_size else ""
    where = "" if not with_position else " in the center" if labels["position"] == "center" else f" in the {labels['position']}"
    return f"a {size}{labels['color']} {labels['shape']}{where}", labels


def shapes_tasks():
    """Zero-shot tasks on the shapes set: name the shape, name the colour. Each class's prompt is averaged
    over every caption that fixes the other attributes (the CLIP paper's prompt ensembling), so the
    classifier asks about one attribute and marginalises the rest."""
    sizes = [""] + [s + " " for s in SIZES]
    wheres = [""] + [" in the center" if p == "center" else f" in the {p}" for p in POSITIONS]
    return {"shape": {"label": "shape", "classes": SHAPES,
                      "templates": [f"a {s}{c} {{}}{w}" for s in sizes for c in COLORS for w in wheres]},
            "color": {"label": "color", "classes": list(COLORS),
                      "templates": [f"a {s}{{}} {sh}{w}" for s in sizes for sh in SHAPES for w in wheres]}}


def render_shape(seed, index, size):
    """Draws sample `index` at 4x and downsamples, for smooth edges. Colours, position and background
    are jittered so that a model has to read the shape, not memorise pixels."""
    _, labels = shapes_sample(seed, index)
    rng = np.random.default_rng([seed, index, 1])
    S = 4 * size
    background = tuple(int(v) for v in rng.integers(20, 90, 3))
    img = Image.new("RGB", (S, S), background)
    draw = ImageDraw.Draw(img)
    radius = S * (rng.uniform(0.12, 0.15) if labels["size"] == "small" else rng.uniform(0.21, 0.25))
    centers = {"top left": (0.25, 0.25), "top right": (0.75, 0.25), "bottom left": (0.25, 0.75),
               "bottom right": (0.75, 0.75), "center": (0.5, 0.5)}
    cx, cy = (S * (c + rng.uniform(-0.05, 0.05)) for c in centers[labels["position"]])
    color = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLORS[labels["color"]])
    r = radius
    if labels["shape"] == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif labels["shape"] == "square":
        r *= 0.85
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif labels["shape"] == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=color)
    elif labels["shape"] == "star":
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        draw.polygon([(cx + q * np.cos(a), cy - q * np.sin(a)) for q, a in zip(radii, angles)], fill=color)
    else:  # cross
        w = 0.35 * r
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=color)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=color)
    return img.resize((size, size), Image.BICUBIC)

# -----------------------------------------------------------------------------
# sources: each yields raw items (key, image, caption, labels), cheap to read; the decoding and
# resizing happen in the worker processes. image is bytes or a path; caption is bytes, str or None.


def source_shapes(args):
    for i in range(args.limit or 20_000):
        caption, labels = shapes_sample(args.seed, i)
        yield f"{i:09d}", ("shapes", args.seed, i), caption, labels


def streamed(ds, args):
    """A streaming `datasets` set's rows, from where an interrupted run's last finished chunk ended
    (args.resume_state); stage_chunks records that position with every chunk (args.stream_state), so a
    rerun goes on there instead of downloading again everything before it."""
    if args.resume_state is not None:
        ds.load_state_dict(args.resume_state)
    args.stream_state = ds.state_dict
    rows = iter(ds)
    try:
        first = next(rows)  # where datasets applies the saved position
    except StopIteration:
        return
    except (KeyError, IndexError, TypeError) as e:
        if args.resume_state is None:
            raise
        # a position saved by a run that read the source in another order
        sys.exit(f"the interrupted run's place in the stream ({type(e).__name__}: {e}) does not fit the way this run "
                 "reads the source (a run begun by an earlier version of prep_dataset.py, whose --limit read the first "
                 f"file first): delete {os.path.join(args.out_dir, '.stage')} and rerun, which starts the set over")
    yield first
    yield from rows


def source_text_to_image_2m(args):
    # the same `datasets` code path reads the hub and local copies (--input 'dir/*.tar', used by the tests);
    # streaming, so the ~420 GB of originals never sit on disk
    from datasets import Image as HFImage
    from datasets import interleave_datasets, load_dataset
    data_files = args.input or T2I_FILES
    if "://" not in data_files:  # local copies, named as for the webdataset source (glob, range, folder)
        # another source's input given without --source: say which one it needs
        if os.path.isfile(data_files) and data_files.lower().endswith(tuple(TABLE_EXTENSIONS)):
            sys.exit(f"--input {data_files} is a table, not text-to-image-2M's shards (the default --source): "
                     "add --source table")
        # `datasets` reads each name as a glob: a folder's [ ] ('set [1]') escaped, so that it is the name itself
        data_files = [glob.escape(p) for p in tar_paths(data_files, leave_out=args.out_dir)] or data_files
        if isinstance(data_files, str) and os.path.isdir(data_files):
            sys.exit(f"--input {data_files} holds no .tar shards of text-to-image-2M (the default --source): for a "
                     "folder of images and captions add --source folder, for a `datasets` folder --source hub")
    try:
        ds = load_dataset("webdataset", data_files={"train": data_files}, split="train", streaming=True)
    except Exception as e:  # no network, no such files: say what to check, not a stack trace
        sys.exit(f"could not open {data_files} ({type(e).__name__}: {str(e)[:300]}). Check the network "
                 "(the full set streams from the Hugging Face hub), or give local copies with --input 'dir/*.tar'.")
    if args.limit and ds.num_shards > 1:
        # a subset (--limit N) takes a sample of each tar file in turn, about N / files from each, rather than the
        # first N of the first file (the hub's files hold ~100k samples each, and need not each hold a mix of the
        # set's sources). Each file streams from its start and is left where its share ends
        ds = interleave_datasets([ds.shard(num_shards=ds.num_shards, index=i) for i in range(ds.num_shards)],
                                 stopping_strategy="all_exhausted_without_replacement")
    # the set holds KEY.jpg + KEY.json {"prompt": ...}; other image extensions and caption fields are read
    # too, so a copy in another webdataset layout works as well
    images = [name for name, f in (ds.features or {"jpg": HFImage()}).items() if isinstance(f, HFImage)]
    for name in images:
        ds = ds.cast_column(name, HFImage(decode=False))  # raw bytes: we decode in parallel, and survive bad ones
    first = True
    for ex in streamed(ds, args):
        image = next((ex[name]["bytes"] for name in images if ex.get(name)), None)
        if args.caption_column:
            caption = caption_field(ex, ex.get("json"), args.caption_column, ex["__key__"], first)
        else:
            caption = caption_text(ex.get("json"))  # the set's {"prompt": ...}
            if caption is None:  # a KEY.txt, whose lines are captions (row_caption)
                caption = row_caption(ex, ["txt"])
        first = False
        yield ex["__key__"], image, caption, None


def not_data(name):
    """Files and folders that hold no samples: hidden ones (.DS_Store, .cache, the ._x.jpg resource forks that
    macOS writes beside files on other disks) and the __MACOSX folder of a zip made on a Mac."""
    return name.startswith(".") or name == "__MACOSX"


def not_data_member(path):
    """A tar member that holds no sample: a hidden file (macOS's tar stores a ._x.jpg resource fork beside each
    x.jpg), or one in the __MACOSX folder of a zip made on a Mac."""
    folder, _, name = path.rpartition("/")
    return not_data(name) or "__MACOSX" in folder.split("/")


def source_folder(args):
    """Same-stem pairs under --input: x.jpg goes with the x.txt beside it (so class folders that each hold
    0001.jpg + 0001.txt pair up folder by folder), else with the one x.txt anywhere under --input
    (a/b/x.jpg with c/x.txt); an image whose stem has several such captions elsewhere is skipped. Where
    there is no x.txt, a record x.json beside x.jpg (the metadata scrapers write next to each image) gives
    its caption field."""
    if not args.input or not os.path.isdir(args.input):
        table = bool(args.input) and os.path.isfile(args.input) and \
            os.path.splitext(args.input)[1].lower() in TABLE_EXTENSIONS
        archive = bool(args.input) and os.path.isfile(args.input) and args.input.lower().endswith(
            (".zip", ".tar", ".tar.gz", ".tgz"))
        sys.exit(f"--source folder needs --input DIR, an existing folder (got {args.input!r})"
                 + (": a table of image paths and captions is read with --source table" if table else "")
                 + (": unpack the archive, then give its folder (tar shards in webdataset's layout, KEY.jpg + KEY.txt, "
                    "are read as they are with --source webdataset)" if archive else ""))
    images, captions, duplicates, tables = {}, {}, set(), []  # (folder, stem) -> path
    records = {}  # (folder, stem) -> x.json: the caption of an x.jpg beside it that has no caption file
    others = set()  # (folder, stem) of files of other types: a caption beside one (x.heic) names an image not read
    visited = set()  # linked folders are followed (data kept on another disk), each real folder once
    # --caption_column names the captions' extension, where a folder holds two kinds (x.txt tags, x.caption prose)
    caption_exts = ("." + args.caption_column.lstrip(".").lower(),) if args.caption_column else (".txt", ".caption")
    walk = os.walk(args.input, followlinks=True)
    for root, folders, files in tqdm(walk, desc="list files", unit=" folders", leave=False, dynamic_ncols=True):
        real = os.path.realpath(root)
        if real in visited:  # a link back up the tree, or a second link to one folder
            folders[:] = []
            continue
        visited.add(real)
        folders[:] = [d for d in folders if not not_data(d)]
        for name in sorted(f for f in files if not not_data(f)):
            stem, ext = os.path.splitext(name)
            ext = ext.lower()
            if ext in caption_exts:  # .caption: kohya-ss's name for captions; x.txt wins over x.caption
                if (root, stem) not in captions or ext == ".txt":
                    captions[(root, stem)] = os.path.join(root, name)
            elif ext in IMAGE_EXTENSIONS:
                if (root, stem) in images:  # x.jpg and x.png side by side: which one the caption means is unclear
                    duplicates.add((root, stem))
                images[(root, stem)] = os.path.join(root, name)
            elif ext in TABLE_EXTENSIONS:
                tables.append(os.path.join(root, name))
                if ext == ".json":
                    records[(root, stem)] = os.path.join(root, name)
            elif ext:
                others.add((root, stem))
    # x.jpg.txt and x.jpg.json, named after the image's whole file name (gallery-dl's metadata files), are x.jpg's
    whole_name = {(root, os.path.basename(path)): (root, stem) for (root, stem), path in images.items()}
    for found in (captions, records):
        for place in [p for p in found if p in whole_name and whole_name[p] not in found]:
            found[whole_name[place]] = found.pop(place)
    # x.json beside an x.jpg that has no caption file captions it; the others stay tables, for the error below
    captions.update({place: path for place, path in records.items() if place in images and place not in captions})
    if not images and tables:  # a `datasets` export, a LAION part: the images are in the table, or named by it
        sys.exit(f"{args.input} holds no images, but tables ({', '.join(tables[:3])}{', ...' if len(tables) > 3 else ''}"
                 f"): read them with --source table --input {args.input} (their images as bytes, paths or URLs)")
    if images and not captions and tables:  # an imagefolder with a metadata.jsonl, COCO's annotations/*.json
        sys.exit(f"{args.input} holds images but no .txt captions. If a table there lists them ({', '.join(tables[:3])}"
                 f"{', ...' if len(tables) > 3 else ''}), read it with --source table --input FILE (and --image_root "
                 "DIR when its paths start from another folder)"
                 + (f"; a `datasets` image folder (a metadata file beside its images) reads as it is, its splits "
                    f"too, with --source hub --input {args.input}"
                    if any(os.path.basename(t).startswith("metadata.") for t in tables) else ""))
    # what has no partner beside it pairs by stem across folders (images/ beside captions/), if unambiguous
    lone_captions, lone_images = {}, {}  # stem -> caption paths; stem -> how many images
    for (root, stem), path in captions.items():
        if (root, stem) not in images:
            lone_captions.setdefault(stem, []).append(path)
    for root, stem in images:
        if (root, stem) not in captions:
            lone_images[stem] = lone_images.get(stem, 0) + 1
    paired = set()
    for root, stem in sorted(images):
        key = os.path.relpath(os.path.join(root, stem), args.input)
        caption = captions.get((root, stem))
        found = lone_captions.get(stem, [])
        if caption is None and len(found) == 1 and lone_images[stem] == 1:
            caption = found[0]
        paired.add(caption)
        if (root, stem) in duplicates:
            yield key, None, None, {"skip": "duplicate_stem"}
        elif caption is None:  # none, or several it could be
            yield key, images[(root, stem)], None, {"skip": "ambiguous_caption"} if found else None
        elif caption.lower().endswith(".json"):
            yield key, images[(root, stem)], *caption_record(caption, args.caption_column)
        else:
            with open(caption, "rb") as f:
                yield key, images[(root, stem)], f.read(), None
    # a caption whose own file is of a type not read (a phone's x.heic beside x.txt): counted, not passed over
    for (root, stem), path in sorted(captions.items()):
        if path not in paired and (root, stem) in others:
            yield os.path.relpath(os.path.join(root, stem), args.input), None, None, {"skip": "unsupported_image_type"}


def caption_record(path, column):
    """x.json beside x.jpg -> (its caption: the field --caption_column names, else the first caption-like one;
    labels: a reason to skip where the file is not a JSON record)."""
    try:
        with open(path, "rb") as f:
            record = json.loads(f.read().decode("utf-8-sig"))
    except UnicodeDecodeError:
        return None, {"skip": "caption_not_utf8"}
    except ValueError:
        return None, {"skip": "bad_json"}
    if not isinstance(record, dict):
        return None, {"skip": "bad_json"}
    # --caption_column json: the .json files are the captions, so their caption-like field, as with no column
    return (record.get(column) if column and column.lstrip(".").lower() != "json" else record), None


def tar_paths(pattern, leave_out=None):
    """The tar files a webdataset --input names: a glob ('shards/*.tar'), webdataset's brace range
    ('shards/{00000..00099}.tar', the form its docs and img2dataset use), or a folder of them (.tar, or
    compressed: .tar.gz, .tgz) at any depth; or URLs, or webdataset's pipe:COMMAND, with or without a range.
    leave_out: a folder whose files are never input (the --out_dir, which may lie inside the input's folder)."""
    def ranges(p):  # {003..005} -> 003, 004, 005: the first range, then the rest of the pattern's
        m = re.search(r"\{(\d+)\.\.(\d+)\}", p)
        if m is None:
            return [p]
        numbers = (str(n).zfill(len(m[1])) for n in range(int(m[1]), int(m[2]) + 1))
        return [q for n in numbers for q in ranges(p[:m.start()] + n + p[m.end():])]
    if pattern.startswith(("http://", "https://", "pipe:")):  # shards elsewhere, read as they stream in
        return ranges(pattern)
    pattern = os.path.expanduser(pattern)
    if os.path.isdir(pattern):  # subfolders too: a hub download keeps its shards in data_512_2M/, an export in
        # buckets/*/ (hidden folders, such as a download's .cache, are passed over, as glob does)
        found = {p for e in ("*.tar", "*.tar.gz", "*.tgz")
                 for p in glob.glob(os.path.join(glob.escape(pattern), "**", e), recursive=True)}
    else:  # a file's own name is taken as it is, though it holds a glob's [ ] ('set [1].tar')
        found = {path for p in ranges(pattern) for path in ([p] if os.path.isfile(p) else glob.glob(p))
                 if os.path.isfile(path)}
    if leave_out:
        found = {p for p in found if not os.path.abspath(p).startswith(os.path.join(os.path.abspath(leave_out), ""))}
    return sorted(found)


def source_webdataset(args):
    """Existing webdataset / img2dataset shards: the image and the caption (.txt, or a caption-like field
    of .json) of each key. Streamed: a rerun after an interrupt starts at the shard and sample where the
    finished chunks end (args.resume_state), without reading again, or downloading, the shards before."""
    paths = tar_paths(args.input or "", leave_out=args.out_dir)
    if not paths:
        sys.exit(f"--source webdataset needs --input naming tar files: a glob, a {{000..099}} range, a folder, URLs "
                 f"or pipe:COMMAND (got {args.input!r})")
    start = args.resume_state or {"path": paths[0], "samples": 0}
    # the shard is found by its name: a glob may match more files now than when the run was interrupted
    if start["path"] not in paths:
        sys.exit(f"{start['path']}, where the interrupted run stopped, is no longer among the shards --input "
                 f"names: rerun with the same shards, or delete {args.out_dir} to start over")
    where = dict(start)  # past the sample handed out last
    args.stream_state = lambda: dict(where)
    first = True
    for path in paths[paths.index(start["path"]):]:
        where.update(path=path, samples=0)
        for n, (key, files) in enumerate(read_tar_samples(path)):
            if path == start["path"] and n < start["samples"]:
                continue  # held by the finished chunks
            where["samples"] = n + 1
            image = next((files[e] for e in files if "." + e in IMAGE_EXTENSIONS), None)
            record = None
            if "json" in files:
                try:
                    record = json.loads(files["json"])  # a record: process_sample reads its caption field
                except ValueError:
                    pass
            if args.caption_column:
                caption = caption_field(files, record, args.caption_column, key, first)
            else:  # KEY.txt, else a file of a caption-like extension (KEY.caption), else the .json record's field
                caption = files.get("txt") or next((files[c] for c in CAPTION_COLUMNS if c in files and c != "json"),
                                                   record)
            first = False
            yield key, image, caption, None


def caption_field(files, record, column, key, first):
    """--caption_column in a webdataset sample: its file of that extension (KEY.caption), else that field of its
    .json record (sets that keep a short and a long caption side by side). The first sample must have it: a
    name mistyped would otherwise skip every sample as uncaptioned."""
    if column in files:
        return files[column]
    if isinstance(record, dict) and column in record:
        return record[column]
    if first:
        sys.exit(f"--caption_column {column}: sample {key} has no file {key}.{column} and no field {column!r} in "
                 f"a .json record (its files: {', '.join(k for k in files if not k.startswith('__'))}"
                 + (f"; its .json's fields: {', '.join(record)}" if isinstance(record, dict) else "") + ")")
    return None


# column names that usually hold the caption, or the image, in tables and hub datasets
CAPTION_COLUMNS = ("caption", "captions", "text", "prompt", "title", "sentences", "description", "alt_text", "alt",
                   "comment", "txt", "json",  # these two: a webdataset turned into a table, a caption or a record
                   "conversations")  # a chat about the image, LLaVA's layout: its answers (caption_text)
IMAGE_COLUMNS = ("image", "img", "jpg", "png", "filepath", "file_name", "filename", "image_path", "image_name", "path",
                 "file", "image_url", "url", "image_base64", "base64", "image_id")  # an id, last: a file ID.jpg
# what a file named without its extension may end with, the commonest first
EXTENSIONS_TRIED = [e for ext in (".jpg", ".png", ".jpeg", *sorted(IMAGE_EXTENSIONS - {".jpg", ".png", ".jpeg"}))
                    for e in (ext, ext.upper())]
# an image written into a text cell as base64 (the TSVs of OFA and VLMEvalKit, a data: URI): it starts with a JPEG's,
# PNG's, GIF's or WebP's first bytes as base64 spells them
BASE64_IMAGE = re.compile(r"(data:image/[\w.+-]+;base64,)?(/9j/|iVBORw0KGgo|R0lGOD|UklGR)")
NOT_CAPTIONS = ("_id", "_ids", "_sentid", "_len", "_length", "_count", "_tokens", "_lang", "_language", "_score", "_url")
# images given as URLs (Conceptual Captions, LAION, COYO list only those) are downloaded as each chunk is staged
DOWNLOAD_THREADS, DOWNLOAD_TIMEOUT, DOWNLOAD_MAX_BYTES = 64, 10, 64 << 20
USER_AGENT = "clip-from-scratch/prep_dataset.py (python-urllib)"
DOWNLOAD_HINT = ("for millions of URLs, img2dataset downloads faster (many machines, retries, rate limits): its "
                 "shards then read with --source webdataset")
is_url = lambda image: isinstance(image, str) and image.startswith(("http://", "https://"))


def caption_text(value):
    """A caption as a source holds it -> text, or None when there is none. Several captions of one image are its
    lines (as the shards keep them): a caption file's bytes, whose lines are its captions (x.txt, KEY.txt), or a
    list. Text held in a field (a table's cell, a record's string, a `datasets` column, a prompt) is one caption:
    its line breaks are spaces (a web alt text's lines, an LLM's prompt in paragraphs), unless it is a
    list written out as text ("['a dog', 'a brown dog']", as pandas writes a list into a CSV). A record (a
    webdataset .json, COCO's {"raw": ..., "tokens": [...]}) holds its caption in its first field of a
    caption-like name that holds text, or a list of captions."""
    if isinstance(value, dict):
        return next((caption_text(value[k]) for k in ("raw", *CAPTION_COLUMNS)
                     if isinstance(value.get(k), (str, list, tuple))), None)
    if isinstance(value, (list, tuple)) and value and all(isinstance(t, dict) and ("from" in t or "role" in t)
                                                          for t in value):
        # a chat about the image (LLaVA-Pretrain's and ShareGPT4V's "conversations"): the model's answers are its
        # captions, each on one line (their paragraphs joined); the questions ("Describe the image. <image>") are not
        answers = [t.get("value", t.get("content")) for t in value if str(t.get("from", t.get("role"))).lower()
                   in ("gpt", "assistant")]
        return "\n".join(" ".join(str(a).replace("<image>", " ").split()) for a in answers if a) or None
    if isinstance(value, (list, tuple)):
        return "\n".join(filter(None, map(caption_text, value)))
    if isinstance(value, bytes):  # a caption file's bytes: UTF-8 (-sig: without the byte-order mark some editors
        # start files with), or UTF-16 where its byte-order mark says so (Windows Notepad's "Unicode")
        return value.decode("utf-16" if value[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig")
    if value is None:
        return None
    text = str(value).strip()
    if text.startswith("[") and text.endswith("]"):
        # a list of captions written out as text: pandas' to_csv of a list column (Python's repr), or JSON
        try:
            listed = ast.literal_eval(text)
        except Exception:  # a caption in brackets ("[HD] a red car"), or one too deeply nested to read
            listed = None
        if isinstance(listed, list) and all(isinstance(t, str) for t in listed):
            return caption_text(listed)
    return " ".join(text.split())


def image_cell(value):
    """An image as a table or a `datasets` set holds it: bytes, a path or a URL, the hub's {"bytes", "path"}
    record of either, or the image's bytes in base64 (-> the bytes)."""
    value = value.get("bytes") or value.get("path") if isinstance(value, dict) else value
    start = BASE64_IMAGE.match(value) if isinstance(value, str) and len(value) > 64 else None
    if start:
        try:
            return base64.b64decode(value[start.end(1) if start.group(1) else 0:])
        except binascii.Error:  # cut short: bytes that then do not decode as an image, and are counted so
            return value.encode()
    return value


def plain_name(name):
    """A column's name in lower case with underscores: LAION's parquet files say URL and TEXT, a spreadsheet "Image Path"."""
    return str(name).strip().lower().replace(" ", "_").replace("-", "_")


def pick_column(names, wanted, given, what):
    """The column to read: --{what}_column if given, else the first of `wanted` present (see plain_name)."""
    if given is not None and given not in names:
        sys.exit(f"--{what}_column {given!r} is not among the columns {list(names)}")
    found = given or next((n for w in wanted for n in names if plain_name(n) == w), None)
    if found is None:
        sys.exit(f"no {what} column among {list(names)}: name it with --{what}_column")
    return found


def caption_columns(names, given):
    """The caption columns to read, each a caption of the row's image: --caption_column's (several: comma-separated),
    else the first caption-like one, else the numbered columns of one caption-like name (Flickr8k's caption_0 to
    caption_4 on the hub), in their numbers' order, else the one column whose name joins a caption-like word to
    another (caption_en)."""
    if given is not None and given not in names and "," in given:
        return [pick_column(names, (), column, "caption") for column in split_list(given)]
    if given is None and not any(plain_name(n) in CAPTION_COLUMNS for n in names):
        bases = (*CAPTION_COLUMNS, "sentence")
        for base in bases:
            numbered = {n: re.fullmatch(rf"{base}_?(\d+)", plain_name(n)) for n in names}
            numbered = sorted((int(m.group(1)), n) for n, m in numbered.items() if m)
            if numbered:
                return [n for _, n in numbered]
        # a caption-like word with another before or after it (caption_en, sentences_raw, original_caption): taken
        # where it is the only such column, and not an id, a length or tokens; several are for the user to choose
        words = {n: plain_name(n).split("_") for n in names}
        near = [n for n, w in words.items() if len(w) > 1 and {w[0], w[-1]} & set(bases)
                and not plain_name(n).endswith(NOT_CAPTIONS)]
        if len(near) == 1:
            return near
        if near:
            sys.exit(f"no caption column among {list(names)}, but several that may be ({', '.join(map(str, near))}): "
                     "name one with --caption_column, or several, comma-separated, each a caption of the image")
    return [pick_column(names, CAPTION_COLUMNS, given, "caption")]


def holds_image(value):
    """Whether a table's cell holds an image itself: a JPEG's, PNG's, GIF's or WebP's bytes (plain, or in the hub's
    {"bytes": ...} record), or base64 text of one."""
    value = value.get("bytes") if isinstance(value, dict) else value
    if isinstance(value, (bytes, bytearray)):
        return value.startswith((b"\xff\xd8\xff", b"\x89PNG", b"GIF8")) or value[:4] == b"RIFF" and value[8:12] == b"WEBP"
    return isinstance(value, str) and BASE64_IMAGE.match(value) is not None


def image_column(row, given):
    """A table's image column, from its first row: --image_column if given; else one whose cell holds an image
    itself, whatever its name (image_bytes, img_data, jpeg); else the first of IMAGE_COLUMNS; else the one column
    with an image word in its name (image_file_path, photo_name)."""
    if given is None:
        held = [n for n, value in row.items() if holds_image(value)]
        if held:
            return held[0]
        words = {"image", "img", "photo", "picture", "jpg", "jpeg", "png"}
        worded = [n for n in row if words & set(plain_name(n).split("_"))]
        if not any(plain_name(n) in IMAGE_COLUMNS for n in row) and len(worded) == 1:
            return worded[0]
    return pick_column(row, IMAGE_COLUMNS, given, "image")


def say_columns(names, image_col, caption_cols):
    """Which columns are read, said once as reading starts: a guess that took the wrong one shows at once."""
    others = [str(n) for n in names if n not in (image_col, *caption_cols)]
    tqdm.write(f"images from column {image_col!r}, captions from {', '.join(map(repr, caption_cols))}"
               + (f"; not read: {', '.join(others[:10])}{', ...' if len(others) > 10 else ''}" if others else "")
               + " (others with --image_column, --caption_column)")


def row_caption(row, columns):
    """A row's caption cell, or the list of its cells when its captions sit in several columns (see caption_text).
    A txt column holds a webdataset's KEY.txt files, which `datasets` hands over as text: a caption file's lines are
    its captions (clip_benchmark's wds_flickr30k: five)."""
    cell = lambda c: row[c].encode() if plain_name(c) == "txt" and isinstance(row.get(c), str) else row.get(c)
    return cell(columns[0]) if len(columns) == 1 else [cell(c) for c in columns]


def table_rows(path):
    """The rows of a table file as dicts (None for a line that does not parse): CSV or TSV (comma, semicolon,
    tab or bar, as its header line shows), JSON lines, a JSON list of records, or Parquet."""
    if path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq  # installed with datasets
        try:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
                yield from batch.to_pylist()
        except pa.ArrowException as e:
            sys.exit(f"{path} cannot be read as Parquet ({e}): is the file whole? Download or export it again")
        return
    with open(path, "rb") as f:
        utf16 = f.read(2) in (b"\xff\xfe", b"\xfe\xff")  # Excel's "Unicode text" export
    # utf-8-sig: a spreadsheet's CSV may start with a byte-order mark
    with open(path, newline="", encoding="utf-16" if utf16 else "utf-8-sig") as f:
        try:
            yield from text_rows(f, path)
        except UnicodeDecodeError as e:
            sys.exit(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): save it as UTF-8 (Excel: "
                     "\"CSV UTF-8\"), then rerun the same command")


def text_rows(f, path):
    """table_rows of an open text file."""
    if path.endswith((".jsonl", ".json")):
        first = f.readline()
        f.seek(0)
        a_list = first.lstrip().startswith("[")
        alone = True  # a first line that parses alone: JSON lines (COCO's annotation file is one line too)
        try:
            json.loads(first)
        except ValueError:  # else one document over several lines, or JSON lines with a broken first line
            alone = False
        if a_list or not alone:
            try:
                doc = json.load(f)
            except ValueError as e:
                if a_list and not alone:
                    sys.exit(f"{path} is not valid JSON ({e}): fix it, or write one record per line (.jsonl)")
                f.seek(0)  # JSON lines, each line a record, or a row as an array: ["x.jpg", "a dog"]
            else:
                yield from json_records(doc)
                return
        names = None  # of rows written as arrays, where a first one names the columns
        for n, line in enumerate(f):
            if line.strip():
                try:
                    value = json.loads(line)
                except ValueError:
                    yield None
                    continue
                if isinstance(value, list) and not all(isinstance(r, dict) for r in value):  # a row as an array
                    if n == 0 and column_names(value):
                        names = value
                    else:
                        yield dict(zip(names or headerless_names(value), value))
                else:
                    yield from json_records(value)
        return
    # a .tsv is tab-separated; otherwise the delimiter is the one the header line uses most (Excel writes
    # semicolons where the decimal mark is a comma): the captions may hold any of them, column names rarely do.
    # A first line of data (no header) instead shows its delimiter by the one that cuts an image path out whole
    # (Flickr8k's "x.jpg#0<tab>A man, in red, ...": more commas than tabs)
    header = f.readline()
    f.seek(0)
    csv.field_size_limit(2 ** 31 - 1)  # a long caption is kept (the tokenizer truncates it), not an error
    cells = lambda d: next(csv_rows(iter([header]), d), [])
    whole_path = lambda cell: re.fullmatch(r"\S+(" + "|".join(map(re.escape, IMAGE_EXTENSIONS)) + r")(#\d+)?"
                                           r"|https?://\S+", cell.strip(), re.IGNORECASE)
    by_count = sorted(",;\t|", key=header.count, reverse=True)
    delimiter = "\t" if path.endswith(".tsv") else next(
        (d for d in by_count if header.count(d) and any(map(whole_path, cells(d)))), by_count[0])
    first = cells(delimiter)
    # no header line (Conceptual Captions' TSV, a quick list) where a cell of the first row names an image: it is data
    names = headerless_names(first) if any(map(names_an_image, first)) else None
    rows = (row for row in csv_rows(f, delimiter) if row)
    names = names or next(rows, [])
    text = [i for i, name in enumerate(names) if plain_name(name) in CAPTION_COLUMNS]
    for row in rows:  # as csv.DictReader makes them: missing cells None, extra ones in a list under None
        while len(row) > len(names) and not row[-1].strip():  # a line that ends in a delimiter
            row = row[:-1]
        if len(row) > len(names) and len(text) == 1:
            # a caption with the delimiter in it, unquoted (a hand-made CSV's "a dog, running"): one cell again
            i, k = text[0], len(row) - len(names)
            row = [*row[:i], delimiter.join(row[i:i + k + 1]), *row[i + k + 1:]]
        extra = {None: row[len(names):]} if len(row) > len(names) else {}
        yield {**dict.fromkeys(names), **dict(zip(names, row)), **extra}


def names_an_image(cell):
    """A table's cell that names an image: a file of an image type (Flickr's x.jpg#2 too), or a URL."""
    return isinstance(cell, str) and (image_path(cell).lower().endswith(tuple(IMAGE_EXTENSIONS)) or "://" in cell)


def column_names(cells):
    """Whether a row of a table written as JSON arrays names the columns: ["image", "caption"]."""
    return all(isinstance(c, str) for c in cells) and any(plain_name(c) in (*IMAGE_COLUMNS, *CAPTION_COLUMNS)
                                                          for c in cells)


def headerless_names(first):
    """The column names of a table whose rows have none (no header line, or rows written as JSON arrays), from its
    first row: the cell that names an image is the image, and the cells beside it its caption, which may hold the
    delimiter unquoted (x.jpg,a dog, running); not where other cells are numbers (a score, a size): those are
    columns of their own."""
    names = ["image" if names_an_image(cell) else f"column{i}" for i, cell in enumerate(first)]
    number = lambda cell: not isinstance(cell, str) or re.fullmatch(r"\s*[-+]?[\d.]+(e[-+]?\d+)?\s*", cell, re.I)
    if names.count("image") == 1 and "image" in (names[0], names[-1]) and not any(map(number, first)):
        return ["image", "caption"] if names[0] == "image" else ["caption", "image"]
    return names


def csv_rows(f, delimiter, max_lines=100):
    """The rows of a CSV or TSV file as lists of cells. A quoted cell may hold line breaks, as spreadsheets write a
    caption of several lines. But a quote that opens a cell and never closes it (a scraped caption that starts
    with one: Conceptual Captions' TSVs quote nothing) would make the rows up to the next quote one cell, silently
    losing them: a line whose quoted cell does not end in a row of the file's width is read as it is, its quotes
    kept as text, as is a cell that merely starts with a quoted word ('"the house" at night')."""
    ahead, width = deque(), None  # lines read ahead for a quoted cell that turned out not to be one
    while True:
        line = ahead.popleft() if ahead else next(f, None)
        if line is None:
            return
        text, taken, row = line, [], None
        while len(taken) < max_lines:
            try:
                row = next(csv.reader([text], delimiter=delimiter, strict=True), [])
                break
            except csv.Error as e:
                more = (ahead.popleft() if ahead else next(f, None)) if "unexpected end of data" in str(e) else None
                if more is None:  # a quote inside a cell, or an open one at the end of the file
                    break
                taken.append(more)
                text += more
        if row is None or taken and len(row) != width:
            ahead.extendleft(reversed(taken))
            row = next(csv.reader([line], delimiter=delimiter, quoting=csv.QUOTE_NONE), [])
        width = width or len(row) or None
        yield row


def image_path(cell):
    """A table's image cell, less spaces around it, a file:// URL's scheme (a path, written as a browser or
    pathlib's as_uri() writes it) and the caption number that Flickr8k's and Flickr30k's token files append to it
    (1000268201_693b08cb0e.jpg#2: the image's third caption)."""
    cell = cell.strip()
    if cell.lower().startswith("file://"):
        cell = urllib.parse.unquote(urllib.parse.urlparse(cell).path)
    numbered = re.fullmatch(r"(.+)#\d+", cell)
    return numbered[1] if numbered and numbered[1].lower().endswith(tuple(IMAGE_EXTENSIONS)) else cell


def json_records(doc):
    """The records a JSON document holds: a list of them (or of rows written as arrays), one record, a list of them
    under one key of a document that holds no image itself, a map of image files to their captions or records, or a
    caption set's annotation file, one record per image: COCO's {"images": [{"id", "file_name"}], "annotations":
    [{"image_id", "caption"}]} (its captions gathered into a list) or Karpathy's splits {"images": [{"filepath",
    "filename", "sentences", "split"}]} (COCO, Flickr30k)."""
    if isinstance(doc, list) and doc and isinstance(doc[0], list):
        # rows written as JSON arrays: [["x.jpg", "a dog"], ...], named as a table's without a header line, or
        # after a first row of column names, as a CSV turned into JSON holds them
        header = column_names(doc[0])
        names = doc[0] if header else headerless_names(doc[0])
        return [dict(zip(names, r)) if isinstance(r, list) else r for r in doc[header:]]
    if isinstance(doc, list):
        return doc
    if not isinstance(doc, dict):
        return [doc]
    files = all(str(k).lower().endswith(tuple(IMAGE_EXTENSIONS)) for k in doc)
    named = not any(plain_name(k) in (*IMAGE_COLUMNS, *CAPTION_COLUMNS, "images") for k in doc)
    if doc and (files or named and all(isinstance(v, dict) for v in doc.values())):
        # {image: its caption(s)} as captioning scripts save them, or {image: its record} (kohya-ss's meta_cap.json,
        # whose images are named without their extension): a record per image
        return [{**v, "image": k} if isinstance(v, dict) else {"image": k, "caption": v} for k, v in doc.items()]
    if not isinstance(doc.get("images"), list):  # one record, or the records under one key beside the file's notes
        lists = [v for v in doc.values() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v[:100])]
        records = len(lists) == 1 and not any(k in IMAGE_COLUMNS for k in doc)  # TextCaps' {"dataset_type", "data"}
        return lists[0] if records else [doc]
    if isinstance(doc.get("annotations"), list):
        captions = {}
        for a in doc["annotations"]:
            if isinstance(a, dict):
                captions.setdefault(a.get("image_id"), []).append(a.get("caption"))
        return [{**im, "captions": captions.get(im.get("id"), [])} if isinstance(im, dict) else im
                for im in doc["images"]]
    return [folder_and_file(im) if isinstance(im, dict) else im for im in doc["images"]]


def folder_and_file(row):
    """Karpathy's split rows name an image by its folder and file apart ({"filepath": "val2014", "filename":
    "COCO_val2014_000000391895.jpg"}; Flickr30k's, the file alone): the path, as one "filepath"."""
    if "filename" not in row:
        return row
    return {**row, "filepath": os.path.join(str(row.get("filepath") or ""), str(row["filename"]))}


def table_image(image, roots, image_root):
    """A table's image path -> the file it names here, or None. A path written on another machine (absolute,
    or Windows' C:\\data\\coco\\x.jpg) is looked for under --image_root by its trailing parts, the longest
    first: data/coco/x.jpg, then coco/x.jpg, then x.jpg. A name without an image extension (the image ids of Open
    Images and Localized Narratives, whose files are ID.jpg) is looked for with each one."""
    def file(path):
        if os.path.isfile(path):
            return path
        if os.path.splitext(path)[1].lower() not in IMAGE_EXTENSIONS:
            return next((path + e for e in EXTENSIONS_TRIED if os.path.isfile(path + e)), None)
    found = next(filter(None, (file(os.path.join(r, image)) for r in roots)), None)
    if found is None and "\\" in image and os.sep == "/":  # a relative path written on Windows: imgs\x.jpg
        found = next(filter(None, (file(os.path.join(r, *image.split("\\"))) for r in roots)), None)
    if found is None and image_root:
        parts = [part for part in re.split(r"[\\/]", image) if part]
        found = next(filter(None, (file(os.path.join(image_root, *parts[k:])) for k in range(len(parts)))), None)
    return found


def table_files(pattern):
    """The table files --input names, in order: a file, a glob ('laion/part-*.parquet'), or a folder of them, as
    LAION's, DataComp's and the hub's Parquet parts come (a folder's .parquet files, else its .csv, .tsv and .jsonl
    ones: a .json beside them is more often a record of stats than a table)."""
    pattern = os.path.expanduser(pattern)
    if os.path.isfile(pattern):
        return [pattern]
    is_table = lambda p: os.path.isfile(p) and os.path.splitext(p)[1].lower() in TABLE_EXTENSIONS
    if os.path.isdir(pattern):
        files = [e.path for e in os.scandir(pattern) if is_table(e.path)]
        parquet = [p for p in files if p.lower().endswith(".parquet")]
        return sorted(parquet or [p for p in files if not p.lower().endswith(".json")])
    return sorted(p for p in glob.glob(pattern) if is_table(p))


def source_table(args):
    """A table file with an image and a caption per row (see table_rows): the image as a path (a relative
    one from --image_root, else from the file's folder, else from the working directory) or as bytes (a
    Parquet file from the hub). A caption cell holds one caption, or a list of them (caption_text), and rows that name
    the same image file are one sample with each row's captions (Flickr8k's captions.txt gives each of an
    image's five captions a row of its own): as five samples, an image would sit in train and val at once,
    and be its own negative in a batch. A table with a split column gives the rows of --split."""
    path = args.input or ""
    paths = table_files(path)
    if not paths:
        sys.exit(f"--source table needs --input naming a .csv, .tsv, .jsonl, .json or .parquet file, or several: a "
                 f"glob ('parts/*.parquet') or a folder of them (got {path!r})")
    sheets = [p for p in paths if p.lower().endswith((".xlsx", ".xls", ".ods", ".numbers"))]
    if sheets:  # a spreadsheet program's own file: its cells are not text that can be read without it
        sys.exit(f"{sheets[0]} is a spreadsheet file: save it from the spreadsheet program as a CSV (Excel: \"CSV "
                 "UTF-8\"), then give that file with --input")
    if len(paths) > 1:
        print(f"reading {len(paths)} table files as one: {os.path.basename(paths[0])} to {os.path.basename(paths[-1])}")
    # a relative path from --image_root, else from the table's folder, else from where the command runs
    roots = [args.image_root] if args.image_root else [os.path.dirname(os.path.abspath(paths[0])), ""]
    image_col = caption_cols = None
    # the samples of image files go out once the whole table is read, each file once with the captions of every
    # row naming it, in the order of their first rows, passed-over rows in their places (--limit counts both);
    # the rows of a Parquet file of image bytes go out as they are read (an image's rows together are one sample:
    # one_sample_per_image)
    by_file, in_order = {}, []  # image file -> its captions, the list its item in in_order holds
    every_row = (row for p in paths for row in table_rows(p))
    rows_read = tqdm(split_rows(every_row, args.split, "table"), desc="read table", unit=" rows", leave=False,
                     dynamic_ncols=True)
    for i, row, in_split in rows_read:
        key = f"{i:09d}"
        if not isinstance(row, dict):
            in_order.append((key, None, None, {"skip": "bad_row"}))
            continue
        if image_col is None:  # the first row names the columns
            image_col = image_column(row, args.image_column)
            caption_cols = caption_columns(row, args.caption_column)
            say_columns(row, image_col, caption_cols)
        if not in_split:
            in_order.append((key, None, None, {"skip": "other_split"}))
            continue
        image = image_cell(row.get(image_col))
        if isinstance(image, (bytes, bytearray)):  # a Parquet file of images: streamed
            yield key, bytes(image), row_caption(row, caption_cols), None
            continue
        image = image_path(str(image or ""))  # spreadsheets keep stray spaces around a cell
        if is_url(image):  # downloaded as its chunk is staged (stage_chunks)
            if not by_file:
                tqdm.write(f"the {image_col!r} column of {path} holds URLs ({image[:80]}): the images are downloaded "
                           f"as they are prepared ({DOWNLOAD_HINT})")
        else:
            image = table_image(os.path.expanduser(image), roots, args.image_root)
            if image is None:
                in_order.append((key, None, None, {"skip": "missing_image"}))
                continue
            image = os.path.abspath(image)
        if image not in by_file:  # the sample keeps its first row's key
            by_file[image] = []
            in_order.append((key, image, by_file[image], None))
        by_file[image].append(row_caption(row, caption_cols))
    rows = sum(map(len, by_file.values()))
    if rows > len(by_file):
        print(f"{path}: {rows} rows name {len(by_file)} image files; each file is one sample with its rows' captions")
    for key, image, captions, labels in in_order:
        yield key, image, captions[0] if image and len(captions) == 1 else captions, labels


def split_list(text):
    """--split's comma list: train,restval or train, restval -> [train, restval]."""
    return [s.strip() for s in text.split(",")]


def split_column(names):
    """The column that names each row's split (Karpathy's split files; Flickr30k on the hub), or None."""
    return next((n for n in names if str(n).strip().lower() == "split"), None)


def split_rows(rows, split, what):
    """(i, row, in_split) for the rows of a table or a `datasets` set. Where the rows name their split in a
    split column, only those of --split (a comma list) are in: Karpathy's test images stay out of a training
    set. Anything that is not a record (a line that does not parse) passes as it is."""
    splits = split_list(split)
    column, looked, others, kept = None, False, set(), 0
    for i, row in enumerate(rows):
        if isinstance(row, dict) and not looked:  # the first record names the columns
            looked, column = True, split_column(row)
            if column is not None:
                print(f"the {what}'s rows name their split: keeping those of --split {split}")
        value = str(row.get(column)).strip() if column is not None and isinstance(row, dict) else None
        if value is None or value in splits:
            kept += value is not None
            yield i, row, True
        else:
            if len(others) < 20:
                others.add(value)
            yield i, row, False
    if others and not kept:
        tqdm.write(f"the {what}'s split column holds {sorted(others)}, none of --split {split}", file=sys.stderr)


def saved_to_disk(name_or_dir):
    """What save_to_disk left in a folder: "splits" (a DatasetDict's dataset_dict.json), "one" (a lone Dataset's
    state.json, no splits to choose from), or None (a hub name, or a local copy that load_dataset reads)."""
    if os.path.isfile(os.path.join(name_or_dir, "dataset_dict.json")):
        return "splits"
    return "one" if os.path.isfile(os.path.join(name_or_dir, "state.json")) else None


def not_a_missing_folder(name_or_dir):
    """Raises FileNotFoundError for a path typed for a local folder that is not there (data/imagenet/vall, in a
    data/imagenet that is): `datasets` would look it up on the hub, and without a network give up after half
    a minute of retries, blaming the network."""
    import difflib
    path = os.path.normpath(os.path.expanduser(name_or_dir))
    parent = os.path.dirname(path)
    if os.path.exists(path) or not (os.path.isabs(path) or name_or_dir.startswith((".", "~")) or os.path.isdir(parent)):
        return
    near = difflib.get_close_matches(os.path.basename(path), os.listdir(parent), n=1) if os.path.isdir(parent) else []
    raise FileNotFoundError("no such folder" + (f"; did you mean {os.path.join(parent, near[0])}?" if near else ""))


def readable_by_datasets(folder):
    """`datasets` finds a local set's files by globs under its folder's path, which a glob's [ ] * ? in that path
    break ('set [1]': "doesn't contain any data files"): said as such, with what to do."""
    if os.path.isdir(folder) and re.search(r"[][*?]", os.path.abspath(folder)):
        raise ValueError("its path holds one of [ ] * ?, which `datasets` reads as a pattern: move or rename it to "
                         "a path without them")


def load_hub_set(name_or_dir, split, streaming=False):
    """A `datasets` split: from the hub or a local copy of a hub set (load_dataset), or from a folder that
    save_to_disk wrote (load_from_disk)."""
    import datasets
    not_a_missing_folder(name_or_dir)
    if saved_to_disk(name_or_dir) is None:
        readable_by_datasets(name_or_dir)
        return datasets.load_dataset(name_or_dir, split=split, streaming=streaming)
    ds = datasets.load_from_disk(name_or_dir)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"it has no split {split!r}, only {list(ds)}")
        ds = ds[split]
    return ds.to_iterable_dataset() if streaming else ds


def hub_split_names(name_or_dir):
    """The splits a `datasets` set has (a lone Dataset that save_to_disk wrote: none)."""
    import datasets
    not_a_missing_folder(name_or_dir)
    saved = saved_to_disk(name_or_dir)
    if saved == "splits":
        with open(os.path.join(name_or_dir, "dataset_dict.json")) as f:
            return json.load(f)["splits"]
    if saved == "one":
        return []
    readable_by_datasets(name_or_dir)
    return datasets.get_dataset_split_names(name_or_dir)


def source_hub(args):
    """Any `datasets` dataset with an image column and a caption column: a hub name (streamed) or a local
    dataset folder, e.g. an imagefolder with a metadata.jsonl of captions, or what save_to_disk wrote.
    The split read is the first of --split that the set has. A set whose rows name their split in a
    "split" column gives the rows of --split, read from its only split if it has none of them: Flickr30k
    on the hub is one "test" split whose split column holds Karpathy's train, val and test."""
    from datasets import Image as HFImage
    if not args.input:
        sys.exit("--source hub needs --input NAME: a set on the Hugging Face hub (e.g. nlphuji/flickr30k), a local copy "
                 "of one, or a folder that save_to_disk wrote")
    if os.path.isfile(args.input):
        sys.exit(f"{args.input} is a file: read a .csv, .tsv, .jsonl, .json or .parquet table with --source table")
    splits = split_list(args.split)
    try:
        names = hub_split_names(args.input)
    except Exception:  # splits that cannot be listed: load_dataset below says what is wrong, if anything
        names = []
    split = next((s for s in splits if s in names), names[0] if len(names) == 1 else splits[0])
    try:
        ds = load_hub_set(args.input, split, streaming=True)
    except Exception as e:
        sys.exit(f"could not load {args.input!r} with datasets ({type(e).__name__}: {e}). Give a hub name "
                 "(with a network) or a local dataset folder, and --split")
    first = None if ds.features else dict(next(iter(ds)))  # some streamed sets only show their columns in a row
    features = ds.features or first
    typed = next((n for n, f in features.items() if isinstance(f, HFImage)), None)
    # an Image feature names the column; else it is found in the first row as a table's is (bytes under any name)
    image_col = args.image_column or typed or image_column(first or dict(next(iter(ds))), None)
    image_col = pick_column(features, IMAGE_COLUMNS, image_col, "image")
    caption_cols = caption_columns(features, args.caption_column)
    say_columns(features, image_col, caption_cols)
    if split_column(features) is None and split not in splits:
        sys.exit(f"{args.input} has no split {args.split!r}, only {names}: choose one with --split")
    if split not in splits:
        print(f"{args.input} has no split {args.split!r}: reading its only one, {split!r}, by its split column")
    if isinstance(features[image_col], HFImage):
        ds = ds.cast_column(image_col, HFImage(decode=False))  # raw bytes (or a path): decoded in the workers
    # the Karpathy split on the hub (yerevann/coco-karpathy) names each image by folder and file apart, and lists
    # URLs: with the images on disk, --image_root names the folder its paths start from
    karpathy = image_col == "filepath" and "filename" in features and not args.image_column
    roots = [args.image_root] if args.image_root else [args.input if os.path.isdir(args.input) else "", ""]
    first = True
    for i, ex, in_split in split_rows(streamed(ds, args), args.split, "set"):
        if not in_split:
            yield f"{i:09d}", None, None, {"skip": "other_split"}
            continue
        image = image_cell((folder_and_file(ex) if karpathy else ex).get(image_col))
        if first and is_url(image):  # sets like Conceptual Captions list URLs only
            tqdm.write(f"the {image_col!r} column of {args.input} holds URLs ({image[:80]}): the images are "
                       f"downloaded as they are prepared ({DOWNLOAD_HINT})")
        first = False
        if isinstance(image, str) and "://" not in image:  # a path: from --image_root, else from a local set's folder
            found = table_image(os.path.expanduser(image), roots, args.image_root) if image else None
            yield f"{i:09d}", found, row_caption(ex, caption_cols), None if found else {"skip": "missing_image"}
            continue
        yield f"{i:09d}", image, row_caption(ex, caption_cols), None


def read_tar_samples(path):
    """(key, {extension: bytes}) for each sample of a tar: a file, a URL, or webdataset's pipe:COMMAND (the tar
    the command writes out: pipe:aws s3 cp s3://bucket/shard.tar -). A key's files usually sit together
    (webdataset's layout): a sample goes out when the next key starts. One still missing its image or caption
    waits for them further on (a tar made with plain `tar` follows the directory's order, .jpg and .txt apart)
    and goes out at the end as it is. A truncated tar ends early, without the sample it was reading."""
    pending, key, command = {}, None, None
    complete = lambda files: any("." + e in IMAGE_EXTENSIONS for e in files) and any(c in files for c in CAPTION_COLUMNS)
    try:
        if path.startswith("pipe:"):
            # its own process group: stopping it stops what the shell started too (aws, curl)
            command = subprocess.Popen(path[5:], shell=True, stdout=subprocess.PIPE, start_new_session=True)
            stream = command.stdout
        elif is_url(path):
            stream = urllib.request.urlopen(urllib.request.Request(path, headers={"User-Agent": USER_AGENT}),
                                            timeout=60)
        else:
            stream = open(path, "rb")
        # streaming mode: one pass, no seeks; gzip and others undone
        with stream, tarfile.open(fileobj=stream, mode="r|*") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                # webdataset's convention: the key is the path up to the first dot of the file name
                if not_data_member(member.name):
                    continue
                folder, _, name = member.name.rpartition("/")
                stem, _, ext = name.partition(".")
                k = f"{folder}/{stem}" if folder else stem
                if k != key and key in pending and complete(pending[key]):
                    yield key, pending.pop(key)
                key = k
                pending.setdefault(k, {})[ext.lower()] = tf.extractfile(member).read()
            while command is not None and stream.read(1 << 16):  # the padding after the archive's end, so
                pass  # that the command is not cut off writing it (curl would then exit with a write error)
        if command is not None and command.wait():
            raise OSError(f"the command exited with status {command.returncode}")
    except (tarfile.TarError, EOFError, OSError, http.client.HTTPException) as e:
        try:  # where the command failed (not found, access refused), that is what went wrong, not the tar
            if command is not None and command.wait(timeout=1):
                e = f"the command exited with status {command.returncode}"
        except subprocess.TimeoutExpired:  # still running: stopped below
            pass
        print(f"warning: {path} could not be read to its end ({e}); reading stopped there", file=sys.stderr)
        pending.pop(key, None)  # the sample being read may be incomplete
    finally:
        if command is not None and command.poll() is None:  # left before its end (--limit, a cut tar): stopped
            os.killpg(command.pid, signal.SIGKILL) if hasattr(os, "killpg") else command.kill()
    yield from pending.items()


def one_sample_per_image(items, args):
    """A source's items -> the same, where consecutive items of one image (equal bytes, or the same file) are one
    item with each one's caption. Sets with a row per caption keep an image's rows together (COCO's on the hub:
    five rows, each with the image and one caption): gathered here, the image is decoded and resized once, not
    five times. Samples of one picture that sit apart are gathered after processing (one_sample_per_picture).

    To see where an image's rows end, one row more is read: a streamed source's position (args.stream_state,
    recorded with each finished chunk) is then reported as the start of the image being gathered, so that a rerun
    after an interrupt reads its rows whole, from where the finished chunks end."""
    pending, start = None, args.resume_state  # the item being gathered; the source's position before its first row
    before, position = args.resume_state, None  # the position before the row read next; the source's own reporter
    gathered = lambda item: (item[0], item[1], item[2][0] if len(item[2]) == 1 else item[2], item[3])
    for key, image, caption, labels in items:
        if position is None and args.stream_state is not None:  # a streamed source starts reporting once it runs
            position = args.stream_state
            args.stream_state = lambda: start if pending is not None else position()
        if pending is not None and labels is None and pending[3] is None and isinstance(image, (bytes, str)) \
                and image == pending[1]:
            pending[2].append(caption)
        else:
            done, pending, start = pending, [key, image, [caption], labels], before
            if done is not None:
                yield gathered(done)
        before = position() if position is not None else None
    if pending is not None:
        done, pending = pending, None  # gathered: the position is now the source's own, past the last row
        yield gathered(done)


SOURCES = {"text-to-image-2M": source_text_to_image_2m, "folder": source_folder, "webdataset": source_webdataset,
           "table": source_table, "hub": source_hub, "shapes": source_shapes}

# -----------------------------------------------------------------------------
# processing one sample (in a worker process)


def upright_rgb(img):
    """A PIL image -> RGB, as an image viewer shows it. Evaluation images go through here too
    (evaluate.py), so that a model sees them as it saw its training images."""
    img = ImageOps.exif_transpose(img)  # phone photos store their pixels sideways plus a rotation tag
    if img.mode.startswith("I;16"):  # 16-bit greyscale (PNG, TIFF): RGB conversion would clip it to white
        img = Image.fromarray((np.asarray(img) >> 8).astype(np.uint8))
    elif img.mode in ("I", "F"):  # 32-bit integer or float grey (TIFF): PIL's conversion clips it at 255
        pixels = np.nan_to_num(np.asarray(img, dtype=np.float64))
        top = pixels.max(initial=0)
        # the range the values use: [0, 1] floats, 8 bits, 16 bits, or else the image's own maximum
        scale = 255 if img.mode == "F" and top <= 1 else 1 if top <= 255 else 255 / max(65535, top)
        img = Image.fromarray(np.clip(pixels * scale, 0, 255).round().astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        # transparent pixels keep arbitrary colours, often black: show the image on white, as viewers do
        img = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
    return img.convert("RGB")


def resize_and_crop(img, size):
    """An opened, not yet decoded image -> its centre square at size x size, upright, RGB."""
    w, h = img.size
    if img.format == "JPEG" and size / min(w, h) < 0.5:
        # let the JPEG decoder downscale by 1/2, 1/4 or 1/8 for free: possible only before it decodes
        img.draft("RGB", (int(w * size / min(w, h)) + 1, int(h * size / min(w, h)) + 1))
    img.load()  # truncated or corrupt files fail here, not later
    img = upright_rgb(img)
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    left, top = (nw - size) // 2, (nh - size) // 2
    # resize straight to the crop: PIL's box= crops in source coordinates and resamples in one go
    box = (left / scale, top / scale, (left + size) / scale, (top + size) / scale)
    return img.resize((size, size), Image.BICUBIC, box=box, reducing_gap=3.0)


def process_sample(item, image_size, quality):
    """-> ("ok", key, jpeg bytes, caption, labels) or ("skip", reason)."""
    key, image, caption, labels = item
    if labels and "skip" in labels:
        return "skip", labels["skip"]
    try:
        caption = caption_text(caption)
    except UnicodeDecodeError:
        return "skip", "caption_not_utf8"
    if caption is None:
        return "skip", "missing_caption"
    if "&" in caption:  # web alt texts (LAION's) arrive HTML-escaped, some twice: undone as OpenAI's CLIP does
        caption = html.unescape(html.unescape(caption))
    # several lines are several captions of the same image; the loader picks one per epoch. Runs of spaces and
    # tabs within a line are one space
    caption = "\n".join(" ".join(line.split()) for line in caption.splitlines() if line.strip())
    if not caption:
        return "skip", "empty_caption"
    if image is None:
        return "skip", "missing_image"
    try:
        with warnings.catch_warnings():
            # PIL warns from 89M pixels and refuses from twice that (its guard against decompression bombs); the
            # ones it reads are read, a JPEG at a fraction of its size, and the refused are counted, not warned of
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if isinstance(image, tuple):  # the shapes set renders its own image
                img = render_shape(image[1], image[2], image_size)
            elif isinstance(image, Image.Image):  # already decoded (some hub datasets)
                img = resize_and_crop(image, image_size)
            else:
                img = resize_and_crop(Image.open(io.BytesIO(image) if isinstance(image, bytes) else image), image_size)
        out = io.BytesIO()
        img.save(out, "JPEG", quality=quality)
    except Image.DecompressionBombError:
        return "skip", "image_too_large"
    except Exception:  # PIL raises many types for bad files; any of them means "skip this one"
        return "skip", "bad_image"
    return "ok", key, out.getvalue(), caption, labels


def _process(args_item):
    item, image_size, quality = args_item
    result = process_sample(item, image_size, quality)
    # with the digest of the processed picture, by which write_shards finds it again in other samples
    return (*result, hashlib.blake2b(result[2], digest_size=8).hexdigest()) if result[0] == "ok" else result

# -----------------------------------------------------------------------------
# writing


_locks = {}  # folder (its real path) -> the open lock file by which this process holds it


def _drop_locks_in_child():
    # a forked child (a decoding or loader worker) closes its copies of the lock files: a lock is held while any
    # process has it open, and should end with its holder, not with the last worker to notice that it has gone
    for f in _locks.values():
        f.close()
    _locks.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_locks_in_child)


def lock_dir(path):
    """One writer per folder: an advisory lock (flock) on path/.lock, which the OS releases when the process ends,
    however it ends; unlock_dir gives it back sooner. A process that holds it already (an earlier main() of a
    notebook or the tests, stopped early) holds it still. -> whether it is held: not where there are no such
    locks (Windows, some network file systems) or no lock file can be made (a read-only folder), so that work goes
    on unguarded. BlockingIOError: another process holds it."""
    key = os.path.realpath(path)
    if key in _locks:
        return True
    try:
        import fcntl
        f = open(os.path.join(path, ".lock"), "a")
    except (ImportError, OSError):
        return False
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        f.close()
        if isinstance(e, BlockingIOError):
            raise
        return False
    _locks[key] = f
    return True


def unlock_dir(path):
    f = _locks.pop(os.path.realpath(path), None)
    if f is not None:
        f.close()


def hold_out_dir(out_dir):
    """Two runs into one --out_dir would each process the whole source, and the one that finishes first removes
    the staged samples the other still reads."""
    try:
        lock_dir(out_dir)
    except BlockingIOError:
        sys.exit(f"another prep_dataset.py is writing into {out_dir}: let it finish (or stop it), then rerun "
                 "this command, which goes on from what it finished")


def writable_folder(path, name="it"):
    """Makes the folder (and those above it) and writes a file into it, now rather than after the work it would
    hold. -> None, or why it cannot: a read-only disk, another user's folder ("cannot write into it (...)", the
    folder called `name`)."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        return f"cannot {'write into' if os.path.isdir(path) else 'create'} {name} ({e.strerror or e})"
    return None


def disk_full(e):
    """Whether a write failed for want of room: a full disk, or a full quota where the system names it apart."""
    return getattr(e, "errno", None) in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def read_json_object(path):
    """A JSON file that holds an object (a manifest, say) -> dict. ValueError where it holds no JSON or another
    value (cut short, edited by hand, another tool's file)."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def read_own_file(path, what_to_do):
    """One of prep's own JSON files in --out_dir: the manifest, or a run in progress's settings and chunks. Each is
    written whole (atomic_write), so one that does not parse was changed since: said, with what to do."""
    try:
        return read_json_object(path)
    except ValueError as e:
        sys.exit(f"{path} is damaged ({e}): {what_to_do}")


def atomic_write(path, data):
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:  # a full disk: give back the part written
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def tar_bytes(samples):
    """An uncompressed tar holding KEY.jpg, KEY.txt (and KEY.json for labels) per sample, in order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for key, jpg, caption, labels in samples:
            files = [("jpg", jpg), ("txt", caption.encode("utf-8"))]
            if labels:
                files.append(("json", json.dumps(labels).encode("utf-8")))
            for ext, data in files:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def fetch(url):
    """An image URL -> (its bytes, None), or (None, why it failed). One retry, for what may pass (a timeout, a
    dropped connection, a server's 5xx, a 429); a 404 or a 403 is final."""
    # scraped URLs hold spaces and non-ASCII letters, which urllib refuses: escaped, the escapes already there kept
    url = urllib.parse.quote(url, safe=":/?#[]@!$&'()*+,;=%~")
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    for attempt in range(2):
        try:
            with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT) as response:
                data = response.read(DOWNLOAD_MAX_BYTES + 1)
                length = response.headers.get("Content-Length", "")
            if len(data) > DOWNLOAD_MAX_BYTES:
                return None, f"over {DOWNLOAD_MAX_BYTES >> 20} MB"
            if length.isdigit() and int(length) != len(data):  # the connection dropped halfway
                raise http.client.IncompleteRead(data, int(length) - len(data))
            return data, None
        except urllib.error.HTTPError as e:
            why = f"HTTP {e.code}"
            if (e.code < 500 and e.code != 429) or attempt == 1:
                break
            # a busy host (429 Too Many Requests, 503) may say in how many seconds to come back: waited for, up to
            # half a minute (a later time is not this run's)
            after = (e.headers.get("Retry-After") or "").strip()
            wait = int(after) if after.isdigit() else 1 if e.code == 429 else 0
            if wait > 30:
                break
            time.sleep(wait)
        except (OSError, ValueError, http.client.HTTPException) as e:  # URLError, timeouts, resets, a cut answer
            why = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
    return None, why


class Downloads:
    """Image downloads, DOWNLOAD_THREADS at a time, in daemon threads: a stopped prep (Ctrl-C, no network) exits at
    once, instead of waiting out every server that has not answered yet, as Python does for the threads of a
    ThreadPoolExecutor."""

    def __init__(self):
        self.todo, self.stopped, self.threads = queue.Queue(), threading.Event(), 0

    def work(self):
        for download, url in iter(self.todo.get, None):  # None: the end
            if download.set_running_or_notify_cancel():
                download.set_result(fetch(url))

    def queue(self, chunk):
        """A download for each image URL of the chunk, queued (None for the other items)."""
        downloads = [Future() if is_url(item[1]) else None for item in chunk]
        for download, item in zip(downloads, chunk):
            if download is not None:
                self.todo.put((download, item[1]))
        if any(downloads) and not self.threads:  # started for the first URL
            self.threads = DOWNLOAD_THREADS
            for _ in range(self.threads):
                threading.Thread(target=self.work, daemon=True).start()
        return downloads

    def stop(self):
        """The queued downloads are dropped and each thread ends after its current one (or with the process)."""
        self.stopped.set()
        while True:
            try:
                self.todo.get_nowait()[0].cancel()
            except queue.Empty:
                break
        for _ in range(self.threads):
            self.todo.put(None)


def downloaded(chunk, downloads, tried, stopped):
    """The chunk's items in order, each image URL replaced by the image's bytes as its download (Downloads.queue)
    ends, so that the workers decode the first images while the rest arrive; one that cannot be fetched is skipped
    as download_failed. tried: counts over the run. When not one of the first 100 came (no network), it stops there
    and tried["offline"] says why, rather than going through millions of them; when `stopped` is set, at once."""
    urls = sum(d is not None for d in downloads)
    bar = tqdm(total=urls, desc="download", unit=" images", leave=False, dynamic_ncols=True, disable=not urls)
    try:
        for (key, url, caption, labels), download in zip(chunk, downloads):
            if download is None:
                yield key, url, caption, labels
                continue
            while True:  # waited for a little at a time: a stopped run's pool ends this generator's thread
                try:
                    data, why = download.result(timeout=0.2)
                    break
                except TimeoutError:
                    if stopped.is_set():
                        return
                except CancelledError:
                    return
            bar.update()
            tried["ok" if data is not None else "failed"] += 1
            if not tried["ok"] and tried["failed"] >= 100:
                tried["offline"] = f"{why}, for {url}"
                return
            yield (key, data, caption, labels) if data is not None else (key, None, caption, {"skip": "download_failed"})
    finally:
        bar.close()


def finished_chunks(stage_dir):
    """The chunk files a run has finished, in order: chunk-000000.json, ..."""
    return sorted(glob.glob(os.path.join(glob.escape(stage_dir), "chunk-*.json")))


def stage_chunks(args, stage_dir, items, done):
    """Pass 1: process the source chunk by chunk; each finished chunk is a .bin of JPEGs plus a .json index.
    `done` chunks were finished by an earlier, interrupted run. A streaming source already starts after
    them; other sources (local files, cheap to read again) start over and their finished chunks' items
    are passed over."""
    resumed = args.resume_state is not None
    first = done if resumed else 0
    if args.limit:
        items = islice(items, max(0, args.limit - first * args.chunk_size))
    bar = tqdm(desc="process", unit=" samples", total=args.limit, initial=first * args.chunk_size, dynamic_ncols=True)

    def next_chunk(c):
        """Chunk c's items, where it ends in a streaming source (read at once, while the source waits right after
        it), and its downloads, queued (none for a chunk an earlier run finished)."""
        chunk = list(islice(items, args.chunk_size))
        try:
            position = json.loads(json.dumps(args.stream_state())) if args.stream_state else None
        except Exception:  # a source that cannot say: a rerun reads it again from the start
            position = None
        return chunk, position, web.queue(chunk) if c >= done else None

    tried, web = {"ok": 0, "failed": 0}, Downloads()
    # the workers leave Ctrl-C to this process, which stops them: one message instead of a traceback each
    with Pool(args.num_workers, initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN)) as pool:
        try:
            chunk, position, downloads = next_chunk(first)
            for c in range(first, sys.maxsize):
                if not chunk:
                    break
                # the next chunk's downloads queue behind this one's, so that the last of this chunk's (a few slow
                # servers, up to the timeout) do not leave the threads idle
                after = next_chunk(c + 1)
                index_path = os.path.join(stage_dir, f"chunk-{c:06d}.json")
                if c >= done:
                    blob, index, skipped = bytearray(), [], {}
                    work = ((item, args.image_size, args.jpeg_quality)
                            for item in downloaded(chunk, downloads, tried, web.stopped))
                    for result in pool.imap(_process, work, chunksize=8):
                        if result[0] == "skip":
                            skipped[result[1]] = skipped.get(result[1], 0) + 1
                            continue
                        _, key, jpg, caption, labels, digest = result
                        index.append([key, len(blob), len(jpg), caption, labels, digest])
                        blob += jpg
                    if "offline" in tried:
                        sys.exit(f"none of the first 100 image URLs could be downloaded ({tried['offline']}): check "
                                 f"the network, then rerun the same command ({DOWNLOAD_HINT})")
                    atomic_write(os.path.join(stage_dir, f"chunk-{c:06d}.bin"), bytes(blob))
                    atomic_write(index_path, json.dumps({"samples": index, "skipped": skipped,
                                                         "source_state": position}).encode())
                bar.update(len(chunk))
                chunk, position, downloads = after
        finally:  # done, or stopped (Ctrl-C, no network): the downloads still queued are dropped, not waited for
            web.stop()
    bar.close()
    if done:
        print(f"resumed: reused {done} finished chunks" + (", going on in the source where they end" if resumed else ""))


def write_shards(args, stage_dir):
    """Pass 2: one global permutation, then the shards, each written whole under a temporary name."""
    chunks = finished_chunks(stage_dir)
    samples, skipped = [], {}
    for c, path in enumerate(chunks):
        chunk = read_own_file(path, "delete it and the chunks after it, and a rerun makes them again")
        samples += [(c, *s) for s in chunk["samples"]]
        for reason, n in chunk["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    seen = len(samples) + sum(skipped.values())
    samples, merged, placeholders = one_sample_per_picture(samples, args.max_samples_per_picture)
    if placeholders:
        skipped["placeholder_image"] = placeholders
    if not samples:
        shutil.rmtree(stage_dir)  # nothing worth keeping: the corrected command starts afresh
        hints = {"download_failed": f"No image URL could be downloaded: check the network ({DOWNLOAD_HINT})",
                 "other_split": "No row is in --split's splits: name the table's (several: --split train,restval)",
                 "placeholder_image": ("Each picture was shown by more than --max_samples_per_picture samples and "
                                       "taken for a placeholder: --max_samples_per_picture 0 keeps them")}
        if args.source in ("table", "hub"):
            hints["missing_image"] = ("Relative image paths start from --image_root if given, else from the table's "
                                      "(or the set's) folder, then from where you run the command: name the images' "
                                      "folder with --image_root (paths written on another machine are looked for "
                                      "there by their last parts)")
        if args.source == "folder":
            hints["unsupported_image_type"] = ("Images of types that PIL does not read (a phone's HEIC photos, RAW, "
                                               f"SVG) were passed over: convert them to JPEG first (read: "
                                               f"{' '.join(sorted(IMAGE_EXTENSIONS))})")
            hints["missing_caption"] = ("An image takes its caption from the .txt of the same name (x.jpg + x.txt), "
                                        "else from a caption-like field of the x.json beside it (or the field "
                                        "--caption_column names); captions kept in a table are read with --source table")
            hints["bad_json"] = "The x.json beside an image must hold one JSON record, such as {\"caption\": \"...\"}"
        if args.source in ("webdataset", "text-to-image-2M"):
            hints["missing_caption"] = ("A sample's caption is its KEY.txt, else a file of a caption-like extension "
                                        "(KEY.caption), else a caption-like field of its KEY.json: name the file's "
                                        "extension or the field with --caption_column")
        sys.exit(f"no usable samples were found: check --source/--input (skipped: {skipped or 'none; it holds no samples'})"
                 + "".join(f". {hint}" for reason, hint in hints.items() if reason in skipped))
    # the shards copy every staged sample (plus tar headers, about 2 KB a sample), while the staged chunks
    # stay until the end: stop now, with the figure, rather than on a full disk halfway through
    need = sum(s[3] + 2048 + len(s[4]) for s in samples) - sum(
        os.path.getsize(p) for p in glob.glob(os.path.join(glob.escape(args.out_dir), "*", "shard-*.tar")))
    free = shutil.disk_usage(args.out_dir).free
    if need > free:
        size = lambda n: f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
        sys.exit(f"writing the shards needs about {size(need)} more in {args.out_dir}, which has {size(free)} "
                 "free: make room and rerun the same command (the processed samples are kept)")
    order = np.random.default_rng(args.seed).permutation(len(samples))
    # --val_fraction 1 makes an evaluation set (all in val/); otherwise train keeps at least one sample
    n_val = len(samples) if args.val_fraction >= 1 else min(len(samples) - 1, int(round(len(samples) * args.val_fraction)))
    splits = {"val": order[:n_val], "train": order[n_val:]}

    def shard_samples(rows):
        """The samples of one shard, in its shuffled order, read from the staged chunks in file order:
        one chunk open at a time, read front to back, rather than a seek to a random chunk per sample."""
        out = [None] * len(rows)
        f, current = None, None
        try:
            for j in sorted(range(len(rows)), key=lambda j: (samples[rows[j]][0], samples[rows[j]][2])):
                c, _, offset, size, caption, labels = samples[rows[j]]
                if c != current:
                    if f is not None:
                        f.close()
                    f, current = open(chunks[c][:-5] + ".bin", "rb"), c
                f.seek(offset)
                # the new key is the sample's position in the source: unique, whatever the source's keys were
                out[j] = (f"{rows[j]:09d}", f.read(size), caption, labels)
        finally:
            if f is not None:
                f.close()
        return out

    shards = {}
    for split, idx in splits.items():
        os.makedirs(os.path.join(args.out_dir, split), exist_ok=True)
        shards[split] = []
        starts = range(0, len(idx), args.shard_size)
        for s in tqdm(starts, desc=f"write {split}", unit=" shards", dynamic_ncols=True):
            name = f"{split}/shard-{s // args.shard_size:06d}.tar"
            shards[split].append(name)
            path = os.path.join(args.out_dir, name)
            if not os.path.exists(path):
                atomic_write(path, tar_bytes(shard_samples(idx[s:s + args.shard_size])))
    return {"counts": {"train": len(splits["train"]), "val": len(splits["val"]), "skipped": sum(skipped.values()),
                       "merged": merged, "seen": seen},
            "skipped": skipped, "shards": shards}


def one_sample_per_picture(samples, max_samples=0):
    """The staged samples -> (the same, where samples of one picture are one sample with all their captions; how
    many samples were folded into another; how many showed a placeholder). One picture: the same processed JPEG,
    by its digest. The same image in several samples (a set with a row per caption, its rows apart; a picture
    scraped twice) would otherwise sit in train and val at once, and be its own negative in a batch. A picture
    that more than max_samples samples show (0: no limit) is a placeholder: the "image not available" picture a
    web host serves for a vanished one, thousands of times in scraped sets, each time with an unrelated caption;
    it is dropped. Samples with labels (the shapes set's) stay apart."""
    first, kept, lines_of, shown = {}, [], {}, {}  # digest -> place in kept; place -> caption lines; -> samples
    for c, key, offset, size, caption, labels, *digest in samples:  # (chunks staged before digests: none)
        at = first.get(digest[0]) if digest and labels is None else None
        if at is None:
            if digest and labels is None:
                first[digest[0]] = len(kept)
            kept.append([c, key, offset, size, caption, labels])
        else:  # an image's captions once each, in the order the samples came (a dict keeps its keys' order)
            if at not in lines_of:
                lines_of[at] = dict.fromkeys(kept[at][4].split("\n"))
            lines_of[at].update(dict.fromkeys(caption.split("\n")))
            shown[at] = shown.get(at, 1) + 1
    placeholders = {at for at, n in shown.items() if max_samples and n > max_samples}
    dropped = sum(shown[at] for at in placeholders)
    if placeholders:
        tqdm.write(f"pictures that over {max_samples} samples showed, each, taken for a web host's placeholder "
                   f"(\"image not available\") and left out: {len(placeholders)}, with their {dropped} samples "
                   "(--max_samples_per_picture 0 keeps them)")
    lines_of = {at: lines for at, lines in lines_of.items() if at not in placeholders}
    for at, lines in lines_of.items():
        kept[at][4] = "\n".join(lines)
    kept = [sample for at, sample in enumerate(kept) if at not in placeholders]
    merged = len(samples) - dropped - len(kept)
    if merged:
        tqdm.write(f"samples that showed a picture another sample showed too: {merged}. Each picture is one sample "
                   f"with all their captions ({len(lines_of)} pictures; the most captions one gathered: "
                   f"{max(map(len, lines_of.values()))})")
    return kept, merged, dropped


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="text-to-image-2M", choices=list(SOURCES))
    p.add_argument("--input", default=None, help="folder (folder), tar glob (webdataset, text-to-image-2M), "
                   ".csv/.tsv/.jsonl/.json/.parquet file (table), dataset name or folder (hub)")
    p.add_argument("--split", default=None, help="hub: the dataset split to read; table: the rows to keep when "
                   "the table has a split column (several: train,restval). Default: train")
    # type=expanduser: `~` where the shell leaves it, after an = (--out_dir=~/data/mine), not a folder named ~
    p.add_argument("--image_root", default=None, type=os.path.expanduser, help="table, hub: the folder relative "
                   "image paths start from (default: the table's or the local set's folder, then the working "
                   "directory)")
    p.add_argument("--image_column", default=None, help="table, hub: the image column (default: guessed)")
    p.add_argument("--caption_column", default=None, help="table, hub: the caption column (default: guessed), or "
                   "several, comma-separated, each holding a caption of the same image (caption_0,caption_1); "
                   "webdataset, text-to-image-2M: the file extension or .json field of the caption; folder: the "
                   "captions' file extension (default: .txt, else .caption), or the field of the x.json beside x.jpg")
    p.add_argument("--out_dir", required=True, type=os.path.expanduser)
    p.add_argument("--image_size", type=int, default=None, help="default: 64 for shapes, else 256")
    p.add_argument("--limit", type=int, default=None, help="use only the first N samples (text-to-image-2M: of "
                   "its tar files in turn, about N / files from each; shapes: make N)")
    p.add_argument("--val_fraction", type=float, default=0.05, help="the share of samples held out in val/ "
                   "(1: all of them, an evaluation set such as COCO's test split)")
    p.add_argument("--shard_size", type=int, default=5000, help="samples per shard")
    p.add_argument("--chunk_size", type=int, default=5000, help="samples per staged chunk (the unit of resume)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_workers", "--workers", type=int,
                   help="decoding processes (default: the cores this process may use)",
                   default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    p.add_argument("--jpeg_quality", type=int, default=95)
    p.add_argument("--max_samples_per_picture", type=int, default=1000, help="a picture that more samples show is "
                   "taken for a web host's placeholder (\"image not available\") and left out; 0: no limit")
    args = p.parse_args(argv)
    for name, ok, what in (("val_fraction", 0 <= args.val_fraction <= 1, "a share between 0 and 1"),
                           ("image_size", args.image_size is None or args.image_size >= 1, "at least 1"),
                           ("limit", args.limit is None or args.limit >= 1, "at least 1"),
                           ("shard_size", args.shard_size >= 1, "at least 1"),
                           ("chunk_size", args.chunk_size >= 1, "at least 1"),
                           ("num_workers", args.num_workers >= 1, "at least 1"),
                           ("jpeg_quality", 1 <= args.jpeg_quality <= 100, "in [1, 100]"),
                           ("max_samples_per_picture", args.max_samples_per_picture >= 0, "at least 0"),
                           ("seed", args.seed >= 0, "0 or more")):
        if not ok:
            p.error(f"--{name} {getattr(args, name)}: must be {what}")
    for name, sources in (("input", ("text-to-image-2M", "folder", "webdataset", "table", "hub")),
                          ("split", ("table", "hub")), ("image_root", ("table", "hub")), ("image_column", ("table", "hub")),
                          ("caption_column", ("table", "hub", "webdataset", "text-to-image-2M", "folder"))):
        if getattr(args, name) is not None and args.source not in sources:  # said, not ignored
            p.error(f"--{name} is for --source {' or '.join(sources)}, not {args.source}")
    if args.image_root and not os.path.isdir(args.image_root):
        p.error(f"--image_root {args.image_root!r} is not a folder")
    args.split = args.split or "train"
    args.image_size = args.image_size or (64 if args.source == "shapes" else 256)

    if os.path.isdir(args.out_dir):  # (a new one is made, and locked, once the source has checked its input)
        hold_out_dir(args.out_dir)
    manifest_path = os.path.join(args.out_dir, "manifest.json")
    settings = {k: getattr(args, k) for k in ("source", "input", "image_size", "limit", "val_fraction",
                                              "shard_size", "chunk_size", "seed", "jpeg_quality")}
    if args.source in ("table", "hub"):
        settings.update(split=args.split, image_column=args.image_column, caption_column=args.caption_column)
    elif args.caption_column:  # only when given: shards prepared without it still match
        settings.update(caption_column=args.caption_column)
    if args.image_root:  # only when given: a table prepared without it still matches
        settings.update(image_root=args.image_root)
    if args.max_samples_per_picture != p.get_default("max_samples_per_picture"):  # likewise
        settings.update(max_samples_per_picture=args.max_samples_per_picture)
    if os.path.exists(manifest_path):
        done = read_own_file(manifest_path, f"delete {args.out_dir} to prepare it again, or choose another --out_dir")
        if done.get("settings") != settings:
            sys.exit(f"{args.out_dir} already holds a dataset made with other settings: choose another --out_dir "
                     f"or delete it.\n  there: {done.get('settings')}\n  asked: {settings}")
        print(f"{args.out_dir} is already complete: {done['counts']}")
        unlock_dir(args.out_dir)
        return done
    stage_dir = os.path.join(args.out_dir, ".stage")
    settings_path = os.path.join(stage_dir, "settings.json")
    if os.path.exists(settings_path):
        if read_own_file(settings_path, f"delete {stage_dir} to start over") != settings:
            sys.exit(f"{args.out_dir} holds an unfinished run with other settings: rerun it with the same "
                     "arguments to resume, or delete the folder to start over")
    # chunks are finished in order, so an interrupted run leaves chunks 0..done-1; a streaming source
    # recorded in the last of them where it stopped
    done = len(finished_chunks(stage_dir))
    args.resume_state, args.stream_state = None, None
    if done:
        last = os.path.join(stage_dir, f"chunk-{done - 1:06d}.json")
        args.resume_state = read_own_file(last, "delete it, and a rerun makes it again").get("source_state")
    # the source checks its input as it starts: a mistake there stops the run before anything is written
    items = one_sample_per_image(SOURCES[args.source](args), args)
    first = next(items, None)
    items = chain([first] if first is not None else [], items)
    why = writable_folder(args.out_dir) or writable_folder(stage_dir)
    if why:
        sys.exit(f"--out_dir {args.out_dir}: {why}; choose another")
    hold_out_dir(args.out_dir)
    if not os.path.exists(settings_path):
        atomic_write(settings_path, json.dumps(settings).encode())

    t0 = time.time()
    full = f"the disk of {args.out_dir} is full: make room and rerun the same command (what is finished is kept)"
    try:
        stage_chunks(args, stage_dir, items, done)
    except OSError as e:  # hours into a stream from the hub, a network that stayed down past `datasets`' retries
        if disk_full(e):
            sys.exit(full)
        sys.exit(f"stopped while reading the source ({type(e).__name__}: {e}). The {len(finished_chunks(stage_dir))} "
                 "finished chunks are kept: rerun the same command to go on from them (after a network error, once "
                 "it is back)")
    try:
        result = write_shards(args, stage_dir)
    except OSError as e:
        if not disk_full(e):
            raise
        sys.exit(full)
    manifest = {"source": args.source, "input": args.input, "image_size": args.image_size, "seed": args.seed,
                **result, "settings": settings}
    if args.source == "shapes":  # the zero-shot tasks the shapes set carries: classes and prompt templates
        manifest["tasks"] = shapes_tasks()
    atomic_write(manifest_path, json.dumps(manifest, indent=2).encode())
    shutil.rmtree(stage_dir)
    c = result["counts"]
    print(f"wrote {c['train']} train + {c['val']} val samples to {args.out_dir} in {time.time() - t0:.1f}s; "
          f"skipped {c['skipped']} of {c['seen']}: {result['skipped'] or 'none'}")
    if "caption_not_utf8" in result["skipped"]:
        print(f"captions in another encoding than UTF-8: {result['skipped']['caption_not_utf8']} (Windows' cp1252, "
              "say); convert them (iconv -f cp1252 -t utf-8 x.txt > y.txt) to prepare those samples into a new --out_dir")
    if "download_failed" in result["skipped"]:  # web images vanish: a few percent a year of a scraped set
        print(f"images that could not be downloaded: {result['skipped']['download_failed']} (gone, refused or too "
              "slow to answer); a rerun into a new --out_dir tries them again")
    unlock_dir(args.out_dir)  # done: another may write here now
    return manifest


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted. Rerun the same command to go on: the finished chunks and shards are kept", file=sys.stderr)
        sys.exit(130)
