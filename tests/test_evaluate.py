import errno
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image

import dataloader
import evaluate
import prep_dataset
import train
from checkpoint_manager import CheckpointManager
from clip import CLIP, Tokenizer, get_config
from test_clip import free_port


def naive_topk(logits, targets, k):
    hits = 0
    for row, t in zip(logits.tolist(), targets.tolist()):
        order = sorted(range(len(row)), key=lambda j: -row[j])
        hits += t in order[:k]
    return hits / len(targets)


def naive_recall(img, txt, k, owner=None):
    """owner[j]: the image caption j describes. An image is found if any of its captions is in its top k."""
    owner = list(range(len(txt))) if owner is None else owner
    sim = (img @ txt.T).tolist()
    i2t = sum(any(owner[j] == i for j in sorted(range(len(r)), key=lambda j: -r[j])[:k])
              for i, r in enumerate(sim)) / len(sim)
    cols = [[sim[i][j] for i in range(len(img))] for j in range(len(txt))]
    t2i = sum(sorted(range(len(c)), key=lambda i: -c[i]).index(owner[j]) < k for j, c in enumerate(cols)) / len(cols)
    return i2t, t2i


def test_metrics_equal_naive_references():
    torch.manual_seed(0)
    logits, targets = torch.randn(50, 8), torch.randint(0, 8, (50,))
    acc = evaluate.topk_accuracy(logits, targets)
    assert acc["top1"] == pytest.approx(naive_topk(logits, targets, 1))
    assert acc["top5"] == pytest.approx(naive_topk(logits, targets, 5))
    img, txt = F.normalize(torch.randn(40, 16), dim=-1), F.normalize(torch.randn(40, 16), dim=-1)
    txt = F.normalize(txt + 0.4 * img, dim=-1)  # correlated, so recall is neither 0 nor 1
    got = evaluate.recall_at_k(img, txt)
    for k in (1, 5, 10):
        i2t, t2i = naive_recall(img, txt, k)
        assert got[f"image_to_text_R@{k}"] == pytest.approx(i2t)
        assert got[f"text_to_image_R@{k}"] == pytest.approx(t2i)
    assert 0 < got["image_to_text_R@1"] < 1
    assert evaluate.recall_at_k(img, txt, block=7) == got  # made in blocks of rows (large val sets), the same
    # several captions per image (COCO's five), in any order: each image's best-ranked caption counts
    owner = torch.cat([torch.arange(40), torch.randint(0, 40, (60,))])[torch.randperm(100)]
    txt = F.normalize(torch.randn(100, 16) + 0.5 * img[owner], dim=-1)
    got = evaluate.recall_at_k(img, txt, owner)
    for k in (1, 5, 10):
        i2t, t2i = naive_recall(img, txt, k, owner.tolist())
        assert got[f"image_to_text_R@{k}"] == pytest.approx(i2t)
        assert got[f"text_to_image_R@{k}"] == pytest.approx(t2i)
    assert 0 < got["image_to_text_R@1"] < 1 and 0 < got["text_to_image_R@1"] < 1
    assert evaluate.recall_at_k(img, txt, owner, block=7) == got


def test_retrieval_embeds_every_caption_of_every_image(tmp_path, monkeypatch, capsys):
    # shards where sample i has 1 to 3 captions (prep_dataset writes them as lines of KEY.txt)
    (tmp_path / "val").mkdir()
    captions = [[f"sample {i} caption {c}" for c in range(1 + i % 3)] for i in range(7)]
    for s, members in enumerate((range(0, 4), range(4, 7))):
        with tarfile.open(tmp_path / "val" / f"shard-{s:06d}.tar", "w") as tf:
            for i in members:
                for name, data in ((f"{i:04d}.jpg", Image.new("RGB", (40, 40), (30 * i, 0, 0))),
                                   (f"{i:04d}.txt", "\n".join(captions[i]).encode())):
                    if isinstance(data, Image.Image):
                        buf = io.BytesIO()
                        data.save(buf, "JPEG")
                        data = buf.getvalue()
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    torch.manual_seed(0)
    cfg = get_config("tiny", vision_layers=1, text_layers=1)
    model = CLIP(cfg).eval()
    tok = Tokenizer(cfg.encoding, cfg.context_length)
    off = torch.autocast("cpu", enabled=False)
    img, txt, labels, text_image = evaluate.embed_shards(model, str(tmp_path), "val", cfg, "cpu", off, batch_size=3,
                                                         num_workers=1)
    flat = [c for cs in captions for c in cs]
    assert img.shape[0] == 7 and txt.shape[0] == len(flat) == 13
    assert text_image.tolist() == [i for i, cs in enumerate(captions) for _ in cs]
    with torch.no_grad():
        torch.testing.assert_close(txt, model.encode_text(tok(flat)), atol=1e-5, rtol=1e-4)
    # its progress bar shows on a terminal only: a file (a batch job's log; here pytest's capture) gets no redraws
    capsys.readouterr()
    evaluate.embed_shards(model, str(tmp_path), "val", cfg, "cpu", off, batch_size=1, num_workers=0)
    assert "embed" not in capsys.readouterr().err
    # a cap on the samples keeps the captions of the images kept
    img, txt, _, text_image = evaluate.embed_shards(model, str(tmp_path), "val", cfg, "cpu", off, max_samples=4,
                                                    batch_size=3, num_workers=0)
    assert img.shape[0] == 4 and text_image.tolist() == [0, 1, 1, 2, 2, 2, 3] and txt.shape[0] == 7
    # during training, the evaluator indexes the shards once, at its first evaluation, and keeps the loader
    indexed = []
    monkeypatch.setattr(dataloader, "index_shard", lambda path, _index=dataloader.index_shard: indexed.append(path)
                        or _index(path))
    evaluator = evaluate.TrainingEvaluator("none", True, str(tmp_path), {}, cfg, "cpu", off, num_workers=0,
                                           batch_size=3)
    img, txt, _, text_image = evaluate.embed_shards(model, str(tmp_path), "val", cfg, "cpu", off, batch_size=3,
                                                    num_workers=0)
    expected = {f"retrieval/{k}": v for k, v in evaluate.recall_at_k(img, txt, text_image).items()}
    indexed.clear()
    assert evaluator(model) == evaluator(model) == expected and len(indexed) == 2  # the 2 shards, once
    # 3 ranks (training under DDP), each embedding its share of every batch: shares of 1 sample, of 2, and of a
    # last batch that leaves a rank none; every rank ends with what one process gets
    mp.spawn(_embed_worker, args=(3, free_port(), str(tmp_path)), nprocs=3)
    for batch_size, max_samples in EMBED_RUNS:
        one = evaluate.embed_shards(model, str(tmp_path), "val", cfg, "cpu", off, max_samples, batch_size, 0)
        for rank in range(3):
            got = torch.load(tmp_path / f"embedded-{batch_size}-{max_samples}-{rank}.pt")
            for a, b in zip(got, one):
                if isinstance(b, torch.Tensor):
                    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
                else:
                    assert a == b


# evaluate.py under torchrun, counting the images each process embeds
COUNTED = """
import os, sys
sys.path.insert(0, {root!r})
import clip, evaluate
embedded = [0]
def counted(self, images, *args, _encode=clip.CLIP.encode_image, **kwargs):
    embedded[0] += len(images)
    return _encode(self, images, *args, **kwargs)
clip.CLIP.encode_image = counted
evaluate.main(sys.argv[1:])
with open(os.path.join({out!r}, "embedded" + os.environ["RANK"]), "w") as f:
    f.write(str(embedded[0]))
"""


EMBED_RUNS = ((1, None), (2, None), (6, None), (2, 4))  # samples per rank per batch, and a cap


def _embed_worker(rank, world, port, data_dir):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = get_config("tiny", vision_layers=1, text_layers=1)
    model = CLIP(cfg).eval()
    for batch_size, max_samples in EMBED_RUNS:
        out = evaluate.embed_shards(model, data_dir, "val", cfg, "cpu", torch.autocast("cpu", enabled=False),
                                    max_samples, batch_size, 0, rank, world)
        torch.save(out, os.path.join(data_dir, f"embedded-{batch_size}-{max_samples}-{rank}.pt"))
    dist.destroy_process_group()


