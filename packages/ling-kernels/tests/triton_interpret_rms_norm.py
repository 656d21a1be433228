"""Run by test_rms_norm.py in a subprocess with TRITON_INTERPRET=1: the Triton RMSNorm kernels
on CPU tensors against the reference, values and gradients, on hypothesis-drawn small shapes
in fp32 and bf16. Exits non-zero (hypothesis prints the failing case) on any mismatch."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ling_kernels.rms_norm import reference  # noqa: E402
from ling_kernels.rms_norm_triton import triton_rms_norm  # noqa: E402
from ling_kernels_testing import assert_close  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]
shapes = st.tuples(
    st.lists(st.integers(1, 9), min_size=0, max_size=2), st.integers(1, 70)
).map(lambda parts: (*parts[0], parts[1]))


# Pinned edge cases: one row, H = 1, more rows than the 4 backward programs used on CPU (the
# last stride of the row loop is masked), and a non-contiguous input.
@settings(max_examples=30, deadline=None, database=None)
@given(
    shape=shapes,
    dtype=st.sampled_from(DTYPES),
    eps=st.sampled_from([1e-6, 0.1]),
    transpose=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(shape=(1, 1), dtype=torch.float32, eps=1e-6, transpose=False, seed=0)
@example(shape=(13, 33), dtype=torch.bfloat16, eps=1e-6, transpose=False, seed=1)
@example(shape=(9, 64), dtype=torch.float32, eps=1e-6, transpose=True, seed=2)
def check(shape, dtype, eps, transpose, seed):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=generator) * 3).to(dtype)
    if transpose and x.dim() >= 2:
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, strided memory
    x.requires_grad_()
    weight = torch.randn(shape[-1], generator=generator).to(dtype).requires_grad_()
    grad_y = torch.randn(shape, generator=generator).to(dtype)
    outputs = []
    for fn in (triton_rms_norm, reference):
        x.grad = weight.grad = None
        y = fn(x, weight, eps)
        y.backward(grad_y)
        outputs.append((y.detach(), x.grad, weight.grad))
    for got, want in zip(*outputs):
        assert got.dtype == want.dtype == dtype
        assert_close(got, want, dtype)


if __name__ == "__main__":
    check()
    print("checked")
