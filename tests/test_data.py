import csv
import errno
import glob
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import dataloader
import prep_dataset
from clip import CLIP, Tokenizer, get_config
from dataloader import ShardLoader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def jpeg(color, size=(48, 40)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


def write_tar(path, members):
    """members: [(name, bytes)] in order."""
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def tar_samples(path):
    """An independent reader: tarfile + PIL -> {key: (image, caption)}."""
    out = {}
    with tarfile.open(path) as tf:
        files = {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}
    for name, data in files.items():
        key, ext = name.split(".", 1)
        if ext == "jpg":
            out[key] = (Image.open(io.BytesIO(data)).convert("RGB"), files[key + ".txt"].decode())
    return out


def make_caption_shards(root, n, shard_size, image_size, split="train"):
    """Shards whose captions name their sample ('sample 17'), so a batch's tokens say which samples it holds."""
    os.makedirs(os.path.join(root, split), exist_ok=True)
    for s in range(0, n, shard_size):
        members = []
        for i in range(s, min(n, s + shard_size)):
            members += [(f"{i:06d}.jpg", jpeg((i % 256, (7 * i) % 256, 90), (image_size, image_size))),
                        (f"{i:06d}.txt", f"sample {i}".encode())]
        write_tar(os.path.join(root, split, f"shard-{s // shard_size:04d}.tar"), members)


def sample_ids(tokens, tok):
    return [int(tok.decode(t).split()[1]) for t in tokens]

# ---------------------------------------------------------------------------- prep_dataset.py


def test_shapes_prep_manifest_labels_and_independent_readers(tmp_path):
    out = tmp_path / "shapes"
    m = prep_dataset.main(["--source", "shapes", "--out_dir", str(out), "--limit", "400", "--shard_size", "100",
                           "--val_fraction", "0.1", "--num_workers", "2"])
    assert m["counts"] == {"train": 360, "val": 40, "skipped": 0, "merged": 0, "seen": 400}
    assert m["image_size"] == 64 and m["source"] == "shapes" and m["seed"] == 0
    assert m["tasks"]["shape"]["classes"] == prep_dataset.SHAPES
    assert m["tasks"]["color"]["classes"] == list(prep_dataset.COLORS)
    assert "a small red {} in the top left" in m["tasks"]["shape"]["templates"]
    with open(out / "manifest.json") as f:
        assert json.load(f)["counts"] == m["counts"]
    shards = sorted(glob.glob(str(out / "train" / "*.tar")))
    assert len(shards) == 4 and not glob.glob(str(out / "**" / "*.tmp"), recursive=True)
    assert not os.path.exists(out / ".stage")
    seen = {}
    for path in shards + sorted(glob.glob(str(out / "val" / "*.tar"))):
        seen.update(tar_samples(path))
    assert len(seen) == 400
    img, caption = seen["000000007"]
    assert img.size == (64, 64)
    assert caption == prep_dataset.shapes_sample(0, 7)[0]
    # the shards read as they are with the webdataset package, labels included
    import webdataset as wds
    ds = wds.WebDataset(shards, shardshuffle=False, empty_check=False).decode("pil").to_tuple("__key__", "jpg", "txt", "json")
    rows = list(ds)
    assert len(rows) == 360
    key, img, caption, labels = rows[0]
    assert img.size == (64, 64) and caption == prep_dataset.shapes_sample(0, int(key))[0]
    assert labels == prep_dataset.shapes_sample(0, int(key))[1]


def test_shapes_are_deterministic_and_captions_match_pixels():
    a, b = prep_dataset.render_shape(3, 11, 64), prep_dataset.render_shape(3, 11, 64)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    # the shape's colour is where the caption says it is
    for i in range(20):
        caption, labels = prep_dataset.shapes_sample(1, i)
        assert labels["color"] in caption and labels["shape"] in caption
        img = np.asarray(prep_dataset.render_shape(1, i, 64)).astype(int)
        target = np.array(prep_dataset.COLORS[labels["color"]])
        close = (np.abs(img - target).sum(-1) < 80).nonzero()
        assert len(close[0]) > 10
        cy, cx = close[0].mean(), close[1].mean()
        expect = {"top left": (16, 16), "top right": (16, 48), "bottom left": (48, 16),
                  "bottom right": (48, 48), "center": (32, 32)}[labels["position"]]
        assert abs(cy - expect[0]) < 10 and abs(cx - expect[1]) < 10, (caption, cy, cx)


def test_global_shuffle_spreads_the_input_over_all_shards(tmp_path):
    prep_dataset.main(["--source", "shapes", "--out_dir", str(tmp_path), "--limit", "1000",
                       "--shard_size", "100", "--val_fraction", "0", "--num_workers", "2"])
    keys = sorted(int(k) for k in tar_samples(tmp_path / "train" / "shard-000000.tar"))
    assert len(keys) == 100
    assert keys[-1] - keys[0] > 500, "a shard must not be a contiguous run of the input"
    assert sum(b - a == 1 for a, b in zip(keys, keys[1:])) < 50


def test_text_to_image_2m_format_through_datasets(tmp_path):
    # the exact sample format of jackyhate/text-to-image-2M: KEY.jpg + KEY.json with "prompt", read through
    # the same datasets.load_dataset("webdataset", streaming=True) call that reads the hub
    src = tmp_path / "src"
    src.mkdir()
    for s in range(2):
        members = []
        for i in range(10):
            key = f"{s}{i:05d}"
            image = b"not a jpeg at all" if i == 3 else jpeg((20 * i, 100, 50 + 100 * s), (512, 512))
            prompt = "" if i == 5 else f"photo number {s}-{i}, " + "long words " * (200 if i == 7 else 1)
            prompt = f"photo number {s}-8,\nin two lines\n" if i == 8 else prompt
            members += [(key + ".jpg", image), (key + ".json", json.dumps({"prompt": prompt, "w": 512}).encode())]
        write_tar(src / f"data_{s:06d}.tar", members)
    out = tmp_path / "out"
    m = prep_dataset.main(["--input", str(src / "*.tar"), "--out_dir", str(out), "--image_size", "64",
                           "--val_fraction", "0.25", "--num_workers", "2"])
    assert m["source"] == "text-to-image-2M"
    assert m["skipped"] == {"bad_image": 2, "empty_caption": 2}
    assert m["counts"] == {"train": 12, "val": 4, "skipped": 4, "merged": 0, "seen": 20}
    samples = {}
    for path in glob.glob(str(out / "*" / "*.tar")):
        samples.update(tar_samples(path))
    captions = sorted(c for _, c in samples.values())
    assert any(c.startswith("photo number 1-7") and len(c) > 2000 for c in captions)  # long captions are kept
    # a prompt's line breaks are spaces: it is one caption, not two for the loader to choose from
    assert {"photo number 0-8, in two lines", "photo number 1-8, in two lines"} <= set(captions)
    assert all(img.size == (64, 64) for img, _ in samples.values())
    # local copies named by their folder, or by a range, read the same
    for name, given in (("by_folder", src), ("by_range", src / "data_{000000..000001}.tar")):
        again = prep_dataset.main(["--input", str(given), "--out_dir", str(tmp_path / name), "--image_size", "64",
                                   "--val_fraction", "0.25", "--num_workers", "2"])
        assert again["counts"] == m["counts"]
    # --caption_column: another field of the .json records
    m = prep_dataset.main(["--input", str(src / "*.tar"), "--out_dir", str(tmp_path / "w"), "--image_size", "64",
                           "--val_fraction", "0", "--num_workers", "2", "--caption_column", "w"])
    assert m["skipped"] == {"bad_image": 2} and m["settings"]["caption_column"] == "w"
    assert {c for path in glob.glob(str(tmp_path / "w" / "*" / "*.tar")) for _, c in tar_samples(path).values()} == {"512"}
    # a copy in another webdataset layout (KEY.png + KEY.txt) reads as well
    other = tmp_path / "other"
    other.mkdir()
    greens = [io.BytesIO() for _ in range(3)]
    for i, buf in enumerate(greens):
        Image.new("RGB", (80, 60), (0, 200 + 20 * i, 0)).save(buf, "PNG")
    write_tar(other / "data_000000.tar", [(f"k{i}.{ext}", data) for i in range(3)
                                          for ext, data in (("png", greens[i].getvalue()),
                                                            ("txt", f"green {i}{chr(10) + 'bright green' if i == 2 else ''}".encode()))])
    m = prep_dataset.main(["--input", str(other / "*.tar"), "--out_dir", str(tmp_path / "other_out"), "--image_size", "32",
                           "--val_fraction", "0", "--num_workers", "1"])
    got = tar_samples(tmp_path / "other_out" / "train" / "shard-000000.tar").values()
    assert sorted(c for _, c in got) == ["green 0", "green 1", "green 2\nbright green"]  # a .txt's lines: captions
    assert all(np.asarray(img)[..., 1].mean() > 180 for img, _ in got)
    # files that cannot be opened (offline, a wrong glob) stop with what to check, before anything is written
    with pytest.raises(SystemExit, match="could not open .*give local copies with --input"):
        prep_dataset.main(["--input", str(tmp_path / "missing" / "*.tar"), "--out_dir", str(tmp_path / "none")])
    assert not (tmp_path / "none").exists()



def interrupted_at(chunk_file):
    """prep's atomic_write, stopped by a Ctrl-C as it is to write chunk_file: an interrupted run."""
    write = prep_dataset.atomic_write

    def atomic_write(path, data):
        if path.endswith(chunk_file):
            raise KeyboardInterrupt
        write(path, data)
    return atomic_write


@pytest.mark.parametrize("source", ["text-to-image-2M", "webdataset"])
def test_a_streamed_source_resumes_where_it_stopped_without_reading_again(tmp_path, monkeypatch, source):
    # the full set streams ~420 GB, and shards given as URLs are downloaded: a rerun after an interrupt goes on
    # where the finished chunks end in the stream, and does not read again what they hold
    src = tmp_path / "src"
    src.mkdir()
    for s, n in ((0, 8), (1, 4), (2, 4)):
        write_tar(src / f"data_{s:06d}.tar", [m for i in range(n) for m in (
            (f"{s}{i:05d}.jpg", jpeg((60 * s, 20 * i, 90))), (f"{s}{i:05d}.json", json.dumps({"prompt": f"{s}-{i}"}).encode()))])
    args = ["--source", source, "--input", str(src / "*.tar"), "--image_size", "32", "--chunk_size", "5",
            "--shard_size", "5", "--val_fraction", "0.25", "--num_workers", "1"]
    prep_dataset.main(args + ["--out_dir", str(tmp_path / "ref")])
    write = prep_dataset.atomic_write
    if source == "text-to-image-2M":  # a network that stays down, hours into the stream: said, and a rerun goes on
        def network_down(path, data):
            if path.endswith("chunk-000002.json"):
                raise ConnectionError(104, "Connection reset by peer")  # what requests' errors are too: an OSError
            write(path, data)
        monkeypatch.setattr(prep_dataset, "atomic_write", network_down)
        with pytest.raises(SystemExit, match=r"stopped while reading the source \(ConnectionError: .*Connection reset by "
                                             r"peer\). The 2 finished chunks are kept: rerun the same command"):
            prep_dataset.main(args + ["--out_dir", str(tmp_path / "net")])
        monkeypatch.undo()
        prep_dataset.main(args + ["--out_dir", str(tmp_path / "net")])
        for path in glob.glob(str(tmp_path / "ref" / "*" / "*.tar")):
            assert (tmp_path / "net" / os.path.relpath(path, tmp_path / "ref")).read_bytes() == open(path, "rb").read()

    monkeypatch.setattr(prep_dataset, "atomic_write", interrupted_at("chunk-000002.json"))  # at the third chunk
    with pytest.raises(KeyboardInterrupt):
        prep_dataset.main(args + ["--out_dir", str(tmp_path / "out")])
    monkeypatch.undo()
    # the two finished chunks hold the first tar whole: damage it after the few samples that datasets reads
    # to learn the columns, so that reading it again would lose its last two samples
    with tarfile.open(src / "data_000000.tar") as tf:
        cut = tf.getmember("000006.jpg").offset
    with open(src / "data_000000.tar", "r+b") as f:
        f.seek(cut)
        f.write(b"\xff" * 2048)
    if source == "webdataset":  # the first shard, which the finished chunks hold, gone: found by its name, the
        os.remove(src / "data_000000.tar")  # shard where the run stopped is still the second of the three
    prep_dataset.main(args + ["--out_dir", str(tmp_path / "out")])
    ref = sorted(glob.glob(str(tmp_path / "ref" / "*" / "*.tar")))
    assert len(ref) == 4
    for path in ref:
        assert (tmp_path / "out" / os.path.relpath(path, tmp_path / "ref")).read_bytes() == open(path, "rb").read()
    if source == "webdataset":  # the shard where a run stopped gone: said, rather than guessed
        monkeypatch.setattr(prep_dataset, "atomic_write", interrupted_at("chunk-000001.json"))
        with pytest.raises(KeyboardInterrupt):  # its first chunk ends inside the now second shard
            prep_dataset.main(args + ["--out_dir", str(tmp_path / "again")])
        monkeypatch.undo()
        os.remove(src / "data_000002.tar")
        with pytest.raises(SystemExit, match="data_000002.tar, where the interrupted run stopped, is no longer among"):
            prep_dataset.main(args + ["--out_dir", str(tmp_path / "again")])


def test_a_subset_of_text_to_image_2m_takes_a_share_of_every_file_and_resumes(tmp_path, monkeypatch):
    # --limit N takes about N / files samples of each tar file in turn, not the first N of the first file (the
    # hub's files hold ~100k samples each); an interrupted subset goes on where it stopped, to the same shards
    src = tmp_path / "src"
    src.mkdir()
    for s, n in ((0, 8), (1, 4), (2, 4)):
        write_tar(src / f"data_{s:06d}.tar", [m for i in range(n) for m in (
            (f"{s}{i:05d}.jpg", jpeg((60 * s, 20 * i, 90))), (f"{s}{i:05d}.json", json.dumps({"prompt": f"{s}-{i}"}).encode()))])
    args = ["--input", str(src / "*.tar"), "--image_size", "32", "--chunk_size", "3", "--shard_size", "3",
            "--val_fraction", "0", "--num_workers", "1", "--limit", "9"]
    m = prep_dataset.main(args + ["--out_dir", str(tmp_path / "ref")])
    ref = sorted(glob.glob(str(tmp_path / "ref" / "train" / "*.tar")))
    captions = sorted(c for path in ref for _, c in tar_samples(path).values())
    assert m["counts"]["train"] == 9 and captions == sorted(f"{s}-{i}" for s in range(3) for i in range(3))
    monkeypatch.setattr(prep_dataset, "atomic_write", interrupted_at("chunk-000001.json"))
    with pytest.raises(KeyboardInterrupt):
        prep_dataset.main(args + ["--out_dir", str(tmp_path / "out")])
    monkeypatch.undo()
    prep_dataset.main(args + ["--out_dir", str(tmp_path / "out")])
    for path in ref:
        assert (tmp_path / "out" / os.path.relpath(path, tmp_path / "ref")).read_bytes() == open(path, "rb").read()


def folder_captions(src, out, *flags):
    """prep_dataset.py --source folder on src, into one small train shard -> its captions."""
    prep_dataset.main(["--source", "folder", "--input", str(src), "--out_dir", str(out), "--image_size", "32",
                       "--val_fraction", "0", "--num_workers", "1", *flags])
    return [c for _, c in tar_samples(out / "train" / "shard-000000.tar").values()]


def test_folder_source_pairs_by_stem_and_skips_bad_input(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "c").mkdir()
    (src / "a" / "b" / "x.jpg").write_bytes(jpeg((255, 0, 0), (100, 60)))
    (src / "c" / "x.txt").write_text("a red thing\nsomething else red\n")
    Image.new("RGB", (30, 70), (0, 255, 0)).save(src / "a" / "y.png")
    (src / "y.txt").write_text("a green thing")
    (src / "a" / "z.jpg").write_bytes(jpeg((0, 0, 255)))  # no caption
    (src / "c" / "t.jpg").write_bytes(jpeg((0, 0, 255))[:200])  # truncated
    (src / "t.txt").write_text("truncated")
    (src / "u.jpg").write_bytes(jpeg((9, 9, 9)))
    (src / "u.txt").write_bytes(b"caf\xe9 au lait")  # not UTF-8: Windows' cp1252
    Image.new("RGB", (40, 40), (0, 0, 250)).save(src / "n.png")
    (src / "n.txt").write_text("a blue thing \u00e9", encoding="utf-16")  # Notepad's "Unicode": a byte-order mark says so
    (src / "e.jpg").write_bytes(jpeg((9, 9, 9)))
    (src / "e.txt").write_text("   \n")
    Image.fromarray(np.full((40, 40), 100 * 256, dtype=np.uint16)).save(src / "g.png")  # 16-bit greyscale
    (src / "g.txt").write_text("a grey thing")
    logo = np.zeros((40, 40, 4), dtype=np.uint8)  # transparent black, with an opaque red square inside
    logo[10:30, 10:30] = (255, 0, 0, 255)
    Image.fromarray(logo).save(src / "logo.png")
    (src / "logo.txt").write_text("a red logo")
    Image.new("RGB", (40, 40), (250, 250, 250)).save(src / "w.png")
    (src / "w.txt").write_bytes("\ufeffa white thing\r\nanother white\r\n".encode())  # as Windows' Notepad saves
    Image.new("RGB", (40, 40), (0, 250, 0)).save(src / "phone.avif")  # newer phones and sites save AVIF
    (src / "phone.txt").write_text("a green avif")
    (src / "k.jpg").write_bytes(jpeg((19, 9, 9)))
    (src / "k.caption").write_text("a kohya caption")  # kohya-ss's captions; beside a .txt, the .txt wins
    (src / "m.jpg").write_bytes(jpeg((29, 9, 9)))
    (src / "m.caption").write_text("not this one")
    (src / "m.txt").write_text("the txt caption")
    (src / "web.jpg").write_bytes(jpeg((39, 9, 9)))  # an alt text as the web serves it: escaped (twice), tabs
    (src / "web.txt").write_text("Tom &amp;amp; Jerry&#39;s\tcat  \n  from\u00a0 the&#10;web ")
    (src / "IMG_0001.HEIC").write_bytes(b"\0\0\0\x18ftypheic")  # a phone's photo, of a type PIL does not read
    (src / "IMG_0001.txt").write_text("a photo")
    # no data: a zip made on a Mac holds __MACOSX/ and ._x resource forks beside each file; hidden files
    for junk in ("__MACOSX/._y.png", "__MACOSX/._y.txt", "._w.png", "._w.txt", ".thumbs/w.png", ".thumbs/w.txt"):
        (src / junk).parent.mkdir(exist_ok=True)
        (src / junk).write_bytes(b"\x00\x05\x16\x07" + bytes(200))
    m = prep_dataset.main(["--source", "folder", "--input", str(src), "--out_dir", str(tmp_path / "out"),
                           "--image_size", "32", "--val_fraction", "0", "--num_workers", "1"])
    assert m["skipped"] == {"missing_caption": 1, "bad_image": 1, "caption_not_utf8": 1, "empty_caption": 1,
                            "unsupported_image_type": 1}
    assert "captions in another encoding than UTF-8: 1 (Windows' cp1252, say); convert them" in capsys.readouterr().out
    samples = tar_samples(tmp_path / "out" / "train" / "shard-000000.tar")
    by_caption = {c: img for img, c in samples.values()}
    assert set(by_caption) == {"a red thing\nsomething else red", "a green thing", "a grey thing", "a red logo",
                               "a white thing\nanother white", "a green avif", "a kohya caption", "the txt caption",
                               "Tom & Jerry's cat\nfrom the\nweb", "a blue thing \u00e9"}
    assert np.asarray(by_caption["a green avif"], dtype=float)[..., 1].mean() > 200
    logo = np.asarray(by_caption["a red logo"], dtype=float)
    assert logo[:4, :4].min() > 240 and logo[14:18, 14:18, 0].mean() > 240 and logo[14:18, 14:18, 1].mean() < 20
    assert np.abs(np.asarray(by_caption["a grey thing"], dtype=float) - 100).max() <= 2
    red = np.asarray(by_caption["a red thing\nsomething else red"])
    assert red.shape == (32, 32, 3) and red[..., 0].mean() > 200 and red[..., 1].mean() < 60
    # a folder with two kinds of caption files (kohya-ss's tags in .txt, prose in .caption): --caption_column picks
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "x.jpg").write_bytes(jpeg((9, 9, 9)))
    (tmp_path / "two" / "x.txt").write_text("grey, square, tag")
    (tmp_path / "two" / "x.caption").write_text("a grey square")
    assert folder_captions(tmp_path / "two", tmp_path / "two_out") == ["grey, square, tag"]
    assert folder_captions(tmp_path / "two", tmp_path / "two_caption", "--caption_column", "caption") == ["a grey square"]
    # a table given to the folder source: the source that reads it is named
    (tmp_path / "pairs.csv").write_text("image,caption\nx.jpg,a grey square\n")
    with pytest.raises(SystemExit, match=r"--source folder needs --input DIR.*read with --source table"):
        prep_dataset.main(["--source", "folder", "--input", str(tmp_path / "pairs.csv"), "--out_dir", str(tmp_path / "p")])
    (tmp_path / "pics.zip").write_bytes(b"PK\x05\x06" + bytes(18))  # an archive of the folder: unpack it first
    with pytest.raises(SystemExit, match=r"--source folder needs --input DIR.*unpack the archive"):
        prep_dataset.main(["--source", "folder", "--input", str(tmp_path / "pics.zip"), "--out_dir", str(tmp_path / "p")])
    # images whose captions are nowhere to be found: the error says how images and captions pair
    (tmp_path / "lone").mkdir()
    (tmp_path / "lone" / "a.jpg").write_bytes(jpeg((9, 9, 9)))
    (tmp_path / "lone" / "README.txt").write_text("not a caption")
    with pytest.raises(SystemExit, match=r"'missing_caption': 1.*the \.txt of the same name"):
        prep_dataset.main(["--source", "folder", "--input", str(tmp_path / "lone"), "--out_dir", str(tmp_path / "l")])
    # nothing but a phone's HEIC photos: the error says so, instead of finding no samples at all
    (tmp_path / "phone").mkdir()
    for i in range(3):
        (tmp_path / "phone" / f"IMG_000{i}.heic").write_bytes(b"\0\0\0\x18ftypheic")
        (tmp_path / "phone" / f"IMG_000{i}.txt").write_text("a photo")
    with pytest.raises(SystemExit, match=r"'unsupported_image_type': 3.*HEIC.*convert them to JPEG"):
        prep_dataset.main(["--source", "folder", "--input", str(tmp_path / "phone"), "--out_dir", str(tmp_path / "p")])



