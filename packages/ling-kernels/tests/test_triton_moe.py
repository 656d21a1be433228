"""The Triton route, permute / unpermute and grouped GEMM kernels: on CPU under
TRITON_INTERPRET=1 (always, where Triton is installed) and, through the public dispatching
functions, on real CUDA (marked gpu), against the references, values and gradients."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ling_kernels_testing import (
    assert_close, assignments, distinct_scores, kernel_mode, run_under_triton_interpreter,
)
from ling_kernels import grouped_mm, permute, route, unpermute
from ling_kernels.grouped_mm import reference as grouped_mm_reference
from ling_kernels.grouped_mm import torch_grouped_mm_supported
from ling_kernels.permute import reference_permute, reference_unpermute
from ling_kernels.route import reference as route_reference

DTYPES = [torch.float32, torch.bfloat16]


def test_triton_moe_kernels_under_interpreter_on_cpu():
    """A subprocess, because TRITON_INTERPRET must be set before the kernels are decorated."""
    run_under_triton_interpreter("triton_interpret_moe.py")


@pytest.mark.gpu
@settings(max_examples=30, deadline=None)
@given(tokens=st.integers(1, 3000), experts=st.integers(1, 160), data=st.data(),
       norm=st.booleans(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_route_on_cuda_matches_reference(tokens, experts, data, norm, dtype, seed):
    top_k = data.draw(st.integers(1, min(experts, 8)))
    generator = torch.Generator().manual_seed(seed)
    scores = distinct_scores(tokens, experts, generator).to("cuda", dtype).requires_grad_()
    grads = [torch.randn(tokens, top_k, generator=generator).cuda(),
             torch.randn(tokens, experts, generator=generator).cuda()]
    results = []
    for fn in (lambda s: route(s, top_k, norm), lambda s: route_reference(s, top_k, norm)):
        scores.grad = None
        with kernel_mode("fast"):
            routed = fn(scores)
        torch.autograd.backward([routed.expert_weights, routed.probs], grads)
        results.append((routed, scores.grad))
    (fast, fast_grad), (ref, ref_grad) = results
    assert torch.equal(fast.expert_indices, ref.expert_indices)
    assert torch.equal(fast.tokens_per_expert, ref.tokens_per_expert)
    assert_close(fast.probs, ref.probs, torch.float32)
    assert_close(fast.expert_weights, ref.expert_weights, torch.float32)
    assert_close(fast_grad, ref_grad, dtype)


@pytest.mark.gpu
@settings(max_examples=30, deadline=None)
@given(case=assignments(), hidden=st.integers(1, 2100), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
def test_permute_unpermute_on_cuda_match_reference(case, hidden, dtype, seed):
    tokens, num_experts, indices = case
    top_k = indices.shape[1]
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=generator).to("cuda", dtype).requires_grad_()
    weights = torch.rand(tokens, top_k, generator=generator).cuda().requires_grad_()
    grad_out = torch.randn(tokens, hidden, generator=generator).to("cuda", dtype)
    results = []
    for mode, (perm, unperm) in (("fast", (permute, unpermute)),
                                 ("reference", (reference_permute, reference_unpermute))):
        x.grad = weights.grad = None
        with kernel_mode(mode):
            permuted, permute_map = perm(x, indices.cuda(), num_experts)
            out = unperm(permuted * 1.5, permute_map, weights)
        out.backward(grad_out)
        results.append((permuted.detach(), out.detach(), x.grad, weights.grad))
    (fast, ref) = results
    assert torch.equal(fast[0], ref[0])
    for got, want, tolerance_dtype in zip(fast[1:], ref[1:], (dtype, dtype, torch.float32)):
        assert_close(got, want, tolerance_dtype)


@pytest.mark.gpu
@settings(max_examples=30, deadline=None)
@given(counts=st.lists(st.integers(0, 300), min_size=1, max_size=64),
       in_features=st.sampled_from([8, 64, 1000, 1024]), out_features=st.sampled_from([8, 704, 1001]),
       stacked=st.booleans(), with_bias=st.booleans(), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
def test_grouped_mm_on_cuda_matches_reference(counts, in_features, out_features, stacked, with_bias,
                                              dtype, seed):
    """Exercises torch._grouped_mm (bf16, Hopper, aligned sizes) or the Triton kernels."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(counts), in_features, generator=generator).to("cuda", dtype).requires_grad_()
    stacked_weights = (torch.randn(len(counts), out_features, in_features, generator=generator)
                       * in_features**-0.5).to("cuda", dtype)
    weights = stacked_weights.requires_grad_() if stacked else [
        w.clone().requires_grad_() for w in stacked_weights]
    grad = torch.randn(sum(counts), out_features, generator=generator).to("cuda", dtype)
    biases = (torch.randn(len(counts), out_features, generator=generator).to("cuda", dtype)
              .requires_grad_() if with_bias else None)
    leaves = [x, *([weights] if stacked else weights), *([biases] if with_bias else [])]
    outputs = []
    for fn in (lambda: grouped_mm(x, weights, counts, biases),
               lambda: grouped_mm_reference(x, weights, counts, biases)):
        for leaf in leaves:
            leaf.grad = None
        with kernel_mode("fast"):
            out = fn()
        out.backward(grad)
        outputs.append([out.detach()] + [leaf.grad.clone() for leaf in leaves])
    for got, want in zip(*outputs):
        assert_close(got, want, dtype)
    if dtype == torch.bfloat16 and in_features % 8 == 0 and out_features % 8 == 0:
        expected = torch.cuda.get_device_capability() >= (9, 0)
        assert torch_grouped_mm_supported(x, weights) == expected
