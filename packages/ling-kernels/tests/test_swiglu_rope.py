"""swiglu and apply_rope: the fast paths (memory-saving autograd.Functions) against the
references on hypothesis-drawn shapes and dtypes, values and gradients; tolerances per dtype
from `ling_kernels_testing` (fp32 1e-5, bf16 1e-2 of the largest entry; see its docstring).

The fast backward works in fp32 and rounds once, where the reference rounds after each op,
so in bf16 they may differ by a few ulps: inside 1e-2."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ling_kernels_testing import assert_close, forward_backward, kernel_mode
from ling_kernels import apply_rope, swiglu
from ling_kernels.rope import reference as rope_reference
from ling_kernels.swiglu import reference as swiglu_reference

DTYPES = [torch.float32, torch.bfloat16]


def _randn(shape, dtype, generator, scale=1.0):
    return (torch.randn(shape, generator=generator) * scale).to(dtype)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_swiglu_fast_matches_reference(shape, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    # Scale 4: gates well into both tails of silu, where its derivative is not ~0.5.
    gate = _randn(shape, dtype, generator, 4.0).requires_grad_()
    up = _randn(shape, dtype, generator, 2.0).requires_grad_()
    grad = _randn(shape, dtype, generator)
    with kernel_mode("fast"):
        fast = forward_backward(swiglu, [gate, up], [grad])
    expected = forward_backward(swiglu_reference, [gate, up], [grad])
    for got, want in zip(fast, expected):
        assert got.dtype == want.dtype
        assert_close(got, want, dtype)


def test_swiglu_checks_shapes():
    with pytest.raises(ValueError, match="same shape and dtype"):
        swiglu(torch.ones(2, 3), torch.ones(2, 4))


def _rope_tables(seq, head_dim, theta=10000.0):
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 3),
    group=st.integers(1, 3),
    seq=st.integers(1, 9),
    half_dim=st.integers(1, 8),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_rope_fast_matches_reference(batch, kv_heads, group, seq, half_dim, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    head_dim = 2 * half_dim
    q = _randn((batch, kv_heads * group, seq, head_dim), dtype, generator).requires_grad_()
    k = _randn((batch, kv_heads, seq, head_dim), dtype, generator).requires_grad_()
    cos, sin = _rope_tables(seq, head_dim)
    grads = [_randn(q.shape, dtype, generator), _randn(k.shape, dtype, generator)]
    fn = lambda q, k: apply_rope(q, k, cos, sin)  # noqa: E731
    ref = lambda q, k: rope_reference(q, k, cos, sin)  # noqa: E731
    with kernel_mode("fast"):
        fast = forward_backward(fn, [q, k], grads)
    expected = forward_backward(ref, [q, k], grads)
    for got, want in zip(fast, expected):
        assert got.dtype == want.dtype == dtype
        assert_close(got, want, dtype)


def test_rope_reference_rotates_pairs_by_position_angle():
    """Position 1, head_dim 2: (a, b) -> (a cos 1 - b sin 1, b cos 1 + a sin 1)."""
    cos, sin = _rope_tables(2, 2)
    q = torch.tensor([[[[1.0, 0.0], [0.6, 0.8]]]])
    rotated, _ = rope_reference(q, q, cos, sin)
    c, s = torch.cos(torch.tensor(1.0)), torch.sin(torch.tensor(1.0))
    torch.testing.assert_close(rotated[0, 0, 1], torch.stack([0.6 * c - 0.8 * s, 0.8 * c + 0.6 * s]))
    torch.testing.assert_close(rotated[0, 0, 0], q[0, 0, 0])  # position 0: angle 0


def test_rope_is_a_rotation_so_norms_are_kept():
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 5, 8, generator=generator), torch.randn(2, 2, 5, 8, generator=generator)
    cos, sin = _rope_tables(5, 8)
    with kernel_mode("fast"):
        rq, rk = apply_rope(q, k, cos, sin)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))
    torch.testing.assert_close(rk.norm(dim=-1), k.norm(dim=-1))


@pytest.mark.parametrize("bad_q, bad_k, bad_seq, message", [
    ((1, 2, 3, 5), (1, 2, 3, 5), 3, "even"),
    ((1, 2, 3, 4), (1, 2, 4, 4), 3, "share batch"),
    ((1, 2, 3, 4), (1, 2, 3, 4), 4, "cos and sin"),
    ((2, 3, 4), (2, 3, 4), 3, "batch, heads, seq"),
])
def test_rope_checks_shapes(bad_q, bad_k, bad_seq, message):
    cos, sin = torch.ones(bad_seq, bad_q[-1]), torch.zeros(bad_seq, bad_q[-1])
    with pytest.raises(ValueError, match=message):
        apply_rope(torch.ones(bad_q), torch.ones(bad_k), cos, sin)