def test_folder_source_pairs_side_by_side_first_then_by_a_unique_stem(tmp_path):
    src = tmp_path / "src"
    # class folders that each hold 0001.jpg + 0001.txt: every image takes the caption beside it
    for name, rgb in (("cats", (250, 0, 0)), ("dogs", (0, 0, 250))):
        (src / name).mkdir(parents=True)
        (src / name / "0001.jpg").write_bytes(jpeg(rgb))
        (src / name / "0001.txt").write_text(f"one of the {name}")
    # images/ beside captions/: pairs by stem, unless a stem has two captions it could take
    (src / "images").mkdir()
    for sub in ("x", "y"):
        (src / "captions" / sub).mkdir(parents=True)
    (src / "images" / "k.jpg").write_bytes(jpeg((0, 250, 0)))
    (src / "captions" / "x" / "k.txt").write_text("a green k")
    (src / "images" / "m.jpg").write_bytes(jpeg((9, 9, 9)))
    (src / "captions" / "x" / "m.txt").write_text("m, or")
    (src / "captions" / "y" / "m.txt").write_text("the other m")
    # a linked folder (data on another disk) is read, and a link back up the tree is read once
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "far.jpg").write_bytes(jpeg((250, 120, 0)))
    (tmp_path / "elsewhere" / "far.txt").write_text("a far orange")
    (src / "linked").symlink_to(tmp_path / "elsewhere")
    (src / "cats" / "loop").symlink_to(src)
    m = prep_dataset.main(["--source", "folder", "--input", str(src), "--out_dir", str(tmp_path / "out"),
                           "--image_size", "32", "--val_fraction", "0", "--num_workers", "1"])
    assert m["skipped"] == {"ambiguous_caption": 1} and m["counts"]["train"] == 4
    colour = {c: np.asarray(img, dtype=float).mean(axis=(0, 1)).argmax()
              for img, c in tar_samples(tmp_path / "out" / "train" / "shard-000000.tar").values()}
    assert colour == {"one of the cats": 0, "one of the dogs": 2, "a green k": 1, "a far orange": 0}


def test_folder_source_reads_the_caption_of_a_json_record_beside_an_image(tmp_path):
    # what scrapers write beside each image: x.jpg + x.json with the caption among other metadata
    src = tmp_path / "src"
    src.mkdir()
    records = {"a": {"url": "https://example.com/a.jpg", "caption": "a red thing", "width": 48},
               "b": {"captions": ["one of two", "two of two"], "key": "b"},  # several captions
               "c": {"url": "https://example.com/c.jpg"},  # none
               "t": {"caption": "not this"}}  # beside a .txt, the .txt wins
    for i, (stem, record) in enumerate(records.items()):
        (src / f"{stem}.jpg").write_bytes(jpeg((250, 20 * i, 0)))
        (src / f"{stem}.json").write_text(json.dumps(record))
    (src / "t.txt").write_text("the txt caption")
    # named after the image's whole file name, as gallery-dl writes its metadata (x.png.json), or x.png.txt
    (src / "g.png").write_bytes(jpeg((0, 250, 0)))
    (src / "g.png.json").write_text(json.dumps({"category": "site", "description": "a green thing"}))
    (src / "h.png").write_bytes(jpeg((0, 0, 250)))
    (src / "h.png.txt").write_text("a blue thing")
    (src / "bad.jpg").write_bytes(jpeg((250, 0, 0)))
    (src / "bad.json").write_text("{cut short")
    (src / "captions_train.json").write_text(json.dumps({"annotations": []}))  # beside no image: not a caption
    m = prep_dataset.main(["--source", "folder", "--input", str(src), "--out_dir", str(tmp_path / "out"),
                           "--image_size", "32", "--val_fraction", "0", "--num_workers", "1"])
    assert m["skipped"] == {"missing_caption": 1, "bad_json": 1}
    captions = {c for _, c in tar_samples(tmp_path / "out" / "train" / "shard-000000.tar").values()}
    assert captions == {"a red thing", "one of two\ntwo of two", "the txt caption", "a green thing", "a blue thing"}
    # --caption_column names the field, where a record holds two
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "x.jpg").write_bytes(jpeg((9, 9, 9)))
    (tmp_path / "two" / "x.json").write_text(json.dumps({"caption": "grey", "long_caption": "a plain grey square"}))
    assert folder_captions(tmp_path / "two", tmp_path / "two_out") == ["grey"]
    assert folder_captions(tmp_path / "two", tmp_path / "two_long", "--caption_column", "long_caption") == ["a plain grey square"]
    # --caption_column json names the files, not a field: their caption-like field, as with none
    assert folder_captions(tmp_path / "two", tmp_path / "two_json", "--caption_column", "json") == ["grey"]
    # images whose captions a table lists, not files beside them: the error names the table and the source for it
    (tmp_path / "coco").mkdir()
    (tmp_path / "coco" / "000001.jpg").write_bytes(jpeg((9, 9, 9)))
    (tmp_path / "coco" / "captions_val.json").write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(SystemExit, match=r"holds images but no .txt captions.*captions_val.json.*--source table"):
        prep_dataset.main(["--source", "folder", "--input", str(tmp_path / "coco"), "--out_dir", str(tmp_path / "c")])
    # tables alone (a `datasets` Parquet export, images inside): the source that reads them
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "train-00000-of-00001.parquet").write_bytes(b"PAR1")
    with pytest.raises(SystemExit, match=r"holds no images, but tables \(.*train-00000-of-00001.parquet\): read them "
                                         r"with --source table --input .*export"):
        prep_dataset.main(["--source", "folder", "--input", str(tmp_path / "export"), "--out_dir", str(tmp_path / "e")])
    # --source hub with no set named: what to name
    with pytest.raises(SystemExit, match="--source hub needs --input NAME"):
        prep_dataset.main(["--source", "hub", "--out_dir", str(tmp_path / "h")])

