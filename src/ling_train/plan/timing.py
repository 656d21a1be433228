"""Step time of a layout: compute at an assumed MFU plus the communication that is not hidden.

Compute: `flops_per_token` (6 x matmul weights + causal attention) x tokens per device, at
`mfu` x the device's peak (x 4/3 with full recomputation: one extra forward).

Communication, from bytes and bandwidth (ring collectives move (n-1)/n of the data per device):
- FSDP: per micro-batch, all-gather the sharded weights twice (forward and backward) in the
  compute dtype; per step, reduce-scatter the gradients in fp32. Prefetch hides it behind
  compute up to `overlap` x compute time.
- HSDP: FSDP groups of one replica all-reduce their gradient shards once per step.
- Expert parallelism: per micro-batch and MoE layer, the all-to-all dispatch and combine of
  k x hidden per token, forward and backward (one more forward with recomputation); on the
  critical path, not hidden.
- Local SGD: replicas all-reduce an fp32 pseudo-gradient every `sync_every` steps. EDiT
  syncs layer by layer during the next forward, hiding up to `edit_overlap` x a step's
  compute; plain DiLoCo (edit_overlap = 0) stalls for it.
A group's bandwidth is the device's intra-node figure when it fits in one node, else inter-node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ling_core import LingConfig, count_params, flops_per_token

from ling_train.plan.devices import DeviceClass
from ling_train.plan.memory import PRECISIONS, Layout, Precision, routed_expert_params


@dataclass(frozen=True)
class Assumptions:
    mfu: float = 0.4  # of the device's peak, on the compute alone; a device's own `mfu` wins
    overlap: float = 0.8  # fraction of compute time FSDP/HSDP traffic can hide behind
    sync_every: int = 100  # Local SGD inner steps between synchronisations (H)
    edit_overlap: float = 1 / 3  # EDiT: fraction of a step (its forward) a sync can hide behind
    bandwidth_scale: float = 1.0  # multiply every link's GB/s (what-if for slower networks)

    def mfu_for(self, device: DeviceClass) -> float:
        return device.mfu if device.mfu is not None else self.mfu


@dataclass
class StepEstimate:
    global_batch_tokens: int
    micro_batches: int  # gradient-accumulation steps per optimizer step
    compute_s: float
    fsdp_s: float  # FSDP + HSDP traffic time (before overlap)
    expert_all_to_all_s: float
    local_sgd_s: float  # per step, amortised over sync_every, after EDiT overlap
    step_s: float
    tokens_per_s: float
    mfu: float  # achieved: model FLOPs over (step time x peak), communication included


def _bandwidth(device: DeviceClass, group: int, assumptions: Assumptions) -> float:
    gbps = device.intra_node_gbps if group <= device.devices_per_node else device.inter_node_gbps
    return gbps * 1e9 * assumptions.bandwidth_scale


def _ring(n: int) -> float:
    return (n - 1) / n if n > 1 else 0.0


def estimate_step(config: LingConfig, layout: Layout, device: DeviceClass, seq_len: int,
                  global_batch_tokens: int, assumptions: Assumptions = Assumptions(),
                  precision: Precision = PRECISIONS["bf16-mixed"]) -> StepEstimate:
    tokens_per_device = global_batch_tokens / layout.devices
    tokens_per_micro = layout.micro_batch * seq_len
    micro_batches = max(1, math.ceil(tokens_per_device / tokens_per_micro))
    tokens_per_device = micro_batches * tokens_per_micro  # what the devices actually process
    global_batch_tokens = int(tokens_per_device * layout.devices)

    fpt = flops_per_token(config, seq_len)
    recompute_factor = 4 / 3 if layout.recompute else 1.0
    compute = fpt * recompute_factor * tokens_per_device / (device.peak_flops * assumptions.mfu_for(device))

    total, _ = count_params(config)
    experts = routed_expert_params(config)
    non_experts = total - experts
    f, e = layout.fsdp, layout.ep
    # Weights a device gathers for compute: all non-expert weights; its own EP group's experts.
    gathered_experts = experts / e
    expert_gather_group = max(f // e, 1)
    gather_bytes = precision.compute_bytes * (non_experts * _ring(f) + gathered_experts * _ring(expert_gather_group))
    reduce_bytes = 4 * (non_experts * _ring(f) + gathered_experts * _ring(expert_gather_group))
    fsdp = (2 * micro_batches * gather_bytes + reduce_bytes) / _bandwidth(device, f, assumptions)
    groups = layout.devices_per_replica // f
    shard_params = non_experts / f + experts / max(f, e)
    hsdp = 2 * _ring(groups) * 4 * shard_params / _bandwidth(device, layout.devices_per_replica, assumptions)
    fsdp_total = fsdp + hsdp

    passes = 3 if layout.recompute else 2  # forward (+ recomputed forward) and backward
    a2a_bytes = (micro_batches * tokens_per_micro * config.num_moe_layers * passes * 2
                 * config.num_experts_per_tok * config.hidden_size * precision.compute_bytes * _ring(e))
    a2a = a2a_bytes / _bandwidth(device, e, assumptions) if e > 1 else 0.0

    local_sgd = 0.0
    if layout.replicas > 1:
        sync = 2 * _ring(layout.replicas) * 4 * shard_params / (
            device.inter_node_gbps * 1e9 * assumptions.bandwidth_scale)
        local_sgd = max(0.0, sync - assumptions.edit_overlap * compute) / assumptions.sync_every

    exposed_fsdp = max(0.0, fsdp_total - assumptions.overlap * compute)
    step = compute + exposed_fsdp + a2a + local_sgd
    tokens_per_s = global_batch_tokens / step
    achieved = fpt * tokens_per_s / (device.peak_flops * layout.devices)
    return StepEstimate(global_batch_tokens, micro_batches, compute, fsdp_total, a2a, local_sgd,
                        step, tokens_per_s, achieved)
