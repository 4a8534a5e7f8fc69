"""reuse_freed_memory: glibc keeps freed blocks, so repeated large allocations stop faulting."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import ctypes, resource, sys, torch
from difflab.training.memory import reuse_freed_memory
# Start from glibc's initial thresholds (128 KiB; they adapt upwards as a process runs, so
# a fresh interpreter may already have moved them): blocks above go back to the kernel.
mallopt = ctypes.CDLL(None).mallopt
assert mallopt(-3, 128 * 1024) and mallopt(-1, 128 * 1024)  # M_MMAP_, M_TRIM_THRESHOLD
if sys.argv[1] == "reuse":
    assert reuse_freed_memory() and reuse_freed_memory()  # idempotent
x = torch.randn(1 << 21)  # 8 MiB


def step():  # like a training step: many activations alive at once, then all freed
    blocks = [x * k for k in range(10)]  # 80 MiB
    del blocks


for _ in range(3):
    step()
counts = []
for _ in range(10):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(sorted(counts)[len(counts) // 2])  # the median step: one-off growth aside
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
@pytest.mark.slow
def test_repeated_allocations_stop_faulting():
    def faults(mode):  # a fresh process each: the setting is process-wide
        out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True,
                             text=True, check=True)
        return float(out.stdout.split()[-1])

    # With glibc's initial thresholds the 80 MiB go back to the kernel after every step and
    # fault in again (20480 pages); with reuse_freed_memory they stay in the heap.
    assert faults("default") > 10000
    assert faults("reuse") < 100
