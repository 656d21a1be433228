"""Building blocks shared by the attention, dense and MoE layers.

`Linear` and `Embedding` skip PyTorch's initialisation at construction: the model initialises
once in `init_weights()`, and skipping the per-module kaiming/normal draws makes building the
290B preset on `meta` (17k Linear modules) several times faster.
"""

from __future__ import annotations

import torch
from torch import nn

from ling_kernels import rms_norm, swiglu


class Linear(nn.Linear):
    def reset_parameters(self) -> None:
        pass  # LingForCausalLM.init_weights() initialises every weight


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        pass


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ling-kernels normalises and scales in fp32 and returns x's dtype. HF rounds the
        # normalised value to x's dtype before the scale: the two differ by one bf16 rounding.
        return rms_norm(x, self.weight, self.eps)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the dense MLP, each routed expert and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
