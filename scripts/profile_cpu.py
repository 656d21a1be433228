"""Where a CPU training step's time goes: a per-op profile (torch.profiler, self CPU time) of
the benchmark MoE block (benchmarks/test_moe_block.py) and of the tiny preset's whole
`Trainer.train_step` (benchmarks/test_train_throughput.py), grouped into the categories of
packages/ling-kernels/README.md's breakdown.

    uv run python scripts/profile_cpu.py [--subject step|block|both] [--threads 2] [--steps 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

# aten op name -> category; the first matching prefix wins, everything else is "other".
CATEGORIES = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("attention", ("aten::_scaled_dot_product", "aten::scaled_dot_product")),
    ("gather/scatter (permute, embedding)", ("aten::index", "aten::embedding", "aten::gather",
                                             "aten::scatter", "aten::index_add", "aten::index_put",
                                             "aten::index_select", "aten::take")),
    ("sort/top-k (route)", ("aten::sort", "aten::topk", "aten::argsort", "aten::bincount")),
    ("activation (silu, softmax)", ("aten::silu", "aten::softmax", "aten::_softmax", "aten::log_softmax",
                                   "aten::_log_softmax", "aten::sigmoid", "aten::exp", "aten::logsumexp")),
    ("norm (rms, grad clip)", ("aten::rsqrt", "aten::norm", "aten::linalg_vector_norm", "aten::pow",
                               "aten::mean", "aten::rms_norm", "aten::_foreach_norm")),
    ("optimizer (foreach)", ("aten::_foreach", "aten::_fused_adam")),
    ("elementwise", ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::neg", "aten::cat",
                     "aten::copy_", "aten::clone", "aten::fill_", "aten::zero_", "aten::zeros",
                     "aten::sum", "aten::where", "aten::masked", "aten::addcmul", "aten::lerp",
                     "aten::cos", "aten::sin", "aten::to", "aten::_to_copy", "aten::clamp")),
    ("allocation", ("aten::empty", "aten::new_empty", "aten::empty_like", "aten::resize_")),
)


def category(name: str) -> str:
    for label, prefixes in CATEGORIES:
        if name.startswith(prefixes):
            return label
    return "other"


def report(prof, wall: float, rounds: int, title: str, top: int) -> None:
    """Per-round seconds: the profile's totals cover all `rounds`."""
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    per_round = 1e6 * rounds
    total = sum(e.self_cpu_time_total for e in events) / per_round
    by_category: dict[str, float] = defaultdict(float)
    for e in events:
        by_category[category(e.key)] += e.self_cpu_time_total / per_round
    print(f"\n## {title}: {wall:.3f} s wall per round, aten self CPU {total:.3f} s per round "
          f"(the rest is Python, autograd and the profiler)")
    for label, seconds in sorted(by_category.items(), key=lambda kv: -kv[1]):
        print(f"  {label:40s} {seconds:8.4f} s  {100 * seconds / wall:5.1f}% of wall")
    print(f"  top {top} ops by self CPU time:")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
        print(f"    {e.key:40s} {e.self_cpu_time_total / per_round:8.4f} s  {e.count // rounds:6d} calls")


def profile_rounds(fn, setup, rounds: int):
    for _ in range(2):  # warm-up (allocator, oneDNN primitive caches)
        setup()
        fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(rounds):
            setup()
            with record_function("round"):
                fn()
        wall = (time.perf_counter() - start) / rounds
    return prof, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subject", choices=("step", "block", "both"), default="both")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--steps", type=int, default=5, help="profiled rounds (after 2 warm-up rounds)")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}")
    if args.subject in ("block", "both"):
        import test_moe_block as b
        block = b.make_block()
        x, grad_out = b.make_inputs()
        prof, wall = profile_rounds(lambda: b.forward_backward(block, x, grad_out),
                                    lambda: b.clear_grads(block, x), args.steps)
        report(prof, wall, args.steps, "MoE block fwd+bwd (benchmark shape)", args.top)
    if args.subject in ("step", "both"):
        from test_train_throughput import tiny_trainer
        trainer = tiny_trainer()
        prof, wall = profile_rounds(trainer.train_step, lambda: None, args.steps)
        report(prof, wall, args.steps, "tiny Trainer.train_step (16 x 128 tokens)", args.top)


if __name__ == "__main__":
    main()
