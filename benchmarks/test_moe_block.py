"""One MoE block, forward + backward, fp32 on CPU, at a Ling-Lite-like expert shape.

Hidden 1024, 64 routed experts top-6 with FFN 704, 2 shared experts (one SwiGLU of FFN 1408),
2048 tokens. Subjects and anchors, all measured in this run:

- ours: `ling_core.moe.MoE`, which runs ling-kernels' ops (route, permute, grouped_mm,
  swiglu, unpermute) with their default (`LING_KERNELS=auto`) paths; and the same block with
  `LING_KERNELS=reference` (the plain-torch specification of each op), interleaved.
- transformers' `Qwen2MoeSparseMoeBlock` (the same softmax top-k router with renormalised
  weights, SwiGLU experts stored as stacked `gate_up_proj` / `down_proj`, and a shared expert
  with an extra sigmoid gate), loaded with our weights so both route every token identically.
  Its experts run through `config._experts_implementation`: "eager" (a Python loop over the hit
  experts) and "grouped_mm" (`torch.nn.functional.grouped_mm` over the sorted tokens). The third
  option, "batched_mm", gathers one weight matrix per (token, expert) pair
  (2048 * 6 * 1408 * 1024 fp32 = 71 GB for gate_up alone) and is not run.
- the ceiling: the machine's fp32 dense matmul rate (`ling_train.perf.measure_matmul_flops`),
  i.e. how long the block's matmul FLOPs would take as plain square matmuls.

FLOPs counted: router + 6 routed experts + the shared expert, forward x 3 (forward + backward).
Weights are drawn from N(0, 0.02), so the router is near-uniform and the load is what an
untrained model sees; the tokens-per-expert spread is recorded.
"""

from __future__ import annotations

import os

import pytest
import torch

from ling_core import LingConfig
from ling_core.moe import MoE

HIDDEN, EXPERTS, TOP_K, EXPERT_FFN, SHARED_EXPERTS, TOKENS = 1024, 64, 6, 704, 2, 2048
INIT_STD = 0.02


def block_flops() -> int:
    """Training FLOPs of one block over TOKENS tokens: 3 x the forward matmul FLOPs."""
    router = 2 * HIDDEN * EXPERTS
    swiglu = 3 * 2 * HIDDEN * EXPERT_FFN  # gate, up and down projections
    forward_per_token = router + TOP_K * swiglu + SHARED_EXPERTS * swiglu
    return 3 * forward_per_token * TOKENS


def make_block() -> MoE:
    """Ours: ling-core's `MoE` at the benchmark shape, weights drawn from N(0, INIT_STD)."""
    config = LingConfig(vocab_size=1024, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=8,
                        num_key_value_heads=8, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
                        moe_intermediate_size=EXPERT_FFN, num_shared_experts=SHARED_EXPERTS,
                        norm_topk_prob=True)
    torch.manual_seed(0)
    block = MoE(config)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, INIT_STD)
    return block


def make_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states [1, TOKENS, HIDDEN] that require grad, as a layer's input does; output grad)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, TOKENS, HIDDEN, generator=generator).requires_grad_()
    return x, torch.randn(1, TOKENS, HIDDEN, generator=generator)


@pytest.fixture(scope="module")
def ours() -> MoE:
    return make_block()


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    return make_inputs()


def transformers_block(ours: MoE, experts_implementation: str) -> torch.nn.Module:
    """transformers' Qwen2MoeSparseMoeBlock carrying `ours`' weights."""
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    config = Qwen2MoeConfig(hidden_size=HIDDEN, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
                            moe_intermediate_size=EXPERT_FFN,
                            shared_expert_intermediate_size=SHARED_EXPERTS * EXPERT_FFN,
                            norm_topk_prob=True, experts_implementation=experts_implementation)
    block = Qwen2MoeSparseMoeBlock(config)
    with torch.no_grad():
        block.gate.weight.copy_(ours.gate.weight)
        for e, expert in enumerate(ours.experts):
            block.experts.gate_up_proj[e].copy_(torch.cat([expert.gate_proj.weight, expert.up_proj.weight]))
            block.experts.down_proj[e].copy_(expert.down_proj.weight)
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(block.shared_expert, name).weight.copy_(getattr(ours.shared_experts, name).weight)
        block.shared_expert_gate.weight.normal_(0.0, INIT_STD)
    return block


