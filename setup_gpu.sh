#!/usr/bin/env bash
# Prepares a fresh Linux GPU box for training: checks the NVIDIA driver, creates a virtual environment,
# installs torch (a CUDA build) and the requirements, lists the GPUs, and runs a one-step training smoke
# test on the GPU. Safe to run again: it reuses what is already there.
#
#   bash setup_gpu.sh                 # everything, venv in .venv
#   bash setup_gpu.sh --venv ~/envs/clip
#   bash setup_gpu.sh --dry-run       # print what it would do, change nothing
#   bash setup_gpu.sh --cpu-smoke     # no GPU needed: the same steps, smoke test on the CPU
#
# Then: source .venv/bin/activate && torchrun --standalone --nproc_per_node=gpu train.py
set -euo pipefail

usage() { grep '^#' "$0" | sed -n '2,11p' | sed 's/^# \{0,1\}//'; }

VENV=".venv"
DRY=0
CPU=0
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) VENV="${2:?--venv needs a directory}"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --cpu-smoke) CPU=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")"
run() {  # echo each step; in a dry run, only echo
  echo "+ $*"
  if [ "$DRY" = 0 ]; then "$@"; fi
}

echo "== 1/5 driver"
if [ "$CPU" = 1 ]; then
  echo "--cpu-smoke: not checking for a GPU"
elif command -v nvidia-smi >/dev/null 2>&1; then
  run nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv
  # the newest CUDA this driver runs (nvidia-smi's header), for step 4's check against torch's CUDA
  DRIVER_CUDA="$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9.]*\).*/\1/p' | head -n 1)"
  echo "the driver runs CUDA up to ${DRIVER_CUDA:-?}"
elif command -v rocm-smi >/dev/null 2>&1; then
  # an AMD GPU: torch's ROCm build comes from PyTorch's own index, for the ROCm version installed
  run rocm-smi --showproductname
  if [ -z "${TORCH_INDEX_URL:-}" ] && [ "$DRY" = 0 ]; then
    echo "an AMD GPU (ROCm): torch==2.13.0 from PyPI is built for NVIDIA's CUDA. Rerun with PyTorch's index of the" >&2
    echo "ROCm build that matches your ROCm (pytorch.org lists them): TORCH_INDEX_URL=https://download.pytorch.org/whl/rocmX.Y bash setup_gpu.sh" >&2
    exit 1
  fi
elif [ "$DRY" = 1 ]; then
  echo "(dry run) nvidia-smi not found: a real run would stop here"
else
  echo "nvidia-smi (or rocm-smi) not found: install the NVIDIA driver first (e.g. 'sudo apt install nvidia-driver-580'," >&2
  echo "then reboot), or use --cpu-smoke to check the rest of the setup without a GPU." >&2
  exit 1
fi

echo "== 2/5 virtual environment: $VENV"
PYTHON="${PYTHON:-python3}"
if [ -x "$VENV/bin/python" ]; then
  echo "reusing $VENV"
else
  run "$PYTHON" -m venv "$VENV"
  run "$VENV/bin/python" -m pip install -q --upgrade pip
fi
PY="$VENV/bin/python"

echo "== 3/5 packages"
# torch==2.13.0 from PyPI is a CUDA 13 build on Linux x86_64, which needs a 580 driver or newer; set TORCH_INDEX_URL
# for another CUDA version, e.g. TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
DRIVER_MAJOR="${DRIVER_CUDA:-}"; DRIVER_MAJOR="${DRIVER_MAJOR%%.*}"
if [ -z "${TORCH_INDEX_URL:-}" ] && [ -n "$DRIVER_MAJOR" ] && [ "$DRIVER_MAJOR" -lt 13 ] \
    && ! "$PY" -c "import torch" 2>/dev/null; then
  # a fresh environment on a CUDA 12 driver (most cloud images): PyTorch's own CUDA 12 build of the same torch
  # instead of PyPI's, which would install and then see no GPU. cu128 first: Blackwell GPUs need CUDA 12.8
  if [ "$DRIVER_MAJOR" -lt 12 ]; then
    echo "this driver runs CUDA up to $DRIVER_CUDA; torch 2.13.0 needs CUDA 12 or newer: update the NVIDIA driver" >&2
    echo "(e.g. 'sudo apt install nvidia-driver-580', then reboot) and run this script again." >&2
    exit 1
  fi
  for BUILD in cu128 cu126; do
    if [ "$DRY" = 1 ] || "$PY" -m pip index versions torch --index-url "https://download.pytorch.org/whl/$BUILD" \
        2>/dev/null | grep -q "2\.13\.0"; then
      TORCH_INDEX_URL="https://download.pytorch.org/whl/$BUILD"
      break
    fi
  done
  if [ -z "${TORCH_INDEX_URL:-}" ]; then
    echo "PyTorch's index lists no CUDA 12 build of torch 2.13.0 (cu128, cu126), and PyPI's CUDA 13 build needs a" >&2
    echo "driver of 580 or newer: update the driver, or name a build with TORCH_INDEX_URL=... bash setup_gpu.sh" >&2
    exit 1
  fi
  echo "the driver runs CUDA $DRIVER_CUDA: torch from $TORCH_INDEX_URL (PyPI's build is for CUDA 13)"
