"""Time RMSNorm forward+backward on CPU: the reference against `F.rms_norm`, the candidate CPU
fast path (measured no faster, so not used: see `ling_kernels.rms_norm`).

    uv run python packages/ling-kernels/scripts/measure_rms_norm.py --rows 4096 --hidden 1024
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from ling_kernels.rms_norm import reference


def _best_ms(fn, x, weight, grad_y, repeats: int) -> float:
    fn(x, weight, 1e-6).backward(grad_y)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x, weight, 1e-6).backward(grad_y)
        best = min(best, time.perf_counter() - start)
    return best * 1000


def _functional(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x.float(), x.shape[-1:], weight.float(), eps).to(x.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(args.rows, args.hidden, dtype=dtype, requires_grad=True)
        weight = torch.randn(args.hidden, dtype=dtype, requires_grad=True)
        grad_y = torch.randn(args.rows, args.hidden, dtype=dtype)
        ref = _best_ms(reference, x, weight, grad_y, args.repeats)
        fast = _best_ms(_functional, x, weight, grad_y, args.repeats)
        print(f"{str(dtype):15s} reference {ref:6.2f} ms  F.rms_norm {fast:6.2f} ms  "
              f"(fwd+bwd, best of {args.repeats})")


if __name__ == "__main__":
    main()
