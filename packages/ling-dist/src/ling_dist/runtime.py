"""Start torch.distributed from torchrun's environment, or run as one process without it.

The same training script must work under `python train.py` (one process, no process group)
and under `torchrun --nproc-per-node N train.py`, so the decision is made from the
environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) rather
than from flags threaded through the caller.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

_REQUIRED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedEnvError(RuntimeError):
    """The torchrun environment is partial or contradictory, or the backend cannot run here."""


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise DistributedEnvError(f"environment variable {name}={value!r}: expected an integer") from None


def init_distributed(backend: str | None = None, *, device: str | None = None) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes; return `(rank, world_size, device)`.

    With none of torchrun's variables set this is a single process: `(0, 1, cpu)` and no
    process group is created, so collectives must be skipped by the caller (ling-dist's
    wrappers do). `backend=None` picks nccl when CUDA is available (device `cuda:LOCAL_RANK`)
    and gloo otherwise (device `cpu`); an explicit `"gloo"` always gives device `cpu`.
    Raises `DistributedEnvError` for a partial or inconsistent environment, because a silently
    wrong rank would train on another rank's data shard or hang in the first collective.

    `device="auto"` is the mixed CPU+CUDA job: every rank joins one gloo group (nccl cannot
    include a CPU rank) and computes on `cuda:LOCAL_RANK` if it has that GPU, else on the CPU;
    `ling_dist.collectives` then stages CUDA tensors through host memory for gloo. `device="cpu"`
    or `"cuda"` forces the device (with `"cuda"` and no backend, nccl).
    """
    if device not in (None, "auto", "cpu", "cuda"):
        raise DistributedEnvError(f"device={device!r}: expected None, 'auto', 'cpu' or 'cuda'")
    if device == "auto":
        if backend not in (None, "gloo"):
            raise DistributedEnvError(f"device='auto' (mixed CPU+CUDA job) needs backend gloo, got {backend!r}")
        backend = "gloo"
    elif device == "cpu" and backend is None:
        backend = "gloo"
    present = [name for name in _REQUIRED if name in os.environ]
    if not present:
        if backend not in (None, "gloo", "nccl"):
            raise DistributedEnvError(f"backend={backend!r}: expected None, 'gloo' or 'nccl'")
        return 0, 1, _gloo_device(device, 0) if device else torch.device("cpu")
    missing = [name for name in _REQUIRED if name not in os.environ]
    if missing:
        raise DistributedEnvError(
            f"torchrun environment is partial: {', '.join(present)} set but {', '.join(missing)} "
            "missing; launch with torchrun or set all of " + ", ".join(_REQUIRED))
    rank, world_size, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if world_size < 1:
        raise DistributedEnvError(f"WORLD_SIZE={world_size}: expected >= 1")
    if not 0 <= rank < world_size:
        raise DistributedEnvError(f"RANK={rank}: expected 0 <= RANK < WORLD_SIZE={world_size}")
    if not 0 <= local_rank <= rank:
        raise DistributedEnvError(f"LOCAL_RANK={local_rank}: expected 0 <= LOCAL_RANK <= RANK={rank}")
    _env_int("MASTER_PORT")

    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise DistributedEnvError("backend='nccl' needs CUDA, which is not available; use 'gloo'")
        if local_rank >= torch.cuda.device_count():
            raise DistributedEnvError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible")
        if device == "cpu":
            raise DistributedEnvError("device='cpu' with backend='nccl': nccl needs CUDA tensors; use gloo")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif backend == "gloo":
        device = _gloo_device(device, local_rank)
    else:
        raise DistributedEnvError(f"backend={backend!r}: expected None, 'gloo' or 'nccl'")

    if dist.is_initialized():
        raise DistributedEnvError("a default process group already exists; call init_distributed once")
    store = _elastic_attempt_store(rank, world_size)
    dist.init_process_group(backend, init_method=None if store else "env://", store=store, rank=rank,
                            world_size=world_size, device_id=device if backend == "nccl" else None)
    logger.info("rank %d/%d joined the %s process group on %s", rank, world_size, backend, device)
    return rank, world_size, device


def _gloo_device(device: str | None, local_rank: int) -> torch.device:
    """The compute device of a gloo rank: CPU unless asked for CUDA ("auto": if this rank has it)."""
    has_gpu = torch.cuda.is_available() and local_rank < torch.cuda.device_count()
    if device == "cuda" and not has_gpu:
        raise DistributedEnvError(f"device='cuda' but LOCAL_RANK={local_rank} has no visible CUDA device")
    if device in ("cuda", "auto") and has_gpu:
        cuda = torch.device("cuda", local_rank)
        torch.cuda.set_device(cuda)
        return cuda
    return torch.device("cpu")


def _elastic_attempt_store(rank: int, world_size: int) -> dist.Store | None:
    """Under torchrun, a store whose keys cannot mix with a killed attempt's.

    After `--max-restarts` restarts the workers, a store that outlived the killed attempt still
    holds the listening addresses its ranks published for gloo's full-mesh connect; new ranks then
    read a dead rank's address and fail ("Connection refused") or hang (torch 2.15). Two cases:
    - torchrun shares its agent's store (its default): one prefix per TORCHELASTIC_RESTART_COUNT.
      That count is the agent's own, so it is the job's only on one machine: across machines the
      agent whose worker died counts a restart and the others do not (pytorch#135712), and no
      prefix can agree. Such jobs are warned to set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1.
    - TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: rank 0 hosts a new store each attempt; one prefix.
    Outside torchrun: None (env://).
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return None
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    warning = shared_store_restart_warning(dict(os.environ))
    if warning and rank == 0:
        logger.warning(warning)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], _env_int("MASTER_PORT"), world_size,
                          is_master=not agent_hosts_store and rank == 0, multi_tenant=not agent_hosts_store)
    return dist.PrefixStore(f"ling_dist/attempt-{attempt}" if agent_hosts_store else "ling_dist", store)


def shared_store_restart_warning(environ: dict[str, str]) -> str | None:
    """The warning for a several-machine torchrun job that may restart its workers while they
    share the agent's store (see `_elastic_attempt_store`), else None."""
    if (environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or int(environ.get("TORCHELASTIC_MAX_RESTARTS") or 0) < 1
            or int(environ.get("GROUP_WORLD_SIZE") or 1) < 2):
        return None
    return ("torchrun --nnodes > 1 with --max-restarts and its shared store: after a restart the nodes' "
            "workers would not find each other (pytorch#135712); set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
            "for every torchrun")
