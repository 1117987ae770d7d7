"""
Trains CLIP. One script for every scale:

    python train.py --config demo                                   # tiny model on the synthetic shapes set, CPU
    python train.py --data_dir data/text-to-image-2M                # one GPU (or CPU), the base model
    python train.py --model tiny --data_dir data/mine --epochs 10   # ten passes over your data
    torchrun --standalone --nproc_per_node=8 train.py               # a node of 8 GPUs
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST \\
             --master_port=29500 train.py                           # two nodes (run on each, node_rank 0 and 1)

    python train.py --config demo --resume                          # continue from the newest checkpoint
    python train.py --resume runs/demo/ckpt-00000300.pt             # with the settings that run had
    python train.py --resume runs/demo/ckpt-00000600.pt --max_steps 1000   # ... but for longer
    python train.py --init_from runs/demo/best.pt --data_dir ...    # fine-tune: weights only, fresh optimizer

Every field of TrainConfig is a flag of the same name (--batch_size 512, --compile true), and so is every
field of clip.CLIPConfig (--image_size 128), over the --model preset; --config NAME picks a named set of
overrides first. Unknown flags are an error.
"""
import ctypes
import inspect
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import timedelta
from itertools import repeat

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint_manager import CheckpointError, CheckpointManager, load_run
from clip import (CLIP, PRESETS, CLIPConfig, clip_loss, flops_per_sample, get_config, get_encoding,
                  resize_position_embeddings)
from dataloader import ShardLoader, data_dirs, default_num_workers, expand_home, shard_paths
from logger import Logger
from prep_dataset import lock_dir, not_a_missing_folder, read_json_object, unlock_dir, writable_folder


@dataclass
class TrainConfig:
    # model
    model: str = "base"  # a preset of clip.py: tiny, base, ViT-B/32, ViT-B/16, ViT-L/14
    loss: str = "clip"  # clip (softmax InfoNCE) or siglip (sigmoid)
    # any field of clip.CLIPConfig given as a flag overrides the preset's: --image_size 128 --context_length 64
    model_args: dict = field(default_factory=dict)
    # data
    data_dir: str = "data/text-to-image-2M"  # a prepared set, or several read as one: data/coco,data/t2i
    make_shapes: int = 0  # where data_dir is missing or empty, generate this many samples of the shapes set there
    augment: bool = True  # random resized crop (crop_scale_min..1 of the area) for training images
    crop_scale_min: float = 0.8
    num_workers: int = -1  # data loader processes per rank; -1: the cores per rank less one (a 2-core CPU step: 0)
    # run
    out_dir: str = "runs/base"
    seed: int = 0
    # optimisation
    batch_size: int = 1024  # global: over all ranks and accumulation micro-batches
    micro_batch_size: int = 0  # samples per rank per forward pass; 0 = the whole per-rank batch
    max_steps: int = 10_000
    epochs: float = 0.0  # passes over the training data: max_steps becomes this many epochs' steps; 0 = off
    max_lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decay to max_lr * min_lr_ratio
    warmup_frac: float = 0.02  # linear warmup over this fraction of max_steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip: float = 1.0  # clip the gradient's global norm to this; 0 = no clipping
    # speed and numerics
    device: str = "auto"  # auto (cuda, else mps, else cpu), cuda, mps, cpu; this machine's, never the checkpoint's
    compile: str = "auto"  # auto (on for CUDA GPUs that Triton supports), true, false
    # auto: bf16 on GPUs with bf16 tensor cores, fp16 (loss-scaled) on older ones with fp16 tensor cores, else fp32;
    # bf16 (also 2-3x faster on CPUs with bf16 units), fp16, fp32
    precision: str = "auto"
    grad_checkpointing: bool = False
    patch_dropout: float = 0.0  # the share of each training image's patches left out (FLIP): faster steps; 0 = off
    # logging, evaluation, checkpoints
    log_interval: int = 10  # steps; for this and the other intervals, 0 = only at the last step
    eval_interval: int = 500
    eval_batches: int = 50  # val-loss batches per evaluation (0 = the whole val split)
    zeroshot: str = "auto"  # auto: the tasks in the data's manifest (shapes); none; or datasets, comma-separated
    zeroshot_classnames: str = ""  # names for --zeroshot folders named by id, as evaluate.py --classnames takes them
    zeroshot_labels: str = ""  # the classes of a --zeroshot folder of images in a table, as evaluate.py --labels
    retrieval: bool = True  # image<->text recall@k on the val split (up to 5,000 samples) at every evaluation
    checkpoint_interval: int = 1000
    keep_checkpoints: int = 3  # the newest K (0 = all), plus best.pt
    resume: str = ""  # "latest" (bare --resume): the newest in out_dir; or a checkpoint, or a run directory (its newest)
    init_from: str = ""  # a checkpoint (or a run directory: its best.pt) whose weights start a fresh run
    # a tower kept as --init_from gave it, its projection too (LiT locks the image tower); the other one learns
    lock_image: bool = False
    lock_text: bool = False
    max_bad_steps: int = 5  # non-finite steps in a row that stop the run


CONFIGS = {
    # the built-in demo: a few minutes on a laptop CPU, data generated on the fly
    "demo": dict(model="tiny", data_dir="data/shapes", make_shapes=20_000, out_dir="runs/demo", augment=False,
                 batch_size=128, max_steps=600, max_lr=1e-3, warmup_frac=0.05, weight_decay=0.05,
                 log_interval=20, eval_interval=200, eval_batches=0, checkpoint_interval=200),
}

# -----------------------------------------------------------------------------
# configuration from the command line


def parse_bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def parse_args(argv, resumed=None):
    """--config NAME first, then --field value / --field=value for any TrainConfig field. resumed: the
    settings of the run being resumed; they take precedence over the named config, the flags over them."""
    kinds = {f.name: f.type for f in fields(TrainConfig)}
    if "-h" in argv or "--help" in argv:
        # the settings as the dataclass declares them, defaults and comments included
        body = [line for line in inspect.getsource(TrainConfig).splitlines()[2:] if "model_args:" not in line]
        print(f"{__doc__.strip()}\n\nsettings (TrainConfig), with their defaults:\n" + "\n".join(body) +
              f"\n\nmodel settings (clip.CLIPConfig, over the --model preset): "
              f"{', '.join('--' + f.name for f in fields(CLIPConfig) if f.name not in kinds)}"
              f"\nnamed configs (--config): {', '.join(CONFIGS)}")
        sys.exit(0)
    pairs, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            sys.exit(f"unexpected argument {arg!r}: every setting is --name value (see TrainConfig in train.py)")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            bare = i + 1 == len(argv) or argv[i + 1].startswith("--")
            if bare and kinds.get(key) in (bool, "bool"):
                value = "true"
            elif bare and key == "resume":
                value = "latest"
            elif bare:
                sys.exit(f"--{key} needs a value")
            else:
                value, i = argv[i + 1], i + 1
        pairs.append((key, value))
        i += 1
    model_kinds = {f.name: f.type for f in fields(CLIPConfig) if f.name not in kinds}
    preset, overrides, model_args = {}, {}, {}
    for key, value in pairs:
        if key == "config":
            if value not in CONFIGS:
                sys.exit(f"unknown --config {value!r}; choose one of {list(CONFIGS)}")
            preset = CONFIGS[value]
            continue
        if (key not in kinds and key not in model_kinds) or key == "model_args":
            close = [k for k in [*kinds, *model_kinds] if key in k or k in key]
            sys.exit(f"unknown setting --{key}" + (f" (did you mean --{close[0]}?)" if close else ""))
        kind = kinds.get(key) or model_kinds[key]
        kind = {"bool": bool, "int": int, "float": float, "str": str}.get(kind, kind)
        # --out_dir=~/runs/x: the shell leaves that ~ to us (in each path of a list: --data_dir=~/a,~/b)
        if key in ("data_dir", "zeroshot"):
            value = expand_home(value)
        elif key in ("out_dir", "resume", "init_from", "zeroshot_classnames", "zeroshot_labels"):
            value = os.path.expanduser(value)
        try:
            (overrides if key in kinds else model_args)[key] = parse_bool(value) if kind is bool else kind(value)
        except ValueError as e:
            sys.exit(f"--{key}: {e}")
    resumed = {k: v for k, v in (resumed or {}).items() if k in kinds and k not in ("resume", "init_from", "device")}
    cfg = TrainConfig(**{**preset, **resumed, **overrides})
    cfg.model_args = {**cfg.model_args, **model_args}
    return cfg