def forward_backward(block: torch.nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> None:
    out = block(x)
    out = out[0] if isinstance(out, tuple) else out  # ours returns (out, routing)
    out.backward(grad_out)


def clear_grads(block: torch.nn.Module, x: torch.Tensor) -> None:
    """A fresh step: gradients are assigned, not accumulated (as after zero_grad(set_to_none))."""
    x.grad = None
    for param in block.parameters():
        param.grad = None


def load_stats(tokens_per_expert: torch.Tensor) -> dict[str, float]:
    load = tokens_per_expert.float()
    return {"tokens_per_expert_max_over_mean": round((load.max() / load.mean()).item(), 3),
            "tokens_per_expert_min_over_mean": round((load.min() / load.mean()).item(), 3),
            "tokens_per_expert_cv": round((load.std() / load.mean()).item(), 3)}


def test_moe_block_ours(benchmark, ours, inputs, matmul_rate, best_seconds, page_faults):
    x, grad_out = inputs
    rounds, warmup_rounds = 5, 1
    matmul_rate.measure()
    faults_before = page_faults()
    benchmark.pedantic(forward_backward, args=(ours, x, grad_out), setup=lambda: clear_grads(ours, x),
                       rounds=rounds, warmup_rounds=warmup_rounds)
    faults = page_faults() - faults_before
    rate = matmul_rate.measure()
    seconds = best_seconds()
    if seconds is None:
        return
    with torch.no_grad():
        _, routing = ours(x)
    flops = block_flops()
    benchmark.extra_info.update({
        "flops": flops,
        "gflops_per_s": round(flops / seconds / 1e9, 2),
        "matmul_gflops_per_s": round(rate / 1e9, 2),
        "fraction_of_matmul_rate": round(flops / seconds / rate, 3),
        "ceiling_seconds": round(flops / rate, 3),
        # Fresh gradients and activations are fresh pages when the allocator has handed freed
        # memory back to the OS: see benchmarks/README.md.
        "minor_page_faults_per_round": faults // (rounds + warmup_rounds),
        "threads": torch.get_num_threads(),
        **load_stats(routing.tokens_per_expert),
    })


@pytest.mark.parametrize("experts_implementation", ["eager", "grouped_mm"])
def test_moe_block_transformers(benchmark, ours, inputs, matmul_rate, best_time, best_seconds,
                                experts_implementation):
    pytest.importorskip("transformers")
    x, grad_out = inputs
    theirs = transformers_block(ours, experts_implementation)
    with torch.no_grad():  # same weights, same routing, same routed-expert output
        flat = x.detach().reshape(TOKENS, HIDDEN)
        _, routing = ours(flat)
        _, their_weights, their_indices = theirs.gate(flat)
        assert torch.equal(torch.bincount(their_indices.reshape(-1), minlength=EXPERTS),
                           routing.tokens_per_expert)
        torch.testing.assert_close(theirs.experts(flat, their_indices, their_weights),
                                   ours.routed_experts(flat, routing), rtol=1e-4, atol=1e-5)

    # Anchor: ours, timed once before every round of theirs (rounds interleave, so a burst of
    # load on the machine hits both).
    ours_time = best_time()

    def setup():
        clear_grads(ours, x)
        ours_time.time(lambda: forward_backward(ours, x, grad_out))
        clear_grads(theirs, x)

    matmul_rate.measure()
    benchmark.pedantic(forward_backward, args=(theirs, x, grad_out), setup=setup, rounds=3, warmup_rounds=1)
    rate = matmul_rate.measure()
    seconds = best_seconds()
    if seconds is None:
        return
    flops = block_flops()
    benchmark.extra_info.update({
        "experts_implementation": experts_implementation,
        "flops": flops,
        "gflops_per_s": round(flops / seconds / 1e9, 2),
        "matmul_gflops_per_s": round(rate / 1e9, 2),
        "fraction_of_matmul_rate": round(flops / seconds / rate, 3),
        "ours_seconds": round(ours_time.seconds, 4),
        "ours_fraction_of_matmul_rate": round(flops / ours_time.seconds / rate, 3),
        "ours_minor_page_faults_per_round": ours_time.faults_per_call,
        # > 1: ours is faster.
        "speedup_ours_over_transformers": round(seconds / ours_time.seconds, 3),
        "threads": torch.get_num_threads(),
        **load_stats(routing.tokens_per_expert),
    })


def test_moe_block_kernel_paths(benchmark, ours, inputs, matmul_rate, best_time, best_seconds):
    """Ours with ling-kernels' default paths (auto), anchored on the same block with every op
    forced to its reference, one reference round before every auto round."""
    x, grad_out = inputs
    reference_time = best_time()

    def with_mode(mode):
        old = os.environ.get("LING_KERNELS")
        os.environ["LING_KERNELS"] = mode
        try:
            forward_backward(ours, x, grad_out)
        finally:
            if old is None:
                os.environ.pop("LING_KERNELS", None)
            else:
                os.environ["LING_KERNELS"] = old

    def setup():
        clear_grads(ours, x)
        reference_time.time(lambda: with_mode("reference"))
        clear_grads(ours, x)

    matmul_rate.measure()
    benchmark.pedantic(with_mode, args=("auto",), setup=setup, rounds=4, warmup_rounds=1)
    rate = matmul_rate.measure()
    seconds = best_seconds()
    if seconds is None:
        return
    flops = block_flops()
    benchmark.extra_info.update({
        "flops": flops,
        "fraction_of_matmul_rate": round(flops / seconds / rate, 3),
        "matmul_gflops_per_s": round(rate / 1e9, 2),
        "reference_seconds": round(reference_time.seconds, 4),
        "reference_fraction_of_matmul_rate": round(flops / reference_time.seconds / rate, 3),
        # > 1: the fast paths beat the plain-torch references.
        "speedup_auto_over_reference": round(reference_time.seconds / seconds, 3),
        "threads": torch.get_num_threads(),
    })


def test_moe_block_keep_freed_memory(benchmark):
    """A/B of `ling_kernels.allocator.keep_freed_memory()` on this block: fresh processes
    alternating default / keep (the setting is process-global), at this run's thread count,
    each reporting its best round against its own matmul rate, page faults and resident memory
    (packages/ling-kernels/scripts/measure_allocator.py). The timed call is the whole A/B
    session; the numbers are in extra_info."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "packages/ling-kernels/scripts/measure_allocator.py"
    result = {}

    def run_ab():
        out = subprocess.run([sys.executable, str(script), "--json", "--pairs", "2", "--threads",
                              str(torch.get_num_threads())], check=True, capture_output=True,
                             text=True, timeout=1800).stdout
        result.update(json.loads(out.strip().splitlines()[-1]))

    benchmark.pedantic(run_ab, rounds=1, iterations=1)
    benchmark.extra_info.update({"threads": torch.get_num_threads(), **{
        key: round(value, 3) if isinstance(value, float) else value for key, value in result.items()}})
