"""
LiT (--lock_image / --lock_text) with micro-batches: the training step that leaves the locked tower out of
feature caching's second pass (train.forward_backward with the towers that learn), against the same step
running it there too, as a plain re-run of every micro-batch would. Both sides take turns, round after
round, and each reports its median round; their gradients are checked equal before timing.

    python benchmarks/bench_lit.py --model ViT-B/32 --batch_size 32 --micro_batch_size 8
    python benchmarks/bench_lit.py --model tiny --batch_size 256 --micro_batch_size 64 --lock text
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from clip import CLIP, get_config  # noqa: E402
from train import clipped_step, forward_backward, keep_freed_memory, param_groups, precision_context  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--micro_batch_size", type=int, default=32)
    p.add_argument("--lock", default="image", choices=["image", "text"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--steps", type=int, default=3, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    if not 0 < args.micro_batch_size < args.batch_size:
        p.error("--micro_batch_size must be smaller than --batch_size: without micro-batches there is no second pass")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        keep_freed_memory()  # as train.py does on a CPU
    precision, autocast = precision_context(args.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    cfg = get_config(args.model)
    trained = ("text",) if args.lock == "image" else ("vision",)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch_size, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8,
                           generator=g).to(device)
    tokens = torch.randint(0, 50_000, (args.batch_size, cfg.context_length), generator=g).to(device)
    tokens[:, -1] = 100257  # every caption runs the full context

    sides = {}
    for name, towers in (("locked tower left out", trained), ("locked tower run again", ("vision", "text"))):
        torch.manual_seed(0)
        model = CLIP(cfg).to(device)
        (model.visual if args.lock == "image" else model.text).requires_grad_(False)
        opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, fused=True)

        def step(model=model, opt=opt, towers=towers):
            loss = forward_backward(model, images, tokens, args.micro_batch_size, autocast, scaler, trained=towers)
            clipped_step(opt, model.parameters(), 1.0, loss, scaler)
            opt.zero_grad(set_to_none=True)

        forward_backward(model, images, tokens, args.micro_batch_size, autocast, scaler, trained=towers)
        sides[name] = {"step": step, "model": model, "rates": []}
    # the same model, the same batch: the same gradients either way (the warm-up step above left them)
    a, b = (dict(s["model"].named_parameters()) for s in sides.values())
    assert all(torch.equal(a[n].grad, b[n].grad) for n in a if a[n].grad is not None), "the two sides' gradients differ"
    for side in sides.values():
        side["model"].zero_grad(set_to_none=True)
    for _ in range(args.rounds):
        for side in sides.values():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(args.steps):
                side["step"]()
            if device.type == "cuda":
                torch.cuda.synchronize()
            side["rates"].append(args.steps * args.batch_size / (time.perf_counter() - t))
    print(f"{args.model}, batch {args.batch_size} in micro-batches of {args.micro_batch_size}, {args.lock} tower "
          f"locked, {precision}, {device.type}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    rates = {name: statistics.median(side["rates"]) for name, side in sides.items()}
    for name, rate in rates.items():
        print(f"{name:<24} {rate:9.2f} samples/s")
    print(f"ratio: {rates['locked tower left out'] / rates['locked tower run again']:.2f}x")


if __name__ == "__main__":
    main()