# -----------------------------------------------------------------------------
# the schedule and the optimizer


def get_lr(step, cfg: TrainConfig):
    """Linear warmup to max_lr, then cosine decay to max_lr * min_lr_ratio at max_steps."""
    warmup = max(1, round(cfg.warmup_frac * cfg.max_steps))
    if cfg.warmup_frac > 0:
        # at least 10 steps (half the run at most): the demo's settings cut to 30 or 60 steps, so 2 or 3
        # warmup steps, collapse the embeddings at once and stay at chance loss; 10 steps learn (measured)
        warmup = max(warmup, min(10, cfg.max_steps // 2))
    if step < warmup:
        return cfg.max_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.max_steps - warmup))
    min_lr = cfg.max_lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.max_lr - min_lr)


def param_groups(model, weight_decay):
    """Weight decay on weight matrices only: not on biases, norms, position/class embeddings, temperature."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "pos_embedding" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def clipped_step(optimizer, params, grad_clip, loss, scaler=None):
    """The optimizer's step on gradients clipped to a global norm of grad_clip (0: not clipped), skipped when
    the loss or the gradient is not finite. Returns the gradient's norm before clipping, and 1.0 if the step
    went wrong (else 0.0), both on the device: with fused AdamW nothing waits for the host.
    With fp16's loss scaler the gradients arrive multiplied by its scale: they are divided back first, and a
    step whose gradient overflowed fp16 is skipped too but not counted as gone wrong; the scaler halves its
    scale instead (and doubles it again after 2000 steps without an overflow)."""
    scaling = scaler is not None and scaler.is_enabled()
    if scaling:
        scaler.unscale_(optimizer)
    params = [p for p in params if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    flags = torch.stack([~torch.isfinite(loss), ~torch.isfinite(grad_norm)]).float()  # (loss bad, gradient bad)
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # every rank skips together
    skip = flags.max()
    bad = flags[0] if scaling else skip
    if optimizer.defaults.get("fused"):
        # fused AdamW divides each gradient by grad_scale as it reads it: clipping without a pass of its own
        # over every gradient, which costs as much as the token table's update on a CPU; and found_inf skips
        # the step on the device
        optimizer.grad_scale = (grad_norm + 1e-6).div(grad_clip).clamp(min=1.0) if grad_clip > 0 else None
        optimizer.found_inf = skip
        optimizer.step()
    elif not skip.item():
        if grad_clip > 0:  # max_norm 0 would zero every gradient
            torch.nn.utils.clip_grads_with_norm_(params, grad_clip, grad_norm)
        optimizer.step()
    if scaling:
        scaler.update()  # from the overflow check of unscale_, the same on every rank (the gradients are)
    return grad_norm, bad

# -----------------------------------------------------------------------------
# one optimisation step's gradients


def mix64(z):
    """splitmix64's finaliser (Steele et al. 2014): consecutive integers in, independent-looking uint64s out."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def kept_patches(model_cfg, patch_dropout, seed, step, batch, rows=slice(None)):
    """Patch dropout (FLIP, Li et al. 2023): the patches that the images `rows` of the global batch keep at this
    step, (rows, K) indices, sorted; None when off. Each (image, patch) of the global batch gets a random key,
    a hash of the seed, the step and its place, and each image keeps its K lowest: every rank, every
    micro-batch's two passes and a resumed run see the same patches, however the rows are split among ranks,
    and a rank computes the keys of its own rows only (not the global batch's: 6.4M keys at a batch of 32k)."""
    n = (model_cfg.image_size // model_cfg.patch_size) ** 2
    k = max(1, round(n * (1 - patch_dropout)))
    if k >= n:
        return None
    start, stop, _ = rows.indices(batch)
    golden = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps around, as the hash means it to
        stream = mix64(mix64(np.uint64(seed % 2 ** 64) * golden) ^ np.uint64(step))
        place = np.arange(start * n, stop * n, dtype=np.uint64).reshape(-1, n)
        keys = mix64(stream + (place + np.uint64(1)) * golden)
    return torch.from_numpy(np.sort(np.argpartition(keys, k - 1, axis=1)[:, :k], axis=1))


def forward_backward(model, images, tokens, micro_batch_size, autocast, scaler=None, keep=None,
                     trained=("vision", "text")):
    """Accumulates into .grad the gradient of the loss over the whole (global) batch; returns the loss.
    With fp16's loss scaler, the gradient times its scale (small gradients would round to zero in fp16).

    With micro-batches, naive accumulation would shrink the contrastive negatives to one micro-batch.
    Instead (feature caching, as in GradCache): 1) embed every micro-batch without gradients; 2) compute
    the loss over the full batch on those cached embeddings, detached, and backpropagate it to them:
    that gives d loss / d embedding for every sample, and the exact gradient for the temperature;
    3) re-run each micro-batch with gradients and backpropagate those embedding gradients through the
    towers. The step's gradient equals the full batch's, logit_scale included, because the temperature
    receives its cached gradient exactly once (on the last micro-batch) instead of once per micro-batch.
    keep: the patches each image keeps (patch dropout), the same in both passes. trained: the towers that learn;
    a locked one (LiT) is left out of pass 3, as its weights take no gradient and pass 1 gave its embeddings."""
    is_ddp = isinstance(model, DDP)
    B = images.shape[0]
    m = micro_batch_size or B
    if m >= B:
        with autocast:
            loss = clip_loss(*model(images, tokens, keep))
        (loss if scaler is None else scaler.scale(loss)).backward()
        return loss.detach()
    chunks = list(zip(images.split(m), tokens.split(m), keep.split(m) if keep is not None else repeat(None)))
    with torch.no_grad(), autocast:  # 1) embeddings of the whole batch, no activations kept
        cached = [model(i, t, p) for i, t, p in chunks]
    leaf = lambda xs: torch.cat(xs).float().requires_grad_()
    img, txt = leaf([c[0] for c in cached]), leaf([c[1] for c in cached])
    scale = cached[0][2].detach().requires_grad_()
    bias = None if cached[0][3] is None else cached[0][3].detach().requires_grad_()
    loss = clip_loss(img, txt, scale, bias)  # 2) the full-batch loss, gathered over ranks inside
    (loss if scaler is None else scaler.scale(loss)).backward()  # scaled, so are the embeddings' gradients
    for k, (i, t, p) in enumerate(chunks):  # 3) each micro-batch again, with gradients
        last = k == len(chunks) - 1
        if is_ddp:
            model.require_backward_grad_sync = last  # before forward: DDP prepares its hooks there
        with autocast:
            img_k, txt_k, scale_k, bias_k = model(i if "vision" in trained else None,
                                                  t if "text" in trained else None, p)
        rows = slice(k * m, k * m + i.shape[0])
        surrogate = sum((emb.float() * cached_emb.grad[rows]).sum()
                        for emb, cached_emb in ((img_k, img), (txt_k, txt)) if emb is not None)
        # every parameter takes part in every backward (DDP expects it), the temperature's gradient counts once
        surrogate = surrogate + scale_k * (scale.grad if last else 0.0)
        if bias is not None:
            surrogate = surrogate + bias_k * (bias.grad if last else 0.0)
        surrogate.backward()
    return loss.detach()

# -----------------------------------------------------------------------------
# state that a checkpoint carries


def rng_state():
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# dense bf16 tensor-core peaks from the datasheets (for the GPUs without bf16 ones, V100 and T4, their fp16
# peak: what --precision auto trains in there); the first name contained in the device's name wins
PEAK_BF16_FLOPS = {"B200": 2250e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H200": 989e12, "H100": 989e12,
                   "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12,
                   "A6000": 155e12, "A10": 125e12, "4090": 165e12, "3090": 71e12,
                   "V100S": 130e12, "V100-PCIE": 112e12, "V100": 125e12, "T4": 65e12}


def peak_flops(device):
    if device.type != "cuda":
        return None  # bench.py measures a CPU's own matmul peak; no datasheet figure to use here
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def keep_freed_memory():
    """CPU training: ask glibc to keep freed memory for the next step instead of handing it back.
    By default every freed block over 32 MB goes back to the OS and the next step faults it in again,
    page by page: the backward of the token table alone (its fresh 100k x 128 gradient, 51 MB) takes
    33 ms that way and 9 ms from kept memory on a 2-core machine (benchmarks/bench_embedding.py).
    Other C libraries, or a jemalloc/tcmalloc preloaded by the user, are left as they are.
    Returns whether it took effect."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    # blocks under 1 GB come from the heap, and its top is never trimmed below 2 GB of free space
    return mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1 and mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1


def cpu_multiplies_bf16(cpuinfo="/proc/cpuinfo"):
    """Whether this CPU has bf16 matrix units (x86's AVX512-BF16 or AMX, Arm's BF16), as Linux lists them; None
    where it does not say. On the 2-core benchmark machine, which has AVX512-BF16, a 2048^3 matmul runs 4x
    faster in bf16 than in fp32, and the training steps of `tiny` and ViT-B/32 2x and 3x faster under
    `--precision bf16`. Without them (an AVX2-only x86, say) torch emulates bf16 matmuls, 40-90x slower than
    fp32 ones, and the step of `tiny` runs 16x slower in bf16."""
    try:
        with open(cpuinfo) as f:
            flags = set(f.read().split())
    except OSError:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})  # "bf16": Arm's, in its "Features" line


def cpu_bf16_advice(precision):
    """What a run on this CPU under --precision `precision` should know about bf16, or None."""
    units = cpu_multiplies_bf16()
    if precision == "auto" and units:
        return ("this CPU has bf16 matrix units: --precision bf16 runs 2-3x faster here than the default fp32, "
                "at bf16's precision (README, Numerics and speed)")
    if precision == "bf16" and units is False:
        return ("warning: this CPU has no bf16 matrix units (no AVX512-BF16 or AMX), so torch emulates bf16 "
                "matmuls and steps run many times slower than in fp32 (16x for `tiny` on an AVX2 CPU): "
                "leave out --precision bf16 to run in fp32")
    return None


def gpu_facts(device):
    """What --precision auto and --compile auto depend on: whether this GPU has bf16 tensor cores (NVIDIA's
    from compute capability 8.0, Ampere, on; AMD's under ROCm), fp16 ones (7.0, Volta, on), and whether
    torch.compile's GPU backend, Triton, runs on it (installed, which torch's Linux CUDA wheels are, and
    compute capability 7.0 or more)."""
    import importlib.util
    major, minor = torch.cuda.get_device_capability(device)
    return {"name": f"{torch.cuda.get_device_name(device)}, compute capability {major}.{minor}",
            "bf16": bool(torch.version.hip) or major >= 8, "fp16": bool(torch.version.hip) or major >= 7,
            "triton_installed": importlib.util.find_spec("triton") is not None, "triton_supported": major >= 7}


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def choose_precision(precision, device):
    """--precision on this device -> ("bf16", "fp16" or "fp32"; a note for stderr or None). auto is
    bf16 on a GPU with bf16 tensor cores; on an older one with fp16 tensor cores (a T4 or a V100, common in the
    cloud) it is fp16, with loss scaling, as bf16 there has no tensor cores and Triton cannot even generate
    code for it ("Feature '.bf16' requires .target sm_80"): asked for there, bf16 is a ValueError that says so,
    not a compiler error inside the first step. Elsewhere auto is fp32."""
    if device.type == "cuda":
        gpu = gpu_facts(device)
        if precision == "bf16" and not gpu["bf16"]:
            raise ValueError(f"--precision bf16: this GPU ({gpu['name']}) has no bf16 tensor cores, which start at "
                             "compute capability 8.0 (Ampere); leave out --precision to train in "
                             f"{'fp16 with loss scaling' if gpu['fp16'] else 'fp32'}")
        if precision != "auto":
            return precision, None
        if gpu["bf16"]:
            return "bf16", None
        if gpu["fp16"]:
            return "fp16", (f"this GPU ({gpu['name']}) has fp16 tensor cores but no bf16 ones: training in fp16, "
                            "with loss scaling")
        return "fp32", f"this GPU ({gpu['name']}) has no tensor cores: training in fp32"
    if precision == "fp16" and device.type == "cpu":
        return "fp16", ("warning: --precision fp16 is for GPUs without bf16 tensor cores; most CPUs emulate fp16 "
                        "matmuls, many times slower than fp32 ones: leave out --precision to run in fp32")
    return ("fp32" if precision == "auto" else precision), (cpu_bf16_advice(precision) if device.type == "cpu" else None)


def precision_context(precision, device, verbose=True):
    """choose_precision's choice and the autocast it calls for (nothing to do in fp32), its note printed to
    stderr; a precision that cannot work here raises ValueError. train.py, evaluate.py and the benchmarks use it."""
    chosen, note = choose_precision(precision, device)
    if note and verbose:
        print(note, file=sys.stderr)
    return chosen, nullcontext() if chosen == "fp32" else torch.autocast(device.type, dtype=DTYPES[chosen])


def choose_compile(compile, device):
    """--compile on this device -> (whether to torch.compile the model, a note for stderr or None). auto
    compiles on a GPU that Triton runs on, and nowhere else (on a CPU, compiling pays only on long runs)."""
    if device.type == "cpu" and compile == "true":
        # on a CPU torch.compile writes C++ and builds it with the compiler inductor looks for
        cxx = os.environ.get("CXX", "cl" if os.name == "nt" else "clang++" if sys.platform == "darwin" else "g++")
        if shutil.which(cxx) is None:
            raise ValueError(f"--compile true: on a CPU torch.compile builds C++, and there is no C++ compiler here "
                             f"({cxx}): install one (Debian/Ubuntu: apt install g++; macOS: xcode-select --install), "
                             "or leave out --compile")
    if device.type != "cuda":
        return compile == "true", None
    gpu = gpu_facts(device)
    if gpu["triton_installed"] and gpu["triton_supported"]:
        return compile != "false", None
    why = ("torch.compile needs Triton on a GPU, which is not installed (torch's Linux CUDA wheels bring it; on "
           "Windows: pip install triton-windows)" if not gpu["triton_installed"] else
           f"torch.compile needs Triton, which this GPU ({gpu['name']}) is too old for (compute capability 7.0 on)")
    if compile == "true":
        raise ValueError(f"--compile true: {why}; leave out --compile to train without it")
    return False, f"{why}: training without it" if compile == "auto" else None

# -----------------------------------------------------------------------------
# evaluation during training


@torch.no_grad()
def val_loss(model, loader, max_batches, device, autocast):
    total, n = torch.zeros((), device=device), 0
    for b, (images, tokens) in enumerate(loader):
        if max_batches and b == max_batches:
            break
        with autocast:
            total += clip_loss(*model(images, tokens)).float()  # on the device already (the loader's prefetch)
        n += 1
    if dist.is_initialized():
        dist.all_reduce(total)
        total /= dist.get_world_size()
    return total.item() / max(n, 1)


# how long a rank waits in a collective for the others: rank 0 writes the checkpoints alone, and at an evaluation the
# ranks' shares of a large zero-shot set may end far apart; NCCL's default 10 minutes could kill a healthy run
DDP_TIMEOUT = timedelta(minutes=60)


def start_processes(device_flag):
    """-> (ddp, rank, world, device). DDP whenever torchrun launched us: one process per GPU (NCCL), or per share
    of a CPU (gloo). A device is this machine's, never a checkpoint's."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if device_flag not in ("auto", "cuda", "mps", "cpu"):
        sys.exit(f"--device {device_flag!r}: choose one of auto, cuda, mps, cpu")
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    auto = ("cuda", "cpu") if ddp else ("cuda", "mps", "cpu")  # DDP has NCCL for GPUs, gloo for CPUs, none for mps
    kind = device_flag if device_flag != "auto" else next(k for k in auto if available[k])
    if not available[kind]:
        sys.exit(f"--device {kind}: torch sees no such device here (torch {torch.__version__}); "
                 "use --device cpu, or install a torch build for it (setup_gpu.sh does, on a GPU box)")
    if not ddp:
        return False, 0, 1, torch.device(kind)
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if kind == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=DDP_TIMEOUT)
    elif kind == "cpu":
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=DDP_TIMEOUT)
    else:
        sys.exit("torchrun runs on CUDA GPUs (NCCL) or CPUs (gloo), not on mps: add --device cpu, or run "
                 "without torchrun")
    return True, rank, world, device


