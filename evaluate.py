"""
Evaluates a checkpoint: zero-shot classification (top-1/top-5) and image<->text retrieval (Recall@1/5/10).

    python evaluate.py runs/demo/best.pt --zeroshot data/shapes                 # the shapes set's own tasks
    python evaluate.py CKPT --zeroshot path/to/imagefolder                      # DIR/CLASS/img, or DIR/val/CLASS/img
    python evaluate.py CKPT --zeroshot cifar10 --split test                     # a dataset by hub name
    python evaluate.py CKPT --zeroshot clip-benchmark/wds_cifar10               # clip_benchmark's sets, names and prompts
    python evaluate.py CKPT --zeroshot DIR --templates "a photo of a {}." "a drawing of a {}."
    python evaluate.py CKPT --zeroshot imagenet --classnames LOC_synset_mapping.txt   # folders named n01440764...
    python evaluate.py CKPT --zeroshot CLS-LOC/val --labels LOC_val_solution.csv --classnames LOC_synset_mapping.txt
    python evaluate.py CKPT --retrieval data/shapes/val --json results.json
    python evaluate.py runs/demo --retrieval data/coco-test                   # a run's best.pt; COCO's 5k test images
    python evaluate.py CKPT --images a.jpg b.png --texts "a red circle" "a blue square"   # your own images
    torchrun --standalone --nproc_per_node=8 evaluate.py CKPT --zeroshot imagenet/val --classnames LOC_synset_mapping.txt

Zero-shot: each class name is put into every prompt template, the text embeddings are averaged and
normalised (the CLIP paper's prompt ensembling), and an image's class is the nearest such embedding.
Images are preprocessed exactly as in training's evaluation (dataloader.prepare_image: centre crop,
resize to the checkpoint's image_size; the model normalises); images that are not from prepared shards
are first turned upright and shown on white as prep_dataset.py does for training images (a phone
photo's EXIF rotation, transparency, 16-bit greyscale); a file that does not decode is left out and
counted ("unreadable"). Retrieval scores every caption of an image (COCO's five): a caption is found
when its image ranks in the top k, an image when its best-ranked caption does. train.py runs the same
code periodically.
"""
import argparse
import csv
import glob
import io
import json
import os
import re
import sys
import tarfile
from functools import lru_cache, partial

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from checkpoint_manager import CheckpointError, load_run
from clip import CLIP, CLIPConfig, Tokenizer, get_encoding
from dataloader import (ShardLoader, data_dirs, default_num_workers, expand_home, ignore_sigterm, prefetch,
                        prepare_image, room_for_loader_processes, shard_paths)
from prep_dataset import (IMAGE_EXTENSIONS, atomic_write, hub_split_names, image_cell, load_hub_set,
                          not_a_missing_folder, not_data, read_json_object, writable_folder)

# a few of the CLIP paper's ImageNet prompts: the ensemble helps more than any single wording
DEFAULT_TEMPLATES = ["a photo of a {}.", "a blurry photo of a {}.", "a photo of the large {}.",
                     "a photo of the small {}.", "a close-up photo of a {}.", "a bright photo of a {}.",
                     "a low resolution photo of a {}.", "a drawing of a {}.", "a painting of a {}.",
                     "a rendering of a {}.", "a cropped photo of the {}.", "itap of a {}."]
RETRIEVAL_KS = (1, 5, 10)
# a classification set's class column, by its usual names (CIFAR-100's fine_label before its coarse_label;
# cls: a webdataset's class-id files, as in clip_benchmark's sets)
LABEL_COLUMNS = ("label", "labels", "fine_label", "class", "category", "cls")
INTEGERS = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")  # a `datasets` column of ids
# what clip_benchmark's webdataset sets (clip-benchmark/wds_cifar10 ...) keep beside their shards: the class names,
# a line per class id, and the set's own prompt templates, with {c} for the class name
SET_CLASSNAMES, SET_TEMPLATES = "classnames.txt", "zeroshot_classification_templates.txt"

# -----------------------------------------------------------------------------
# metrics (on embeddings; the tests check them against naive loops)


def topk_hits(logits, targets, ks=(1, 5)):
    """How many rows have their target among the k highest logits, for each k (k capped at #classes): (len(ks),)."""
    ranked = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (N, k)
    hits = ranked == targets[:, None]
    return torch.stack([hits[:, :k].any(dim=1).sum() for k in ks])


def topk_accuracy(logits, targets, ks=(1, 5)):
    """Fraction of rows whose target is among the k highest logits, for each k."""
    return {f"top{k}": hits / len(targets) for k, hits in zip(ks, topk_hits(logits, targets, ks).tolist())}


def recall_at_k(image_emb, text_emb, text_image=None, ks=RETRIEVAL_KS, block=4096):
    """Text j describes image text_image[j] (by default image j; COCO's images have five captions each).
    Recall@k: how often the true match ranks among the k most similar. For a caption that is its image;
    for an image, its best-ranked caption (the usual protocol when an image has several).
    Candidates that score exactly as high as the true match (a caption several images share, a duplicate
    image, a model whose embeddings all coincide) are ranked in random order: recall is its expected value
    then, so such ties neither all count as found nor all as missed.
    The similarities are made `block` rows at a time: 100k val pairs would need 40 GB at once."""
    if text_image is None:
        text_image = torch.arange(len(text_emb), device=text_emb.device)
    out = {}
    for name, queries, candidates in (("image_to_text", image_emb, text_emb), ("text_to_image", text_emb, image_emb)):
        above, own, others = [], [], []
        for i in range(0, len(queries), block):
            sim = queries[i:i + block] @ candidates.T  # (block, N)
            if name == "text_to_image":  # query i + r's true match is image text_image[i + r]
                true_sim = sim[torch.arange(len(sim), device=sim.device), text_image[i:i + block]]
                ties_own = (true_sim == true_sim).long()  # 1, or 0 where it is NaN (no match is found then)
            else:  # image i + r's captions are the columns where text_image == i + r: keep the best of them
                cols = ((text_image >= i) & (text_image < i + len(sim))).nonzero()[:, 0]
                rows = text_image[cols] - i
                true_sim = sim.new_full((len(sim),), float("-inf")).scatter_reduce(0, rows, sim[rows, cols], "amax")
                # how many of its own captions score that best value
                ties_own = torch.zeros(len(sim), dtype=torch.long, device=sim.device).scatter_add(
                    0, rows, (sim[rows, cols] == true_sim[rows]).long())
            # the same matmul's values: how many candidates score strictly higher, and how many tie
            above.append((sim > true_sim[:, None]).sum(dim=1))
            own.append(ties_own)
            others.append((sim == true_sim[:, None]).sum(dim=1) - ties_own)
        # counts of N queries; float64 for lgamma of counts up to N, on the CPU: Apple's MPS has no float64
        above, own, others = (torch.cat(x).cpu().double() for x in (above, own, others))
        for k in ks:
            # the tied places left within the top k, m; the chance that none of them holds one of the `own` true
            # candidates, the tied ones in random order: C(others, m) / C(others + own, m), 0 when m > others
            m = (k - above).clamp(min=0)
            log_miss = (torch.lgamma(others + 1) - torch.lgamma((others - m).clamp(min=0) + 1)
                        - torch.lgamma(others + own + 1) + torch.lgamma(others + own - m + 1))
            miss = torch.where(m > others, torch.zeros_like(m), log_miss.exp()).masked_fill(own == 0, 1.0)
            out[f"{name}_R@{k}"] = (1 - miss).mean().item()
    return out