def test_table_source_reads_csv_tsv_and_jsonl_pairs(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "imgs").mkdir(parents=True)
    for name, rgb in (("r", (250, 0, 0)), ("g", (0, 250, 0)), ("b", (0, 0, 250))):
        Image.new("RGB", (50, 40), rgb).save(src / "imgs" / f"{name}.png")
    elsewhere = tmp_path / "elsewhere.jpg"
    elsewhere.write_bytes(jpeg((250, 250, 250)))
    # OpenCLIP's CSV layout (filepath, title): relative and absolute paths, a quoted two-line caption (one caption,
    # as a cell holds it), a missing file, a URL that cannot be downloaded (counted), an empty caption
    with open(src / "pairs.csv", "w", newline="", encoding="utf-8-sig") as f:  # with a byte-order mark, as Excel writes
        f.write('filepath,title\nimgs/r.png,a red card\nimgs/g.png,"a green card\nanother green caption"\n'
                f"{elsewhere},a white card\nimgs/nope.png,lost\nhttp://127.0.0.1:1/x.jpg,a url\nimgs/b.png,\n")
    m = prep_dataset.main(["--source", "table", "--input", str(src / "pairs.csv"), "--out_dir", str(tmp_path / "csv"),
                           "--image_size", "32", "--val_fraction", "0", "--num_workers", "1"])
    assert m["skipped"] == {"missing_image": 1, "download_failed": 1, "empty_caption": 1}
    samples = tar_samples(tmp_path / "csv" / "train" / "shard-000000.tar")
    by_caption = {c: np.asarray(img, dtype=float) for img, c in samples.values()}
    assert set(by_caption) == {"a red card", "a green card another green caption", "a white card"}
    assert by_caption["a red card"][..., 0].mean() > 200 and by_caption["a red card"][..., 1].mean() < 40
    # TSV and JSON lines, with other column names, a list of captions, and columns named by flag
    (src / "pairs.tsv").write_text("Image\tCaption\nimgs/b.png\ta blue card\n")  # column names in any case
    m = prep_dataset.main(["--source", "table", "--input", str(src / "pairs.tsv"), "--out_dir", str(tmp_path / "tsv"),
                           "--image_size", "32", "--val_fraction", "0", "--num_workers", "1"])
    assert [c for _, c in tar_samples(tmp_path / "tsv" / "train" / "shard-000000.tar").values()] == ["a blue card"]
    # a list of captions written out as text: pandas' to_csv of a list column (Python's repr), or JSON
    with open(src / "lists.csv", "w", newline="") as f:
        csv.writer(f).writerows([("filepath", "captions"), ("imgs/r.png", str(["a red card", "a card that's red"])),
                                 ("imgs/g.png", json.dumps(["green", "also green"])), ("imgs/b.png", "[blue] card [HD]")])
    prep_dataset.main(["--source", "table", "--input", str(src / "lists.csv"), "--out_dir", str(tmp_path / "lists"),
                       "--image_size", "32", "--val_fraction", "0", "--num_workers", "1"])
    assert sorted(c for _, c in tar_samples(tmp_path / "lists" / "train" / "shard-000000.tar").values()) == [
        "[blue] card [HD]", "a red card\na card that's red", "green\nalso green"]
    # a JSON map of image files to their captions (captioning scripts), or to records (kohya-ss's meta_cap.json,
    # its images named without their extension)
    (src / "captions.json").write_text(json.dumps({"imgs/r.png": "red", "imgs/g.png": ["green", "also green"]}))
    (src / "meta_cap.json").write_text(json.dumps({"imgs/b": {"caption": "blue", "tags": "card, blue"}}))
    # rows written as JSON arrays, [image, caption], with or without a first row of column names
    (src / "arrays.json").write_text(json.dumps([["imgs/r.png", "red"], ["imgs/g.png", "green"]]))
    (src / "arrays.jsonl").write_text('["imgs/r.png", "red"]\n["imgs/g.png", "green"]\n')
    (src / "named.json").write_text(json.dumps([["caption", "image"], ["red", "imgs/r.png"], ["green", "imgs/g.png"]]))
    (src / "named.jsonl").write_text('["caption", "image"]\n["red", "imgs/r.png"]\n["green", "imgs/g.png"]\n')
    for table, captions in (("captions.json", ["green\nalso green", "red"]), ("meta_cap.json", ["blue"]),
                            *((t, ["green", "red"]) for t in ("arrays.json", "arrays.jsonl", "named.json",
                                                              "named.jsonl"))):
        m = prep_dataset.main(["--source", "table", "--input", str(src / table), "--out_dir", str(tmp_path / table),
                               "--image_size", "32", "--val_fraction", "0", "--num_workers", "1"])
        assert sorted(c for _, c in tar_samples(tmp_path / table / "train" / "shard-000000.tar").values()) == captions
        assert m["skipped"] == {}
    (src / "pairs.jsonl").write_text(json.dumps({"pic": "imgs/g.png", "alt": ["green", "also green"]}) + "\n")
    m = prep_dataset.main(["--source", "table", "--input", str(src / "pairs.jsonl"), "--out_dir", str(tmp_path / "jl"),
                           "--image_column", "pic", "--caption_column", "alt", "--image_size", "32",
                           "--val_fraction", "0", "--num_workers", "1"])
    assert [c for _, c in tar_samples(tmp_path / "jl" / "train" / "shard-000000.tar").values()] == ["green\nalso green"]
    # one row per caption (Flickr8k's captions.txt; Flickr30k's results.csv, bar-separated): an image is one
    # sample with all its rows' captions, wherever they sit in the table, so it never lands in train and val at once
    (src / "captions.txt").write_text("image,caption\nr.png,a red card\ng.png,a green card\nr.png,red paper\n"
                                      "g.png,green paper\nr.png,\n")
    (src / "results.csv").write_text("image_name| comment_number| comment\nb.png| 0| a blue card\nb.png| 1| blue paper\n")
    for table, captions in (("captions.txt", ["a red card\nred paper", "a green card\ngreen paper"]),
                            ("results.csv", ["a blue card\nblue paper"])):
        out = tmp_path / table.replace(".", "_")
        m = prep_dataset.main(["--source", "table", "--input", str(src / table), "--image_root", str(src / "imgs"),
                               "--out_dir", str(out), "--image_size", "32", "--val_fraction", "0.5", "--num_workers", "1"])
        got = [c for split in ("train", "val") for f in sorted(glob.glob(str(out / split / "*.tar")))
               for _, c in tar_samples(f).values()]
        assert sorted(got) == sorted(captions) and m["skipped"] == {}
    assert "5 rows name 2 image files; each file is one sample with its rows' captions" in capsys.readouterr().out
    # --limit counts images and passed-over rows (another split) in the table's order; an image keeps the
    # captions of its later rows
    (src / "split.csv").write_text("filepath,title,split\nimgs/r.png,red,train\nimgs/g.png,green,train\n"
                                   "imgs/b.png,blue,test\nimgs/r.png,more red,train\n")
    prep_dataset.main(["--source", "table", "--input", str(src / "split.csv"), "--out_dir", str(tmp_path / "limit"),
                       "--limit", "2", "--image_size", "32", "--val_fraction", "0", "--num_workers", "1"])
    assert sorted(c for _, c in tar_samples(tmp_path / "limit" / "train" / "shard-000000.tar").values()) == [
        "green", "red\nmore red"]
    # the columns read, guessed or named, are said as reading starts, with those left unread
    assert "images from column 'filepath', captions from 'title'; not read: split (others with --image_column" \
        in capsys.readouterr().out
    # a table written on another machine: its absolute and Windows paths are found under --image_root
    (src / "moved.csv").write_text("filepath,title\n/home/someone/data/imgs/g.png,green from linux\n"
                                   "C:\\Users\\someone\\imgs\\b.png,blue from windows\n/elsewhere/nope.png,lost\n")
    m = prep_dataset.main(["--source", "table", "--input", str(src / "moved.csv"), "--image_root", str(src),
                           "--out_dir", str(tmp_path / "moved"), "--image_size", "32", "--val_fraction", "0", "--num_workers", "1"])
    moved = {c: np.asarray(img, dtype=float).mean(axis=(0, 1)) for img, c in
             tar_samples(tmp_path / "moved" / "train" / "shard-000000.tar").values()}
    assert set(moved) == {"green from linux", "blue from windows"} and m["skipped"] == {"missing_image": 1}
    assert moved["green from linux"][1] > 200 and moved["blue from windows"][2] > 200
    # captions in several columns: numbered ones found as such (Flickr8k's caption_0 ...), or named by the flag
    (src / "numbered.jsonl").write_text(json.dumps({"image": "imgs/r.png", "Caption 10": "last", "caption_2": "",
                                                    "caption_1": "first", "caption_9": None, "id": 7}) + "\n")
    for flags, caption in (([], "first\nlast"), (["--caption_column", "caption_2, Caption 10"], "last")):
        out = tmp_path / f"numbered{len(flags)}"
        prep_dataset.main(["--source", "table", "--input", str(src / "numbered.jsonl"), "--out_dir", str(out),
                           "--image_size", "32", "--val_fraction", "0", "--num_workers", "1", *flags])
        assert [c for _, c in tar_samples(out / "train" / "shard-000000.tar").values()] == [caption]
    # a caption-like word joined to another (COCO sets' sentences_raw beside its tokens and ids): the one such column
    # that is no id, length or tokens is read; where several could be, the error names them
    (src / "raw.jsonl").write_text(json.dumps({"filepath": "imgs/g.png", "sentences_tokens": ["a", "green"],
                                               "sentences_raw": ["a green card", "green paper"], "sentences_sentid": [3, 4]}) + "\n")
    prep_dataset.main(["--source", "table", "--input", str(src / "raw.jsonl"), "--out_dir", str(tmp_path / "raw"),
                       "--image_size", "32", "--val_fraction", "0", "--num_workers", "1"])
    assert [c for _, c in tar_samples(tmp_path / "raw" / "train" / "shard-000000.tar").values()] == ["a green card\ngreen paper"]
    (src / "two_kinds.csv").write_text("filepath,vlm_caption,original_caption\nimgs/g.png,a long one,green\n")
    with pytest.raises(SystemExit, match=r"but several that may be \(vlm_caption, original_caption\): name one with "
                                         "--caption_column, or several"):
        prep_dataset.main(["--source", "table", "--input", str(src / "two_kinds.csv"), "--out_dir", str(tmp_path / "y"),
                           "--num_workers", "1"])
    with pytest.raises(SystemExit, match=r"no image column among \[.pic., .alt.\]: name it with --image_column"):
        prep_dataset.main(["--source", "table", "--input", str(src / "pairs.jsonl"), "--out_dir", str(tmp_path / "x"),
                           "--num_workers", "1"])
    with pytest.raises(SystemExit, match="--caption_column 'alt_text' is not among the columns"):
        prep_dataset.main(["--source", "table", "--input", str(src / "pairs.csv"), "--out_dir", str(tmp_path / "y"),
                           "--caption_column", "title,alt_text", "--num_workers", "1"])
    with pytest.raises(SystemExit, match="--caption_column 'alt_text' is not among the columns"):
        prep_dataset.main(["--source", "table", "--input", str(src / "pairs.csv"), "--out_dir", str(tmp_path / "y"),
                           "--caption_column", "alt_text", "--num_workers", "1"])
    assert not (tmp_path / "y").exists()  # nothing was started, so the corrected command runs as new


def test_table_source_reads_spreadsheet_csv_json_lists_and_parquet(tmp_path, monkeypatch):
    src = tmp_path / "src"
    (src / "imgs").mkdir(parents=True)
    for name, rgb in (("r", (250, 0, 0)), ("g", (0, 250, 0))):
        Image.new("RGB", (50, 40), rgb).save(src / "imgs" / f"{name}.png")

    def made(name):  # the captions of the shards prepared from src/name
        prep_dataset.main(["--source", "table", "--input", str(src / name), "--out_dir", str(tmp_path / name),
                           "--image_size", "32", "--val_fraction", "0", "--num_workers", "1"])
        return [c for _, c in tar_samples(tmp_path / name / "train" / "shard-000000.tar").values()]
    # a spreadsheet's export: semicolons (commas inside the captions), column names with spaces, any case
    (src / "excel.csv").write_text("Image Path;Caption\nimgs/r.png;red, bright, square\nimgs/g.png;a green card\n")
    assert sorted(made("excel.csv")) == ["a green card", "red, bright, square"]
    # a split column, in any case: the rows of --split (train) are kept
    (src / "splits.csv").write_text("Image,Caption,Split\nimgs/r.png,red,train\nimgs/g.png,green,Test\n")
    assert made("splits.csv") == ["red"]
    # Excel's "Unicode text" export (UTF-16, tabs) is read; a file in a legacy code page is an error that says what to do
    (src / "unicode.txt").write_text("Image\tCaption\nimgs/r.png\tun café rouge\n", encoding="utf-16")
    assert made("unicode.txt") == ["un café rouge"]
    (src / "latin.csv").write_bytes("image,caption\nimgs/r.png,un café rouge\n".encode("cp1252"))
    with pytest.raises(SystemExit, match=r"latin.csv is not UTF-8 text .*save it as UTF-8"):
        made("latin.csv")
    (src / "captions.xlsx").write_bytes(b"PK\x03\x04" + bytes(100))  # Excel's own file: saved as a CSV first
    with pytest.raises(SystemExit, match=r"captions.xlsx is a spreadsheet file: save it .* as a CSV"):
        made("captions.xlsx")
    # no header line: the column of image paths (or URLs) is the image, the other the caption
    (src / "bare.csv").write_text("imgs/r.png,a red card\nimgs/g.png,a green card\n")
    assert sorted(made("bare.csv")) == ["a green card", "a red card"]
    (src / "bare_commas.csv").write_text("imgs/r.png,a red card, flat\nimgs/g.png,a green card\n")  # unquoted
    assert sorted(made("bare_commas.csv")) == ["a green card", "a red card, flat"]
    # quotes as scraped captions hold them, unquoted (Conceptual Captions' TSVs): one that opens a caption and never
    # closes took the rows after it into that caption, up to the next quote; they are all kept, as written
    (src / "quotes.tsv").write_text('a green 12" card\timgs/g.png\n"an open quote, red\timgs/r.png\n'
                                    'green once more\timgs/g.png\n"the red" card again\timgs/r.png\n')
    assert sorted(made("quotes.tsv")) == ['"an open quote, red\n"the red" card again',
                                          'a green 12" card\ngreen once more']
    # a caption holding the delimiter, unquoted (a hand-made CSV): one caption, wherever its column is
    (src / "commas.csv").write_text("image,caption,score\nimgs/r.png,red, flat, square,0.3\nimgs/g.png,green,0.2,\n")
    (src / "commas_first.csv").write_text("caption,image\na card, green,imgs/g.png\n")
    assert sorted(made("commas.csv")) == ["green", "red, flat, square"] and made("commas_first.csv") == ["a card, green"]
    # while a quoted caption of several lines, as a spreadsheet writes it, is still one cell
    (src / "multiline.csv").write_text('image,caption\nimgs/g.png,"green\nand ""flat"""\nimgs/r.png,red\n')
    assert sorted(made("multiline.csv")) == ['green and "flat"', "red"]
    (src / "cc3m.tsv").write_text("a red card\thttp://127.0.0.1:1/r.jpg\n")  # Conceptual Captions' layout
    with pytest.raises(SystemExit, match="No image URL could be downloaded: check the network"):
        made("cc3m.tsv")  # (the URL, taken for the image, was tried: nothing listens there)
    # Flickr8k's and Flickr30k's own token files: no header, a tab, the image with its caption's number, and
    # captions with more commas than the line has tabs; an image's numbered rows are one sample
    (src / "Flickr8k.token.txt").write_text("r.png#0\tA red card, flat, on a table, lit .\nr.png#1\ta red card\n"
                                            "g.png#0\tA green card .\n")
    prep_dataset.main(["--source", "table", "--input", str(src / "Flickr8k.token.txt"), "--image_root",
                       str(src / "imgs"), "--out_dir", str(tmp_path / "flickr"), "--image_size", "32",
                       "--val_fraction", "0", "--num_workers", "1"])
    assert sorted(c for _, c in tar_samples(tmp_path / "flickr" / "train" / "shard-000000.tar").values()) == \
        ["A green card .", "A red card, flat, on a table, lit .\na red card"]
    # image ids, not files (Open Images' and Localized Narratives' tables): the file of that name, with its extension
    shutil.copy(src / "imgs" / "r.png", src / "imgs" / "0001eeaf.PNG")
    (src / "narratives.jsonl").write_text('{"dataset_id": "open_images", "image_id": "0001eeaf", "caption": "red id"}\n'
                                          '{"dataset_id": "open_images", "image_id": "g", "caption": "green id"}\n')
    prep_dataset.main(["--source", "table", "--input", str(src / "narratives.jsonl"), "--image_root", str(src / "imgs"),
                       "--out_dir", str(tmp_path / "ids"), "--image_size", "32", "--val_fraction", "0", "--num_workers", "1"])
    assert sorted(c for _, c in tar_samples(tmp_path / "ids" / "train" / "shard-000000.tar").values()) == ["green id", "red id"]
    # a relative path written on Windows (imgs\r.png) is found without --image_root too
    (src / "windows.csv").write_text("image,caption\nimgs\\r.png,red on windows\n")
    assert made("windows.csv") == ["red on windows"]
    # file:// URLs are paths (pathlib's as_uri(), a browser's address of a local file), spaces escaped and all
    shutil.copy(src / "imgs" / "r.png", src / "imgs" / "red card.png")
    (src / "uris.csv").write_text(f"image,caption\n{(src / 'imgs' / 'red card.png').as_uri()},red uri\n")
    assert made("uris.csv") == ["red uri"]
    # a JSON list of records, and JSON lines where a broken line is skipped and counted
    (src / "list.json").write_text(json.dumps([{"image": "imgs/r.png", "text": "red"}, {"image": "imgs/g.png", "text": "green"}]))
    assert sorted(made("list.json")) == ["green", "red"]
    # paths relative to where the command runs, for a table kept in another folder
    (src / "tables").mkdir()
    (src / "tables" / "from_cwd.csv").write_text("image,caption\n imgs/r.png ,red from here\n")  # stray spaces too
    monkeypatch.chdir(src)
    assert made("tables/from_cwd.csv") == ["red from here"]
    (src / "broken.json").write_text('[{"image": "imgs/r.png", "text": "red"},')
    with pytest.raises(SystemExit, match="broken.json is not valid JSON .*one record per line"):
        made("broken.json")
    (src / "lines.jsonl").write_text('{"image": "imgs/r.png", "text": "red"}\n{"image": "imgs/g.png", "te\n')
    assert made("lines.jsonl") == ["red"]
    assert json.loads((tmp_path / "lines.jsonl" / "manifest.json").read_text())["skipped"] == {"bad_row": 1}
    # Parquet: a path, or the image's bytes in the hub's {"bytes", "path"} cell
    import pyarrow as pa
    import pyarrow.parquet as pq
    green = (src / "imgs" / "g.png").read_bytes()
    pq.write_table(pa.table({"image": [{"bytes": green, "path": None}], "caption": ["green bytes"]}), src / "hub.parquet")
    pq.write_table(pa.table({"file_name": ["imgs/r.png"], "caption": ["red path"]}), src / "paths.parquet")
    assert made("hub.parquet") == ["green bytes"] and made("paths.parquet") == ["red path"]
    # a column that holds the images themselves is the image column, whatever its name; or the one column whose
    # name has an image word in it (here a path), where none has a usual name
    import base64
    for name, cell in (("image_bytes", green), ("img_data", {"bytes": green, "path": None}),
                       ("b64", base64.b64encode(green).decode()), ("photo_file", str(src / "imgs" / "g.png"))):
        columns = {name: [cell], "caption": [f"green {name}"]}
        if name != "photo_file":  # beside a URL column: the image at hand, not a download
            columns["url"] = ["http://127.0.0.1:1/never.jpg"]
        pq.write_table(pa.table(columns), src / f"{name}.parquet")
        assert made(f"{name}.parquet") == [f"green {name}"]
    # a webdataset turned into a table: the image's bytes under jpg, the caption under txt or in a json record
    pq.write_table(pa.table({"__key__": ["k1"], "jpg": [green], "txt": ["green txt"]}), src / "wds.parquet")
    pq.write_table(pa.table({"jpg": [green], "json": [{"caption": "green json", "width": 50}]}), src / "wds_json.parquet")
    assert made("wds.parquet") == ["green txt"] and made("wds_json.parquet") == ["green json"]
    (src / "cut.parquet").write_bytes((src / "wds.parquet").read_bytes()[:100])  # a download that stopped early
    with pytest.raises(SystemExit, match="cut.parquet cannot be read as Parquet"):
        made("cut.parquet")
    image = np.asarray(next(iter(tar_samples(tmp_path / "hub.parquet" / "train" / "shard-000000.tar").values()))[0])
    assert image[..., 1].mean() > 200 and image[..., 0].mean() < 40
    with pytest.raises(SystemExit, match="--source table"):  # a table file given to the hub source
        prep_dataset.main(["--source", "hub", "--input", str(src / "hub.parquet"), "--out_dir", str(tmp_path / "h")])
    # a table in parts (LAION's, DataComp's, the hub's Parquet files): a glob or their folder, read as one table
    (src / "parts").mkdir()
    for i, (name, caption) in enumerate((("r", "red part"), ("g", "green part"))):
        pq.write_table(pa.table({"image": [f"../imgs/{name}.png"], "caption": [caption]}), src / "parts" / f"part-{i}.parquet")
    (src / "parts" / "stats.json").write_text('{"rows": 2}')  # beside the parts: no table
    assert sorted(made("parts/*.parquet")) == sorted(made("parts")) == ["green part", "red part"]
    (src / "csvs").mkdir()
    (src / "csvs" / "a.csv").write_text("image,caption\n../imgs/r.png,red csv\n")
    (src / "csvs" / "b.csv").write_text("image,caption\n../imgs/g.png,green csv\n../imgs/r.png,red again\n")
    assert sorted(made("csvs")) == ["green csv", "red csv\nred again"]  # an image's rows in any part: one sample