def starting_point(cfg, argv):
    """The checkpoint a run starts from, if any -> (cfg, its state or None, its path, the settings changed).
    A resumed run keeps its own settings (batch, schedule, data, seed); flags given now override them, e.g. a
    larger --max_steps to train on. A reason not to start is a sys.exit with what to do."""
    manager = CheckpointManager(cfg.out_dir, keep=cfg.keep_checkpoints)
    start, start_path, changed = None, None, []
    if cfg.resume and cfg.init_from:  # one would be ignored
        sys.exit("--resume goes on with a run's weights and state, --init_from starts a new run from weights: give "
                 "one of them")
    if cfg.resume == "latest":
        try:
            start, start_path = manager.load_latest()
        except CheckpointError as e:
            sys.exit(f"--resume: {e}. Give a copy of one with --resume PATH, or start afresh with another --out_dir.")
        if start is None:
            sys.exit(f"--resume: no checkpoint in {cfg.out_dir}. Drop --resume to start fresh, or give a path.")
    elif cfg.resume or cfg.init_from:
        try:  # a run directory: its newest checkpoint to resume; its best.pt, if any, to start from
            start, start_path = load_run(cfg.resume or cfg.init_from, best=not cfg.resume)
        except CheckpointError as e:
            sys.exit(str(e))
    elif manager.checkpoints():
        # never overwrite an earlier run by accident
        sys.exit(f"{cfg.out_dir} already holds checkpoints of an earlier run: continue it with --resume, "
                 f"or start over with another --out_dir (or delete {cfg.out_dir}).")
    if cfg.resume:
        if not {"optimizer", "loader", "rng", "step", "config"} <= start.keys():
            sys.exit(f"{start_path} holds weights only, not a run's state to resume: start from them with "
                     f"--init_from {start_path}")
        # the run lives where its checkpoint is, wherever it was first started
        resumed = {**start["config"], "out_dir": os.path.dirname(start_path) or "."}
        cfg = parse_args(argv, resumed)
        changed = [f"{k} {resumed[k]!r} -> {v!r}" for k, v in asdict(cfg).items()
                   if k in resumed and k not in ("out_dir", "resume", "init_from", "device") and resumed[k] != v]
    return cfg, start, start_path, changed