@torch.no_grad()
def class_embeddings(model, tokenizer, classnames, templates, device, autocast):
    """(C, embed_dim): per class, the normalised mean of its templates' normalised text embeddings."""
    rows = []
    templates = [t.replace("{c}", "{}") for t in templates]  # clip_benchmark's templates say {c}
    for name in classnames:
        prompts = [t.format(name) if "{}" in t else f"{t} {name}" for t in templates]
        tokens = tokenizer(prompts, trim=True).to(device)  # prompts are short: no need to run the padding
        with autocast:
            emb = model.encode_text(tokens).float()
        rows.append(torch.nn.functional.normalize(emb.mean(dim=0), dim=0))
    return torch.stack(rows)

# -----------------------------------------------------------------------------
# data


def shard_split(paths):
    """A folder of shards (data/x/val) or a prepared dataset (data/x, meaning its val split; a set of another
    tool's with no val/ but a test/, as clip_benchmark's, its test split), or several of either,
    comma-separated -> (the sets' dirs, comma-separated, and their split)."""
    found = []
    for path in data_dirs(paths):
        path = os.path.normpath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no folder {path}: give a folder of shards or a prepared dataset")
        tars = any(name.endswith(".tar") for name in os.listdir(path))
        held_out = [s for s in SPLIT_FOLDERS[:-1] if shard_paths(path, s)]  # test, val, valid, validation
        split = "val" if "val" in held_out or not held_out else held_out[0]
        found.append((os.path.dirname(path), os.path.basename(path)) if tars else (path, split))
    if len({split for _, split in found}) > 1:
        raise ValueError(f"{paths}: several folders are read together only from splits of one name, e.g. a/val,b/val")
    return ",".join(d for d, _ in found), found[0][1] if found else "val"


def embed_shards(model, data_dir, split, cfg, device, autocast, max_samples=None, batch_size=256, num_workers=2,
                 rank=0, world=1):
    """One ordered pass over shards -> image embeddings (N, E), the embeddings of every caption (T, E),
    the samples' labels, and for each caption the index of its image (T,), batch_size samples per process at a
    time. world > 1 (under DDP): each rank embeds its share of every batch, and every rank gets the whole
    result, in the same order."""
    loader = shards_to_embed(data_dir, split, cfg, device, batch_size, num_workers, rank, world)
    return embed_loader(model, loader, cfg, device, autocast, max_samples)


def shards_to_embed(data_dir, split, cfg, device, batch_size=256, num_workers=2, rank=0, world=1):
    """The loader embed_loader reads: batches of batch_size samples for each of the world's processes, each
    sample with all its captions and its labels."""
    return ShardLoader(data_dir, split, batch_size * world, cfg.image_size, cfg.context_length, cfg.encoding,
                       train=False, drop_last=False, with_labels=True, num_workers=num_workers, trim_tokens=True,
                       all_captions=True, device=device, rank=rank, world_size=world)


@torch.no_grad()
def embed_loader(model, loader, cfg, device, autocast, max_samples=None):
    """embed_shards, from a loader that shards_to_embed made (training keeps one for all its evaluations)."""
    ds = loader.dataset
    rank, local, world = ds.rank, ds.local_batch, ds.global_batch // ds.local_batch
    n = min(max_samples or ds.num_samples, ds.num_samples)
    total = -(-n // (local * world))
    images, texts, places, text_places, labels = [], [], [], [], []  # place: a sample's position in the split
    # the bar on a terminal only (disable=None): in a batch job's log file its redraws would crowd the log lines
    for b, (img, tok, lab, counts) in enumerate(tqdm(loader, total=total, desc="embed", leave=False,
                                                     disable=True if total < 5 or rank != 0 else None)):
        if b == total:
            break
        if not lab:  # this rank's share of the last batch is empty
            continue
        with autocast:
            images.append(model.encode_image(img).float())  # on the device already: the loader copies ahead
            texts.append(model.encode_text(tok).float())
        place = b * local * world + rank * local + torch.arange(len(lab), device=images[-1].device)
        places.append(place)
        text_places.append(place.repeat_interleave(torch.tensor(counts, device=place.device)))
        labels += lab
    if not places:  # a rank with no share of a split smaller than the ranks' first batch
        images = texts = [torch.zeros(0, cfg.embed_dim, device=device)]
        places = text_places = [torch.zeros(0, dtype=torch.long, device=device)]
    images, texts, places, text_places = (gathered(torch.cat(x), world) for x in (images, texts, places, text_places))
    if world > 1:  # the ranks' rows, put back in the split's order: the one-process result
        every = [None] * world
        dist.all_gather_object(every, labels)
        order = places.argsort()
        images, labels = images[order], [label for labels in every for label in labels]
        labels = [labels[i] for i in order.tolist()]
        order = text_places.argsort(stable=True)  # an image's captions keep their order
        texts, text_places = texts[order], text_places[order]
    keep = text_places < n
    return images[:n], texts[keep], labels[:n], text_places[keep]


def gathered(x, world):
    """x (rows, ...) of every rank, rank after rank, on every rank; the ranks may hold different numbers of rows."""
    if world == 1:
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(x)], device=x.device))
    padded = x.new_zeros((int(max(sizes)), *x.shape[1:]))  # all_gather takes tensors of one shape
    padded[:len(x)] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:int(size)] for part, size in zip(parts, sizes)])


def image_batch(images, size):
    """PIL images -> (B, 3, size, size) uint8: upright, transparency on white, as prep_dataset.py made the
    training images, then through the evaluation crop. Given as opened, not yet decoded, a JPEG much larger than
    the crop is decoded at a reduced scale, as the loader does it (prepare_image)."""
    arrays = [prepare_image(img, size) for img in images]
    arrays = np.stack(arrays) if arrays else np.empty((0, size, size, 3), np.uint8)  # a batch of bad files
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()


def labelled_batch(rows, image_col, label_col, size):
    """A batch of a classification dataset's rows, images as stored -> (images, labels, how many did not
    decode); runs in the loader's workers. A file that does not decode is left out and counted."""
    images, labels = [], []
    for row in rows:
        stored = image_cell(row[image_col])  # the file's bytes, or its path
        try:
            image = Image.open(io.BytesIO(stored) if isinstance(stored, bytes) else stored)
            # decoded and cropped one by one, so that a bad file fails here, where it can be left out, and
            # no more than one full-size decoded image is held at a time
            images.append(image_batch([image], size))
        except Exception:  # PIL raises many types for bad files
            continue
        labels.append(row[label_col])
    images = torch.cat(images) if images else image_batch([], size)
    return images, torch.tensor(labels, dtype=torch.long), len(rows) - len(labels)