def test_table_source_reads_coco_and_karpathy_caption_files(tmp_path, capsys):
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "train2017").mkdir()
    colours = {"a": (250, 0, 0), "b": (0, 250, 0), "c": (0, 0, 250), "d": (250, 250, 0)}
    for name, rgb in colours.items():
        Image.new("RGB", (50, 40), rgb).save(coco / "train2017" / f"{name}.jpg")

    def made(table, out, *flags):  # {caption: which channels are bright} of the shards prepared from the table
        m = prep_dataset.main(["--source", "table", "--input", str(table), "--out_dir", str(tmp_path / out),
                               "--image_size", "32", "--val_fraction", "0", "--num_workers", "1", *flags])
        samples = tar_samples(tmp_path / out / "train" / "shard-000000.tar")
        return {c: tuple(int(v > 128) for v in np.asarray(img, dtype=float).mean((0, 1))) for img, c in samples.values()}, m
    # COCO's caption annotations, pretty-printed: captions join their image by id; an image with none is counted
    ann = {"info": {}, "licenses": [],
           "images": [{"id": i, "file_name": f"{n}.jpg", "coco_url": f"http://x/{n}.jpg"} for i, n in enumerate("abc")],
           "annotations": [{"id": 7, "image_id": 0, "caption": "red one"}, {"id": 8, "image_id": 1, "caption": "green"},
                           {"id": 9, "image_id": 0, "caption": "red two "}, {"id": 10, "image_id": 42, "caption": "x"}]}
    (coco / "annotations" / "captions_train2017.json").write_text(json.dumps(ann, indent=2))
    table = coco / "annotations" / "captions_train2017.json"
    with pytest.raises(SystemExit, match=r"'missing_image': 3.*name the images' folder with --image_root"):
        made(table, "coco")
    # the failed run leaves nothing behind, so the corrected command runs in the same folder
    got, m = made(table, "coco", "--image_root", str(coco / "train2017"))
    assert got == {"red one\nred two": (1, 0, 0), "green": (0, 1, 0)}
    assert m["skipped"] == {"empty_caption": 1}
    # Karpathy's split file (one line, as it ships): folder + file name, sentences, and a split kept by --split
    split = {"a": "train", "b": "restval", "c": "test", "d": "train"}
    karpathy = {"dataset": "coco", "images": [
        {"filepath": "train2017", "filename": f"{n}.jpg", "split": split[n],
         "sentences": [{"raw": f"{n} {j}", "tokens": [n, str(j)]} for j in range(2)]} for n in "abcd"]}
    (tmp_path / "dataset_coco.json").write_text(json.dumps(karpathy))
    got, m = made(tmp_path / "dataset_coco.json", "k1", "--image_root", str(coco))
    assert sorted(got) == ["a 0\na 1", "d 0\nd 1"] and m["skipped"] == {"other_split": 2}
    # a space after the comma, as the other comma lists (--data_dir, --zeroshot) allow
    got, m = made(tmp_path / "dataset_coco.json", "k2", "--image_root", str(coco), "--split", "train, restval")
    assert got["b 0\nb 1"] == (0, 1, 0) and len(got) == 3 and m["skipped"] == {"other_split": 1}
    with pytest.raises(SystemExit, match="No row is in --split's splits"):
        made(tmp_path / "dataset_coco.json", "k3", "--image_root", str(coco), "--split", "validation")
    assert "split column holds ['restval', 'test', 'train'], none of --split validation" in capsys.readouterr().err
    # the test split as an evaluation set: all of it in val/, for evaluate.py --retrieval
    m = prep_dataset.main(["--source", "table", "--input", str(tmp_path / "dataset_coco.json"), "--image_root", str(coco),
                           "--split", "test", "--val_fraction", "1", "--out_dir", str(tmp_path / "test"), "--num_workers", "1"])
    assert m["counts"]["train"] == 0 and m["counts"]["val"] == 1 and not os.listdir(tmp_path / "test" / "train")
    assert [c for _, c in tar_samples(tmp_path / "test" / "val" / "shard-000000.tar").values()] == ["c 0\nc 1"]
    # Flickr30k's file names the image alone
    for im in karpathy["images"]:
        del im["filepath"]
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(karpathy))
    got, _ = made(tmp_path / "dataset_flickr30k.json", "f", "--image_root", str(coco / "train2017"))
    assert got == {"a 0\na 1": (1, 0, 0), "d 0\nd 1": (1, 1, 0)}
    # TextCaps' file: its records under "data", beside notes about the file; a row per caption, all five in each
    rows = [{"image_id": n, "image_path": f"train2017/{n}.jpg", "caption_id": j, "caption_str": f"{n} sign {j}",
             "caption_tokens": [n, "sign", str(j)], "reference_strs": [f"{n} sign {k}" for k in range(2)],
             "set_name": "train"} for n in "ab" for j in range(2)]
    (tmp_path / "TextCaps_0.1_train.json").write_text(json.dumps({"dataset_type": "train", "dataset_name": "textcaps",
                                                                  "dataset_version": "0.1", "data": rows}))
    got, m = made(tmp_path / "TextCaps_0.1_train.json", "textcaps", "--image_root", str(coco))
    assert got == {"a sign 0\na sign 1": (1, 0, 0), "b sign 0\nb sign 1": (0, 1, 0)} and m["skipped"] == {}
    # LLaVA-Pretrain's and ShareGPT4V's chats about each image: the model's answers are the captions (an answer's
    # paragraphs on one line), the prompts that ask for them are not
    chats = [{"id": n, "image": f"train2017/{n}.jpg", "conversations": [
        {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
        {"from": "gpt", "value": f"{n} described\n\nin detail"}]} for n in "ab"]
    chats[1]["conversations"] += [{"from": "human", "value": "And its colour?"}, {"from": "gpt", "value": "green"}]
    (tmp_path / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(chats))
    got, m = made(tmp_path / "blip_laion_cc_sbu_558k.json", "llava", "--image_root", str(coco))
    assert got == {"a described in detail": (1, 0, 0), "b described in detail\ngreen": (0, 1, 0)}
    # the folder source finds the images without .txt captions, and points to the table beside them
    with pytest.raises(SystemExit, match=r"no \.txt captions.*captions_train2017\.json.*--source table"):
        prep_dataset.main(["--source", "folder", "--input", str(coco), "--out_dir", str(tmp_path / "dir")])


def test_prep_settings_out_of_range_stop_before_any_work(tmp_path, capsys):
    for flags, message in ((["--shard_size", "0"], "--shard_size 0: must be at least 1"),  # a division by zero
                           (["--num_workers", "0"], "--num_workers 0: must be at least 1"),
                           (["--workers", "0"], "--num_workers 0: must be at least 1"),  # the older name of it
                           (["--val_fraction", "1.5"], "--val_fraction 1.5: must be a share between 0 and 1"),
                           (["--jpeg_quality", "101"], r"--jpeg_quality 101: must be in \[1, 100\]"),
                           (["--seed", "-1"], "--seed -1: must be 0 or more")):  # else numpy's traceback
        with pytest.raises(SystemExit):
            prep_dataset.main(["--source", "shapes", "--out_dir", str(tmp_path / "x"), *flags])
        assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "x").exists()
    # another source's input given without --source (the default is text-to-image-2M): which --source it needs
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "pairs.csv").write_text("image,caption\n")
    with pytest.raises(SystemExit, match="is a table.*add --source table"):
        prep_dataset.main(["--input", str(tmp_path / "pics" / "pairs.csv"), "--out_dir", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="holds no .tar shards.*add --source folder"):
        prep_dataset.main(["--input", str(tmp_path / "pics"), "--out_dir", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(SystemExit, match="a_file/x: cannot create it"):
        prep_dataset.main(["--source", "shapes", "--limit", "20", "--out_dir", str(tmp_path / "a_file" / "x")])


def test_hub_source_reads_a_datasets_image_text_set(tmp_path):
    # a local dataset in a layout `datasets` reads like a hub one: an imagefolder with a metadata.jsonl
    src = tmp_path / "src"
    src.mkdir()
    rows = [("r.png", (250, 0, 0), "a red card"), ("g.jpg", (0, 250, 0), "a green card"), ("b.png", (0, 0, 250), "")]
    with open(src / "metadata.jsonl", "w") as f:
        for name, rgb, text in rows:
            Image.new("RGB", (60, 45), rgb).save(src / name)
            f.write(json.dumps({"file_name": name, "text": text}) + "\n")
    m = prep_dataset.main(["--source", "hub", "--input", str(src), "--out_dir", str(tmp_path / "out"),
                           "--image_size", "32", "--val_fraction", "0", "--num_workers", "1"])
    assert m["counts"]["train"] == 2 and m["skipped"] == {"empty_caption": 1}
    samples = tar_samples(tmp_path / "out" / "train" / "shard-000000.tar")
    by_caption = {c: np.asarray(img, dtype=float) for img, c in samples.values()}
    assert set(by_caption) == {"a red card", "a green card"}
    assert by_caption["a green card"].shape == (32, 32, 3) and by_caption["a green card"][..., 1].mean() > 200
    # given to the folder source, whose captions sit beside the images, it is named as what it is
    with pytest.raises(SystemExit, match=r"metadata.jsonl\), read it with --source table .*a `datasets` image folder .*"
                                         r"with --source hub --input " + re.escape(str(src))):
        prep_dataset.main(["--source", "folder", "--input", str(src), "--out_dir", str(tmp_path / "f")])
    # captions held as records (COCO's {"raw", "tokens"}), several per image: their text, one per line
    coco = tmp_path / "coco"
    coco.mkdir()
    with open(coco / "metadata.jsonl", "w") as f:
        for name, words, rgb in (("1.png", ["a red card", "red paper"], (200, 0, 0)), ("2.png", ["a blue card"], (0, 0, 200))):
            Image.new("RGB", (40, 40), rgb).save(coco / name)
            sentences = [{"raw": w, "tokens": w.split(), "sentid": i} for i, w in enumerate(words)]
            f.write(json.dumps({"file_name": name, "sentences": sentences}) + "\n")
    prep_dataset.main(["--source", "hub", "--input", str(coco), "--out_dir", str(tmp_path / "coco_out"),
                       "--image_size", "32", "--val_fraction", "0", "--num_workers", "1"])
    captions = {c for _, c in tar_samples(tmp_path / "coco_out" / "train" / "shard-000000.tar").values()}
    assert captions == {"a red card\nred paper", "a blue card"}
    # a local set that lists its images as paths in a text column: taken from the set's folder
    paths = tmp_path / "paths"
    (paths / "pics").mkdir(parents=True)
    Image.new("RGB", (40, 40), (0, 0, 220)).save(paths / "pics" / "b.png")
    (paths / "train.jsonl").write_text(json.dumps({"image_path": "pics/b.png", "caption": "blue by path"}) + "\n")
    prep_dataset.main(["--source", "hub", "--input", str(paths), "--out_dir", str(tmp_path / "paths_out"),
                       "--image_size", "32", "--val_fraction", "0", "--num_workers", "1"])
    assert [c for _, c in tar_samples(tmp_path / "paths_out" / "train" / "shard-000000.tar").values()] == ["blue by path"]
    # what save_to_disk wrote: a DatasetDict, its split chosen by --split (load_dataset refuses such a folder)
    import datasets
    red = io.BytesIO()
    Image.new("RGB", (40, 40), (220, 0, 0)).save(red, "PNG")
    split = datasets.Dataset.from_dict({"image": [{"bytes": red.getvalue(), "path": None}] * 2,
                                        "caption": ["red in train", "red on disk"]},
                                       features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}))
    datasets.DatasetDict({"train": split.select([0]), "test": split.select([1])}).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"test": split.select([1])}).save_to_disk(str(tmp_path / "saved_test"))
    prep_dataset.main(["--source", "hub", "--input", str(tmp_path / "saved"), "--split", "test", "--out_dir",
                       str(tmp_path / "saved_out"), "--image_size", "32", "--val_fraction", "0", "--num_workers", "1"])
    assert [c for _, c in tar_samples(tmp_path / "saved_out" / "train" / "shard-000000.tar").values()] == ["red on disk"]
    # Flickr30k's layout on the hub: one "test" split whose "split" column holds Karpathy's train/val/test
    reds = [io.BytesIO() for _ in range(4)]  # four images: rows showing one image one after another are one sample
    for i, buf in enumerate(reds):
        Image.new("RGB", (40, 40), (220 - 10 * i, 0, 0)).save(buf, "PNG")
    flickr = datasets.Dataset.from_dict({"image": [{"bytes": buf.getvalue(), "path": None} for buf in reds],
                                         "caption": [["a", "b"], ["c"], ["d"], ["e"]], "split": ["train", "test", "train", "val"]},
                                        features=datasets.Features({"image": datasets.Image(),
                                                                    "caption": datasets.Sequence(datasets.Value("string")),
                                                                    "split": datasets.Value("string")}))
    datasets.DatasetDict({"test": flickr}).save_to_disk(str(tmp_path / "flickr"))
    for wanted, captions in (("train", ["a\nb", "d"]), ("test", ["c"]), ("val, train", ["a\nb", "d", "e"])):
        out = tmp_path / f"flickr_{len(captions)}"
        m = prep_dataset.main(["--source", "hub", "--input", str(tmp_path / "flickr"), "--split", wanted, "--out_dir",
                               str(out), "--image_size", "32", "--val_fraction", "0", "--num_workers", "1"])
        assert sorted(c for _, c in tar_samples(out / "train" / "shard-000000.tar").values()) == captions
        assert m["skipped"] == {"other_split": 4 - len(captions)}
    with pytest.raises(SystemExit, match="no split 'train', only \\['test'\\]"):  # and without a split column
        prep_dataset.main(["--source", "hub", "--input", str(tmp_path / "saved_test"), "--out_dir",
                           str(tmp_path / "nothing"), "--image_size", "32", "--num_workers", "1"])
    split.select([0]).save_to_disk(str(tmp_path / "lone"))  # a lone Dataset: no splits to choose from
    prep_dataset.main(["--source", "hub", "--input", str(tmp_path / "lone"), "--out_dir", str(tmp_path / "lone_out"),
                       "--image_size", "32", "--val_fraction", "0", "--num_workers", "1"])
    assert [c for _, c in tar_samples(tmp_path / "lone_out" / "train" / "shard-000000.tar").values()] == ["red in train"]
    # images kept as plain bytes in a column of another name (no Image feature to tell): found in the first row
    # (its caption over two lines: one caption, as a column's text is)
    datasets.Dataset.from_dict({"image_bytes": [red.getvalue()], "text": ["red\nbytes"]}).save_to_disk(str(tmp_path / "raw"))
    prep_dataset.main(["--source", "hub", "--input", str(tmp_path / "raw"), "--out_dir", str(tmp_path / "raw_out"),
                       "--image_size", "32", "--val_fraction", "0", "--num_workers", "1"])
    assert [c for _, c in tar_samples(tmp_path / "raw_out" / "train" / "shard-000000.tar").values()] == ["red bytes"]
    # a set in webdataset layout (clip_benchmark's, KEY.jpg + KEY.txt): a .txt's lines are its captions
    (tmp_path / "wds").mkdir()
    write_tar(tmp_path / "wds" / "test-000000.tar", [("k0.jpg", jpeg((200, 0, 0))), ("k0.txt", b"red one\nred two")])
    prep_dataset.main(["--source", "hub", "--input", str(tmp_path / "wds"), "--split", "test", "--out_dir",
                       str(tmp_path / "wds_out"), "--image_size", "32", "--val_fraction", "0", "--num_workers", "1"])
    assert [c for _, c in tar_samples(tmp_path / "wds_out" / "train" / "shard-000000.tar").values()] == [
        "red one\nred two"]
    # Flickr8k's layout on the hub: five numbered caption columns, each a caption of the image
    datasets.Dataset.from_dict({"image": [{"bytes": red.getvalue(), "path": None}],
                                **{f"caption_{k}": [f"red {k}"] for k in range(5)}},
                               features=datasets.Features({"image": datasets.Image(),
                                                           **{f"caption_{k}": datasets.Value("string") for k in range(5)}}),
                               ).save_to_disk(str(tmp_path / "flickr8k"))
    prep_dataset.main(["--source", "hub", "--input", str(tmp_path / "flickr8k"), "--out_dir", str(tmp_path / "f8k_out"),
                       "--image_size", "32", "--val_fraction", "0", "--num_workers", "1"])
    assert [c for _, c in tar_samples(tmp_path / "f8k_out" / "train" / "shard-000000.tar").values()] == [
        "red 0\nred 1\nred 2\nred 3\nred 4"]
    # the Karpathy split on the hub (yerevann/coco-karpathy): each image by folder and file name apart, beside
    # its URL; with COCO's images on disk, --image_root names where the folders are
    karpathy = tmp_path / "coco-karpathy"
    (karpathy / "data").mkdir(parents=True)
    (tmp_path / "coco" / "val2014").mkdir(parents=True)
    rows = []
    for i, rgb in enumerate([(250, 0, 0), (0, 250, 0), (0, 0, 250)]):
        name = f"COCO_val2014_{i:012d}.jpg"
        Image.new("RGB", (40, 30), rgb).save(tmp_path / "coco" / "val2014" / name)
        rows.append({"filepath": "val2014", "filename": name, "sentences": [f"{i} a", f"{i} b"], "cocoid": i,
                     "split": "test" if i else "train", "url": f"http://images.cocodataset.org/val2014/{name}"})
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), karpathy / "data" / "test-00000-of-00001.parquet")
    m = prep_dataset.main(["--source", "hub", "--input", str(karpathy), "--split", "test", "--image_root",
                           str(tmp_path / "coco"), "--out_dir", str(tmp_path / "karpathy_out"), "--image_size", "32",
                           "--val_fraction", "0", "--num_workers", "1"])
    got = tar_samples(tmp_path / "karpathy_out" / "train" / "shard-000000.tar").values()
    assert sorted((c, int(np.asarray(img)[..., 2].mean() > 128)) for img, c in got) == [("1 a\n1 b", 0), ("2 a\n2 b", 1)]
    assert m["skipped"] == {"other_split": 1}
    with pytest.raises(SystemExit, match=r"'missing_image': 2.*name the images' folder with --image_root"):
        prep_dataset.main(["--source", "hub", "--input", str(karpathy), "--split", "test", "--out_dir",
                           str(tmp_path / "karpathy_no_root"), "--image_size", "32", "--num_workers", "1"])


