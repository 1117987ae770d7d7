import os
import platform
import re
import subprocess
import sys

import pytest

from clip import get_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_training_step_benchmark_reports_throughput_and_mfu():
    # our side only (OpenCLIP lives in a separate environment); one short round, with size overrides
    out = run("bench.py", "--model", "tiny", "--batch_size", "8", "--sides", "ours,ours-patch-dropout", "--rounds", "1",
              "--steps", "1", "--warmup", "1", "--patch_size", "32", "--text_layers", "2")
    assert repr(get_config("tiny", patch_size=32, text_layers=2)) in out.splitlines()
    for side in ("ours ", "ours-patch-dropout "):  # and the same step leaving out half of each image's patches
        line = next(l for l in out.splitlines() if l.startswith(side))
        samples_per_s, mfu = re.search(r"([\d.]+) samples/s .* MFU ([\d.]+)%", line).groups()
        assert float(samples_per_s) > 0 and 0 < float(mfu) < 200
    assert "GFLOP per sample" in out and "measured 2048^3 fp32 torch.mm" in out
    # bf16 steps on a CPU are measured against the CPU's bf16 matmul rate, not its fp32 one
    # beside the same model with every attention through SDPA's kernels (what clip.attention leaves in bf16)
    out = run("bench.py", "--model", "tiny", "--batch_size", "8", "--sides", "ours,ours-sdpa", "--rounds", "1",
              "--steps", "1", "--warmup", "1", "--patch_size", "32", "--text_layers", "1", "--vision_layers", "1",
              "--precision", "bf16")
    # (at 2048^3, or smaller where this CPU emulates bf16 and a 2048^3 product would take over 2 s)
    assert "bf16" in out.splitlines()[1] and re.search(r"measured (2048|1024|512|256)\^3 bf16 torch.mm", out)
    rates = dict(re.findall(r"^(ours|ours-sdpa)\s+([\d.]+) samples/s", out, flags=re.M))
    assert set(rates) == {"ours", "ours-sdpa"} and all(float(v) > 0 for v in rates.values())
    # fp16, what train.py picks on a V100 or T4: the step runs with its loss scaler
    out = run("bench.py", "--model", "tiny", "--batch_size", "8", "--sides", "ours", "--rounds", "1", "--steps", "1",
              "--warmup", "1", "--patch_size", "32", "--text_layers", "1", "--vision_layers", "1", "--precision", "fp16")
    assert ", fp16, " in out and re.search(r"measured (2048|1024|512|256)\^3 fp16 torch.mm", out)
    assert float(re.search(r"^ours\s+([\d.]+) samples/s", out, flags=re.M)[1]) > 0


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the kept-memory allocator setting is glibc's")
def test_token_table_benchmark_reports_every_part():
    out = run("bench_embedding.py", "--width", "16", "--tokens", "64", "--rounds", "1", "--reps", "1")
    parts = dict(re.findall(r"^(.+?)\s+([\d.]+) ms a step", out, flags=re.M))
    assert set(parts) == {"gradient, default allocator", "gradient, freed memory kept", "gradient, sparse into kept",
                          "AdamW fused", "AdamW foreach", "AdamW per-tensor loop"}
    assert all(float(v) > 0 for v in parts.values())


def test_prep_benchmark_reports_both_decodes():
    out = run("bench_prep.py", "--sizes", "640x480", "--image_size", "64", "--images", "2", "--rounds", "1")
    fast, slow, ratio = re.search(r"640x480 -> 64 px: reduced-scale decode\s+([\d.]+) img/s \| full-size decode\s+"
                                  r"([\d.]+) img/s \| ([\d.]+)x", out).groups()
    assert float(fast) > 0 and float(slow) > 0 and float(ratio) > 0


def test_loader_benchmark_reports_ours_the_plain_pipeline_and_training_crops():
    out = run("bench_loader.py", "--n", "64", "--sizes", "64", "--repeats", "1")
    figures = re.search(r"64 px: ours\s+([\d.]+) img/s/worker \| plain webdataset\+PIL\s+([\d.]+) img/s/worker \| "
                        r"ratio ([\d.]+)x \| ours with training's random crop\s+([\d.]+) img/s/worker", out)
    assert figures and all(float(v) > 0 for v in figures.groups())
    tokenise = re.search(r"tokenise 256 captions: ours ([\d.]+) ms \| encode_ordinary_batch ([\d.]+) ms", out)
    assert tokenise and float(tokenise.group(1)) > 0
    index = re.search(r"index (\d+) samples: ours ([\d.]+) s \| tarfile ([\d.]+) s", out)
    assert index and int(index.group(1)) > 64 and float(index.group(3)) > 0


