"""
Where a training step's time goes, and whether the fast paths compute the same thing.

1. Correctness: the loss and every gradient of the compiled model, and of bf16 autocast (eager and
   compiled), against the eager fp32 model (TF32 off), as ||g - g_ref|| / ||g_ref|| over all parameters
   and for the worst single tensor. fp32 compiled lands near 1e-5; bf16 near 1e-2.
2. Attention at the model's own shapes: on a GPU each SDPA backend (cuDNN, flash, memory-efficient), forward
   and forward+backward; on a CPU, in bf16, SDPA's flash kernel against clip.attention's plain path.
3. On a GPU: the loader's side-stream prefetch delivers every batch whole while the GPU is busy
   (and a copy without its synchronisation, run the same way, does not).
4. A profile of the training step (compiled, in the run's precision): device time per step by kind
   (matmul, attention, fused elementwise kernels, optimizer and clipping, other), and the largest kernels.

    python benchmarks/profile_step.py                                   # base, batch 256, on a GPU
    python benchmarks/profile_step.py --model tiny --batch_size 32 --compile false   # a quick CPU look
    python benchmarks/profile_step.py --model tiny --batch_size 128 --parts sdpa     # CPU attention, bf16

On a CPU the profile lists operators (there are no kernels); MFU and peak live in bench.py.
"""
import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import matmul_peak, ours, prepare, sync, time_steps  # noqa: E402  the same model, optimizer, batch and step as bench.py
from clip import CLIP, attention, clip_loss, flops_per_sample, get_config  # noqa: E402
from dataloader import prefetch  # noqa: E402
from train import DTYPES, keep_freed_memory, parse_bool, precision_context  # noqa: E402

EOT = 100257  # cl100k_base's <|endoftext|>


