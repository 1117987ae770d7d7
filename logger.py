"""
Metrics to disk, and plots of them.

train.py appends one JSON line per logged step and per evaluation to RUN_DIR/log.jsonl; anything that
reads JSON lines can plot it. This file also plots it:

    python logger.py runs/demo                       # -> runs/demo/plots.png
    python logger.py runs/a runs/b --out cmp.png     # several runs overlaid
"""
import argparse
import json
import math
import os
import sys

import numpy as np

from prep_dataset import disk_full


class Logger:
    """Append-only JSONL log plus readable console lines. A resumed run continues the same log: records
    past the step it resumes from (written after that checkpoint) are dropped, so no step appears twice."""

    def __init__(self, out_dir, enabled=True, resume_step=None):
        self.path = os.path.join(out_dir, "log.jsonl")
        self.enabled, self.warned = enabled, False
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        if resume_step is None:
            if os.path.exists(self.path):
                os.remove(self.path)  # a fresh run in this directory starts a fresh log
        elif os.path.exists(self.path):
            kept = [r for r in read_log(self.path) if r.get("step", 0) <= resume_step]
            try:
                with open(self.path + ".tmp", "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in kept)
                os.replace(self.path + ".tmp", self.path)
            except OSError as e:  # a full disk: the log stays whole, with the steps after resume_step twice
                if os.path.exists(self.path + ".tmp"):
                    os.remove(self.path + ".tmp")
                print(f"warning: could not rewrite {self.path} ({e.strerror or e}): the steps after {resume_step} "
                      "it held will appear twice", file=sys.stderr)

    def log(self, record, console=True):
        if not self.enabled:
            return
        # inf and NaN (a gradient that overflowed fp16, a diverged loss) as null: JSON has no such numbers, and
        # strict readers (jq, JavaScript) reject the Infinity and NaN that json.dumps would write
        finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(finite, allow_nan=False) + "\n")
        except OSError as e:  # a full disk: the figures still reach the console, and training goes on
            if not self.warned:  # said once. A checkpoint that cannot be written then stops the run, saying why
                print(f"warning: could not write {self.path} ({e.strerror or e}); the run goes on, with its figures "
                      "on the console only", file=sys.stderr)
            self.warned = True
        if console:
            print(" | ".join(format_field(k, v) for k, v in record.items()), flush=True)


def format_field(key, value):
    if isinstance(value, float):
        return f"{key} {value:.4g}" if abs(value) < 1e4 else f"{key} {value:.3e}"
    return f"{key} {value}"


def read_log(path):
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                pass  # a line cut short by a crash
    return records

def summary(name, records):
    """A run's figures in a few lines, for a terminal (a GPU box with no image viewer): its last logged step and
    loss, its lowest val loss and where, and every figure of its last evaluation."""
    number = lambda r, key: isinstance(r.get(key), (int, float))
    train = [r for r in records if r.get("kind") == "train" and number(r, "step")]
    evals = [r for r in records if r.get("kind") == "eval" and number(r, "step")]
    parts = [f"step {train[-1]['step']}" + (f", loss {train[-1]['loss']:.4g}" if number(train[-1], "loss") else "")
             ] if train else []
    vals = [(r["val_loss"], r["step"]) for r in evals if number(r, "val_loss")]
    if vals:
        lowest, at = min(vals)
        parts.append(f"lowest val_loss {lowest:.4g} at step {at}")
    lines = [f"{name}: " + ("; ".join(parts) or "no training step logged")]
    if evals:
        shown = [format_field(k, v) for k, v in evals[-1].items() if k not in ("kind", "step")]
        lines.append(f"  evaluation at step {evals[-1]['step']}: " + ", ".join(shown))
    return "\n".join(lines)

# -----------------------------------------------------------------------------
# plots