def test_a_row_per_caption_is_one_sample_per_image_and_resumes_whole(tmp_path, monkeypatch, capsys):
    # COCO's sets on the hub give each of an image's captions a row, the image's rows together: each image must be
    # one sample with its captions, never in train and val at once. Rows showing an earlier image further on join
    # its sample too, each caption once
    import datasets
    pngs = {}
    for name, rgb in (("A", (220, 0, 0)), ("B", (0, 220, 0)), ("C", (0, 0, 220))):
        buf = io.BytesIO()
        Image.new("RGB", (40, 40), rgb).save(buf, "PNG")
        pngs[name] = buf.getvalue()
    rows = [("A", "a1"), ("A", "a2"), ("A", "a3"), ("B", "b1"), ("B", "b2"), ("C", "c1"), ("A", "a4"), ("B", "b1")]
    ds = datasets.Dataset.from_dict({"image": [{"bytes": pngs[n], "path": None} for n, _ in rows],
                                     "caption": [c for _, c in rows]},
                                    features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "coco"))
    ds.to_parquet(str(tmp_path / "coco.parquet"))
    flags = ["--image_size", "32", "--val_fraction", "0", "--num_workers", "1", "--chunk_size", "1", "--shard_size", "10"]
    expected = ["a1\na2\na3\na4", "b1\nb2", "c1"]
    for source, given in (("hub", tmp_path / "coco"), ("table", tmp_path / "coco.parquet")):
        capsys.readouterr()
        m = prep_dataset.main(["--source", source, "--input", str(given), "--out_dir", str(tmp_path / source), *flags])
        assert sorted(c for _, c in tar_samples(tmp_path / source / "train" / "shard-000000.tar").values()) == expected
        assert m["counts"] == {"train": 3, "val": 0, "skipped": 0, "merged": 2, "seen": 5}
        assert "samples that showed a picture another sample showed too: 2. Each picture is one sample with all their " \
               "captions (2 pictures; the most captions one gathered: 4)" in capsys.readouterr().out
    # interrupted once a chunk is finished (A's rows, then B's), the streamed set goes on after them: the row read
    # ahead to see where B's rows end (C's) is read again, not lost
    write = prep_dataset.atomic_write

    def stop_after_the_second_chunk(path, data):
        write(path, data)
        if path.endswith("chunk-000001.json"):
            raise KeyboardInterrupt
    monkeypatch.setattr(prep_dataset, "atomic_write", stop_after_the_second_chunk)
    args = ["--source", "hub", "--input", str(tmp_path / "coco"), "--out_dir", str(tmp_path / "resumed"), *flags]
    with pytest.raises(KeyboardInterrupt):
        prep_dataset.main(args)
    monkeypatch.undo()
    capsys.readouterr()
    prep_dataset.main(args)
    assert "reused 2 finished chunks, going on in the source where they end" in capsys.readouterr().out
    assert (tmp_path / "resumed" / "train" / "shard-000000.tar").read_bytes() == \
        (tmp_path / "hub" / "train" / "shard-000000.tar").read_bytes()


def test_a_picture_that_many_samples_show_is_dropped_as_a_placeholder(tmp_path, capsys):
    # scraped sets hold a web host's "image not available" picture many times over, each with the caption of the
    # image that vanished: past --max_samples_per_picture samples a picture is left out, and counted
    src = tmp_path / "src"
    src.mkdir()
    for i in range(7):  # one picture, 7 files: the placeholder
        Image.new("RGB", (40, 30), (200, 200, 200)).save(src / f"gone{i}.png")
        (src / f"gone{i}.txt").write_text(f"a photo of thing {i}")
    for i, rgb in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
        Image.new("RGB", (40, 30), rgb).save(src / f"real{i}.png")
        (src / f"real{i}.txt").write_text(f"colour {i}")
    Image.new("RGB", (40, 30), (0, 0, 200)).save(src / "again.png")  # real2 twice: merged, as before
    (src / "again.txt").write_text("blue again")
    flags = ["--source", "folder", "--input", str(src), "--image_size", "16", "--val_fraction", "0", "--num_workers", "1"]
    m = prep_dataset.main([*flags, "--out_dir", str(tmp_path / "a"), "--max_samples_per_picture", "5"])
    assert m["counts"] == {"train": 3, "val": 0, "skipped": 7, "merged": 1, "seen": 11}
    assert m["skipped"] == {"placeholder_image": 7}
    out = capsys.readouterr().out
    assert "taken for a web host's placeholder" in out and ": 1, with their 7 samples" in out
    captions = sorted(c for _, c in tar_samples(tmp_path / "a" / "train" / "shard-000000.tar").values())
    assert captions == ["blue again\ncolour 2", "colour 0", "colour 1"]
    # up to the limit, or with no limit, the picture is one sample with all its captions
    for limit in ("7", "0", None):  # None: the default, 1000
        m = prep_dataset.main([*flags, "--out_dir", str(tmp_path / f"keep{limit}"),
                               *(["--max_samples_per_picture", limit] if limit else [])])
        assert m["counts"] == {"train": 4, "val": 0, "skipped": 0, "merged": 7, "seen": 11}
        # the default is not among the settings, so that data prepared before the limit existed is still complete
        assert ("max_samples_per_picture" in m["settings"]) == (limit is not None)
    # a set of nothing but the placeholder stops, saying how to keep it
    for i in range(3):
        os.remove(src / f"real{i}.png")
    os.remove(src / "again.png")
    with pytest.raises(SystemExit, match="--max_samples_per_picture 0 keeps them"):
        prep_dataset.main([*flags, "--out_dir", str(tmp_path / "none"), "--max_samples_per_picture", "5"])


def test_image_urls_are_downloaded_and_what_cannot_be_is_counted(tmp_path, monkeypatch, capsys):
    # sets that list image URLs (Conceptual Captions, LAION): prep downloads them, here from a local server that
    # answers as the web does: images, a redirect, a 404, a page that is not an image, a server error that passes
    # on a retry, a host that asks to come back later, and one too slow to answer
    import datasets
    import http.server
    import threading
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    asked, busy = [], []

    class Web(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            asked.append(self.path)
            if self.path.startswith("/img/"):
                buf = io.BytesIO()
                Image.new("RGB", (40, 30), colours[int(self.path[5])]).save(buf, "PNG")
                body, kind = buf.getvalue(), "image/png"
            elif self.path == "/moved":
                self.send_response(302)
                self.send_header("Location", "/img/3")
                self.end_headers()
                return
            elif self.path == "/page":
                body, kind = b"<html>this photo is no longer available</html>", "text/html"
            elif self.path == "/flaky" and asked.count("/flaky") == 1:
                self.send_error(503)
                return
            elif self.path == "/busy" and asked.count("/busy") % 2:  # too many requests: come back in a second
                busy.append(time.time())
                self.send_response(429)
                self.send_header("Retry-After", "1")
                self.end_headers()
                return
            elif self.path in ("/flaky", "/busy"):
                if self.path == "/busy":
                    busy.append(time.time())
                buf = io.BytesIO()
                Image.new("RGB", (40, 30), (90, 90, 90) if self.path == "/flaky" else (200, 100, 0)).save(buf, "JPEG")
                body, kind = buf.getvalue(), "image/jpeg"
            elif self.path == "/cut":  # the connection drops before the promised length
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                self.wfile.write(b"\x89PNG")
                return
            elif self.path.startswith("/hang"):  # a server that never answers
                time.sleep(30)
                return
            elif self.path == "/slow":
                time.sleep(2.5)
                body, kind = b"late", "text/plain"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    class Server(http.server.ThreadingHTTPServer):
        # as a web server's: socketserver's 5 would drop the connections of prep's 64 downloads past the first
        # few while the server is busy, and a dropped one is tried again by TCP only after a second
        request_queue_size = 256

        def handle_error(self, request, client_address):
            pass  # the slow answer's client has gone by the time it is written

    server = Server(("127.0.0.1", 0), Web)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(prep_dataset, "DOWNLOAD_TIMEOUT", 1.0)  # ample for a loopback answer on a busy machine
    web = f"http://127.0.0.1:{server.server_address[1]}"
    rows = [("img/0", "red"), ("img/1", "green"), ("img/1", "green again"), ("img/2", "blue"), ("moved", "yellow"),
            ("gone", "lost"), ("page", "a page"), ("flaky", "grey"), ("slow", "too slow"), ("cut", "cut short"),
            ("busy", "busy"),
            ("img/0 café", "red, by a URL with a space and an accent")]
    try:
        # a TSV of URLs and captions (a row per caption, as Conceptual Captions' files are), and the same as a set
        (tmp_path / "cc.tsv").write_text("caption\turl\n" + "".join(f"{c}\t{web}/{p}\n" for p, c in rows))
        datasets.Dataset.from_dict({"caption": [c for _, c in rows], "image_url": [f"{web}/{p}" for p, _ in rows]}
                                   ).save_to_disk(str(tmp_path / "cc"))
        flags = ["--image_size", "16", "--val_fraction", "0", "--num_workers", "1"]
        # the table once more in chunks of 2: each chunk's downloads queue while the one before is decoded
        runs = (("table", tmp_path / "cc.tsv", []), ("hub", tmp_path / "cc", []),
                ("table", tmp_path / "cc.tsv", ["--chunk_size", "2"]))
        for run, (source, given, chunks) in enumerate(runs):
            capsys.readouterr()
            m = prep_dataset.main(["--source", source, "--input", str(given), "--out_dir", str(tmp_path / f"run{run}"),
                                   *flags, *chunks])
            out = capsys.readouterr().out
            assert "holds URLs" in out and "downloaded as they are prepared" in out
            assert "images that could not be downloaded: 3" in out
            assert m["skipped"] == {"download_failed": 3, "bad_image": 1}  # the 404, the slow one, the cut one; the page
            captions = sorted(c for _, c in tar_samples(tmp_path / f"run{run}" / "train" / "shard-000000.tar").values())
            assert captions == ["blue", "busy", "green\ngreen again", "grey",
                                "red\nred, by a URL with a space and an accent", "yellow"]
        # the 503 was retried (and answered by the time the set was read); a 404 is final: asked once a run
        assert asked.count("/flaky") == 4 and asked.count("/gone") == 3
        # the 429 was asked again, after the second its Retry-After named
        assert asked.count("/busy") == 6 and all(b - a >= 0.9 for a, b in zip(busy[::2], busy[1::2]))
        # with no network, prep stops once not one of the first 100 came, saying so, instead of trying them all
        (tmp_path / "offline.tsv").write_text("url\tcaption\n" + "".join(f"http://127.0.0.1:1/{i}.jpg\tc {i}\n"
                                                                       for i in range(300)))
        with pytest.raises(SystemExit, match="none of the first 100 image URLs could be downloaded .*check the network"):
            prep_dataset.main(["--source", "table", "--input", str(tmp_path / "offline.tsv"),
                               "--out_dir", str(tmp_path / "offline"), *flags])
        # Ctrl-C while every download waits on servers that do not answer: prep stops at once, not after their timeouts
        (tmp_path / "hang.tsv").write_text("url\tcaption\n" + "".join(f"{web}/hang{i}\tc {i}\n" for i in range(20)))
        proc = subprocess.Popen([sys.executable, os.path.abspath(prep_dataset.__file__), "--source", "table", "--input",
                                 str(tmp_path / "hang.tsv"), "--out_dir", str(tmp_path / "hang"), *flags],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 60
        while sum(p.startswith("/hang") for p in asked) < 20 and time.time() < deadline:
            time.sleep(0.05)
        stopped = time.time()
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=60)[0].decode()
        assert proc.returncode == 130 and "interrupted" in out and time.time() - stopped < 5
    finally:
        server.shutdown()


def test_images_written_as_base64_text_are_decoded(tmp_path):
    # OFA's and VLMEvalKit's TSVs, and some sets, keep each image in a text cell as base64 (or a data: URI)
    import base64
    import datasets

    def encoded(colour, kind):
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), colour).save(buf, kind)
        return base64.b64encode(buf.getvalue()).decode()
    cells = [("red", encoded((220, 20, 20), "JPEG")),
             ("green, a data URI", "data:image/png;base64," + encoded((20, 220, 20), "PNG")),
             ("blue, with line breaks", "\n".join(textwrap.wrap(encoded((20, 20, 220), "PNG"), 76))),
             ("cut short", encoded((220, 220, 20), "PNG")[:-41])]
    (tmp_path / "b64.jsonl").write_text("".join(json.dumps({"image": i, "caption": c}) + "\n" for c, i in cells))
    datasets.Dataset.from_dict({"image_base64": [i for _, i in cells], "text": [c for c, _ in cells]}
                               ).save_to_disk(str(tmp_path / "b64"))
    expected = {"red": (220, 20, 20), "green, a data URI": (20, 220, 20), "blue, with line breaks": (20, 20, 220)}
    for run, (source, given) in enumerate((("table", tmp_path / "b64.jsonl"), ("hub", tmp_path / "b64"))):
        m = prep_dataset.main(["--source", source, "--input", str(given), "--out_dir", str(tmp_path / f"out{run}"),
                               "--image_size", "16", "--val_fraction", "0", "--num_workers", "1"])
        assert m["skipped"] == {"bad_image": 1}
        got = {c: np.asarray(img).reshape(-1, 3).mean(0) for img, c in
               tar_samples(tmp_path / f"out{run}" / "train" / "shard-000000.tar").values()}
        assert sorted(got) == sorted(expected)
        for caption, colour in expected.items():
            assert np.abs(got[caption] - colour).max() < 8, caption


