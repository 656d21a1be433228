"""The machine's measured matmul rate: the ceiling MFU is reported against.

We measure rather than read a spec sheet: on a laptop CPU the achievable rate depends on cores,
vector units and the BLAS build, and a spec-sheet peak would make every MFU look tiny.
"""

from __future__ import annotations

import time

import torch


def measure_matmul_flops(device: torch.device, dtype: torch.dtype = torch.float32,
                         size: int = 1024, min_seconds: float = 0.3) -> float:
    """Sustained FLOP/s of a square `size` matmul on `device` in `dtype` (best of repeated runs)."""
    if device.type == "cuda" and size < 4096:
        size = 8192
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):
        a @ b
    sync()
    best = float("inf")
    deadline = time.perf_counter() + min_seconds
    while True:
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
        if time.perf_counter() > deadline:
            break
    return 2 * size**3 / best
