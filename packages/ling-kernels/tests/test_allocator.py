"""`keep_freed_memory` / `release_freed_memory`: measured by page faults in a fresh process
(the settings are process-global, so they must not leak into the pytest process)."""

import platform
import subprocess
import sys

import pytest

# A training step in miniature: allocate 64 x 1 MiB tensors, touch them, free them all, three
# times; count the minor page faults of the third round (steady state). With glibc's fixed
# default thresholds (`release_freed_memory`) the freed 64 MiB at the top of the heap goes back
# to the OS, so each round faults in 16384 fresh pages; with `keep_freed_memory` it is reused.
SCRIPT = """
import resource, sys
import torch
from ling_kernels.allocator import keep_freed_memory, release_freed_memory
setting = sys.argv[1]
applied = {"keep": keep_freed_memory, "release": release_freed_memory, "none": lambda: None}[setting]()
torch.set_num_threads(1)
def step():
    tensors = [torch.empty(2**20, dtype=torch.uint8) for _ in range(64)]
    for t in tensors:
        t.fill_(1)
for _ in range(2):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults_on_reuse(setting: str) -> tuple[str, int]:
    result = subprocess.run([sys.executable, "-c", SCRIPT, setting], capture_output=True,
                            text=True, timeout=120, check=True)
    applied, faults = result.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_memory_reuses_freed_blocks_and_release_undoes_it():
    applied, kept_faults = faults_on_reuse("keep")
    assert applied == "True"
    assert kept_faults < 1024  # 64 MiB is 16384 pages; reused memory faults (almost) none
    # glibc's untouched defaults adapt their thresholds to the sizes freed (2016 faults here,
    # glibc 2.36), so the opt-out is checked against the fixed defaults it sets: every round
    # faults its 64 MiB in again.
    _, released_faults = faults_on_reuse("release")
    assert released_faults > 8192, released_faults


def test_no_op_off_glibc(monkeypatch):
    from ling_kernels import allocator

    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    assert allocator.keep_freed_memory() is False
    assert allocator.release_freed_memory() is False
