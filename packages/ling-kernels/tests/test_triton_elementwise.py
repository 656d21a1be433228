"""The Triton SwiGLU and RoPE kernels: on CPU under TRITON_INTERPRET=1 (always, where Triton is
installed) and on real CUDA (marked gpu), against the references, values and gradients."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ling_kernels_testing import (
    assert_close, forward_backward, kernel_mode, run_under_triton_interpreter,
)
from ling_kernels import apply_rope, swiglu
from ling_kernels.rope import reference as rope_reference
from ling_kernels.swiglu import reference as swiglu_reference

DTYPES = [torch.float32, torch.bfloat16]


def test_triton_kernels_under_interpreter_on_cpu():
    """A subprocess, because TRITON_INTERPRET must be set before the kernels are decorated."""
    run_under_triton_interpreter("triton_interpret_elementwise.py")


@pytest.mark.gpu
@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 3000), cols=st.integers(1, 700), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
def test_triton_swiglu_on_cuda_matches_reference(rows, cols, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    gate = (torch.randn(rows, cols, generator=generator) * 4).to("cuda", dtype).requires_grad_()
    up = torch.randn(rows, cols, generator=generator).to("cuda", dtype).requires_grad_()
    grad = torch.randn(rows, cols, generator=generator).to("cuda", dtype)
    with kernel_mode("fast"):
        fast = forward_backward(swiglu, [gate, up], [grad])
    for got, want in zip(fast, forward_backward(swiglu_reference, [gate, up], [grad])):
        assert_close(got, want, dtype)


@pytest.mark.gpu
@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 3), kv_heads=st.integers(1, 4), group=st.integers(1, 4),
       seq=st.integers(1, 300), half=st.integers(1, 64), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
def test_triton_rope_on_cuda_matches_reference(batch, kv_heads, group, seq, half, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    head_dim = 2 * half
    q = torch.randn(batch, seq, kv_heads * group, head_dim, generator=generator)
    q = q.to("cuda", dtype).transpose(1, 2).detach().requires_grad_()
    k = torch.randn(batch, kv_heads, seq, head_dim, generator=generator).to("cuda", dtype)
    k.requires_grad_()
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1).cuda()
    cos, sin = angles.cos(), angles.sin()
    grads = [torch.randn(q.shape, device="cuda").to(dtype), torch.randn(k.shape, device="cuda").to(dtype)]
    with kernel_mode("fast"):
        fast = forward_backward(lambda q, k: apply_rope(q, k, cos, sin), [q, k], grads)
    expected = forward_backward(lambda q, k: rope_reference(q, k, cos, sin), [q, k], grads)
    for got, want in zip(fast, expected):
        assert_close(got, want, dtype)
