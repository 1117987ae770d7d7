"""
What the 100k-row token table costs a CPU training step, part by part: its gradient (a fresh dense
(vocab, width) tensor every backward), with glibc's default allocator and with train.py's
keep_freed_memory(), and, beside them, a sparse gradient added into a dense one kept across steps; and its
AdamW update, fused (what train.py uses) against foreach and the
per-tensor loop. Medians of interleaved repeats; the allocator settings run in separate processes
(they are process-wide) that take turns.

    python benchmarks/bench_embedding.py                 # tiny's table: cl100k_base x 128
    python benchmarks/bench_embedding.py --width 512     # base's text width
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from clip import padded_vocab_size  # noqa: E402
from train import keep_freed_memory  # noqa: E402


def timed(fn, reps):
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e3


def gradient_ms(vocab, width, tokens, reps, sparse=False):
    """Backward of the lookup alone: the (vocab, width) gradient is allocated, zeroed and scattered into.
    sparse: the lookup's gradient comes as the batch's rows alone (nn.Embedding(sparse=True)), added into one
    dense gradient that is kept from step to step, where only the rows the batch touched are zeroed after it,
    as an optimizer that takes dense gradients (fused AdamW) would need it: no (vocab, width) tensor to fill."""
    table = torch.nn.Embedding(vocab, width, sparse=sparse)
    ids = torch.randint(0, 50_000, (tokens,))
    out_grad = torch.randn(tokens, width)
    if sparse:
        table.weight.grad = torch.zeros_like(table.weight)

    def step():
        table(ids).backward(out_grad)
        if sparse:
            table.weight.grad[ids.unique()] = 0
        else:
            table.weight.grad = None  # as zero_grad(set_to_none=True): the next backward allocates afresh
    return timed(step, reps)


def adamw_ms(vocab, width, reps, **impl):
    p = torch.nn.Parameter(torch.randn(vocab, width) * 0.02)
    p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW([p], lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1, **impl)
    return timed(opt.step, reps)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoding", default="cl100k_base")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=128 * 32, help="token positions per batch (tiny: 128 x 32)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--gradient_only", choices=["default", "kept", "kept-sparse"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    vocab = padded_vocab_size(args.encoding)
    if args.gradient_only:  # one child process: one allocator setting
        if args.gradient_only.startswith("kept") and not keep_freed_memory():
            sys.exit("keep_freed_memory() had no effect here (not glibc)")
        print(gradient_ms(vocab, args.width, args.tokens, args.reps, sparse=args.gradient_only == "kept-sparse"))
        return
    print(f"token table {vocab} x {args.width} ({vocab * args.width * 4 / 1e6:.0f} MB), {args.tokens} tokens a batch, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    # the sparse way's gradient, added into a kept one over two steps (its touched rows zeroed between), equals
    # the dense gradient of the second step
    dense, sparse = torch.nn.Embedding(vocab, args.width), torch.nn.Embedding(vocab, args.width, sparse=True)
    sparse.weight.grad = torch.zeros_like(sparse.weight)
    for _ in range(2):
        ids, out_grad = torch.randint(0, 50_000, (args.tokens,)), torch.randn(args.tokens, args.width)
        sparse.weight.grad[sparse.weight.grad.abs().sum(dim=1) > 0] = 0
        dense.weight.grad = None
        dense(ids).backward(out_grad)
        sparse(ids).backward(out_grad)
    assert not sparse.weight.grad.is_sparse and torch.allclose(sparse.weight.grad, dense.weight.grad, atol=1e-5)
    results = {k: [] for k in ("gradient, default allocator", "gradient, freed memory kept",
                               "gradient, sparse into kept", "AdamW fused", "AdamW foreach", "AdamW per-tensor loop")}
    child = [sys.executable, os.path.abspath(__file__), "--encoding", args.encoding, "--width", str(args.width),
             "--tokens", str(args.tokens), "--reps", str(args.reps), "--gradient_only"]
    for _ in range(args.rounds):
        for key, mode in (("gradient, default allocator", "default"), ("gradient, freed memory kept", "kept"),
                          ("gradient, sparse into kept", "kept-sparse")):
            out = subprocess.run(child + [mode], capture_output=True, text=True, check=True)
            results[key].append(float(out.stdout))
        results["AdamW fused"].append(adamw_ms(vocab, args.width, args.reps, fused=True))
        results["AdamW foreach"].append(adamw_ms(vocab, args.width, args.reps, foreach=True))
        results["AdamW per-tensor loop"].append(adamw_ms(vocab, args.width, args.reps, foreach=False))
    for key, values in results.items():
        print(f"{key:<30} {statistics.median(values):7.2f} ms a step (median of {len(values)} rounds)")


if __name__ == "__main__":
    main()
