"""The benchmark MoE block (benchmarks/test_moe_block.py: hidden 1024, 64 experts top-6, FFN
704, 2 shared, 2048 tokens, fp32, fwd+bwd) timed in process CPU seconds on ONE thread.

For a machine so oversubscribed that wall-clock benchmarks measure the neighbours (load
average 13-19 on 2 cores while this was written): one thread's CPU time counts the work this
process did, not the time it waited for a core (cache and memory-bandwidth contention still
leak in). Rounds interleave the subjects; best of `--rounds`.

    uv run python packages/ling-kernels/scripts/measure_moe_block_cpu_time.py [--rounds 3] [--eager] [--keep-freed-memory]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
from test_moe_block import (  # noqa: E402
    EXPERTS, HIDDEN, INIT_STD, TOKENS, TOP_K, EXPERT_FFN, SHARED_EXPERTS, block_flops,
    clear_grads, forward_backward, transformers_block,
)

from ling_core import LingConfig  # noqa: E402
from ling_core.moe import MoE  # noqa: E402


def cpu_seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--eager", action="store_true", help="also time transformers' eager experts")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="call ling_kernels.allocator.keep_freed_memory() first (as ling-train does on CPU)")
    args = parser.parse_args()
    if args.keep_freed_memory:
        from ling_kernels.allocator import keep_freed_memory

        print("keep_freed_memory:", keep_freed_memory())
    torch.set_num_threads(1)
    config = LingConfig(vocab_size=1024, hidden_size=HIDDEN, num_hidden_layers=1,
                        num_attention_heads=8, num_key_value_heads=8, num_experts=EXPERTS,
                        num_experts_per_tok=TOP_K, moe_intermediate_size=EXPERT_FFN,
                        num_shared_experts=SHARED_EXPERTS, norm_topk_prob=True)
    torch.manual_seed(0)
    ours = MoE(config)
    with torch.no_grad():
        for param in ours.parameters():
            param.normal_(0.0, INIT_STD)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, TOKENS, HIDDEN, generator=generator).requires_grad_()
    grad_out = torch.randn(1, TOKENS, HIDDEN, generator=generator)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)

    def with_mode(mode):
        def run():
            os.environ["LING_KERNELS"] = mode
            forward_backward(ours, x, grad_out)
        return run

    subjects = {"matmul 1024^3 x20": lambda: [a @ b for _ in range(20)],
                "ours (auto)": with_mode("auto"), "ours (reference)": with_mode("reference")}
    blocks = {"ours (auto)": ours, "ours (reference)": ours}
    for impl in ["grouped_mm"] + (["eager"] if args.eager else []):
        block = transformers_block(ours, impl)
        subjects[f"transformers {impl}"] = lambda block=block: forward_backward(block, x, grad_out)
        blocks[f"transformers {impl}"] = block
    best = dict.fromkeys(subjects, float("inf"))
    for round_ in range(args.rounds + 1):  # the first round warms up
        for name, fn in subjects.items():
            if name in blocks:
                clear_grads(blocks[name], x)
            seconds = cpu_seconds(fn)
            if round_:
                best[name] = min(best[name], seconds)
    rate = 20 * 2 * 1024**3 / best["matmul 1024^3 x20"]
    print(f"1 thread, best of {args.rounds} rounds, process CPU seconds; "
          f"matmul rate {rate / 1e9:.1f} GFLOP/s; block {block_flops() / 1e9:.1f} GFLOP")
    for name, seconds in best.items():
        if name in blocks:
            print(f"{name:28s} {seconds:7.3f} s  {block_flops() / seconds / rate:.3f} of matmul rate"
                  f"  ours (auto) faster by {seconds / best['ours (auto)']:.2f}x")


if __name__ == "__main__":
    main()
