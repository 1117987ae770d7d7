import errno
import glob
import io
import json
import math
import os
import pickle
import platform
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import checkpoint_manager
import evaluate
import logger
import prep_dataset
import train
from checkpoint_manager import CheckpointError, CheckpointManager, load_checkpoint
from clip import CLIP, Tokenizer, clip_loss, flops_per_sample, get_config, resize_position_embeddings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "shapes"
    prep_dataset.main(["--source", "shapes", "--out_dir", str(out), "--limit", "240", "--shard_size", "60",
                       "--val_fraction", "0.2", "--num_workers", "2"])
    return str(out)


def run_args(data_dir, out_dir, **kw):
    base = dict(model="tiny", data_dir=data_dir, out_dir=out_dir, batch_size=16, max_steps=6, max_lr=1e-3,
                num_workers=0, log_interval=1, eval_interval=3, eval_batches=1, checkpoint_interval=3,
                augment=True, zeroshot="none", retrieval=False)
    base.update(kw)
    return [f"--{k}={v}" for k, v in base.items()]


def read_log(out_dir, kind="train"):
    return [r for r in logger.read_log(os.path.join(out_dir, "log.jsonl")) if r["kind"] == kind]

# ---------------------------------------------------------------------------- configuration


def test_cli_overrides_named_configs_and_rejects_unknown_keys(capsys):
    cfg = train.parse_args(["--config", "demo", "--batch_size", "64", "--augment", "--max_lr=0.01"])
    assert cfg.model == "tiny" and cfg.batch_size == 64 and cfg.augment is True and cfg.max_lr == 0.01
    assert train.parse_args(["--resume"]).resume == "latest"
    assert train.parse_args(["--resume", "x.pt"]).resume == "x.pt"
    for name in ("model", "data_dir", "out_dir", "batch_size", "max_steps", "resume", "init_from"):
        assert hasattr(cfg, name)
    with pytest.raises(SystemExit, match="unknown setting --batchsize"):
        train.parse_args(["--batchsize", "3"])
    with pytest.raises(SystemExit):
        train.parse_args(["--max_steps", "ten"])
    # --help lists every setting with its default, and the model's fields
    for flag in ("--help", "-h"):
        with pytest.raises(SystemExit) as stop:
            train.parse_args(["--config", "demo", flag])
        assert stop.value.code == 0
    printed = capsys.readouterr().out
    assert "batch_size: int = 1024" in printed and "--image_size" in printed and "named configs (--config): demo" in printed
    # a field of the model's config is a flag too, kept apart from the training settings
    cfg = train.parse_args(["--config", "demo", "--image_size", "32", "--context_length=16"])
    assert cfg.model_args == {"image_size": 32, "context_length": 16} and cfg.model == "tiny"
    # a resumed run takes its settings from its checkpoint, but not the device: that belongs to this machine
    cfg = train.parse_args([], resumed={"batch_size": 32, "device": "cpu"})
    assert cfg.batch_size == 32 and cfg.device == "auto"
    assert train.parse_args(["--device", "cpu"], resumed={"device": "cuda"}).device == "cpu"


def test_bad_settings_stop_with_a_message_before_any_work(tmp_path, monkeypatch):
    out = ["--out_dir", str(tmp_path / "run"), "--data_dir", str(tmp_path / "none")]
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "zeroshot_set").mkdir()
    (tmp_path / "photos").mkdir()  # images with no class folders: nothing for zero-shot to read
    Image.new("RGB", (8, 8)).save(tmp_path / "photos" / "0.png")
    for flags, message in ((["--model", "vit-b/32"], "choose one of tiny, base"),
                           (["--batch_size", "1"], "--batch_size 1: must be at least 2 for the contrastive loss"),
                           (["--batch_size", "0", "--loss", "siglip"], "--batch_size 0: must be at least 1"),
                           (["--max_lr", "-1"], "must be positive"),
                           (["--warmup_frac", "1.5"], r"must be in \[0, 1\)"),
                           (["--crop_scale_min", "0"], r"--crop_scale_min 0.0: must be in \(0, 1\]"),
                           (["--eval_interval", "-5"], r"--eval_interval -5: must be 0 \(only the last step\) or more"),
                           (["--grad_clip", "-1"], r"--grad_clip -1.0: must be 0 \(off\) or more"),
                           (["--beta2", "1.5"], r"--beta2 1.5: must be in \[0, 1\)"),  # else torch's traceback
                           (["--eps", "0"], "--eps 0.0: must be positive"),
                           (["--seed", "-1"], r"--seed -1: must be in \[0, 2\^32\)"),  # else numpy's traceback
                           (["--num_workers", "-5"], r"--num_workers -5: must be -1 \(the cores per rank less one\)"),
                           (["--epochs", "-1", "--max_steps", "5"], "--epochs -1.0: must be 0"),  # not dropped by the steps
                           # a mistyped zero-shot folder, said before training rather than at the first evaluation
                           (["--zeroshot", str(tmp_path / "zeroshot_sett")], r"--zeroshot .*zeroshot_sett: no such folder; "
                            r"did you mean .*zeroshot_set\?"),
                           (["--zeroshot", str(tmp_path / "photos")], r"--zeroshot .*photos: its images lie in the folder "
                            r"itself, with no class folders: .* --zeroshot_labels TABLE"),
                           (["--out_dir", str(tmp_path / "a_file" / "run")], "a_file/run: cannot create it"),
                           (["--model", "tiny", "--patch_size", "7"], "multiple of patch_size"),
                           (["--model", "tiny", "--context_length", "0"], "context_length must be at least 1"),
                           (["--encoding", "no_such_bpe"], "could not load the tiktoken encoding 'no_such_bpe'"),
                           (["--zeroshot", "imagenet/val", "--zeroshot_classnames", "nowhere.txt"],
                            "--zeroshot_classnames nowhere.txt: no such file"),
                           (["--zeroshot_classnames", "map.txt"], "--zeroshot_classnames is about the sets given with --zeroshot"),
                           (["--zeroshot_labels", "val.csv"], "--zeroshot_labels is about the sets given with --zeroshot"),
                           (["--zeroshot", "val", "--zeroshot_labels", "val.csv"], "--zeroshot_labels val.csv: no such file"),
                           (["--resume", "--init_from", "runs/demo"], "give one of them"),
                           (["--config", "demo", "--crop_scale_min", "0.5"], "which --augment false turns off"),
                           (["--model", "tiny", "--text_heads", "3"], "text_width 128 must be a multiple of text_heads 3"),
                           (["--device", "gpu"], "--device 'gpu': choose one of auto, cuda, mps, cpu"),
                           (["--config", "dmeo"], r"unknown --config 'dmeo'; choose one of \['demo'"),
                           (["--max_steps"], "--max_steps needs a value"),
                           (["--micro_batch_size", "5"], "--micro_batch_size 5 must divide the per-process batch 1024"),
                           # the tests hide CUDA (conftest.py): asking for it names the way out
                           (["--device", "cuda"], "--device cuda: torch sees no such device here.*--device cpu")):
        with pytest.raises(SystemExit, match=message):
            train.main(out + flags)
    # under torchrun every rank meets the same bad setting: the first process of each node says it, the others
    # stop with a failing exit code and no message of their own, as train.py run by torchrun does
    monkeypatch.setenv("LOCAL_RANK", "1")
    for flags in (["--max_step", "3"], ["--max_lr", "-1"], ["--device", "gpu"]):
        with pytest.raises(SystemExit) as stopped:
            train.main(out + flags)
        assert train.stops_quietly(stopped.value), flags
    cli = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *out, "--max_step", "3"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "LOCAL_RANK": "1"})
    assert cli.returncode == 1 and "max_step" not in cli.stderr, cli.stderr[-2000:]
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(SystemExit) as stopped:
        train.main(out + ["--max_lr", "-1"])
    assert not train.stops_quietly(stopped.value)
    # torchrun on a Mac's GPU: no DDP backend runs on mps, so it stops before waiting for the other ranks
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    with pytest.raises(SystemExit, match=r"not on mps: add --device cpu, or run without torchrun"):
        train.main(out + ["--device", "mps"])
    # a global batch that two processes cannot share evenly (the process group, its gathering and the ranks'
    # comparison of what they found stood in for: this one process is rank 0 of 2, the other says the same)
    monkeypatch.setattr(train.dist, "init_process_group", lambda *args, **kwargs: None)
    monkeypatch.setattr(train.dist, "all_gather_object",
                        lambda every, mine: every.__setitem__(slice(None), [mine] * len(every)))
    monkeypatch.setattr(train, "same_on_every_rank", lambda *args, **kwargs: None)
    with pytest.raises(SystemExit, match=r"--batch_size 15 \(global\) must be divisible by the 2 processes: 14 or 16, say"):
        train.main(out + ["--batch_size", "15"])


def test_zero_turns_clipping_off_and_makes_intervals_only_the_last_step(shapes_dir, tmp_path):
    # --grad_clip 0 trains exactly as a limit never reached (a max norm of 0 would zero every gradient)
    off = train.main(run_args(shapes_dir, str(tmp_path / "off"), max_steps=3, grad_clip=0))
    huge = train.main(run_args(shapes_dir, str(tmp_path / "huge"), max_steps=3, grad_clip=1e9))
    for (name, a), b in zip(off.state_dict().items(), huge.state_dict().values()):
        assert torch.equal(a, b), name
    assert [r["grad_norm"] for r in read_log(str(tmp_path / "off"))] == [r["grad_norm"] for r in read_log(str(tmp_path / "huge"))]
    # an interval of 0: logged, evaluated and saved at the last step only
    out = str(tmp_path / "last")
    train.main(run_args(shapes_dir, out, max_steps=4, log_interval=0, eval_interval=0, checkpoint_interval=0))
    assert [r["step"] for r in read_log(out)] == [4] and [r["step"] for r in read_log(out, "eval")] == [4]
    assert sorted(f for f in os.listdir(out) if f.startswith("ckpt-")) == ["ckpt-00000004.pt"]


def test_epochs_set_the_steps_and_a_new_length_in_steps_replaces_them(shapes_dir, tmp_path, capsys):
    # 192 train samples in batches of 16: 12 steps an epoch, so a quarter of an epoch is 3 steps
    out = str(tmp_path / "run")
    args = [a for a in run_args(shapes_dir, out, vision_layers=1, text_layers=1) if not a.startswith("--max_steps")]
    train.main([*args, "--epochs", "0.25"])
    assert "12 steps per epoch, 0.25 epochs: 3 steps" in capsys.readouterr().out
    assert [r["step"] for r in read_log(out)] == [1, 2, 3]
    assert load_checkpoint(os.path.join(out, "ckpt-00000003.pt"))["config"]["max_steps"] == 3
    # resumed with more epochs, or with a length in steps, which then decides
    train.main(["--resume", out, "--epochs", "0.5"])
    assert [r["step"] for r in read_log(out)][-1] == 6
    train.main(["--resume", out, "--max_steps", "8"])
    state = load_checkpoint(os.path.join(out, "ckpt-00000008.pt"))
    assert state["step"] == 8 and state["config"]["epochs"] == 0 and state["config"]["max_steps"] == 8
    with pytest.raises(SystemExit, match="give one of them"):
        train.main([*args, "--out_dir", str(tmp_path / "both"), "--epochs", "1", "--max_steps", "5"])
    with pytest.raises(SystemExit, match="--epochs -1.0: must be 0"):
        train.main([*args, "--out_dir", str(tmp_path / "negative"), "--epochs", "-1"])


def test_a_val_split_smaller_than_a_batch_is_said_to_put_the_val_loss_on_another_scale(shapes_dir, tmp_path, capsys):
    # 48 val samples: in batches of 16 the val loss compares with the train loss; with --batch_size 64 it is
    # taken over batches of 48, a lower chance level, which the run says
    train.main(run_args(shapes_dir, str(tmp_path / "small"), max_steps=1, vision_layers=1, text_layers=1))
    assert "val split holds fewer" not in capsys.readouterr().out
    out = str(tmp_path / "large")
    train.main(run_args(shapes_dir, out, batch_size=64, max_steps=1, vision_layers=1, text_layers=1, eval_batches=0))
    assert "val loss over batches of 48, whose chance level is ln(48) = 3.871" in capsys.readouterr().out
    assert abs(read_log(out, "eval")[0]["val_loss"] - math.log(48)) < 0.2  # untrained: near that chance level
    # a val split of one sample: a contrastive loss of 0 whatever the model, and retrieval that always finds its one
    # caption. Neither is logged, no best.pt is kept by them, and the run says why
    prep_dataset.main(["--source", "shapes", "--out_dir", str(tmp_path / "one_val"), "--limit", "40", "--val_fraction",
                       "0.03", "--image_size", "64", "--num_workers", "1"])
    out = str(tmp_path / "one")
    train.main(run_args(str(tmp_path / "one_val"), out, max_steps=1, vision_layers=1, text_layers=1, retrieval=True,
                        zeroshot="auto"))
    assert "the val split holds 1 sample, too few for a val-loss batch: no val loss and no best.pt" in \
        capsys.readouterr().out
    (record,) = read_log(out, "eval")
    assert "val_loss" not in record and not any(k.startswith("retrieval/") for k in record)
    assert "zeroshot/shape/top1" in record and not os.path.exists(os.path.join(out, "best.pt"))