def first_on_node():
    """Whether this process speaks for its node: a message every rank would print is printed once on each
    node's terminal (LOCAL_RANK 0; the only process without torchrun)."""
    return int(os.environ.get("LOCAL_RANK", 0)) == 0


def out_of_memory(e):
    """Whether an exception is the device running out of memory: torch.OutOfMemoryError on CUDA, and a plain
    RuntimeError on Apple's MPS ("MPS backend out of memory") and on a CPU whose allocator is refused memory
    ("DefaultCPUAllocator: can't allocate memory", under a memory ulimit or with overcommit turned off)."""
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and re.search(r"out of memory|can't allocate memory", str(e)) is not None)


def stops_quietly(stop):
    """Whether a rank ends on this SystemExit without printing its message. Under torchrun every rank meets the same
    reasons to stop (one command line, one node's files, ranks that skip steps and save together): the first
    process of each node says it, the others stop with exit code 1, so --nproc_per_node=8 shows it once, not eight
    times. Running out of memory may strike one rank alone: every rank that meets it says so."""
    return (isinstance(stop.code, str) and not first_on_node()
            and not out_of_memory(stop.__context__))


def same_on_every_rank(ddp, what, key, shown, failure=None):
    """Under DDP every rank reads the checkpoint and the data from its own node's disk. Nodes that do not share
    them could start from different checkpoints or data, and train on silently wrong (optimizer states and batches
    that do not belong together); or one rank would stop on a missing file while the others wait for it in their
    next collective until the timeout. So every rank reports what it found (`key`, shown as `shown`) or why it
    cannot start (`failure`): they go on only if all found the same, and otherwise all stop, saying what each found.
    Without DDP: a failure stops the run."""
    if ddp:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, (failure, key, shown))
        if any(other[:2] != every[0][:2] for other in every):
            if first_on_node():
                print(f"the ranks did not find the same {what}:\n" +
                      "\n".join(f"  rank {r}: {f or s}" for r, (f, _, s) in enumerate(every)) +
                      "\nEvery node reads its own files: keep --out_dir and --data_dir on storage that all nodes share "
                      "(or copy them to each node), then run again.", file=sys.stderr)
            sys.exit(1)
    if failure:  # the same on every rank: said once on every node (stops_quietly)
        sys.exit(failure)


