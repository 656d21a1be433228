"""Days and cost of a run, and the search for the cheapest feasible layout on each device class."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

from ling_core import LingConfig

from ling_train.plan.devices import Cluster, DeviceTable
from ling_train.plan.memory import (GIB, PRECISIONS, Layout, MemoryBreakdown, Precision, infeasibility,
                                    memory_per_device)
from ling_train.plan.timing import Assumptions, StepEstimate, estimate_step

USABLE_MEMORY = 0.9  # allocator fragmentation, CUDA context, communication buffers


@dataclass
class Plan:
    cluster: Cluster
    layout: Layout
    memory: MemoryBreakdown
    step: StepEstimate
    tokens: float
    why_infeasible: str | None

    @property
    def feasible(self) -> bool:
        return self.why_infeasible is None

    @property
    def days(self) -> float:
        return self.tokens / self.step.tokens_per_s / 86400

    @property
    def device_hours(self) -> float:
        return self.days * 24 * self.layout.devices

    @property
    def cost(self) -> float:
        return self.device_hours * self.cluster.device.price_per_hour


def plan_layout(config: LingConfig, cluster: Cluster, layout: Layout, tokens: float, seq_len: int,
                global_batch_tokens: int, assumptions: Assumptions = Assumptions(),
                precision: Precision = PRECISIONS["bf16-mixed"]) -> Plan:
    problems = layout.problems(config)
    per_step = layout.devices * layout.micro_batch * seq_len
    if per_step > global_batch_tokens:
        problems.append(f"micro-batch {layout.micro_batch} x {layout.devices} devices x {seq_len} tokens = "
                        f"{per_step} tokens exceeds the global batch of {global_batch_tokens}")
    if layout.devices > cluster.count:
        problems.append(f"needs {layout.devices} devices, cluster {cluster.name} has {cluster.count}")
    memory = memory_per_device(config, layout, seq_len, precision)
    step = estimate_step(config, layout, cluster.device, seq_len, global_batch_tokens, assumptions, precision)
    why = "; ".join(problems) or infeasibility(memory, cluster.device.memory_gib * GIB * USABLE_MEMORY)
    return Plan(cluster, layout, memory, step, tokens, why)


def _powers_of_two(limit: int) -> list[int]:
    out, n = [], 1
    while n <= limit:
        out.append(n)
        n *= 2
    return out


def candidate_layouts(config: LingConfig, devices: int, max_micro_batch: int = 8) -> list[Layout]:
    """Power-of-two FSDP groups, expert-parallel degrees and Local SGD replica counts that tile
    `devices`, micro-batches 1..max_micro_batch, with and without recomputation."""
    micro_batches = [m for m in (1, 2, 4, 8) if m <= max(max_micro_batch, 1)]
    experts = config.num_experts if config.num_moe_layers else 1
    out = []
    for replicas in _powers_of_two(min(devices, 64)):
        if devices % replicas:
            continue
        per_replica = devices // replicas
        for fsdp, ep, micro, recompute in product(_powers_of_two(per_replica), _powers_of_two(min(per_replica, experts)),
                                                  micro_batches, (False, True)):
            layout = Layout(devices, fsdp, ep, replicas, micro, recompute)
            if not layout.problems(config):
                out.append(layout)
    return out


def cheapest(config: LingConfig, cluster: Cluster, tokens: float, seq_len: int, global_batch_tokens: int,
             assumptions: Assumptions = Assumptions(), precision: Precision = PRECISIONS["bf16-mixed"],
             ) -> tuple[Plan | None, Plan | None]:
    """(cheapest feasible plan on the whole cluster, or None; the plan that came closest to
    fitting, to explain why nothing fits)."""
    best: Plan | None = None
    closest: Plan | None = None
    max_micro = global_batch_tokens // (cluster.count * seq_len)
    for layout in candidate_layouts(config, cluster.count, max_micro):
        plan = plan_layout(config, cluster, layout, tokens, seq_len, global_batch_tokens, assumptions, precision)
        if plan.feasible:
            if best is None or (plan.cost, plan.memory.total) < (best.cost, best.memory.total):
                best = plan
        elif closest is None or plan.memory.total < closest.memory.total:
            closest = plan
    return best, closest


def plan_table(config: LingConfig, table: DeviceTable, tokens: float, seq_len: int, global_batch_tokens: int,
               assumptions: Assumptions = Assumptions(), precision: Precision = PRECISIONS["bf16-mixed"],
               ) -> list[tuple[Cluster, Plan | None, Plan | None]]:
    return [(cluster, *cheapest(config, cluster, tokens, seq_len, global_batch_tokens, assumptions, precision))
            for cluster in table.clusters]
