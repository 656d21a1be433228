"""`keep_freed_memory` / `release_freed_memory`: measured by page faults in a fresh process
(the settings are process-global, so they must not leak into the pytest process)."""

import os
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


# The default path: a CPU grouped GEMM under autograd turns keep_freed_memory on by itself.
# Observed without timing: glibc's mallinfo2 counts the bytes it holds in mmapped blocks; a
# 16 MiB tensor is mmapped under the defaults (threshold 128 KiB in a fresh process) and comes
# from the reusable heap once the threshold is 32 MiB.
MMAPPED_BYTES_OF_A_16_MIB_TENSOR = """
import ctypes, sys
import torch
from ling_kernels import grouped_mm
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
x = torch.randn(8, 4, requires_grad=True)
grouped_mm(x, torch.randn(2, 3, 4), [5, 3]).sum().backward()
before = libc.mallinfo2().hblkhd
tensor = torch.empty(2**24, dtype=torch.uint8)
print(libc.mallinfo2().hblkhd - before)
"""


def mmapped_bytes_of_a_16_mib_tensor(malloc_setting: str) -> int:
    env = {**os.environ, "LING_KERNELS_MALLOC": malloc_setting}
    result = subprocess.run([sys.executable, "-c", MMAPPED_BYTES_OF_A_16_MIB_TENSOR], capture_output=True,
                            text=True, timeout=120, check=True, env=env)
    return int(result.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_a_cpu_training_op_keeps_freed_memory_without_being_asked():
    assert mmapped_bytes_of_a_16_mib_tensor("keep") == 0
    assert mmapped_bytes_of_a_16_mib_tensor("default") >= 2**24  # the control: glibc's own threshold


@pytest.fixture
def calls(monkeypatch):
    """Counts keep_freed_memory() calls made through keep_freed_memory_for_training, in a
    process that has not decided yet (the real mallopt is never called here)."""
    from ling_kernels import allocator

    made = []
    monkeypatch.setattr(allocator, "_decided", False)
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: made.append(1) or True)
    monkeypatch.setattr(allocator, "_glibc", lambda: None)  # release_freed_memory: no-op here
    monkeypatch.delenv(allocator.ENV_VAR, raising=False)
    return made


def _grouped_step(requires_grad: bool = True) -> None:
    import torch

    from ling_kernels import grouped_mm

    x = torch.randn(6, 4, requires_grad=requires_grad)
    out = grouped_mm(x, torch.randn(3, 5, 4), [1, 0, 5])
    if requires_grad:
        out.sum().backward()


def test_training_ops_apply_it_once_and_inference_never(calls, monkeypatch):
    import torch

    from ling_kernels import fused_linear_cross_entropy

    from ling_kernels import allocator

    monkeypatch.setenv("LING_KERNELS", "auto")
    with torch.no_grad():
        _grouped_step(requires_grad=False)
        fused_linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 2, 3, 4]))
    _grouped_step(requires_grad=False)  # grad mode on, but nothing needs a gradient: inference
    assert calls == []
    _grouped_step()
    _grouped_step()
    assert calls == [1]
    monkeypatch.setattr(allocator, "_decided", False)
    loss, _ = fused_linear_cross_entropy(torch.randn(4, 8, requires_grad=True), torch.randn(10, 8),
                                         torch.tensor([1, 2, 3, 4]))
    assert calls == [1, 1]


def test_the_environment_or_release_opts_out(calls, monkeypatch):
    from ling_kernels import allocator

    monkeypatch.setenv(allocator.ENV_VAR, "default")
    _grouped_step()
    assert calls == []
    monkeypatch.setattr(allocator, "_decided", False)
    monkeypatch.delenv(allocator.ENV_VAR)
    allocator.release_freed_memory()
    _grouped_step()
    assert calls == []
    monkeypatch.setattr(allocator, "_decided", False)
    monkeypatch.setenv(allocator.ENV_VAR, "sometimes")
    with pytest.raises(ValueError, match="LING_KERNELS_MALLOC='sometimes'.*keep, default"):
        _grouped_step()
