"""Shared test helpers: forcing a kernel path and comparing against a reference at a tolerance.

Tolerances, per dtype, relative to max(1, largest |reference entry|): test inputs are O(1), so
where the exact result is 0 (an H = 1 RMSNorm input gradient) both paths still leave roundoff
of the inputs' scale, which a purely elementwise-relative check would call a mismatch.
- fp32 1e-5: both paths do the same fp32 arithmetic, only in a different order (chunked
  matmuls, chunked sums, fused kernels); reordering fp32 sums of O(100) terms moves results
  by ~1e-7 relative, so 1e-5 leaves two orders of margin and still catches any real error.
- bf16 1e-2: bf16 has an 8-bit mantissa (one rounding = 2^-9 ~ 0.2% relative). Both paths
  round their outputs to bf16 once; the chunked weight gradient is rounded once per chunk
  before its fp32 sum, and fp32 results one bit apart can round to neighbouring bf16 values
  (1 ulp; seen between the Triton kernel and the reference), so the expected gap is a few
  ulps (~0.2-0.8%) of the largest entry: 1e-2 holds (checked over 600 hypothesis examples)
  while a wrong formula is off by O(1).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from hypothesis import strategies as st

RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@contextlib.contextmanager
def kernel_mode(value: str | None) -> Iterator[None]:
    """Set (or unset, for None) LING_KERNELS for the duration; hypothesis-safe (no fixture)."""
    old = os.environ.get("LING_KERNELS")
    if value is None:
        os.environ.pop("LING_KERNELS", None)
    else:
        os.environ["LING_KERNELS"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LING_KERNELS", None)
        else:
            os.environ["LING_KERNELS"] = old


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """|actual - expected| <= rtol * (|expected| + max(1, max|expected|)), elementwise, in fp32."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    actual, expected = actual.detach().float(), expected.detach().float()
    assert torch.isfinite(actual).all(), "non-finite values"
    rtol = RTOL[dtype]
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1.0))


def forward_backward(fn, inputs: list[torch.Tensor], grads_out: list[torch.Tensor]) -> list[torch.Tensor]:
    """`fn(*inputs)`'s outputs and the gradients of the inputs that require them, for comparing
    a fast path with its reference on the same upstream gradients."""
    for tensor in inputs:
        tensor.grad = None
    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    torch.autograd.backward(outputs, grads_out)
    return [o.detach() for o in outputs] + [t.grad for t in inputs if t.requires_grad]


@st.composite
def assignments(draw):
    """(tokens, num_experts, expert_indices [T, k]) with distinct experts per token, drawn so
    that some experts get no tokens, or (k = 1) every token goes to one expert."""
    tokens = draw(st.integers(1, 24))
    num_experts = draw(st.integers(1, 9))
    pattern = draw(st.sampled_from(["random", "one_expert", "few_experts"]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    if pattern == "one_expert":
        expert = draw(st.integers(0, num_experts - 1))
        return tokens, num_experts, torch.full((tokens, 1), expert, dtype=torch.long)
    pool = num_experts if pattern == "random" else draw(st.integers(1, num_experts))
    top_k = draw(st.integers(1, pool))
    chosen = torch.randperm(num_experts, generator=generator)[:pool]
    rows = [chosen[torch.randperm(pool, generator=generator)[:top_k]] for _ in range(tokens)]
    return tokens, num_experts, torch.stack(rows)


def run_under_triton_interpreter(script: str) -> None:
    """Run tests/<script> in a subprocess with TRITON_INTERPRET=1 and fail with its output
    unless it exits 0 and prints "checked". A subprocess, because TRITON_INTERPRET must be set
    before the kernels are decorated, and this process may already have imported them."""
    import pytest

    pytest.importorskip("triton")
    result = subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parent / script)],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "checked" in result.stdout


def distinct_scores(tokens: int, experts: int, generator: torch.Generator) -> torch.Tensor:
    """Router scores [tokens, experts] with no ties in any row, even in bf16: each row is a
    random permutation of (0 - E/2)/16, ..., (E-1 - E/2)/16 (exact in bf16 for E <= 256), so top-k is
    unique and two routing implementations must choose the same experts in the same order
    (torch.topk's order among equal values is unspecified)."""
    ranks = torch.rand(tokens, experts, generator=generator).argsort(dim=1)
    return ranks.float() / 16 - experts / 32


def permute_case_tensors(tokens: int, hidden: int, top_k: int, dtype: torch.dtype, seed: int):
    """(x [T, H] leaf, expert weights [T, k] fp32 leaf, row_scale [T*k, 1], grad_out [T, H]) for
    permute -> (x row_scale, a stand-in for the experts that keeps rows distinguishable) ->
    unpermute comparisons."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=generator).to(dtype).requires_grad_()
    weights = torch.rand(tokens, top_k, generator=generator).requires_grad_()
    row_scale = torch.randn(tokens * top_k, 1, generator=generator).to(dtype)
    grad_out = torch.randn(tokens, hidden, generator=generator).to(dtype)
    return x, weights, row_scale, grad_out
