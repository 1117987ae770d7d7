import os
import sys

# The suite checks exactness that only the CPU's kernels promise: a resumed run equal bit for bit to an
# uninterrupted one, two DDP processes (gloo) equal to one. On a GPU box those runs would otherwise pick
# CUDA, whose kernels (split-K matmuls, atomic adds in some backward kernels) may differ in
# the last bits from run to run, and two ranks cannot share one GPU under NCCL. So the tests run on the
# CPU everywhere; set before torch is imported, it reaches the subprocesses (torchrun) too. The GPU path
# is exercised by setup_gpu.sh's smoke test and by benchmarks/.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

# the project is a set of flat scripts, imported from the repository root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
