"""The Mixture-of-Experts layer: softmax router with top-k, routed SwiGLU experts, shared experts.

Parameter names follow HF Ling v1 (`mlp.gate.weight`, `mlp.experts.E.*`, `mlp.shared_experts.*`)
so checkpoints move between us and HF unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ling_kernels import grouped_mm, permute, route, swiglu, unpermute

from ling_core.config import LingConfig
from ling_core.layers import SwiGLU


@dataclass
class Routing:
    expert_indices: torch.Tensor  # [tokens, k] int64, distinct experts per token
    expert_weights: torch.Tensor  # [tokens, k] float32 combine weights
    tokens_per_expert: torch.Tensor  # [num_experts] int64
    balance_loss: torch.Tensor  # scalar: num_experts * sum_e f_e * P_e (1.0 when perfectly balanced)
    router_z_loss: torch.Tensor  # scalar: mean over tokens of logsumexp(logits)^2


class Router(nn.Module):
    """Softmax router with top-k selection, optional top-k renormalisation and Stochastic Routing
    Warmup (Ling report): for the first W training steps the router logits s are blended with noise,
    s' = a*s + (1-a)*(mu + sigma*eps), a = min(step/W, 1), mu and sigma the logits' own mean and
    standard deviation, so early routing is spread across experts before the router has learnt."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, norm_topk_prob: bool,
                 routing_warmup_steps: int = 0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.num_experts = num_experts
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.routing_warmup_steps = routing_warmup_steps
        self.step = 0  # set by the trainer through LingForCausalLM.set_step

    def warmup_alpha(self) -> float:
        if not self.training or self.routing_warmup_steps <= 0:
            return 1.0
        return min(self.step / self.routing_warmup_steps, 1.0)

    def forward(self, x: torch.Tensor) -> Routing:
        # Routing decisions in fp32: bf16 logits flip near-tied top-k choices between devices.
        logits = F.linear(x.float(), self.weight.float())
        scores = logits
        alpha = self.warmup_alpha()
        if alpha < 1.0:
            stats = logits.detach()
            noise = stats.mean() + stats.std() * torch.randn_like(stats)
            scores = alpha * logits + (1.0 - alpha) * noise
        routed = route(scores, self.top_k, self.norm_topk_prob)
        # Switch-style balance loss: fraction of routed slots f_e times mean probability P_e.
        slot_fraction = routed.tokens_per_expert.to(routed.probs.dtype) / routed.expert_indices.numel()
        balance_loss = self.num_experts * (slot_fraction * routed.probs.mean(dim=0)).sum()
        router_z_loss = torch.logsumexp(logits, dim=-1).square().mean()
        return Routing(routed.expert_indices, routed.expert_weights, routed.tokens_per_expert,
                       balance_loss, router_z_loss)


class MoE(nn.Module):
    """Routed experts plus always-on shared experts (intermediate = moe_intermediate_size x
    num_shared_experts, as HF Ling). Token copies are sorted by expert (ling-kernels `permute`),
    each projection is one grouped GEMM over the per-expert segments (`grouped_mm`, reading the
    per-expert HF-named weights in place), and the outputs are weighted and summed back per
    token (`unpermute`)."""

    def __init__(self, config: LingConfig):
        super().__init__()
        h, f = config.hidden_size, config.moe_intermediate_size
        self.gate = Router(h, config.num_experts, config.num_experts_per_tok,
                           config.norm_topk_prob, config.routing_warmup_steps)
        self.experts = nn.ModuleList(SwiGLU(h, f, config.use_bias) for _ in range(config.num_experts))
        self.shared_experts = (SwiGLU(h, f * config.num_shared_experts, config.use_bias)
                               if config.num_shared_experts > 0 else None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        routing = self.gate(x)
        out = self.routed_experts(x, routing)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.reshape(shape), routing

    def routed_experts(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        permuted, permute_map = permute(x, routing.expert_indices, len(self.experts))
        counts = routing.tokens_per_expert.tolist()  # one host sync for the three GEMMs

        def project(inputs: torch.Tensor, name: str) -> torch.Tensor:
            layers = [getattr(expert, name) for expert in self.experts]
            biases = [layer.bias for layer in layers] if layers[0].bias is not None else None
            return grouped_mm(inputs, [layer.weight for layer in layers], counts, biases)

        hidden = swiglu(project(permuted, "gate_proj"), project(permuted, "up_proj"))
        return unpermute(project(hidden, "down_proj"), permute_map, routing.expert_weights)