@pytest.mark.skipif(not os.path.exists("/proc/self/statm") or platform.libc_ver()[0] != "glibc",
                    reason="Linux with glibc only")
def test_cpu_training_keeps_freed_memory_for_the_next_step():
    # a freed 64 MB block (the size of a big gradient) goes back to the OS by default, and is faulted in
    # again on the next step; after keep_freed_memory() it stays with the process for reuse
    code = """
import os, sys, torch, train
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
kept = train.keep_freed_memory() if sys.argv[1] == "keep" else False
x = torch.ones(16 << 20)
before = rss()
del x
print(kept, (before - rss()) >> 20)
"""
    def run(mode):
        out = subprocess.run([sys.executable, "-c", code, mode], cwd=ROOT, capture_output=True, text=True, check=True)
        kept, returned_mb = out.stdout.split()
        return kept == "True", int(returned_mb)
    kept, returned_mb = run("default")
    assert not kept and returned_mb >= 56  # most of the block (a page or two may stay mapped)
    kept, returned_mb = run("keep")
    assert kept and returned_mb < 8


def test_schedule_key_points():
    cfg = train.TrainConfig(max_steps=1000, max_lr=1.0, min_lr_ratio=0.1, warmup_frac=0.02)
    assert train.get_lr(0, cfg) == pytest.approx(1 / 20)
    assert train.get_lr(19, cfg) == pytest.approx(1.0)  # end of the 20 warmup steps
    assert train.get_lr(20, cfg) == pytest.approx(1.0)
    assert train.get_lr(20 + 490, cfg) == pytest.approx(0.55)  # halfway through the cosine: the midpoint
    assert train.get_lr(1000, cfg) == pytest.approx(0.1)
    lrs = [train.get_lr(s, cfg) for s in range(20, 1001)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    # a short run still warms up over 10 steps (half of a run shorter than 20); warmup_frac 0 means none
    short = train.TrainConfig(max_steps=60, max_lr=1.0, warmup_frac=0.05)
    assert train.get_lr(0, short) == pytest.approx(0.1) and train.get_lr(9, short) == pytest.approx(1.0)
    assert train.get_lr(0, train.TrainConfig(max_steps=6, max_lr=1.0, warmup_frac=0.05)) == pytest.approx(1 / 3)
    assert train.get_lr(0, train.TrainConfig(max_steps=60, max_lr=1.0, warmup_frac=0.0)) == pytest.approx(1.0)


def test_weight_decay_only_on_weight_matrices():
    model = CLIP(get_config("tiny"))
    decay, no_decay = train.param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "text.token_embedding.weight" in decayed and "visual.patch_embed.weight" in decayed
    assert "text.transformer.blocks.0.attn.qkv.weight" in decayed and "visual.proj.weight" in decayed
    for n in decayed:
        assert "bias" not in n and "ln" not in n and "pos_embedding" not in n and "class_embedding" not in n
    assert {"logit_scale", "visual.pos_embedding", "text.pos_embedding", "visual.class_embedding",
            "visual.ln_f.weight", "text.transformer.blocks.0.attn.qkv.bias"} <= {names[id(p)] for p in no_decay["params"]}
    assert len(decayed) + len(no_decay["params"]) == len(list(model.parameters()))

@pytest.mark.parametrize("fused", [True, False])
def test_clipped_step_equals_clipping_then_adamw(fused):
    # train.py clips inside fused AdamW (it divides each gradient as it reads it) instead of in a pass of its
    # own: the same update as clip_grad_norm_ then AdamW, clipped or not, and no update at all when not finite
    cfg = get_config("tiny", vision_layers=1, text_layers=1)
    images = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(0, 5000, (8, cfg.context_length), generator=torch.Generator().manual_seed(1))

    def run(step_fn, grad_clip, poison=False):
        torch.manual_seed(0)
        model = CLIP(cfg)
        opt = torch.optim.AdamW(train.param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.98), eps=1e-6, fused=fused)
        norms = []
        for k in range(3):
            loss = clip_loss(*model(images, tokens))
            loss = loss * float("nan") if poison and k == 1 else loss
            loss.backward()
            norms.append(step_fn(model, opt, grad_clip, loss))
            opt.zero_grad(set_to_none=True)
        return torch.cat([p.detach().flatten() for p in model.parameters()]), norms

    def reference(model, opt, grad_clip, loss):
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        if torch.isfinite(loss) and torch.isfinite(norm):
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
        return norm.item()

    ours = lambda model, opt, grad_clip, loss: train.clipped_step(opt, model.parameters(), grad_clip, loss)[0].item()
    for grad_clip, poison in ((0.5, False), (1e6, False), (0.0, False), (0.5, True)):
        got, got_norms = run(ours, grad_clip, poison)
        want, want_norms = run(reference, grad_clip, poison)
        assert got_norms == pytest.approx(want_norms, rel=1e-6, nan_ok=True)
        if grad_clip == 0.5 and not poison:
            assert min(want_norms) > 2 * grad_clip  # so the clipping did act
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    if fused:  # the clipping factor goes to AdamW, which divides the gradients by it: no pass of its own
        p = torch.nn.Parameter(torch.zeros(4))
        p.grad = torch.full((4,), 3.0)  # norm 6
        opt = torch.optim.AdamW([p], fused=True)
        assert train.clipped_step(opt, [p], 1.5, torch.tensor(0.0))[0].item() == 6.0
        assert opt.grad_scale.item() == pytest.approx(4.0)

def test_loss_scaling_changes_no_update_and_an_overflow_is_skipped_without_counting_as_bad():
    # fp16's loss scaler multiplies the loss by a power of two and divides the gradients back: in fp32 the
    # updates are bit for bit those of an unscaled run, one batch or micro-batches alike
    cfg = get_config("tiny", vision_layers=1, text_layers=1)
    images = torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(0, 5000, (16, cfg.context_length), generator=torch.Generator().manual_seed(1))
    fp32, fp16 = torch.autocast("cpu", enabled=False), torch.autocast("cpu", dtype=torch.float16)

    def run(scaler, micro=0, autocast=fp32, steps=3):
        torch.manual_seed(0)
        model = CLIP(cfg)
        opt = torch.optim.AdamW(train.param_groups(model, 0.1), lr=1e-3, fused=True)
        out = []
        for _ in range(steps):
            before = torch.cat([p.detach().flatten() for p in model.parameters()])
            loss = train.forward_backward(model, images, tokens, micro, autocast, scaler)
            norm, bad = train.clipped_step(opt, model.parameters(), 1.0, loss, scaler)
            opt.zero_grad(set_to_none=True)
            moved = not torch.equal(before, torch.cat([p.detach().flatten() for p in model.parameters()]))
            out.append((norm.item(), bad.item(), moved, scaler.get_scale() if scaler else None, loss.item()))
        return torch.cat([p.detach().flatten() for p in model.parameters()]), out

    for micro in (0, 8):
        want, _ = run(None, micro)
        got, steps = run(torch.amp.GradScaler("cpu", init_scale=2.0 ** 16), micro)
        assert torch.equal(got, want), micro
        assert [s[3] for s in steps] == [2.0 ** 16] * 3  # no overflow, no change of scale
    # in fp16 the unscaled gradient is fp32's to fp16's precision (1.6e-3 relative here, 3e-3 for `tiny`; bf16: 3e-2)

    def gradient(autocast, scaler):
        torch.manual_seed(0)
        model = CLIP(cfg)
        opt = torch.optim.AdamW(model.parameters(), fused=True)
        train.forward_backward(model, images, tokens, 0, autocast, scaler)
        if scaler is not None:
            scaler.unscale_(opt)
        return torch.cat([p.grad.flatten() for p in model.parameters()])
    reference, half = gradient(fp32, None), gradient(fp16, torch.amp.GradScaler("cpu", init_scale=2.0 ** 12))
    assert (half - reference).norm() / reference.norm() < 1e-2
    # in fp16, a scale of 2^20 overflows: each such step is skipped, not counted as bad, and halves the scale;
    # once the gradients fit, the model trains (an occasional overflow later is skipped the same way)
    _, steps = run(torch.amp.GradScaler("cpu", init_scale=2.0 ** 20), autocast=fp16, steps=16)
    scale = 2.0 ** 20
    for norm, bad, moved, new_scale, _ in steps:
        overflow = not math.isfinite(norm)
        assert bad == 0 and moved != overflow and new_scale == (scale / 2 if overflow else scale)
        scale = new_scale
    assert not math.isfinite(steps[0][0]) and scale < 2.0 ** 20 and steps[-1][4] < steps[0][4] / 2


# ---------------------------------------------------------------------------- accumulation


