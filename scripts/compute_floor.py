"""How fast could the tiny training step be if nothing but its matmuls and attention ran?

Records every matmul (`mm`, `addmm`, `bmm`, in place and `out=` forms included) and every CPU
flash-attention call of one `Trainer.train_step` (a `TorchDispatchMode`, so the calls inside our
autograd Functions count too), with their exact shapes and strides, then replays those calls
alone on fresh tensors, back to back. The replay's time is the step's compute floor at these
shapes on this machine: the step minus the floor is everything else (elementwise, routing,
optimizer, Python, allocation). In the same run it measures the dense SwiGLU anchor of
benchmarks/test_train_throughput.py and the matmul rate, so the floor says which fraction of the
anchor the model could reach at best with its present shapes.

    uv run python scripts/compute_floor.py [--threads 2] [--rounds 10] [--top 12]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

MATMULS = {"mm", "addmm", "addmm_", "bmm", "baddbmm"}
ATTENTION = {"_scaled_dot_product_flash_attention_for_cpu",
             "_scaled_dot_product_flash_attention_for_cpu_backward"}


@dataclass(frozen=True)
class Spec:
    """A tensor argument, by layout only."""
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    def make(self) -> torch.Tensor:
        t = torch.empty_strided(self.size, self.stride, dtype=self.dtype)
        return t.uniform_(-1, 1) if t.is_floating_point() else t.zero_()


def _spec(value):
    return Spec(tuple(value.shape), tuple(value.stride()), value.dtype) if isinstance(value, torch.Tensor) else value


@dataclass
class Call:
    func: torch._ops.OpOverload
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return self.func.overloadpacket.__name__

    def flops(self) -> int:
        """Matmuls exactly; attention by ling_core.flops_per_token's convention (QK^T and AV,
        halved when causal; the backward twice the forward)."""
        a = self.args
        if self.name == "mm":
            (m, k), n = a[0].size, a[1].size[1]
            return 2 * m * k * n
        if self.name in ("addmm", "addmm_"):
            (m, k), n = a[1].size, a[2].size[1]
            return 2 * m * k * n
        if self.name in ("bmm", "baddbmm"):
            first, second = (a[0], a[1]) if self.name == "bmm" else (a[1], a[2])
            b, m, k = first.size
            return 2 * b * m * k * second.size[2]
        q = a[0] if self.name.endswith("_for_cpu") else a[1]
        batch, heads, seq, dim = q.size
        forward = 4 * batch * heads * seq * seq * dim // 2  # is_causal in the training step
        return forward if self.name.endswith("_for_cpu") else 2 * forward

    def label(self) -> str:
        tensors = [x for x in self.args if isinstance(x, Spec)]
        shapes = " x ".join("[" + ",".join(map(str, t.size)) + ("]T" if _transposed(t) else "]") for t in tensors)
        return f"{self.name} {shapes}"


def _transposed(spec: Spec) -> bool:
    return len(spec.size) == 2 and spec.stride[0] == 1 and spec.size[1] > 1


class RecordCompute(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: list[Call] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket.__name__ in MATMULS | ATTENTION:
            self.calls.append(Call(func, tree_map(_spec, args), tree_map(_spec, kwargs)))
        return func(*args, **kwargs)


def _materialise(value):
    return value.make() if isinstance(value, Spec) else value


def replay_seconds(calls: list[Call], rounds: int) -> tuple[float, dict[str, float]]:
    """Best-of-`rounds` seconds of the whole sequence, and each call label's share of the best
    round."""
    # Labels are formatted once here, not inside the timed loop.
    prepared = [(c.func, c.label(), tree_map(_materialise, c.args), tree_map(_materialise, c.kwargs))
                for c in calls]
    best, best_per_label = float("inf"), {}
    for _ in range(rounds + 1):  # the first round warms oneDNN's primitive caches
        per_label: dict[str, float] = defaultdict(float)
        start = time.perf_counter()
        for func, label, args, kwargs in prepared:
            t0 = time.perf_counter()
            func(*args, **kwargs)
            per_label[label] += time.perf_counter() - t0
        total = time.perf_counter() - start
        if total < best:
            best, best_per_label = total, per_label
    return best, best_per_label


def best_of(fn, rounds: int) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--top", type=int, default=12, help="call shapes listed, by time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from test_train_throughput import BATCH, SEQ_LEN, dense_anchor, tiny_trainer

    from ling_core import flops_per_token, preset
    from ling_train.perf import measure_matmul_flops

    config = preset("tiny")
    tokens = BATCH * SEQ_LEN
    step_flops = flops_per_token(config, SEQ_LEN) * tokens
    trainer = tiny_trainer()
    for _ in range(3):
        trainer.train_step()
    recorder = RecordCompute()
    with recorder:
        trainer.train_step()
    calls = recorder.calls
    floor_flops = sum(c.flops() for c in calls)

    rate = measure_matmul_flops(torch.device("cpu"))
    step = best_of(trainer.train_step, args.rounds)
    floor, per_label = replay_seconds(calls, args.rounds)
    dense_step, dense_flops = dense_anchor(config.hidden_size, step_flops, tokens)
    dense = best_of(dense_step, args.rounds)
    rate_after = measure_matmul_flops(torch.device("cpu"))

    anchor_rate = dense_flops / dense
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}; matmul rate "
          f"{rate / 1e9:.1f} GFLOP/s before, {rate_after / 1e9:.1f} after (best of each)")
    print(f"step:   {1e3 * step:7.1f} ms  {step_flops / 1e9:6.2f} GFLOP (flops_per_token)  "
          f"MFU {step_flops / step / rate:.3f}  model / anchor {step_flops / step / anchor_rate:.3f}")
    print(f"floor:  {1e3 * floor:7.1f} ms  {floor_flops / 1e9:6.2f} GFLOP in {len(calls)} calls  "
          f"{floor_flops / floor / 1e9:.1f} GFLOP/s = {floor_flops / floor / rate:.3f} of the rate, "
          f"{step_flops / floor / anchor_rate:.3f} of the anchor")
    print(f"anchor: {1e3 * dense:7.1f} ms  {dense_flops / 1e9:6.2f} GFLOP  "
          f"{anchor_rate / 1e9:.1f} GFLOP/s = {anchor_rate / rate:.3f} of the rate")
    print(f"step - floor = {1e3 * (step - floor):.1f} ms outside matmuls and attention "
          f"({(step - floor) / step:.1%} of the step)")
    flops_by_label: dict[str, int] = defaultdict(int)
    count_by_label: dict[str, int] = defaultdict(int)
    for c in calls:
        flops_by_label[c.label()] += c.flops()
        count_by_label[c.label()] += 1
    print(f"\n{'calls':>5} {'ms':>7} {'GFLOP/s':>8}  shape (T: transposed operand)")
    for label, seconds in sorted(per_label.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"{count_by_label[label]:5d} {1e3 * seconds:7.2f} {flops_by_label[label] / seconds / 1e9:8.1f}  {label}")


if __name__ == "__main__":
    main()