SPLIT_FOLDERS = ("test", "val", "valid", "validation", "train")  # held-out first: a folder's default split


def set_name(name_or_dir):
    """A zero-shot set's name in logs and results: imagenet/val -> imagenet (a "val" would collide with
    another set's val/), cifar10 -> cifar10."""
    parts = os.path.normpath(name_or_dir).split(os.sep)
    return parts[-2] if len(parts) > 1 and parts[-1].lower() in SPLIT_FOLDERS else parts[-1]


def image_files(folder):
    """The image files in a folder and its subfolders, in order; hidden ones and a Mac's __MACOSX left out."""
    found = []
    for d, subfolders, names in os.walk(folder):
        subfolders[:] = [s for s in subfolders if not not_data(s)]
        found += [os.path.join(d, f) for f in names if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
                  and not not_data(f)]
    return sorted(found)


def in_class_order(classes):
    """Classes sorted by name; classes that are numbers (ImageNet-V2's folders 0 to 999, Flowers-102's 1 to 102) in
    their numbers' order, which a file of class names in order (--classnames) follows: 10 after 9, not after 1."""
    numbers = bool(classes) and all(c.isdigit() for c in classes)
    return sorted(classes, key=int) if numbers else sorted(classes)


def class_folders(root, split=None, notes=True):
    """A folder in torchvision's ImageFolder layout, ROOT/CLASS/**/image, or that layout one level down by
    split (ROOT/val/CLASS/...) -> (rows, class names), or None when it holds no such images. A folder whose
    subfolders are all split names is read by split: --split, else the first of SPLIT_FOLDERS it has, so
    an ImageNet-style train/ + val/ evaluates on val. Otherwise its subfolders are the classes, whatever
    their names (CIFAR-100 has a class "train"), and a --split it has no folder of does not apply to it. The
    files are listed here, not through `datasets`' imagefolder, which would take such class folders for splits
    and leaves a lone class unlabelled."""
    folders = lambda d: sorted(e.name for e in os.scandir(d) if e.is_dir() and not not_data(e.name))
    subdirs = folders(root)
    by_split = bool(subdirs) and all(d.lower() in SPLIT_FOLDERS for d in subdirs)
    if split is not None:
        if split not in subdirs:
            if by_split:
                raise SystemExit(f"--split {split}: {root} has the split folders {subdirs}")
            # class folders with no split folders (--split picks the split of another set, given beside this one):
            # read as they are, and said. Else perhaps a local copy of a `datasets` set, whose splits are files
            found = class_folders(root, None, notes)
            if found is not None and notes:
                print(f"{root} has no split folders, only class folders: read as they are (--split {split} is for "
                      "sets with splits)", file=sys.stderr)
            return found
        root = os.path.join(root, split)
    elif by_split:
        chosen = next(d for s in SPLIT_FOLDERS for d in subdirs if d.lower() == s)
        if notes:
            print(f"{root} holds the splits {subdirs}: evaluating on {chosen} (evaluate.py --split picks another)",
                  file=sys.stderr)
        root = os.path.join(root, chosen)
    rows, classes, empty = [], [], []
    for name in in_class_order(folders(root)):
        files = image_files(os.path.join(root, name))
        rows += [{"image": {"bytes": None, "path": path}, "label": len(classes)} for path in files]
        (classes if files else empty).append(name)
    if rows and empty and notes:  # no prompt of theirs competes: said, as it makes the task easier
        print(f"{root}: {len(empty)} subfolder(s) without images left out of the classes: {', '.join(empty[:5])}"
              f"{', ...' if len(empty) > 5 else ''}", file=sys.stderr)
    return (rows, classes) if rows else None


def loose_images(folder):
    """Whether a folder holds its images in itself, with no class folders and no `datasets` metadata file that
    could name their classes: nothing zero-shot classification can read without a table of their classes."""
    if not os.path.isdir(folder):
        return False
    files = [e.name for e in os.scandir(folder) if e.is_file() and not not_data(e.name)]
    return (any(os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS for f in files)
            and not any(f.startswith("metadata.") for f in files) and class_folders(folder, notes=False) is None)


def loose_images_hint(labels_flag):
    return ("its images lie in the folder itself, with no class folders: zero-shot reads ROOT/CLASS/image files (the "
            f"class is the folder's name), or a folder of images with {labels_flag} TABLE (each image's class)")


def listed_classes(root, labels_file, notes=True):
    """A folder of images whose classes a table lists, a row per image: its file (or its name without the
    extension), then its class, the first word of the second field (Kaggle's ImageNet keeps its val images in one
    folder, and their classes in LOC_val_solution.csv: ImageId,PredictionString rows, the string starting with the
    class) -> (rows, class names)."""
    try:
        with open(labels_file, newline="", encoding="utf-8-sig") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"--labels {labels_file}: cannot read it ({e})")
    stem = lambda path: os.path.splitext(os.path.basename(path.strip()))[0]
    listed = {stem(row[0]): row[1].split()[0] for row in csv.reader(lines, delimiter="\t" if lines and "\t" in lines[0]
                                                                      else ",") if len(row) > 1 and row[1].split()}
    files = [(path, listed.get(stem(path))) for path in image_files(root)]
    classes = in_class_order({label for _, label in files if label is not None})
    if not classes:
        raise SystemExit(f"--labels {labels_file} lists none of the {len(files)} images in {root} (by file name, with "
                         f"or without its extension): give the table of that folder's images")
    unlisted = sum(label is None for _, label in files)
    if unlisted and notes:
        print(f"warning: {unlisted} of {len(files)} images in {root} are not in {labels_file} and are left out",
              file=sys.stderr)
    index = {c: i for i, c in enumerate(classes)}
    return [{"image": {"bytes": None, "path": path}, "label": index[label]} for path, label in files
            if label is not None], classes


