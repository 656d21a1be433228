"""A byte tokenizer and a one-layer causal transformer with a KV cache: small stand-ins that
run anywhere, for examples, tests and for checking a model adapter against (not for scores)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ling_eval.model import EvalModel


class ByteTokenizer:
    """UTF-8 bytes shifted by 4 (ids 0-3 are pad/unk/bos/eos, as in ling-data's tokenizer)."""

    eos_id = 3
    vocab_size = 260

    def encode(self, text: str) -> list[int]:
        return [b + 4 for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i - 4 for i in ids if i >= 4).decode("utf-8", errors="replace")


class TinyTransformer(nn.Module):
    """Embedding + learned positions + one causal attention layer + MLP + output projection."""

    def __init__(self, vocab_size: int = 260, dim: int = 32, max_length: int = 256, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.max_length = max_length
        self.embed = nn.Embedding(vocab_size, dim)
        self.position = nn.Embedding(max_length, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.out = nn.Linear(dim, vocab_size)

    def extend(self, input_ids: torch.Tensor, cache=None, attention_mask: torch.Tensor | None = None):
        """Logits of `input_ids` continuing the positions held in `cache` = (keys, values);
        `attention_mask` [batch, cached + new]: 0 marks padding (see ling_eval.model)."""
        past = 0 if cache is None else cache[0].shape[1]
        batch, n = input_ids.shape
        slots = torch.arange(past + n, device=input_ids.device)
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + n, dtype=torch.bool, device=input_ids.device)
        attention_mask = attention_mask.bool()
        positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, past:]
        x = self.embed(input_ids) + self.position(positions)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=1), torch.cat([cache[1], v], dim=1)
        causal = slots[None, :] <= slots[past:, None]
        allowed = causal[None] & attention_mask[:, None, :]
        allowed = allowed | (slots[None, None, :] == slots[past:, None][None])  # a pad row attends to itself
        scores = (q @ k.transpose(1, 2)) / math.sqrt(q.shape[-1])
        attended = F.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v
        h = x + attended
        h = h + self.mlp(h)
        return self.out(h), (k, v)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.extend(input_ids)[0]

    def as_eval_model(self, use_cache: bool = True) -> EvalModel:
        return EvalModel(self.forward, self.extend if use_cache else None, max_length=self.max_length)