fi
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  # a torch already installed from elsewhere (a rerun, after a CUDA build the driver could not run) is
  # replaced: pip would otherwise take it for the torch==2.13.0 asked for
  if ! "$PY" -c "import sys, torch; sys.exit(not torch.__version__.endswith('+' + '${TORCH_INDEX_URL%/}'.rsplit('/', 1)[-1]))" 2>/dev/null; then
    if "$PY" -c "import torch" 2>/dev/null; then run "$PY" -m pip uninstall -q -y torch; fi
    run "$PY" -m pip install -q torch==2.13.0 --index-url "$TORCH_INDEX_URL"
  fi
fi
run "$PY" -m pip install -q -r requirements.txt  # a no-op when everything is already there

echo "== 4/5 devices"
# compute capability: 8.0 on trains in bf16, 7.x in fp16 with a loss scale, below that in fp32 (train.py says which)
run "$PY" -c "import torch; n = torch.cuda.device_count(); print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, {n} GPU(s)'); [print(f'  cuda:{i} {torch.cuda.get_device_name(i)}, compute capability %d.%d' % torch.cuda.get_device_capability(i)) for i in range(n)]"
if [ "$CPU" = 0 ] && [ "$DRY" = 0 ]; then
  # no GPU seen: say why, of the usual reasons (a CPU build of torch, a driver older than torch's CUDA)
  "$PY" - "${DRIVER_CUDA:-}" <<'EOF'
import sys, torch
if torch.cuda.is_available():
    sys.exit(0)
driver, cuda = sys.argv[1], torch.version.cuda or torch.version.hip
major = lambda version: int(version.split(".")[0])
if cuda is None:
    why = (f"torch {torch.__version__} is a CPU build. Install a CUDA build: TORCH_INDEX_URL="
           "https://download.pytorch.org/whl/cu130 bash setup_gpu.sh (cu126 for a driver of CUDA 12)")
elif driver and torch.version.cuda and major(driver) < major(cuda):
    # CUDA runs on any driver of its major version or newer (minor version compatibility), not on an older one
    why = (f"torch {torch.__version__} is built for CUDA {cuda}, and this driver runs CUDA up to {driver}. Update "
           f"the driver (CUDA 13 needs 580 or newer), or install torch for the driver's CUDA"
           + (": TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 bash setup_gpu.sh" if major(driver) == 12 else ""))
else:
    why = (f"torch {torch.__version__} (CUDA {cuda}) found no usable GPU: check that nvidia-smi lists it, that "
           "CUDA_VISIBLE_DEVICES does not hide it, and torch's warning above")
sys.exit("torch sees no GPU: " + why)
EOF
fi

echo "== 5/5 smoke test: one training step of the tiny model"
SMOKE="$(mktemp -d)"
trap 'rm -rf "$SMOKE"' EXIT
run "$PY" prep_dataset.py --source shapes --out_dir "$SMOKE/shapes" --limit 256 --num_workers 2
run "$PY" train.py --model tiny --data_dir "$SMOKE/shapes" --out_dir "$SMOKE/run" --batch_size 32 --max_steps 1 \
    --num_workers 1 --log_interval 1 --eval_interval 1 --eval_batches 1 --checkpoint_interval 1 --compile false
echo "ready: source $VENV/bin/activate"
[ "$CPU" = 1 ] || echo "then python benchmarks/train_paths.py runs every training path on the GPU for a few steps"
