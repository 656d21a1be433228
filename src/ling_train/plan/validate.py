"""The planner against measurement on this machine: memory exactly, step time at a calibrated MFU.

Memory: the planner's fp32 single-device prediction vs the bytes actually allocated: parameters,
gradients and AdamW moments after a step, plus the distinct storages autograd saves for the
backward (`saved_tensors_hooks`), which is the activation peak at the end of the forward.

Step time: the planner predicts FLOPs / (peak x MFU). Its MFU is an assumption; here it is
calibrated once, on the first (anchor) case, against a matmul timed the same way, and the other cases
are predicted with it, so the error measures how well FLOPs explain time across shapes. Steps
run on one thread and are timed by the process's CPU time, which on a shared machine excludes
the time spent waiting for other jobs (wall time is kept alongside).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from ling_core import LingConfig, build_model, flops_per_token, preset

from ling_train.plan.memory import PRECISIONS, Layout, memory_per_device


@dataclass(frozen=True)
class Case:
    name: str
    config: LingConfig
    batch: int
    seq_len: int


def default_cases() -> list[Case]:
    """The tiny preset (the anchor) and variations of one dimension each, small enough to run
    in about a minute on a shared CPU."""
    tiny = preset("tiny")
    return [
        Case("tiny b4 s128 (anchor)", tiny, 4, 128),
        Case("tiny b2 s256", tiny, 2, 256),
        Case("tiny b8 s128", tiny, 8, 128),
        Case("tiny hidden 384", tiny.replace(hidden_size=384, head_dim=96, moe_intermediate_size=384,
                                             intermediate_size=1152), 4, 128),
        Case("tiny 8 layers", tiny.replace(num_hidden_layers=8), 4, 128),
        Case("tiny 32 experts top-4", tiny.replace(num_experts=32, num_experts_per_tok=4), 4, 128),
    ]


@dataclass
class Measurement:
    case: Case
    step_s: float  # median CPU time of the timed steps (one thread)
    wall_s: float  # median wall time of the same steps
    state_bytes: int  # parameters + gradients + optimizer moments
    activation_bytes: int  # storages saved for the backward


def cpu_time_matmul_flops(size: int = 512, repeats: int = 20) -> float:
    """FLOP/s of a square fp32 matmul in process CPU time (best of `repeats`): the same clock the
    steps are timed with, so the calibrated MFU is a real fraction. `ling_train.perf` measures
    wall time, which on a shared machine includes waiting for other jobs."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        a @ b
        best = min(best, time.process_time() - start)
    return 2 * size**3 / max(best, 1e-9)


def saved_activation_bytes(model: torch.nn.Module, input_ids: torch.Tensor) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids, input_ids)
    return sum(seen.values())


def measure(case: Case, steps: int = 5, warmup: int = 2, seed: int = 0) -> Measurement:
    torch.manual_seed(seed)
    config = case.config
    model = build_model(config, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    input_ids = torch.randint(0, config.vocab_size, (case.batch, case.seq_len))
    times, walls = [], []
    for step in range(warmup + steps):
        start, wall_start = time.process_time(), time.perf_counter()
        model(input_ids, input_ids).loss.backward()
        optimizer.step()
        if step == warmup + steps - 1:  # grads still allocated: count them with the states
            state = sum(p.numel() * p.element_size() for p in model.parameters())
            state += sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
            state += sum(t.numel() * t.element_size() for s in optimizer.state.values()
                         for name, t in s.items() if name != "step")
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.process_time() - start)
            walls.append(time.perf_counter() - wall_start)
    activations = saved_activation_bytes(model, input_ids)
    return Measurement(case, statistics.median(times), statistics.median(walls), state, activations)


@dataclass
class Row:
    name: str
    predicted_state: float
    measured_state: int
    predicted_activations: float
    measured_activations: int
    predicted_step_s: float
    measured_step_s: float
    measured_wall_s: float

    @property
    def memory_error(self) -> float:
        predicted = self.predicted_state + self.predicted_activations
        measured = self.measured_state + self.measured_activations
        return predicted / measured - 1

    @property
    def step_error(self) -> float:
        return self.predicted_step_s / self.measured_step_s - 1


def validate(cases: list[Case], steps: int = 5, progress=None, threads: int | None = 1,
             ) -> tuple[list[Row], float, float]:
    """(rows, calibrated MFU, measured matmul FLOP/s). The first case is the MFU anchor.

    One intra-op thread by default: on a shared CPU, OpenMP threads that spin-wait for each other
    make step times swing by 10x, while a single thread's time stays proportional to its work."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        peak = cpu_time_matmul_flops()
        measurements = []
        for case in cases:
            measurements.append(measure(case, steps))
            if progress is not None:
                progress.update(1)
    finally:
        torch.set_num_threads(previous)
    anchor = measurements[0]
    anchor_flops = flops_per_token(anchor.case.config, anchor.case.seq_len) * anchor.case.batch * anchor.case.seq_len
    mfu = anchor_flops / (anchor.step_s * peak)
    rows = []
    for m in measurements:
        c = m.case
        memory = memory_per_device(c.config, Layout(1, micro_batch=c.batch), c.seq_len, PRECISIONS["fp32"])
        flops = flops_per_token(c.config, c.seq_len) * c.batch * c.seq_len
        rows.append(Row(c.name, memory.weights + memory.gradients + memory.optimizer, m.state_bytes,
                        memory.activations, m.activation_bytes, flops / (peak * mfu), m.step_s, m.wall_s))
    return rows, mfu, peak


def validation_markdown(rows: list[Row], mfu: float, peak: float) -> str:
    mib = 1024**2
    lines = [f"CPU matmul peak {peak / 1e9:.1f} GFLOP/s (one thread, CPU time), MFU calibrated on the anchor: {mfu:.1%}", "",
             "| case | states MiB pred / meas | activations MiB pred / meas | memory error | "
             "step CPU s pred / meas | step error | wall s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.name} | {r.predicted_state / mib:.2f} / {r.measured_state / mib:.2f} | "
                     f"{r.predicted_activations / mib:.2f} / {r.measured_activations / mib:.2f} | "
                     f"{r.memory_error:+.2%} | {r.predicted_step_s:.3f} / {r.measured_step_s:.3f} | "
                     f"{r.step_error:+.0%} | {r.measured_wall_s:.3f} |")
    return "\n".join(lines) + "\n"
