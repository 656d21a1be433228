"""Time each op's fast path against its reference, forward+backward on CPU, at the shapes of the
benchmark MoE block (2048 tokens, hidden 1024, 64 experts top-6, expert FFN 704) and of a
Ling-Lite-like attention (16 query / 4 KV heads of 128, 2048 positions).

Rounds alternate reference and fast so machine load hits both; best of `--rounds`. With
`--cpu-time` (and `--threads 1`) it counts process CPU seconds instead of wall time, for a
machine too oversubscribed for wall clocks. This is the measurement behind each op's `auto`
choice (see the README).

    uv run python packages/ling-kernels/scripts/measure_ops.py [--rounds 7] [--dtype bfloat16]
        [--threads 1 --cpu-time] [--keep-freed-memory]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import ling_kernels as lk

TOKENS, HIDDEN, EXPERTS, TOP_K, FFN = 2048, 1024, 64, 6, 704


def best_time(fn, rounds: int, clock=time.perf_counter) -> dict[str, float]:
    best = {"reference": float("inf"), "fast": float("inf")}
    for _ in range(rounds):
        for mode in best:
            os.environ["LING_KERNELS"] = mode
            start = clock()
            fn()
            best[mode] = min(best[mode], clock() - start)
    return best


def cases(dtype: torch.dtype):
    generator = torch.Generator().manual_seed(0)

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(dtype).requires_grad_()

    scores = torch.randn(TOKENS, EXPERTS, generator=generator)
    routed = lk.route(scores, TOP_K, True)
    counts = routed.tokens_per_expert.tolist()
    x = leaf(TOKENS, HIDDEN)
    rows = leaf(TOKENS * TOP_K, HIDDEN)
    weights = [leaf(FFN, HIDDEN, scale=0.03) for _ in range(EXPERTS)]
    gate, up = leaf(TOKENS * TOP_K, FFN), leaf(TOKENS * TOP_K, FFN)
    expert_weights = routed.expert_weights.clone().requires_grad_()
    q, k = leaf(1, 16, TOKENS, 128), leaf(1, 4, TOKENS, 128)
    angles = torch.outer(torch.arange(TOKENS, dtype=torch.float32), torch.rand(64, generator=generator))
    angles = torch.cat([angles, angles], -1)
    cos, sin = angles.cos(), angles.sin()

    def permute():
        permuted, _ = lk.permute(x, routed.expert_indices, EXPERTS)
        permuted.backward(torch.ones_like(permuted))

    def unpermute():
        _, permute_map = lk.permute(x.detach(), routed.expert_indices, EXPERTS)
        lk.unpermute(rows, permute_map, expert_weights).sum().backward()

    def grouped_mm():
        out = lk.grouped_mm(rows, weights, counts)
        out.backward(torch.ones_like(out))
        for w in weights:
            w.grad = None

    def swiglu():
        lk.swiglu(gate, up).sum().backward()

    def rope():
        rq, rk = lk.apply_rope(q, k, cos, sin)
        torch.autograd.backward([rq, rk], [torch.ones_like(rq), torch.ones_like(rk)])

    return {"permute": permute, "unpermute": unpermute, "grouped_mm": grouped_mm,
            "swiglu": swiglu, "apply_rope": rope}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cpu-time", action="store_true", help="process CPU time, not wall time")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="call ling_kernels.allocator.keep_freed_memory() first (as ling-train does on CPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        from ling_kernels.allocator import keep_freed_memory

        print("keep_freed_memory:", keep_freed_memory())
    clock = time.process_time if args.cpu_time else time.perf_counter
    dtype = getattr(torch, args.dtype)
    print(f"{args.dtype}, {torch.get_num_threads()} threads, best of {args.rounds} "
          f"({'CPU' if args.cpu_time else 'wall'} ms, fwd+bwd)")
    for name, fn in cases(dtype).items():
        fn()  # warm up
        best = best_time(fn, args.rounds, clock)
        print(f"{name:12s} reference {best['reference'] * 1e3:8.1f}  fast {best['fast'] * 1e3:8.1f}"
              f"  fast/reference {best['fast'] / best['reference']:.2f}")


if __name__ == "__main__":
    main()
