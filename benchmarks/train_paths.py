"""
Every way train.py trains, run for a few steps on this machine's device, each in a process of its own as a
user runs it: that it ends without an error, that its loss stays finite and falls, and what each path
promises beyond that (a resumed run ends where the uninterrupted one does; a locked tower keeps its weights).

The test suite runs on the CPU only (tests/conftest.py says why), so on a GPU box this is the check of the
training loop's device paths: the loader's side-stream copy, fused AdamW with the clipping and fp16's loss
scale inside it, patch dropout's indices from pinned memory, feature caching, compiling, DDP over NCCL, and
evaluation. On a 2-core CPU every path but fp16 takes about two minutes in all (benchmarks/NOTES.md).

    python benchmarks/train_paths.py                            # every path, on the GPU (else the CPU)
    python benchmarks/train_paths.py --paths fp16,resume        # some of them
    python benchmarks/train_paths.py --compile true             # every path compiled, not only `default`

Each run is the demo's (`--config demo`: the tiny model on the shapes set, made here) for --steps steps,
with one evaluation and one checkpoint at its end. `default` takes train.py's own choices for this device
(bf16 and compiled on a recent GPU); the others run with --compile as given (default: eager, to save the
compile time of every run), plus their own flags.
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import prep_dataset  # noqa: E402
from checkpoint_manager import load_checkpoint  # noqa: E402
from logger import read_log  # noqa: E402

# name: (train.py flags, what it exercises). `lit` and `evaluate` start from `default`'s checkpoint
PATHS = {
    "default": ([], "train.py's own precision and compiling for this device"),
    "eager": (["--compile", "false"], "no torch.compile"),
    "fp32": (["--precision", "fp32"], "no autocast"),
    "fp16": (["--precision", "fp16"], "fp16 autocast, the loss scale inside fused AdamW (V100, T4)"),
    "micro_batch": (["--micro_batch_size", "{quarter}"], "feature caching over 4 micro-batches"),
    "grad_checkpointing": (["--grad_checkpointing", "true"], "activations recomputed in the backward"),
    "patch_dropout": (["--patch_dropout", "0.5"], "half of each image's patches, indices from pinned memory"),
    "siglip": (["--loss", "siglip"], "the sigmoid loss and its bias"),
    "resume": ([], "stopped halfway, resumed from that checkpoint in a new process"),
    "lit": (["--lock_image", "true"], "the image tower locked (LiT), from default's weights"),
    "ddp": ([], "torchrun, one process per GPU (two on a CPU): DDP and the gathered loss"),
    "evaluate": ([], "evaluate.py on default's checkpoint: zero-shot and retrieval"),
}


def train(args, data, out, flags, torchrun=0):
    """train.py (under torchrun with that many processes) -> (exit code, seconds, its stderr's last lines)."""
    command = [sys.executable, os.path.join(ROOT, "train.py"), "--config", "demo", "--data_dir", data,
               "--out_dir", out, "--max_steps", str(args.steps), "--batch_size", str(args.batch_size),
               "--log_interval", "1", "--eval_interval", str(args.steps), "--checkpoint_interval", str(args.steps),
               "--device", args.device, *flags]
    env = dict(os.environ)
    if torchrun:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
                   *command[1:]]
        if args.device == "cpu":
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // torchrun))
    t = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return done.returncode, time.perf_counter() - t, "\n".join(done.stderr.strip().splitlines()[-5:])


def losses(out):
    return [r["loss"] for r in read_log(os.path.join(out, "log.jsonl")) if r["kind"] == "train"]


def learned(out, by=0.02):
    """(ok, its words): every logged loss finite, and the last three's mean below the first by the share `by`
    (None: finite is enough)."""
    seen = losses(out)
    if not seen:
        return False, "no training step logged"
    if not all(x is not None and math.isfinite(x) for x in seen):
        return False, f"non-finite loss in {seen}"
    tail = seen[-3:]
    fell = by is None or sum(tail) / len(tail) < (1 - by) * seen[0]
    return fell, f"loss {seen[0]:.3f} -> {seen[-1]:.3f}" + ("" if fell else ": did not fall")


