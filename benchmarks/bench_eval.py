"""
Evaluation during a DDP run: every rank embedding its part of the images (train.py's way), against rank 0
evaluating alone while the other ranks wait. The two take turns, round after round, after a first call of
each whose figures are checked equal. Run it under torchrun, as training runs:

    torchrun --standalone --nproc_per_node=2 benchmarks/bench_eval.py --data_dir data/shapes
    torchrun --standalone --nproc_per_node=8 benchmarks/bench_eval.py --data_dir data/mine --model base \\
        --zeroshot imagenet/val --classnames LOC_synset_mapping.txt

The model is freshly initialised: the work, not the accuracy, is what is timed. Retrieval and the data's own
zero-shot tasks run on the val split of --data_dir (up to 5,000 samples, as in training), plus any --zeroshot
sets.
"""
import argparse
import json
import os
import statistics
import sys
import time
from contextlib import nullcontext
from unittest import mock

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluate  # noqa: E402
from clip import CLIP, get_config  # noqa: E402
from dataloader import default_num_workers  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="a prepared set with a val split")
    p.add_argument("--model", default="tiny")
    p.add_argument("--zeroshot", default="auto", help="as train.py's: auto (the data's own tasks), or datasets")
    p.add_argument("--classnames", default=None, help="as train.py's --zeroshot_classnames")
    p.add_argument("--batch_size", type=int, default=256, help="images per rank per forward pass")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if "RANK" not in os.environ:
        p.error("run it under torchrun: torchrun --standalone --nproc_per_node=2 benchmarks/bench_eval.py ...")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = get_config(args.model)
    torch.manual_seed(0)
    model = CLIP(cfg).to(device).eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    with open(os.path.join(args.data_dir, "manifest.json")) as f:
        tasks = json.load(f).get("tasks", {})
    # one evaluator for each way: each keeps the val loader of its first call (the ranks' shares, or all of it)
    shared_evaluator, alone_evaluator = (
        evaluate.TrainingEvaluator(args.zeroshot, True, args.data_dir, tasks, cfg, device, autocast,
                                   num_workers=default_num_workers(world, cpu_step=not cuda),
                                   classnames_file=args.classnames, batch_size=args.batch_size) for _ in range(2))

    def shared():
        return shared_evaluator(model)

    def alone():
        out = None
        if rank == 0:
            with mock.patch.object(evaluate.dist, "is_initialized", return_value=False):  # as if one process
                out = alone_evaluator(model)
        dist.barrier()
        return out

    sides = {"every rank its part": shared, "rank 0 alone": alone}
    first = {name: fn() for name, fn in sides.items()}  # also the warm-up: loader start, first allocations
    if rank == 0:
        a, b = first.values()
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-5 for k in a), "the two ways' figures differ"
    seconds = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, fn in sides.items():
            dist.barrier()
            t = time.perf_counter()
            fn()
            dist.barrier()
            seconds[name].append(time.perf_counter() - t)
    if rank == 0:
        print(f"{args.model}, {world} ranks, {device.type}, {torch.get_num_threads()} threads per rank, "
              f"torch {torch.__version__}; figures: {', '.join(first['rank 0 alone'])}")
        median = {name: statistics.median(s) for name, s in seconds.items()}
        for name, s in median.items():
            print(f"{name:<22} {s:8.3f} s per evaluation")
        print(f"ratio: {median['rank 0 alone'] / median['every rank its part']:.2f}x")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