def check_settings(cfg, given, from_checkpoint, ddp):
    """Every setting checked before any work: a value out of range stops the run with what it must be, not a
    traceback from inside torch or numpy, and not hours in. `given`: the flags of this command line."""
    if "crop_scale_min" in given and not cfg.augment:  # said, not ignored (the demo turns the crops off)
        sys.exit("--crop_scale_min sets the random crops, which --augment false turns off: add --augment true")
    if cfg.epochs < 0:  # checked before a --max_steps given with it resets it to 0
        sys.exit(f"--epochs {cfg.epochs}: must be 0 (--max_steps decides) or more")
    if "max_steps" in given and "epochs" in given and cfg.epochs > 0:
        sys.exit("--epochs sets --max_steps (the epochs' steps): give one of them")
    for name, allowed in (("compile", ("auto", "true", "false")),
                          ("precision", ("auto", "bf16", "fp16", "fp32")),
                          ("loss", ("clip", "siglip")), ("model", tuple(PRESETS))):
        if getattr(cfg, name) not in allowed:
            sys.exit(f"--{name} {getattr(cfg, name)!r}: choose one of {', '.join(allowed)}")
    # the contrastive loss tells each image's caption from the batch's others: with one sample it is 0, and nothing
    # is learned (SigLIP's sigmoid loss still has its positive pair)
    for name, ok, what in (("batch_size", cfg.batch_size >= (2 if cfg.loss == "clip" else 1),
                            "at least 2 for the contrastive loss (the global batch, over all ranks: "
                            "--micro_batch_size fits it in memory)" if cfg.loss == "clip" else "at least 1"),
                           ("max_steps", cfg.max_steps >= 1, "at least 1"),
                           ("max_lr", cfg.max_lr > 0, "positive"), ("warmup_frac", 0 <= cfg.warmup_frac < 1, "in [0, 1)"),
                           ("micro_batch_size", cfg.micro_batch_size >= 0, "0 (off) or more"),
                           ("min_lr_ratio", 0 <= cfg.min_lr_ratio <= 1, "in [0, 1]"),
                           ("crop_scale_min", 0 < cfg.crop_scale_min <= 1, "in (0, 1]"),
                           ("patch_dropout", 0 <= cfg.patch_dropout < 1, "in [0, 1): the share of patches left out"),
                           ("grad_clip", cfg.grad_clip >= 0, "0 (off) or more"),
                           ("weight_decay", cfg.weight_decay >= 0, "0 or more"),
                           ("beta1", 0 <= cfg.beta1 < 1, "in [0, 1)"), ("beta2", 0 <= cfg.beta2 < 1, "in [0, 1)"),
                           ("eps", cfg.eps > 0, "positive"),
                           ("seed", 0 <= cfg.seed < 2 ** 32, "in [0, 2^32)"),
                           ("num_workers", cfg.num_workers >= -1, "-1 (the cores per rank less one) or more"),
                           ("log_interval", cfg.log_interval >= 0, "0 (only the last step) or more"),
                           ("eval_interval", cfg.eval_interval >= 0, "0 (only the last step) or more"),
                           ("checkpoint_interval", cfg.checkpoint_interval >= 0, "0 (only the last step) or more"),
                           ("eval_batches", cfg.eval_batches >= 0, "0 (the whole val split) or more"),
                           ("keep_checkpoints", cfg.keep_checkpoints >= 0, "0 (all) or more"),
                           ("max_bad_steps", cfg.max_bad_steps >= 1, "at least 1")):
        if not ok:
            sys.exit(f"--{name} {getattr(cfg, name)}: must be {what}")
    if cfg.lock_image and cfg.lock_text:
        sys.exit("--lock_image and --lock_text together leave nothing to train but the temperature: lock one tower")
    if (cfg.lock_image or cfg.lock_text) and not from_checkpoint:
        sys.exit(f"--lock_{'image' if cfg.lock_image else 'text'} keeps a tower as it starts, and a fresh run's "
                 "starts random: give the weights to keep with --init_from CHECKPOINT")
    for name in ("zeroshot_classnames", "zeroshot_labels"):
        if getattr(cfg, name) and cfg.zeroshot in ("auto", "none"):  # said, not ignored
            sys.exit(f"--{name} is about the sets given with --zeroshot: give them")
        if getattr(cfg, name) and not os.path.isfile(getattr(cfg, name)):
            sys.exit(f"--{name} {getattr(cfg, name)}: no such file")
    # a --zeroshot folder mistyped, or one of images with no classes, stops the run now, not at its first evaluation
    # hours in. One that some nodes have and others lack is left out by all at that evaluation, with a warning
    sets = [] if cfg.zeroshot in ("auto", "none") else data_dirs(cfg.zeroshot)
    missing = {}
    for name in sets:
        try:
            not_a_missing_folder(name)
        except FileNotFoundError as e:
            missing[name] = str(e)
            continue
        import evaluate  # the one that reads zero-shot sets
        if not cfg.zeroshot_labels and evaluate.loose_images(name):  # there, but no classes to read in it
            missing[name] = evaluate.loose_images_hint("--zeroshot_labels")
    if ddp and sets:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, missing)
        missing = {name: why for name, why in missing.items() if all(name in other for other in every)}
    if missing:
        sys.exit("\n".join(f"--zeroshot {name}: {why}" for name, why in missing.items()))


def model_config(cfg, start, start_path, given):
    """The model's CLIPConfig: the --model preset with the model flags over it, or a checkpoint's. A checkpoint
    fixes the shape, so a model flag that contradicts it stops the run instead of being lost; --init_from may
    change the image size and caption length (the position embeddings follow) and the loss."""
    if start is not None:
        model_cfg = CLIPConfig(**start["model_config"])
        if cfg.init_from:  # fine-tuning at another resolution or caption length: the position embeddings follow
            resized = {k: v for k, v in cfg.model_args.items() if k in ("image_size", "context_length")}
            try:
                model_cfg = replace(model_cfg, **resized)
            except AssertionError as e:  # an image size its patches do not divide
                sys.exit(f"--init_from {start_path}: {e}")
        clash = [f"--{k} {v!r} (the checkpoint's: {getattr(model_cfg, k)!r})" for k, v in cfg.model_args.items()
                 if getattr(model_cfg, k) != v]
        named = start.get("config", {}).get("model")  # the preset it was made from (a file of weights alone: unknown)
        if "model" in given and named and cfg.model != named:
            clash.append(f"--model {cfg.model!r} (the checkpoint's: {named!r})")
        if "loss" in given and cfg.loss != model_cfg.loss:
            if cfg.resume:  # the optimizer's state holds the loss's own parameters: a run keeps its loss
                clash.append(f"--loss {cfg.loss!r} (the run's: {model_cfg.loss!r})")
            else:  # fine-tuning with the other loss: the weights, and that loss's own fresh temperature (and bias)
                model_cfg = replace(model_cfg, loss=cfg.loss)
        if clash:
            resizable = {"image_size", "context_length"} & set(cfg.model_args)
            sys.exit(f"{start_path} fixes the model's shape; drop " + ", ".join(clash) + (
                f" (to fine-tune at another {' or '.join(sorted(resizable))}, start a new run from its weights with "
                f"--init_from {start_path})" if cfg.resume and resizable else ""))
        cfg.model = named or cfg.model  # what config.json and the checkpoints then say (cfg.loss is the model's)
    else:
        try:
            model_cfg = get_config(cfg.model, loss=cfg.loss, **cfg.model_args)
        except AssertionError as e:
            sys.exit(f"model settings {cfg.model_args}: {e}")
    try:
        get_encoding(model_cfg.encoding)  # one that needs a download fails now, with its reason, not in the loader
    except RuntimeError as e:
        sys.exit(str(e))
    return model_cfg


def load_weights(model, start, start_path, verbose=True):
    """A checkpoint's weights into the model, whose config may differ from the checkpoint's where --init_from
    changes it: another image size or caption length (the position embeddings are resized), another loss (its own
    fresh temperature, and SigLIP's bias). Weights that do not fit the model stop the run, saying which."""
    cfg, was = model.config, CLIPConfig(**start["model_config"])
    fresh = {"logit_scale", "logit_bias"} if cfg.loss != was.loss else set()
    weights = start["model"]
    if (was.image_size, was.context_length) != (cfg.image_size, cfg.context_length):
        weights = resize_position_embeddings(weights, cfg)
        if verbose:
            print(f"position embeddings resized: images {was.image_size} -> {cfg.image_size} px, "
                  f"captions {was.context_length} -> {cfg.context_length} tokens")
    try:
        missing, unexpected = model.load_state_dict({k: v for k, v in weights.items() if k not in fresh}, strict=False)
        mismatch = f"missing {missing}, unexpected {unexpected}" if set(missing) - fresh or unexpected else None
    except RuntimeError as e:  # tensors of other shapes than their names': one line each after a heading
        mismatch = "; ".join(line.strip() for line in str(e).splitlines()[1:])
    if mismatch:
        sys.exit(f"{start_path} does not hold the weights of the model its model_config describes: {mismatch}")


def shapes_go_there(data_dir):
    """Where --make_shapes generates the shapes set: a --data_dir that is missing or empty, or one where that
    generation was cut short (prep_dataset.py's .stage is still there; it goes on from what is finished).
    Never a folder that holds anything else: `--config demo --data_dir` a folder of the user's own files
    trains on those or says how to prepare them, instead of adding shapes to them. Hidden files other than
    .stage (prep's .lock, a desktop's .DS_Store) do not count."""
    if not os.path.isdir(data_dir):
        return True
    entries = {e for e in os.listdir(data_dir) if e == ".stage" or not e.startswith(".")}
    return not entries or (".stage" in entries and entries <= {".stage", "train", "val"})