@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_accumulation_equals_the_full_batch(loss_name):
    torch.manual_seed(0)
    cfg = get_config("tiny", vision_layers=2, text_layers=2, loss=loss_name)
    images = torch.randint(0, 256, (32, 3, 64, 64), dtype=torch.uint8)
    tokens = torch.randint(0, 5000, (32, cfg.context_length))
    grads = []
    for micro in (0, 8):  # one batch of 32, then 4 micro-batches of 8
        torch.manual_seed(0)
        model = CLIP(cfg)
        with torch.no_grad():
            model.logit_scale.fill_(math.log(20.0))  # away from init, so its gradient is not special
        loss = train.forward_backward(model, images, tokens, micro, torch.autocast("cpu", enabled=False))
        grads.append((loss, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_full, g_full), (loss_acc, g_acc) = grads
    torch.testing.assert_close(loss_acc, loss_full)
    assert g_full["logit_scale"].abs() > 1e-4
    for name in g_full:
        torch.testing.assert_close(g_acc[name], g_full[name], rtol=1e-4, atol=1e-6, msg=name)

@pytest.mark.parametrize("locked", ["visual", "text"])
def test_a_locked_tower_runs_once_per_micro_batch_and_the_gradients_stay_exact(locked):
    # LiT with micro-batches: a locked tower's embeddings come from the first pass, and the pass with gradients
    # leaves it out, since nothing in it takes a gradient; the other tower's gradients are those of the full batch
    cfg = get_config("tiny", vision_layers=2, text_layers=2)
    images = torch.randint(0, 256, (32, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(0, 5000, (32, cfg.context_length), generator=torch.Generator().manual_seed(1))
    trained = ("text",) if locked == "visual" else ("vision",)

    def gradients(micro, towers):
        torch.manual_seed(0)
        model = CLIP(cfg)
        getattr(model, locked).requires_grad_(False)
        runs = []
        getattr(model, locked).register_forward_hook(lambda *_: runs.append(1))
        loss = train.forward_backward(model, images, tokens, micro, torch.autocast("cpu", enabled=False),
                                      trained=towers)
        return loss, {n: p.grad for n, p in model.named_parameters()}, len(runs)

    full_loss, full, _ = gradients(0, trained)
    loss, grads, runs = gradients(8, trained)
    assert runs == 4  # the first pass's 4 micro-batches, none in the second
    _, rerun, reruns = gradients(8, ("vision", "text"))  # the tower run again in the second pass, for nothing
    assert reruns == 8
    torch.testing.assert_close(loss, full_loss)
    for name, grad in full.items():
        assert (grad is None) == name.startswith(locked + "."), name
        if grad is not None:
            assert torch.equal(grads[name], rerun[name]), name
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert full["logit_scale"].abs() > 0


# ---------------------------------------------------------------------------- resume, checkpoints, logs


def test_resume_is_bitwise_exact_and_the_log_continues(shapes_dir, tmp_path, capsys):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    train.main(run_args(shapes_dir, straight))
    train.main(run_args(shapes_dir, split))
    # rewind the second run to its step-3 checkpoint, as if it had stopped there; its log goes on to step 6.
    # Only the checkpoint is named: the run's settings (model, data, batch, schedule) come from it
    os.remove(os.path.join(split, "ckpt-00000006.pt"))
    train.main(["--resume", os.path.join(split, "ckpt-00000003.pt")])
    a = load_checkpoint(os.path.join(straight, "ckpt-00000006.pt"))
    b = load_checkpoint(os.path.join(split, "ckpt-00000006.pt"))
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert a["loader"] == b["loader"] and a["step"] == b["step"] == 6
    log_a, log_b = read_log(straight), read_log(split)
    assert [r["step"] for r in log_b] == [1, 2, 3, 4, 5, 6], "a resumed log must not repeat steps"
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b]
    assert [r["step"] for r in read_log(split, "eval")] == [3, 6]
    # resuming a finished run says so and trains nothing; a flag given with --resume overrides the run's setting
    capsys.readouterr()
    train.main(["--out_dir", split, "--resume"])
    assert "nothing to train" in capsys.readouterr().out and len(read_log(split)) == 6
    train.main(["--out_dir", split, "--resume", "--max_steps", "7"])
    assert "max_steps 6 -> 7" in capsys.readouterr().out
    assert [r["step"] for r in read_log(split)][-1] == 7
    # --resume given the run directory: its newest checkpoint
    train.main(["--resume", split, "--max_steps", "8"])
    assert f"resuming from {os.path.join(split, 'ckpt-00000007.pt')} (step 7)" in capsys.readouterr().out
    assert [r["step"] for r in read_log(split)][-2:] == [7, 8]


def test_a_run_with_patch_dropout_resumes_bit_for_bit(shapes_dir, tmp_path):
    # the patches left out come from the seed and the step, and their gradients add up in a fixed order: an
    # interrupted run goes on as the one that never stopped (patch 8: 64 patches, 16 of them kept)
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    args = dict(patch_size=8, patch_dropout=0.75, batch_size=64, vision_layers=1, text_layers=1, eval_interval=0)
    train.main(run_args(shapes_dir, straight, **args))
    train.main(run_args(shapes_dir, split, **args))
    os.remove(os.path.join(split, "ckpt-00000006.pt"))  # as if it had stopped at step 3
    train.main(["--resume", os.path.join(split, "ckpt-00000003.pt")])
    a, b = (load_checkpoint(os.path.join(d, "ckpt-00000006.pt")) for d in (straight, split))
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert [r["loss"] for r in read_log(straight)] == [r["loss"] for r in read_log(split)]
    # and the patches are left out: the first step's loss (before any update) is not that of every patch
    every = str(tmp_path / "every")
    train.main(run_args(shapes_dir, every, **{**args, "patch_dropout": 0.0, "max_steps": 1}))
    assert read_log(every)[0]["loss"] != read_log(straight)[0]["loss"]


def test_the_kept_patches_of_a_rank_are_its_rows_of_one_draw_for_the_whole_batch():
    cfg = get_config("tiny", patch_size=8)  # 64 patches
    whole = train.kept_patches(cfg, 0.75, 0, 5, 96)
    assert whole.shape == (96, 16) and whole.dtype == torch.int64
    assert all(len(set(row.tolist())) == 16 and row.tolist() == sorted(row.tolist()) for row in whole)
    assert 0 <= whole.min() and whole.max() < 64
    # ranks computing only their own rows see what one process sees, however the batch is split
    for parts in (2, 3, 4):
        rows = 96 // parts
        split = torch.cat([train.kept_patches(cfg, 0.75, 0, 5, 96, slice(r * rows, (r + 1) * rows)) for r in range(parts)])
        assert torch.equal(split, whole)
    # another step, another seed: another draw; the same seed and step: the same one
    assert torch.equal(train.kept_patches(cfg, 0.75, 0, 5, 96), whole)
    assert (train.kept_patches(cfg, 0.75, 0, 6, 96) != whole).any() and (train.kept_patches(cfg, 0.75, 1, 5, 96) != whole).any()
    # every patch is kept at the rate asked for, and rows are not copies of each other
    many = torch.cat([train.kept_patches(cfg, 0.75, seed, step, 256) for seed in range(2) for step in range(10)])
    rate = torch.bincount(many.flatten(), minlength=64).float() / len(many)
    assert (rate - 0.25).abs().max() < 0.02  # 5120 rows: a binomial's standard deviation is 0.006
    assert len({tuple(row.tolist()) for row in many}) == len(many)
    assert train.kept_patches(cfg, 0.0, 0, 5, 96) is None


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_bf16_or_fp16_run_on_a_cpu_resumes_exactly_too(precision, shapes_dir, tmp_path, capsys, monkeypatch):
    # --precision bf16 is the fast way on CPUs with bf16 units, fp16 (with its loss scale) on GPUs without them:
    # their runs resume bit for bit as fp32 ones do
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    small = dict(vision_layers=1, text_layers=1)  # most CPUs emulate bf16 and fp16 matmuls: keep them few
    with monkeypatch.context() as m:  # on a CPU that would emulate it, the run says so (and runs all the same)
        m.setattr(train, "cpu_multiplies_bf16", lambda: False)
        train.main(run_args(shapes_dir, straight, precision=precision, eval_interval=0, **small))
    warning = {"bf16": "warning: this CPU has no bf16 matrix units", "fp16": "warning: --precision fp16 is for GPUs"}
    assert warning[precision] in capsys.readouterr().err
    train.main(run_args(shapes_dir, split, precision=precision, eval_interval=0, **small))
    os.remove(os.path.join(split, "ckpt-00000006.pt"))  # as if it had stopped at step 3
    train.main(["--resume", os.path.join(split, "ckpt-00000003.pt")])
    a = load_checkpoint(os.path.join(straight, "ckpt-00000006.pt"))
    b = load_checkpoint(os.path.join(split, "ckpt-00000006.pt"))
    assert a["config"]["precision"] == b["config"]["precision"] == precision
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert [r["loss"] for r in read_log(straight)] == [r["loss"] for r in read_log(split)]
    # fp16's loss scale is logged and carried by the checkpoint (bf16 has none)
    assert a["scaler"] == b["scaler"] and bool(a["scaler"]) == (precision == "fp16")
    assert all(("loss_scale" in r) == (precision == "fp16") for r in read_log(split))
    if precision == "fp16":
        assert read_log(split)[-1]["loss_scale"] == a["scaler"]["scale"]


def test_a_true_interruption_resumes_exactly(shapes_dir, tmp_path):
    """A run killed for real once its step-3 checkpoint exists, then resumed, ends with the weights of an
    uninterrupted run (the process may have got a little further before the kill: resume goes from the newest)."""
    straight = str(tmp_path / "straight")
    train.main(run_args(shapes_dir, straight, checkpoint_interval=1))
    out = str(tmp_path / "killed")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *run_args(shapes_dir, out, checkpoint_interval=1)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(os.path.join(out, "ckpt-00000003.pt")):
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    train.main(run_args(shapes_dir, out, checkpoint_interval=1) + ["--resume"])
    a = load_checkpoint(os.path.join(straight, "ckpt-00000006.pt"))["model"]
    b = load_checkpoint(os.path.join(out, "ckpt-00000006.pt"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)



def test_a_sigterm_stops_after_the_step_with_a_checkpoint_and_the_run_goes_on_from_it_exactly(shapes_dir, tmp_path):
    """SIGTERM to the process group, as torchrun, SLURM and cloud preemption send it (the loader process gets it
    too): the run stops after the current step, saves it (no checkpoint was due), and resumes exactly."""
    kw = dict(max_steps=60, checkpoint_interval=100, eval_interval=0, num_workers=1, vision_layers=1, text_layers=1)
    straight, out = str(tmp_path / "straight"), str(tmp_path / "stopped")
    train.main(run_args(shapes_dir, straight, **kw))
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *run_args(shapes_dir, out, **kw)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT, text=True,
                            start_new_session=True)
    deadline, log = time.time() + 120, os.path.join(out, "log.jsonl")
    while time.time() < deadline and proc.poll() is None and not (os.path.exists(log) and len(read_log(out)) >= 3):
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    stopped = int(re.search(r"stopped by SIGTERM after step (\d+)", err)[1])
    assert proc.returncode == 143 and 3 <= stopped < 60 and "Traceback" not in err, err[-2000:]
    assert [f for f in os.listdir(out) if f.startswith("ckpt-")] == [f"ckpt-{stopped:08d}.pt"]
    train.main(run_args(shapes_dir, out, **kw) + ["--resume"])
    a = load_checkpoint(os.path.join(straight, "ckpt-00000060.pt"))["model"]
    b = load_checkpoint(os.path.join(out, "ckpt-00000060.pt"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in read_log(straight)] == [r["loss"] for r in read_log(out)]


def test_ctrl_c_says_how_to_go_on_instead_of_a_traceback(shapes_dir, tmp_path):
    def interrupt(args, once_exists):  # Ctrl-C in a terminal: SIGINT to the whole process group
        proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT,
                                text=True, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not os.path.exists(once_exists):
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGINT)
        err = proc.communicate(timeout=60)[1]
        assert proc.returncode == 130 and "Traceback" not in err, err
        return err
    out = str(tmp_path / "run")
    err = interrupt(["train.py", *run_args(shapes_dir, out, checkpoint_interval=1, max_steps=10_000)],
                    os.path.join(out, "ckpt-00000001.pt"))
    assert "interrupted. Go on from the last checkpoint with the same command and --resume" in err
    data = str(tmp_path / "data")
    err = interrupt(["prep_dataset.py", "--source", "shapes", "--out_dir", data, "--limit", "100000",
                     "--chunk_size", "500", "--num_workers", "2"], os.path.join(data, ".stage", "chunk-000000.json"))
    assert "interrupted. Rerun the same command to go on" in err


def test_a_full_disk_at_a_checkpoint_stops_the_run_with_what_to_do(shapes_dir, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    train.main(run_args(shapes_dir, out))  # checkpoints at steps 3 and 6

    class FillingDisk(io.FileIO):  # a file on a disk that fills after its first 1,000 bytes
        def write(self, data):
            if self.tell() + len(data) > 1000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)
    # the real torch.save: its zip writer turns the failed write into a RuntimeError of its own as it closes
    monkeypatch.setattr(checkpoint_manager, "open", lambda path, mode="r", *args, **kwargs: FillingDisk(path, "w")
                        if mode == "wb" else open(path, mode, *args, **kwargs), raising=False)
    # the log's lines cannot be written either: said once, and the run goes on to its checkpoint, which stops it
    def full_open(path, mode="r", *args, **kwargs):  # every file written: the log, its rewrite, config.json
        if mode in ("a", "w"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return open(path, mode, *args, **kwargs)
    monkeypatch.setattr(logger, "open", full_open, raising=False)
    monkeypatch.setattr(train, "open", full_open, raising=False)
    capsys.readouterr()
    with pytest.raises(SystemExit, match=r"step 9: could not write .*ckpt-00000009.pt \(No space left on device\): "
                                         r"make room in .*, then go on from its last checkpoint with --resume"):
        train.main(run_args(shapes_dir, out, max_steps=9) + ["--resume"])
    assert not glob.glob(os.path.join(out, "*.tmp"))  # the part written is given back
    out_err = capsys.readouterr()
    assert "could not write" in out_err.err and "config.json" in out_err.err and "could not rewrite" in out_err.err
    assert out_err.err.count("log.jsonl (No space") == 2 and "kind train | step 9 " in out_err.out  # once each
    monkeypatch.undo()
    train.main(run_args(shapes_dir, out, max_steps=9) + ["--resume"])
    assert os.path.exists(os.path.join(out, "ckpt-00000009.pt"))


def test_a_run_directory_that_cannot_be_written_stops_the_run_before_it_trains(shapes_dir, tmp_path, monkeypatch,
                                                                               capsys):
    """A read-only disk (or another user's folder): said as the run starts, not at its first checkpoint hours in,
    and with the right advice wherever a write fails (room is for a full disk)."""
    import tempfile
    out = str(tmp_path / "run")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")
    with monkeypatch.context() as m:
        m.setattr(tempfile, "TemporaryFile", read_only)
        with pytest.raises(SystemExit, match=r"--out_dir .*run: cannot write into it \(Read-only file system\); "
                                             "choose another"):
            train.main(run_args(shapes_dir, out))
        assert os.listdir(out) == []  # no step trained, nothing written
        # evaluate.py's --json: its folder is written into before the evaluation, not after
        with pytest.raises(SystemExit):
            evaluate.main([out, "--retrieval", shapes_dir, "--json", os.path.join(out, "r.json")])
        assert "r.json: cannot write into its folder (Read-only file system)" in capsys.readouterr().err
    # a disk that turns read-only during the run (as after an I/O error): its checkpoint says so, not "make room"
    train.main(run_args(shapes_dir, out, max_steps=3))
    monkeypatch.setattr(checkpoint_manager, "open", lambda path, mode="r", *args, **kwargs: read_only()
                        if mode == "wb" else open(path, mode, *args, **kwargs), raising=False)
    with pytest.raises(SystemExit, match=r"step 6: could not write .*ckpt-00000006.pt \(Read-only file system\): "
                                         r"make .*run writable \(or move the run to a folder that is\)"):
        train.main(run_args(shapes_dir, out) + ["--resume"])
    import matplotlib.figure
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", read_only)
    with pytest.raises(SystemExit, match=r"\(Read-only file system\): give --out a place you can write"):
        logger.main([out])


def test_folders_named_with_spaces_accents_and_a_globs_brackets_work_from_prep_to_plots(shapes_dir, tmp_path, capsys):
    """'set [1]': the [ ] of a glob in a folder's name hid every shard and checkpoint from the globs that find them
    (prep found no samples, a resume no checkpoint)."""
    odd = tmp_path / "my data é" / "set [1]"
    data, out = str(odd / "shapes"), str(odd / "run")
    prep_dataset.main(["--source", "shapes", "--out_dir", data, "--limit", "120", "--num_workers", "1"])
    train.main(run_args(data, out, max_steps=2, checkpoint_interval=2))
    capsys.readouterr()
    train.main(run_args(data, out, max_steps=3, checkpoint_interval=3) + ["--resume"])
    assert [os.path.basename(p) for p in CheckpointManager(out).checkpoints()] == ["ckpt-00000002.pt", "ckpt-00000003.pt"]
    # the commands the run's last line suggests paste into a shell as they are: the folder's name quoted
    (next_steps,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("done: step 3")]
    assert f"python logger.py '{out}' (the plots); python evaluate.py '{out}' --zeroshot" in next_steps
    results = evaluate.main([out, "--retrieval", data, "--zeroshot", data, "--num_workers", "0"])
    assert results["retrieval_samples"] == 6 and set(results["zeroshot"]) == {"shape", "color"}
    logger.main([out])
    assert os.path.isfile(os.path.join(out, "plots.png"))
    # the shards as another tool's input: a folder of them, one of them by name, and as text-to-image-2M's layout
    for i, (source, given) in enumerate((("webdataset", os.path.join(data, "train")),
                          ("webdataset", os.path.join(data, "train", "shard-000000.tar")),
                          ("text-to-image-2M", os.path.join(data, "train")))):
        again = str(odd / f"again [{i}]")
        prep_dataset.main(["--source", source, "--input", given, "--out_dir", again, "--num_workers", "1"])
        assert json.load(open(os.path.join(again, "manifest.json")))["counts"]["train"] > 100, (source, given)
    # a `datasets` folder there: `datasets` reads its files by globs, which the name breaks; said, with what to do
    with pytest.raises(SystemExit, match=r"holds one of \[ \] \* \?.*move or rename it"):
        prep_dataset.main(["--source", "hub", "--input", data, "--split", "train", "--out_dir", str(odd / "hub")])


def test_a_tilde_after_an_equals_sign_is_the_home_folder_from_prep_to_plots(tmp_path, monkeypatch):
    """The shell expands `~` only at a word's start: in --out_dir=~/x it reaches the scripts as it is, and they
    made a folder named ~ in the working directory (which `rm -rf ~` would then take for the home folder)."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    prep_dataset.main(["--source", "shapes", "--out_dir=~/data", "--limit", "60", "--num_workers", "1"])
    train.main(run_args("~/data", "~/run", max_steps=2, checkpoint_interval=2, batch_size=8))  # --data_dir=~/data
    train.main(run_args("~/data", "~/run", max_steps=3, checkpoint_interval=3, batch_size=8) + ["--resume=~/run"])
    assert [os.path.basename(p) for p in CheckpointManager(str(home / "run")).checkpoints()] == [
        "ckpt-00000002.pt", "ckpt-00000003.pt"]
    results = evaluate.main(["~/run", "--retrieval=~/data,~/data", "--json=~/r.json", "--num_workers", "0"])
    assert json.load(open(home / "r.json"))["retrieval_samples"] == results["retrieval_samples"] == 6
    logger.main(["~/run", "--out=~/plots/p.png"])
    assert (home / "plots" / "p.png").is_file()
    assert os.listdir(cwd) == []  # nothing was written where the scripts ran
    # lists and names: each path of a list, a hub set's name left as it is
    cfg = train.parse_args(["--data_dir=~/a, ~/b", "--zeroshot=cifar10,~/pets", "--init_from=~/r/best.pt"])
    assert (cfg.data_dir, cfg.zeroshot, cfg.init_from) == (f"{home}/a,{home}/b", f"cifar10,{home}/pets",
                                                           f"{home}/r/best.pt")
    assert train.parse_args(["--out_dir=~/runs/a, b"]).out_dir == f"{home}/runs/a, b"  # one path: kept whole


def test_a_damaged_manifest_is_warned_about_and_the_shards_still_train(shapes_dir, tmp_path, capsys):
    data = str(tmp_path / "shapes")
    shutil.copytree(shapes_dir, data)
    with open(os.path.join(data, "manifest.json"), "w") as f:
        f.write('{"counts": {"train": 1')  # cut short, as an editor's crash leaves it
    train.main(run_args(data, str(tmp_path / "run"), max_steps=2, zeroshot="auto", retrieval=True))
    assert "manifest.json cannot be read (" in capsys.readouterr().err
    assert read_log(str(tmp_path / "run"))[-1]["step"] == 2  # its val split still evaluated, by counting it
    assert "val_loss" in read_log(str(tmp_path / "run"), "eval")[-1]
    with pytest.raises(SystemExit):
        evaluate.main([str(tmp_path / "run"), "--zeroshot", data])
    assert "manifest.json cannot be read (" in capsys.readouterr().err


def test_kill_during_save_leaves_a_loadable_checkpoint(shapes_dir, tmp_path):
    out = str(tmp_path / "run")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"),
           *run_args(shapes_dir, out, max_steps=50, checkpoint_interval=1, eval_interval=100)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    caught = False
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        tmps = glob.glob(os.path.join(out, "ckpt-*.pt.tmp"))
        if tmps and glob.glob(os.path.join(out, "ckpt-*.pt")):
            proc.send_signal(signal.SIGKILL)  # in the middle of writing a checkpoint, with an earlier one on disk
            caught = True
            break
    proc.wait()
    assert caught, "never saw a checkpoint being written"
    manager = CheckpointManager(out)
    state, path = manager.load_latest()
    assert state is not None and path.endswith(".pt")
    # a torn newest file (as a crash on a filesystem without atomic rename could leave) is passed over
    torn = os.path.join(out, "ckpt-99999999.pt")
    with open(path, "rb") as f:
        data = f.read()
    with open(torn, "wb") as f:
        f.write(data[: len(data) // 2])
    state2, path2 = manager.load_latest()
    assert path2 == path and state2["step"] == state["step"]
    os.remove(torn)
    train.main(run_args(shapes_dir, out, max_steps=state["step"] + 2, checkpoint_interval=1, eval_interval=100)
               + ["--resume"])
    assert load_checkpoint(manager.checkpoints()[-1])["step"] == state["step"] + 2
    # a run whose every checkpoint is torn: said so, not "no checkpoint", by --resume and by a run directory's readers
    for p in manager.checkpoints():
        with open(p, "r+b") as f:
            f.truncate(1000)
    n = len(manager.checkpoints())
    with pytest.raises(SystemExit, match=f"--resume: {re.escape(out)} holds {n} checkpoints, none of which loads"):
        train.main(run_args(shapes_dir, out, max_steps=1) + ["--resume"])
    with pytest.raises(SystemExit, match=f"{re.escape(out)} holds {n} checkpoints, none of which loads"):
        train.main(["--resume", out])


def test_model_flags_shape_the_model_and_init_from_starts_from_its_weights(shapes_dir, tmp_path, capsys, monkeypatch):
    first = str(tmp_path / "first")
    train.main(run_args(shapes_dir, first, max_steps=2, image_size=32, patch_size=8, context_length=16))
    assert "upscaled" not in capsys.readouterr().err
    # a model larger than the shards' 64-px images is warned about
    train.main(run_args(shapes_dir, str(tmp_path / "big"), max_steps=1, image_size=128, patch_size=32))
    assert "holds 64-px images and the model takes 128 px" in capsys.readouterr().err
    ckpt = os.path.join(first, "ckpt-00000002.pt")
    state = load_checkpoint(ckpt)
    assert {k: state["model_config"][k] for k in ("image_size", "patch_size", "context_length")} == \
        {"image_size": 32, "patch_size": 8, "context_length": 16}
    # fine-tuning: the checkpoint's weights and shape, a fresh optimizer and schedule (a learning rate
    # this small leaves the weights where they start)
    ft = str(tmp_path / "ft")
    model = train.main(run_args(shapes_dir, ft, max_steps=1, max_lr=1e-12) + ["--init_from", ckpt])
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, state["model"][name], rtol=0, atol=1e-8, msg=name)
    assert [r["step"] for r in read_log(ft)] == [1]
    # resuming the fine-tuned run reports what the flags change, not the init_from it started with
    capsys.readouterr()
    train.main(["--out_dir", ft, "--resume", "--max_steps", "2"])
    changes = next(line for line in capsys.readouterr().out.splitlines() if "settings changed" in line)
    assert "max_steps 1 -> 2" in changes and "init_from" not in changes
    with pytest.raises(SystemExit, match="no checkpoint at"):
        train.main(run_args(shapes_dir, str(tmp_path / "ft3"), max_steps=1) + ["--init_from", ckpt + ".missing"])
    # a run directory to start from: its best.pt
    train.main(run_args(shapes_dir, str(tmp_path / "ft4"), max_steps=1) + ["--init_from", first])
    assert f"initialising from {os.path.join(first, 'best.pt')} (step 2)" in capsys.readouterr().out
    # a file holding only the weights and their shape, as one writes by hand (the README's model-in-your-code form)
    bare = str(tmp_path / "bare.pt")
    torch.save({"model": state["model"], "model_config": state["model_config"]}, bare)
    model = train.main(run_args(shapes_dir, str(tmp_path / "ft5"), max_steps=1, max_lr=1e-12) + ["--init_from", bare])
    assert f"initialising from {bare}\n" in capsys.readouterr().out
    torch.testing.assert_close(model.state_dict()["logit_scale"], state["model"]["logit_scale"], rtol=0, atol=1e-8)
    # fine-tuning at a higher resolution and a shorter context: the position embeddings follow, the rest is kept
    model = train.main(run_args(shapes_dir, str(tmp_path / "ft2"), max_steps=1, max_lr=1e-12) +
                       ["--init_from", ckpt, "--image_size", "64", "--context_length", "8"])
    assert "position embeddings resized: images 32 -> 64 px, captions 16 -> 8 tokens" in capsys.readouterr().out
    assert (model.config.image_size, model.config.context_length) == (64, 8)
    resized = resize_position_embeddings(state["model"], model.config)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, resized[name], rtol=0, atol=1e-8, msg=name)
        if "pos_embedding" not in name:
            torch.testing.assert_close(value, state["model"][name], rtol=0, atol=1e-8, msg=name)
    assert load_checkpoint(str(tmp_path / "ft2" / "ckpt-00000001.pt"))["model_config"]["image_size"] == 64
    # LiT: the image tower (and its projection) kept as the checkpoint has it, the text tower learning, and left
    # out of feature caching's second pass
    towers, step_of = [], train.forward_backward
    monkeypatch.setattr(train, "forward_backward", lambda *a: towers.append(a[7]) or step_of(*a))
    model = train.main(run_args(shapes_dir, str(tmp_path / "lit"), max_steps=2, max_lr=1e-2, micro_batch_size=8) +
                       ["--init_from", ckpt, "--lock_image", "true"])
    monkeypatch.undo()
    assert towers == [("text",), ("text",)]
    for name, value in model.state_dict().items():
        if name.startswith("visual."):
            assert torch.equal(value, state["model"][name]), name
    assert not torch.equal(model.text.token_embedding.weight, state["model"]["text.token_embedding.weight"])
    assert not torch.equal(model.text.proj.weight, state["model"]["text.proj.weight"])
    with pytest.raises(SystemExit, match="a fresh run's starts random: give the weights to keep with --init_from"):
        train.main(run_args(shapes_dir, str(tmp_path / "lit2"), max_steps=1, lock_text="true"))
    with pytest.raises(SystemExit, match="--lock_image and --lock_text together"):
        train.main(run_args(shapes_dir, str(tmp_path / "lit3"), max_steps=1) + ["--init_from", ckpt, "--lock_image",
                                                                                "true", "--lock_text", "true"])
    # but not a resumed run, nor another patch size (other weights' shapes)
    with pytest.raises(SystemExit, match=r"drop --image_size 64 .*start a new run from its weights with --init_from"):
        train.main(["--out_dir", ft, "--resume", "--image_size", "64"])
    with pytest.raises(SystemExit, match="fixes the model's shape; drop --patch_size 16"):
        train.main(run_args(shapes_dir, str(tmp_path / "ft6"), max_steps=1) + ["--init_from", ckpt, "--patch_size", "16"])
    # --model and --loss given with --resume would be lost without a word (the model is the checkpoint's)
    with pytest.raises(SystemExit, match=r"drop --model 'base' \(the checkpoint's: 'tiny'\)"):
        train.main(["--out_dir", ft, "--resume", "--model", "base"])
    with pytest.raises(SystemExit, match=r"drop --loss 'siglip' \(the run's: 'clip'\)"):
        train.main(["--out_dir", ft, "--resume", "--loss", "siglip"])
    # fine-tuning with the other loss: the checkpoint's towers, with SigLIP's own fresh temperature and bias
    sig = str(tmp_path / "sig")
    model = train.main(run_args(shapes_dir, sig, max_steps=1, max_lr=1e-12, loss="siglip") + ["--init_from", ckpt])
    assert model.config.loss == "siglip" and model.logit_bias is not None
    assert read_log(sig)[-1]["logit_bias"] == pytest.approx(-10.0)  # SigLIP's bias is logged, from its init
    for name, value in model.state_dict().items():
        if name not in ("logit_scale", "logit_bias"):
            torch.testing.assert_close(value, state["model"][name], rtol=0, atol=1e-8, msg=name)
    # started from that SigLIP run with no --loss: its loss, which its config and checkpoints then record
    model = train.main(run_args(shapes_dir, str(tmp_path / "sig2"), max_steps=1) + ["--init_from", sig])
    assert model.config.loss == "siglip"
    assert load_checkpoint(str(tmp_path / "sig2" / "ckpt-00000001.pt"))["config"]["loss"] == "siglip"


@pytest.mark.parametrize("hard_links", [True, False])
def test_keeps_last_k_plus_best(tmp_path, monkeypatch, hard_links):
    if not hard_links:  # as on a filesystem that has none: the best is then a copy
        def no_link(src, dst):
            raise OSError("hard links not supported")
        monkeypatch.setattr(os, "link", no_link)
    manager = CheckpointManager(str(tmp_path), keep=2)
    for step, val in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5)]:
        manager.save(step, {"step": step, "model": {"w": torch.full((2,), float(step))}, "model_config": {}}, val)
    assert [os.path.basename(p) for p in manager.checkpoints()] == ["ckpt-00000003.pt", "ckpt-00000004.pt"]
    assert load_checkpoint(manager.best_path)["step"] == 2
    assert not glob.glob(str(tmp_path / "*.tmp"))


def test_a_best_checkpoint_that_cannot_be_copied_is_a_checkpoint_error(tmp_path, monkeypatch):
    # without hard links the best is a copy, which a full disk refuses: the same error as a step checkpoint's
    # (which train.py turns into a message that stops every rank), not an OSError from deep inside
    def no_room(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "link", no_room)
    monkeypatch.setattr(shutil, "copyfile", no_room)
    manager = CheckpointManager(str(tmp_path), keep=2)
    with pytest.raises(CheckpointError, match=r"saved .*ckpt-00000001.pt, but could not write .*best.pt \(No space"):
        manager.save(1, {"step": 1, "model": {}, "model_config": {}}, 2.0)
    assert sorted(os.listdir(tmp_path)) == ["ckpt-00000001.pt"]  # whole, and nothing half written beside it


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_checkpoint_that_runs_code_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": Exploit()}, path, pickle_protocol=2)
    monkeypatch.chdir(tmp_path)  # where the payload would write: the folder is removed after the test, not the cwd
    # said in a line: what the file holds, and never torch's advice to load it with weights_only=False
    with pytest.raises(CheckpointError, match=r"cannot be loaded safely: it holds a pickled object \(\w+.system\), "
                                              r"which only code could rebuild\. .*never load untrusted files") as e:
        load_checkpoint(str(path))
    assert "likely succeed" not in str(e.value)
    assert not (tmp_path / "pwned").exists()
    with open(path, "wb") as f:  # a raw pickle, not even torch's format
        pickle.dump(Exploit(), f, protocol=2)
    with pytest.raises(CheckpointError):
        load_checkpoint(str(path))
    assert not (tmp_path / "pwned").exists()
    torch.save({"model": {"w": torch.zeros(1000)}, "model_config": {}}, path)
    path.write_bytes(path.read_bytes()[:2000])  # a copy that stopped early
    with pytest.raises(CheckpointError, match="cannot be loaded safely: it is cut short or damaged"):
        load_checkpoint(str(path))
    for other in (b"<html>404 Not Found</html>", b"hi\n"):  # a download that was a web page; a text file
        path.write_bytes(other)
        with pytest.raises(CheckpointError, match="cannot be loaded safely: it is no checkpoint"):
            load_checkpoint(str(path))
    path.write_bytes(b"")  # a write that never began
    with pytest.raises(CheckpointError, match="cannot be loaded safely: it is empty"):
        load_checkpoint(str(path))
    # safe files that are not train.py's checkpoints: refused with what they lack, not a KeyError later
    torch.save({"w": torch.zeros(3)}, path)
    with pytest.raises(SystemExit, match="is not a checkpoint of train.py"):
        train.main(["--init_from", str(path), "--out_dir", str(tmp_path / "run")])
    cfg = get_config("tiny", vision_layers=1, text_layers=1)
    torch.save({"model": CLIP(cfg).state_dict(), "model_config": cfg.__dict__}, path)  # weights, no run state
    with pytest.raises(SystemExit, match="holds weights only.*--init_from"):
        train.main(["--resume", str(path)])


def test_nonfinite_steps_are_skipped_then_stop_the_run(shapes_dir, tmp_path, monkeypatch):
    calls = {"n": 0}

    def flaky_loss(*args):
        calls["n"] += 1
        loss = clip_loss(*args)
        return loss * float("nan") if calls["n"] in (2, 3) else loss

    monkeypatch.setattr(train, "clip_loss", flaky_loss)
    out = str(tmp_path / "run")
    train.main(run_args(shapes_dir, out, eval_interval=100))
    log = read_log(out)
    assert log[-1]["bad_steps"] == 2 and all(math.isfinite(r["loss"]) for r in log)
    state = load_checkpoint(os.path.join(out, "ckpt-00000006.pt"))
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert state["optimizer"]["state"][0]["step"].item() == 4  # 6 steps, 2 skipped

    monkeypatch.setattr(train, "clip_loss", lambda *a: clip_loss(*a) * float("nan"))
    with pytest.raises(SystemExit, match="non-finite steps in a row"):
        train.main(run_args(shapes_dir, str(tmp_path / "run2"), max_steps=20, max_bad_steps=3, eval_interval=100))


def test_weights_gone_non_finite_are_never_saved(shapes_dir, tmp_path, monkeypatch):
    # finite gradients can still carry the weights to inf (a learning rate far too large): here at step 3, so
    # the checkpoint of step 4 must not be written over the good one of step 2, and the message says what to do
    calls = {"n": 0}
    step = train.clipped_step

    def step_then_overflow(optimizer, params, *args, **kw):
        params = list(params)
        out = step(optimizer, params, *args, **kw)
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                params[-1].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(train, "clipped_step", step_then_overflow)
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit, match=r"step 4: the weights hold NaN/inf; not saving them\. Resume from"):
        train.main(run_args(shapes_dir, out, checkpoint_interval=2, eval_interval=100))
    assert not glob.glob(os.path.join(out, "ckpt-00000004.pt*"))
    assert all(torch.isfinite(v).all() for v in load_checkpoint(os.path.join(out, "ckpt-00000002.pt"))["model"].values())


def test_a_checkpoint_whose_weights_do_not_fit_its_model_says_so(shapes_dir, tmp_path):
    out = str(tmp_path / "run")
    train.main(run_args(shapes_dir, out, max_steps=1, eval_interval=100))
    state = load_checkpoint(os.path.join(out, "ckpt-00000001.pt"))
    for name, change in (("missing", lambda m: m.pop("text.ln_f.weight")),
                         ("reshaped", lambda m: m.update({"text.ln_f.weight": torch.ones(3), "text.ln_f.bias": torch.ones(3)}))):
        broken = {**state, "model": dict(state["model"])}
        change(broken["model"])
        torch.save(broken, tmp_path / f"{name}.pt")
        with pytest.raises(SystemExit, match=r"does not hold the weights of the model its model_config describes: "
                                             r".*text\.ln_f\.weight" + (r".*text\.ln_f\.bias" if name == "reshaped" else "")):
            train.main(run_args(shapes_dir, str(tmp_path / name), init_from=str(tmp_path / f"{name}.pt")))


def test_mfu_counts_the_caption_positions_each_batch_runs(tmp_path, monkeypatch):
    # every caption is "a red circle": the loader cuts each batch after 4 positions, not 32, and the
    # logged MFU must count those 4, or it would count text-tower work that never ran
    src = tmp_path / "src"
    os.makedirs(src)
    for i in range(24):
        Image.new("RGB", (40, 40), (10 * i, 0, 0)).save(src / f"{i}.jpg")
        (src / f"{i}.txt").write_text("a red circle")
    data = str(tmp_path / "data")
    prep_dataset.main(["--source", "folder", "--input", str(src), "--out_dir", data, "--image_size", "64",
                       "--val_fraction", "0.25", "--num_workers", "1"])
    peak = 1e12
    monkeypatch.setattr(train, "peak_flops", lambda device: peak)
    out = str(tmp_path / "run")
    train.main(run_args(data, out, batch_size=8, max_steps=2, eval_interval=100))
    cfg = get_config("tiny")
    T = len(Tokenizer(cfg.encoding, cfg.context_length).enc.encode_ordinary("a red circle")) + 1
    for r in read_log(out):
        assert r["mfu"] == pytest.approx(flops_per_sample(cfg, text_length=T) * r["samples_per_s"] / peak, rel=1e-9)
        assert r["mfu"] < flops_per_sample(cfg) * r["samples_per_s"] / peak
        # the time left at this pace: the steps to go, at 8 samples each
        assert r["eta_min"] == pytest.approx((2 - r["step"]) * 8 / r["samples_per_s"] / 60, rel=1e-9)


def test_a_cpu_step_on_two_cores_loads_its_batches_itself(tmp_path, shapes_dir, monkeypatch):
    # the default --num_workers, where the step runs on a CPU of two cores: no loader process (dataloader's rule)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    out = str(tmp_path / "run")
    train.main(run_args(shapes_dir, out, num_workers=-1, max_steps=1, vision_layers=1, text_layers=1))
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["loader_workers"] == 0


def test_throughput_is_timed_after_the_first_step(tmp_path, monkeypatch, shapes_dir, capsys):
    # the first step compiles and starts the loader (here: a 3 s pause); the first logged samples/s
    # must not count it, or the first interval's speed and minutes left would be far too pessimistic
    calls, step_fn = [], train.forward_backward
    def slow_first(*a):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(3)
        return step_fn(*a)
    monkeypatch.setattr(train, "forward_backward", slow_first)
    out = str(tmp_path / "run")
    train.main(run_args(shapes_dir, out, batch_size=8, max_steps=3, log_interval=3, eval_interval=100))
    said = capsys.readouterr().out
    first = re.search(r"step 1: ([\d.]+)s \(the first step: loader start-up\); throughput is timed from here", said)
    assert first and float(first.group(1)) >= 3
    # the run's end: how long it took, where its best weights are, and what to run next
    (val,) = [r["val_loss"] for r in read_log(out, "eval")]
    done = re.search(r"^done: step 3 in (\d+) s; the lowest val loss, ([\d.]+), is (.+best\.pt)\. Next: python logger.py ",
                     said, flags=re.M)
    assert done and int(done[1]) >= 3 and float(done[2]) == pytest.approx(val, rel=1e-3)
    assert done[3] == os.path.join(out, "best.pt") and os.path.isfile(done[3])
    (r,) = read_log(out)
    assert 2 * 8 / r["samples_per_s"] < 3  # the two timed steps, without the first's pause (however busy the machine)


def test_the_gpu_peak_is_the_datasheet_figure_of_that_exact_model(monkeypatch):
    cuda, expected = torch.device("cuda", 0), {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12,
                                                "NVIDIA H100 NVL": 835e12, "NVIDIA A100-SXM4-80GB": 312e12,
                                                "NVIDIA A10": 125e12, "NVIDIA L4": 121e12, "NVIDIA L40": 181e12,
                                                "NVIDIA L40S": 362e12, "NVIDIA B200": 2250e12, "Tesla V100-SXM2-32GB": 125e12,
                                                "Tesla V100-PCIE-16GB": 112e12, "Tesla V100S-PCIE-32GB": 130e12,
                                                "Tesla T4": 65e12, "NVIDIA GeForce RTX 4090": 165e12, "Some Future GPU": None}
    for name, peak in expected.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        assert train.peak_flops(cuda) == peak, name
    assert train.peak_flops(torch.device("cpu")) is None


def test_bf16_on_a_cpu_is_suggested_where_it_is_fast_and_warned_against_where_it_is_emulated(tmp_path, monkeypatch):
    cpus = {"flags\t\t: fpu sse2 avx avx2 fma avx512f\n": False,          # AVX2/AVX-512 without bf16: emulated
            "flags\t\t: fpu avx2 avx512f avx512_bf16\n": True,            # AVX512-BF16
            "flags\t\t: fpu avx2 amx_tile amx_bf16\n": True,              # AMX
            "Features\t: fp asimd sve i8mm bf16\nCPU part\t: 0xd40\n": True}  # an Arm with BF16
    for text, units in cpus.items():
        (tmp_path / "cpuinfo").write_text(text * 2)  # one block per core
        assert train.cpu_multiplies_bf16(str(tmp_path / "cpuinfo")) is units, text
    assert train.cpu_multiplies_bf16(str(tmp_path / "none")) is None  # no /proc (macOS): unknown, so no advice
    for units, precision, advice in [(True, "auto", "runs 2-3x faster"), (False, "bf16", "warning: this CPU has no bf16"),
                                     (True, "bf16", None), (False, "auto", None), (None, "bf16", None),
                                     (False, "fp32", None), (True, "fp32", None)]:
        monkeypatch.setattr(train, "cpu_multiplies_bf16", lambda: units)
        line = train.cpu_bf16_advice(precision)
        assert (line is None) if advice is None else (advice in line), (units, precision, line)


def test_precision_and_compiling_follow_what_the_hardware_can_do_and_say_why(monkeypatch, shapes_dir, tmp_path, capsys):
    # a T4 or V100 (compute capability 7.x): bf16 would fail in the compiler, fp16 has tensor cores; a P100
    # (6.0): no tensor cores, and Triton refuses it
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    gpus = {"A100": dict(name="NVIDIA A100, compute capability 8.0", bf16=True, fp16=True, triton_installed=True,
                         triton_supported=True),
            "T4": dict(name="Tesla T4, compute capability 7.5", bf16=False, fp16=True, triton_installed=True,
                       triton_supported=True),
            "P100": dict(name="Tesla P100, compute capability 6.0", bf16=False, fp16=False, triton_installed=True,
                         triton_supported=False),
            "no Triton": dict(name="NVIDIA RTX 4090, compute capability 8.9", bf16=True, fp16=True,
                              triton_installed=False, triton_supported=True)}
    # (gpu, flag) -> (the choice, whether a note says why), or the error's words
    precision = {("A100", "auto"): ("bf16", False), ("A100", "bf16"): ("bf16", False), ("A100", "fp16"): ("fp16", False),
                 ("A100", "fp32"): ("fp32", False), ("T4", "auto"): ("fp16", True), ("T4", "fp16"): ("fp16", False),
                 ("T4", "fp32"): ("fp32", False), ("T4", "bf16"): "no bf16 tensor cores.*fp16 with loss scaling",
                 ("P100", "auto"): ("fp32", True), ("P100", "bf16"): "no bf16 tensor cores.*fp32"}
    compile_ = {("A100", "auto"): (True, False), ("A100", "false"): (False, False), ("T4", "auto"): (True, False),
                ("P100", "auto"): (False, True), ("P100", "false"): (False, False), ("P100", "true"): "too old",
                ("no Triton", "auto"): (False, True), ("no Triton", "true"): "not installed"}
    for choose, table in ((train.choose_precision, precision), (train.choose_compile, compile_)):
        for (gpu, flag), expected in table.items():
            monkeypatch.setattr(train, "gpu_facts", lambda device: gpus[gpu])
            if isinstance(expected, str):
                with pytest.raises(ValueError, match=expected):
                    choose(flag, cuda)
                continue
            chosen, note = choose(flag, cuda)
            assert (chosen, note is not None) == expected, (choose.__name__, gpu, flag, note)
            assert note is None or gpus[gpu]["name"] in note or "not installed" in note
    # a CPU compiles only when asked, and takes bf16 or fp16 only when asked (fp16 with a warning: it is emulated)
    assert train.choose_compile("auto", cpu) == (False, None) and train.choose_compile("true", cpu) == (True, None)
    monkeypatch.setenv("CXX", "no-such-compiler++")  # a machine without a C++ compiler, which compiling on a CPU needs
    with pytest.raises(ValueError, match=r"no C\+\+ compiler here \(no-such-compiler\+\+\)"):
        train.choose_compile("true", cpu)
    assert train.choose_compile("auto", cpu) == (False, None)
    monkeypatch.delenv("CXX")
    assert train.choose_precision("auto", cpu)[0] == "fp32" and train.choose_precision("bf16", cpu)[0] == "bf16"
    chosen, note = train.choose_precision("fp16", cpu)
    assert chosen == "fp16" and note.startswith("warning")
    # train.py and evaluate.py stop on such a choice with its message, before any work
    monkeypatch.setattr(train, "choose_precision", lambda precision, device: (_ for _ in ()).throw(ValueError("no bf16 here")))
    with pytest.raises(SystemExit, match="no bf16 here"):
        train.main(run_args(shapes_dir, str(tmp_path / "run")))
    assert not os.path.exists(os.path.join(tmp_path, "run", "log.jsonl"))
    capsys.readouterr()
    with pytest.raises(SystemExit):  # before the checkpoint is even looked for
        evaluate.main([str(tmp_path / "no_such.pt"), "--retrieval", shapes_dir])
    assert "no bf16 here" in capsys.readouterr().err


# what each device raises when its memory runs out (the messages of torch 2.13): only CUDA's is an OutOfMemoryError
@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    RuntimeError("MPS backend out of memory (MPS allocated: 17.80 GiB, other allocations: 1.03 GiB, max allowed: "
                 "18.13 GiB). Tried to allocate 512.00 MiB on private pool."),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
                 "to allocate 285212672 bytes. Error code 12 (Cannot allocate memory)")])
def test_running_out_of_memory_says_which_settings_keep_the_gradients(shapes_dir, tmp_path, monkeypatch, error):

    assert not train.out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))  # raised as it is

    def out_of_memory(*args, **kwargs):
        raise error
    monkeypatch.setattr(train, "forward_backward", out_of_memory)
    # 16 samples a pass: half of them, a divisor of the batch, in micro-batches; then with micro-batches of 6 of 12
    with pytest.raises(SystemExit, match=r"step 1: out of memory on cpu at 16 samples .*--micro_batch_size 8 .*"
                                         r"--grad_checkpointing true"):
        train.main(run_args(shapes_dir, str(tmp_path / "a")))
    with pytest.raises(SystemExit, match=r"at 6 samples .*--micro_batch_size 3 "):
        train.main(run_args(shapes_dir, str(tmp_path / "b"), batch_size=12, micro_batch_size=6))
    # it may strike one rank alone: under torchrun every rank that meets it says so, not only the node's first
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(SystemExit) as stopped:
        train.main(run_args(shapes_dir, str(tmp_path / "c")))
    assert "out of memory" in stopped.value.code and not train.stops_quietly(stopped.value)


def test_a_fresh_run_never_overwrites_an_earlier_one(shapes_dir, tmp_path):
    out = str(tmp_path / "run")
    train.main(run_args(shapes_dir, out, max_steps=3))
    with pytest.raises(SystemExit, match="--resume"):
        train.main(run_args(shapes_dir, out, max_steps=3))
    with pytest.raises(SystemExit, match="choose one of"):
        train.main(run_args(shapes_dir, str(tmp_path / "other"), precision="fp8"))
    # nor does one run write into a directory another is writing into (before either has a checkpoint)
    busy = str(tmp_path / "busy")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"),
                             *run_args(shapes_dir, busy, max_steps=100_000, checkpoint_interval=0, num_workers=1)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not os.path.exists(os.path.join(busy, "log.jsonl")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        with pytest.raises(SystemExit, match=f"another train.py is writing into {re.escape(busy)}"):
            train.main(run_args(shapes_dir, busy, max_steps=3))
    finally:
        proc.kill()  # however a run ends, the lock goes with it
        proc.wait()
    train.main(run_args(shapes_dir, busy, max_steps=3, checkpoint_interval=0))
    assert os.path.exists(os.path.join(busy, "ckpt-00000003.pt"))


def test_missing_data_says_which_command_makes_it(tmp_path, shapes_dir, capsys):
    with pytest.raises(SystemExit, match="prep_dataset.py --out_dir"):
        train.main(["--data_dir", str(tmp_path / "t2i"), "--out_dir", str(tmp_path / "run")])
    # train.py's default folder, text-to-image-2M's: prep that set there, not the demo's shapes
    t2i = str(tmp_path / "data" / "text-to-image-2M")
    with pytest.raises(SystemExit) as stopped:
        train.main(["--data_dir", t2i, "--out_dir", str(tmp_path / "run")])
    assert f"python prep_dataset.py --out_dir {t2i} " in str(stopped.value) and "shapes" not in str(stopped.value)
    # another tool's shards, straight in the folder: say how to make train/ and val/ of them
    (tmp_path / "wds").mkdir()
    shutil.copy(glob.glob(os.path.join(shapes_dir, "train", "*.tar"))[0], tmp_path / "wds" / "00000.tar")
    with pytest.raises(SystemExit, match=r"(?s)1 .tar files in .*--source webdataset --input '.*wds/\*.tar'"):
        train.main(["--data_dir", str(tmp_path / "wds"), "--out_dir", str(tmp_path / "run")])
    # a prepared set's split folder, given for the set: the set's folder is named
    with pytest.raises(SystemExit, match=rf"train is the train split of the prepared set {shapes_dir}: give the set's "
                                         rf"folder, --data_dir {shapes_dir}"):
        train.main(["--data_dir", os.path.join(shapes_dir, "train"), "--out_dir", str(tmp_path / "run")])
    # a prep stopped before it wrote the shards (its work in .stage): rerun it
    (tmp_path / "stopped" / ".stage").mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"prep_dataset.py has not finished making .*stopped \(it was stopped, or still runs\). Rerun its command"):
        train.main(["--data_dir", str(tmp_path / "stopped"), "--out_dir", str(tmp_path / "run")])
    # the data itself, not yet prepared: images with their captions, or images and the table that lists them
    (tmp_path / "pairs" / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "pairs" / "sub" / "x.jpg")
    (tmp_path / "pairs" / "sub" / "x.txt").write_text("a black square")
    pairs = str(tmp_path / "pairs")
    with pytest.raises(SystemExit, match=rf"(?s){pairs} holds images, not the shards .*--source folder --input {pairs} "
                                         rf"--out_dir {pairs}-prepared"):
        train.main(["--data_dir", pairs, "--out_dir", str(tmp_path / "run")])
    (tmp_path / "pairs" / "sub" / "x.txt").rename(tmp_path / "pairs" / "list.csv")
    with pytest.raises(SystemExit, match=r"(?s)--source table --input TABLE --out_dir .*pairs-prepared"):
        train.main(["--data_dir", pairs, "--out_dir", str(tmp_path / "run")])
    # another tool's shards in train/, with their captions in .json (img2dataset, text-to-image-2M): how to prepare them
    import tarfile
    (tmp_path / "json_captions" / "train").mkdir(parents=True)
    with tarfile.open(tmp_path / "json_captions" / "train" / "00000.tar", "w") as tar:
        for name, data in (("0.jpg", b"\xff\xd8"), ("0.json", b'{"prompt": "a cat"}')):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(SystemExit, match=r"(?s)hold no complete sample .*their samples have .jpg, .json files.*"
                                         r"--source webdataset --input '.*json_captions/train/\*.tar'"):
        train.main(["--data_dir", str(tmp_path / "json_captions"), "--out_dir", str(tmp_path / "run")])
    # too little data for the batch: a message, not a traceback (the 240 samples hold 192 for training)
    with pytest.raises(SystemExit, match="batch_size 256 is larger than the 192 samples .* use a smaller --batch_size"):
        train.main(run_args(shapes_dir, str(tmp_path / "run"), batch_size=256))
    # shards with no manifest (another tool's) and a val split smaller than the batch: val runs at its size
    shutil.copytree(os.path.join(shapes_dir, "train"), tmp_path / "bare" / "train")
    shutil.copytree(os.path.join(shapes_dir, "val"), tmp_path / "bare" / "val")
    train.main(run_args(str(tmp_path / "bare"), str(tmp_path / "bare_run"), batch_size=64, max_steps=2, eval_interval=2))
    assert "val_loss" in read_log(str(tmp_path / "bare_run"), "eval")[0]
    # an evaluation set (--val_fraction 1: all in val/) is named as such
    shutil.copytree(os.path.join(shapes_dir, "val"), tmp_path / "eval_only" / "val")
    with pytest.raises(SystemExit, match="holds val/ shards only: an evaluation set"):
        train.main(run_args(str(tmp_path / "eval_only"), str(tmp_path / "run")))
    # a val split is optional: an empty val folder trains without val loss or retrieval, not a stop
    data = tmp_path / "no_val"
    shutil.copytree(os.path.join(shapes_dir, "train"), data / "train")
    (data / "val").mkdir()
    capsys.readouterr()
    train.main(run_args(str(data), str(tmp_path / "no_val_run"), max_steps=3, retrieval=True))
    assert "no val split to evaluate on" in capsys.readouterr().out
    assert read_log(str(tmp_path / "no_val_run"), "eval") == []  # no line of the step alone
    assert not os.path.exists(tmp_path / "no_val_run" / "best.pt")
    assert os.path.exists(tmp_path / "no_val_run" / "ckpt-00000003.pt")
    # several sets read as one, the val split taken from those that have one (here the shapes set's, with its tasks)
    out = str(tmp_path / "two_sets")
    train.main(run_args(f"{shapes_dir},{data}", out, max_steps=2, eval_interval=2, retrieval=True, zeroshot="auto"))
    assert "192 + 192 = 384 train samples" in capsys.readouterr().out
    evals = read_log(out, "eval")
    assert "val_loss" in evals[0] and "retrieval/image_to_text_R@1" in evals[0] and "zeroshot/shape/top1" in evals[0]
    with pytest.raises(SystemExit, match=f"no shards in {tmp_path / 'nowhere' / 'train'}"):
        train.main(run_args(f"{shapes_dir},{tmp_path / 'nowhere'}", str(tmp_path / "nowhere_run")))
    # no folder at all, or the table of pairs itself where its prepared set goes: what to give instead
    with pytest.raises(SystemExit, match="no data folder named"):
        train.main(run_args("", str(tmp_path / "empty_name_run")))
    (tmp_path / "pairs.csv").write_text("image,caption\nx.jpg,a dog\n")
    with pytest.raises(SystemExit, match=r"pairs.csv is a file: .* --source table --input .*pairs.csv"):
        train.main(run_args(str(tmp_path / "pairs.csv"), str(tmp_path / "table_run")))


def test_the_demo_makes_its_shapes_only_where_there_is_nothing_else(tmp_path, shapes_dir, monkeypatch):
    # a folder of the user's own files (here another tool's shards) with the demo's settings: the loader's
    # message on how to prepare them, and not one file added to the folder
    wds = tmp_path / "wds"
    wds.mkdir()
    shutil.copy(glob.glob(os.path.join(shapes_dir, "train", "*.tar"))[0], wds / "00000.tar")
    with pytest.raises(SystemExit, match="1 .tar files in"):
        train.main(run_args(str(wds), str(tmp_path / "run"), make_shapes=200))
    assert os.listdir(wds) == ["00000.tar"]
    # a generation cut short after its shards were written, before its manifest: the next run finishes it
    write_shards = prep_dataset.write_shards
    def interrupted(*args):
        write_shards(*args)
        raise KeyboardInterrupt
    monkeypatch.setattr(prep_dataset, "write_shards", interrupted)
    data = tmp_path / "shapes"
    data.mkdir()
    (data / ".DS_Store").write_bytes(b"")  # a folder made empty, then opened in a file browser
    with pytest.raises(KeyboardInterrupt):
        train.main(run_args(str(data), str(tmp_path / "run"), make_shapes=200))
    assert os.path.isdir(data / "train") and os.path.isdir(data / ".stage") and not os.path.exists(data / "manifest.json")
    monkeypatch.setattr(prep_dataset, "write_shards", write_shards)
    train.main(run_args(str(data), str(tmp_path / "run"), make_shapes=200, max_steps=1, zeroshot="auto"))
    assert not os.path.exists(data / ".stage") and "tasks" in json.load(open(data / "manifest.json"))
    assert "zeroshot/shape/top1" in read_log(str(tmp_path / "run"), "eval")[0]


def test_a_long_runs_noisy_curves_are_drawn_faint_under_their_centred_average(tmp_path, monkeypatch):
    import matplotlib.axes
    import numpy as np
    rng = np.random.default_rng(0)
    y = list(np.exp(-np.arange(500) / 100) + rng.normal(0, 0.1, 500))
    x, means = logger.smoothed(list(range(500)), y)
    half = 5  # 2% of 500 points: 11 to a window
    assert x == list(range(half, 500 - half))
    assert np.allclose(means, [np.mean(y[i - half:i + half + 1]) for i in x])  # a naive centred mean
    run = tmp_path / "long"
    run.mkdir()
    with open(run / "log.jsonl", "w") as f:
        for step in range(1, 301):
            f.write(json.dumps({"kind": "train", "step": step, "loss": 5 - step / 100 + rng.normal(0, 0.3),
                                "lr": 1e-3, "grad_norm": 1 + rng.random(), "samples_per_s": 500 + rng.normal()}) + "\n")
    drawn, plot = [], matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda ax, *a, **kw: drawn.append((ax, len(a[0]), kw)) or plot(ax, *a, **kw))
    logger.plot_runs([str(run)], str(tmp_path / "p.png"))
    lines = lambda title: [(n, kw) for ax, n, kw in drawn if ax.get_title() == title]  # titled after the lines
    for title in ("loss", "grad norm", "samples/s"):  # the raw points faint and out of the legend, then the average
        (raw_n, raw), (mean_n, mean) = lines(title)
        assert raw_n == 300 and raw["alpha"] < 1 and raw["label"].startswith("_")
        assert mean_n == 294 and "alpha" not in mean and mean["label"] in ("long", "long loss")
    assert [n for n, _ in lines("learning rate")] == [300]  # not noisy: drawn as it is


def test_the_log_is_strict_json_with_non_finite_numbers_as_null(tmp_path, capsys):
    log = logger.Logger(str(tmp_path))
    log.log({"kind": "train", "step": 1, "loss": 2.5, "grad_norm": float("inf"), "lr": float("nan")})

    def strict(token):
        raise ValueError(f"{token} is not JSON")
    (line,) = open(tmp_path / "log.jsonl").read().splitlines()
    assert json.loads(line, parse_constant=strict) == {"kind": "train", "step": 1, "loss": 2.5, "grad_norm": None,
                                                       "lr": None}
    assert "grad_norm inf" in capsys.readouterr().out  # the console still says what happened
    assert logger.series(logger.read_log(str(tmp_path / "log.jsonl")), "train", "grad_norm") == ([], [])


def test_plot_command_writes_a_png(shapes_dir, tmp_path, monkeypatch, capsys):
    import matplotlib.axes
    import matplotlib.figure
    out = str(tmp_path / "run")
    train.main(run_args(shapes_dir, out, zeroshot="auto", retrieval=True))
    capsys.readouterr()
    logger.main([out, "--out", str(tmp_path / "summary.png")])  # and each run's figures in a few lines
    said, trained, evals = capsys.readouterr().out, read_log(out), read_log(out, "eval")
    best = min(evals, key=lambda r: r["val_loss"])
    assert (f"{out}: step {trained[-1]['step']}, loss {trained[-1]['loss']:.4g}; lowest val_loss {best['val_loss']:.4g} "
            f"at step {best['step']}\n  evaluation at step {evals[-1]['step']}: val_loss ") in said
    assert "zeroshot/shape/top1" in said.splitlines()[1]
    logger.main([out, out, "--out", str(tmp_path / "figures" / "plots.png")])  # the folder is made
    logger.main([os.path.join(out, "log.jsonl")])  # the log file itself names its run
    logger.main([out, "--out", str(tmp_path / "figures")])  # a folder: its plots.png, not figures.png beside it
    logger.main([out, "--out", str(tmp_path / "new") + os.sep])
    logger.main([out, "--out", str(tmp_path / "no_type")])  # no type: matplotlib's png, said as the path written
    assert os.path.isfile(tmp_path / "new" / "plots.png") and f"wrote {tmp_path / 'no_type.png'}" in capsys.readouterr().out
    assert not os.path.exists(tmp_path / "figures.png")
    assert os.path.isfile(os.path.join(out, "plots.png"))
    with pytest.raises(SystemExit):  # a file type matplotlib cannot write: said before drawing
        logger.main([out, "--out", str(tmp_path / "plots.pgn")])
    assert "not .pgn" in capsys.readouterr().err
    (tmp_path / "started").mkdir()  # a run that has logged nothing yet: drawn blank, and said why
    (tmp_path / "started" / "log.jsonl").write_text("")
    logger.main([str(tmp_path / "started")])
    assert "log.jsonl holds no logged step yet" in capsys.readouterr().err

    def disk_full(*args, **kwargs):  # a full disk where the plot goes: what to do, not a traceback
        raise OSError(errno.ENOSPC, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(matplotlib.figure.Figure, "savefig", disk_full)
        with pytest.raises(SystemExit, match=r"could not write .*p.png \(No space left on device\): make room"):
            logger.main([out, "--out", str(tmp_path / "p.png")])
    from PIL import Image
    img = Image.open(tmp_path / "figures" / "plots.png")
    assert img.size[0] > 500 and img.size[1] > 300
    assert any("zeroshot/shape/top1" in r for r in read_log(out, "eval"))
    # one panel per family of metrics, its k's in order
    panels = dict(logger.eval_panels(read_log(out, "eval")))
    assert panels["retrieval/image_to_text"] == [("eval", f"retrieval/image_to_text_R@{k}") for k in (1, 5, 10)]
    assert panels["zeroshot/shape"] == [("eval", "zeroshot/shape/top1"), ("eval", "zeroshot/shape/top5")]
    assert set(panels) == {"retrieval/image_to_text", "retrieval/text_to_image", "zeroshot/shape", "zeroshot/color"}
    # two runs of the same name in different folders are both drawn, named by their paths
    for parent in ("a", "b"):
        shutil.copytree(out, tmp_path / parent / "run")
    labels, plot = [], matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda ax, *a, **kw: labels.append(kw["label"]) or plot(ax, *a, **kw))
    logger.plot_runs([str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run")], str(tmp_path / "two.png"))
    assert {str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run")} <= set(labels)
    # what only some runs log gets a panel where one of them has it: an fp16 run's loss scale
    titles, set_title = [], matplotlib.axes.Axes.set_title
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", lambda ax, t, *a, **kw: titles.append(t) or set_title(ax, t, *a, **kw))
    figures, savefig = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **kw: figures.append(fig) or savefig(fig, *a, **kw))
    logger.plot_runs([out], str(tmp_path / "one.png"))
    # every panel spans the run's steps, the evaluations' (a point or two) as the training curves
    steps = [r["step"] for r in logger.read_log(os.path.join(out, "log.jsonl"))]
    drawn = [ax for ax in figures[-1].axes if ax.lines]
    assert len(drawn) >= 9
    for ax in drawn:
        lo, hi = ax.get_xlim()
        assert lo <= min(steps) and hi >= max(steps) and hi - lo <= 1.2 * (max(steps) - min(steps)) + 2, ax.get_title()
    assert "fp16 loss scale" not in titles and "MFU" not in titles and "SigLIP bias" not in titles
    with open(os.path.join(tmp_path / "a" / "run", "log.jsonl"), "a") as f:
        f.write(json.dumps({"kind": "train", "step": 7, "loss": 2.0, "loss_scale": 32768.0, "logit_bias": -9.5}) + "\n")
    logger.plot_runs([out, str(tmp_path / "a" / "run")], str(tmp_path / "both.png"))
    assert "fp16 loss scale" in titles and "SigLIP bias" in titles

# ---------------------------------------------------------------------------- DDP


WRAPPER = """
import os, sys, torch
sys.path.insert(0, {root!r})
import clip, evaluate, train
# the images this rank embeds for the evaluations (the val split's and the zero-shot sets'), counted
embedded, evaluating = [0], [False]
def counted_call(self, model, _call=evaluate.TrainingEvaluator.__call__):
    evaluating[0] = True
    try:
        return _call(self, model)
    finally:
        evaluating[0] = False
def counted_encode(self, images, *args, _encode=clip.CLIP.encode_image, **kwargs):
    embedded[0] += len(images) if evaluating[0] else 0
    return _encode(self, images, *args, **kwargs)
evaluate.TrainingEvaluator.__call__, clip.CLIP.encode_image = counted_call, counted_encode
model = train.main(sys.argv[1:])
torch.save({{**model.state_dict(), "evaluated_images": torch.tensor(embedded[0])}},
           os.path.join({out!r}, f"rank{{os.environ['RANK']}}.pt"))
train.exit_after_ddp()  # as train.py ends a DDP run
"""


def test_the_loop_reads_values_off_the_device_only_at_logged_steps(shapes_dir, tmp_path, monkeypatch):
    """Reading a tensor's value (.item(), .tolist(), bool(t), float(t), ...) waits for every kernel queued before
    it: on a GPU, one read a step would leave the GPU idle between steps. The loop reads its figures once per
    logged step. Counted by where the reads come from (the training code's own files), a run of 9 steps logged
    once makes exactly the reads of a run of 3 steps logged once."""
    ours = {os.path.join(ROOT, f) for f in ("train.py", "clip.py", "checkpoint_manager.py", "evaluate.py")}
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu"):
        def counted(self, *args, _read=getattr(torch.Tensor, name), _name=name, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename in ours:
                reads.append(f"{_name} in {caller.co_name}")
            return _read(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    runs = []
    for steps in (3, 9):
        reads.clear()
        train.main(run_args(shapes_dir, str(tmp_path / f"run{steps}"), max_steps=steps, log_interval=steps,
                            eval_interval=steps, checkpoint_interval=steps))
        runs.append(sorted(reads))
    assert "tolist in main" in runs[1]  # the log's one read: the counting sees it
    assert runs[1] == runs[0]


def test_a_compiled_run_trains_like_the_eager_one(shapes_dir, tmp_path, monkeypatch):
    """--compile true (the default on a GPU) through the whole loop: feature-cached micro-batches (a no-grad
    and a grad graph), batches of captions of several lengths (trimmed: the text tower recompiles with the
    length symbolic), evaluation at another batch size, and checkpoints that load into a plain CLIP.
    Inductor's C++ build would take about a minute here from a cold cache, so the graphs run through
    AOTAutograd's eager backend: what is checked is how train.py and clip.py trace, not the kernels Inductor
    would write for them."""
    compiled = []
    real_compile = torch.compile

    def compile_eagerly(model, **kw):
        compiled.append(model)
        return real_compile(model, backend="aot_eager", **kw)
    monkeypatch.setattr(torch, "compile", compile_eagerly)
    eager, comp = str(tmp_path / "eager"), str(tmp_path / "compiled")
    args = dict(max_steps=4, augment=False, micro_batch_size=8, checkpoint_interval=2, eval_interval=2,
                eval_batches=2, vision_layers=1, text_layers=1)
    model_eager = train.main(run_args(shapes_dir, eager, **args, compile="false"))
    assert compiled == []
    model_comp = train.main(run_args(shapes_dir, comp, **args, compile="true"))
    assert compiled == [model_comp]  # the raw model is compiled (and returned, saved, evaluated)
    assert len({r["step"] for r in read_log(comp)}) == 4
    losses_eager, losses_comp = [r["loss"] for r in read_log(eager)], [r["loss"] for r in read_log(comp)]
    assert losses_comp == pytest.approx(losses_eager, rel=1e-5)
    val_eager, val_comp = [r["val_loss"] for r in read_log(eager, "eval")], [r["val_loss"] for r in read_log(comp, "eval")]
    assert len(val_comp) == 2 and val_comp == pytest.approx(val_eager, rel=1e-5)
    for name, value in model_comp.state_dict().items():
        torch.testing.assert_close(value, model_eager.state_dict()[name], rtol=1e-4, atol=1e-5, msg=name)
    # its checkpoints hold the plain model's names (no "_orig_mod." of the compiled wrapper)
    loaded, _ = evaluate.load_model(os.path.join(comp, "ckpt-00000004.pt"), "cpu")
    assert loaded.state_dict().keys() == model_eager.state_dict().keys()
    assert all(torch.equal(v, model_comp.state_dict()[k]) for k, v in loaded.state_dict().items())


DDP_RUN = dict(max_steps=4, augment=False, checkpoint_interval=2, eval_interval=2, retrieval=True)


@pytest.fixture(scope="module")
def one_process_run(shapes_dir, tmp_path_factory):
    """The one-process runs that the DDP runs below must equal, by patch dropout: (its folder, its model, its
    flags). They evaluate as they go: retrieval and the shapes set's tasks on its val split, and zero-shot on
    a folder of 25 images in class folders."""
    runs, folders = {}, tmp_path_factory.mktemp("zeroshot")
    for i in range(25):
        _, labels = prep_dataset.shapes_sample(seed=7, index=i)
        (folders / labels["shape"]).mkdir(exist_ok=True)
        prep_dataset.render_shape(7, i, 64).save(folders / labels["shape"] / f"{i}.png")

    def run(patch_dropout):
        if patch_dropout not in runs:
            out = str(tmp_path_factory.mktemp("single"))
            flags = dict(DDP_RUN, zeroshot=str(folders), patch_dropout=patch_dropout)
            runs[patch_dropout] = out, train.main(run_args(shapes_dir, out, **flags)), flags
        return runs[patch_dropout]
    return run


@pytest.mark.parametrize("micro_batch_size, patch_dropout", [(0, 0.0), (4, 0.5)])
def test_ddp_two_processes_match_one_process(shapes_dir, one_process_run, tmp_path, micro_batch_size, patch_dropout):
    """2 ranks x 8 (or x 2 micro-batches of 4, with feature caching, and half of each image's patches left out)
    against one process with 16, evaluations included (the ranks share the images); then the 2-rank run resumed
    in one process."""
    (single, model, flags), multi = one_process_run(patch_dropout), str(tmp_path / "ddp")
    args = dict(flags, micro_batch_size=micro_batch_size)
    os.makedirs(multi)
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER.format(root=ROOT, out=multi))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(wrapper), *run_args(shapes_dir, multi, **args)], check=True, env=env, cwd=ROOT,
                   stdout=subprocess.DEVNULL, timeout=300)
    r0, r1 = (torch.load(os.path.join(multi, f"rank{r}.pt")) for r in (0, 1))
    # each rank embedded its share of the 48 val images and the 25 zero-shot ones, at each of the 2 evaluations
    shares = r0.pop("evaluated_images").item(), r1.pop("evaluated_images").item()
    assert sum(shares) == 2 * (48 + 25) and min(shares) >= 2 * (24 + 12), shares
    for name in r0:
        assert torch.equal(r0[name], r1[name]), f"ranks disagree on {name}"
        torch.testing.assert_close(r0[name], model.state_dict()[name], rtol=1e-4, atol=1e-5, msg=name)
    losses_single = [r["loss"] for r in read_log(single)]
    losses_ddp = [r["loss"] for r in read_log(multi)]
    assert losses_ddp == pytest.approx(losses_single, abs=1e-5)
    evals_single, evals_ddp = read_log(single, "eval"), read_log(multi, "eval")
    assert [r["step"] for r in evals_ddp] == [r["step"] for r in evals_single] == [2, 4]
    for one, two in zip(evals_single, evals_ddp):
        assert sorted(two) == sorted(one) and any(k.startswith("retrieval/") for k in one)
        assert sum(k.startswith("zeroshot/") for k in one) == 6  # shape, colour and the folders, top-1 and top-5
        for key in one:
            assert two[key] == pytest.approx(one[key], abs=1e-5), key
    # the two ranks' run goes on in one process from their step-2 checkpoint (as on a node with fewer GPUs): the
    # same global batches, so the same run
    resumed = train.main(["--resume", os.path.join(multi, "ckpt-00000002.pt")])
    for name, value in resumed.state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[name], rtol=1e-4, atol=1e-5, msg=name)


def test_nodes_that_find_different_files_or_cannot_save_stop_together_saying_why(shapes_dir, tmp_path):
    """Two nodes (one rank each, each in its own folder) whose disks hold different data, then
    a checkpoint that only one of them has: without the check they would train on silently wrong (different
    epochs' orders, optimizer states), or one would wait for the other until the timeout. Then a full disk where
    rank 0 saves: the other rank learns it too."""
    import socket
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
    os.symlink(shapes_dir, nodes[0] / "data")
    shutil.copytree(shapes_dir, nodes[1] / "data")
    os.remove(sorted(glob.glob(str(nodes[1] / "data" / "train" / "*.tar")))[-1])  # one shard fewer there
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}

    def run_nodes(*extra, script=os.path.join(ROOT, "train.py"), out="run", torchrun=False):
        """Each node's exit code and stderr. Under torchrun, on a busy 2-core machine, 4 runs in 67 hung after
        training (before train.exit_after_ddp): rank 1 aborted as its interpreter shut down ("terminate called
        without an active exception"), and node 0's torchrun waited for node 1's. A run that hangs is ended and
        tried once more from a clean start (what the first try wrote into --out_dir removed: the retry would
        otherwise find its checkpoints); where it hangs again, the test fails with what each node said."""
        fresh = [not (node / out).exists() for node in nodes]
        for attempt in (1, 2):
            for node, new in zip(nodes, fresh):
                if new:
                    shutil.rmtree(node / out, ignore_errors=True)
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            # what torchrun --nnodes 2 --node_rank r --nproc_per_node 1 gives each node's one process; or torchrun
            # itself, as the README's multi-node command runs it
            launch = lambda r: ([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={r}",
                                 "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}"] if torchrun
                                else [sys.executable])
            procs = [subprocess.Popen([*launch(r), script, *run_args("data", out, max_steps=3), *extra], cwd=node,
                                      env=env if torchrun else {**env, "RANK": str(r), "LOCAL_RANK": "0",
                                                                "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1",
                                                                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for r, node in enumerate(nodes)]
            try:
                return [(p.wait(timeout=120), p.stderr.read()) for p in procs]
            except subprocess.TimeoutExpired:
                for p in procs:
                    kill_tree(p.pid)
                said = [p.communicate()[1] for p in procs]
                assert attempt == 1, f"the two nodes hung twice; they said: {said}"
                print(f"the two nodes hung; tried again. They said: {said}", file=sys.stderr)

    for code, err in run_nodes():
        assert code != 0
        assert "the ranks did not find the same data" in err, err
        assert "rank 0: 192 train samples in 4 shards" in err
        assert int(re.search(r"rank 1: (\d+) train samples in 3 shards", err).group(1)) < 192
        assert "storage that all nodes share" in err
    assert not os.path.exists(nodes[0] / "run" / "log.jsonl")  # nothing trained
    # the same data on both, and a checkpoint on node 0's disk only: a run there, alone
    shutil.rmtree(nodes[1] / "data")
    os.symlink(shapes_dir, nodes[1] / "data")
    subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *run_args("data", "run", max_steps=3)],
                   cwd=nodes[0], env=env, check=True, stdout=subprocess.DEVNULL, timeout=120)
    for code, err in run_nodes("--resume"):
        assert code != 0
        assert "the ranks did not find the same checkpoint to start from" in err, err
        assert f"rank 0: {os.path.join('run', 'ckpt-00000003.pt')} (step 3)" in err
        assert "rank 1: --resume: no checkpoint in run" in err
    # the same files, and rank 0's disk fills up at the first checkpoint: every node stops, and says why
    wrapper = tmp_path / "full_disk.py"
    wrapper.write_text(FULL_DISK.format(root=ROOT))
    for code, err in run_nodes(script=str(wrapper), out="fresh"):
        assert code != 0
        assert re.search(r"step 3: could not write .*ckpt-00000003.pt \(No space left on device\)", err), err
    assert "rank 0 could not save: step 3" in err
    # a zero-shot set that one node lacks: the ranks evaluate their shares of the others, and all leave it out
    for i in range(6):
        _, labels = prep_dataset.shapes_sample(seed=7, index=i)
        (nodes[0] / "zs" / labels["shape"]).mkdir(parents=True, exist_ok=True)
        prep_dataset.render_shape(7, i, 64).save(nodes[0] / "zs" / labels["shape"] / f"{i}.png")
    (code0, err0), (code1, _) = run_nodes("--zeroshot", "./zs", "--retrieval", "true", out="partial", torchrun=True)
    assert code0 == code1 == 0, err0
    assert "zero-shot on ./zs failed and is dropped for this run: another rank could not read it" in err0
    evals = read_log(str(nodes[0] / "partial"), "eval")
    assert evals[0]["zeroshot/shape/top1"] >= 0 and "retrieval/text_to_image_R@1" in evals[0]
    assert not any(k.startswith("zeroshot/zs/") for k in evals[0])


def kill_tree(pid):
    """SIGKILL a process and all its descendants (torchrun's agent and the workers it started), read from /proc."""
    def children(p):
        found = []
        for task in glob.glob(f"/proc/{p}/task/*/children"):
            try:
                found += [int(c) for c in open(task).read().split()]
            except OSError:
                pass
        return found
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children(p)
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


FULL_DISK = """
import errno, os, sys, torch
sys.path.insert(0, {root!r})
import train
def disk_full(obj, f, *args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")
if os.environ["RANK"] == "0":
    torch.save = disk_full
train.main(sys.argv[1:])
"""