def test_tied_candidates_are_ranked_at_random_not_in_the_true_matchs_favour():
    # a model whose embeddings all coincide: every candidate ties, so recall@k is k / N (it used to be 100%)
    same = F.normalize(torch.ones(10, 16), dim=-1)
    got = evaluate.recall_at_k(same, same)
    for k in (1, 5, 10):
        assert got[f"image_to_text_R@{k}"] == pytest.approx(k / 10) and got[f"text_to_image_R@{k}"] == pytest.approx(k / 10)
    # 4 images (e_i + 2 e_7), each with a caption of its own (0.1 e_i) and a copy of one caption (e_7) that every
    # image scores higher than its own; image 0 holds two copies. Every image's best caption ties with all 5 copies
    img = torch.eye(4, 8) + 2 * torch.eye(8)[7]
    txt = torch.cat([0.1 * torch.eye(4, 8), torch.eye(8)[7].expand(5, 8)])
    owner = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0])
    got = evaluate.recall_at_k(img, txt, owner, ks=(1, 2, 4))
    # images 1-3: 1 of the 5 tied is theirs (R@k = k / 5); image 0: 2 of 5, R@1 2/5, R@2 1 - C(3,2)/C(5,2), R@4 1
    assert got["image_to_text_R@1"] == pytest.approx((3 * 1 / 5 + 2 / 5) / 4)
    assert got["image_to_text_R@2"] == pytest.approx((3 * 2 / 5 + (1 - 3 / 10)) / 4)
    assert got["image_to_text_R@4"] == pytest.approx((3 * 4 / 5 + 1) / 4)
    # as queries: an own caption finds its image alone at the top; a copy ties over the 4 images
    assert got["text_to_image_R@1"] == pytest.approx((4 + 5 * 1 / 4) / 9)
    assert got["text_to_image_R@2"] == pytest.approx((4 + 5 * 2 / 4) / 9)
    # NaN embeddings (a diverged model) find nothing: NaN ties with nothing, not even itself
    broken = torch.full((6, 8), float("nan"))
    assert all(v == 0.0 for v in evaluate.recall_at_k(broken, broken).values())


def test_a_perfect_model_scores_100_percent():
    emb = F.normalize(torch.randn(30, 16), dim=-1)
    assert all(v == 1.0 for v in evaluate.recall_at_k(emb, emb).values())
    classes = F.normalize(torch.randn(6, 16), dim=-1)
    targets = torch.arange(30) % 6
    assert evaluate.topk_accuracy(classes[targets] @ classes.T, targets) == {"top1": 1.0, "top5": 1.0}


class ColourOracle(torch.nn.Module):
    """Knows red, green and blue perfectly: an image's embedding is its dominant channel, a prompt's the
    colour word it holds. Evaluated with it, every image must come out right."""

    def __init__(self, tokenizer):
        super().__init__()
        self.words = [tokenizer.enc.encode_ordinary(" " + c)[0] for c in ("red", "green", "blue")]

    def encode_image(self, images):
        return F.one_hot(images.float().mean(dim=(2, 3)).argmax(dim=1), 3).float()

    def encode_text(self, tokens):
        return torch.stack([(tokens == w).any(dim=1) for w in self.words], dim=1).float()


def test_zeroshot_classification_scores_a_perfect_model_perfectly(tmp_path):
    # class folders, one named as ImageNet names classes (synonyms after a comma); images of odd sizes
    rng = np.random.default_rng(0)
    for c, folder in enumerate(["red_thing", "green, viridian", "blue"]):
        (tmp_path / folder).mkdir()
        for i in range(4):
            pixels = rng.integers(0, 80, (30 + 7 * i, 40 + 5 * c, 3))
            pixels[..., c] += 150
            Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / folder / f"{i}.png")
    (tmp_path / "blue" / "9.png").write_bytes(b"not an image")  # found as an image by its name, undecodable
    ds, image_col, label_col, classnames = evaluate.load_classification(str(tmp_path))
    assert classnames == ["blue", "green", "red thing"]
    cfg = get_config("tiny")
    oracle = ColourOracle(Tokenizer(cfg.encoding, cfg.context_length))
    # 13 files in batches of 5 (the last one short), decoded by 2 worker processes: labels stay with their
    # images, the classes with their names, and the file that does not decode is left out and counted
    got = evaluate.zeroshot_classification(oracle, str(tmp_path), cfg, "cpu", torch.autocast("cpu", enabled=False),
                                           templates=["a {}", "a photo of a {}."], batch_size=5, num_workers=2)
    assert got == {"top1": 1.0, "top5": 1.0, "classes": 3, "samples": 12, "unreadable": 1}
    # a capped look (--max_samples): a random subset, the same each run, its labels still with their images
    capped = [evaluate.zeroshot_classification(oracle, str(tmp_path), cfg, "cpu", torch.autocast("cpu", enabled=False),
                                               batch_size=4, num_workers=0, max_samples=7) for _ in range(2)]
    assert capped[0] == capped[1] and capped[0]["top1"] == 1.0
    assert capped[0]["samples"] + capped[0]["unreadable"] == 7