def test_prep_stands_photos_upright_and_shrinks_big_jpegs_faithfully(tmp_path):
    src = tmp_path / "src"
    os.makedirs(src)
    # stored 120x80, red left and blue right, tagged "rotate 90 degrees clockwise to display" (EXIF 6),
    # as phones save portrait photos: shown upright it is 80x120, red on top and blue below
    sideways = np.zeros((80, 120, 3), np.uint8)
    sideways[:, :60], sideways[:, 60:] = (255, 0, 0), (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(sideways).save(src / "phone.jpg", exif=exif)
    (src / "phone.txt").write_text("a portrait photo")
    # a big JPEG, which the decoder may shrink 8x on the way in: the result must match a full-size decode
    rng = np.random.default_rng(0)
    big = (np.linspace(0, 200, 1024)[None, :, None] + np.linspace(0, 50, 768)[:, None, None]
           + rng.integers(0, 6, (768, 1024, 3))).astype(np.uint8)
    Image.fromarray(big).save(src / "big.jpg", quality=95)
    (src / "big.txt").write_text("a big photo")
    prep_dataset.main(["--source", "folder", "--input", str(src), "--out_dir", str(tmp_path / "out"),
                       "--image_size", "64", "--val_fraction", "0", "--num_workers", "1"])
    by_caption = {c: np.asarray(img, dtype=float) for img, c in
                  tar_samples(tmp_path / "out" / "train" / "shard-000000.tar").values()}
    upright = by_caption["a portrait photo"]
    assert upright[:24, :, 0].mean() > 200 and upright[:24, :, 2].mean() < 60  # red on top
    assert upright[-24:, :, 2].mean() > 200 and upright[-24:, :, 0].mean() < 60  # blue below
    full = Image.open(src / "big.jpg").convert("RGB").resize((64, 64), Image.BICUBIC, box=(128, 0, 896, 768))
    assert np.abs(by_caption["a big photo"] - np.asarray(full, dtype=float)).mean() < 3
    # and the decoder did shrink it: 1/8 scale is the smallest that still covers 64 px
    opened = Image.open(src / "big.jpg")
    prep_dataset.resize_and_crop(opened, 64)
    assert opened.size == (128, 96)


def test_huge_images_are_read_without_warnings_or_counted_as_too_large(monkeypatch):
    # PIL warns from MAX_IMAGE_PIXELS (89M) and refuses from twice that: here both at toy sizes
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    png = {}
    for side in (40, 50):  # 1,600 pixels: warned of; 2,500: refused
        buf = io.BytesIO()
        Image.new("RGB", (side, side), (0, 200, 0)).save(buf, "PNG")
        png[side] = buf.getvalue()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        read = prep_dataset.process_sample(("big", png[40], "a big one", None), 16, 90)
        refused = prep_dataset.process_sample(("huge", png[50], "a huge one", None), 16, 90)
    assert read[0] == "ok" and np.asarray(Image.open(io.BytesIO(read[2])))[..., 1].mean() > 180
    assert refused == ("skip", "image_too_large")
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)], seen


def test_webdataset_source_and_truncated_tar(tmp_path, capsys):
    members = [("k1.jpg", jpeg((20, 2, 3))), ("k1.txt", b"first"),
               ("k2.png", jpeg((40, 2, 3))), ("k2.json", json.dumps({"caption": "second"}).encode()),
               ("k3.jpg", jpeg((60, 2, 3))), ("k3.txt", b"third"),
               # the same file names in two folders are two samples (webdataset keys hold the folder)
               ("x/k6.jpg", jpeg((80, 2, 3))), ("x/k6.txt", b"sixth"),
               ("y/k6.jpg", jpeg((100, 2, 3))), ("y/k6.txt", b"seventh")]
    write_tar(tmp_path / "a.tar", members)
    write_tar(tmp_path / "b.tar", [("k4.jpg", jpeg((120, 2, 3))), ("k4.txt", b"fourth"),
                                   ("k5.jpg", jpeg((140, 2, 3), (400, 400))), ("k5.txt", b"fifth")])
    data = (tmp_path / "b.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(data[:3000])  # cut inside k5's image
    # made with plain `tar`, in the directory's order: a key's files apart, and one image with no caption
    write_tar(tmp_path / "c.tar", [("u1.jpg", jpeg((160, 2, 3))), ("u2.jpg", jpeg((180, 2, 3))), ("u3.jpg", jpeg((200, 2, 3))),
                                   ("u2.txt", b"u two"), ("u1.txt", b"u one")])
    m = prep_dataset.main(["--source", "webdataset", "--input", str(tmp_path / "*.tar"), "--out_dir",
                           str(tmp_path / "out"), "--image_size", "32", "--val_fraction", "0", "--num_workers", "1"])
    captions = sorted(c for _, c in tar_samples(tmp_path / "out" / "train" / "shard-000000.tar").values())
    assert captions == ["first", "fourth", "second", "seventh", "sixth", "third", "u one", "u two"]
    assert m["counts"]["train"] == 8 and m["skipped"] == {"missing_caption": 1}
    # shards with a sample per caption, an image's samples one after another: one sample, its caption files' text
    same = jpeg((7, 7, 7))
    write_tar(tmp_path / "per_caption.tar", [("p1.jpg", same), ("p1.txt", b"one view\n"), ("p2.jpg", same),
                                              ("p2.txt", "another view \u00e9".encode())])
    m = prep_dataset.main(["--source", "webdataset", "--input", str(tmp_path / "per_caption.tar"), "--out_dir",
                           str(tmp_path / "per_caption"), "--image_size", "32", "--val_fraction", "0", "--num_workers", "1"])
    assert [c for _, c in tar_samples(tmp_path / "per_caption" / "train" / "shard-000000.tar").values()] == [
        "one view\nanother view \u00e9"]
    assert m["counts"]["seen"] == 1  # gathered before processing: the image was decoded once
    # --caption_column: a file of that extension, or a field of the .json (a short and a long caption side by
    # side); a name the first sample lacks stops at once, saying what the samples hold
    (tmp_path / "two").mkdir()
    write_tar(tmp_path / "two" / "d.tar", [("d1.jpg", jpeg((1, 2, 3))), ("d1.txt", b"alt text"), ("d1.json", json.dumps(
        {"caption": "short", "long_caption": "a long one"}).encode())])
    # without a .txt, a file of a caption-like extension (KEY.caption) is the caption, before the .json's
    write_tar(tmp_path / "e.tar", [("e1.jpg", jpeg((1, 2, 3))), ("e1.caption", b"its caption"),
                                   ("e1.json", json.dumps({"caption": "not this"}).encode())])
    out = tmp_path / "e_out"
    prep_dataset.main(["--source", "webdataset", "--input", str(tmp_path / "e.tar"), "--out_dir", str(out),
                       "--image_size", "32", "--val_fraction", "0", "--num_workers", "1"])
    assert [c for _, c in tar_samples(out / "train" / "shard-000000.tar").values()] == ["its caption"]
    write_tar(tmp_path / "f.tar", [("f1.jpg", jpeg((1, 2, 3))), ("f1.label", b"red")])  # nothing caption-like: said
    with pytest.raises(SystemExit, match=r"missing_caption.*KEY.txt, else .*KEY.caption.*--caption_column"):
        prep_dataset.main(["--source", "webdataset", "--input", str(tmp_path / "f.tar"), "--out_dir", str(out) + "f"])
    for column, caption in (("long_caption", "a long one"), ("txt", "alt text"), (None, "alt text")):
        out = tmp_path / f"two_{column}"
        prep_dataset.main(["--source", "webdataset", "--input", str(tmp_path / "two"), "--out_dir", str(out),
                           "--image_size", "32", "--val_fraction", "0", "--num_workers", "1"]
                          + (["--caption_column", column] if column else []))
        assert [c for _, c in tar_samples(out / "train" / "shard-000000.tar").values()] == [caption]
    with pytest.raises(SystemExit, match=r"--caption_column recaption: sample d1 has no file d1.recaption and no field "
                                         r"'recaption' in a .json record \(its files: jpg, txt, json; its .json's "
                                         r"fields: caption, long_caption\)"):
        prep_dataset.main(["--source", "webdataset", "--input", str(tmp_path / "two"), "--out_dir", str(tmp_path / "x"),
                           "--caption_column", "recaption"])
    with pytest.raises(SystemExit):  # a flag that does not apply to the source is an error, not ignored
        prep_dataset.main(["--source", "shapes", "--out_dir", str(tmp_path / "x"), "--caption_column", "caption"])
    assert "--caption_column is for --source table or hub or webdataset or text-to-image-2M or folder, not shapes" \
        in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the shapes set is made, not read
        prep_dataset.main(["--source", "shapes", "--out_dir", str(tmp_path / "x"), "--input", str(tmp_path / "two")])
    assert "--input is for --source text-to-image-2M or folder or webdataset or table or hub, not shapes" \
        in capsys.readouterr().err
    with pytest.raises(SystemExit):
        prep_dataset.main(["--source", "webdataset", "--input", str(tmp_path / "two"), "--out_dir", str(tmp_path / "x"),
                           "--split", "val"])
    assert "--split is for --source table or hub, not webdataset" in capsys.readouterr().err
    # the other ways to name shards: a folder of them, webdataset's {000..099} range
    (tmp_path / "ranged").mkdir()
    for i in range(3):
        write_tar(tmp_path / "ranged" / f"shard-{i:03d}.tar", [(f"r{i}.jpg", jpeg((1, 2, 3))), (f"r{i}.txt", f"r {i}".encode())])
    import gzip
    (tmp_path / "ranged" / "shard-003.tar.gz").write_bytes(gzip.compress((tmp_path / "ranged" / "shard-000.tar").read_bytes()))
    assert len(prep_dataset.tar_paths(str(tmp_path / "ranged"))) == 4  # .tar.gz too
    m = prep_dataset.main(["--source", "webdataset", "--input", str(tmp_path / "ranged" / "*.tar.gz"), "--out_dir",
                           str(tmp_path / "gz"), "--image_size", "32", "--val_fraction", "0", "--num_workers", "1"])
    assert [c for _, c in tar_samples(tmp_path / "gz" / "train" / "shard-000000.tar").values()] == ["r 0"]
    assert [os.path.basename(p) for p in prep_dataset.tar_paths(str(tmp_path / "ranged" / "shard-{001..002}.tar"))] == \
        ["shard-001.tar", "shard-002.tar"]
    # a folder's shards at any depth (a hub download's data_512_2M/, an export's buckets/*/), a hidden folder's
    # passed over; the shards of an --out_dir inside it are never read back as input
    nested = tmp_path / "download"
    for i, sub in enumerate(("", "buckets/256", "buckets/512", ".cache")):
        (nested / sub).mkdir(parents=True, exist_ok=True)
        write_tar(nested / sub / f"shard-{i}.tar", [(f"n{i}.jpg", jpeg((30 * i, 2, 3))), (f"n{i}.txt", f"n {i}".encode())])
    prep_dataset.main(["--source", "webdataset", "--input", str(nested), "--out_dir", str(nested / "prepared"),
                       "--image_size", "32", "--val_fraction", "0", "--num_workers", "1"])
    assert sorted(c for _, c in tar_samples(nested / "prepared" / "train" / "shard-000000.tar").values()) == \
        ["n 0", "n 1", "n 2"]
    found = [os.path.relpath(p, nested) for p in prep_dataset.tar_paths(str(nested), leave_out=str(nested / "prepared"))]
    assert found == ["buckets/256/shard-1.tar", "buckets/512/shard-2.tar", "shard-0.tar"]
    assert len(prep_dataset.tar_paths(str(nested))) == 4  # with the prepared set's own shard
    # shards elsewhere: URLs (a web server, the hub), and webdataset's pipe:COMMAND (pipe:aws s3 cp s3://... -);
    # one that cannot be read (a 404, a command that fails) is said and passed by, the others kept
    import functools
    import http.server
    import threading
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(
        type("Quiet", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *a: None}),
        directory=str(tmp_path / "ranged")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        web = f"http://127.0.0.1:{server.server_address[1]}/shard-{{000..003}}.tar"  # 003 is not there (a .tar.gz)
        said = {web.replace("{000..003}", "003"): "HTTP Error 404: File not found",
                "pipe:false": "the command exited with status 1"}
        for run, given in enumerate((web, f"pipe:cat {tmp_path / 'ranged'}/shard-{{000..002}}.tar", "pipe:false")):
            capsys.readouterr()
            out = tmp_path / f"remote{run}"
            if run < 2:
                prep_dataset.main(["--source", "webdataset", "--input", given, "--out_dir", str(out), "--image_size", "32",
                                   "--val_fraction", "0", "--num_workers", "1"])
                # (the three shards' images are one picture: one sample with their captions)
                assert [c for _, c in tar_samples(out / "train" / "shard-000000.tar").values()] == ["r 0\nr 1\nr 2"]
            else:
                with pytest.raises(SystemExit, match="no usable samples"):
                    prep_dataset.main(["--source", "webdataset", "--input", given, "--out_dir", str(out)])
            warnings_said = [line for line in capsys.readouterr().err.splitlines() if "could not be read" in line]
            assert warnings_said == [f"warning: {path} could not be read to its end ({why}); reading stopped there"
                                     for path, why in said.items() if path.startswith(given[:12])], warnings_said
    finally:
        server.shutdown()
    # the loader reads such shards directly, by the same convention
    os.makedirs(tmp_path / "direct" / "train")
    windows = [("z/k8.jpg", jpeg((1, 2, 3))), ("z/k8.txt", "\ufeffeighth\r\n".encode())]  # a BOM, CRLF
    write_tar(tmp_path / "direct" / "train" / "a.tar", [(n, d) for n, d in members if n[0] in "xy"] + windows)
    loader = ShardLoader(tmp_path / "direct", "train", batch_size=3, image_size=32, context_length=8,
                         num_workers=0, train=False)
    tok = Tokenizer("cl100k_base", 8)
    assert sorted(tok.decode(t) for _, tokens in loader for t in tokens) == ["eighth", "seventh", "sixth"]


def test_one_prep_at_a_time_writes_into_a_folder(tmp_path):
    # a second run into the same --out_dir (a rerun while the first still runs in another terminal) would process
    # the source twice, and crash when the first removes the staged samples: it stops at once, saying why
    out = str(tmp_path / "out")
    args = ["--source", "shapes", "--out_dir", out, "--limit", "100000", "--num_workers", "1", "--chunk_size", "100"]
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "prep_dataset.py"), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not os.path.exists(os.path.join(out, ".stage", "chunk-000000.json")) and time.time() < deadline:
            time.sleep(0.1)
        with pytest.raises(SystemExit, match=f"another prep_dataset.py is writing into {re.escape(out)}"):
            prep_dataset.main(args)
    finally:
        proc.kill()
        proc.wait()
    assert prep_dataset.lock_dir(out)  # the lock went with the process, however it ended
    prep_dataset.unlock_dir(out)
    # a folder where no lock file can be made (read-only, say: a finished set checked again) goes unguarded
    (tmp_path / "ro" / ".lock").mkdir(parents=True)
    assert not prep_dataset.lock_dir(str(tmp_path / "ro"))


