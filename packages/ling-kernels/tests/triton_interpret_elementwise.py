"""Run by test_triton_interpret.py in a subprocess with TRITON_INTERPRET=1: the Triton SwiGLU
and RoPE kernels on CPU tensors against their references, values and gradients, on
hypothesis-drawn small shapes in fp32 and bf16 (tolerances from ling_kernels_testing). Exits
non-zero (hypothesis prints the failing case) on any mismatch."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ling_kernels.rope import reference as rope_reference  # noqa: E402
from ling_kernels.rope_triton import triton_apply_rope  # noqa: E402
from ling_kernels.swiglu import reference as swiglu_reference  # noqa: E402
from ling_kernels.swiglu_triton import triton_swiglu  # noqa: E402
from ling_kernels_testing import assert_close, forward_backward  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]


def _compare(fast, expected, dtype):
    for got, want in zip(fast, expected):
        assert got.dtype == want.dtype == dtype, (got.dtype, want.dtype)
        assert_close(got, want, dtype)


# Pinned: one element, and a size just past one 1024-element block (the masked tail).
@settings(max_examples=12, deadline=None, database=None)
@given(shape=st.lists(st.integers(1, 40), min_size=1, max_size=2),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
@example(shape=[1], dtype=torch.float32, seed=0)
@example(shape=[1025], dtype=torch.bfloat16, seed=1)
def check_swiglu(shape, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    gate = (torch.randn(shape, generator=generator) * 4).to(dtype).requires_grad_()
    up = torch.randn(shape, generator=generator).to(dtype).requires_grad_()
    grad = torch.randn(shape, generator=generator).to(dtype)
    _compare(forward_backward(triton_swiglu, [gate, up], [grad]),
             forward_backward(swiglu_reference, [gate, up], [grad]), dtype)


def _tables(seq, head_dim):
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


# Pinned: head_dim 2, and q/k as transposed views of a [B, S, H, D] tensor (the model's layout).
@settings(max_examples=12, deadline=None, database=None)
@given(batch=st.integers(1, 2), kv_heads=st.integers(1, 3), group=st.integers(1, 2),
       seq=st.integers(1, 6), half=st.integers(1, 6), transposed=st.booleans(),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
@example(batch=1, kv_heads=1, group=1, seq=1, half=1, transposed=False, dtype=torch.float32, seed=0)
@example(batch=2, kv_heads=2, group=2, seq=5, half=3, transposed=True, dtype=torch.bfloat16, seed=1)
def check_rope(batch, kv_heads, group, seq, half, transposed, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    head_dim = 2 * half

    def make(heads):
        if transposed:
            x = torch.randn(batch, seq, heads, head_dim, generator=generator).transpose(1, 2)
        else:
            x = torch.randn(batch, heads, seq, head_dim, generator=generator)
        return x.to(dtype).detach().requires_grad_()

    q, k = make(kv_heads * group), make(kv_heads)
    cos, sin = _tables(seq, head_dim)
    grads = [torch.randn(q.shape, generator=generator).to(dtype),
             torch.randn(k.shape, generator=generator).to(dtype)]
    _compare(forward_backward(lambda q, k: triton_apply_rope(q, k, cos, sin), [q, k], grads),
             forward_backward(lambda q, k: rope_reference(q, k, cos, sin), [q, k], grads), dtype)


if __name__ == "__main__":
    check_swiglu()
    check_rope()
    print("checked")
