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
