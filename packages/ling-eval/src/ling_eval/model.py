"""What ling-eval needs from a model and a tokenizer, so it works with any causal LM.

A model is a callable `input_ids [batch, seq] (int64) -> logits [batch, seq, vocab]`. It may
also offer `extend(input_ids, cache, attention_mask=None) -> (logits, cache)`: run `input_ids`
as the positions following those already held in `cache` (`None` = empty) and return their
logits and the grown cache. `attention_mask` [batch, cached + seq] (HF convention) is 1 for real
tokens and 0 for padding, over the cached and the new positions: padded keys are never attended
to and a token's position is the number of real tokens before it, so rows of different lengths
(left-padded contexts) share one batch. The cache is any nest of tuples/lists/dicts of tensors
whose first dimension is the batch, so ling-eval can repeat a context's cache for each of its
choices with `select_rows`.
With `extend`, a multiple-choice context is run once for all its choices and greedy generation
costs one token per step; without it, ling-eval falls back to full forwards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.utils import _pytree as pytree


class Tokenizer(Protocol):
    """`encode` adds no BOS/EOS; `eos_id` ends a document (and a generation)."""

    @property
    def eos_id(self) -> int: ...
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


Forward = Callable[[torch.Tensor], torch.Tensor]
Extend = Callable[..., tuple[torch.Tensor, Any]]  # (input_ids, cache, attention_mask=None)


@dataclass
class EvalModel:
    """A causal LM as ling-eval sees it.

    `forward`: input_ids -> logits. `extend`: optional KV-cache step (see the module docstring).
    `max_length`: the longest sequence the model takes; longer inputs keep their last tokens.
    `device`: where input ids are put.
    """

    forward: Forward
    extend: Extend | None = None
    max_length: int = 2048
    device: torch.device | str = "cpu"

    @property
    def has_cache(self) -> bool:
        return self.extend is not None

    def tensor(self, rows: Sequence[Sequence[int]], pad_id: int = 0) -> torch.Tensor:
        """Right-padded [len(rows), longest] int64 tensor on the model's device. Right padding
        never changes a causal model's outputs at the real positions."""
        width = max(len(r) for r in rows)
        out = torch.full((len(rows), width), pad_id, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        return out.to(self.device)


def select_rows(cache: Any, index: torch.Tensor) -> Any:
    """The cache's rows `index` (e.g. one context's cache repeated once per choice)."""
    return pytree.tree_map(lambda t: t.index_select(0, index.to(t.device)) if torch.is_tensor(t) else t, cache)