def test_interrupted_prep_resumes_and_reuses_finished_chunks(tmp_path, capsys):
    args = ["--source", "shapes", "--limit", "3000", "--chunk_size", "300", "--shard_size", "500", "--num_workers", "1"]
    ref = tmp_path / "ref"
    prep_dataset.main(args + ["--out_dir", str(ref)])
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "prep_dataset.py"), *args, "--out_dir", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / ".stage" / "chunk-000001.json"
    deadline = time.time() + 60
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists() and not (out / "manifest.json").exists(), "the kill came too late to test resume"
    capsys.readouterr()
    prep_dataset.main(args + ["--out_dir", str(out)])
    reused = int(capsys.readouterr().out.split("reused ")[1].split()[0])
    assert reused >= 2
    assert not (out / ".stage").exists()
    for path in sorted(glob.glob(str(ref / "*" / "*.tar"))):
        resumed = out / os.path.relpath(path, ref)
        assert resumed.read_bytes() == open(path, "rb").read(), "a resumed prep must write the same shards"
    # a rerun of a finished prep is a no-op; other settings are refused
    prep_dataset.main(args + ["--out_dir", str(out)])
    with pytest.raises(SystemExit):
        prep_dataset.main(args[:-2] + ["--num_workers", "1", "--seed", "5", "--out_dir", str(out)])


def test_prep_says_which_of_its_own_files_is_damaged_and_goes_on_once_it_is_removed(tmp_path, monkeypatch):
    # prep writes its manifest and its chunks whole: one that does not parse was edited since (or its disk failed)
    args = ["--source", "shapes", "--limit", "60", "--chunk_size", "20", "--shard_size", "30", "--num_workers", "1"]
    prep_dataset.main(args + ["--out_dir", str(tmp_path / "ref")])
    write = prep_dataset.atomic_write

    def stop_at_the_third_chunk(path, data):
        if path.endswith("chunk-000002.json"):
            raise KeyboardInterrupt
        write(path, data)
    monkeypatch.setattr(prep_dataset, "atomic_write", stop_at_the_third_chunk)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prep_dataset.main(args + ["--out_dir", str(out)])
    monkeypatch.undo()
    last = out / ".stage" / "chunk-000001.json"
    last.write_text(last.read_text()[:100])  # cut short
    with pytest.raises(SystemExit, match=r"chunk-000001.json is damaged \(.*\): delete it, and a rerun makes it again"):
        prep_dataset.main(args + ["--out_dir", str(out)])
    last.unlink()
    prep_dataset.main(args + ["--out_dir", str(out)])
    for path in sorted(glob.glob(str(tmp_path / "ref" / "*" / "*.tar"))):
        assert (out / os.path.relpath(path, tmp_path / "ref")).read_bytes() == open(path, "rb").read()
    (out / "manifest.json").write_text("[]")  # another tool's
    with pytest.raises(SystemExit, match=r"manifest.json is damaged \(not a JSON object\): delete .*out to prepare it"):
        prep_dataset.main(args + ["--out_dir", str(out)])