def test_step_profile_checks_the_fast_paths_and_splits_the_time():
    out = run("profile_step.py", "--model", "tiny", "--batch_size", "16", "--check_batch_size", "8", "--compile", "false",
              "--top", "5")
    # bf16 autocast against the fp32 reference: close (bf16 rounding), and not identical (it did run in bf16)
    err = float(re.search(r"eager bf16 .* all ([\d.e+-]+),", out).group(1))
    assert 1e-5 < err < 0.1
    # on a CPU: attention in bf16 at the model's shapes, SDPA against clip.attention's plain path
    paths = re.findall(r"^  (vision|text)\s+(\d+) positions: SDPA\s+([\d.]+) \| clip.attention \(([^)]+)\)\s+([\d.]+)", out, flags=re.M)
    assert [(t, n, path) for t, n, _, path, _ in paths] == [("vision", "17", "matmul-softmax-matmul"),
                                                            ("text", "32", "matmul-softmax-matmul")]
    assert all(float(a) > 0 and float(b) > 0 for _, _, a, _, b in paths)
    total = float(re.search(r"operator time ([\d.]+) ms a step", out).group(1))
    kinds = dict((k.strip(), float(v)) for k, v in re.findall(r"^  (\D+?)\s+([\d.]+) ms\s+[\d.]+%$", out, flags=re.M))
    assert {"matmul", "attention", "optimizer, clipping"} <= set(kinds)
    assert sum(kinds.values()) == pytest.approx(total, rel=0.01)
    assert min(kinds.values()) > 0
    # on a CPU: the matmuls' rate against the machine's own 2048^3 rate, and by shape
    share = float(re.search(r"^matmuls: [\d.]+ ms a step at [\d.]+ GFLOP/s, ([\d.]+)% of the \d+\^3 rate", out,
                            flags=re.M).group(1))
    assert 0 < share < 300
    assert re.search(r"^\s+[\d.]+ ms\s+\d+x\s+[\d.]+ GFLOP/s\s+[\d.]+%\s+aten::(add)?mm \[", out, flags=re.M)


def test_zeroshot_benchmark_reports_each_worker_count():
    out = run("bench_zeroshot.py", "--images", "8", "--workers", "0", "1", "--rounds", "1", "--batch_size", "4",
              "--decode", "reduced,full")
    rates = re.findall(r"tiny, 64 px: (\d) workers, (\w+) decode\s+([\d.]+) img/s \| [\d.]+x 0 workers, reduced", out)
    assert {(w, d) for w, d, _ in rates} == {("0", "reduced"), ("0", "full"), ("1", "reduced"), ("1", "full")}
    assert all(float(v) > 0 for _, _, v in rates)


def test_lit_benchmark_times_both_second_passes_after_checking_their_gradients_agree():
    # (the script stops if the two sides' gradients differ; the text tower locked is checked in test_train.py)
    out = run("bench_lit.py", "--model", "tiny", "--batch_size", "16", "--micro_batch_size", "4", "--rounds", "1",
              "--steps", "1")
    assert "image tower locked" in out
    rates = dict(re.findall(r"^(locked tower left out|locked tower run again)\s+([\d.]+) samples/s", out, re.M))
    assert len(rates) == 2 and all(float(v) > 0 for v in rates.values())
    assert re.search(r"^ratio: [\d.]+x$", out, re.M)


def test_download_benchmark_times_prep_on_urls_both_ways():
    import socket
    with socket.socket() as s:  # a port free now, for the benchmark's local web server
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = run("bench_download.py", "--images", "40", "--latency", "0.05", "--chunk_size", "20", "--rounds", "1",
              "--port", str(port))
    times = dict(re.findall(r"^(overlapped|whole chunk first)\s+([\d.]+) s", out, re.M))
    assert len(times) == 2 and all(float(v) > 0 for v in times.values())
    assert out.count("wrote 40 train + 0 val samples") == 2 and "skipped 0 of 40" in out  # every image came


def test_evaluation_benchmark_checks_both_ways_agree_then_times_them(tmp_path):
    # under torchrun, as training runs: 2 gloo ranks (the script stops if the two ways' figures differ)
    import prep_dataset
    prep_dataset.main(["--source", "shapes", "--out_dir", str(tmp_path / "shapes"), "--limit", "200",
                       "--val_fraction", "0.3", "--num_workers", "1"])
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          os.path.join(ROOT, "benchmarks", "bench_eval.py"), "--data_dir", str(tmp_path / "shapes"),
                          "--rounds", "1", "--batch_size", "16"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "2 ranks" in out.stdout and "retrieval/image_to_text_R@1" in out.stdout
    seconds = dict(re.findall(r"^(every rank its part|rank 0 alone)\s+([\d.]+) s per evaluation", out.stdout, re.M))
    assert len(seconds) == 2 and all(float(v) > 0 for v in seconds.values())
    assert re.search(r"^ratio: [\d.]+x$", out.stdout, re.M)


def test_train_paths_runs_each_path_and_checks_what_it_promises():
    # on the CPU: the resumed run equal bit for bit, the locked image tower unchanged (LiT starts from default's run)
    out = run("train_paths.py", "--device", "cpu", "--steps", "6", "--batch_size", "32", "--paths", "resume,lit")
    rows = dict(re.findall(r"^(\w+)\s+(ok|FAILED)\s+[\d.]+ s", out, flags=re.M))
    assert rows == {"default": "ok", "resume": "ok", "lit": "ok"}, out
    assert "final weights equal bit for bit" in out and "image tower unchanged, text tower trained" in out
    assert out.rstrip().endswith("every path ran")
