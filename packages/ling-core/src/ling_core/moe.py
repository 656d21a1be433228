"""The Mixture-of-Experts layer: softmax router with top-k, routed SwiGLU experts, shared experts.

Parameter names follow HF Ling v1 (`mlp.gate.weight`, `mlp.experts.E.*`, `mlp.shared_experts.*`)
so checkpoints move between us and HF unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

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
        probs = scores.softmax(dim=-1)
        top_weights, top_indices = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob and self.top_k > 1:
            top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        tokens_per_expert = torch.bincount(top_indices.reshape(-1), minlength=self.num_experts)
        # Switch-style balance loss: fraction of routed slots f_e times mean probability P_e.
        slot_fraction = tokens_per_expert.to(probs.dtype) / top_indices.numel()
        balance_loss = self.num_experts * (slot_fraction * probs.mean(dim=0)).sum()
        router_z_loss = torch.logsumexp(logits, dim=-1).square().mean()
        return Routing(top_indices, top_weights, tokens_per_expert, balance_loss, router_z_loss)


class MoE(nn.Module):
    """Routed experts plus always-on shared experts (intermediate = moe_intermediate_size x
    num_shared_experts, as HF Ling). Tokens are sorted by expert so each expert runs one dense
    matmul over a contiguous segment, then weighted and scattered back."""

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
        k = routing.expert_indices.shape[-1]
        slot_order = routing.expert_indices.reshape(-1).argsort(stable=True)
        token_of_slot = slot_order // k
        # index_select, not x[token_of_slot]: its backward is one index_add where advanced
        # indexing's is a sort-based index_put (~40% faster gather fwd+bwd on CPU, benchmarks/).
        segments = x.index_select(0, token_of_slot).split(routing.tokens_per_expert.tolist())
        outputs = [expert(seg) for expert, seg in zip(self.experts, segments) if seg.shape[0] > 0]
        expert_out = torch.cat(outputs) if outputs else x.new_zeros(0, x.shape[-1])
        slot_weights = routing.expert_weights.reshape(-1)[slot_order].unsqueeze(-1)
        weighted = (expert_out.float() * slot_weights).to(x.dtype)
        return torch.zeros_like(x).index_add(0, token_of_slot, weighted)