def read_lines(path, flag):
    """The non-blank lines of a UTF-8 text file given with a flag, or an error that says what is wrong."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise SystemExit(f"{flag} {path} is not UTF-8 text ({e.reason} at byte {e.start}): save it as UTF-8") from e
    except OSError as e:
        raise SystemExit(f"{flag} {path}: {e.strerror or e}") from e


def classname_lines(path, flag="--classnames"):
    """A class-names file as lines: a text file's own, or a JSON file's in the same form: Keras'
    imagenet_class_index.json ({"0": ["n01440764", "tench"], ...}: "FOLDER NAME" lines in index order), a
    {"FOLDER": "NAME"} record, or a list of names."""
    if not path.lower().endswith(".json"):
        return read_lines(path, flag)
    try:
        with open(path, encoding="utf-8-sig") as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"{flag} {path} is not a JSON file of class names ({e})") from e
    if isinstance(doc, dict) and all(str(k).isdigit() for k in doc):  # by index: Keras' file
        doc = [doc[k] for k in sorted(doc, key=int)]
    elif isinstance(doc, dict):
        doc = [[k, v] for k, v in doc.items()]
    if not isinstance(doc, list):
        raise SystemExit(f"{flag} {path}: expected a list of class names, or a record of them")
    return [" ".join(map(str, d)) if isinstance(d, list) else str(d) for d in doc]


def read_classnames(path, classes):
    """--classnames FILE: a line per class, either "FOLDER NAME" (ImageNet's LOC_synset_mapping.txt says
    "n01440764 tench, Tinca tinca") or the name alone, in the classes' order (or a JSON file of either:
    classname_lines)."""
    lines = classname_lines(path)
    pairs = dict(line.split(None, 1) for line in lines if len(line.split(None, 1)) == 2)
    if all(c in pairs for c in classes):
        return [pairs[c] for c in classes]
    if len(lines) != len(classes):
        raise SystemExit(f"--classnames {path}: {len(lines)} lines for {len(classes)} classes "
                         f"({', '.join(classes[:3])}, ...): give one name per class in that order, or 'FOLDER NAME' lines")
    return lines


def held_out_splits(name_or_dir):
    """The splits of a `datasets` set that zero-shot evaluation takes when no --split names one, in the order
    tried: its test split, then its validation split (Food-101 has no test split; ImageNet's test labels are
    hidden), or its one split if it has one alone. Splits that cannot be listed (a hub name without a
    network): test."""
    try:
        names = hub_split_names(name_or_dir)
    except Exception:
        names = []
    held_out = [s for s in SPLIT_FOLDERS[:-1] if s in names]  # all but train
    return held_out or (names if len(names) == 1 else ["test"])


def load_classification(name_or_dir, split=None, classnames_file=None, label_column=None, notes=True,
                        labels_file=None):
    """An image-classification set: a local folder of class folders (class = folder name), or a `datasets`
    set (a hub name, or a local copy of one) with an image and a class-label column (`label_column`, else the
    one named like a label, else the first; a set may have several: FGVC-Aircraft's family, manufacturer and
    variant, CIFAR-100's fine and coarse labels). -> (rows, image column,
    label column, class names). The images come as their files' bytes or paths, decoded by the caller
    (labelled_batch), which can then leave a bad one out. Rows with no label (a test split whose labels
    are hidden, marked -1) are left out and counted. notes=False: no notes about the set on stderr (training
    evaluates the same sets again and again). labels_file: a folder of images whose classes that table lists
    (listed_classes)."""
    import datasets
    if labels_file and not os.path.isdir(name_or_dir):
        raise SystemExit(f"--labels gives the classes of a folder of images, and {name_or_dir} is no folder")
    if labels_file:
        if split is not None:  # said, not ignored
            raise SystemExit("--split picks a split folder or a `datasets` split: with --labels, give the folder "
                             "of images itself")
        found = listed_classes(name_or_dir, labels_file, notes)
    else:
        found = class_folders(name_or_dir, split, notes) if os.path.isdir(name_or_dir) else None
    if found is not None:
        if label_column is not None:  # said, not ignored: the folders name the classes
            raise SystemExit(f"--label_column is for `datasets` sets: the classes of {name_or_dir} are its folders")
        rows, classnames = found
        image_col, label_col = "image", "label"
    else:
        shards = sorted(glob.glob(os.path.join(glob.escape(name_or_dir), "*.tar"))) if os.path.isdir(name_or_dir) else []
        if shards:  # a split's folder of shards, given for the set
            try:
                with tarfile.open(shards[0]) as tf:
                    classes = any(m.name.endswith(".cls") for m, _ in zip(tf, range(50)))
            except (tarfile.TarError, OSError):  # a damaged shard: what follows still holds
                classes = False
            raise SystemExit(
                f"{name_or_dir} is a folder of shards: give the set's folder above it, {os.path.dirname(name_or_dir)}, "
                "with --split" if classes else  # clip_benchmark's test/*.tar of images and class ids
                f"{name_or_dir} holds shards of images and captions, which have no classes: evaluate them with "
                f"--retrieval {name_or_dir} (a prepared set's own zero-shot tasks, as the shapes set's: --zeroshot "
                "with the set's folder, the one with manifest.json)")
        tried = [split] if split else held_out_splits(name_or_dir)  # the first; the next where it hides its labels
        chosen = tried[0]
        if split is None and chosen != "test" and notes:
            print(f"{name_or_dir} has no test split: evaluating on its {chosen} split (evaluate.py --split picks "
                  "another)", file=sys.stderr)
        try:
            ds = load_hub_set(name_or_dir, chosen)
        except Exception as e:
            raise SystemExit(f"could not load {name_or_dir!r} ({type(e).__name__}: {str(e)[:300]}). Give a folder "
                             "of class folders (ROOT/CLASS/image.jpg, or ROOT/SPLIT/CLASS/...), or a `datasets` name "
                             "(or a local copy of one) and --split; a hub name needs a network.") from e
        image_col = next((k for k, f in ds.features.items() if isinstance(f, datasets.Image)), None)
        if label_column is not None and label_column not in ds.features:
            raise SystemExit(f"--label_column {label_column!r} is not a column of {name_or_dir}: it has "
                             f"{', '.join(ds.features)}")
        classes = [k for k, f in ds.features.items() if isinstance(f, datasets.ClassLabel)]
        named = [k for k in classes if k.lower() in LABEL_COLUMNS]
        label_col = label_column or next(iter(named + classes), None)
        if label_column is None and len(classes) > 1 and notes:
            print(f"{name_or_dir} has several class columns ({', '.join(classes)}): using {label_col}; choose "
                  "another with --label_column", file=sys.stderr)
        if label_col is None:  # no class labels: a column of class names as text, or of class ids
            label_col = next((k for k, f in ds.features.items() if k.lower() in LABEL_COLUMNS
                              and getattr(f, "dtype", None) in ("string", *INTEGERS)), None)
        if (image_col is None or label_col is None) and loose_images(name_or_dir):
            raise SystemExit(f"{name_or_dir}: {loose_images_hint('--labels')}. Images with captions are scored with "
                             "--retrieval, once prepared: python prep_dataset.py --source folder --input "
                             f"{name_or_dir} --val_fraction 1 --out_dir EVAL_DIR")
        if image_col is None or label_col is None:
            raise SystemExit(f"{name_or_dir} needs an image column and a class-label column; it has the columns "
                             f"{', '.join(ds.features)}")
        ids = getattr(ds.features[label_col], "dtype", None) in INTEGERS
        names_file = classnames_file or (beside_set(name_or_dir, SET_CLASSNAMES) if ids else None)
        if isinstance(ds.features[label_col], datasets.ClassLabel):
            classnames = ds.features[label_col].names
        elif ids and names_file:  # class ids, and a file naming them
            ds, classnames = id_classnames(ds, name_or_dir, label_col, names_file, notes)
            classnames_file = names_file
        else:  # the class names as text, as many community sets keep them, or bare ids: the values found are the classes
            ds = ds.class_encode_column(label_col)
            classnames = ds.features[label_col].names
            if in_class_order(classnames) != classnames:  # numbers as text ("0" to "999"): in their numbers' order
                classnames = in_class_order(classnames)
                ds = ds.align_labels_with_mapping({c: i for i, c in enumerate(classnames)}, label_col)
        rows = ds.cast_column(image_col, datasets.Image(decode=False))
        labelled = rows.filter(lambda labels: [lab is not None and lab >= 0 for lab in labels], batched=True,
                               input_columns=label_col)
        if len(labelled) < len(rows) and notes:
            print(f"warning: {len(rows) - len(labelled)} of {len(rows)} images of {name_or_dir} have no label "
                  "and are left out", file=sys.stderr)
        if not len(labelled):
            if len(tried) > 1:  # ImageNet's on the hub: its test labels are hidden, its validation split the one to use
                if notes:
                    print(f"the {chosen} split of {name_or_dir} holds no labels (a hidden test set): evaluating on its "
                          f"{tried[1]} split", file=sys.stderr)
                return load_classification(name_or_dir, tried[1], classnames_file, label_column, notes)
            raise SystemExit(f"the {chosen} split of {name_or_dir} holds no labels (a hidden test set?): "
                             "choose another with --split")
        rows = labelled
    if classnames_file:  # folders named by id (ImageNet's n01440764): the names the prompts should say
        classnames = read_classnames(classnames_file, classnames)
    else:
        wordnet = all(re.fullmatch(r"n\d{8}", c) for c in classnames)  # ImageNet's folders
        # Flowers-102's folders; digits alone (MNIST, SVHN) are what their images show
        numbers = all(c.isdigit() for c in classnames) and max(map(len, classnames)) > 1
        if (wordnet or numbers) and notes:
            print(f"warning: the classes of {name_or_dir} are {'WordNet ids' if wordnet else 'numbers'} "
                  f"({classnames[0]}, ...), which prompts cannot describe: name them with evaluate.py --classnames "
                  "or train.py --zeroshot_classnames (for ImageNet, its LOC_synset_mapping.txt)", file=sys.stderr)
    if all(re.match(r"\d+\.\D", c) for c in classnames):  # CUB-200's and Caltech-256's "001.Black_footed_Albatross"
        classnames = [c.split(".", 1)[1] for c in classnames]  # the number is the folder's order, not its name
    # ImageNet's names list synonyms ("tench, Tinca tinca"): the prompts take the first, the common name
    classnames = [c.split(",")[0].replace("_", " ").strip() for c in classnames]
    if len(classnames) < 2:  # every image "classified" right: a figure of 100% that means nothing
        inner = os.path.join(name_or_dir, found[1][0]) if found and found[1] else None  # its one folder
        raise SystemExit(f"{name_or_dir} holds {len(classnames)} class ({', '.join(classnames)}): zero-shot "
                         "classification needs two or more" + (f"; are the class folders one level down? Then give "
                                                               f"--zeroshot {inner}" if inner and os.path.isdir(inner)
                                                               else ""))
    return rows, image_col, label_col, classnames


def beside_set(name_or_dir, filename):
    """A file a set keeps at its root beside its data (clip_benchmark's classnames.txt): a local copy's, or
    fetched from the hub by the set's name; None where it has none."""
    if os.path.isdir(name_or_dir):
        path = os.path.join(name_or_dir, filename)
        return path if os.path.isfile(path) else None
    return fetched_beside_set(name_or_dir, filename)


@lru_cache(maxsize=None)
def fetched_beside_set(name, filename):
    """beside_set for a hub name, asked once per process: training evaluates the same sets again and again."""
    try:
        from huggingface_hub import hf_hub_download  # installed with `datasets`
        return hf_hub_download(name, filename, repo_type="dataset")
    except Exception:  # no such file, or no network: the caller goes on without it
        return None


def id_classnames(ds, name_or_dir, label_col, names_file, notes):
    """A label column of class ids (clip_benchmark's .cls) with the file that names them, a line per id (--classnames,
    else the set's classnames.txt) -> (the set, the classes as ids, to be named from the file). The ids index the
    lines as they are, from 0, so that a split lacking a class keeps the others' ids; ids that run from 1 to the
    number of lines (Flowers-102's, Stanford Cars') count from 1."""
    count = len(classname_lines(names_file))
    ids = [lab for lab in ds[label_col] if lab is not None and lab >= 0]  # -1: a hidden label
    low, top = min(ids, default=0), max(ids, default=-1)
    if top >= count and not (low >= 1 and top == count):
        raise SystemExit(f"{name_or_dir}: class id {top} in {label_col!r}, but {names_file} names {count} classes "
                         f"(ids 0 to {count - 1}, or 1 to {count}): give the right names with --classnames")
    if top == count:  # counted from 1
        ds = ds.map(lambda labels: {label_col: [lab - 1 if lab is not None and lab > 0 else lab for lab in labels]},
                    batched=True, input_columns=label_col)
    if notes:
        print(f"{name_or_dir}: the class names of its ids {'1' if top == count else '0'} to {top} from {names_file}",
              file=sys.stderr)
    return ds, [str(i) for i in range(count)]


@torch.no_grad()
def zeroshot_classification(model, name_or_dir, cfg, device, autocast, templates=None, split=None, batch_size=256,
                            num_workers=2, classnames_file=None, max_samples=None, label_column=None, notes=True,
                            rank=0, world=1, labels_file=None):
    """Top-1 and top-5 accuracy on a classification set. world > 1 (training under DDP): each rank scores every
    world-th image, and every rank gets the totals."""
    try:
        ds, image_col, label_col, classnames = load_classification(name_or_dir, split, classnames_file, label_column,
                                                                   notes, labels_file)
        failed = None
    except (Exception, SystemExit) as e:
        failed = e
    if world > 1:  # a set that one rank cannot read (a node without it) is dropped by all, or they would wait
        anywhere = torch.tensor([failed is not None], dtype=torch.int32, device=device)
        dist.all_reduce(anywhere, op=dist.ReduceOp.MAX)
        failed = failed or (RuntimeError("another rank could not read it") if anywhere.item() else None)
    if failed is not None:
        raise failed
    if max_samples and len(ds) > max_samples:
        # a quick look: a random subset, the same each run (a folder's images come class by class)
        keep = sorted(np.random.default_rng(0).choice(len(ds), max_samples, replace=False).tolist())
        ds = ds.select(keep) if hasattr(ds, "select") else [ds[i] for i in keep]
    own = beside_set(name_or_dir, SET_TEMPLATES) if templates is None else None
    if own:  # the set's own prompts, as clip_benchmark's sets keep them
        templates = read_lines(own, "the templates file")
        if notes:
            print(f"{name_or_dir}: its own {len(templates)} prompt templates (evaluate.py --templates gives others)",
                  file=sys.stderr)
    tokenizer = Tokenizer(cfg.encoding, cfg.context_length)
    weights = class_embeddings(model, tokenizer, classnames, templates or DEFAULT_TEMPLATES, device, autocast)
    # decoding and cropping the images is most of the work (ImageNet's val set: 50k photos): worker processes,
    # where a file that does not decode is left out instead of ending the run
    collate = partial(labelled_batch, image_col=image_col, label_col=label_col, size=cfg.image_size)
    mine = ds if world == 1 else ds.select(range(rank, len(ds), world)) if hasattr(ds, "select") else ds[rank::world]
    ready = None  # batches each loader process keeps ready
    if num_workers:
        try:
            ready = room_for_loader_processes(num_workers, batch_size * 3 * cfg.image_size ** 2)
        except ValueError as e:
            raise SystemExit(str(e)) from e
    loader = torch.utils.data.DataLoader(mine, batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
                                         pin_memory=torch.device(device).type == "cuda", prefetch_factor=ready,
                                         worker_init_fn=ignore_sigterm)  # a SIGTERM is train.py's to handle
    hits, scored, unreadable = torch.zeros(2, dtype=torch.long, device=device), 0, 0  # hits: top-1, top-5
    # images and labels arrive on the device, the next batch copied while this one is embedded
    batches = tqdm(prefetch(loader, device), total=len(loader), desc=f"zero-shot {set_name(name_or_dir)}",
                   disable=True if rank != 0 else None)  # None: on a terminal, not in a job's log file
    for images, labels, bad in batches:
        if len(labels):
            with autocast:
                logits = model.encode_image(images).float() @ weights.T
            hits += topk_hits(logits, labels)  # on the device: no wait for it per batch
        scored, unreadable = scored + len(labels), unreadable + bad
    counts = torch.cat([hits, torch.tensor([scored, unreadable], device=device)])
    if world > 1:
        dist.all_reduce(counts)
    top1, top5, scored, unreadable = counts.tolist()
    if unreadable and rank == 0:
        print(f"warning: {unreadable} of {len(ds)} images in {name_or_dir} did not decode; scored without them",
              file=sys.stderr)
    return {"top1": top1 / max(scored, 1), "top5": top5 / max(scored, 1), "classes": len(classnames),
            "samples": scored, "unreadable": unreadable}


def zeroshot_tasks(image_emb, labels, tasks, model, cfg, device, autocast):
    """The prepared data's own tasks (manifest "tasks": label key, classes, templates) on its val images."""
    tokenizer = Tokenizer(cfg.encoding, cfg.context_length)
    out = {}
    for task, spec in tasks.items():
        keep = [i for i, lab in enumerate(labels) if lab and lab.get(spec["label"]) in spec["classes"]]
        if not keep:
            continue
        weights = class_embeddings(model, tokenizer, spec["classes"], spec["templates"], device, autocast)
        targets = torch.tensor([spec["classes"].index(labels[i][spec["label"]]) for i in keep], device=device)
        out[task] = topk_accuracy(image_emb[keep] @ weights.T, targets)
    return out

@torch.no_grad()
def match_images_to_texts(model, cfg, paths, texts, device, autocast, batch_size=256):
    """-> (the paths scored, their (images, texts) probabilities, {path: why it was left out}). Each image is
    scored against the given texts as the model was trained to score them: a softmax over the texts of the
    scaled cosine similarities (CLIP), or each pair's own sigmoid (SigLIP). Images go through the evaluation
    crop, upright by their EXIF orientation. A file that does not decode is left out, as evaluation leaves
    such files out everywhere: one broken photo does not stop a folder of thousands."""
    tokens = Tokenizer(cfg.encoding, cfg.context_length)(texts, trim=True).to(device)
    scored, probs, left_out = [], [], {}
    for i in range(0, len(paths), batch_size):  # a folder of thousands: a batch at a time
        arrays = []
        for path in paths[i:i + batch_size]:
            try:
                with Image.open(path) as image:
                    arrays.append(image_batch([image], cfg.image_size))
                scored.append(path)
            except Exception as e:  # PIL raises many types for bad files (and its own over its pixel limit)
                left_out[path] = str(e) or type(e).__name__
        if not arrays:
            continue
        with autocast:
            img, txt, scale, bias = model(torch.cat(arrays).to(device), tokens)  # the model's own temperature
        logits = scale.float() * img.float() @ txt.float().T
        probs.append(logits.softmax(dim=1) if bias is None else torch.sigmoid(logits + bias.float()))
    return scored, torch.cat(probs) if probs else torch.empty(0, len(texts)), left_out

# -----------------------------------------------------------------------------
# during training


class TrainingEvaluator:
    """What train.py runs at every evaluation, on every rank: the data's own zero-shot tasks (the shapes set)
    and retrieval on the val split, plus any zero-shot datasets named in --zeroshot."""

    def __init__(self, zeroshot, retrieval, data_dir, tasks, cfg, device, autocast, num_workers=2,
                 max_samples=5000, classnames_file=None, batch_size=256, labels_file=None):
        self.data_dir, self.cfg, self.device, self.autocast = data_dir, cfg, device, autocast
        self.batch_size = batch_size  # images per rank per forward pass
        self.classnames_file, self.labels_file = classnames_file, labels_file
        self.retrieval, self.max_samples, self.num_workers = retrieval, max_samples, num_workers
        self.tasks = tasks if zeroshot != "none" else {}
        self.datasets = [] if zeroshot in ("auto", "none") else data_dirs(zeroshot)
        self.has_val = bool(data_dir and shard_paths(data_dir, "val"))
        self.evaluated = set()  # the sets whose notes (unlabelled rows, several class columns) have been shown
        self.val_loader = None  # made at the first evaluation, and kept: indexing 100k val samples takes a second

    def __call__(self, model):
        """Under DDP every rank calls it: each embeds its share of the images, and every rank gets the figures."""
        out = {}
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        if self.has_val and (self.tasks or self.retrieval):
            if self.val_loader is None:
                self.val_loader = shards_to_embed(self.data_dir, "val", self.cfg, self.device, self.batch_size,
                                                  self.num_workers, rank, world)
            img, txt, labels, text_image = embed_loader(model, self.val_loader, self.cfg, self.device, self.autocast,
                                                        self.max_samples)
            for task, acc in zeroshot_tasks(img, labels, self.tasks, model, self.cfg, self.device, self.autocast).items():
                out.update({f"zeroshot/{task}/{k}": v for k, v in acc.items()})
            if self.retrieval:
                out.update({f"retrieval/{k}": v for k, v in recall_at_k(img, txt, text_image).items()})
        for name in list(self.datasets):
            try:
                acc = zeroshot_classification(model, name, self.cfg, self.device, self.autocast,
                                              batch_size=self.batch_size, num_workers=self.num_workers,
                                              classnames_file=self.classnames_file, labels_file=self.labels_file,
                                              notes=name not in self.evaluated and rank == 0, rank=rank, world=world)
            except (Exception, SystemExit) as e:  # a dataset out of reach must not end hours of training
                if rank == 0:
                    print(f"warning: zero-shot on {name} failed and is dropped for this run: {e}", file=sys.stderr)
                self.datasets.remove(name)
                continue
            self.evaluated.add(name)
            out.update({f"zeroshot/{set_name(name)}/{k}": acc[k] for k in ("top1", "top5")})
        return out

# -----------------------------------------------------------------------------
# standalone


def load_model(path, device):
    """A checkpoint's model, in eval mode, and its CLIPConfig. A run directory means its best.pt (the lowest
    val loss), else its newest checkpoint (a run with no val split keeps no best.pt)."""
    state, _ = load_run(path, best=True)
    cfg = CLIPConfig(**state["model_config"])
    model = CLIP(cfg)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg


def print_table(results, prefix=""):
    """One row per figure; nested results (the shapes set's tasks) as task/metric."""
    if not prefix:
        print(f"{'metric':<40} {'value':>8}")
    for key, value in results.items():
        if isinstance(value, dict):
            print_table(value, f"{prefix}{key}/")
        elif isinstance(value, float):
            print(f"{prefix + key:<40} {100 * value:>7.2f}%")
        else:
            print(f"{prefix + key:<40} {value:>8}")


def unprepared_hint(paths):
    """What to run where --retrieval names data that prep_dataset.py has not made into shards (a `datasets` set, a
    table of pairs, a folder of them): the evaluation set it can make of them, all in val/."""
    try:
        not_a_missing_folder(paths)
    except FileNotFoundError:
        return ""  # a local folder that is not there: the error said so, and nothing can be made of it
    if "," in paths:
        return ""
    source = ("table" if os.path.isfile(paths) else
              "folder" if os.path.isdir(paths) and any(os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
                                                       for _, _, files in os.walk(paths) for f in files) else "hub")
    out = os.path.join("data", os.path.splitext(os.path.basename(os.path.normpath(paths)))[0] + "-eval")
    return (f"\n--retrieval reads shards that prep_dataset.py wrote. To score {paths}, make an evaluation set of it "
            f"first (every sample in val/), then give that:\n  python prep_dataset.py --source {source} --input {paths}"
            f"{' --split test' if source == 'hub' else ''} --val_fraction 1 --out_dir {out}\n"
            f"  python evaluate.py CHECKPOINT --retrieval {out}")


def shards_or_exit(parser, *args, **kwargs):
    """embed_shards, with a missing or empty shard folder reported as a usage error, not a traceback."""
    try:
        return embed_shards(*args, **kwargs)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # type=expanduser: `~` where the shell leaves it, after an = (--json=~/results.json)
    p.add_argument("checkpoint", type=os.path.expanduser,
                   help="a .pt file, or a run directory: its best.pt, else its newest checkpoint")
    p.add_argument("--zeroshot", default=None, type=expand_home, help="an imagefolder dir, a hub dataset name, or a "
                   "prepared dataset dir whose manifest has tasks (the shapes set); several sets, comma-separated")
    p.add_argument("--split", default=None, help="split for --zeroshot: a `datasets` split (default: test, else "
                   "validation), or a folder's split folder (default: the first of test, val, valid, validation, "
                   "train it has)")
    p.add_argument("--classnames", default=None, type=os.path.expanduser, help="a file naming the classes for the "
                   "prompts: 'FOLDER NAME' lines (ImageNet's LOC_synset_mapping.txt) or one name per class, in order; "
                   "or the same as JSON (Keras' imagenet_class_index.json)")
    p.add_argument("--label_column", default=None, help="the class column of a `datasets` set that has several "
                   "(default: the one named label, else the first)")
    p.add_argument("--labels", default=None, type=os.path.expanduser, help="for a --zeroshot folder of images without "
                   "class folders: a CSV or TSV of (image file or name, class) rows, such as Kaggle's ImageNet "
                   "LOC_val_solution.csv")
    p.add_argument("--templates", nargs="+", default=None,
                   help="prompt templates with {} (or {c}) for the class name, or a file with one per line "
                   "(default: the set's own zeroshot_classification_templates.txt, else a few of the CLIP paper's)")
    p.add_argument("--retrieval", default=None, type=expand_home, help="a folder of shards (or a prepared dataset: its "
                   "val split); several, comma-separated")
    p.add_argument("--max_samples", type=int, default=None, help="cap on retrieval samples and zero-shot images (a "
                   "random subset of them, the same each run; default: all)")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--num_workers", type=int, default=default_num_workers(),
                   help="image decoding processes (default: this machine's cores, less one)")
    p.add_argument("--json", default=None, type=os.path.expanduser,
                   help="write the results here as a JSON object (a folder: its results.json)")
    p.add_argument("--images", nargs="+", default=None, type=os.path.expanduser,
                   help="image files (or folders of them, searched through) to match against --texts")
    p.add_argument("--texts", nargs="+", default=None, help="candidate captions for --images, or a file with one "
                   "per line")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else
                   "mps" if torch.backends.mps.is_available() else "cpu",
                   help="as train.py picks it: cuda, else Apple's mps, else cpu (cuda:1, say, for another GPU)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 on GPUs with bf16 tensor cores, fp16 on older ones with fp16 tensor cores, fp32 "
                   "elsewhere; as train.py --precision (bf16 suits CPUs with bf16 units too)")
    args = p.parse_args(argv)
    if not args.zeroshot and not args.retrieval and not args.images:
        p.error("nothing to do: give --zeroshot DIR_OR_NAME, --retrieval SHARDS_DIR, or --images FILES --texts TEXTS")
    if bool(args.images) != bool(args.texts):
        p.error("--images and --texts go together: the images are scored against the texts")
    for name in ("split", "classnames", "label_column", "labels", "templates"):  # said, not ignored
        if getattr(args, name) is not None and not args.zeroshot:
            p.error(f"--{name} is for --zeroshot: give the classification set with --zeroshot")
    if args.json and (os.path.isdir(args.json) or args.json.endswith(("/", os.sep))):  # --json results/: a file in it
        args.json = os.path.join(args.json, "results.json")
    if args.json:  # results/zeroshot.json: its folder is made and written into now, so the results are not lost
        why = writable_folder(os.path.dirname(os.path.abspath(args.json)), "its folder")
        if why:
            p.error(f"--json {args.json}: {why}")
    for name, ok, what in (("batch_size", args.batch_size >= 1, "at least 1"),
                           ("max_samples", args.max_samples is None or args.max_samples >= 1, "at least 1"),
                           ("num_workers", args.num_workers >= 0, "0 (decode in this process) or more")):
        if not ok:
            p.error(f"--{name} {getattr(args, name)}: must be {what}")
    images = []
    for path in args.images or []:  # files, or folders of them (and of folders of them)
        if os.path.isdir(path):
            images += image_files(path)
        elif os.path.isfile(path):
            images.append(path)
        else:
            p.error(f"--images: no file or folder {path}")
    if args.images and not images:
        p.error(f"--images: no image files in {' '.join(args.images)}")
    templates = args.templates
    if templates and len(templates) == 1 and os.path.isfile(templates[0]):
        templates = read_lines(templates[0], "--templates")
    if args.classnames and not os.path.isfile(args.classnames):
        p.error(f"--classnames {args.classnames}: no such file")
    if args.texts and len(args.texts) == 1 and os.path.isfile(args.texts[0]):
        args.texts = read_lines(args.texts[0], "--texts")
    rank, world, own_group = 0, 1, False
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # under torchrun: each process scores its share of the images
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if torch.device(args.device).type == "cuda":
            args.device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
            torch.cuda.set_device(torch.device(args.device))
        if not dist.is_initialized():  # else: called from a program that has its process group already
            dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
            own_group = True
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)  # a device torch cannot use fails here, with torch's reason
    except (RuntimeError, AssertionError) as e:
        p.error(f"--device {args.device}: {e}")
    # imported here: train.py imports this file as it runs, and a top-level import of train would load a
    # second copy of train.py beside its __main__
    from train import precision_context
    try:
        _, autocast = precision_context(args.precision, device)
    except ValueError as e:
        p.error(str(e))
    try:
        model, cfg = load_model(args.checkpoint, device)
        get_encoding(cfg.encoding)  # the checkpoint's tokenizer, which may need a download
    except (CheckpointError, RuntimeError) as e:
        p.error(str(e))
    results = {}
    if args.zeroshot:
        manifest_path = os.path.join(args.zeroshot, "manifest.json")
        tasks = {}
        if os.path.isfile(manifest_path):
            try:
                tasks = read_json_object(manifest_path).get("tasks", {})
            except (OSError, ValueError) as e:  # edited by hand, or another tool's
                p.error(f"{manifest_path} cannot be read ({e}): prepare {args.zeroshot} again with prep_dataset.py")
            if not tasks:  # its train/ and val/ folders are not classes
                p.error(f"{args.zeroshot} is a prepared dataset with no zero-shot tasks (only the shapes set has "
                        f"them): use --retrieval {args.zeroshot}, or give --zeroshot a folder of class folders")
        if tasks:  # the prepared set's own tasks (the shapes set's), on its val split (or --split's)
            for name in ("classnames", "label_column", "labels"):  # said, not ignored
                if getattr(args, name) is not None:
                    p.error(f"--{name} is for class folders and `datasets` sets: {args.zeroshot} holds its own tasks, "
                            "which name their classes")
            if templates:  # other prompts for its tasks' classes
                tasks = {task: {**spec, "templates": templates} for task, spec in tasks.items()}
            img, _, labels, _ = shards_or_exit(p, model, args.zeroshot, args.split or "val", cfg, device, autocast,
                                               args.max_samples, batch_size=args.batch_size,
                                               num_workers=args.num_workers, rank=rank, world=world)
            per_task = zeroshot_tasks(img, labels, tasks, model, cfg, device, autocast)
            results["zeroshot"] = per_task
            for k in ("top1", "top5"):  # the headline figure: the mean over the tasks
                results[k] = sum(t[k] for t in per_task.values()) / len(per_task)
        else:  # one set, or several, comma-separated (as train.py --zeroshot takes them): each its own results
            names = data_dirs(args.zeroshot)
            for name in names:
                acc = zeroshot_classification(model, name, cfg, device, autocast, templates, args.split,
                                              args.batch_size, args.num_workers, args.classnames, args.max_samples,
                                              args.label_column, notes=rank == 0, rank=rank, world=world,
                                              labels_file=args.labels)
                if len(names) == 1:
                    results.update(acc)
                else:
                    results.setdefault("zeroshot", {})[set_name(name)] = acc
    if args.images and rank == 0:  # a few files, scored by one process
        scored, probs, left_out = match_images_to_texts(model, cfg, images, args.texts, device, autocast,
                                                        args.batch_size)
        if not scored:  # PIL cannot (or will not) read any of them
            p.error(f"--images: {next(iter(left_out.values()))}" if len(left_out) == 1 else
                    f"--images: none of the {len(left_out)} files decodes as an image (the first: "
                    f"{next(iter(left_out.values()))})")
        for path, why in list(left_out.items())[:10]:
            print(f"warning: left out {path}: {why}", file=sys.stderr)
        if len(left_out) > 10:
            print(f"warning: left out {len(left_out) - 10} more files that do not decode", file=sys.stderr)
        results["images"] = {path: dict(zip(args.texts, row.tolist())) for path, row in zip(scored, probs)}
        results["images_left_out"] = left_out
        for path, scores in results["images"].items():
            print(path)
            for text, prob in sorted(scores.items(), key=lambda kv: -kv[1]):
                print(f"  {100 * prob:6.2f}%  {text}")
    if args.retrieval:
        try:
            data_dir, split = shard_split(args.retrieval)
        except (FileNotFoundError, ValueError) as e:
            p.error(f"{e}{unprepared_hint(args.retrieval)}")
        if not any(shard_paths(data_dir, s) for s in ("train", split)):  # no prepared set: how to make one
            p.error(f"no shards in {', '.join(os.path.join(d, split) for d in data_dirs(data_dir))}"
                    f"{unprepared_hint(args.retrieval)}")
        img, txt, _, text_image = shards_or_exit(p, model, data_dir, split, cfg, device, autocast, args.max_samples,
                                                 args.batch_size, args.num_workers, rank, world)
        if len(img) < 2:  # among one image its caption is always found: R@1 = 1, whatever the model
            p.error(f"--retrieval {args.retrieval}: {len(img)} image{'s' * (len(img) != 1)} to search among; retrieval "
                    "needs two or more")
        results.update(recall_at_k(img, txt, text_image))
        results["retrieval_samples"], results["retrieval_captions"] = len(img), len(txt)
    if own_group:
        dist.destroy_process_group()
    if rank != 0:  # every process has the figures; one shows them
        return results
    table = {k: v for k, v in results.items() if k not in ("images", "images_left_out")}  # printed above
    if "zeroshot" in results and "top1" in results:  # the shapes set's headline: said to be the tasks' mean
        table = {("mean of the tasks/" + k if k in ("top1", "top5") else k): v for k, v in table.items()}
    if table:
        print_table(table)
    if args.json:  # whole or not at all: an earlier file of results is never left half overwritten
        try:
            atomic_write(args.json, json.dumps(results, indent=2).encode())
        except OSError as e:
            sys.exit(f"could not write --json {args.json} ({e.strerror or e}); the results are in the table above")
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
