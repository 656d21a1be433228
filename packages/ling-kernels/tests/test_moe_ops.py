"""MoE ops: route, permute / unpermute and grouped_mm, fast paths against the references on
hypothesis-drawn shapes (one token, odd sizes, experts with no tokens, every token on one
expert) in fp32 and bf16, values and gradients. Tolerances per dtype from
`ling_kernels_testing` (fp32 1e-5, bf16 1e-2 of the largest entry; see its docstring): the
fast paths do the same products in another order (gather + sum over k instead of a
scatter-add, mm into a preallocated buffer instead of F.linear + cat)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ling_kernels_testing import assert_close, assignments, kernel_mode, permute_case_tensors
from ling_kernels import grouped_mm, permute, route, unpermute
from ling_kernels.grouped_mm import reference as grouped_mm_reference
from ling_kernels.permute import reference_permute, reference_unpermute
from ling_kernels.route import reference as route_reference

DTYPES = [torch.float32, torch.bfloat16]


def _grads(tensors):
    return [t.grad for t in tensors]


@settings(max_examples=80, deadline=None)
@given(case=assignments(), hidden=st.integers(1, 13), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
def test_permute_unpermute_fast_match_reference(case, hidden, dtype, seed):
    tokens, num_experts, indices = case
    top_k = indices.shape[1]
    x, weights, row_scale, grad_out = permute_case_tensors(tokens, hidden, top_k, dtype, seed)
    results = []
    for mode, (perm, unperm) in (("fast", (permute, unpermute)),
                                 ("reference", (reference_permute, reference_unpermute))):
        x.grad = weights.grad = None
        with kernel_mode(mode):
            permuted, permute_map = perm(x, indices, num_experts)
            out = unperm(permuted * row_scale, permute_map, weights)
        out.backward(grad_out)
        results.append((permuted.detach(), out.detach(), x.grad, weights.grad,
                        permute_map.tokens_per_expert))
    fast, ref = results
    assert torch.equal(fast[0], ref[0])  # a gather is exact
    assert torch.equal(fast[4], ref[4])
    for got, want in zip(fast[1:4], ref[1:4]):
        assert got.dtype == want.dtype
        assert_close(got, want, dtype)


@settings(max_examples=50, deadline=None)
@given(case=assignments(), hidden=st.integers(1, 7))
def test_permute_groups_rows_by_expert_and_unpermute_inverts_it(case, hidden):
    tokens, num_experts, indices = case
    top_k = indices.shape[1]
    x = torch.randn(tokens, hidden)
    with kernel_mode("fast"):
        permuted, permute_map = permute(x, indices, num_experts)
        # Uniform weights 1/k: the weighted sum of k copies of a token is the token.
        restored = unpermute(permuted, permute_map, torch.full((tokens, top_k), 1.0 / top_k))
    torch.testing.assert_close(restored, x)
    counts = permute_map.tokens_per_expert
    assert counts.sum() == tokens * top_k
    expert_of_row = torch.repeat_interleave(torch.arange(num_experts), counts)
    assigned = indices.reshape(-1)[permute_map.slot_of_assignment.argsort()]
    assert torch.equal(assigned, expert_of_row)  # each row sits in its expert's group
    assert torch.equal(permuted, x[permute_map.token_of_slot])


@st.composite
def grouped_problems(draw):
    num_experts = draw(st.integers(1, 6))
    pattern = draw(st.sampled_from(["random", "one_expert", "empty"]))
    if pattern == "one_expert":
        counts = [0] * num_experts
        counts[draw(st.integers(0, num_experts - 1))] = draw(st.integers(1, 20))
    elif pattern == "empty":
        counts = [0] * num_experts
    else:
        counts = draw(st.lists(st.integers(0, 9), min_size=num_experts, max_size=num_experts))
    return counts, draw(st.integers(1, 11)), draw(st.integers(1, 11))


@settings(max_examples=80, deadline=None)
@given(problem=grouped_problems(), dtype=st.sampled_from(DTYPES), stacked=st.booleans(),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_grouped_mm_fast_matches_reference(problem, dtype, stacked, bias, seed):
    counts, in_features, out_features = problem
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(counts), in_features, generator=generator).to(dtype).requires_grad_()
    if stacked:
        weights = torch.randn(len(counts), out_features, in_features, generator=generator)
        weights = weights.to(dtype).requires_grad_()
        leaves = [weights]
    else:
        weights = [torch.randn(out_features, in_features, generator=generator).to(dtype)
                   .requires_grad_() for _ in counts]
        leaves = list(weights)
    biases = None
    if bias:
        biases = [torch.randn(out_features, generator=generator).to(dtype).requires_grad_()
                  for _ in counts]
        leaves += biases
    grad_out = torch.randn(sum(counts), out_features, generator=generator).to(dtype)
    results = []
    for fn in (grouped_mm, grouped_mm_reference):
        x.grad = None
        for leaf in leaves:
            leaf.grad = None
        with kernel_mode("fast"):
            out = fn(x, weights, torch.tensor(counts), biases)
        if out.numel():
            out.backward(grad_out)
        results.append([out.detach(), x.grad, *_grads(leaves)])
    for got, want in zip(*results):
        if want is None:  # no rows at all: neither path has anything to differentiate
            assert got is None or not got.any()
            continue
        assert got.dtype == want.dtype
        assert_close(got, want, dtype)


def test_grouped_mm_expert_without_tokens_gets_zero_gradient():
    x = torch.randn(5, 3, requires_grad=True)
    weights = [torch.randn(4, 3, requires_grad=True) for _ in range(3)]
    with kernel_mode("fast"):
        grouped_mm(x, weights, [2, 0, 3]).sum().backward()
    assert torch.equal(weights[1].grad, torch.zeros(4, 3))
    assert weights[0].grad.abs().sum() > 0 and weights[2].grad.abs().sum() > 0


def test_grouped_mm_under_autocast_runs_in_bf16_and_returns_fp32_grads():
    x = torch.randn(6, 8, requires_grad=True)
    weights = [torch.randn(5, 8, requires_grad=True) for _ in range(2)]
    with kernel_mode("fast"), torch.autocast("cpu", dtype=torch.bfloat16):
        out = grouped_mm(x, weights, [4, 2])
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert weights[0].grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    expected = grouped_mm_reference(x.detach(), [w.detach() for w in weights], [4, 2])
    assert_close(out, expected, torch.bfloat16)


@pytest.mark.parametrize("counts, message", [
    ([2, 2], "sum to x's 5 rows"),
    ([2, 2, 1], "2 weights"),
    ([6, -1], "non-negative"),
])
def test_grouped_mm_checks_counts(counts, message):
    with pytest.raises(ValueError, match=message):
        grouped_mm(torch.ones(5, 3), [torch.ones(4, 3)] * 2, counts)


def test_grouped_mm_checks_weight_shapes():
    with pytest.raises(ValueError, match=r"weights\[1\] must be \[N, K\]"):
        grouped_mm(torch.ones(5, 3), [torch.ones(4, 3), torch.ones(4, 2)], [2, 3])


@settings(max_examples=60, deadline=None)
@given(tokens=st.integers(1, 30), num_experts=st.integers(1, 10), data=st.data(),
       norm=st.booleans(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_route_sends_each_token_to_k_distinct_experts(tokens, num_experts, data, norm, dtype, seed):
    top_k = data.draw(st.integers(1, num_experts))
    generator = torch.Generator().manual_seed(seed)
    scores = (torch.randn(tokens, num_experts, generator=generator) * 3).to(dtype)
    with kernel_mode("fast"):
        result = route(scores, top_k, norm)
    assert result.expert_indices.shape == (tokens, top_k)
    assert result.expert_weights.dtype == result.probs.dtype == torch.float32
    for row in result.expert_indices:
        assert len(set(row.tolist())) == top_k
    assert torch.equal(result.tokens_per_expert,
                       torch.bincount(result.expert_indices.reshape(-1), minlength=num_experts))
    chosen = result.probs.gather(1, result.expert_indices)
    # The chosen experts are the k most probable ones.
    assert (chosen.min(dim=1).values[:, None] >= result.probs.topk(top_k).values.min(1, True).values).all()
    if norm and top_k > 1:
        torch.testing.assert_close(result.expert_weights.sum(-1), torch.ones(tokens))
        torch.testing.assert_close(result.expert_weights, chosen / chosen.sum(-1, keepdim=True))
    else:  # k = 1 keeps the raw probability (HF), so the router still gets a gradient
        torch.testing.assert_close(result.expert_weights, chosen)
    expected = route_reference(scores.float(), top_k, norm)
    assert torch.equal(result.expert_indices, expected.expert_indices)


def test_route_checks_arguments():
    with pytest.raises(ValueError, match="top_k must be in"):
        route(torch.randn(3, 4), 5, True)
    with pytest.raises(ValueError, match=r"\[tokens, experts\]"):
        route(torch.randn(3), 1, True)


def test_permute_checks_arguments():
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
        permute(torch.randn(2, 4), torch.tensor([[0], [3]]), 3)
    with pytest.raises(ValueError, match="same tokens"):
        permute(torch.randn(2, 4), torch.tensor([[0], [1], [2]]), 3)


@settings(max_examples=20, deadline=None)
@given(counts=st.lists(st.integers(0, 6), min_size=1, max_size=5), out_features=st.integers(1, 9),
       stacked=st.booleans(), seed=st.integers(0, 2**16))
def test_row_biases_of_the_cuda_paths_match_reference(counts, out_features, stacked, seed):
    """The CUDA grouped-GEMM paths add biases after the GEMM (`add_row_biases`); checked here on
    CPU against the reference with biases, values and gradients."""
    from ling_kernels.grouped_mm import add_row_biases

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(counts), 3, generator=generator)
    weights = torch.randn(len(counts), out_features, 3, generator=generator)
    bias_tensor = torch.randn(len(counts), out_features, generator=generator).requires_grad_()
    biases = bias_tensor if stacked else list(bias_tensor.unbind(0))
    grad = torch.randn(sum(counts), out_features, generator=generator)
    got = add_row_biases(grouped_mm_reference(x, weights, counts), biases, counts)
    got.backward(grad)
    got_grad, bias_tensor.grad = bias_tensor.grad, None
    want = grouped_mm_reference(x, weights, counts, biases)
    want.backward(grad)
    assert_close(got, want, torch.float32)
    assert_close(got_grad, bias_tensor.grad, torch.float32)
