"""DiLoCo (Douillard et al. 2023, arXiv 2311.08105): the synchronous member of the Local SGD family.

Each worker runs `sync_every` (H) steps of its own inner optimizer without talking to anyone.
Then all workers average their *pseudo-gradient* (anchor - local parameters, i.e. how far
they moved since the last sync), an outer optimizer (SGD with Nesterov momentum) takes one
step on the shared anchor with that average as its gradient, and every worker restarts from
the new anchor. Communication drops to one all-reduce every H steps instead of every step,
which is what lets slow links and heterogeneous devices train one model.

Workers may process different numbers of tokens per step (a small GPU and a large one side
by side), so the average is weighted by the tokens each worker processed since the last sync:
a worker that saw twice the data moves the anchor twice as much.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


class DiLoCo:
    """Wrap an inner optimizer so that every `sync_every` steps the workers average and take an outer step.

    `model` is any `nn.Module`; its parameters that require grad are synchronised (buffers,
    e.g. BatchNorm statistics, stay local). The inner optimizer's state is never
    communicated: each worker keeps its own, as in the paper.

    The anchor is an fp32 copy of each parameter on that parameter's device: fp32 so that a
    bf16 model does not lose small outer updates to rounding, and on the parameter's device
    because the pseudo-gradient, the all-reduce (nccl needs CUDA tensors) and the outer step
    all run there; it costs one fp32 copy of the model in that device's memory.

    `bytes_communicated` counts the payload this rank hands to collectives: the parameters, in
    their own dtype, once at construction (broadcast from rank 0 so every worker starts from
    the same anchor),
    then per sync 8 bytes (the int64 token count) plus 4 bytes per synchronised parameter
    element (the fp32 pseudo-gradient). It is the buffer size, not the wire traffic, which
    depends on the collective's algorithm (a ring all-reduce sends about 2(w-1)/w of it).
    With one process there is no process group and the count stays 0.

    Collectives run on `process_group` (default: the default group, if one exists). All ranks
    must use the same `sync_every` and call `step` equally often, so they reach each sync together.
    """

    def __init__(self, model: nn.Module, inner_optimizer: torch.optim.Optimizer, *, sync_every: int,
                 outer_lr: float = 0.7, outer_momentum: float = 0.9, outer_nesterov: bool = True,
                 process_group: dist.ProcessGroup | None = None, bucket_numel: int = 2**25) -> None:
        if sync_every < 1:
            raise ValueError(f"sync_every={sync_every}: expected >= 1 inner steps between syncs")
        if bucket_numel < 1:
            raise ValueError(f"bucket_numel={bucket_numel}: expected >= 1")
        self.inner_optimizer = inner_optimizer
        self.sync_every = sync_every
        self.process_group = process_group
        self.bucket_numel = bucket_numel
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("model has no parameters that require grad; nothing to synchronise")
        self.distributed = dist.is_available() and dist.is_initialized()
        self.bytes_communicated = 0
        if self.distributed:
            with torch.no_grad():
                for p in self.params:
                    dist.broadcast(p, src=dist.get_global_rank(self._group(), 0), group=process_group)
                    self.bytes_communicated += p.numel() * p.element_size()
        self.anchor = [p.detach().to(torch.float32, copy=True) for p in self.params]
        # Nesterov is undefined without momentum (torch refuses it), so momentum 0 means plain SGD.
        self.outer_optimizer = torch.optim.SGD(self.anchor, lr=outer_lr, momentum=outer_momentum,
                                               nesterov=outer_nesterov and outer_momentum > 0)
        self.inner_steps = 0
        self.steps_since_sync = 0
        self.tokens_since_sync = 0
        self.syncs = 0

    def _group(self) -> dist.ProcessGroup:
        return self.process_group if self.process_group is not None else dist.group.WORLD

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner_optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, *, tokens: int) -> None:
        """One inner step that processed `tokens` tokens on this rank; syncs every `sync_every` calls.

        `tokens` is required (not defaulted to the batch count) because it is the weight this
        rank gets in the average, and a wrong weight on one rank would go unnoticed.
        """
        tokens = operator.index(tokens)
        if tokens < 0:
            raise ValueError(f"tokens={tokens}: expected the (non-negative) tokens processed in this step")
        self.inner_optimizer.step()
        self.inner_steps += 1
        self.steps_since_sync += 1
        self.tokens_since_sync += tokens
        if self.steps_since_sync == self.sync_every:
            self.sync()

    @torch.no_grad()
    def sync(self) -> None:
        """Average the token-weighted pseudo-gradients, take the outer step, reset to the new anchor.

        A collective: every rank must call it (`step` does, at the same inner step on all ranks).
        Call it directly to end training on a common model when the step count is not a multiple
        of `sync_every`; right after a sync it does nothing (ranks are in lockstep, so all skip).
        """
        if self.steps_since_sync == 0:
            return
        total_tokens = self.tokens_since_sync
        if self.distributed:
            count = torch.tensor([total_tokens], dtype=torch.int64, device=self.anchor[0].device)
            dist.all_reduce(count, group=self.process_group)
            self.bytes_communicated += count.numel() * count.element_size()
            total_tokens = int(count.item())
        if total_tokens == 0:
            raise RuntimeError(f"no rank processed any tokens in the {self.steps_since_sync} steps since "
                               "the last sync, so the pseudo-gradients have no weights; pass tokens=")
        # Each rank scales its own pseudo-gradient by its share before the sum, so the all-reduce
        # SUM is the weighted average; the share is exact in float64 and rounded once to fp32.
        weight = self.tokens_since_sync / total_tokens
        for bucket in self._buckets():
            flat = torch.cat([(self.anchor[i] - self.params[i].detach().float()).flatten() for i in bucket])
            flat.mul_(weight)
            if self.distributed:
                dist.all_reduce(flat, group=self.process_group)
                self.bytes_communicated += flat.numel() * flat.element_size()
            for i, piece in zip(bucket, flat.split([self.anchor[i].numel() for i in bucket])):
                self.anchor[i].grad = piece.view_as(self.anchor[i])
        self.outer_optimizer.step()
        for p, a in zip(self.params, self.anchor):
            a.grad = None
            p.copy_(a)
        self.syncs += 1
        self.steps_since_sync = 0
        self.tokens_since_sync = 0

    def _buckets(self) -> list[list[int]]:
        """Group parameter indices by device, each group at most `bucket_numel` elements (or one
        parameter), so one all-reduce carries many small tensors without a full-model temporary."""
        buckets: list[list[int]] = []
        open_bucket: dict[torch.device, tuple[list[int], int]] = {}
        for i, a in enumerate(self.anchor):
            indices, numel = open_bucket.get(a.device, ([], 0))
            if indices and numel + a.numel() > self.bucket_numel:
                buckets.append(indices)
                indices, numel = [], 0
            indices.append(i)
            open_bucket[a.device] = (indices, numel + a.numel())
        buckets.extend(indices for indices, _ in open_bucket.values())
        return buckets

    def state_dict(self) -> dict[str, Any]:
        """Everything besides the model's own parameters that a resumed run needs to continue
        identically: both optimizers, the anchor, and where this rank is inside the sync interval.
        Token counters are per rank, so each rank saves its own."""
        return {
            "inner_optimizer": self.inner_optimizer.state_dict(),
            "outer_optimizer": self.outer_optimizer.state_dict(),
            "anchor": [a.detach().clone() for a in self.anchor],
            "sync_every": self.sync_every,
            "inner_steps": self.inner_steps,
            "steps_since_sync": self.steps_since_sync,
            "tokens_since_sync": self.tokens_since_sync,
            "syncs": self.syncs,
            "bytes_communicated": self.bytes_communicated,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["sync_every"] != self.sync_every:
            raise ValueError(f"checkpoint has sync_every={state['sync_every']}, this run {self.sync_every}; "
                             "resuming mid-interval needs the same value")
        anchor = state["anchor"]
        if len(anchor) != len(self.anchor):
            raise ValueError(f"checkpoint anchor has {len(anchor)} tensors, the model {len(self.anchor)} "
                             "trainable parameters")
        for i, (saved, current) in enumerate(zip(anchor, self.anchor)):
            if saved.shape != current.shape:
                raise ValueError(f"checkpoint anchor[{i}] has shape {tuple(saved.shape)}, the model's "
                                 f"parameter {tuple(current.shape)}")
        with torch.no_grad():
            for saved, current in zip(anchor, self.anchor):
                current.copy_(saved)  # in place: the outer optimizer holds these tensors
        self.inner_optimizer.load_state_dict(state["inner_optimizer"])
        self.outer_optimizer.load_state_dict(state["outer_optimizer"])
        self.inner_steps = state["inner_steps"]
        self.steps_since_sync = state["steps_since_sync"]
        self.tokens_since_sync = state["tokens_since_sync"]
        self.syncs = state["syncs"]
        self.bytes_communicated = state["bytes_communicated"]
