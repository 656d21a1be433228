"""Run by test_triton_moe.py in a subprocess with TRITON_INTERPRET=1: the Triton route,
permute / unpermute and grouped GEMM kernels on CPU tensors against the references, values and
gradients, on hypothesis-drawn tiny shapes (one token, odd sizes, experts with no tokens, every
token on one expert) in fp32 and bf16, tolerances from ling_kernels_testing. Also
`torch._grouped_mm` (the Hopper fast path, whose CPU implementation is the same op) against the
reference. Exits non-zero (hypothesis prints the failing case) on any mismatch."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ling_kernels.grouped_mm import reference as grouped_mm_reference  # noqa: E402
from ling_kernels.grouped_mm import torch_grouped_mm  # noqa: E402
from ling_kernels.grouped_mm_triton import triton_grouped_mm  # noqa: E402
from ling_kernels.permute import make_permute_map, reference_permute, reference_unpermute  # noqa: E402
from ling_kernels.permute_triton import triton_permute, triton_unpermute  # noqa: E402
from ling_kernels.route import reference as route_reference  # noqa: E402
from ling_kernels.route_triton import triton_route  # noqa: E402
from ling_kernels_testing import (  # noqa: E402
    assert_close, assignments, distinct_scores, forward_backward, permute_case_tensors,
)

DTYPES = [torch.float32, torch.bfloat16]
SETTINGS = settings(max_examples=10, deadline=None, database=None)


def _compare(fast, expected, dtype):
    for got, want in zip(fast, expected):
        assert got.dtype == want.dtype, (got.dtype, want.dtype)
        assert_close(got, want, dtype)


# Pinned: one token and one expert (k = 1); a near-one-hot router sending every token's first
# choice to one expert, with renormalisation (the weight-gradient path through the sum).
@SETTINGS
@given(tokens=st.integers(1, 9), experts=st.integers(1, 11), data=st.data(),
       norm=st.booleans(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16),
       one_expert=st.booleans())
@example(tokens=1, experts=1, data=None, norm=True, dtype=torch.float32, seed=0, one_expert=False)
@example(tokens=5, experts=7, data=None, norm=True, dtype=torch.bfloat16, seed=3, one_expert=True)
def check_route(tokens, experts, data, norm, dtype, seed, one_expert):
    top_k = data.draw(st.integers(1, experts)) if data is not None else min(3, experts)
    generator = torch.Generator().manual_seed(seed)
    scores = distinct_scores(tokens, experts, generator)
    if one_expert:
        scores[:, experts // 2] += 20.0
    scores = scores.to(dtype).requires_grad_()
    grads = [torch.randn(tokens, top_k, generator=generator),
             torch.randn(tokens, experts, generator=generator)]

    def run(fn):
        scores.grad = None
        indices, weights, counts, probs = fn(scores)
        torch.autograd.backward([weights, probs], grads)
        return indices, counts, [weights.detach(), probs.detach(), scores.grad]

    def reference(s):
        result = route_reference(s, top_k, norm)
        return result.expert_indices, result.expert_weights, result.tokens_per_expert, result.probs

    indices, counts, fast = run(lambda s: triton_route(s, top_k, norm))
    ref_indices, ref_counts, expected = run(reference)
    assert torch.equal(indices, ref_indices), (indices, ref_indices)
    assert torch.equal(counts, ref_counts)
    _compare(fast[:2], expected[:2], torch.float32)  # weights and probs are fp32 for every dtype
    _compare(fast[2:], expected[2:], dtype)


@SETTINGS
@given(case=assignments(), hidden=st.integers(1, 13), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
@example(case=(1, 1, torch.zeros(1, 1, dtype=torch.long)), hidden=1, dtype=torch.float32, seed=0)
def check_permute_unpermute(case, hidden, dtype, seed):
    tokens, num_experts, indices = case
    top_k = indices.shape[1]
    x, weights, row_scale, grad_out = permute_case_tensors(tokens, hidden, top_k, dtype, seed)
    permute_map = make_permute_map(indices, num_experts)

    def fast(x, weights):
        permuted = triton_permute(x, permute_map.slot_of_assignment, top_k)
        return permuted, triton_unpermute(permuted * row_scale, weights, permute_map.slot_of_assignment)

    def reference(x, weights):
        permuted, ref_map = reference_permute(x, indices, num_experts)
        return permuted, reference_unpermute(permuted * row_scale, ref_map, weights)

    grads = [torch.zeros(tokens * top_k, hidden, dtype=dtype), grad_out]
    got = forward_backward(fast, [x, weights], grads)
    want = forward_backward(reference, [x, weights], grads)
    assert torch.equal(got[0], want[0])  # a copy is exact
    _compare(got[1:3], want[1:3], dtype)
    _compare(got[3:], want[3:], torch.float32)  # expert weights are fp32


# Pinned: one row on one of three experts (two experts empty); 70 rows over 2 experts with
# K, N past one 32/64 tile (masked tails in every dimension).
@SETTINGS
@given(data=st.data(), experts=st.integers(1, 5), in_features=st.integers(1, 40),
       out_features=st.integers(1, 40), pattern=st.sampled_from(["random", "one_expert"]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
@example(data=None, experts=3, in_features=5, out_features=3, pattern="one_expert",
         dtype=torch.float32, seed=0)
@example(data=None, experts=2, in_features=70, out_features=65, pattern="random",
         dtype=torch.bfloat16, seed=1)
def check_grouped_mm(data, experts, in_features, out_features, pattern, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    if data is None:
        counts = [0, 1, 0] if pattern == "one_expert" else [33, 37]
    elif pattern == "one_expert":
        counts = [0] * experts
        counts[data.draw(st.integers(0, experts - 1))] = data.draw(st.integers(1, 70))
    else:
        counts = data.draw(st.lists(st.integers(0, 20), min_size=experts, max_size=experts))
    _check_against_reference(triton_grouped_mm, counts, in_features, out_features, dtype, generator)


# torch._grouped_mm needs rows aligned to 16 bytes (K, N multiples of 8 for bf16), as the
# dispatch's guard requires, so its sizes are drawn as multiples of 8.
@SETTINGS
@given(counts=st.lists(st.integers(0, 20), min_size=1, max_size=5),
       in_features=st.integers(1, 5).map(lambda v: 8 * v),
       out_features=st.integers(1, 5).map(lambda v: 8 * v),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
@example(counts=[0, 7, 0], in_features=8, out_features=16, dtype=torch.bfloat16, seed=0)
def check_torch_grouped_mm(counts, in_features, out_features, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    _check_against_reference(torch_grouped_mm, counts, in_features, out_features, dtype, generator)


def _check_against_reference(fast, counts, in_features, out_features, dtype, generator):
    x = torch.randn(sum(counts), in_features, generator=generator).to(dtype).requires_grad_()
    w = (torch.randn(len(counts), out_features, in_features, generator=generator) * 0.3).to(dtype)
    w.requires_grad_()
    grad = torch.randn(sum(counts), out_features, generator=generator).to(dtype)
    _compare(forward_backward(lambda x, w: fast(x, w, counts), [x, w], [grad]),
             forward_backward(lambda x, w: grouped_mm_reference(x, w, counts), [x, w], [grad]),
             dtype)


if __name__ == "__main__":
    check_route()
    check_permute_unpermute()
    check_grouped_mm()
    check_torch_grouped_mm()
    print("checked")
