"""`ling-train --dist ...`: the one place the trainer meets ling-dist.

`setup_distributed` joins the process group torchrun describes (or none, in one process), wraps
the built model (DDP, FSDP2, expert parallel) or the optimizer (the Local SGD family), and returns
the pieces `run.train` hands to the unchanged `Trainer`: the module to call, an optimizer-shaped
object (`LocalSGDOptimizer` routes `step()` through DiLoCo / EDiT / A-EDiT), and callbacks that log
sync statistics, bytes communicated and stragglers. Rank 0 writes the run directory; the other
ranks compute, take part in collectives and hand their state to rank 0 at checkpoints.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from ling_core.model import DecoderLayer
from ling_dist import AEDiT, DiLoCo, apply_ddp, EDiT, LocalSGD, StragglerMonitor, init_distributed
from ling_train.callbacks import MetricsLogger
from ling_train.config import LOCAL_SGD_MODES, RunConfig, RunConfigError
from ling_train.trainer import Callback, Trainer, clip_local_grad_norm

log = logging.getLogger("ling_train")

DEFAULT_SYNC_EVERY = 8
DEFAULT_SYNC_SECONDS = 1.0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


class SyncPointSchedule:
    """A-EDiT's "every N steps": its ranks take unequal numbers of steps, so `step % N` is no
    moment they share. Instead this is due right after the sync point at which the ranks' total steps, as agreed
    there (`global_inner_steps`), pass a multiple of N x world size. Every rank sees the same total
    at the same sync, so all are due together (and, right after a sync, at the anchor). N = 0: never."""

    def __init__(self, local_sgd: LocalSGD, every: int, world_size: int):
        self.local_sgd, self.every_global = local_sgd, every * world_size
        self.mark = 0

    def start(self) -> None:
        """At train start (also on resume): multiples already passed are not due again."""
        if self.every_global:
            self.mark = self.local_sgd.global_inner_steps // self.every_global

    def due(self) -> bool:
        """Whether a new multiple was passed at the last sync (call once per step, after it)."""
        if not self.every_global:
            return False
        mark = self.local_sgd.global_inner_steps // self.every_global
        if mark <= self.mark:
            return False
        self.mark = mark
        return True


class LocalSGDOptimizer:
    """Optimizer-shaped front of a Local SGD wrapper, so the Trainer's `optimizer.step()` runs the
    inner step and, at sync points, the outer one; `state_dict()` carries the inner and outer
    optimizers and the anchor. The LR scheduler drives the inner optimizer directly."""

    def __init__(self, local_sgd: LocalSGD, tokens_per_step: int):
        self.local_sgd = local_sgd
        self.tokens_per_step = tokens_per_step

    @property
    def param_groups(self) -> list[dict]:
        return self.local_sgd.inner_optimizer.param_groups

    def step(self) -> None:
        self.local_sgd.step(tokens=self.tokens_per_step)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.local_sgd.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.local_sgd.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.local_sgd.load_state_dict(state)


def global_grad_norm_clipper(replicate: int) -> Callable[[nn.Module, float], torch.Tensor]:
    """Gradient clipping for expert parallel, by the *global* norm (the Trainer's `clip_gradients`).

    torch's `clip_grad_norm_` cannot mix FSDP2's DTensor gradients with the experts' plain ones,
    and on plain tensors it would see only this rank's experts, so ranks would clip their shared
    weights by different factors and drift apart. Every rank's gradients are disjoint pieces of
    the model within a shard group (FSDP2 shards, owned experts) and repeated across the
    `replicate` groups, so the global squared norm is the world sum of local squares / replicate."""

    def clip(model: nn.Module, max_norm: float) -> torch.Tensor:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        squares = torch.zeros((), dtype=torch.float64, device=local[0].device if local else "cpu")
        for g in local:
            squares += g.detach().double().pow(2).sum()
        dist.all_reduce(squares)
        norm = (squares / replicate).sqrt()
        scale = max_norm / (norm.item() + 1e-6)
        if scale < 1.0:
            torch._foreach_mul_(local, scale)
        return norm

    return clip


class SilentMetrics(MetricsLogger):
    """Ranks other than 0 compute the step metrics (the progress bar reads them) but write nothing."""

    def write(self, row: dict[str, Any]) -> None:
        pass


class DistributedLogging(Callback):
    """Adds `world_size`, `bytes_communicated` and, after each sync point, the sync statistics
    to the step rows (rank 0's rows carry `rank: 0`); every `straggler_interval` steps gathers
    the ranks' step times and writes one row per rank (`event: straggler` or `step_time`, with
    its `rank`). A-EDiT: stops every rank together once all ranks' steps reach steps x ranks."""

    def __init__(self, rank: int, world_size: int, write: Callable[[dict], None], local_sgd: LocalSGD | None,
                 straggler_interval: int, stop_at_global_steps: int | None = None):
        self.rank, self.world_size, self.write = rank, world_size, write
        self.local_sgd = local_sgd
        self.monitor = StragglerMonitor(interval=straggler_interval) if world_size > 1 and straggler_interval else None
        self.stop_at_global_steps = stop_at_global_steps
        self.seen_sync_points = 0

    def on_train_start(self, trainer: Trainer) -> None:
        if self.local_sgd is not None:
            self.seen_sync_points = self.local_sgd.sync_points

    def post_step(self, trainer: Trainer, step: int, metrics: dict[str, Any]) -> None:
        metrics.update(rank=self.rank, world_size=self.world_size)
        if self.local_sgd is not None:
            lsgd = self.local_sgd
            metrics["bytes_communicated"] = lsgd.bytes_communicated
            if lsgd.sync_points != self.seen_sync_points and lsgd.last_sync is not None:
                self.seen_sync_points = lsgd.sync_points
                self.write({"event": "sync", "step": step, **json_plain(asdict(lsgd.last_sync)),
                            "global_inner_steps": lsgd.global_inner_steps,
                            "bytes_communicated": lsgd.bytes_communicated})
            if self.stop_at_global_steps is not None and lsgd.global_inner_steps >= self.stop_at_global_steps:
                trainer.should_stop = True  # agreed at a sync point, so every rank stops after the same one
        if self.monitor is not None and self.stop_at_global_steps is None:  # A-EDiT ranks step unequally
            for record in self.monitor.record(metrics["step_time_s"]):
                self.write(record.as_metrics())


def json_plain(value: Any) -> Any:
    """JSON-friendly copy (tensors and tuples to lists, non-finite floats kept as strings)."""
    if isinstance(value, dict):
        return {k: json_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return json_plain(value.tolist())
    if isinstance(value, float) and value != value or value in (float("inf"), float("-inf")):
        return str(value)
    return value


@dataclass
class DistSetup:
    mode: str
    rank: int
    world_size: int
    device: torch.device
    model: nn.Module | None = None  # what the Trainer calls (a DDP wrapper, or the model itself)
    local_sgd: LocalSGD | None = None
    expert_parallel: int = 0  # ranks per expert-parallel group (0: off)
    clip_gradients: Callable[[nn.Module, float], torch.Tensor] = clip_local_grad_norm

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_process_group(config: RunConfig, device: torch.device) -> DistSetup:
    """Join torchrun's group (gloo on CPU, nccl on CUDA); a plain process stays alone."""
    if config.dist == "none":
        return DistSetup("none", 0, 1, device)
    if config.device == "mixed":  # some ranks on CUDA, some on CPU: one gloo group (ling_dist stages)
        rank, world_size, device = init_distributed(backend="gloo", device="auto")
    else:
        backend = "gloo" if device.type == "cpu" else None
        rank, world_size, dist_device = init_distributed(backend=backend)
        if device.type == "cuda" and torch.distributed.is_initialized():  # alone: the --device asked for
            device = dist_device
    if config.expert_parallel:
        if world_size % config.expert_parallel:
            raise RunConfigError(f"--expert-parallel {config.expert_parallel}: must divide the number of "
                                 f"processes ({world_size})")
        if config.dist == "ddp" and config.expert_parallel != world_size:
            raise RunConfigError(f"--expert-parallel {config.expert_parallel} with --dist ddp: must equal the "
                                 f"number of processes ({world_size}); use --dist fsdp for groups")
        experts = config.model_config().num_experts
        if experts % config.expert_parallel:
            raise RunConfigError(f"--expert-parallel {config.expert_parallel}: must divide num_experts ({experts})")
    config.batch_sizes(world_size)  # a per-process list must have one entry per process
    if config.anomaly is not None:
        from ling_train.anomaly.config import check_workers
        check_workers(config.anomaly_config(), config.dist, world_size)
    setup = DistSetup(config.dist, rank, world_size, device)
    setup.expert_parallel = config.expert_parallel if world_size > 1 else 0
    return setup


def wrap_model(setup: DistSetup, model: nn.Module) -> nn.Module:
    """The module the Trainer calls: DDP / FSDP2 (+ expert parallel) applied from outside."""
    if setup.mode == "ddp" and setup.world_size > 1 and not setup.expert_parallel:
        # A MoE step may leave an expert without tokens on one rank: DDP must not wait for its
        # gradient (it then all-reduces zeros for it, so ranks stay identical).
        setup.model = apply_ddp(model, find_unused_parameters=True)
    elif setup.mode in ("ddp", "fsdp") and setup.world_size > 1:
        from ling_train.parallelize import parallelize
        replicate = setup.world_size // setup.expert_parallel if setup.expert_parallel else 1
        setup.model = parallelize(model, data_parallel=setup.mode, expert_parallel=bool(setup.expert_parallel),
                                  replicate=replicate)
    else:
        setup.model = model
    return setup.model


def wrap_optimizer(setup: DistSetup, config: RunConfig, model: nn.Module, optimizer: torch.optim.Optimizer):
    """The optimizer-shaped object the Trainer steps: the optimizer itself, or a Local SGD front."""
    if setup.expert_parallel:
        setup.clip_gradients = global_grad_norm_clipper(replicate=setup.world_size // setup.expert_parallel)
        return optimizer
    if setup.mode not in LOCAL_SGD_MODES:
        return optimizer
    outer = {"outer_lr": config.outer_lr, "outer_momentum": config.outer_momentum}
    if setup.mode == "diloco":
        lsgd = DiLoCo(model, optimizer, sync_every=config.sync_every or DEFAULT_SYNC_EVERY, **outer)
    else:
        units = [m for m in model.modules() if isinstance(m, DecoderLayer)]
        if setup.mode == "edit":
            lsgd = EDiT(model, optimizer, sync_every=config.sync_every or DEFAULT_SYNC_EVERY, units=units, **outer)
        else:
            lsgd = AEDiT(model, optimizer, sync_seconds=config.sync_seconds or DEFAULT_SYNC_SECONDS,
                         min_total_steps=setup.world_size, units=units, **outer)
    setup.local_sgd = lsgd
    # This rank's own tokens: with per-process batch sizes the sync weights each rank by them.
    return LocalSGDOptimizer(lsgd, tokens_per_step=config.batch_sizes(setup.world_size)[setup.rank] * config.seq_len)


def parameters_sha256(model: nn.Module) -> str:
    """A fingerprint of this rank's weights, stored per rank in checkpoints: ranks that should
    agree (DDP always, Local SGD right after a sync) can be checked without saving every copy."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def gather_to_main(setup: DistSetup, state: Any) -> list[Any] | None:
    """Every rank's `state` on rank 0 (None elsewhere); just `[state]` in one process."""
    if not is_distributed():
        return [state]
    gathered = [None] * setup.world_size if setup.is_main else None
    dist.gather_object(state, gathered, dst=0)
    return gathered


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()  # explicitly: gloo aborts if left to interpreter exit