def test_imagefolder_loading_and_the_cli(tmp_path, capsys, monkeypatch):
    root = tmp_path / "folder"
    colors = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (30, 60, 230)}
    for name, rgb in colors.items():
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40 + i, 30), rgb).save(root / name / f"{i}.png")
    # what a zip made on a Mac holds besides (__MACOSX/ and ._x resource forks) and hidden files are no data
    (root / "__MACOSX" / "red").mkdir(parents=True)
    for junk in (root / "__MACOSX" / "red" / "._0.png", root / "red" / "._0.png", root / "red" / ".hidden.png"):
        junk.write_bytes(b"\x00\x05\x16\x07" + bytes(200))
    (root / "annotations").mkdir()  # a subfolder without images is no class, and that is said
    capsys.readouterr()
    ds, image_col, label_col, classnames = evaluate.load_classification(str(root))
    assert sorted(classnames) == sorted(colors) and len(ds) == 9
    assert "1 subfolder(s) without images left out of the classes: annotations" in capsys.readouterr().err
    assert image_col == "image" and label_col == "label"
    # a checkpoint from a random tiny model: the numbers are chance, the plumbing is real
    cfg = get_config("tiny", vision_layers=1, text_layers=1)
    model = CLIP(cfg)
    ckpt = CheckpointManager(str(tmp_path / "run")).save(0, {"model": model.state_dict(), "model_config": cfg.__dict__})
    out = tmp_path / "results" / "r.json"  # its folder is made
    results = evaluate.main([ckpt, "--zeroshot", str(root), "--templates", "a {} square", "a photo of {}",
                             "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["samples"] == 9 and saved["classes"] == 3 and saved["unreadable"] == 0
    assert 0 <= saved["top1"] <= 1 and saved["top5"] == 1.0  # 3 classes: the top 5 hold them all
    assert saved == json.loads(json.dumps(results))
    # --json given a folder: the results go into it as results.json (not a failure after the whole evaluation)
    (tmp_path / "all_results").mkdir()
    evaluate.main([ckpt, "--zeroshot", str(root), "--json", str(tmp_path / "all_results")])
    assert json.loads((tmp_path / "all_results" / "results.json").read_text())["samples"] == 9
    # several sets at once, as train.py --zeroshot takes them: each its own results
    other = tmp_path / "other"
    for name in ("square", "round"):
        (other / name).mkdir(parents=True)
        Image.new("RGB", (30, 30), (9, 9, 9)).save(other / name / "0.png")
    both = evaluate.main([ckpt, "--zeroshot", f"{root},{other}"])["zeroshot"]
    assert both["folder"]["samples"] == 9 and both["other"]["classes"] == 2  # named as in the training log
    # --split for a set with splits (a local `datasets` copy, its test split in Parquet) does not stop a set of
    # class folders beside it, which has none: read whole, and said
    import datasets
    datasets.Dataset.from_dict({"img": [Image.new("RGB", (24, 24), (9, 9, 9 * i)) for i in range(4)], "label": [0, 1, 1, 0]},
                               features=datasets.Features({"img": datasets.Image(),
                                                           "label": datasets.ClassLabel(names=["dark", "light"])})
                               ).to_parquet(str(tmp_path / "copy" / "plain_text" / "test-00000-of-00001.parquet"))
    capsys.readouterr()
    both = evaluate.main([ckpt, "--zeroshot", f"{root},{tmp_path / 'copy'}", "--split", "test"])["zeroshot"]
    assert both["folder"]["samples"] == 9 and both["copy"]["samples"] == 4
    assert f"{root} has no split folders, only class folders: read as they are" in capsys.readouterr().err
    # retrieval on shards
    prep_dataset.main(["--source", "shapes", "--out_dir", str(tmp_path / "shapes"), "--limit", "60",
                       "--val_fraction", "0.5", "--num_workers", "1"])
    earlier = out.read_text()
    with monkeypatch.context() as m:  # a full disk as the results are written: the earlier file stays whole
        def disk_full(fd):
            raise OSError(errno.ENOSPC, "No space left on device")
        m.setattr(os, "fsync", disk_full)
        with pytest.raises(SystemExit, match=r"could not write --json .*r.json \(No space left on device\); the "
                                             "results are in the table above"):
            evaluate.main([ckpt, "--retrieval", str(tmp_path / "shapes" / "val"), "--json", str(out)])
    assert out.read_text() == earlier and os.listdir(out.parent) == ["r.json"]
    results = evaluate.main([ckpt, "--retrieval", str(tmp_path / "shapes" / "val"), "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["retrieval_samples"] == 30
    # the run directory stands for its checkpoint (this run kept no best.pt: its newest)
    assert evaluate.main([str(tmp_path / "run"), "--retrieval", str(tmp_path / "shapes" / "val")]) == results
    # under torchrun each process scores its share of the images: one process's figures, shown and written once
    both_ways = [ckpt, "--zeroshot", str(root), "--retrieval", str(tmp_path / "shapes" / "val"), "--batch_size", "4",
                 "--num_workers", "0", "--json"]
    alone = evaluate.main([*both_ways, str(tmp_path / "alone.json")])
    (tmp_path / "counted.py").write_text(COUNTED.format(root=os.path.dirname(evaluate.__file__), out=str(tmp_path)))
    shared = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(tmp_path / "counted.py"), *both_ways, str(tmp_path / "shared.json")],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert shared.returncode == 0, shared.stderr
    assert json.loads((tmp_path / "shared.json").read_text()) == pytest.approx(alone)
    assert shared.stdout.count("retrieval_samples") == 1 and alone["samples"] == 9 and alone["retrieval_samples"] == 30
    # the 9 zero-shot images and the 30 retrieval samples, shared: each process embedded about half (4 or 5 of the 9;
    # of the 30, in batches of 4 for each process, 16 and 14)
    shares = [int((tmp_path / f"embedded{r}").read_text()) for r in (0, 1)]
    assert sorted(shares) == [4 + 14, 5 + 16], shares
    # a prepared set's own tasks (the shapes set's): other prompts with --templates, a sample with --max_samples;
    # the class flags of folders and `datasets` sets are refused, not ignored
    used = []
    with monkeypatch.context() as m:
        m.setattr(evaluate, "class_embeddings", lambda model, tok, classes, templates, *a, _f=evaluate.class_embeddings:
                  used.append(templates) or _f(model, tok, classes, templates, *a))
        tasks = evaluate.main([ckpt, "--zeroshot", str(tmp_path / "shapes"), "--templates", "a {} thing",
                               "--max_samples", "10"])["zeroshot"]
    assert set(tasks) == {"shape", "color"} and used == [["a {} thing"]] * 2
    (tmp_path / "names.txt").write_text("red\ngreen\n")
    with pytest.raises(SystemExit):
        evaluate.main([ckpt, "--zeroshot", str(tmp_path / "shapes"), "--classnames", str(tmp_path / "names.txt")])
    assert "--classnames is for class folders and `datasets` sets" in capsys.readouterr().err
    # a prepared dataset without zero-shot tasks is refused for --zeroshot: its split folders are not classes
    (tmp_path / "pairs").mkdir()
    for i in range(4):
        Image.new("RGB", (40, 40), (60 * i, 0, 0)).save(tmp_path / "pairs" / f"{i}.png")
        (tmp_path / "pairs" / f"{i}.txt").write_text(f"picture {i}")
    prep_dataset.main(["--source", "folder", "--input", str(tmp_path / "pairs"), "--out_dir", str(tmp_path / "plain"),
                       "--val_fraction", "0.5", "--num_workers", "1"])
    with pytest.raises(SystemExit):
        evaluate.main([ckpt, "--zeroshot", str(tmp_path / "plain")])
    assert "no zero-shot tasks" in capsys.readouterr().err
    # several prepared sets' val splits, read as one; a folder that is not there is a usage error
    both = evaluate.main([ckpt, "--retrieval", f"{tmp_path / 'shapes'},{tmp_path / 'plain'}"])
    assert both["retrieval_samples"] == 30 + 2
    with pytest.raises(SystemExit):
        evaluate.main([ckpt, "--retrieval", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert "no folder" in err and "prep_dataset.py" not in err  # nothing to prepare a set from either
    prep_dataset.main(["--source", "shapes", "--out_dir", str(tmp_path / "one"), "--limit", "40", "--val_fraction", "0.03",
                       "--num_workers", "1"])
    with pytest.raises(SystemExit):  # one image to search among: found whatever the model, a figure of nothing
        evaluate.main([ckpt, "--retrieval", str(tmp_path / "one")])
    assert "1 image to search among; retrieval needs two or more" in capsys.readouterr().err
    # data not yet made into shards (a hub set, a table, a folder of pairs): the two commands that score it
    (tmp_path / "pairs.csv").write_text("image,caption\nred/0.png,red\n")
    for given, source in (("nlphuji/flickr_1k_test_image_text_retrieval", "hub --input nlphuji/flickr_1k_test_image_text"
                           "_retrieval --split test"), (str(tmp_path / "pairs.csv"), f"table --input {tmp_path / 'pairs.csv'}"),
                          (str(root), f"folder --input {root}")):
        with pytest.raises(SystemExit):
            evaluate.main([ckpt, "--retrieval", given])
        err = capsys.readouterr().err
        name = os.path.splitext(os.path.basename(given))[0]
        assert f"python prep_dataset.py --source {source} --val_fraction 1 --out_dir data/{name}-eval" in err, err
        assert f"python evaluate.py CHECKPOINT --retrieval data/{name}-eval" in err
    prep_dataset.main(["--source", "shapes", "--out_dir", str(tmp_path / "no_val"), "--limit", "10", "--val_fraction", "0",
                       "--num_workers", "1"])
    with pytest.raises(SystemExit):  # a set with no held-out split: said so, with the ways to go on
        evaluate.main([ckpt, "--retrieval", str(tmp_path / "no_val")])
    assert "has no val/ shards (prepared with --val_fraction 0)" in capsys.readouterr().err
    for k in (1, 5, 10):
        assert 0 <= saved[f"image_to_text_R@{k}"] <= 1 and 0 <= saved[f"text_to_image_R@{k}"] <= 1
    # images given as files are scored against texts; both are needed
    with pytest.raises(SystemExit):
        evaluate.main([ckpt, "--images", str(root / "red" / "0.png")])
    with pytest.raises(SystemExit):
        evaluate.main([str(tmp_path / "run" / "missing.pt"), "--retrieval", str(tmp_path)])
    assert "no checkpoint at" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main([str(tmp_path / "pairs"), "--retrieval", str(tmp_path / "shapes")])  # a folder, but not a run's
    assert "no checkpoint in" in capsys.readouterr().err
    (tmp_path / "not_an_image.png").write_bytes(b"text, not pixels")
    with pytest.raises(SystemExit):
        evaluate.main([ckpt, "--images", str(tmp_path / "not_an_image.png"), "--texts", "red"])
    assert "cannot identify image file" in capsys.readouterr().err
    # in a folder of photos, one that does not decode is left out and named; the others are scored as without it
    photos = tmp_path / "photos"
    shutil.copytree(root / "blue", photos)
    (photos / "1b.jpg").write_bytes(b"\xff\xd8 a JPEG cut off at its start")
    mixed = evaluate.main([ckpt, "--images", str(photos), "--texts", "red", "blue", "--json", str(tmp_path / "m.json")])
    assert "warning: left out " + str(photos / "1b.jpg") in capsys.readouterr().err
    alone = evaluate.main([ckpt, "--images", str(photos / "0.png"), str(photos / "1.png"), str(photos / "2.png"),
                           "--texts", "red", "blue"])["images"]
    assert list(mixed["images"]) == list(alone) and all(mixed["images"][k] == pytest.approx(alone[k]) for k in alone)
    assert list(json.loads((tmp_path / "m.json").read_text())["images_left_out"]) == [str(photos / "1b.jpg")]
    # a prepared set asked for a split it does not have: its splits are named (not "holds tables", for its manifest)
    with pytest.raises(SystemExit):
        evaluate.main([ckpt, "--zeroshot", str(tmp_path / "shapes"), "--split", "test"])
    assert f"the prepared set {tmp_path / 'shapes'} has the splits train and val" in capsys.readouterr().err
    # zero-shot on a folder of images with no class folders: what zero-shot reads, and how to score captions instead
    with pytest.raises(SystemExit, match="no class folders: zero-shot reads ROOT/CLASS/image files"):
        evaluate.main([ckpt, "--zeroshot", str(photos)])
    # a folder with no shards, or a device torch cannot use: usage errors that say why
    with pytest.raises(SystemExit):
        evaluate.main([ckpt, "--retrieval", str(root)])
    assert "no shards in" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main([ckpt, "--retrieval", str(tmp_path / "shapes"), "--device", "cuda"])  # CUDA is hidden
    assert "--device cuda:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main([ckpt, "--retrieval", str(tmp_path / "shapes"), "--batch_size", "0"])  # a division by zero
    assert "--batch_size 0: must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # zero-shot's settings with no zero-shot set: said, not ignored
        evaluate.main([ckpt, "--retrieval", str(tmp_path / "shapes"), "--templates", "a photo of a {}."])
    assert "--templates is for --zeroshot" in capsys.readouterr().err
    (tmp_path / "texts.txt").write_text("red\nblue\n")  # the candidate captions from a file, one per line
    from_file = evaluate.main([ckpt, "--images", str(root / "red" / "0.png"), "--texts", str(tmp_path / "texts.txt")])
    probs = evaluate.main([ckpt, "--images", str(root / "red" / "0.png"), "--texts", "red", "blue"])["images"]
    assert from_file["images"] == probs
    assert list(probs) == [str(root / "red" / "0.png")] and sum(probs[str(root / "red" / "0.png")].values()) == pytest.approx(1)
    # folders of images too, a batch at a time: the same figures as all at once
    probs = evaluate.main([ckpt, "--images", str(root / "blue"), str(root / "red" / "0.png"), "--texts", "red", "blue",
                           "--batch_size", "3"])["images"]
    assert list(probs) == [str(root / "blue" / f"{i}.png") for i in range(3)] + [str(root / "red" / "0.png")]
    whole = evaluate.main([ckpt, "--images", str(root / "blue"), str(root / "red" / "0.png"), "--texts", "red", "blue"])
    assert all(probs[k] == pytest.approx(whole["images"][k], abs=1e-6) for k in probs)
    # a folder of folders: every image under it, in order, but for what is no data (the Mac's files above)
    nested = evaluate.main([ckpt, "--images", str(root), "--texts", "red", "blue"])["images"]
    assert list(nested) == sorted(str(p) for p in root.rglob("*.png") if "MACOSX" not in str(p) and "/." not in str(p))
    assert len(nested) == 9
    assert all(nested[k] == pytest.approx(whole["images"][k], abs=1e-6) for k in whole["images"])
    # in bf16 (as on a CPU with bf16 units): the same figures up to bf16's rounding, not identical
    half = evaluate.main([ckpt, "--images", str(root / "blue"), str(root / "red" / "0.png"), "--texts", "red", "blue",
                          "--precision", "bf16"])["images"]
    diffs = [abs(half[k][t] - whole["images"][k][t]) for k in half for t in ("red", "blue")]
    assert 0 < max(diffs) < 0.01
    # the shapes set's own tasks: each task's figures are printed, not only their mean
    capsys.readouterr()
    results = evaluate.main([ckpt, "--zeroshot", str(tmp_path / "shapes")])
    printed = capsys.readouterr().out
    for task in ("shape", "color"):
        for k in ("top1", "top5"):
            assert f"zeroshot/{task}/{k}" in printed
            assert f"{100 * results['zeroshot'][task][k]:.2f}%" in printed


def test_class_folders_by_split_and_sets_with_hidden_labels(tmp_path, capsys, monkeypatch):
    def folder(root, classes, n=2):
        for c in classes:
            (root / c / "nested").mkdir(parents=True)
            for i in range(n):  # images at any depth inside a class folder belong to it
                Image.new("RGB", (20, 20), (10 * i, 0, 0)).save(root / c / ("nested" if i else "") / f"{i}.png")
            (root / c / "notes.txt").write_text("not an image")
    # an ImageNet-style train/ + val/: the held-out split by default, another by --split
    folder(tmp_path / "splits" / "train", ["cat", "dog"], n=3)
    folder(tmp_path / "splits" / "val", ["cat", "dog", "hot_dog"])
    rows, image_col, label_col, classnames = evaluate.load_classification(str(tmp_path / "splits"))
    assert classnames == ["cat", "dog", "hot dog"] and len(rows) == 6
    assert [r[label_col] for r in rows] == [0, 0, 1, 1, 2, 2]
    assert all(f"{os.sep}val{os.sep}" in r[image_col]["path"] for r in rows)
    rows, _, _, classnames = evaluate.load_classification(str(tmp_path / "splits"), split="train")
    assert classnames == ["cat", "dog"] and len(rows) == 6
    # class folders named like splits among others are classes (CIFAR-100 has "train"), and a lone class is one
    folder(tmp_path / "cifar", ["bus", "tractor", "train"])
    assert evaluate.load_classification(str(tmp_path / "cifar"))[3] == ["bus", "tractor", "train"]
    with pytest.raises(SystemExit, match="--label_column is for `datasets` sets: the classes of .* are its folders"):
        evaluate.load_classification(str(tmp_path / "cifar"), label_column="coarse_label")
    # CUB-200's and Caltech-256's numbered folders: the prompts say the name, not the number
    folder(tmp_path / "cub", ["001.Black_footed_Albatross", "002.Laysan_Albatross"], n=1)
    assert evaluate.load_classification(str(tmp_path / "cub"))[3] == ["Black footed Albatross", "Laysan Albatross"]
    folder(tmp_path / "flowers", ["1", "2", "10"], n=1)  # Flowers-102's folders: numbers, said as for ImageNet's ids
    capsys.readouterr()
    evaluate.load_classification(str(tmp_path / "flowers"))
    assert "are numbers (1, ...)" in capsys.readouterr().err
    folder(tmp_path / "digits", ["0", "1"], n=1)  # but digits are what they show
    evaluate.load_classification(str(tmp_path / "digits"))
    assert "numbers" not in capsys.readouterr().err
    # one class folder: every image would be "right", a 100% that means nothing; often a wrapper folder holds the
    # classes (an archive unpacked into a folder of its own name), and the message says where to point instead
    folder(tmp_path / "one" / "wrapper", ["cat", "dog"])
    with pytest.raises(SystemExit, match=r"one holds 1 class \(wrapper\): zero-shot classification needs two or more; "
                                         r"are the class folders one level down\? Then give --zeroshot .*one/wrapper"):
        evaluate.load_classification(str(tmp_path / "one"))
    assert evaluate.load_classification(str(tmp_path / "one" / "wrapper"))[3] == ["cat", "dog"]
    # folders named by id get their names from a file: ImageNet's "FOLDER NAME" mapping, or names in order
    folder(tmp_path / "ids", ["n01443537", "n01440764"])
    capsys.readouterr()
    evaluate.load_classification(str(tmp_path / "ids"))
    assert "WordNet ids (n01440764, ...)" in capsys.readouterr().err  # without names: said, not silently scored
    (tmp_path / "mapping.txt").write_text("n00000000 ignored\nn01440764 tench, Tinca tinca\n"
                                          "n01443537 goldfish, Carassius auratus\n")
    assert evaluate.load_classification(str(tmp_path / "ids"), None, str(tmp_path / "mapping.txt"))[3] == ["tench", "goldfish"]
    # or from Keras' imagenet_class_index.json (by index: [folder, name]), or a JSON list of names in order
    (tmp_path / "imagenet_class_index.json").write_text(json.dumps(
        {"1": ["n01443537", "goldfish"], "0": ["n01440764", "tench"], "10": ["n01530575", "brambling"]}))
    assert evaluate.load_classification(str(tmp_path / "ids"), None,
                                        str(tmp_path / "imagenet_class_index.json"))[3] == ["tench", "goldfish"]
    assert evaluate.classname_lines(str(tmp_path / "imagenet_class_index.json")) == [
        "n01440764 tench", "n01443537 goldfish", "n01530575 brambling"]
    (tmp_path / "names.json").write_text(json.dumps(["great_white_shark", "goldfish"]))
    assert evaluate.load_classification(str(tmp_path / "ids"), None, str(tmp_path / "names.json"))[3] == \
        ["great white shark", "goldfish"]
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SystemExit, match="bad.json is not a JSON file of class names"):
        evaluate.load_classification(str(tmp_path / "ids"), None, str(tmp_path / "bad.json"))
    # and during training, from train.py --zeroshot_classnames
    prompts = []
    monkeypatch.setattr(evaluate, "class_embeddings", lambda model, tok, names, *a: prompts.append(names) or
                        torch.nn.functional.normalize(torch.randn(len(names), 128), dim=1))
    cfg = get_config("tiny", vision_layers=1, text_layers=1)
    evaluator = evaluate.TrainingEvaluator(str(tmp_path / "ids"), False, str(tmp_path), {}, cfg, "cpu",
                                           torch.autocast("cpu", enabled=False), num_workers=0,
                                           classnames_file=str(tmp_path / "mapping.txt"))
    assert set(evaluator(CLIP(cfg))) == {"zeroshot/ids/top1", "zeroshot/ids/top5"} and prompts == [["tench", "goldfish"]]
    # a split folder logs under its set's name (splits/val as "splits"), so two sets' val/ do not collide
    evaluator = evaluate.TrainingEvaluator(f"{tmp_path / 'splits' / 'val'},{tmp_path / 'cifar'}", False, str(tmp_path),
                                           {}, cfg, "cpu", torch.autocast("cpu", enabled=False), num_workers=0)
    assert set(evaluator(CLIP(cfg))) == {f"zeroshot/{n}/top{k}" for n in ("splits", "cifar") for k in (1, 5)}
    (tmp_path / "names.txt").write_text("a tench\na goldfish\n")
    assert evaluate.load_classification(str(tmp_path / "ids"), None, str(tmp_path / "names.txt"))[3] == ["a tench", "a goldfish"]
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    with pytest.raises(SystemExit, match="3 lines for 2 classes"):
        evaluate.load_classification(str(tmp_path / "ids"), None, str(tmp_path / "three.txt"))
    (tmp_path / "latin.txt").write_bytes("café\nthé\n".encode("cp1252"))
    with pytest.raises(SystemExit, match="--classnames .*latin.txt is not UTF-8 text"):
        evaluate.load_classification(str(tmp_path / "ids"), None, str(tmp_path / "latin.txt"))
    # a local copy of a `datasets` set whose test split hides some labels (-1): those rows are left out
    import datasets

    def png(rgb):
        buf = io.BytesIO()
        Image.new("RGB", (20, 20), rgb).save(buf, "PNG")
        return {"bytes": buf.getvalue(), "path": None}
    features = datasets.Features({"img": datasets.Image(), "fine": datasets.ClassLabel(names=["red", "blue"])})
    (tmp_path / "hub").mkdir()
    datasets.Dataset.from_dict({"img": [png((255, 0, 0)), png((0, 0, 255)), png((9, 9, 9))], "fine": [0, 1, -1]},
                               features=features).to_parquet(str(tmp_path / "hub" / "test.parquet"))
    rows, image_col, label_col, classnames = evaluate.load_classification(str(tmp_path / "hub"))
    assert (image_col, label_col, classnames, len(rows)) == ("img", "fine", ["red", "blue"], 2)
    assert "1 of 3 images" in capsys.readouterr().err
    datasets.Dataset.from_dict({"img": [png((9, 9, 9))], "fine": [-1]}, features=features).to_parquet(
        str(tmp_path / "hub" / "test.parquet"))
    with pytest.raises(SystemExit, match="holds no labels"):
        evaluate.load_classification(str(tmp_path / "hub"))
    # no --split, and a validation split beside the hidden test one (ImageNet's on the hub): that one, said so
    datasets.Dataset.from_dict({"img": [png((255, 0, 0)), png((0, 0, 255))], "fine": [0, 1]}, features=features
                               ).to_parquet(str(tmp_path / "hub" / "validation.parquet"))
    capsys.readouterr()
    rows, _, label_col, _ = evaluate.load_classification(str(tmp_path / "hub"))
    assert rows[label_col] == [0, 1]
    assert "the test split of" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="the test split of .* holds no labels"):  # asked for: that split, or nothing
        evaluate.load_classification(str(tmp_path / "hub"), split="test")
    # no test split at all (Food-101's train and validation): the validation split, said so
    (tmp_path / "hub" / "test.parquet").rename(tmp_path / "hub" / "train.parquet")
    rows, _, label_col, _ = evaluate.load_classification(str(tmp_path / "hub"))
    assert rows[label_col] == [0, 1] and "has no test split: evaluating on its validation split" in capsys.readouterr().err
    # labels kept as text (many community sets): the classes are their distinct values
    (tmp_path / "text").mkdir()
    datasets.Dataset.from_dict({"image": [png((255, 0, 0)), png((0, 0, 255)), png((250, 0, 0))],
                                "label": ["red", "blue", "red"]},
                               features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})
                               ).to_parquet(str(tmp_path / "text" / "test.parquet"))
    rows, _, label_col, classnames = evaluate.load_classification(str(tmp_path / "text"))
    assert [classnames[r] for r in rows[label_col]] == ["red", "blue", "red"]
    # several class columns (FGVC-Aircraft's family, manufacturer, variant): the first, said so; or the one asked for
    (tmp_path / "several").mkdir()
    capsys.readouterr()
    datasets.Dataset.from_dict({"image": [png((255, 0, 0)), png((0, 0, 255))], "family": [0, 0], "variant": [1, 0]},
                               features=datasets.Features({"image": datasets.Image(),
                                                           "family": datasets.ClassLabel(names=["warm", "cool"]),
                                                           "variant": datasets.ClassLabel(names=["red", "blue"])})
                               ).to_parquet(str(tmp_path / "several" / "test.parquet"))
    assert evaluate.load_classification(str(tmp_path / "several"))[2:] == ("family", ["warm", "cool"])
    assert "several class columns (family, variant): using family; choose another with --label_column" in \
        capsys.readouterr().err
    rows, _, label_col, classnames = evaluate.load_classification(str(tmp_path / "several"), label_column="variant")
    assert (label_col, classnames, rows[label_col]) == ("variant", ["red", "blue"], [1, 0])
    with pytest.raises(SystemExit, match="--label_column 'kind' is not a column of .*: it has image, family, variant"):
        evaluate.load_classification(str(tmp_path / "several"), label_column="kind")
    # during training the same set is evaluated again and again: its notes are said once
    evaluator = evaluate.TrainingEvaluator(str(tmp_path / "several"), False, str(tmp_path), {}, cfg, "cpu",
                                           torch.autocast("cpu", enabled=False), num_workers=0)
    capsys.readouterr()
    assert set(evaluator(CLIP(cfg))) == set(evaluator(CLIP(cfg))) == {"zeroshot/several/top1", "zeroshot/several/top5"}
    assert capsys.readouterr().err.count("several class columns") == 1
    # a class column of text, asked for by name beside a ClassLabel one
    (tmp_path / "mixed").mkdir()
    datasets.Dataset.from_dict({"image": [png((255, 0, 0)), png((0, 0, 255))], "split": [0, 0], "name": ["red", "blue"]},
                               features=datasets.Features({"image": datasets.Image(),
                                                           "split": datasets.ClassLabel(names=["a", "b"]),
                                                           "name": datasets.Value("string")})
                               ).to_parquet(str(tmp_path / "mixed" / "test.parquet"))
    rows, _, label_col, classnames = evaluate.load_classification(str(tmp_path / "mixed"), label_column="name")
    assert [classnames[r] for r in rows[label_col]] == ["red", "blue"]
    # what save_to_disk wrote, a lone Dataset or a DatasetDict of splits (load_dataset refuses both)
    saved = datasets.Dataset.from_dict({"img": [png((255, 0, 0)), png((0, 0, 255))], "fine": [1, 0]}, features=features)
    saved.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": saved, "validation": saved.select([0])}).save_to_disk(str(tmp_path / "saved_dict"))
    rows, _, label_col, classnames = evaluate.load_classification(str(tmp_path / "saved"))
    assert rows[label_col] == [1, 0] and classnames == ["red", "blue"]
    assert len(evaluate.load_classification(str(tmp_path / "saved_dict"), split="validation")[0]) == 1
    assert len(evaluate.load_classification(str(tmp_path / "saved_dict"))[0]) == 1  # no test split: validation
    with pytest.raises(SystemExit, match=r"--split test: .* has the split folders \['train', 'validation'\]"):
        evaluate.load_classification(str(tmp_path / "saved_dict"), split="test")
    with pytest.raises(SystemExit, match="has the split folders"):
        evaluate.load_classification(str(tmp_path / "splits"), split="test")
    # class folders and no split folders: a --split (meant for another set evaluated beside them) leaves them whole
    capsys.readouterr()
    assert evaluate.load_classification(str(tmp_path / "cifar"), split="test")[3] == ["bus", "tractor", "train"]
    assert "has no split folders, only class folders: read as they are (--split test" in capsys.readouterr().err
    (tmp_path / "notes" / "a").mkdir(parents=True)
    (tmp_path / "notes" / "a" / "readme.txt").write_text("no images")
    with pytest.raises(SystemExit, match="could not load"):  # neither class folders nor a `datasets` set
        evaluate.load_classification(str(tmp_path / "notes"), split="test")
    # a local folder's name mistyped, relative as "owner/name" hub names are: said at once, with the folder
    # meant, instead of a hub lookup that fails after half a minute of retries without a network
    monkeypatch.chdir(tmp_path.parent)
    with pytest.raises(SystemExit, match=rf"no such folder; did you mean {tmp_path.name}/saved_dict\?"):
        evaluate.load_classification(f"{tmp_path.name}/saved_dic", split="validation")



def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    code = readme.split("A trained model in your own code")[1].split("```python\n")[1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    cfg = get_config("tiny", vision_layers=1, text_layers=1)
    CheckpointManager("runs/demo").save(0, {"model": CLIP(cfg).state_dict(), "model_config": cfg.__dict__}, val_loss=1.0)
    Image.new("RGB", (90, 70), (200, 30, 30)).save("my.png")
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    probs = namespace["probs"]
    assert probs.shape == (1, 2) and torch.allclose(probs.sum(dim=1), torch.ones(1))

def test_evaluation_sees_odd_images_as_prep_made_the_training_images(tmp_path):
    size = 32
    # a phone photo: stored 48x32 and sideways, tagged "rotate 90 degrees clockwise to display" (EXIF 6)
    y, x = np.mgrid[:32, :48]
    stored = np.stack([x * 5, y * 7, 255 - x * 3], axis=2).astype(np.uint8)  # smooth: JPEG keeps it (below)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "phone.png", exif=exif)
    upright = np.rot90(np.asarray(Image.open(tmp_path / "phone.png").convert("RGB")), k=-1)  # clockwise
    # a transparent PNG whose hidden pixels are black: shown on white, as viewers (and prep) show it
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[:, :16] = (200, 30, 30, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "icon.png")
    on_white = np.full((32, 32, 3), 255, np.uint8)
    on_white[:, :16] = (200, 30, 30)
    # 16-bit greyscale: its top 8 bits, not clipped to white
    deep = (np.mgrid[:32, :32].sum(axis=0) * 1000 + 3).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    eight_bits = np.repeat((deep >> 8).astype(np.uint8)[..., None], 3, axis=2)
    files = [tmp_path / n for n in ("phone.png", "icon.png", "deep.png")]
    got = evaluate.image_batch([Image.open(f) for f in files], size)
    want = evaluate.image_batch([Image.fromarray(np.ascontiguousarray(a)) for a in (upright, on_white, eight_bits)],
                                size)
    assert got.shape == (3, 3, size, size) and torch.equal(got, want)
    # and prep_dataset.py makes the same training images of these files (up to its JPEG encoding)
    for f in files:
        f.with_suffix(".txt").write_text(f.stem)
    prep_dataset.main(["--source", "folder", "--input", str(tmp_path), "--out_dir", str(tmp_path / "out"),
                       "--image_size", str(size), "--val_fraction", "0", "--num_workers", "1", "--jpeg_quality", "100"])
    with tarfile.open(tmp_path / "out" / "train" / "shard-000000.tar") as tf:
        names = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    prepared = {names[k[:-4] + ".txt"].decode(): np.asarray(Image.open(io.BytesIO(v))) for k, v in names.items()
                if k.endswith(".jpg")}
    for i, f in enumerate(files):
        assert np.abs(prepared[f.stem].astype(int) - got[i].permute(1, 2, 0).numpy()).mean() < 4, f.stem


def test_the_demo_learns_shapes_and_colours(tmp_path, capsys):
    """The tiny model trained on the shapes set on CPU must beat chance (1/5 shapes, 1/6 colours) by far."""
    data, out = str(tmp_path / "shapes"), str(tmp_path / "run")
    train.main(["--config", "demo", "--data_dir", data, "--out_dir", out,
                "--eval_interval", "600", "--checkpoint_interval", "600"])
    results = evaluate.main([os.path.join(out, "best.pt"), "--zeroshot", data, "--json", str(tmp_path / "r.json")])
    assert results["zeroshot"]["color"]["top1"] >= 0.90
    assert results["zeroshot"]["shape"]["top1"] >= 0.80
    # the table names each task's figures, and the headline as their mean
    table = capsys.readouterr().out
    (mean,) = [line for line in table.splitlines() if line.startswith("mean of the tasks/top1 ")]
    assert "zeroshot/shape/top1" in table and float(mean.split()[-1].rstrip("%")) == pytest.approx(100 * results["top1"], abs=0.01)
    assert results["top1"] == pytest.approx((results["zeroshot"]["color"]["top1"] + results["zeroshot"]["shape"]["top1"]) / 2)
    # the trained model matches new images, given as files, to their own captions among the others
    texts, paths = [], []
    for i in range(8):
        _, labels = prep_dataset.shapes_sample(seed=123, index=i)
        text = f"a {labels['color']} {labels['shape']}"
        if text not in texts:
            texts.append(text)
            paths.append(str(tmp_path / f"new{i}.png"))
            prep_dataset.render_shape(123, i, 64).save(paths[-1])
    assert len(texts) >= 4
    matched = evaluate.main([os.path.join(out, "best.pt"), "--images", *paths, "--texts", *texts])["images"]
    for path, text in zip(paths, texts):
        assert max(matched[path], key=matched[path].get) == text, (path, matched[path])
        assert sum(matched[path].values()) == pytest.approx(1.0)


def test_a_zero_shot_set_out_of_reach_is_dropped_not_fatal(tmp_path, capsys):
    # during training, a named zero-shot set that fails to load (no network, an empty folder) is warned
    # about and dropped; the run goes on
    (tmp_path / "empty").mkdir()
    cfg = get_config("tiny", vision_layers=1, text_layers=1)
    evaluator = evaluate.TrainingEvaluator(str(tmp_path / "empty"), False, str(tmp_path), {}, cfg, "cpu",
                                           torch.autocast("cpu", enabled=False))
    assert evaluator(CLIP(cfg)) == {}
    assert "zero-shot on" in capsys.readouterr().err and evaluator.datasets == []


def write_tar(path, files):
    """A webdataset shard: (name, bytes) members in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_clip_benchmark_sets_read_with_their_class_names_ids_and_templates(tmp_path, capsys, monkeypatch):
    # clip_benchmark's webdataset layout (clip-benchmark/wds_cifar10 on the hub): test/*.tar of KEY.webp + KEY.cls
    # (a class id), and beside them classnames.txt (a name per id) and zeroshot_classification_templates.txt ({c})
    root = tmp_path / "wds_colours"
    rng = np.random.default_rng(0)
    members = []
    for i, c in enumerate([0, 2, 2, 0, 2]):  # no green image: ids must index the names as they are, not re-encoded
        pixels = rng.integers(0, 80, (24, 30, 3))
        pixels[..., c] += 150
        buf = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buf, "WEBP", lossless=True)
        members += [(f"s{i:07d}.webp", buf.getvalue()), (f"s{i:07d}.cls", str(c).encode())]
    write_tar(root / "test" / "0.tar", members)
    (root / "classnames.txt").write_text("red\ngreen\nblue\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na {c} thing.\n")
    rows, image_col, label_col, classnames = evaluate.load_classification(str(root))
    assert (image_col, label_col, classnames, rows[label_col]) == ("webp", "cls", ["red", "green", "blue"],
                                                                   [0, 2, 2, 0, 2])
    assert "the class names of its ids 0 to 2 from" in capsys.readouterr().err
    # its folder of shards given for the set: the set's folder is named; shards of captions have no classes at all
    with pytest.raises(SystemExit, match=rf"is a folder of shards: give the set's folder above it, {root}, with --split"):
        evaluate.load_classification(str(root / "test"))
    write_tar(tmp_path / "prepared" / "val" / "shard-000000.tar", [("k.jpg", members[0][1]), ("k.txt", b"a red one")])
    with pytest.raises(SystemExit, match=r"holds shards of images and captions, which have no classes: evaluate them "
                                         r"with --retrieval .*prepared/val"):
        evaluate.load_classification(str(tmp_path / "prepared" / "val"))
    cfg = get_config("tiny", vision_layers=1, text_layers=1)
    oracle = ColourOracle(Tokenizer(cfg.encoding, cfg.context_length))
    used = []
    real = evaluate.class_embeddings
    monkeypatch.setattr(evaluate, "class_embeddings", lambda m, tok, names, templates, *a:
                        used.append((names, templates)) or real(m, tok, names, templates, *a))
    off = torch.autocast("cpu", enabled=False)
    got = evaluate.zeroshot_classification(oracle, str(root), cfg, "cpu", off, num_workers=0)
    assert got == {"top1": 1.0, "top5": 1.0, "classes": 3, "samples": 5, "unreadable": 0}
    assert used[-1] == (["red", "green", "blue"], ["a photo of a {c}.", "a {c} thing."])
    assert "its own 2 prompt templates" in capsys.readouterr().err
    # {c} is the class name, as {} is: the same prompts, the same embeddings
    torch.manual_seed(0)
    model, tok = CLIP(cfg).eval(), Tokenizer(cfg.encoding, cfg.context_length)
    torch.testing.assert_close(real(model, tok, ["red"], ["a photo of a {c}."], "cpu", off),
                               real(model, tok, ["red"], ["a photo of a {}."], "cpu", off), rtol=0, atol=0)
    # during training, evaluated again and again, its notes are said once
    evaluator = evaluate.TrainingEvaluator(str(root), False, str(tmp_path), {}, cfg, "cpu", off, num_workers=0)
    assert set(evaluator(model)) == set(evaluator(model)) == {"zeroshot/wds_colours/top1", "zeroshot/wds_colours/top5"}
    err = capsys.readouterr().err
    assert err.count("holds the splits ['test']") == err.count("its own 2 prompt templates") == 1, err
    # templates given on the command line win over the set's own
    evaluate.zeroshot_classification(oracle, str(root), cfg, "cpu", off, templates=["a {}"], num_workers=0)
    assert used[-1][1] == ["a {}"]
    # the same set by its hub name: its names and templates are fetched beside the shards
    fetched = []

    def hf_hub_download(repo_id, filename, repo_type=None):
        fetched.append((repo_id, filename, repo_type))
        if not (root / filename).is_file():
            raise FileNotFoundError(filename)  # as the hub's EntryNotFoundError: the set has no such file
        return str(root / filename)
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    real_load = evaluate.load_hub_set
    monkeypatch.setattr(evaluate, "load_hub_set", lambda name, split: real_load(
        str(root) if name == "clip-benchmark/wds_colours" else name, split))
    real_splits = evaluate.hub_split_names
    monkeypatch.setattr(evaluate, "hub_split_names", lambda name: real_splits(
        str(root) if name == "clip-benchmark/wds_colours" else name))
    got = evaluate.zeroshot_classification(oracle, "clip-benchmark/wds_colours", cfg, "cpu", off, num_workers=0)
    assert got["top1"] == 1.0 and used[-1] == (["red", "green", "blue"], ["a photo of a {c}.", "a {c} thing."])
    assert ("clip-benchmark/wds_colours", "classnames.txt", "dataset") in fetched
    asked = len(fetched)  # evaluated again (as training does at every evaluation): the hub is not asked again
    evaluate.zeroshot_classification(oracle, "clip-benchmark/wds_colours", cfg, "cpu", off, num_workers=0)
    assert len(fetched) == asked
    # without a names file the ids found are the classes, named by their numbers (and said to be numbers where
    # they are not digits); with one that names too few classes, an error that says so
    (root / "classnames.txt").unlink()
    assert evaluate.load_classification(str(root))[3] == ["0", "2"]
    (tmp_path / "one.txt").write_text("red\n")
    with pytest.raises(SystemExit, match="class id 2 in 'cls', but .*one.txt names 1 classes"):
        evaluate.load_classification(str(root), classnames_file=str(tmp_path / "one.txt"))
    (tmp_path / "three.txt").write_text("rouge\nvert\nbleu\n")
    assert evaluate.load_classification(str(root), classnames_file=str(tmp_path / "three.txt"))[3] == \
        ["rouge", "vert", "bleu"]
    # ids counted from 1 (Flowers-102's, Stanford Cars'): 1 to the number of names
    write_tar(tmp_path / "from_one" / "test" / "0.tar",
              [(n, str(int(d) + 1).encode() if n.endswith(".cls") else d) for n, d in members])
    rows, _, label_col, classnames = evaluate.load_classification(str(tmp_path / "from_one"),
                                                                  classnames_file=str(tmp_path / "three.txt"))
    assert (classnames, rows[label_col]) == (["rouge", "vert", "bleu"], [0, 2, 2, 0, 2])
    err = capsys.readouterr().err
    assert "from_one: the class names of its ids 1 to 3 from" in err, err
    # its retrieval sets (wds_flickr30k: KEY.webp + KEY.txt, a caption per line) have test/ and no val/:
    # the set's folder means its test split
    write_tar(tmp_path / "wds_pairs" / "test" / "0.tar",
              [(n, d) for i in range(3) for n, d in ((f"{i}.webp", members[2 * i][1]), (f"{i}.txt", b"a\nb"))])
    assert evaluate.shard_split(str(tmp_path / "wds_pairs")) == (str(tmp_path / "wds_pairs"), "test")
    img, txt, _, text_image = evaluate.embed_shards(model, str(tmp_path / "wds_pairs"), "test", cfg, "cpu", off,
                                                    num_workers=0)
    assert len(img) == 3 and text_image.tolist() == [0, 0, 1, 1, 2, 2]


def test_evaluation_decodes_a_big_jpeg_at_a_reduced_scale_to_the_same_picture(monkeypatch):
    """A photo several times the crop (500 x 375 for the 64-px model) is decoded at 1/4 by the JPEG decoder itself,
    as the training loader does it, and shows the model what the full decode would (the zero-shot folders of
    photos went 1.5-1.8x faster that way: benchmarks/bench_zeroshot.py)."""
    from PIL import JpegImagePlugin
    drafts, draft = [], JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", lambda img, *a: drafts.append(a) or draft(img, *a))
    y, x = np.mgrid[:375, :501]
    buf = io.BytesIO()
    Image.fromarray(np.stack([255 * x / 501, 255 * y / 375, 128 + 0 * x], -1).astype(np.uint8)).save(buf, "JPEG")
    reduced = evaluate.image_batch([Image.open(io.BytesIO(buf.getvalue()))], 64)
    assert len(drafts) == 1  # asked for once, for this image
    whole = evaluate.image_batch([Image.open(io.BytesIO(buf.getvalue())).convert("RGB")], 64)
    assert len(drafts) == 1 and reduced.shape == whole.shape == (1, 3, 64, 64)
    assert (reduced.float() - whole.float()).abs().mean() < 1.5
    # a sideways phone photo is stood upright first, as prep does it (its rotation tag read before the crop)
    sideways = Image.open(io.BytesIO(buf.getvalue()))
    exif = sideways.getexif()
    exif[0x0112] = 6  # rotated 90 degrees: the picture is 375 wide once upright
    tagged = io.BytesIO()
    sideways.save(tagged, "JPEG", exif=exif)
    upright = evaluate.image_batch([Image.open(io.BytesIO(tagged.getvalue()))], 64)
    expected = evaluate.image_batch([prep_dataset.upright_rgb(Image.open(io.BytesIO(tagged.getvalue())))], 64)
    assert (upright.float() - expected.float()).abs().mean() < 1.5


def test_a_folder_of_images_takes_its_classes_from_a_table(tmp_path, capsys):
    """Kaggle's ImageNet keeps its val images in one folder (ILSVRC/Data/CLS-LOC/val/*.JPEG) and their classes in
    LOC_val_solution.csv, "ImageId,PredictionString" rows whose string starts with the class, and the classes'
    names in LOC_synset_mapping.txt: --labels reads such a folder as it is."""
    val = tmp_path / "val"
    val.mkdir()
    colours = {"n00000002": (230, 20, 20), "n00000001": (20, 200, 40)}  # ids not in the names' order
    rows = ["ImageId,PredictionString"]
    for i in range(6):
        synset = sorted(colours)[i % 2]
        Image.new("RGB", (40, 30), colours[synset]).save(val / f"ILSVRC2012_val_{i:08d}.JPEG", "JPEG")
        rows.append(f"ILSVRC2012_val_{i:08d},{synset} 1 2 30 40 {synset} 3 4 20 20")
    Image.new("RGB", (40, 30), (9, 9, 9)).save(val / "unlisted.JPEG", "JPEG")
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "LOC_synset_mapping.txt").write_text("n00000001 green, verdant\nn00000002 red\n")
    ds, _, _, classnames = evaluate.load_classification(str(val), classnames_file=str(tmp_path / "LOC_synset_mapping.txt"),
                                                        labels_file=str(tmp_path / "LOC_val_solution.csv"))
    assert classnames == ["green", "red"]
    for row in ds:  # each image with its own class, by its file name
        i = int(os.path.basename(row["image"]["path"])[15:23])
        assert classnames[row["label"]] == ("red" if sorted(colours)[i % 2] == "n00000002" else "green")
    assert len(ds) == 6 and "1 of 7 images in" in capsys.readouterr().err  # the unlisted one, left out and said
    cfg = get_config("tiny", vision_layers=1, text_layers=1)
    ckpt = CheckpointManager(str(tmp_path / "run")).save(0, {"model": CLIP(cfg).state_dict(), "model_config": cfg.__dict__})
    results = evaluate.main([ckpt, "--zeroshot", str(val), "--labels", str(tmp_path / "LOC_val_solution.csv"),
                             "--classnames", str(tmp_path / "LOC_synset_mapping.txt")])
    assert results["samples"] == 6 and results["classes"] == 2
    # during training too (train.py --zeroshot FOLDER --zeroshot_labels TABLE): the same figures
    evaluator = evaluate.TrainingEvaluator(str(val), False, "", {}, cfg, "cpu", torch.autocast("cpu", enabled=False),
                                           classnames_file=str(tmp_path / "LOC_synset_mapping.txt"),
                                           labels_file=str(tmp_path / "LOC_val_solution.csv"))
    model, _ = evaluate.load_model(ckpt, "cpu")
    name = evaluate.set_name(str(val))  # the folder above a split folder's name: imagenet for imagenet/val
    assert evaluator(model) == {f"zeroshot/{name}/top1": results["top1"], f"zeroshot/{name}/top5": results["top5"]}
    (tmp_path / "other.csv").write_text("a.jpg,cat\n")  # a table of other images: said, not an empty evaluation
    with pytest.raises(SystemExit, match="lists none of the 7 images"):
        evaluate.load_classification(str(val), labels_file=str(tmp_path / "other.csv"))


def test_class_folders_named_by_number_take_their_names_in_the_numbers_order(tmp_path):
    """ImageNet-V2 names its class folders 0 to 999, and a file of the class names lists them in that order: folder
    10 is the 11th name, not the 3rd (its place among the folders sorted as text: 0, 1, 10, 11, 2, ...)."""
    for i in range(12):
        (tmp_path / "v2" / str(i)).mkdir(parents=True)
        Image.new("RGB", (20, 20), (20 * i, 0, 0)).save(tmp_path / "v2" / str(i) / f"img{i}.png")
    (tmp_path / "names.txt").write_text("".join(f"class {i}\n" for i in range(12)))
    rows, _, _, classnames = evaluate.load_classification(str(tmp_path / "v2"), classnames_file=str(tmp_path / "names.txt"))
    assert len(rows) == 12
    for row in rows:  # each image under its own folder's name
        folder = os.path.basename(os.path.dirname(row["image"]["path"]))
        assert classnames[row["label"]] == f"class {folder}"
    # the same where a table gives the classes by number (--labels)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(12):
        os.rename(tmp_path / "v2" / str(i) / f"img{i}.png", flat / f"img{i}.png")
    (tmp_path / "labels.csv").write_text("".join(f"img{i},{i}\n" for i in range(12)))
    rows, _, _, classnames = evaluate.load_classification(str(flat), classnames_file=str(tmp_path / "names.txt"),
                                                          labels_file=str(tmp_path / "labels.csv"))
    assert [classnames[row["label"]] for row in rows] == [f"class {os.path.basename(row['image']['path'])[3:-4]}"
                                                          for row in rows]
    # and in a `datasets` set whose label column holds the numbers as text
    import datasets
    images = [Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(12)]
    datasets.Dataset.from_dict({"image": images, "label": [str(i) for i in range(12)]}).cast_column(
        "image", datasets.Image()).save_to_disk(str(tmp_path / "set"))
    rows, _, label_col, classnames = evaluate.load_classification(str(tmp_path / "set"), "train",
                                                                  classnames_file=str(tmp_path / "names.txt"))
    assert [classnames[label] for label in rows[label_col]] == [f"class {i}" for i in range(12)]
