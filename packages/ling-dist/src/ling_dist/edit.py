"""EDiT and A-EDiT (Cheng et al. 2024, arXiv 2412.07210): Local SGD with layer-wise
synchronisation overlapped with the forward pass, and the pseudo-gradient penalty.

Layer-wise sync: at a sync point nothing is exchanged yet except the three-number report (see
`ling_dist.local_sgd`). The exchange of the first unit (e.g. the first transformer block) is
launched right away, asynchronously; when the next forward reaches a unit, a forward pre-hook
launches the *next* unit's all-reduce, then waits for this unit's, takes the outer step on it
and resets its parameters, so each unit's communication runs while the previous unit computes.
The arithmetic is the whole-model sync's, unit by unit: the result is the same model.

Overlap comes from async collectives: gloo runs them on its own threads; nccl runs them on its
own CUDA stream, and `wait()` only makes the compute stream wait for that unit's event, so on
CUDA the exchange is already on a side stream and the host never blocks.

A-EDiT syncs by wall time instead of step count, so a fast worker takes as many local steps as
it can instead of waiting for the slowest one (`EveryTSeconds` explains how ranks agree).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from ling_dist.local_sgd import LocalSGD
from ling_dist.local_sgd_policy import EveryHSteps, EveryTSeconds, SyncPolicy
from ling_dist.local_sgd_weighting import PseudoGradientPenalty


def default_units(model: nn.Module) -> list[nn.Module]:
    """The model's direct children that hold trainable parameters, in registration order.
    For a transformer pass its blocks instead (`units=model.layers`): the unit is the grain of
    overlap, and the order should be the order in which the forward runs them."""
    return [child for child in model.children() if any(p.requires_grad for p in child.parameters())]


class EDiT(LocalSGD):
    """Local SGD with the pseudo-gradient penalty and, with `layer_wise=True`, each unit's
    parameters exchanged just before that unit's forward (see the module docstring).

    `units`: the modules synchronised one at a time, in forward order (default:
    `default_units(model)`); parameters outside every unit are exchanged just before the
    model's own forward starts. With `layer_wise=False` all units are exchanged at the sync
    point itself (the whole-model sync). `penalty`: `PseudoGradientPenalty` (anomaly
    elimination, norm-weighted averaging, clipping); its defaults are EDiT's.
    The hooks are prepended, so they run before FSDP2's pre-forward all-gather: with
    `fully_shard` inside a group (`shard_group=`, see `LocalSGD`) the unit's shards are
    synchronised before they are gathered for the forward.
    Per-sync statistics (norms, weights, excluded ranks, bytes) are in `last_sync`.

    With `layer_wise=True`, the model is synchronised only once its next forward has run (or
    `finish_sync()`, `sync()`, `step()` or `state_dict()` was called).
    """

    def __init__(self, model: nn.Module, inner_optimizer: torch.optim.Optimizer, *, sync_every: int | None = None,
                 units: Sequence[nn.Module] | None = None, layer_wise: bool = True,
                 penalty: PseudoGradientPenalty | None = None, outer_lr: float = 0.7, outer_momentum: float = 0.9,
                 outer_nesterov: bool = True, process_group: dist.ProcessGroup | None = None,
                 shard_group: dist.ProcessGroup | None = None, bucket_numel: int = 2**25,
                 policy: SyncPolicy | None = None) -> None:
        if (sync_every is None) == (policy is None):
            raise ValueError("pass exactly one of sync_every=H or policy=")
        modules = list(default_units(model) if units is None else units)
        super().__init__(model, inner_optimizer, policy=policy or EveryHSteps(sync_every),
                         weighting=penalty if penalty is not None else PseudoGradientPenalty(),
                         outer_lr=outer_lr, outer_momentum=outer_momentum, outer_nesterov=outer_nesterov,
                         units=[list(module.parameters()) for module in modules],
                         process_group=process_group, shard_group=shard_group, bucket_numel=bucket_numel)
        self.layer_wise = layer_wise
        self._hooks = []
        if layer_wise:
            self._install_hooks(model, modules)

    def _install_hooks(self, model: nn.Module, modules: list[nn.Module]) -> None:
        unit_of = {}
        for unit_index, unit in enumerate(self.units):
            for i in unit.indices:
                unit_of[id(self.params[i])] = unit_index
        rest = self.units[0].indices if self.units else []
        claimed_by_module = {id(p) for module in modules for p in module.parameters()}
        if rest and not any(id(self.params[i]) in claimed_by_module for i in rest):
            self._hooks.append(model.register_forward_pre_hook(self._hook_for(0), prepend=True))
        for module in modules:
            indices = {unit_of[id(p)] for p in module.parameters() if id(p) in unit_of}
            # A module whose parameters another unit claimed first gets that unit's hook.
            for unit_index in sorted(indices):
                self._hooks.append(module.register_forward_pre_hook(self._hook_for(unit_index), prepend=True))

    def _hook_for(self, unit_index: int):
        def pre_forward(module: nn.Module, args) -> None:
            if self._pending is not None:
                self._launch_through(unit_index + 1)  # prefetch: the next unit travels while this one computes
                self._finish_unit(unit_index)
        return pre_forward

    def _after_start(self) -> None:
        if not self.layer_wise:
            self.finish_sync()
        elif self._pending is not None:
            self._launch_through(0)

    def remove_hooks(self) -> None:
        """Detach the forward pre-hooks (finishing any exchange in progress first)."""
        self.finish_sync()
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()


class AEDiT(EDiT):
    """A-EDiT: EDiT synchronised every `sync_seconds` of wall time instead of every H steps.

    Fast workers take more local steps than slow ones between syncs; by default their
    pseudo-gradients count by the tokens they processed (more steps, more tokens) times the
    norm penalty. `step_weight` blends in each worker's share of the local steps. A sync point
    at which all workers together took fewer than `min_total_steps` inner steps is skipped.

    Ranks take different numbers of steps, so a training loop must not count its own steps to
    decide when to stop: loop on `global_inner_steps` (all ranks' steps, agreed at each sync
    point) or `sync_points`, which every rank sees change at the same sync, and call `sync()`
    after the loop.
    """

    def __init__(self, model: nn.Module, inner_optimizer: torch.optim.Optimizer, *, sync_seconds: float,
                 min_total_steps: int = 1, step_weight: float = 0.0, penalty: PseudoGradientPenalty | None = None,
                 **kwargs) -> None:
        if penalty is None:
            penalty = PseudoGradientPenalty(step_weight=step_weight)
        elif step_weight:
            raise ValueError("pass step_weight inside penalty= when giving a penalty")
        super().__init__(model, inner_optimizer, policy=EveryTSeconds(sync_seconds, min_total_steps=min_total_steps),
                         penalty=penalty, **kwargs)