def weights(out, step):
    return load_checkpoint(os.path.join(out, f"ckpt-{step:08d}.pt"))["model"]


def evaluate(args, data, work, default_out):
    """evaluate.py on default's checkpoint, on the device. Elsewhere than on a CPU, in fp32 there, against the same
    evaluation on the CPU: the figures of one model must agree (the device's own precision is what every training
    run above evaluated in, at its last step; bf16 would move some images of a barely trained model across a
    decision)."""
    found, seconds = {}, 0.0
    for device in dict.fromkeys([args.device, "cpu"]):
        results = os.path.join(work, f"evaluate-{device}.json")
        t = time.perf_counter()
        done = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), default_out, "--zeroshot", data,
                               "--retrieval", os.path.join(data, "val"), "--device", device, "--precision", "fp32",
                               "--json", results], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        seconds += time.perf_counter() - t
        if done.returncode:
            return False, seconds, f"on {device}: " + done.stderr.strip()[-500:]
        with open(results) as f:
            found[device] = json.load(f)
    keys = ("top1", "image_to_text_R@10", "text_to_image_R@10")
    mine = found[args.device]
    if any(k not in mine for k in keys):
        return False, seconds, f"figures missing from {sorted(mine)}"
    gap = max(abs(mine[k] - found["cpu"][k]) for k in keys)
    words = (f"zero-shot top-1 {mine['top1']:.1%} (shape {mine['zeroshot']['shape']['top1']:.1%}, colour "
             f"{mine['zeroshot']['color']['top1']:.1%}), image->text R@10 {mine['image_to_text_R@10']:.1%}")
    if args.device != "cpu":
        words += f"; {gap:.1%} at most from the CPU's figures"
    return gap <= 0.03, seconds, words


