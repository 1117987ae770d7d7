import atexit
import os
import shutil
import sys
import tempfile

# The suite checks exactness that only the CPU's kernels promise: a resumed run equal bit for bit to an
# uninterrupted one, two DDP processes (gloo) equal to one. On a GPU box those runs would otherwise pick
# CUDA, whose kernels (split-K matmuls, atomic adds in some backward kernels) may differ in
# the last bits from run to run, and two ranks cannot share one GPU under NCCL. So the tests run on the
# CPU everywhere; set before torch is imported, it reaches the subprocesses (torchrun) too. The GPU path
# is exercised by setup_gpu.sh's smoke test, by benchmarks/train_paths.py (every training path for a few steps)
# and by the other benchmarks.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

# `datasets` keeps a lock file and an Arrow copy of every set it reads in its cache (~/.cache/huggingface):
# the tests' small sets go to a folder of their own instead, removed when the run ends, so that the suite
# leaves nothing in the user's cache. Set before `datasets` is imported; the subprocesses inherit it too
_datasets_cache = tempfile.mkdtemp(prefix="clip-tests-datasets-")
os.environ["HF_DATASETS_CACHE"] = _datasets_cache
atexit.register(shutil.rmtree, _datasets_cache, ignore_errors=True)

# the project is a set of flat scripts, imported from the repository root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
