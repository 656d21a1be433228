"""Tell glibc's malloc to keep freed memory in the process (CPU training), or to give it back.

Why: a CPU training step allocates fresh gradients and activations (0.55 GB of expert
gradients alone in the benchmark MoE block) and frees them at the end of the step. With
glibc's defaults, big blocks are `mmap`ed and unmapped on free, and the top of the heap is
trimmed, so the next step gets brand-new pages from the kernel and page-faults on every one of
them (77-230k minor faults per block fwd+bwd, ~10% of its time; `benchmarks/README.md`).
Setting `MALLOC_TRIM_THRESHOLD_` / `MALLOC_MMAP_THRESHOLD_` only works before the process
starts; `mallopt` does the same at run time.

- `keep_freed_memory()`: `mallopt(M_TRIM_THRESHOLD, -1)` (never trim the heap; "-1 disables
  trimming completely", mallopt(3)) and `mallopt(M_MMAP_THRESHOLD, 32 MiB)` (the largest value
  glibc accepts on 64-bit: blocks up to 32 MiB come from the heap and are reused, not
  unmapped). Blocks above 32 MiB are still mmapped and still fault; the cost is that the
  process's resident memory stays at its high-water mark instead of shrinking between steps.
- `release_freed_memory()`: the opt-out, for a process that wants memory back (e.g. before an
  evaluation in another process): glibc's documented default thresholds (128 KiB; setting
  them explicitly turns off glibc's own dynamic adjustment) and `malloc_trim(0)`.

Both are no-ops returning False where the C library is not glibc (macOS, musl, Windows), so
callers need no platform checks. Process-global state: call once, at the start of a run.

The default path applies it without being asked: `keep_freed_memory_for_training()`, called by
the CPU fast paths that allocate a step's gradients (the grouped GEMM of the MoE experts, the
fused cross-entropy) when they run under autograd, calls `keep_freed_memory()` once per process.
So a user's own training loop over ling-core's model gets the same allocator as ling-train,
and inference (no autograd) leaves malloc alone. `LING_KERNELS_MALLOC=default` in the
environment, or a call to `release_freed_memory()`, opts the process out.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

import torch

__all__ = ["keep_freed_memory", "keep_freed_memory_for_training", "keep_freed_memory_if_training",
           "release_freed_memory"]

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc malloc.h
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit glibc
_GLIBC_DEFAULT_THRESHOLD = 128 * 1024  # DEFAULT_MMAP_THRESHOLD_MIN / DEFAULT_TRIM_THRESHOLD
ENV_VAR = "LING_KERNELS_MALLOC"
ENV_VALUES = ("keep", "default")
_decided = False  # keep_freed_memory_for_training has acted (or was opted out of) in this process


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _mallopt(libc: ctypes.CDLL, param: int, value: int) -> bool:
    # mallopt returns 1 on success, 0 on error (e.g. a threshold above the maximum).
    return libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1


def keep_freed_memory() -> bool:
    """Keep freed blocks (up to 32 MiB each) in the process for reuse instead of returning them
    to the OS; True if applied (glibc), False where it is a no-op."""
    libc = _glibc()
    if libc is None:
        return False
    applied = _mallopt(libc, _M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) and _mallopt(
        libc, _M_TRIM_THRESHOLD, -1
    )
    if applied:
        logger.info("glibc malloc keeps freed memory (mmap threshold 32 MiB, no trimming)")
    return applied


def keep_freed_memory_for_training() -> None:
    """`keep_freed_memory()`, once per process, unless `LING_KERNELS_MALLOC=default` or
    `release_freed_memory()` opted out. Called by the CPU fast paths under autograd."""
    global _decided
    if _decided:
        return
    _decided = True
    value = os.environ.get(ENV_VAR, "keep").strip().lower() or "keep"
    if value not in ENV_VALUES:
        raise ValueError(f"environment variable {ENV_VAR}={os.environ[ENV_VAR]!r} is not an allocator "
                         f"setting; expected one of {', '.join(ENV_VALUES)}")
    if value == "keep":
        keep_freed_memory()


def keep_freed_memory_if_training(tensors) -> None:
    """`keep_freed_memory_for_training()` if autograd will produce gradients on the CPU for one
    of `tensors`: the check the CPU training ops run on every call, cheapest test first (after
    the first decision it is one global read)."""
    if _decided or not torch.is_grad_enabled():
        return
    if any(t.requires_grad and t.device.type == "cpu" for t in tensors):
        keep_freed_memory_for_training()


def release_freed_memory() -> bool:
    """Undo `keep_freed_memory`: glibc's default thresholds, then hand free heap memory back to
    the OS now (`malloc_trim(0)`); True if applied (glibc), False where it is a no-op. The
    process is then opted out of `keep_freed_memory_for_training`."""
    global _decided
    _decided = True
    libc = _glibc()
    if libc is None:
        return False
    applied = _mallopt(libc, _M_MMAP_THRESHOLD, _GLIBC_DEFAULT_THRESHOLD) and _mallopt(
        libc, _M_TRIM_THRESHOLD, _GLIBC_DEFAULT_THRESHOLD
    )
    libc.malloc_trim(ctypes.c_size_t(0))
    return applied