def run_path(name, args, data, work, default_out):
    """-> (ok, seconds, what it found)."""
    flags = [f.format(quarter=args.batch_size // 4) for f in PATHS[name][0]]
    if name not in ("default", "eager") and "--compile" not in flags:
        flags += ["--compile", args.compile]
    out = os.path.join(work, name)
    for folder in (out, out + "-resumed"):  # a kept folder's runs from before: train.py would not start over them
        shutil.rmtree(folder, ignore_errors=True)
    if name == "evaluate":
        return evaluate(args, data, work, default_out)
    if name == "lit":
        flags += ["--init_from", os.path.join(default_out, f"ckpt-{args.steps:08d}.pt")]
    if name == "resume":  # the run stopped halfway: its checkpoint there, then a new process from it
        half = args.steps // 2
        code, seconds, said = train(args, data, out, flags + ["--checkpoint_interval", str(half)])
        if code:
            return False, seconds, said
        resume = ["--resume", os.path.join(out, f"ckpt-{half:08d}.pt")]
        code, more, said = train(args, data, out + "-resumed", flags + resume)
        seconds += more
        if code:
            return False, seconds, said
        a, b, mid = weights(out, args.steps), weights(out + "-resumed", args.steps), weights(out, half)
        exact = all(torch.equal(a[k], b[k]) for k in a)
        # bit for bit on a CPU, uncompiled. A GPU's kernels (atomic adds in some backward kernels), and compiled ones
        # on a CPU too, differ in the last bits from run to run, so there the two ends are compared with how far the
        # weights moved over the resumed half: a resume that took other batches (its loader's position lost) ends
        # 13% of that apart on a CPU; such noise, a small fraction
        norm = lambda pairs: math.sqrt(sum((x.float() - y.float()).pow(2).sum().item() for x, y in pairs))
        apart = norm((a[k], b[k]) for k in a) / max(norm((a[k], mid[k]) for k in a), 1e-12)
        la, lb = losses(out)[-1], losses(out + "-resumed")[-1]
        close = exact or ((args.device != "cpu" or args.compile == "true") and apart < 0.02)
        ends = "equal bit for bit" if exact else f"apart by {apart:.2g} of the weights' change over the resumed half"
        return close, seconds, f"final weights {ends}; last loss {la:.5f} uninterrupted, {lb:.5f} resumed"
    processes = 0
    if name == "ddp":
        processes = torch.cuda.device_count() if args.device == "cuda" else 2
    code, seconds, said = train(args, data, out, flags, torchrun=processes)
    if code:
        return False, seconds, said
    # lit goes on from a trained model, whose loss moves little in a few steps: what it promises is checked below
    ok, words = learned(out, by=None if name == "lit" else 0.02)
    if name == "ddp":
        words = f"{processes} processes, {words}"
    if name == "lit":  # the locked tower as --init_from gave it, the other one trained
        start, end = weights(default_out, args.steps), weights(out, args.steps)
        kept = all(torch.equal(start[k], end[k]) for k in start if k.startswith("visual."))
        moved = any(not torch.equal(start[k], end[k]) for k in start if k.startswith("text."))
        ok = ok and kept and moved
        words += f"; image tower {'unchanged' if kept else 'CHANGED'}, text tower {'trained' if moved else 'unchanged'}"
    return ok, seconds, words


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="paths:\n" + "\n".join(f"  {name:<19} {what}" for name, (_, what) in PATHS.items()))
    p.add_argument("--paths", default=",".join(PATHS), help="comma-separated names of the paths below (default: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=30, help="training steps of each run (even: resume stops halfway)")
    p.add_argument("--batch_size", type=int, default=128, help="global batch; a multiple of 4 and of the GPUs")
    p.add_argument("--compile", default="false", choices=["auto", "true", "false"],
                   help="for every path but default (train.py's choice) and eager")
    p.add_argument("--keep", default=None, help="a folder to keep the data and runs in (default: removed at the end)")
    args = p.parse_args()
    paths = [name.strip() for name in args.paths.split(",") if name.strip()]
    unknown = [name for name in paths if name not in PATHS]
    if unknown:
        p.error(f"unknown path(s) {', '.join(unknown)}: choose from {', '.join(PATHS)}")
    try:
        torch.empty(0, device=args.device)  # a device torch cannot use fails here, with torch's reason
    except (RuntimeError, AssertionError) as e:
        p.error(f"--device {args.device}: {e}")
    if args.steps < 4 or args.steps % 2 or args.batch_size % 4:
        p.error("--steps must be even and at least 4, --batch_size a multiple of 4")
    if args.device == "cpu" and "fp16" in paths and args.paths == p.get_default("paths"):
        paths.remove("fp16")
        print("fp16 left out: most CPUs emulate fp16 matmuls, so it takes minutes here (--paths fp16 runs it)")
    if {"lit", "evaluate"} & set(paths):
        paths.append("default")  # they start from its checkpoint
    paths = [name for name in PATHS if name in paths]  # in PATHS' order: default first
    work = args.keep or tempfile.mkdtemp(prefix="train-paths-")
    os.makedirs(work, exist_ok=True)
    data = os.path.join(work, "shapes")
    if not os.path.isdir(data):
        prep_dataset.main(["--source", "shapes", "--out_dir", data, "--limit", str(max(2000, 8 * args.batch_size)),
                           "--image_size", "64"])
    device = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"train.py's paths on {device}, torch {torch.__version__}: {args.steps} steps of the demo's tiny model, "
          f"batch {args.batch_size}")
    failed = []
    for name in paths:
        if name in ("lit", "evaluate") and "default" in failed:
            ok, seconds, words = False, 0.0, "not run: it starts from default's checkpoint"
        else:
            try:
                ok, seconds, words = run_path(name, args, data, work, os.path.join(work, "default"))
            except Exception as e:  # a run that ended well but left no log or checkpoint: said, and the others go on
                ok, seconds, words = False, 0.0, f"{type(e).__name__}: {e}"
        words = words.replace("\n", "\n" + " " * 37)  # a failed run's last lines, under the first
        print(f"{name:<19} {'ok' if ok else 'FAILED':<6} {seconds:6.1f} s  {words}", flush=True)
        if not ok:
            failed.append(name)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    if failed:
        sys.exit(f"failed: {', '.join(failed)} (rerun one with --paths NAME --keep DIR to look into its run)")
    print("every path ran")


if __name__ == "__main__":
    main()