def data_loaders(cfg, model_cfg, device, ddp, rank, world, num_workers):
    """-> (train loader, val loader or None, val samples, the sets with a val split, the shapes set's zero-shot
    tasks). The demo's shapes set is generated first where --data_dir is missing or empty (--make_shapes). Data
    that every rank does not find the same, or that is missing, stops every rank with what to do."""
    # --data_dir may list several prepared sets (data/coco,data/t2i): their shards are read as one set
    sets = data_dirs(cfg.data_dir)
    if cfg.make_shapes and len(sets) == 1:
        if rank == 0 and shapes_go_there(sets[0]):  # rank 0 alone looks: the others would see it half written
            import prep_dataset
            print(f"{cfg.data_dir} has no shards: generating {cfg.make_shapes} samples of the shapes set")
            prep_dataset.main(["--source", "shapes", "--out_dir", cfg.data_dir, "--limit", str(cfg.make_shapes),
                               "--image_size", str(model_cfg.image_size), "--shard_size", "2000"])
        if ddp:
            dist.barrier()
    val_dirs = [d for d in sets if shard_paths(d, "val")]  # a val split is optional, in each set
    manifests = {}
    for d in sets:
        if os.path.exists(os.path.join(d, "manifest.json")):
            try:  # what prep_dataset.py wrote: the counts, the image size, the shapes set's tasks
                manifests[d] = read_json_object(os.path.join(d, "manifest.json"))
            except (OSError, ValueError) as e:  # edited by hand, or another tool's: the shards still count
                if rank == 0:
                    print(f"warning: {d}/manifest.json cannot be read ({e}); training on its shards without it (no "
                          "zero-shot tasks of its own)", file=sys.stderr)
        if rank == 0 and manifests.get(d, {}).get("image_size", model_cfg.image_size) < model_cfg.image_size:
            print(f"warning: {d} holds {manifests[d]['image_size']}-px images and the model takes "
                  f"{model_cfg.image_size} px: every image is upscaled. Prepare the data with --image_size "
                  f"{model_cfg.image_size} or more for full detail.", file=sys.stderr)
    tasks = {k: v for m in manifests.values() for k, v in m.get("tasks", {}).items()}  # the shapes set's zero-shot tasks
    loader_kw = dict(image_size=model_cfg.image_size, context_length=model_cfg.context_length,
                     encoding=model_cfg.encoding, seed=cfg.seed, rank=rank, world_size=world,
                     num_workers=num_workers, trim_tokens=True, device=device)
    val_loader, val_count, failure = None, 0, None
    try:  # shards that hold fewer samples than a batch, or none at all: a message, not a traceback
        train_loader = ShardLoader(cfg.data_dir, "train", cfg.batch_size, train=True, augment=cfg.augment,
                                   crop_scale=(cfg.crop_scale_min, 1.0), **loader_kw)
        if val_dirs:
            counts = [manifests.get(d, {}).get("counts", {}).get("val") for d in val_dirs]
            if None in counts:  # shards without a manifest (another tool's): count them
                counts = [ShardLoader(",".join(val_dirs), "val", 1, train=False, drop_last=False,
                                      **{**loader_kw, "rank": 0, "world_size": 1}).dataset.num_samples]
            val_count = sum(counts)
            val_batch = min(cfg.batch_size, val_count // world * world)
            # the contrastive loss of a batch of one is 0 whatever the model: no figure to keep best.pt by
            if val_batch >= (2 if cfg.loss == "clip" else 1):
                val_loader = ShardLoader(",".join(val_dirs), "val", val_batch, train=False, **loader_kw)
    except FileNotFoundError as e:  # no shards: the message says which command makes them
        failure = f"{e}\nor run the built-in demo, which makes its own data: python train.py --config demo"
    except ValueError as e:
        failure = str(e)
    found = None if failure else (train_loader.dataset.num_samples, len(train_loader.dataset.paths),
                                  val_loader.dataset.num_samples if val_loader else 0)
    same_on_every_rank(ddp, "data", found, found and f"{found[0]} train samples in {found[1]} shards, "
                       f"{found[2]} val samples", failure)
    return train_loader, val_loader, val_count, val_dirs, tasks


def claim_run_directory(out_dir, ddp, rank, world):
    """Makes the run directory, and takes it for this run. One that cannot be made, or written (a read-only disk,
    another user's folder), stops the run now, not at its first checkpoint hours in: rank 0 writes there, and the
    other ranks stop with it. One run writes there at a time."""
    why = writable_folder(out_dir) if rank == 0 else None
    failure = why and f"--out_dir {out_dir}: {why}; choose another"
    if ddp:  # every rank stops with rank 0
        every = [None] * world
        dist.all_gather_object(every, failure)
        failure = every[0] and (failure or f"rank 0: {every[0]}")
    if failure:
        sys.exit(failure)
    if rank == 0:  # one run per directory: a second one's checkpoints and log lines would interleave with this one's
        try:
            lock_dir(out_dir)
        except BlockingIOError:
            sys.exit(f"another train.py is writing into {out_dir} (or a notebook whose train.main wrote there "
                     "was interrupted): let it finish or stop it, or choose another --out_dir")


def due(step, interval):
    """Whether a periodic task runs at this step (interval 0: never; the last step is handled apart)."""
    return interval > 0 and step % interval == 0


def main(argv=None):
    started = time.time()
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_args(argv)
    # ---- processes and devices first, so that the ranks can compare the checkpoint and the data they find
    ddp, rank, world, device = start_processes(cfg.device)
    master = rank == 0
    # ---- the checkpoint to start from, if any
    try:
        cfg, start, start_path, changed = starting_point(cfg, argv)
        failure = None
    except SystemExit as e:  # said below, once every rank knows
        start, start_path, changed, failure = None, None, [], str(e.code)
    given = {arg[2:].partition("=")[0] for arg in argv if arg.startswith("--")}  # the flags of this command
    if start is not None and "loss" not in given:  # a run from a checkpoint trains with its loss unless told another
        cfg.loss = start["model_config"].get("loss", "clip")
    # a checkpoint of train.py's holds its step; one written by hand to start from may hold only the weights
    at = f" (step {start['step']})" if start and "step" in start else ""
    scale = start["model"].get("logit_scale") if start else None  # with the step: which run, and where in it
    same_on_every_rank(ddp, "checkpoint to start from", start and (start.get("step"), scale is not None and float(scale)),
                       f"{start_path}{at}" if start else "no checkpoint: a fresh run", failure)
    # ---- the settings, checked before any work; the run directory; the model's shape
    check_settings(cfg, given, start is not None, ddp)
    if "max_steps" in given:  # a run of --epochs resumed with a new length in steps: the steps decide
        cfg.epochs = 0.0
    claim_run_directory(cfg.out_dir, ddp, rank, world)
    manager = CheckpointManager(cfg.out_dir, keep=cfg.keep_checkpoints)
    model_cfg = model_config(cfg, start, start_path, given)

    num_workers = cfg.num_workers
    if num_workers < 0:
        # on a GPU, decoding and cropping images is the CPU's whole job: a base model on an H100 takes thousands
        # of images a second, a core makes a few hundred training crops. A step on the CPU shares its cores
        num_workers = default_num_workers(int(os.environ.get("LOCAL_WORLD_SIZE", 1)), cpu_step=device.type == "cpu")
    if cfg.batch_size % world:
        below, above = cfg.batch_size // world * world, -(-cfg.batch_size // world) * world
        sys.exit(f"--batch_size {cfg.batch_size} (global) must be divisible by the {world} processes: "
                 f"{f'{below} or ' if below else ''}{above}, say")
    local_batch = cfg.batch_size // world
    if cfg.micro_batch_size and local_batch % cfg.micro_batch_size:
        sys.exit(f"--micro_batch_size {cfg.micro_batch_size} must divide the per-process batch {local_batch}")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    if device.type == "cpu":
        keep_freed_memory()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    try:  # each with a note worth knowing (a T4 trains in fp16; a CPU with bf16 units would be faster in bf16)
        (precision, autocast), (use_compile, compile_note) = (precision_context(cfg.precision, device, verbose=master),
                                                              choose_compile(cfg.compile, device))
    except ValueError as e:
        sys.exit(str(e))
    if compile_note and master:
        print(compile_note, file=sys.stderr)
    # fp16 keeps only 5 exponent bits: the loss is scaled up before the backward so that small gradients do
    # not round to zero, and the scale adapts to stay clear of overflow (off, a no-op, in bf16 and fp32)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    if start is not None and master:
        print(f"{'resuming' if cfg.resume else 'initialising'} from {start_path}{at}")
        if cfg.resume and changed:
            print("  with settings changed from the run's own: " + ", ".join(changed))

    # ---- data
    train_loader, val_loader, val_count, val_dirs, tasks = data_loaders(cfg, model_cfg, device, ddp, rank, world,
                                                                        num_workers)
    if cfg.epochs > 0:  # an epoch: the full batches the training split fills (the loader drops a partial one)
        cfg.max_steps = max(1, math.ceil(cfg.epochs * len(train_loader)))

    # ---- model and optimizer
    raw_model = CLIP(model_cfg).to(device)
    if cfg.grad_checkpointing:
        raw_model.set_grad_checkpointing(True)
    # fused AdamW (not on mps): one kernel for all parameters, which also clips and skips a step on the device
    optimizer = torch.optim.AdamW(param_groups(raw_model, cfg.weight_decay), lr=cfg.max_lr, betas=(cfg.beta1, cfg.beta2),
                                  eps=cfg.eps, fused=device.type in ("cuda", "cpu"))
    step = 0
    if start is not None:
        load_weights(raw_model, start, start_path, verbose=master)
        if cfg.resume:
            optimizer.load_state_dict(start["optimizer"])
            if start.get("scaler"):  # an fp16 run's loss scale (a run resumed in another precision drops it)
                scaler.load_state_dict(start["scaler"])
            train_loader.load_state_dict(start["loader"])
            set_rng_state(start["rng"])
            step = start["step"]
    del start
    # LiT (Zhai et al. 2022): a locked tower's weights get no gradient, so fused AdamW passes them by (no update,
    # no weight decay) and DDP leaves them out of its all-reduce; its backward is not run
    for tower, locked in ((raw_model.visual, cfg.lock_image), (raw_model.text, cfg.lock_text)):
        tower.requires_grad_(not locked)
    trained = tuple(name for name, locked in (("vision", cfg.lock_image), ("text", cfg.lock_text)) if not locked)
    if use_compile:
        # a fresh compile cache: shapes that an earlier run in this process compiled (a notebook that trains
        # twice, at two image sizes) would otherwise be taken for dynamic ones and compiled as such
        torch.compiler.reset()
    model = torch.compile(raw_model) if use_compile else raw_model
    if ddp:
        # DDP broadcasts the buffers (the constant image mean/std, 6 numbers) before each forward: too small
        # to matter, and turning it off takes a flag whose name changed in torch 2.13
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    eval_model = model.module if ddp else model  # compiled if compiled; no DDP hooks for no-grad passes

    logger = Logger(cfg.out_dir, enabled=master, resume_step=step if cfg.resume else None)
    if master:
        resolved = {**asdict(cfg), "model_config": asdict(model_cfg), "world_size": world, "device": str(device),
                    "precision": precision, "compile": use_compile, "loader_workers": num_workers}
        print(json.dumps(resolved, indent=2))
        try:  # for people and other tools: a run needs only what its checkpoints hold
            with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
                json.dump(resolved, f, indent=2)
        except OSError as e:  # a full disk: warned about here; the first checkpoint stops every rank, saying why
            print(f"warning: could not write {cfg.out_dir}/config.json ({e.strerror or e})", file=sys.stderr)
        n_params = sum(p.numel() for p in raw_model.parameters())
        ds, samples = train_loader.dataset, str(train_loader.dataset.num_samples)
        sets = data_dirs(cfg.data_dir)
        if len(sets) > 1:  # what each set brings: 192 + 192 = 384
            rows = dict(zip(ds.paths, map(len, ds.shard_rows)))
            samples = " + ".join(str(sum(rows[p] for p in shard_paths(d, "train"))) for d in sets) + f" = {samples}"
        print(f"{n_params / 1e6:.1f}M parameters | {samples} train samples, "
              f"{len(train_loader)} steps per epoch" + (f", {cfg.epochs:g} epochs: {cfg.max_steps} steps" if cfg.epochs
                                                         else "") +
              f" | chance-level loss ln(batch) = {math.log(cfg.batch_size):.3f}")
        val_batch = val_loader.dataset.global_batch if val_loader else cfg.batch_size
        if val_batch < cfg.batch_size:  # a contrastive loss grows with its batch: the two are not on one scale
            print(f"the val split holds fewer samples than --batch_size: val loss over batches of {val_batch}, "
                  f"whose chance level is ln({val_batch}) = {math.log(val_batch):.3f}, below the train loss's")
        if val_loader is None and val_count:  # said, so that the missing figures and best.pt come as no surprise
            print(f"the val split holds {val_count} sample{'s' * (val_count > 1)}, too few for a val-loss batch"
                  + (f" shared by the {world} ranks" if world > 1 else "") + ": no val loss and no best.pt, only the "
                  "newest checkpoints (prep_dataset.py's --val_fraction holds out more of the samples)")
        elif val_loader is None:
            print(f"no val split to evaluate on in {cfg.data_dir}: no val loss, no retrieval and no best.pt, only "
                  "the newest checkpoints (prep_dataset.py holds out --val_fraction of the samples, 5% by default)")

    evaluator = None
    if cfg.zeroshot != "none" or cfg.retrieval:
        import evaluate  # downstream of training data, upstream of nothing: the eval hooks
        # a training forward pass's images at a time: what fits beside its backward fits without one. Retrieval
        # among a single sample would always find it (R@1 = 1, which says nothing)
        evaluator = evaluate.TrainingEvaluator(cfg.zeroshot, cfg.retrieval and val_count >= 2, ",".join(val_dirs),
                                               tasks, model_cfg, device, autocast, num_workers=num_workers,
                                               classnames_file=cfg.zeroshot_classnames or None,
                                               labels_file=cfg.zeroshot_labels or None,
                                               batch_size=cfg.micro_batch_size or cfg.batch_size // world)

    def run_eval():
        record = {"kind": "eval", "step": step}
        if val_loader is not None:
            record["val_loss"] = val_loss(eval_model, val_loader, cfg.eval_batches, device, autocast)
        if evaluator is not None:  # every rank embeds its share; rank 0 logs the figures
            record.update(evaluator(raw_model))
        if len(record) > 2:  # not a line of its step alone (no val split, no zero-shot set)
            logger.log(record)
        return record.get("val_loss")

    def save(val):
        """Rank 0 writes the checkpoint. Under DDP the other ranks learn whether it could: a full disk or diverged
        weights stop them all at once, instead of rank 0 alone while the others wait for it until the timeout
        (the agent of one node stops its own ranks, not another node's)."""
        error = None
        if master and not torch.stack([p.isfinite().all() for p in raw_model.parameters()]).all():  # one host read
            error = (f"step {step}: the weights hold NaN/inf; not saving them. Resume from the last good "
                     f"checkpoint in {cfg.out_dir} with a lower --max_lr.")
        elif master:
            state = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                     "step": step, "loader": train_loader.state_dict(), "rng": rng_state(), "config": asdict(cfg),
                     "model_config": asdict(model_cfg), "encoding": model_cfg.encoding, "val_loss": val}
            try:
                print(f"saved {manager.save(step, state, val)}")
            except CheckpointError as e:
                error = f"step {step}: {e}"
        if ddp:
            shared = [error]
            dist.broadcast_object_list(shared, src=0)
            error = shared[0] and (error or f"rank 0 could not save: {shared[0]}")
        if error:
            sys.exit(error)

    if step >= cfg.max_steps and master:
        print(f"the run is already at step {step} of --max_steps {cfg.max_steps}: nothing to train. Resume with "
              "a larger --max_steps to train on (the cosine schedule then stretches to the new end).")

    # ---- the loop
    peak = peak_flops(device)
    batches = iter(train_loader)
    zero = lambda: torch.zeros((), device=device)
    loss_sum, good_steps, bad_run, bad_max_run, bad_total = zero(), zero(), zero(), zero(), zero()
    t_last, steps_since, flops_since = time.time(), 0, 0.0
    start_step = step
    # a SIGTERM (how torchrun, SLURM or a cloud's preemption stop a job; `kill`) is not fatal in the middle of a
    # step: the run stops after the step, with a checkpoint there, and goes on from it with --resume
    stop = []
    try:
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
    except ValueError:  # not the main thread: signals stay as they are
        previous = None
    try:
        while step < cfg.max_steps:
            lr = get_lr(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images, tokens = next(batches)  # on the device already: the loader copies a batch ahead (prefetch)
            mine = slice(rank * local_batch, (rank + 1) * local_batch)  # this rank's rows of the global batch
            keep = kept_patches(model_cfg, cfg.patch_dropout, cfg.seed, step, cfg.batch_size, mine)
            if keep is not None:  # to a GPU from pinned memory: a copy from pageable memory waits for the GPU's queue
                keep = (keep.pin_memory() if device.type == "cuda" else keep).to(device, non_blocking=True)
            # this rank's work: its batch's captions run only up to the longest one (trim_tokens)
            flops_since += flops_per_sample(model_cfg, text_length=tokens.shape[1], trained=trained,
                                            patches=keep.shape[1] if keep is not None else None) * tokens.shape[0]
            try:
                loss = forward_backward(model, images, tokens, cfg.micro_batch_size, autocast, scaler, keep,
                                        trained)
                grad_norm, bad = clipped_step(optimizer, raw_model.parameters(), cfg.grad_clip, loss, scaler)
            except RuntimeError as e:
                if not out_of_memory(e):
                    raise
                per_pass = cfg.micro_batch_size or local_batch
                smaller = max(d for d in range(1, per_pass // 2 + 1) if local_batch % d == 0) if per_pass > 1 else None
                sys.exit(f"step {step + 1}: out of memory on {device} at {per_pass} samples per forward pass. Lower "
                         "the memory a pass takes, with the same gradients: " +
                         (f"--micro_batch_size {smaller} (feature caching, README), or " if smaller else "") +
                         "--grad_checkpointing true. A smaller --batch_size would change the training itself.")
            optimizer.zero_grad(set_to_none=True)
            bad_run = (bad_run + bad) * bad
            bad_max_run, bad_total = torch.maximum(bad_max_run, bad_run), bad_total + bad
            loss_sum += torch.where(bad > 0, 0.0, loss.float())
            good_steps += 1 - bad
            step += 1
            steps_since += 1
            last = step == cfg.max_steps
            if step == start_step + 1 and not due(step, cfg.log_interval) and not last:
                # the first step compiles and waits for the loader's workers to start: tens of seconds that
                # would make the first interval's samples/s, MFU and minutes left wrong; time from its end
                if device.type == "cuda":
                    torch.cuda.synchronize(device)  # once: the step's kernels finish inside its own time
                if master:
                    print(f"step {step}: {time.time() - t_last:.1f}s (the first step: "
                          f"{'compiling, ' if use_compile else ''}loader start-up); throughput is timed from here")
                t_last, steps_since, flops_since = time.time(), 0, 0.0

            if due(step, cfg.log_interval) or last:
                if ddp:
                    dist.all_reduce(loss_sum)
                    loss_sum /= world
                bias = [] if raw_model.logit_bias is None else [raw_model.logit_bias.detach().float()]  # SigLIP's
                stats = torch.stack([loss_sum, grad_norm.float(), bad_total, bad_max_run, good_steps,
                                     raw_model.logit_scale.detach().exp().float(), *bias]).tolist()  # the one sync
                if stats[3] >= cfg.max_bad_steps:
                    sys.exit(f"step {step}: {int(stats[3])} non-finite steps in a row; stopping. Resume from the last "
                             f"checkpoint in {cfg.out_dir} with a lower --max_lr, or check the data.")
                dt = time.time() - t_last
                samples_per_s = steps_since * cfg.batch_size / dt
                record = {"kind": "train", "step": step, "loss": stats[0] / max(stats[4], 1), "lr": lr,
                          "grad_norm": stats[1], "logit_scale": stats[5], "samples_per_s": samples_per_s,
                          "bad_steps": int(stats[2]), "epoch": train_loader.epoch,
                          "skipped_samples": train_loader.skipped,
                          "eta_min": (cfg.max_steps - step) * dt / steps_since / 60}  # at this pace, no evals
                if bias:
                    record["logit_bias"] = stats[6]
                if peak:
                    record["mfu"] = flops_since / dt / peak
                if scaler.is_enabled():
                    record["loss_scale"] = scaler.get_scale()
                logger.log(record)
                loss_sum.zero_()
                good_steps.zero_()
                t_last, steps_since, flops_since = time.time(), 0, 0.0
            t_pause = time.time()
            val = run_eval() if due(step, cfg.eval_interval) or last else None
            if due(step, cfg.checkpoint_interval) or last:
                save(val)
            t_last += time.time() - t_pause  # evaluating and saving do not count against training throughput
            # a SIGTERM ends the run here, after a checkpoint. In DDP the ranks decide together, at the logged steps
            # (every 10 where only the last step is logged): reading their decision waits for the device, as the
            # log's own figures do there already, so no step of the others waits for it
            if ddp and due(step, cfg.log_interval or 10):
                flag = torch.tensor(float(bool(stop)), device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stopping = flag.item() > 0
            else:
                stopping = bool(stop) and not ddp
            if stopping and not last:
                if not due(step, cfg.checkpoint_interval):
                    save(None)  # under DDP, every rank waits in it until rank 0's checkpoint is whole
                if master:
                    print(f"stopped by SIGTERM after step {step}: go on from its checkpoint with the same command and "
                          "--resume", file=sys.stderr)
                sys.exit(143)  # 128 + SIGTERM, as a shell reports a process ended by it
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)

    if ddp:
        dist.destroy_process_group()
    if master:
        unlock_dir(cfg.out_dir)  # the run is over: another may write here now
        minutes, seconds = divmod(round(time.time() - started), 60)
        took = (f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min {seconds} s" if minutes
                else f"{seconds} s")
        best, run = manager.best_val_loss(), shlex.quote(cfg.out_dir)  # quoted: the commands paste into a shell
        print(f"done: step {step} in {took}" + (f"; the lowest val loss, {best:.4g}, is {manager.best_path}"
                                                 if math.isfinite(best) else "") +
              f". Next: python logger.py {run} (the plots); python evaluate.py {run} --zeroshot DIR "
              "or --retrieval DIR (README, Evaluation)")
    return raw_model


def exit_after_ddp(code=0):
    """Ends a process that ran under DDP, its output flushed, without the interpreter's shutdown; code as sys.exit
    takes it (a message is said on stderr, with exit status 1). With DDP, torch 2.13 keeps the process group (and,
    with gloo, its worker threads) alive past destroy_process_group, and a worker thread that releases a finished
    collective's tensors while the interpreter shuts down aborts the process ("terminate called without an active
    exception", SIGABRT; in 4 of 67 two-node runs on a busy 2-core CPU): a run that trained and saved everything
    would end as failed, one stopped by SIGTERM would lose its 143, and the other nodes' torchrun would wait for
    this one. By now everything is written (the log and the checkpoints are closed files)."""
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    ddp_run = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # under torchrun
    try:
        main()
    except SystemExit as e:
        code = 1 if stops_quietly(e) else e.code
        if ddp_run:
            exit_after_ddp(code)
        sys.exit(code)
    except KeyboardInterrupt:  # Ctrl-C: where to go on from, not a traceback (once per node, not once per rank)
        if first_on_node():
            print("\ninterrupted. Go on from the last checkpoint with the same command and --resume", file=sys.stderr)
        sys.exit(130)  # the shell's code for a Ctrl-C'd program
    if ddp_run:
        exit_after_ddp()
