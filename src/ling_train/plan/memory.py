"""Per-device memory of a training layout, from the config alone.

Model states follow FSDP2 with a bf16 compute / fp32 master policy (torch-native, what ling-dist
wraps): each device keeps its shard of fp32 weights, fp32 gradients and AdamW's two fp32
moments (16 bytes per parameter, as ZeRO counts), gathers one layer at a time into a bf16
buffer (two with prefetch), and Local SGD (DiLoCo / EDiT) adds an fp32 anchor and an fp32
outer momentum per sharded parameter.

Activations are what autograd saves for the backward. `activation_bytes_per_token` lists,
tensor by tensor, what *our* implementation saves (ling_core.model / moe / layers and the
chunked cross-entropy of ling-kernels); tests/test_plan_memory.py checks it against the
tensors autograd actually saves.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ling_core import LingConfig, count_params
from ling_core.counting import expert_params

GIB = 1024**3


@dataclass(frozen=True)
class Precision:
    """Bytes per parameter of each model state, and per element of the saved activations."""
    name: str
    weight_bytes: int  # the sharded copy the optimizer updates
    grad_bytes: int
    optimizer_bytes: int  # AdamW moments (and any master copy beyond `weight_bytes`)
    compute_bytes: int  # gathered weights and activations
    local_sgd_bytes: int = 8  # fp32 anchor + fp32 outer momentum (DiLoCo Nesterov)


PRECISIONS = {
    "bf16-mixed": Precision("bf16-mixed", weight_bytes=4, grad_bytes=4, optimizer_bytes=8, compute_bytes=2),
    "fp32": Precision("fp32", weight_bytes=4, grad_bytes=4, optimizer_bytes=8, compute_bytes=4),
}


@dataclass(frozen=True)
class Layout:
    """How the devices of one cluster are used.

    devices = replicas x devices_per_replica. Inside a replica, non-expert weights are sharded
    over `fsdp` devices (FSDP/HSDP: several FSDP groups of one replica all-reduce their shards),
    routed experts are split whole over `ep` devices and sharded further when fsdp > ep, so
    expert weights are divided max(fsdp, ep) ways. Replicas synchronise with Local SGD.
    """
    devices: int
    fsdp: int = 1
    ep: int = 1
    replicas: int = 1
    micro_batch: int = 1  # sequences per device per forward/backward
    recompute: bool = False  # full activation recomputation, one decoder layer at a time

    @property
    def devices_per_replica(self) -> int:
        return self.devices // self.replicas

    def problems(self, config: LingConfig) -> list[str]:
        """Why this layout cannot run at all (empty when it is well-formed)."""
        out = []
        for name in ("devices", "fsdp", "ep", "replicas", "micro_batch"):
            if getattr(self, name) < 1:
                out.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if out:
            return out
        if self.devices % self.replicas:
            out.append(f"{self.replicas} Local SGD replicas do not divide {self.devices} devices")
        elif self.devices_per_replica % self.fsdp:
            out.append(f"FSDP group of {self.fsdp} does not divide {self.devices_per_replica} devices per replica")
        if config.num_moe_layers and config.num_experts % self.ep:
            out.append(f"expert-parallel degree {self.ep} does not divide {config.num_experts} experts")
        elif self.ep > 1 and not config.num_moe_layers:
            out.append("expert parallelism needs MoE layers")
        if self.ep > 1 and self.devices % self.replicas == 0 and self.devices_per_replica % self.ep:
            out.append(f"expert-parallel degree {self.ep} does not divide {self.devices_per_replica} devices per replica")
        if max(self.fsdp, self.ep) % min(self.fsdp, self.ep):
            out.append(f"FSDP group {self.fsdp} and expert-parallel degree {self.ep}: one must divide the other")
        return out


def routed_expert_params(config: LingConfig) -> int:
    return config.num_moe_layers * config.num_experts * expert_params(config)


def largest_gathered_params(config: LingConfig, ep: int) -> int:
    """Parameters FSDP gathers at once on one device: the largest decoder layer (only this
    device's experts under expert parallelism) or the embedding / output head."""
    total, _ = count_params(config)
    per_layer_experts = config.num_experts * expert_params(config) // ep if config.num_moe_layers else 0
    embed = config.vocab_size * config.hidden_size
    non_expert_layers = total - routed_expert_params(config) - 2 * embed - config.hidden_size
    # Layers differ (dense vs MoE); the mean non-expert layer is close enough for a buffer size.
    layer = non_expert_layers // config.num_hidden_layers + per_layer_experts
    return max(layer, embed)


def activation_bytes_per_token(config: LingConfig, precision: Precision) -> dict[str, float]:
    """Bytes autograd saves per token: per dense layer, per MoE layer, and outside the layers.

    Our modules save, per token (h hidden, q = heads*head_dim, kv = kv_heads*head_dim):
    RMSNorm: its input, rstd (fp32) and normed output, and the scaled output feeding the next
    matmul (3h + 1); attention: the fused qkv output (q + 2kv; v is a view of it), the roped q
    and k (q + kv), SDPA's output and logsumexp (q + heads, fp32; the output is laid out
    [batch, seq, heads, dim], so `dense` sees a view of it, not a copy); SwiGLU (ling_kernels.swiglu):
    gate and up, plus the product the down projection keeps (3 x intermediate). The MoE router
    runs in fp32 and saves logits, probs, the top-k indices and renormalisation terms; the routed
    path (ling_kernels permute / grouped_mm / unpermute) saves the gathered inputs and the
    experts' outputs (2 x k x h) plus int64 slot indices."""
    a, f32, i64 = precision.compute_bytes, 4, 8
    h, q = config.hidden_size, config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    k, experts = config.num_experts_per_tok, config.num_experts
    norm = a * 3 * h + f32
    attention = norm + a * ((q + 2 * kv) + (q + kv) + q) + f32 * config.num_attention_heads
    dense_mlp = norm + a * 3 * config.intermediate_size
    router = f32 * (2 * experts + 1 + 2 + 2 * k) + i64 * 3 * k
    shared = a * 3 * config.moe_intermediate_size * config.num_shared_experts
    routed = a * (2 * k * h + 3 * k * config.moe_intermediate_size)
    moe_mlp = norm + router + routed + shared
    # Final norm (its output goes to the loss, which saves its gradient instead: same size) and
    # the embedding's int64 ids.
    outside = norm + i64
    return {"dense_layer": attention + dense_mlp, "moe_layer": attention + moe_mlp, "outside": outside}


def fixed_activation_bytes(config: LingConfig, seq_len: int) -> int:
    """Saved per micro-batch whatever its size: the chunked cross-entropy's fp32 [vocab, hidden]
    weight gradient (computed in the forward, Liger-style), NormHead's fp32 column norms, and each
    layer's fp32 RoPE cos/sin tables [seq, head_dim]."""
    v, h = config.vocab_size, config.hidden_size
    rope = config.num_hidden_layers * 2 * seq_len * config.head_dim * 4
    return 4 * v * h + (4 * h if config.norm_head else 0) + rope


@dataclass
class MemoryBreakdown:
    weights: float
    gradients: float
    optimizer: float
    local_sgd: float
    fsdp_buffers: float
    activations: float
    activations_without_recompute: float
    activations_with_recompute: float
    expert_states: float  # the routed experts' share of weights + grads + optimizer + local SGD

    @property
    def states(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.local_sgd

    @property
    def total(self) -> float:
        return self.states + self.fsdp_buffers + self.activations

    def as_gib(self) -> dict[str, float]:
        d = {f.name: getattr(self, f.name) / GIB for f in fields(self)}
        d["total"] = self.total / GIB
        return d


def memory_per_device(config: LingConfig, layout: Layout, seq_len: int,
                      precision: Precision = PRECISIONS["bf16-mixed"]) -> MemoryBreakdown:
    """Bytes one device holds at the activation peak (end of the forward)."""
    total, _ = count_params(config)
    experts = routed_expert_params(config)
    expert_shards = max(layout.fsdp, layout.ep)
    params_here = (total - experts) / layout.fsdp + experts / expert_shards
    experts_here = experts / expert_shards
    local_sgd_bytes = precision.local_sgd_bytes if layout.replicas > 1 else 0
    per_param = precision.weight_bytes + precision.grad_bytes + precision.optimizer_bytes + local_sgd_bytes

    # Sharded FSDP gathers one layer at a time (two with prefetch) in the compute dtype.
    sharded = layout.fsdp > 1 or layout.ep > 1
    buffers = 2 * largest_gathered_params(config, layout.ep) * precision.compute_bytes if sharded else 0
    if not sharded and precision.compute_bytes != precision.weight_bytes:
        buffers = total * precision.compute_bytes  # an unsharded bf16 copy next to the fp32 master

    per_token = activation_bytes_per_token(config, precision)
    tokens = layout.micro_batch * seq_len
    n_dense, n_moe = config.first_k_dense_replace, config.num_moe_layers
    layers_bytes = n_dense * per_token["dense_layer"] + n_moe * per_token["moe_layer"]
    head = fixed_activation_bytes(config, seq_len)
    full = tokens * (layers_bytes + per_token["outside"]) + head
    largest_layer = max(per_token["moe_layer"] if n_moe else 0, per_token["dense_layer"] if n_dense else 0)
    # Recomputation keeps each layer's input, and during the backward one layer's activations.
    recomputed = tokens * (config.num_hidden_layers * precision.compute_bytes * config.hidden_size
                           + largest_layer + per_token["outside"]) + head
    return MemoryBreakdown(
        weights=params_here * precision.weight_bytes,
        gradients=params_here * precision.grad_bytes,
        optimizer=params_here * precision.optimizer_bytes,
        local_sgd=params_here * local_sgd_bytes,
        fsdp_buffers=buffers,
        activations=recomputed if layout.recompute else full,
        activations_without_recompute=full,
        activations_with_recompute=recomputed,
        expert_states=experts_here * per_param,
    )


def infeasibility(memory: MemoryBreakdown, capacity_bytes: float) -> str | None:
    """Why `memory` does not fit in `capacity_bytes`, naming the first part that overflows."""
    def gib(x: float) -> str:
        return f"{x / GIB:.1f} GiB"
    cap = gib(capacity_bytes)
    if memory.expert_states > capacity_bytes:
        return f"experts do not fit: {gib(memory.expert_states)} > {cap}"
    if memory.states > capacity_bytes:
        return f"model states do not fit: {gib(memory.states)} > {cap}"
    if memory.states + memory.fsdp_buffers > capacity_bytes:
        return f"states + gathered layers do not fit: {gib(memory.states + memory.fsdp_buffers)} > {cap}"
    if memory.total > capacity_bytes:
        return (f"activations do not fit: states {gib(memory.states + memory.fsdp_buffers)} + "
                f"activations {gib(memory.activations)} = {gib(memory.total)} > {cap}")
    return None
