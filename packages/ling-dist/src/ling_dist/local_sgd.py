"""The Local SGD core shared by DiLoCo, EDiT and A-EDiT, and DiLoCo itself.

Each worker runs its own inner optimizer without talking to anyone. At a sync point (chosen by
a `SyncPolicy`: every H steps or every T seconds) the workers average their *pseudo-gradient*
(anchor - local parameters, i.e. how far they moved since the last sync), an outer optimizer
(SGD with Nesterov momentum) takes one step on the shared anchor with that average as its
gradient, and every worker restarts from the new anchor. Communication drops to one exchange
per interval instead of one per step, which is what lets slow links and heterogeneous devices
train one model.

A sync has two phases:
1. *Agree*: every rank all-gathers three numbers (tokens and inner steps since the last sync,
   the norm of its pseudo-gradient). From them a `Weighting` derives every rank's weight (the
   same on all ranks), and too small an interval is skipped by all ranks together.
2. *Exchange*, unit by unit: each rank scales its pseudo-gradient by its weight, a SUM
   all-reduce forms the weighted average, the outer optimizer steps that unit's anchor, and the
   unit's parameters are reset to it. DiLoCo does this for the whole model at once; EDiT does
   it per layer just before the layer's forward (`ling_dist.edit_layerwise`).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from ling_dist.local_sgd_policy import EveryHSteps, SyncPolicy
from ling_dist.local_sgd_weighting import SyncWeights, TokenWeighting, Weighting

_REPORT_FIELDS = 3  # tokens, inner steps, pseudo-gradient norm


def local_shard(p: torch.Tensor) -> torch.Tensor:
    """The part of a parameter this rank holds: the local shard of a DTensor (FSDP2), else the
    tensor itself; detached, sharing storage, so writing it writes the parameter."""
    if isinstance(p, DTensor):
        return p._local_tensor.detach()  # to_local() may return a copy under autograd; this never does
    return p.detach()


@dataclass
class SyncStats:
    """What happened at one sync point, for logging (`LocalSGD.last_sync`)."""

    index: int  # sync points passed so far (`LocalSGD.sync_points`), this one included
    skipped: bool  # too few steps in total: nothing but the report was exchanged
    tokens: list[int]  # per rank, since the previous sync
    steps: list[int]
    norms: list[float]  # per-rank pseudo-gradient norms
    weights: list[float] = field(default_factory=list)
    excluded: list[int] = field(default_factory=list)  # ranks dropped as outliers
    scale: float = 1.0  # clipping factor applied to the averaged pseudo-gradient
    z_scores: list[float] = field(default_factory=list)  # the weighting's outlier statistic per rank
    bytes: int = 0  # payload this rank handed to collectives for this sync


@dataclass
class _Unit:
    """Parameters synchronised together; `buckets` split them into all-reduce payloads."""

    indices: list[int]
    buckets: list[list[int]]


class LocalSGD:
    """Wrap an inner optimizer so that, at each sync point, the workers average their
    pseudo-gradients and take an outer step.

    `model` is any `nn.Module`; its parameters that require grad are synchronised (buffers,
    e.g. BatchNorm statistics, stay local). The inner optimizer's state is never communicated.

    The anchor is an fp32 copy of each parameter on that parameter's device: fp32 so that a
    bf16 model does not lose small outer updates to rounding, and on the parameter's device
    because the pseudo-gradient, the all-reduce (nccl needs CUDA tensors) and the outer step
    all run there; it costs one fp32 copy of the model in that device's memory.

    `bytes_communicated` counts the payload this rank hands to collectives: the parameters, in
    their own dtype, once at construction (broadcast from rank 0 so every worker starts from
    the same anchor), then per sync point 24 bytes (the float64 report: tokens, steps, norm)
    plus, unless the sync is skipped, 4 bytes per synchronised parameter element (the fp32
    pseudo-gradient). It is the buffer size, not the wire traffic, which depends on the
    collective's algorithm (a ring all-reduce sends about 2(w-1)/w of it). With one process
    there is no process group and the count stays 0.

    `units` (lists of parameters) fix the exchange granularity; parameters in no unit form a
    first unit of their own. Collectives run on `process_group` (default: the default group).

    Sharding inside a group (HSDP-style, e.g. FSDP2 `fully_shard` over the inner dimension of a
    2-D mesh): pass the replicate dimension's group as `process_group` and the shard
    dimension's as `shard_group`. A worker is then a whole shard group: each rank keeps the
    anchor of its own shards, exchanges them with the ranks holding the same shards, and the
    worker's norm and tokens are summed over the shard group (8 + 8 bytes per sync point more).
    """

    def __init__(self, model: nn.Module, inner_optimizer: torch.optim.Optimizer, *, policy: SyncPolicy,
                 weighting: Weighting | None = None, outer_lr: float = 0.7, outer_momentum: float = 0.9,
                 outer_nesterov: bool = True, units: list[list[nn.Parameter]] | None = None,
                 process_group: dist.ProcessGroup | None = None, shard_group: dist.ProcessGroup | None = None,
                 bucket_numel: int = 2**25) -> None:
        if bucket_numel < 1:
            raise ValueError(f"bucket_numel={bucket_numel}: expected >= 1")
        self.inner_optimizer = inner_optimizer
        self.policy = policy
        self.weighting = weighting if weighting is not None else TokenWeighting()
        self.process_group = process_group
        self.shard_group = shard_group
        self.bucket_numel = bucket_numel
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("model has no parameters that require grad; nothing to synchronise")
        self.distributed = dist.is_available() and dist.is_initialized()
        self.bytes_communicated = 0
        if self.distributed:
            with torch.no_grad():
                for p in self.params:
                    shard = local_shard(p)
                    dist.broadcast(shard, src=dist.get_global_rank(self._group(), 0), group=process_group)
                    self.bytes_communicated += shard.numel() * shard.element_size()
        self.anchor = [local_shard(p).to(torch.float32, copy=True) for p in self.params]
        # Nesterov is undefined without momentum (torch refuses it), so momentum 0 means plain SGD.
        self.outer_optimizer = torch.optim.SGD(self.anchor, lr=outer_lr, momentum=outer_momentum,
                                               nesterov=outer_nesterov and outer_momentum > 0)
        self.units = self._make_units(units or [])
        self.inner_steps = 0
        self.steps_since_sync = 0
        self.tokens_since_sync = 0
        self.syncs = 0  # exchanges done
        self.sync_points = 0  # sync points passed, skipped ones (too few steps) included
        self.global_inner_steps = 0  # inner steps of all ranks together, as agreed at the last sync point
        self.last_sync: SyncStats | None = None
        self._pending: SyncWeights | None = None  # the exchange in progress, if any
        self._rank_weight = 0.0
        self._next_launch = 0  # units launched so far in the pending exchange
        self._in_flight: dict[int, list[tuple[torch.Tensor, Any]]] = {}  # unit -> (payload, work) per bucket
        self._done: set[int] = set()  # units finished in the pending exchange
        self.policy.restart()

    def _group(self) -> dist.ProcessGroup:
        return self.process_group if self.process_group is not None else dist.group.WORLD

    def _make_units(self, units: list[list[nn.Parameter]]) -> list[_Unit]:
        position = {id(p): i for i, p in enumerate(self.params)}
        claimed: set[int] = set()
        groups: list[list[int]] = []
        for unit in units:
            indices = [position[id(p)] for p in unit if id(p) in position and position[id(p)] not in claimed]
            claimed.update(indices)
            if indices:
                groups.append(indices)
        rest = [i for i in range(len(self.params)) if i not in claimed]
        if rest:
            groups.insert(0, rest)
        return [_Unit(indices, self._buckets(indices)) for indices in groups]

    def _buckets(self, indices: list[int]) -> list[list[int]]:
        """Group parameter indices by device, each group at most `bucket_numel` elements (or one
        parameter), so one all-reduce carries many small tensors without a full-model temporary."""
        buckets: list[list[int]] = []
        open_bucket: dict[torch.device, tuple[list[int], int]] = {}
        for i in indices:
            a = self.anchor[i]
            bucket, numel = open_bucket.get(a.device, ([], 0))
            if bucket and numel + a.numel() > self.bucket_numel:
                buckets.append(bucket)
                bucket, numel = [], 0
            bucket.append(i)
            open_bucket[a.device] = (bucket, numel + a.numel())
        buckets.extend(bucket for bucket, _ in open_bucket.values())
        return buckets

    # ----------------------------------------------------------------- the training-loop interface
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner_optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, *, tokens: int) -> None:
        """One inner step that processed `tokens` tokens on this rank; starts a sync when the
        policy says this rank is due.

        `tokens` is required (not defaulted to the batch count) because it is the weight this
        rank gets in the average, and a wrong weight on one rank would go unnoticed.
        """
        tokens = operator.index(tokens)
        if tokens < 0:
            raise ValueError(f"tokens={tokens}: expected the (non-negative) tokens processed in this step")
        self.finish_sync()
        self.inner_optimizer.step()
        self.inner_steps += 1
        self.steps_since_sync += 1
        self.tokens_since_sync += tokens
        if self.policy.due(self.steps_since_sync):
            self._start_sync()
            self._after_start()

    def _after_start(self) -> None:
        """Whole-model exchange right at the sync point; EDiT defers it to the next forward."""
        self.finish_sync()

    def sync(self) -> None:
        """Pass a sync point now and complete it, e.g. to end training on a common model.

        A collective: every rank must call it. When no rank took a step since the last sync
        point there is nothing to average and nothing changes.
        """
        self.finish_sync()
        self._start_sync()
        self.finish_sync()

    # ------------------------------------------------------------------------------ the two phases
    @torch.no_grad()
    def _start_sync(self) -> None:
        """Phase 1: gather every rank's report, weigh, and decide whether to exchange."""
        device = self.anchor[0].device
        # One host sync for the whole model (not one per parameter): per-parameter squared norms
        # on their devices, summed on the first one.
        squares = torch.stack([torch.linalg.vector_norm(a - local_shard(p).float()).square().to(device)
                               for a, p in zip(self.anchor, self.params)]).sum()
        worker = torch.stack([squares.double(), torch.tensor(float(self.tokens_since_sync), dtype=torch.float64,
                                                             device=device)])
        sent = 0
        if self.shard_group is not None:  # the worker is the whole shard group: its norm and tokens
            dist.all_reduce(worker, group=self.shard_group)
            sent += worker.numel() * worker.element_size()
        squares, tokens = worker.tolist()
        report = torch.tensor([tokens, self.steps_since_sync, squares ** 0.5], dtype=torch.float64)
        if self.distributed:
            world = dist.get_world_size(self.process_group)
            gathered = torch.empty(world * _REPORT_FIELDS, dtype=torch.float64, device=device)
            dist.all_gather_into_tensor(gathered, report.to(device), group=self.process_group)
            sent += report.numel() * report.element_size()
            rows = gathered.view(world, _REPORT_FIELDS).cpu().tolist()
            rank = dist.get_group_rank(self._group(), dist.get_rank())
        else:
            rows, rank = [report.tolist()], 0
        tokens, steps, norms = [int(r[0]) for r in rows], [int(r[1]) for r in rows], [r[2] for r in rows]
        self.sync_points += 1
        self.policy.restart()
        self.bytes_communicated += sent
        total_steps = sum(steps)
        skipped = total_steps < max(self.policy.min_total_steps, 1)
        self.last_sync = SyncStats(self.sync_points, skipped, tokens, steps, norms, bytes=sent)
        if skipped:  # keep the local progress and counters: they roll into the next interval
            return
        decision = self.weighting.weigh(tokens, steps, norms)
        self.last_sync.weights, self.last_sync.excluded = decision.weights, decision.excluded
        self.last_sync.scale, self.last_sync.z_scores = decision.scale, decision.z_scores
        self.syncs += 1
        self.global_inner_steps += total_steps
        self.steps_since_sync = 0
        self.tokens_since_sync = 0
        self._pending = decision
        # The share is exact in float64 and rounded once to fp32 when it scales the payload.
        self._rank_weight = decision.weights[rank] * decision.scale
        self._next_launch = 0
        self._in_flight = {}
        self._done = set()

    def _launch(self, unit_index: int) -> None:
        """Start the all-reduces of one unit's weighted pseudo-gradient (asynchronously)."""
        unit = self.units[unit_index]
        work = []
        for bucket in unit.buckets:
            flat = torch.cat([(self.anchor[i] - local_shard(self.params[i]).float()).flatten() for i in bucket])
            flat.mul_(self._rank_weight)
            handle = None
            if self.distributed:
                handle = dist.all_reduce(flat, group=self.process_group, async_op=True)
                sent = flat.numel() * flat.element_size()
                self.bytes_communicated += sent
                self.last_sync.bytes += sent
            work.append((flat, handle))
        self._in_flight[unit_index] = work

    def _launch_through(self, unit_index: int) -> None:
        """Launch units in list order up to `unit_index` (same order on every rank, so the
        collectives match even when a forward visits units in another order)."""
        while self._next_launch <= min(unit_index, len(self.units) - 1):
            self._launch(self._next_launch)
            self._next_launch += 1

    @torch.no_grad()
    def _finish_unit(self, unit_index: int) -> None:
        """Phase 2 for one unit: wait for its average, outer step, reset its parameters."""
        if self._pending is None or unit_index in self._done:
            return
        self._launch_through(unit_index)
        unit = self.units[unit_index]
        for bucket, (flat, handle) in zip(unit.buckets, self._in_flight.pop(unit_index)):
            if handle is not None:
                handle.wait()
            for i, piece in zip(bucket, flat.split([self.anchor[i].numel() for i in bucket])):
                self.anchor[i].grad = piece.view_as(self.anchor[i])
        if any(self._pending.weights):  # all workers excluded: no outer step, restart from the anchor
            self.outer_optimizer.step()  # steps only the anchors that have a .grad: this unit's
        for i in unit.indices:
            self.anchor[i].grad = None
            local_shard(self.params[i]).copy_(self.anchor[i])
        self._done.add(unit_index)
        if len(self._done) == len(self.units):
            self._pending = None

    def finish_sync(self) -> None:
        """Complete an exchange still in progress (a no-op when there is none)."""
        for unit_index in range(len(self.units)):
            self._finish_unit(unit_index)

    # ------------------------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Everything besides the model's own parameters that a resumed run needs to continue
        identically: both optimizers, the anchor, the weighting's state and where this rank is
        inside the sync interval. Token counters are per rank, so each rank saves its own.
        An exchange in progress is completed first, so the saved model is the synchronised one.
        Like `torch.optim.Optimizer.state_dict`, tensors are the live ones, not copies (a flash
        snapshot copies them once, in the background): save or copy before the next step."""
        self.finish_sync()
        return {
            "inner_optimizer": self.inner_optimizer.state_dict(),
            "outer_optimizer": self.outer_optimizer.state_dict(),
            "anchor": [a.detach() for a in self.anchor],
            **self.policy.state_dict(),
            "weighting": self.weighting.state_dict(),
            "inner_steps": self.inner_steps,
            "steps_since_sync": self.steps_since_sync,
            "tokens_since_sync": self.tokens_since_sync,
            "syncs": self.syncs,
            "sync_points": self.sync_points,
            "global_inner_steps": self.global_inner_steps,
            "bytes_communicated": self.bytes_communicated,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy.check_compatible(state)
        anchor = state["anchor"]
        if len(anchor) != len(self.anchor):
            raise ValueError(f"checkpoint anchor has {len(anchor)} tensors, the model {len(self.anchor)} "
                             "trainable parameters")
        for i, (saved, current) in enumerate(zip(anchor, self.anchor)):
            if saved.shape != current.shape:
                raise ValueError(f"checkpoint anchor[{i}] has shape {tuple(saved.shape)}, the model's "
                                 f"parameter {tuple(current.shape)}")
        self.finish_sync()
        with torch.no_grad():
            for saved, current in zip(anchor, self.anchor):
                current.copy_(saved)  # in place: the outer optimizer holds these tensors
        self.inner_optimizer.load_state_dict(state["inner_optimizer"])
        # The outer momentum buffers come back; its lr, momentum and nesterov stay this instance's
        # (a resumed run may change --outer-lr / --outer-momentum, like the inner lr's schedule).
        hyper = [{k: group[k] for k in ("lr", "momentum", "nesterov")} for group in self.outer_optimizer.param_groups]
        self.outer_optimizer.load_state_dict(state["outer_optimizer"])
        for group, kept in zip(self.outer_optimizer.param_groups, hyper):
            group.update(kept)
        self.weighting.load_state_dict(state.get("weighting", {}))
        self.inner_steps = state["inner_steps"]
        self.steps_since_sync = state["steps_since_sync"]
        self.tokens_since_sync = state["tokens_since_sync"]
        self.syncs = state["syncs"]
        self.sync_points = state.get("sync_points", self.syncs)
        self.global_inner_steps = state.get("global_inner_steps", 0)
        self.bytes_communicated = state["bytes_communicated"]
        self.policy.restart()


class DiLoCo(LocalSGD):
    """DiLoCo (Douillard et al. 2023, arXiv 2311.08105): sync every `sync_every` (H) inner steps,
    the whole model at once, pseudo-gradients weighted by the tokens each rank processed since
    the last sync (a worker that saw twice the data moves the anchor twice as much).

    All ranks must use the same `sync_every` and call `step` equally often, so they reach each
    sync together.
    """

    def __init__(self, model: nn.Module, inner_optimizer: torch.optim.Optimizer, *, sync_every: int,
                 outer_lr: float = 0.7, outer_momentum: float = 0.9, outer_nesterov: bool = True,
                 process_group: dist.ProcessGroup | None = None, bucket_numel: int = 2**25) -> None:
        super().__init__(model, inner_optimizer, policy=EveryHSteps(sync_every), outer_lr=outer_lr,
                         outer_momentum=outer_momentum, outer_nesterov=outer_nesterov,
                         process_group=process_group, bucket_numel=bucket_numel)

    @property
    def sync_every(self) -> int:
        return self.policy.sync_every
