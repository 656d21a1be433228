"""Checkpoints and resume under several processes: every `--dist` mode, and another world size.

What a checkpoint holds (`RUN/checkpoints/step-N/`, see checkpoint.py for the files):
- HF-layout weights, whole: rank 0's model, or under `--dist fsdp` / `--expert-parallel` the
  FSDP2 shards all-gathered and the experts gathered from the ranks that own them.
- `trainer_state/state.pt` (rank 0) and `rank-R.pt` (rank R): step, scheduler, loader position,
  RNG, callbacks, and the optimizer: the rank's own (`ddp`, `none`, and the Local SGD family,
  whose state is the inner optimizer, the anchor, the outer momentum and the sync counters; a
  Local SGD rank > 0 also saves its own weights, which differ from rank 0's between syncs), or
  under `fsdp` / `--expert-parallel` one whole optimizer state by parameter name in state.pt
  (`optimizer_layout: "whole"`), cut back to each rank's shards on load.

Resuming at another world size (same `--dist`): new rank r loads old rank (r mod old size)'s
per-rank state, i.e. its weights between syncs, inner optimizer state, RNG and within-interval
counters; the anchor, the outer momentum and the sync counters are the same on every old rank and
carry over exactly. A checkpoint taken at a sync point (every rank at the anchor) therefore
migrates exactly; one taken mid-interval drops the progress of old ranks with no new counterpart
(N -> M < N) or starts several new ranks from one old rank's progress (which the next average
counts once, since it averages). The loader continues after the windows the old ranks consumed
this epoch (see `loader_state_for_world_size`). The scheduler continues by step (a step then
processes batch_size x new world size sequences, or the sum of the new per-process sizes).

Per-process batch sizes (`--batch-size 8,2`, Local SGD modes): at another world size the run needs
a list of the new length (or one int); the loader continues after the windows the old ranks
consumed, counted with the old sizes. The same remap applies at the same world size when the
sizes changed (e.g. `--resume ... --batch-size 2,2` from a `3,1` run).

Resuming under another `--dist` (e.g. a run moved from a homogeneous cluster under `ddp` to
heterogeneous ones under `edit`, or back): weights, step, scheduler and loader position carry over
as above, and so does the inner optimizer state, converted (`optimizer_for_this_run`): taken out of
a Local SGD state, put into one, and between the per-position and the whole layout (by name, via
`ling_dist.optimizer_state_by_name`). Entering Local SGD, the anchor is the resumed weights, the
outer momentum and sync counters start at zero, and `global_inner_steps` at step x world size (the
work done so far, as A-EDiT counts it to stop). Between Local SGD modes the anchor, outer momentum
and counters carry over; the sync schedule and, where it differs (DiLoCo's token weighting vs the
EDiT penalty), the weighting state are the new run's. Leaving Local SGD (or A-EDiT, whose ranks
take unequal numbers of steps, for a step-locked mode), every new rank resumes old rank 0's state:
the HF weights are rank 0's own (the anchor at a sync point; mid-interval, the other ranks'
progress since the last sync is dropped) and DDP ranks need one optimizer state and step count.
Not mappable, refused: a per-position state into `--expert-parallel`, whose ranks lack the experts
other ranks own (the optimizer cannot be keyed by name there).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable

import torch

from ling_core import CheckpointError
from ling_data.rank_batches import saved_batch_sizes
from ling_dist import (full_model_state_dict, full_optimizer_state_dict, local_optimizer_state_dict,
                       local_sgd_state_for_world_size, optimizer_state_by_name)
from ling_train import checkpoint as ckpt
from ling_train import distributed as dist_run
from ling_train.callbacks import Checkpointer
from ling_train.config import LOCAL_SGD_MODES, RunConfig, RunConfigError

WHOLE = "whole"  # optimizer_layout: one whole optimizer state by parameter name, in state.pt


def whole_layout(config: RunConfig) -> bool:
    """Whether weights and optimizer are sharded over ranks (FSDP2, expert parallel), so the
    checkpoint gathers them whole; decided by the flags, not the world size, so that a 1-process
    `--dist fsdp` run writes the same format a 4-process one reads."""
    return config.dist == "fsdp" or bool(config.expert_parallel)


def write_checkpoint(setup: dist_run.DistSetup, config: RunConfig, trainer, model: torch.nn.Module,
                     optimizer: torch.optim.Optimizer, checkpoints_dir: Path, step: int, run_toml: str,
                     max_shard_bytes: int) -> Path:
    """Collective: every rank calls it at the same point; rank 0 writes."""
    state = {**trainer.state_dict(), "dist": config.dist, "world_size": setup.world_size}
    weights = None
    if whole_layout(config):
        weights = full_model_state_dict(model)
        state["optimizer"] = full_optimizer_state_dict(model, optimizer)  # None on ranks > 0
        state["optimizer_layout"] = WHOLE
    elif setup.world_size > 1:
        state["params_sha256"] = dist_run.parameters_sha256(model)
    if setup.local_sgd is not None and setup.rank:  # between syncs each rank's weights are its own
        state["local_model"] = model.state_dict()
    states = dist_run.gather_to_main(setup, state if setup.rank else None)
    path = checkpoints_dir / f"step-{step}"
    if setup.is_main:
        path = ckpt.save_checkpoint(model, state, run_toml, checkpoints_dir, step, max_shard_bytes,
                                    rank_states=dict(enumerate(states[1:], start=1)), weights=weights)
    dist_run.barrier()
    return path


class SyncPointCheckpointer(Checkpointer):
    """A-EDiT's periodic checkpoints. Its ranks take unequal numbers of steps, so `step % every`
    would put one rank in the checkpoint's collectives while the others train on; every rank saves
    at the same sync point instead (`distributed.SyncPointSchedule`), where all are at the anchor."""

    def __init__(self, save: Callable[[int], Path], every: int, local_sgd, world_size: int):
        super().__init__(save, every)
        self.schedule = dist_run.SyncPointSchedule(local_sgd, every, world_size)

    def on_train_start(self, trainer) -> None:
        self.schedule.start()

    def post_step(self, trainer, step: int, metrics: dict[str, Any]) -> None:
        if self.schedule.due():
            self._save(trainer, step)


def source_rank(rank: int, saved_world: int, saved_dist: str, dist: str) -> int:
    """The old rank whose per-rank state new rank `rank` resumes: r mod old size, except old rank 0
    on every rank when leaving Local SGD, or A-EDiT for a step-locked mode (module docstring)."""
    if saved_dist != dist and (dist not in LOCAL_SGD_MODES or saved_dist == "aedit"):
        return 0
    return rank % saved_world


def load_resume_state(setup: dist_run.DistSetup, config: RunConfig, resume_from: Path) -> dict:
    """The trainer state this rank resumes from (see the module docstring for the rank rule), under
    this run's --dist or another. A whole-layout checkpoint (fsdp, expert parallel) resumes with or
    without expert parallel, at any expert-parallel degree; a per-position one only without."""
    main_state = ckpt.load_trainer_state(resume_from)
    ckpt.check_side_files(resume_from, main_state)
    saved_dist, saved_world = main_state.get("dist", "none"), main_state.get("world_size", 1)
    saved_whole = main_state.get("optimizer_layout") == WHOLE
    if config.expert_parallel and not saved_whole:  # by position: no names for the experts a rank lacks
        raise RunConfigError(f"--resume {resume_from}: written without --expert-parallel (--dist {saved_dist}, "
                             f"optimizer state by position); resume it without --expert-parallel")
    source = source_rank(setup.rank, saved_world, saved_dist, config.dist)
    state = main_state if source == 0 else ckpt.load_trainer_state(resume_from, source)
    if saved_whole:
        state = {**state, "optimizer": main_state["optimizer"], "optimizer_layout": WHOLE}
    return state


def optimizer_for_this_run(state: dict[str, Any], setup: dist_run.DistSetup, model: torch.nn.Module,
                           optimizer: torch.optim.Optimizer) -> Any:
    """The saved optimizer state (from `load_resume_state`) as this run's optimizer loads it: the
    plain `optimizer` state by position, or a `LocalSGD` state around it (module docstring).
    Raises ValueError when it does not fit."""
    saved_dist, saved = state.get("dist", "none"), state["optimizer"]
    inner = saved["inner_optimizer"] if saved_dist in LOCAL_SGD_MODES else saved
    whole = state.get("optimizer_layout") == WHOLE
    if not whole and (setup.mode == "fsdp" or setup.expert_parallel):  # by position, into shards: by name first
        inner, whole = optimizer_state_by_name(model, optimizer, inner), True
    if whole:
        inner = local_optimizer_state_dict(model, optimizer, inner)
    lsgd = setup.local_sgd
    if lsgd is None:
        return inner
    if saved_dist not in LOCAL_SGD_MODES:  # entering Local SGD: anchored at the resumed weights
        return {**lsgd.state_dict(), "inner_optimizer": inner, "global_inner_steps": state["step"] * setup.world_size}
    converted = {**saved, "inner_optimizer": inner}
    if saved_dist != setup.mode:  # another Local SGD mode: this run's schedule (and weighting, if another kind)
        weighting = saved.get("weighting") or {}
        if weighting.keys() != lsgd.weighting.state_dict().keys():
            weighting = lsgd.weighting.state_dict()
        converted.update(lsgd.policy.state_dict(), weighting=weighting)
    return converted


def loader_state_for_world_size(state: dict[str, Any], loader) -> dict[str, Any]:
    """A loader position saved at another world size (or other per-process batch sizes), for
    `loader` (built at this one).

    Both loaders (PackedLoader, TokenLoader) fix an epoch's window order independently of the
    world size and hand out consecutive global batches of sum(batch_sizes) windows (batch_size x
    world_size when the ranks' sizes are equal), so after position p the old ranks together
    consumed the first p x old global batch windows. The new loader starts at the first global
    batch boundary at or after that window: nothing is seen twice within the epoch; when that
    count is not a multiple of the new global batch (e.g. 1 -> 2 ranks at an odd step), fewer
    than one new global batch of windows is skipped, the same way each epoch's remainder is.
    With equal sizes N -> 1 never skips. Past the epoch's last whole global batch: the next
    epoch, from its start.
    """
    key = "position" if "position" in state else "batch"  # PackedLoader / TokenLoader
    consumed = state[key] * sum(saved_batch_sizes(state))
    global_batch = loader.global_batch_size
    position, epoch = -(-consumed // global_batch), state["epoch"]
    if position >= loader.batches_per_epoch:
        position, epoch = 0, epoch + 1
    remapped = {**state, key: position, "epoch": epoch, "world_size": loader.world_size,
                "batch_sizes": list(loader.batch_sizes)}
    remapped.pop("batch_size", None)  # a state from before per-process sizes
    return remapped


def fit_resume_state(state: dict[str, Any], setup: dist_run.DistSetup, model: torch.nn.Module,
                     optimizer: torch.optim.Optimizer, loader, resume_from: Path) -> dict[str, Any]:
    """`state` from `load_resume_state`, adapted to this rank once the model is wrapped and the
    optimizer and loader are built: the optimizer state in this run's form (cut to this rank's
    shards, converted from another --dist), and at another world size the loader position and
    Local SGD per-worker state remapped."""
    state = dict(state)
    try:
        state["optimizer"] = optimizer_for_this_run(state, setup, model, optimizer)
    except ValueError as e:
        raise CheckpointError(f"{resume_from}: {e}") from None
    other_world = state.get("world_size", 1) != setup.world_size
    saved_loader, inner_loader = state["loader"], getattr(loader, "inner", loader)
    if "batches_drawn" in saved_loader:  # [anomaly]'s re-injecting wrapper around the data loader
        saved_loader = saved_loader["inner"]
    if other_world or saved_batch_sizes(saved_loader) != list(inner_loader.batch_sizes):
        # The anomaly wrapper's skip set and pending rows count the old batches; only the plain
        # position carries over (AnomalyLoader accepts a bare inner state).
        state["loader"] = loader_state_for_world_size(saved_loader, inner_loader)
    if other_world and setup.local_sgd is not None:
        state["optimizer"] = local_sgd_state_for_world_size(state["optimizer"], setup.world_size)
    cuda_states = state["rng"]["cuda"]
    if cuda_states and len(cuda_states) != (torch.cuda.device_count() if torch.cuda.is_available() else 0):
        state["rng"] = {**state["rng"], "cuda": []}  # another machine's GPUs: nothing to restore them to
    return state


def tensors_sha256(tensors) -> str:
    """A fingerprint of a sequence of tensors (values, dtypes and shapes), device-independent."""
    digest = hashlib.sha256()
    for tensor in tensors:
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())  # reshape: 0-dim too
    return digest.hexdigest()


def optimizer_sha256(optimizer_state: dict[str, Any]) -> str:
    """A fingerprint of an optimizer's per-parameter state (this rank's shards), in position and
    key order, so a run resumed under another --dist can show it loaded what was saved."""
    per_param = optimizer_state["state"]
    tensors = [value for index in sorted(per_param) for _, value in sorted(per_param[index].items())
               if isinstance(value, torch.Tensor)]
    return tensors_sha256([t.to_local() if hasattr(t, "to_local") else t for t in tensors])


def local_sgd_fingerprints(local_sgd_state: dict[str, Any]) -> dict[str, str]:
    """Fingerprints of the anchor and the outer momentum in a `LocalSGD.state_dict()`, so a
    resumed run can show (in its `resume` event) that it holds exactly what was saved."""
    outer = local_sgd_state["outer_optimizer"]["state"]
    momentum = [outer[i]["momentum_buffer"] for i in sorted(outer) if "momentum_buffer" in outer[i]]
    return {"anchor_sha256": tensors_sha256(local_sgd_state["anchor"]),
            "outer_momentum_sha256": tensors_sha256(momentum)}
