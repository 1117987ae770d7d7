import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "setup_gpu.sh")


def run(*args):
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_help_and_unknown_options():
    out = run("--help")
    assert out.returncode == 0 and "--dry-run" in out.stdout and "--cpu-smoke" in out.stdout
    assert run("--bogus").returncode == 2


def test_dry_run_changes_nothing(tmp_path):
    venv = tmp_path / "venv"
    out = run("--dry-run", "--venv", str(venv))
    assert out.returncode == 0, out.stderr
    assert "+ python3 -m venv" in out.stdout and "requirements.txt" in out.stdout and "train.py" in out.stdout
    assert not venv.exists()


def test_cpu_smoke_runs_a_real_training_step():
    # reuses the environment the tests run in (as a second run of the script on a GPU box would)
    out = run("--cpu-smoke", "--venv", sys.prefix)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"reusing {sys.prefix}" in out.stdout
    assert "kind train | step 1 " in out.stdout and "saved " in out.stdout and "ready:" in out.stdout


def test_a_gpu_torch_cannot_use_says_why(tmp_path):
    # a GPU box whose driver runs CUDA 12.8, with torch's default CUDA 13 build: the usual newcomer's failure,
    # where torch only warns and sees no GPU. A stand-in nvidia-smi and torch stand for the box
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text('#!/bin/sh\nif [ -n "$1" ]; then echo "0, NVIDIA H100 80GB HBM3, 570.86.15, 81559 MiB"; else\n'
                   'echo "| NVIDIA-SMI 570.86.15   Driver Version: 570.86.15   CUDA Version: 12.8 |"; fi\n')
    smi.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    for build, cuda in (("cu130", "'13.0'"), ("cpu", "None")):  # and the same box with a CPU build, run alongside
        (tmp_path / build / "torch").mkdir(parents=True)
        (tmp_path / build / "torch" / "__init__.py").write_text(
            f"__version__ = '2.13.0+{build}'\n"
            f"class version:\n    cuda, hip = {cuda}, None\n"
            "class cuda:\n    is_available = staticmethod(lambda: False)\n    device_count = staticmethod(lambda: 0)\n")
    runs = [subprocess.Popen(["bash", SCRIPT, "--venv", sys.prefix], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=ROOT, env={**env, "PYTHONPATH": str(tmp_path / build)})
            for build in ("cu130", "cpu")]
    (cuda13, cuda13_err), (cpu, cpu_err) = (r.communicate(timeout=600) for r in runs)
    assert runs[0].returncode == 1, cuda13[-2000:] + cuda13_err[-2000:]
    assert "the driver runs CUDA up to 12.8" in cuda13
    assert "built for CUDA 13.0, and this driver runs CUDA up to 12.8" in cuda13_err
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126" in cuda13_err
    assert runs[1].returncode == 1 and "is a CPU build" in cpu_err, cpu_err[-2000:]
    # the rerun it suggests replaces the torch already there (pip alone would keep it as torch==2.13.0)
    out = subprocess.run(["bash", SCRIPT, "--venv", sys.prefix, "--dry-run"], capture_output=True, text=True, cwd=ROOT,
                         timeout=600, env={**env, "TORCH_INDEX_URL": "https://download.pytorch.org/whl/cu126",
                                           "PYTHONPATH": str(tmp_path / "cu130")})
    assert "pip uninstall -q -y torch" in out.stdout and "--index-url https://download.pytorch.org/whl/cu126" in out.stdout
    # and keeps a torch from the index named (a rerun after the fix): nothing to install again
    out = subprocess.run(["bash", SCRIPT, "--venv", sys.prefix, "--dry-run"], capture_output=True, text=True, cwd=ROOT,
                         timeout=600, env={**env, "TORCH_INDEX_URL": "https://download.pytorch.org/whl/cu130/",
                                           "PYTHONPATH": str(tmp_path / "cu130")})
    assert out.returncode == 0 and "requirements.txt" in out.stdout and "torch==2.13.0" not in out.stdout


def test_an_amd_gpu_is_sent_to_torch_for_rocm(tmp_path):
    # torch from PyPI cannot use an AMD GPU: the script says where the ROCm build comes from, before installing
    smi = tmp_path / "rocm-smi"
    smi.write_text('#!/bin/sh\necho "GPU[0] : Card Series: AMD Instinct MI300X"\n')
    smi.chmod(0o755)
    out = subprocess.run(["bash", SCRIPT, "--venv", str(tmp_path / "venv")], capture_output=True, text=True, cwd=ROOT,
                         timeout=600, env={**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"})
    assert out.returncode == 1 and "AMD Instinct MI300X" in out.stdout
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/rocm" in out.stderr
    assert not (tmp_path / "venv").exists()


def test_a_fresh_box_with_a_cuda_12_driver_gets_torch_for_cuda_12(tmp_path):
    # most cloud images run a CUDA 12 driver, which PyPI's torch (CUDA 13) cannot use: a fresh environment takes
    # PyTorch's own CUDA 12 build of the same torch at once, instead of installing one that sees no GPU
    def box(cuda):
        bin_dir = tmp_path / cuda
        bin_dir.mkdir()
        smi = bin_dir / "nvidia-smi"
        smi.write_text(f'#!/bin/sh\nif [ -n "$1" ]; then echo "0, NVIDIA B200, 570.86.15, 183359 MiB"; else\n'
                       f'echo "| NVIDIA-SMI 570.86.15   Driver Version: 570.86.15   CUDA Version: {cuda} |"; fi\n')
        smi.chmod(0o755)
        return subprocess.run(["bash", SCRIPT, "--venv", str(tmp_path / "fresh"), "--dry-run"], capture_output=True,
                              text=True, cwd=ROOT, timeout=600,
                              env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    out = box("12.8")
    assert out.returncode == 0, out.stderr
    assert "the driver runs CUDA 12.8: torch from https://download.pytorch.org/whl/cu128" in out.stdout
    assert "pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" in out.stdout
    # a CUDA 13 driver takes PyPI's torch, as requirements.txt pins it; one older than CUDA 12 cannot run torch 2.13
    out = box("13.0")
    assert out.returncode == 0 and "--index-url" not in out.stdout and "requirements.txt" in out.stdout
    out = box("11.4")
    assert out.returncode == 1 and "update the NVIDIA driver" in out.stderr
    assert not (tmp_path / "fresh").exists()
    # not a dry run: PyTorch's index is asked which CUDA 12 build it has. A stand-in environment whose python has no
    # torch, answers `pip index` with a cu126 build only, and records what pip is asked to install
    venv = tmp_path / "standin"
    (venv / "bin").mkdir(parents=True)
    calls = tmp_path / "calls.txt"
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n'
                      'if [ "$1" = "-c" ] || [ "$1" = "-" ]; then exit 1; fi\n'  # no torch to import
                      'case "$*" in *"index versions torch"*cu126*) echo "torch (2.13.0+cu126)";; esac\n')
    python.chmod(0o755)
    smi = tmp_path / "12.8" / "nvidia-smi"
    run = subprocess.run(["bash", SCRIPT, "--venv", str(venv)], capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env={**os.environ, "PATH": f"{smi.parent}{os.pathsep}{os.environ['PATH']}"})
    asked = calls.read_text().splitlines()
    lookups = [line for line in asked if "index versions torch" in line]
    assert [line.rsplit("/", 1)[-1] for line in lookups] == ["cu128", "cu126"], asked  # cu128 first, none there
    assert "-m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126" in asked
    assert "torch from https://download.pytorch.org/whl/cu126" in run.stdout