def series(records, kind, key):
    points = [(r["step"], r[key]) for r in records if r.get("kind") == kind and isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


# training series that jump from step to step; the learning rate, the temperature and the loss scale do not
NOISY = ("loss", "grad_norm", "samples_per_s", "mfu")


def smoothed(x, y, window_share=0.02):
    """A centred moving average over about window_share of the series' points: a long run's trend through its
    step-to-step noise, in step with it (an exponential average, TensorBoard's, lags behind a loss that falls
    fast early on). -> (x, y) of the points with a whole window around them: the ends, whose window would be
    cut, are left to the raw series drawn beside it."""
    half = max(1, int(window_share * len(y)) // 2)
    sums = np.concatenate([[0.0], np.cumsum(np.asarray(y, dtype=np.float64))])
    means = (sums[2 * half + 1:] - sums[:len(y) - 2 * half]) / (2 * half + 1)
    return x[half:len(x) - half], means


def split_metric(key):
    """zeroshot/color/top1 -> (zeroshot/color, top1); retrieval/image_to_text_R@5 -> (retrieval/image_to_text, R@5)."""
    if "_R@" in key:
        family, _, k = key.rpartition("_R@")
        return family, "R@" + k
    family, _, k = key.rpartition("/")
    return (family, k) if family else (key, key)


def eval_panels(records):
    """One panel per family of evaluation metrics, its k's as lines in order: zeroshot/color holds top1
    and top5; retrieval/image_to_text holds R@1, R@5, R@10."""
    keys = {k for r in records if r.get("kind") == "eval" for k in r if k not in ("kind", "step", "val_loss", "time")}
    families = {}
    for key in keys:
        families.setdefault(split_metric(key)[0], []).append(key)
    by_k = lambda key: (len(key), key)  # top1 < top5, R@5 < R@10
    return [(family, [("eval", key) for key in sorted(members, key=by_k)]) for family, members in sorted(families.items())]


def plot_runs(run_dirs, out_path):
    import matplotlib
    matplotlib.use("Agg")  # files only: works on a headless box
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    names = [os.path.basename(os.path.normpath(d)) or d for d in run_dirs]
    if len(set(names)) < len(set(map(os.path.normpath, run_dirs))):  # a/demo and b/demo: name them by path
        names = [os.path.normpath(d) for d in run_dirs]
    runs = {name: read_log(os.path.join(d, "log.jsonl")) for name, d in zip(names, run_dirs)}
    panels = [("loss", [("train", "loss"), ("eval", "val_loss")]), ("learning rate", [("train", "lr")]),
              ("grad norm", [("train", "grad_norm")]), ("temperature (logit scale)", [("train", "logit_scale")]),
              ("samples/s", [("train", "samples_per_s")])]
    # logged on GPUs; in fp16 runs; in SigLIP runs
    for title, key in (("MFU", "mfu"), ("fp16 loss scale", "loss_scale"), ("SigLIP bias", "logit_bias")):
        if any(series(records, "train", key)[0] for records in runs.values()):
            panels.append((title, [("train", key)]))
    panels += eval_panels([r for records in runs.values() for r in records])
    # every panel on the runs' whole span of steps: an evaluation's few points line up with the training curves
    # above them, instead of each panel zooming in on its own (a lone point at step 600 drawn from 570 to 630)
    steps = [r["step"] for records in runs.values() for r in records if isinstance(r.get("step"), (int, float))]
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for ax, (title, lines) in zip(axes.flat, panels):
        for r, (name, records) in enumerate(runs.items()):
            for j, (kind, key) in enumerate(lines):
                x, y = series(records, kind, key)
                if x:
                    label = f"{name} {split_metric(key)[1]}" if len(lines) > 1 else name
                    # several runs: a run keeps its colour in every panel, and a panel's metrics differ by
                    # line style; one run: a colour per metric
                    style = dict(color=f"C{r}", linestyle=("-", "--", ":", "-.")[j % 4]) if len(runs) > 1 \
                        else dict(color=f"C{j}")
                    if kind == "train" and key in NOISY and len(x) >= 100 and min(y) < max(y):  # faint, and its trend
                        ax.plot(x, y, alpha=0.25, linewidth=0.8, label="_" + label, **style)  # _: not in the legend
                        x, y = smoothed(x, y)
                    ax.plot(x, y, marker="o" if kind == "eval" else None, markersize=3, label=label, **style)
        ax.set_title(title)
        ax.set_xlabel("step")
        if steps:
            pad = max(1, 0.03 * (max(steps) - min(steps)))
            ax.set_xlim(min(steps) - pad, max(steps) + pad)
        ax.grid(alpha=0.3)
        if title == "loss" and any(series(r, "train", "loss")[1] for r in runs.values()):
            ax.set_yscale("log")
            # plain "2", "3" on a loss axis of less than a decade, where the default writes 2x10^0
            ax.yaxis.set_major_formatter(ticker.LogFormatter())
            ax.yaxis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False))
        if title == "fp16 loss scale":  # powers of two, halved at each overflow
            ax.set_yscale("log", base=2)
        if ax.lines:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def main(argv=None):
    p = argparse.ArgumentParser(description="Plot train/val loss, LR, grad norm, temperature and eval metrics.")
    # type=expanduser: `~` where the shell leaves it, after an = (--out=~/plots.png)
    p.add_argument("run_dirs", nargs="+", type=os.path.expanduser, help="run directories holding log.jsonl")
    p.add_argument("--out", default=None, type=os.path.expanduser,
                   help="PNG path, or a folder for its plots.png (default: RUN_DIR/plots.png of the first run)")
    args = p.parse_args(argv)
    # a run's log.jsonl itself, as a shell's completion gives it: its run directory
    args.run_dirs = [(os.path.dirname(d) or ".") if os.path.basename(d) == "log.jsonl" and os.path.isfile(d) else d
                     for d in args.run_dirs]
    logs = {}  # each run's records, read once for its warning and its summary
    for d in args.run_dirs:
        if not os.path.exists(os.path.join(d, "log.jsonl")):
            p.error(f"{d} has no log.jsonl: pass a run directory that train.py wrote (its --out_dir)")
        logs[d] = read_log(os.path.join(d, "log.jsonl"))
        if not logs[d]:  # a run that has just started: its plot would be blank
            print(f"warning: {os.path.join(d, 'log.jsonl')} holds no logged step yet (train.py writes one every "
                  "--log_interval steps): nothing of it to draw", file=sys.stderr)
    out = args.out or os.path.join(args.run_dirs[0], "plots.png")
    if os.path.isdir(out) or out.endswith(("/", os.sep)):  # --out figures/: the plot goes into that folder
        out = os.path.join(out, "plots.png")
    elif not os.path.splitext(out)[1]:  # matplotlib adds its default type; the path written is said as it is
        out += ".png"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)  # --out plots/compare.png
    except OSError as e:
        p.error(f"--out {out}: cannot create its folder ({e.strerror or e})")
    from matplotlib.figure import Figure
    kinds = Figure().canvas.get_supported_filetypes()
    kind = os.path.splitext(out)[1][1:].lower()
    if kind and kind not in kinds:  # --out plots.pgn: said now, not as a traceback after the drawing
        p.error(f"--out {out}: matplotlib writes {', '.join(sorted(kinds))}, not .{kind}")
    for d, records in logs.items():
        if records:  # an empty log was warned about above
            print(summary(d, records))
    try:
        print(f"wrote {plot_runs(args.run_dirs, out)}")
    except OSError as e:
        # a full disk (or quota), else a read-only disk or another user's folder
        fix = "make room there, or give --out another place" if disk_full(e) else "give --out a place you can write"
        sys.exit(f"could not write {out} ({e.strerror or e}): {fix}")


if __name__ == "__main__":
    main()