def test_a_full_disk_stops_prep_with_what_to_do_and_the_rerun_goes_on(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = ["--source", "shapes", "--limit", "600", "--chunk_size", "200", "--shard_size", "300", "--num_workers", "1",
            "--out_dir", str(out)]
    sync = os.fsync

    def full_at_the_second_chunk(fd):  # the second chunk's file is partly written when the disk fills
        if (out / ".stage" / "chunk-000001.bin.tmp").exists():
            raise OSError(errno.ENOSPC, "No space left on device")
        sync(fd)
    monkeypatch.setattr(os, "fsync", full_at_the_second_chunk)
    with pytest.raises(SystemExit, match="is full: make room and rerun the same command"):
        prep_dataset.main(args)
    monkeypatch.undo()
    assert not glob.glob(str(out / ".stage" / "*.tmp"))  # the part written is given back
    assert os.path.exists(out / ".stage" / "chunk-000000.json")  # what was finished is kept
    # room for less than the shards need: said before any is written
    monkeypatch.setattr(prep_dataset.shutil, "disk_usage", lambda path: SimpleNamespace(free=1000))
    with pytest.raises(SystemExit, match=r"writing the shards needs about [\d.]+ MB more in .*0\.0 MB free: make room and rerun"):
        prep_dataset.main(args)
    assert not glob.glob(str(out / "*" / "*.tar"))
    monkeypatch.undo()
    capsys.readouterr()
    m = prep_dataset.main(args)
    assert m["counts"]["train"] + m["counts"]["val"] == 600 and "reused 3 finished chunks" in capsys.readouterr().out

# ---------------------------------------------------------------------------- dataloader.py


def test_several_prepared_sets_are_read_as_one(tmp_path):
    make_caption_shards(tmp_path / "a", n=21, shard_size=8, image_size=16)
    (tmp_path / "b" / "train").mkdir(parents=True)
    write_tar(tmp_path / "b" / "train" / "shard-000000.tar",  # named as a's first shard, in another folder
              [m for i in range(100, 111) for m in ((f"{i}.jpg", jpeg((i, 0, 0), (16, 16))), (f"{i}.txt", f"sample {i}".encode()))])
    tok = Tokenizer("cl100k_base", 16)
    loader = ShardLoader(f"{tmp_path / 'a'}, {tmp_path / 'b'}", "train", batch_size=4, image_size=16, context_length=16,
                         num_workers=0, shuffle_buffer=8)  # a space after the comma, as people type lists
    ids = [i for _, (_, tokens) in zip(range(len(loader)), loader) for i in sample_ids(tokens, tok)]
    assert len(loader) == 8 and sorted(ids) == list(range(21)) + list(range(100, 111))  # every sample of both, once
    # a set that has no shards is an error, not silently left out
    with pytest.raises(FileNotFoundError, match=f"no shards in {tmp_path / 'c' / 'train'}"):
        ShardLoader(f"{tmp_path / 'a'},{tmp_path / 'c'}", "train", batch_size=4, image_size=16, context_length=16)


def test_two_ranks_are_disjoint_complete_and_equal_one_process(tmp_path):
    make_caption_shards(tmp_path, n=103, shard_size=10, image_size=32)
    tok = Tokenizer("cl100k_base", 16)
    kw = dict(batch_size=20, image_size=32, context_length=16, num_workers=0, shuffle_buffer=30)
    single = ShardLoader(tmp_path, "train", **kw)
    ranks = [ShardLoader(tmp_path, "train", rank=r, world_size=2, **kw) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 5  # 103 // 20: only the final partial batch drops
    for epoch in range(2):
        seen = [[], []]
        for (_, t_single), (_, t0), (_, t1) in zip(single, ranks[0], ranks[1]):
            ids0, ids1 = sample_ids(t0, tok), sample_ids(t1, tok)
            assert ids0 + ids1 == sample_ids(t_single, tok), "N ranks must see exactly one process's global batch"
            seen[0] += ids0
            seen[1] += ids1
            if single.step % len(single) == 0:
                break
        assert not set(seen[0]) & set(seen[1]), "ranks must not share samples within an epoch"
        assert len(set(seen[0] + seen[1])) == len(seen[0] + seen[1]) == 100
        if epoch == 0:
            first_epoch = seen[0] + seen[1]
    assert seen[0] + seen[1] != first_epoch, "the order must be redrawn every epoch"


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux's way of handing tensors over")
def test_a_script_with_loader_processes_ends_even_under_a_low_open_files_limit(tmp_path):
    """Loader processes keep shards open and hand each batch over as open files (torch's way on Linux): under a
    low limit (ulimit -n 64) they ran out of files, and the script waited for a batch forever. And a script whose
    iterator was still open at its end waited forever too: Python's exit asks the loader processes to stop with
    a SIGTERM, which they ignore (torchrun's SIGTERM is for the training process)."""
    make_caption_shards(tmp_path, n=240, shard_size=2, image_size=32)  # 120 shards: more than the limit
    script = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))  # soft and hard: nothing to raise it to
        sys.path.insert(0, {ROOT!r})
        from dataloader import ShardLoader
        loader = ShardLoader({str(tmp_path)!r}, "train", batch_size=8, image_size=32, context_length=16,
                             num_workers=2, augment=True)
        batches = iter(loader)  # open to the end
        for _ in range(45):  # 360 samples: every shard, some twice
            next(batches)
        print("batches", loader.step, "shards open at most", loader.dataset.max_open)
    """)
    try:
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the script did not end in 120 s; it printed {e.stdout!r}")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "batches 45 shards open at most 16" in run.stdout


def test_loader_processes_keep_no_more_batches_ready_than_shared_memory_holds(tmp_path, monkeypatch):
    """Batches travel from loader processes through /dev/shm, of which Docker gives a container 64 MB: a loader
    process that found no room there could not hand its batch over, and training waited for it forever (seen with
    a 64 MB /dev/shm and 37 MB batches). Now each keeps fewer batches ready, or the run stops saying what to do."""
    make_caption_shards(tmp_path, n=64, shard_size=16, image_size=32)
    kw = dict(batch_size=16, image_size=32, context_length=16, augment=True, seed=1)
    batch = 16 * (3 * 32 * 32 + 4 * 16)  # 50 kB: uint8 images and int32 token ids
    expected = [b for _, b in zip(range(6), ShardLoader(tmp_path, "train", num_workers=0, **kw))]

    def shared_memory(free):
        monkeypatch.setattr(os, "statvfs", lambda path: SimpleNamespace(f_bavail=free // 4096, f_frsize=4096))
    for free, workers, ready in ((10 ** 9, 2, 4), (2 * 8 * batch, 2, 3), (2 * 5 * batch, 2, 1)):
        shared_memory(free)  # half of it for each of a run's two loaders, less the batch in use and the next
        loader = ShardLoader(tmp_path, "train", num_workers=workers, **kw)
        assert loader.prefetch == ready, free
        for (images, tokens), (want_images, want_tokens) in zip(loader, expected):  # the same batches
            assert torch.equal(images, want_images) and torch.equal(tokens, want_tokens)
    shared_memory(2 * 3 * batch + 4096)  # room for one batch ready, and two loader processes
    with pytest.raises(ValueError, match=r"/dev/shm has 0 MB free, too little for the batches of 0.0 MB that 2 loader "
                                         r"processes hand over through it. In Docker, start the container with "
                                         r"--ipc=host \(or --shm-size=16g\); or give --num_workers 1$"):
        ShardLoader(tmp_path, "train", num_workers=2, **kw)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # the node's two processes share it
    with pytest.raises(ValueError, match=r"loader processes in each of 2 processes .* --num_workers 0 \(no loader"):
        ShardLoader(tmp_path, "train", num_workers=1, **kw)
    import evaluate  # zero-shot's loader over class folders too, where it stops the command, not the run
    for color in ("red", "blue"):
        os.makedirs(tmp_path / "classes" / color)
        Image.new("RGB", (40, 40), color).save(tmp_path / "classes" / color / "0.png")
    cfg = get_config("tiny", vision_layers=1, text_layers=1)
    with pytest.raises(SystemExit, match=r"/dev/shm has 0 MB free, too little for the batches of 3.0 MB"):
        evaluate.zeroshot_classification(CLIP(cfg), str(tmp_path / "classes"), cfg, "cpu",
                                         torch.autocast("cpu", enabled=False), num_workers=1, notes=False)


def test_loader_keeps_few_shards_open_and_reads_the_same_with_or_without_pread(tmp_path, monkeypatch):
    # a dataset of thousands of shards must not hold a file open for each (1024 per process is the usual cap)
    make_caption_shards(tmp_path, n=90, shard_size=10, image_size=48)  # 9 shards
    kw = dict(batch_size=16, image_size=32, context_length=16, num_workers=0, augment=True, seed=3)
    it = iter(ShardLoader(tmp_path, "train", **kw))
    expected = [next(it) for _ in range(12)]  # over two epochs: every shard read, twice
    monkeypatch.setattr(dataloader, "MAX_OPEN_SHARDS", 2)
    few = ShardLoader(tmp_path, "train", **kw)
    it = iter(few)
    for images, tokens in expected:
        got_images, got_tokens = next(it)
        assert torch.equal(got_images, images) and torch.equal(got_tokens, tokens)
        assert len(few.dataset._files) <= 2
    # a copy sent to a process started by spawn (macOS; Linux's forkserver from Python 3.14) opens its own files,
    # after this process has read through the same dataset
    import multiprocessing
    from operator import methodcaller
    assert few.dataset._files
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        for row in [few.dataset.shard_rows[shard][0] for shard in few.dataset._files]:  # from the files open here
            image, caption, _ = pool.apply(methodcaller("load", row, np.random.default_rng(row)), (few.dataset,))
            expected_image, expected_caption, _ = few.dataset.load(row, np.random.default_rng(row))
            assert caption == expected_caption and np.array_equal(image, expected_image)
    # and the same again where the OS has no pread (Windows): seek, then read
    monkeypatch.delattr(os, "pread")
    it = iter(ShardLoader(tmp_path, "train", **kw))
    for images, tokens in expected:
        got_images, got_tokens = next(it)
        assert torch.equal(got_images, images) and torch.equal(got_tokens, tokens)


@pytest.mark.parametrize("device", [None, "cpu"])
def test_loader_resume_is_exact(tmp_path, device):
    # given a device (as train.py gives it), the loader has already fetched the batch after the one handed
    # over (dataloader.prefetch): its state must still count only the batches handed over
    make_caption_shards(tmp_path, n=90, shard_size=20, image_size=48)
    kw = dict(batch_size=16, image_size=32, context_length=16, num_workers=1, augment=True, seed=3)
    ref = ShardLoader(tmp_path, "train", **kw)
    it = iter(ref)
    expected = [next(it) for _ in range(14)]  # 5 batches an epoch: crosses two epoch boundaries
    part = ShardLoader(tmp_path, "train", **kw, device=device)
    it = iter(part)
    for images, tokens in expected[:7]:
        got_images, got_tokens = next(it)
        assert torch.equal(got_images, images) and torch.equal(got_tokens, tokens)
    state = part.state_dict()
    assert state["epoch"] == 1 and state["position"] == 2
    resumed = ShardLoader(tmp_path, "train", **kw, device=device)
    resumed.load_state_dict(state)
    it = iter(resumed)
    for images, tokens in expected[7:]:
        got_images, got_tokens = next(it)
        assert torch.equal(got_images, images) and torch.equal(got_tokens, tokens)
    # resumed with half the batch size, it goes on from the same sample of the epoch's order: the 32 samples
    # of epoch 1 already seen are 4 batches of 8, and the next batch of 8 is the first half of the next 16
    halves = ShardLoader(tmp_path, "train", **{**kw, "batch_size": 8})
    halves.load_state_dict(state)
    assert halves.state_dict()["epoch"] == 1 and halves.state_dict()["position"] == 4
    images, tokens = next(iter(halves))
    assert torch.equal(tokens, expected[7][1][:8]) and torch.equal(images, expected[7][0][:8])


@pytest.mark.parametrize("shard_size,model_size", [(32, 64), (256, 224)])
def test_images_come_out_at_the_model_size(tmp_path, shard_size, model_size):
    make_caption_shards(tmp_path, n=8, shard_size=8, image_size=shard_size)
    for train, augment in ((True, True), (False, False)):
        loader = ShardLoader(tmp_path, "train", batch_size=4, image_size=model_size, context_length=8,
                             num_workers=0, train=train, augment=augment)
        images, tokens = next(iter(loader))
        assert images.shape == (4, 3, model_size, model_size) and images.dtype == torch.uint8
        assert tokens.shape == (4, 8) and tokens.dtype == torch.int32


def test_batches_drop_the_padding_after_the_longest_caption(tmp_path):
    # captions of 1 to 12 words; the batch keeps the columns up to its longest caption's end-of-text,
    # which leaves every caption's text features as they are with the full context_length of padding
    os.makedirs(tmp_path / "train")
    words = "a small red circle in the top left corner of a white square".split()
    members = []
    for i in range(12):
        members += [(f"{i:03d}.jpg", jpeg((i, i, i))), (f"{i:03d}.txt", " ".join(words[: i + 1]).encode())]
    write_tar(tmp_path / "train" / "a.tar", members)
    cfg = get_config("tiny", vision_layers=1, text_layers=2, context_length=32)
    tok = Tokenizer(cfg.encoding, cfg.context_length)
    loader = ShardLoader(tmp_path, "train", batch_size=4, image_size=32, context_length=32, num_workers=0, train=False,
                         trim_tokens=True)
    model = CLIP(cfg).eval()
    widths = []
    for _, tokens in loader:
        captions = [tok.decode(t) for t in tokens]
        full = tok(captions)
        widths.append(tokens.shape[1])
        assert tokens.shape[1] == max(len(tok.enc.encode_ordinary(c)) for c in captions) + 1
        assert torch.equal(tokens, full[:, : tokens.shape[1]]) and (full[:, tokens.shape[1]:] == tok.eot).all()
        with torch.no_grad():
            torch.testing.assert_close(model.encode_text(tokens), model.encode_text(full), rtol=1e-5, atol=1e-6)
    assert widths == sorted(widths) and widths[0] < widths[-1] < 32  # captions grow with the sample number
    plain = ShardLoader(tmp_path, "train", batch_size=4, image_size=32, context_length=32, num_workers=0, train=False)
    assert all(tokens.shape == (4, 32) for _, tokens in plain)  # by default: the full context_length


def test_eval_loader_is_ordered_and_can_keep_the_partial_batch(tmp_path):
    make_caption_shards(tmp_path, n=25, shard_size=10, image_size=32, split="val")
    tok = Tokenizer("cl100k_base", 16)
    loader = ShardLoader(tmp_path, "val", batch_size=10, image_size=32, context_length=16, train=False,
                         drop_last=False, num_workers=0)
    ids = [i for _, t in loader for i in sample_ids(t, tok)]
    assert ids == list(range(25))
    assert [i for _, t in loader for i in sample_ids(t, tok)] == ids  # a second pass is the same
    # fetched a batch ahead for a device, the last batch still comes, once
    ahead = ShardLoader(tmp_path, "val", batch_size=10, image_size=32, context_length=16, train=False,
                        drop_last=False, num_workers=0, device="cpu")
    assert [i for _, t in ahead for i in sample_ids(t, tok)] == ids


def test_corrupt_images_and_truncated_tar_are_skipped_and_counted(tmp_path):
    os.makedirs(tmp_path / "train")
    good = [(f"{i:03d}.jpg", jpeg((i, i, i))) for i in range(6)]
    members = []
    for i, (name, data) in enumerate(good):
        members += [(name, b"garbage" if i == 2 else data), (f"{i:03d}.txt", f"sample {i}".encode())]
    members += [("006.jpg", jpeg((5, 5, 5))), ("006.txt", b"\xff\xfe")]  # caption not UTF-8
    members += [("007.txt", b"sample 7")]  # no image
    write_tar(tmp_path / "train" / "a.tar", members)
    write_tar(tmp_path / "train" / "b.tar", [("100.jpg", jpeg((1, 1, 1))), ("100.txt", b"sample 100"),
                                             ("101.jpg", jpeg((1, 1, 1), (300, 300))), ("101.txt", b"sample 101")])
    data = (tmp_path / "train" / "b.tar").read_bytes()
    (tmp_path / "train" / "b.tar").write_bytes(data[:2500])  # truncated inside 101.jpg
    loader = ShardLoader(tmp_path, "train", batch_size=4, image_size=32, context_length=16, num_workers=0,
                         train=False)
    tok = Tokenizer("cl100k_base", 16)
    ids = [i for _, t in loader for i in sample_ids(t, tok)]
    assert loader.dataset.num_samples == 8  # 101 is cut off, 007 has no image
    assert loader.skipped >= 2 + 2  # index: truncated + incomplete; batches: bad image + bad caption
    assert 2 not in ids and 100 in ids and len(ids) == 8  # bad ones replaced by the next good sample


def test_other_tools_shards_are_seen_upright_and_on_white(tmp_path):
    # prep_dataset.py writes upright RGB JPEGs; other tools' shards may hold a photo with a rotation tag, a
    # PNG or GIF whose transparent pixels are black, CMYK, 16-bit grey. The loader shows them as prep would
    # have: upright, on white
    os.makedirs(tmp_path / "val")
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    pixels[:, :32] = (220, 30, 30)  # stored: red left, blue right; tagged "rotate 90 degrees clockwise"
    pixels[:, 32:] = (30, 30, 220)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    rotated = buf.getvalue()
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[:, 32:] = (30, 200, 30, 255)  # left half transparent black, right half opaque green
    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, "PNG")
    transparent = buf.getvalue()
    buf = io.BytesIO()
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(buf, "JPEG")  # red, in ink
    cmyk = buf.getvalue()
    gif = Image.new("P", (64, 64), 1)
    gif.putpalette([0, 0, 0, 200, 40, 40] + [0] * 762)
    gif.paste(0, (0, 0, 32, 64))  # left half: palette entry 0, the transparent one
    buf = io.BytesIO()
    gif.save(buf, "GIF", transparency=0)
    grey16 = Image.fromarray(np.full((64, 64), 40000, dtype=np.uint16))  # 16 bits: 40000 of 65535
    buf16 = io.BytesIO()
    grey16.save(buf16, "TIFF")
    scientific = []  # grey as float in [0, 1] and as 32-bit integers over 16 bits (microscopes, astronomy, GIS)
    for grey in (np.full((64, 64), 0.25, dtype=np.float32), np.full((64, 64), 40000, dtype=np.int32)):
        scientific.append(io.BytesIO())
        Image.fromarray(grey).save(scientific[-1], "TIFF")
    images = [rotated, transparent, cmyk, jpeg((40, 120, 200), (64, 64)), buf.getvalue(), buf16.getvalue(),
              *(b.getvalue() for b in scientific)]
    kinds = ["jpg", "png", "jpg", "jpg", "gif", "tif", "tif", "tif"]
    members = []
    for i, data in enumerate(images):
        members += [(f"{i:03d}.{kinds[i]}", data), (f"{i:03d}.txt", f"sample {i}".encode())]
    write_tar(tmp_path / "val" / "other-tool.tar", members)
    loader = ShardLoader(tmp_path, "val", batch_size=8, image_size=32, context_length=16, train=False,
                         drop_last=False, num_workers=0)
    (batch, _), = list(loader)
    got = batch.permute(0, 2, 3, 1).numpy().astype(int)
    for i, data in enumerate(images):  # exactly what prep's view of the image gives
        expected = dataloader.prepare_image(prep_dataset.upright_rgb(Image.open(io.BytesIO(data))), 32)
        assert np.array_equal(got[i], expected), i
    assert np.abs(got[0, :12] - (220, 30, 30)).max() < 30  # upright: red on top, blue below
    assert np.abs(got[0, -12:] - (30, 30, 220)).max() < 30
    assert got[1, :, :12].min() == 255 and np.abs(got[1, :, -12:] - (30, 200, 30)).max() < 5
    assert got[2].mean(axis=(0, 1))[0] > 200 and got[2].mean(axis=(0, 1))[1:].max() < 60  # red on screen too
    assert got[4, :, :12].min() == 255 and np.abs(got[4, :, -12:] - (200, 40, 40)).max() == 0  # a GIF's too
    assert np.abs(got[5] - 40000 // 256).max() <= 1  # 16-bit grey scaled to 8 bits, not clipped to white
    assert np.abs(got[6] - 64).max() <= 1 and np.abs(got[7] - 40000 // 257).max() <= 1  # not black, not white


def tarfile_index(path):
    """The reference: where tarfile says each regular file's bytes are, keyed the webdataset way."""
    out = {}
    with tarfile.open(path) as tf:
        for m in tf:
            if m.isfile():
                folder, _, base = m.name.rpartition("/")
                stem, _, ext = base.partition(".")
                out.setdefault(f"{folder}/{stem}" if folder else stem, {})[ext.lower()] = (m.offset_data, m.size)
    return out


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_the_tar_index_agrees_with_tarfile(tmp_path, fmt):
    from dataloader import index_shard
    long_dir = "d" * 120  # past the 100 bytes of a header's name field: prefix, GNU long name or pax path
    names = ["a.jpg", "a.txt", "sub/b.jpg", "sub/b.txt", f"{long_dir}/c.jpg", f"{long_dir}/c.txt", "d.tar.gz.jpg"]
    if fmt != tarfile.USTAR_FORMAT:
        names += ["é.jpg", "é.txt", f"{'e' * 150}.jpg"]  # non-ASCII; a file name that alone is too long for ustar
    path = tmp_path / "x.tar"
    with tarfile.open(path, "w", format=fmt) as tf:
        # folders hold no sample; a long folder name (its own long-name header) must not rename the next file
        for folder_name in ["sub"] + (["f" * 150] if fmt != tarfile.USTAR_FORMAT else []):
            folder = tarfile.TarInfo(folder_name)
            folder.type = tarfile.DIRTYPE
            tf.addfile(folder)
        for i, name in enumerate(names):
            data = bytes([i]) * (100 + 700 * i)  # some over a 512-byte block, some under
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "a.jpg"
        tf.addfile(link)
    samples, truncated = index_shard(str(path))
    assert samples == tarfile_index(path) and truncated == 0
    assert samples["d"] == {"tar.gz.jpg": samples["d"]["tar.gz.jpg"]}  # the extension runs from the first dot
    # cut inside the last file: every file but that one, and a count
    data = path.read_bytes()
    files = sorted((offset, key, ext) for key, exts in samples.items() for ext, (offset, _) in exts.items())
    (tmp_path / "cut.tar").write_bytes(data[:files[-1][0] + 10])
    cut, truncated = index_shard(str(tmp_path / "cut.tar"))
    assert truncated == 1 and sorted((o, k, e) for k, exts in cut.items() for e, (o, _) in exts.items()) == files[:-1]
    # garbage over the second file's header: only the first file, and a count
    second_header = files[1][0] - 512
    (tmp_path / "bad.tar").write_bytes(data[:second_header] + b"garbage!" * 64 + data[second_header + 512:])
    bad, truncated = index_shard(str(tmp_path / "bad.tar"))
    assert truncated == 1 and bad == {files[0][1]: {files[0][2]: samples[files[0][1]][files[0][2]]}}


def test_loader_processes_leave_the_cores_to_a_step_that_runs_on_them(monkeypatch):
    # the cores less one for the training loop, shared among the ranks of a node, 1 to 16; where the step itself
    # runs on a CPU of two cores (its threads on both), none: the batches are decoded in the training process
    for cores, processes, cpu_step, workers in ((8, 1, False, 7), (8, 8, False, 1), (64, 1, False, 16), (2, 1, False, 1),
                                                (2, 1, True, 0), (4, 2, True, 0), (1, 1, True, 0), (8, 1, True, 7)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)), raising=False)
        assert dataloader.default_num_workers(processes, cpu_step=cpu_step) == workers, (cores, processes, cpu_step)


def test_missing_data_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="prep_dataset.py --source shapes"):
        ShardLoader(tmp_path / "nope", "train", batch_size=4, image_size=32, context_length=8)


def test_eval_crop_is_the_centre_crop_or_a_resized_square():
    from dataloader import prepare_image
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (256, 300, 3), dtype=np.uint8))
    # within 8/7 of the target: the centre 224x224 pixels, untouched (the usual 224-of-256 crop)
    assert np.array_equal(prepare_image(img, 224), np.asarray(img)[16:240, 38:262])
    # the same size: the image itself
    small = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    assert np.array_equal(prepare_image(small, 64), np.asarray(small))
    # larger: the whole centre square, resized (a uniform image stays uniform, a half-split one stays split)
    halves = np.zeros((300, 400, 3), dtype=np.uint8)
    halves[:, 200:] = 255
    out = prepare_image(Image.fromarray(halves), 100)
    assert out.shape == (100, 100, 3) and out[:, :45].max() < 10 and out[:, 55:].min() > 245


def test_jpegs_decoded_at_a_reduced_scale_give_the_crop_of_the_full_decode():
    """Where the target is at most half the crop, the loader has the JPEG decoder shrink the image as it decodes.
    Each side is then rounded up on its own (501 x 375 at 1/4: 126 x 94), so the crop box must be scaled per side:
    with one scale for both, about a tenth of odd-sized photos failed ("box can't exceed original image size")
    and were skipped as bad samples (in other tools' shards of photos; prepared shards are square)."""
    from dataloader import prepare_image
    for w, h, size in ((301, 200, 64), (501, 375, 64), (375, 501, 64), (1023, 700, 224), (997, 1403, 224)):
        y, x = np.mgrid[:h, :w]
        pixels = np.stack([255 * x / w, 255 * y / h, 128 + 0 * x], -1).astype(np.uint8)  # a smooth ramp
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=95)
        full = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")  # decoded at full size: no draft
        moved = Image.fromarray(np.roll(np.asarray(full), 4, axis=1))  # the picture 4 pixels to the right
        for seed in (None, 0, 1):
            rng = lambda: None if seed is None else np.random.default_rng(seed)  # the same crop both ways
            reduced, reference, off = (prepare_image(image, size, rng()).astype(int)
                                       for image in (buf.getvalue(), full, moved))
            assert reduced.shape == (size, size, 3)
            # the same region: closer to the full decode's crop than that crop is to the one 4 pixels off
            assert np.abs(reduced - reference).mean() < np.abs(off - reference).mean(), (w, h, size, seed)


def test_a_tar_made_on_a_mac_holds_no_samples_in_its_resource_forks(tmp_path):
    """macOS's tar stores a ._x.jpg (the file's resource fork, not an image) beside each x.jpg, and zips made there
    a __MACOSX/ folder of them: no samples, neither for prep nor for the loader, and not counted as bad ones."""
    from dataloader import index_shard
    fork = b"\x00\x05\x16\x07" + bytes(200)
    members = []
    for i in range(3):
        members += [(f"._{i}.jpg", fork), (f"{i}.jpg", jpeg((60 * i, 2, 3))), (f"._{i}.txt", fork),
                    (f"{i}.txt", f"caption {i}".encode()), (f"__MACOSX/._{i}.jpg", fork)]
    write_tar(tmp_path / "mac.tar", members)
    samples, truncated = index_shard(str(tmp_path / "mac.tar"))
    assert sorted(samples) == ["0", "1", "2"] and truncated == 0
    m = prep_dataset.main(["--source", "webdataset", "--input", str(tmp_path / "mac.tar"), "--out_dir",
                           str(tmp_path / "out"), "--image_size", "32", "--val_fraction", "0", "--num_workers", "1"])
    assert m["counts"]["train"] == 3 and m["skipped"] == {}