def varied_batch(cfg, B, device):
    """Random images, and captions whose end-of-text falls anywhere in the second half of the context."""
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (B, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8, generator=g)
    tokens = torch.randint(0, 50_000, (B, cfg.context_length), generator=g)
    ends = torch.randint(cfg.context_length // 2, cfg.context_length, (B,), generator=g)
    tokens[torch.arange(B), ends] = EOT
    return images.to(device), tokens.to(device)


def gradients(model, fn, images, tokens, bf16, device):
    model.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = clip_loss(*fn(images, tokens))
    loss.backward()
    return loss.item(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters()}


def check_correctness(cfg, device, compiled, B):
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference is plain fp32
    torch.manual_seed(0)
    model = CLIP(cfg).to(device)
    images, tokens = varied_batch(cfg, B, device)
    ref_loss, ref = gradients(model, model, images, tokens, False, device)
    flat = lambda g: torch.cat([g[n].flatten() for n in ref])
    variants = [("eager bf16", model, True)]
    if compiled:
        cmodel = torch.compile(model)
        variants = [("compiled fp32", cmodel, False)] + variants + [("compiled bf16", cmodel, True)]
    print(f"correctness, batch {B}: against eager fp32 (loss {ref_loss:.6f})")
    for name, fn, bf16 in variants:
        loss, g = gradients(model, fn, images, tokens, bf16, device)
        worst = max(rel(g[n], ref[n]) for n in ref)
        print(f"  {name:14s} loss {loss:.6f} | gradients' relative error: all {rel(flat(g), flat(ref)):.2e}, "
              f"worst tensor {worst:.2e}")
    torch.backends.cuda.matmul.allow_tf32 = tf32


def unsynchronised(batches, device):
    """prefetch without its event wait and record_stream: what the check below must catch."""
    stream = torch.cuda.Stream(device)
    for images, tokens, *rest in batches:
        with torch.cuda.stream(stream):
            yield (images.to(device, non_blocking=True), tokens.to(device, non_blocking=True), *rest)


def check_prefetch(cfg, B, device, n=24):
    """The loader's side-stream copy (dataloader.prefetch) must hand over every batch whole. Two ways to
    get it wrong, each provoked with no host sync in the loop, each batch summed on the compute stream:
    - reuse: the compute stream lags behind matmuls queued ahead of each batch's sum, so a copy that took
      the memory of a batch still to be summed shows as a wrong sum;
    - early read: the first batch of a fresh iterator, handed to an idle compute stream while its copy
      may still run. Batches of 4x the step's images, so the copy is slow.
    The same loops run through a copy without the synchronisation, which must fail (else the check proves
    nothing)."""
    g = torch.Generator().manual_seed(2)
    batch = lambda rows: (torch.randint(0, 256, (rows, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8,
                                        generator=g).pin_memory(),
                          torch.randint(0, 100_000, (rows, cfg.context_length), dtype=torch.int32, generator=g).pin_memory())
    host, big = [batch(B) for _ in range(n)], [batch(4 * B) for _ in range(4)]
    expected = lambda batches: torch.tensor([[i.long().sum().item(), t.long().sum().item()] for i, t in batches])
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16) / 64
    summed = lambda images, tokens: torch.stack([images.long().sum(), tokens.long().sum()])
    print(f"prefetch: batches that arrived with a wrong sum (reuse: {n} batches of {B} behind busy work; "
          f"early read: the first batch of {len(big)} fresh iterators, {4 * B} rows each)")
    for name, copy in (("dataloader.prefetch", prefetch), ("unsynchronised copy", unsynchronised)):
        sums = []
        for images, tokens in copy(iter(host), device):
            for _ in range(8):
                a = a @ a
                a = a / a.norm()  # busy work on the compute stream, queued ahead of the batch's use
            sums.append(summed(images, tokens))
        reuse = (torch.stack(sums).cpu() != expected(host)).any(dim=1).sum().item()
        firsts = []
        for k in range(len(big)):
            torch.cuda.synchronize(device)  # an idle compute stream reads a batch as soon as it is handed over
            firsts.append(summed(*next(copy(iter(big[k:]), device))))
        early = (torch.stack(firsts).cpu() != expected(big)).any(dim=1).sum().item()
        print(f"  {name:20s} reuse {reuse} of {n}, early read {early} of {len(big)}")


def timed_ms(fn, device, reps=20):
    for _ in range(3):
        fn()
    return time_steps(fn, reps, device) / reps * 1e3


def attention_shapes(cfg):
    """Each tower's attention: heads, positions, width, causal."""
    return {"vision": (cfg.vision_heads, (cfg.image_size // cfg.patch_size) ** 2 + 1, cfg.vision_width, False),
            "text": (cfg.text_heads, cfg.context_length, cfg.text_width, True)}


def sdpa_backends(cfg, B, device):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    print(f"SDPA at the model's shapes, batch {B}, bf16: forward / forward+backward, ms")
    for tower, (heads, T, width, causal) in attention_shapes(cfg).items():
        q, k, v = [torch.randn(B, heads, T, width // heads, device=device, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3)]
        grad = torch.randn_like(q)
        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            def forward():
                with sdpa_kernel(backend), torch.no_grad():
                    F.scaled_dot_product_attention(q, k, v, is_causal=causal)

            def both():
                with sdpa_kernel(backend):
                    F.scaled_dot_product_attention(q, k, v, is_causal=causal).backward(grad)
            try:
                print(f"  {tower:6s} {backend.name:20s} {timed_ms(forward, device):7.3f} / {timed_ms(both, device):7.3f}")
            except RuntimeError as e:  # a backend that does not take these shapes on this GPU
                print(f"  {tower:6s} {backend.name:20s} not available: {str(e).splitlines()[0][:80]}")


def cpu_attention(cfg, B):
    """On a CPU in bf16: SDPA's flash kernel against clip.attention, which takes matmul-softmax-matmul up to
    128 keys, at the model's attention shapes; and the flash kernel's backward per (sample, head), in fp32
    and in bf16, at a few lengths."""
    print(f"attention at the model's shapes, batch {B}, bf16 on the CPU: forward+backward, ms")
    for tower, (heads, T, width, causal) in attention_shapes(cfg).items():
        q, k, v = [torch.randn(B, heads, T, width // heads, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
        grad = torch.randn_like(q)
        fused = timed_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal).backward(grad), torch.device("cpu"))
        ours = timed_ms(lambda: attention(q, k, v, causal=causal).backward(grad), torch.device("cpu"))
        path = "matmul-softmax-matmul" if T <= 128 else "the fused kernel too"
        print(f"  {tower:6s} {T:4d} positions: SDPA {fused:8.3f} | clip.attention ({path}) {ours:8.3f} | {fused / ours:.2f}x")
    for T in (16, 32, 64, 128):
        costs = []
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v = [torch.randn(B, 4, T, 32, dtype=dtype, requires_grad=True) for _ in range(3)]
            grad = torch.randn_like(q)
            forward = timed_ms(lambda: F.scaled_dot_product_attention(q, k, v).detach(), torch.device("cpu"))
            both = timed_ms(lambda: F.scaled_dot_product_attention(q, k, v).backward(grad), torch.device("cpu"))
            costs.append((both - forward) / (B * 4) * 1e3)
        print(f"  SDPA's backward at {T:3d} positions, head size 32: {costs[0]:6.1f} us per (sample, head) in fp32, "
              f"{costs[1]:6.1f} in bf16")


# by kernel (GPU) or operator (CPU) name; attention first, since cuDNN's attention kernels are named like matmuls
KINDS = [("attention", ("flash", "fmha", "sdpa", "attention", "cudnn::fusion")),
         ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "splitk", "aten::mm", "aten::addmm", "aten::bmm", "mkldnn")),
         ("optimizer, clipping", ("adam", "multi_tensor", "foreach")),
         ("fused elementwise", ("triton", "cpp_fused"))]


def kind_of(name):
    name = name.lower()
    return next((kind for kind, keys in KINDS if any(k in name for k in keys)), "other")


def profile_step(cfg, B, device, compiled, precision, autocast, top):
    # bench.py's step: its model and fused AdamW, random images and full-context captions, warm-up included
    if compiled and device.type == "cpu":
        # Inductor's C++ kernels then show in the profile by name, not as one block per compiled graph
        from torch._inductor import config as inductor_config
        inductor_config.cpp.enable_kernel_profile = True
    args = argparse.Namespace(batch_size=B, compiled=compiled, compile_mode=None, warmup=3)
    run = prepare("ours", ours, cfg, args, device, autocast, fp16=precision == "fp16")
    step = run["step"]
    print(f"first step (compiling, if compiled) {run['first_step_s']:.1f} s")
    step_ms = time_steps(step, 20, device) / 20 * 1e3
    n = 3
    with profile(activities=[ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU],
                 record_shapes=device.type == "cpu") as prof:
        for _ in range(n):
            step()
        sync(device)
    if device.type == "cuda":  # kernels only: each op's time is the time of the kernels it launched
        events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        ms = lambda e: e.self_device_time_total / n / 1e3
    else:  # operators' own CPU time
        events = list(prof.key_averages())
        ms = lambda e: e.self_cpu_time_total / n / 1e3
    total = sum(ms(e) for e in events)
    kinds = {}
    for e in events:
        kinds[kind_of(e.key)] = kinds.get(kind_of(e.key), 0.0) + ms(e)
    flops = flops_per_sample(cfg) * B
    print(f"step {step_ms:.2f} ms ({B / step_ms * 1e3:.0f} samples/s, {flops / step_ms / 1e9:.1f} TFLOP/s); "
          f"{'device' if device.type == 'cuda' else 'operator'} time {total:.2f} ms a step")
    for kind, t in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:18s} {t:8.2f} ms  {t / total:6.1%}")
    print(f"the {top} largest, ms a step, calls a step:")
    for e in sorted(events, key=ms, reverse=True)[:top]:
        print(f"  {ms(e):8.3f} {e.count // n:5d}x  {kind_of(e.key):18s} {e.key[:100]}")
    if device.type == "cpu":
        matmul_rates(prof, n, device, precision, top)


def matmul_rates(prof, n, device, precision, top):
    """On a CPU: each matmul shape's rate against this machine's 2048^3 rate (or a smaller size's, as
    bench.matmul_peak chooses), measured now: how near its peak the step's matmuls run, and so the MFU the
    step could reach if nothing else took time."""
    peak, size = matmul_peak(device, DTYPES[precision])
    rows = []
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key not in ("aten::mm", "aten::addmm", "aten::bmm"):
            continue
        a, b = e.input_shapes[1:3] if e.key == "aten::addmm" else e.input_shapes[:2]  # addmm: bias first
        flop = 2 * math.prod(a) * b[-1] * e.count / n  # (..., m, k) @ (..., k, n)
        rows.append((e.cpu_time_total / n / 1e3, flop, e.count // n, f"{e.key} {a} @ {b}"))
    ms, flop = sum(r[0] for r in rows), sum(r[1] for r in rows)
    print(f"matmuls: {ms:.1f} ms a step at {flop / ms / 1e6:.1f} GFLOP/s, {flop / ms * 1e3 / peak:.1%} of the "
          f"{size}^3 rate measured now ({peak / 1e9:.0f} GFLOP/s); the {top} largest shapes:")
    for t, f, calls, name in sorted(rows, reverse=True)[:top]:
        print(f"  {t:8.3f} ms {calls:4d}x  {f / t / 1e6:7.1f} GFLOP/s  {f / t * 1e3 / peak:6.1%}  {name}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="base")
    p.add_argument("--batch_size", type=int, default=256, help="the profiled step's batch")
    p.add_argument("--check_batch_size", type=int, default=64, help="the correctness check's batch")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="the profiled step's, as train.py --precision takes it")
    p.add_argument("--compile", type=parse_bool, default=True)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--parts", default="correctness,sdpa,prefetch,profile",
                   help="which parts to run, a comma list (prefetch needs a GPU)")
    args = p.parse_args()
    parts = args.parts.split(",")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        precision, autocast = precision_context(args.precision, device)
    except ValueError as e:
        p.error(str(e))
    cfg = get_config(args.model)
    print(f"{cfg}\n{args.model} on {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, "
          f"torch {torch.__version__}")
    if "correctness" in parts:
        check_correctness(cfg, device, args.compile, args.check_batch_size)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as train.py sets it
        if "sdpa" in parts:
            sdpa_backends(cfg, args.batch_size, device)
        if "prefetch" in parts:
            check_prefetch(cfg, args.batch_size, device)
    else:
        keep_freed_memory()  # as train.py does on a CPU: else freeing and refaulting big gradients shows up
        if "sdpa" in parts:
            cpu_attention(cfg, args.batch_size)
    if "profile" in parts:
        profile_step(cfg, args.batch_size, device, args.compile, precision, autocast, args.top)


if __name__ == "__main__":
    main()
