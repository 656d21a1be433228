"""Flash snapshots of a ling-train run (`RUN/snapshots/`) and resuming from them after a restart.

Why a second tier next to the HF checkpoints: an HF checkpoint gathers the whole model to rank 0
and writes it synchronously, so it is taken rarely. A snapshot is per rank (its own weights,
FSDP2 shards or owned experts, optimizer, scheduler, loader position, RNG, Local SGD state), with
no gathering and no collective: `ling_dist.FlashCheckpointer` copies the state to host memory
behind the next forward/backward and a thread writes `step-S/rank-R.pt` + `rank-R.json`
(bytes, sha256). So it can be taken every few steps, and a killed worker loses at most one
snapshot interval.

Completeness: step S is usable only when all world_size manifests exist, parse, agree on the
world size and name files of the recorded size (`complete_snapshots`), and, at resume time, every
rank's sha256 matches (each rank checks its own file; the ranks agree with one all-reduce in the
main thread, and fall back to the next older snapshot if any rank's check fails). Rank 0 writes
`RUN/snapshots/latest` only for a snapshot it has seen complete.

Fences: the snapshot is the state at `save()` only if nothing writes those tensors before the
copy has read them. The inner torch optimizer's `step()` waits in a pre-step hook; this callback
also waits in `skip_update`, i.e. before `LocalSGD.step()` (EDiT/A-EDiT finish their exchange there,
before the inner step), and in `before_state_rewrite`, i.e. before an anomaly rollback.

A-EDiT's ranks take unequal numbers of steps, so "every N steps" is no common cut: there every
rank snapshots right after the sync point at which the ranks' agreed step total passes a multiple
of N x world size (`SyncPointSnapshots`, the same rule as its HF checkpoints), under rank 0's step
as the name, so snapshot and checkpoint steps compare as they do for the other modes.
"""

from __future__ import annotations

import logging
import os
import signal
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ling_core import CheckpointError
from ling_core.hf_io import write_text_atomic
from ling_dist.flash_checkpoint import CheckpointError as DistCheckpointError
from ling_dist.flash_checkpoint import FlashCheckpointer, Snapshot, list_snapshots, load_snapshot, shards_like
from ling_dist.snapshot_files import STEP_DIR_PATTERN as STEP_DIR
from ling_dist.snapshot_files import remove_step_dirs
from ling_train import checkpoint as ckpt
from ling_train.config import RunConfig, RunConfigError
from ling_train.distributed import SyncPointSchedule
from ling_train.trainer import Callback, Trainer

log = logging.getLogger("ling_train")

SNAPSHOTS_DIR = "snapshots"
LATEST = "latest"
# Test-only fault injection (tests/test_train_elastic.py): on the first attempt, after step K and
# once every rank's snapshots are on disk, rank R SIGKILLs itself.
KILL_AT_STEP_ENV, KILL_RANK_ENV = "LING_TEST_KILL_AT_STEP", "LING_TEST_KILL_RANK"


_agreed_restart_attempt: int | None = None


def restart_attempt() -> int:
    """0 on the first attempt, n > 0 once torchrun has restarted the workers: as the job's ranks
    agreed (`agree_restart_attempt`), else this process's TORCHELASTIC_RESTART_COUNT."""
    if _agreed_restart_attempt is not None:
        return _agreed_restart_attempt
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)


def agree_restart_attempt(device: torch.device) -> int:
    """The job's restart attempt: the largest TORCHELASTIC_RESTART_COUNT of its ranks. Across nodes
    the counts differ: after a worker fails, its agent restarts its workers with the count raised,
    and every other agent restarts its own (a membership change, not a failure) with the count
    unchanged. Taken alone, those ranks would start the run afresh while the others resume it.
    Called once, right after the process group is joined (a process alone keeps its own count)."""
    global _agreed_restart_attempt
    import torch.distributed as dist

    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
    if dist.is_available() and dist.is_initialized():
        count = torch.tensor([attempt], device=device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        attempt = int(count.item())
    _agreed_restart_attempt = attempt
    return attempt


def is_snapshot(path: Path | None) -> bool:
    return path is not None and path.parent.name == SNAPSHOTS_DIR and STEP_DIR.match(path.name) is not None


def complete_snapshots(directory: Path, world_size: int | None = None) -> list[Snapshot]:
    """Snapshots under `directory` whose every rank's manifest and file are in place, newest first
    (only those written by `world_size` ranks when given); ling_dist decides completeness."""
    return list_snapshots(directory, world_size)[::-1]


def choose_snapshot(candidates: list[Snapshot], rank: int, agree: Callable[[Snapshot, bool], bool]
                    ) -> tuple[Snapshot, dict] | None:
    """The newest of `candidates` whose every rank's file matches its sha256, with this rank's state.
    Each rank verifies its own file; `agree(snapshot, ok)` is True when every rank's check passed
    (an all-reduce across the job)."""
    for snapshot in candidates:
        try:
            state = load_snapshot(snapshot, rank)
        except Exception as error:  # noqa: BLE001 - a bad checksum or an unreadable pickle: not usable
            log.warning("rank %d: snapshot %s not usable: %s", rank, snapshot.path, error)
            state = None
        if agree(snapshot, state is not None):
            return snapshot, state
    return None


def all_ranks_agree(device: torch.device) -> Callable[[Snapshot, bool], bool]:
    """`agree` for `choose_snapshot` over the process group (a single process agrees with itself)."""
    import torch.distributed as dist

    def agree(snapshot: Snapshot, ok: bool) -> bool:
        if not (dist.is_available() and dist.is_initialized()):
            return ok
        flag = torch.tensor([1 if ok else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())
    return agree


def _hf_checkpoint_step(out: Path) -> tuple[int, Path] | None:
    """(step, path) of the run's latest HF checkpoint, or None when it has none."""
    try:
        path = ckpt.latest_checkpoint(out / "checkpoints")
    except CheckpointError:
        return None
    match = STEP_DIR.match(path.name)  # HF checkpoints are step-N, snapshots step-%09d: one pattern
    return (int(match.group(1)), path) if match else None


@dataclass
class ResumeSource:
    path: Path | None  # an HF checkpoint dir, a snapshot step dir, or None (start from scratch)
    state: dict | None = None  # this rank's snapshot state, already verified


def restart_source(out: Path, rank: int, world_size: int, device: torch.device, given: Path | None) -> ResumeSource:
    """On a torchrun restart: the newer of the newest usable snapshot and the latest HF checkpoint
    in `out`; without either, `given` (the run's own `--resume`, or None: from scratch). Collective
    (every rank calls it). Rank 0 then removes snapshot directories newer than the one chosen
    (parts of the killed attempt), so they cannot be mixed with the new attempt's."""
    import torch.distributed as dist

    hf = _hf_checkpoint_step(out)
    candidates = [s for s in complete_snapshots(out / SNAPSHOTS_DIR, world_size) if hf is None or s.step > hf[0]]
    chosen = choose_snapshot(candidates, rank, all_ranks_agree(device))
    source = ResumeSource(chosen[0].path, chosen[1]) if chosen else ResumeSource(hf[1] if hf else given)
    keep_up_to = chosen[0].step if chosen else (hf[0] if hf else 0)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # every rank has read its state before anything is deleted
    if rank == 0:
        remove_step_dirs(out / SNAPSHOTS_DIR, lambda step: step > keep_up_to)
    return source


def resolve_resume(path: Path, world_size: int, dist: str | None = None) -> Path | None:
    """`--resume RUN` (or RUN/checkpoints): the newest complete snapshot at `world_size` processes
    when it is newer than the latest HF checkpoint, else None (the caller resolves the HF one).
    A snapshot step dir is returned as it is. `dist`: the `--dist` asked for, if any; a snapshot
    resumes only under its run's own, so under another the HF checkpoint is taken (which can
    change `--dist`), or, without one, an error says so."""
    if is_snapshot(path):
        return path
    run = path.parent if path.name == "checkpoints" else path
    snapshots = complete_snapshots(run / SNAPSHOTS_DIR)
    if not snapshots:
        return None
    newest, hf = snapshots[0], _hf_checkpoint_step(run)
    if hf is not None and hf[0] >= newest.step:
        return None
    run_dist = dist and tomllib.loads(run_config_of(newest.path)).get("dist", "none")
    if run_dist != dist:
        if hf is None:
            raise RunConfigError(f"--resume {path}: its only saved state is snapshot step {newest.step}, of a "
                                 f"--dist {run_dist} run, and a snapshot resumes only under its own --dist; resume "
                                 f"with --dist {run_dist} (an HF checkpoint of the run could change it)")
        log.warning("--resume %s: snapshot step %d is newer, but resuming under --dist %s (the run had %s) "
                    "takes the HF checkpoint %s", path, newest.step, dist, run_dist, hf[1])
        return None
    if newest.world_size != world_size:
        hint = (f"resume with --nproc {newest.world_size}, or at any process count from the HF checkpoint: "
                f"--resume {hf[1]}" if hf else f"resume with --nproc {newest.world_size} (no HF checkpoint there "
                f"to resume at another process count)")
        raise RunConfigError(f"--resume {path}: its newest state is snapshot step {newest.step}, per process for "
                             f"{newest.world_size} processes, and this run has {world_size}; {hint}")
    return newest.path


def run_config_of(snapshot_dir: Path) -> str:
    """The run config a snapshot continues (RUN/config.toml, written by rank 0 at the start)."""
    path = snapshot_dir.parent.parent / "config.toml"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (a snapshot resumes the run config of its run directory)")
    return path.read_text()


def load_rank_state(snapshot_dir: Path, rank: int, world_size: int, device: torch.device,
                    config: RunConfig) -> dict:
    """This rank's state from an explicitly given snapshot (`--resume`), every rank's checksum checked."""
    candidates = [s for s in complete_snapshots(snapshot_dir.parent) if s.path == snapshot_dir]
    if not candidates:
        raise CheckpointError(f"--resume {snapshot_dir}: not a complete snapshot (a rank's manifest or file is "
                              f"missing or damaged)")
    if candidates[0].world_size != world_size:
        raise RunConfigError(f"--resume {snapshot_dir}: written by {candidates[0].world_size} processes, this run "
                             f"has {world_size}; resume a snapshot at its process count, or use an HF checkpoint")
    chosen = choose_snapshot(candidates, rank, all_ranks_agree(device))
    if chosen is None:
        raise CheckpointError(f"--resume {snapshot_dir}: a rank's file does not match its manifest's sha256")
    return check_dist(chosen[1], config, snapshot_dir)


def resume_state(source: ResumeSource, config: RunConfig, rank: int, world_size: int, device: torch.device) -> dict:
    """This rank's state from the snapshot `source` names (already loaded on a restart)."""
    if source.state is not None:
        return check_dist(source.state, config, source.path)
    return load_rank_state(source.path, rank, world_size, device, config)


def check_dist(state: dict, config: RunConfig, where: Path) -> dict:
    if state.get("dist") != config.dist:
        raise RunConfigError(f"--resume {where}: written by --dist {state.get('dist')}, this run has --dist "
                             f"{config.dist}; a snapshot resumes with the same --dist and process count (an HF "
                             f"checkpoint, RUN/checkpoints/step-N, resumes under another)")
    return state


def fit_state(state: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """A snapshot's state ready for `Trainer.load_state_dict`, with this rank's weights as
    `local_model` (loaded last: the Local SGD wrappers broadcast rank 0's weights when built) and
    each FSDP2 shard, weights and optimizer state, rebuilt as a DTensor on the live parameter's
    mesh (the optimizer state is created lazily, so the live state cannot serve as the template)."""
    state = {**state, "local_model": _as_shards_of(state["model"], model.state_dict())}
    optim_state = state["optimizer"]
    if "state" not in optim_state or "param_groups" not in optim_state:  # Local SGD: no DTensors there
        return state
    params = [p for group in optimizer.param_groups for p in group["params"]]
    rebuilt = {index: {key: _as_shards_of(value, params[index]) if isinstance(value, torch.Tensor)
                       and value.ndim else value for key, value in entry.items()}
               for index, entry in optim_state["state"].items()}
    return {**state, "optimizer": {**optim_state, "state": rebuilt}}


def _as_shards_of(value: Any, like: Any) -> Any:
    """ling_dist's `shards_like`, its error as ling-core's CheckpointError (a bad-input exit)."""
    try:
        return shards_like(value, like, "snapshot")
    except DistCheckpointError as error:
        raise CheckpointError(f"{error}; resume with the flags and process count that wrote it") from None


class SnapshotCallback(Callback):
    """Every `every` steps: `FlashCheckpointer.save` of `state()` (this rank's whole state). Logs
    `{"event": "snapshot", "step", "save_s", "fence_wait_s", "snapshot_blocking_s"}` once the fence
    has passed (the step's blocking time: the `save()` call plus the wait before the next update)."""

    def __init__(self, flash: FlashCheckpointer, every: int, state: Callable[[], dict], write: Callable[[dict], None],
                 rank: int, barrier: Callable[[], None]):
        self.flash, self.every, self.state, self.write = flash, every, state, write
        self.rank, self.barrier = rank, barrier
        self.pending_row: dict | None = None
        self.kill_at = int(os.environ.get(KILL_AT_STEP_ENV) or 0) if restart_attempt() == 0 else 0

    def due(self, trainer: Trainer, step: int) -> int | None:
        """The step to name a snapshot taken now, or None; every rank must agree."""
        return step if step % self.every == 0 and trainer.step == step else None  # != : rolled back

    def post_step(self, trainer: Trainer, step: int, metrics: dict[str, Any]) -> None:
        name = self.due(trainer, step)
        if name is not None:
            if self.rank == 0:
                self.update_latest()
            self.flash.save(name, self.state())
            self.pending_row = {"event": "snapshot", "step": name, "save_s": self.flash.last_blocking_s}
        if self.kill_now(step, name):
            self.fence()
            self.flash.wait()
            self.barrier()  # every rank's snapshots are on disk: the test knows where the restart resumes
            if self.rank == int(os.environ.get(KILL_RANK_ENV) or 0):
                os.kill(os.getpid(), signal.SIGKILL)

    def kill_now(self, step: int, snapshot_name: int | None) -> bool:
        """The test-only fault injection's moment: after step K (on every rank at once)."""
        return step == self.kill_at

    def skip_update(self, trainer: Trainer, step: int, metrics: dict[str, Any], output: Any) -> bool:
        self.fence()  # before optimizer.step(): a Local SGD exchange, then the inner step
        return False

    def before_state_rewrite(self, trainer: Trainer, to_step: int) -> None:
        """An anomaly rollback (one process only) is about to copy step `to_step`'s weights into the
        live tensors: let the copy finish, then drop the snapshots of the steps being undone, so
        that a crash before the replay reaches them again cannot resume the discarded steps."""
        self.fence()
        self.flash.wait()
        remove_step_dirs(self.flash.directory, lambda step: step > to_step)
        self.update_latest()

    def fence(self) -> None:
        self.flash.wait_for_snapshot()
        if self.pending_row is not None:
            row, self.pending_row = self.pending_row, None
            row["fence_wait_s"] = self.flash.last_fence_wait_s
            row["snapshot_blocking_s"] = row["save_s"] + row["fence_wait_s"]
            self.write(row)

    def update_latest(self, prune: bool = False) -> None:
        """Rank 0: point `latest` at the newest complete snapshot; with `prune` (at the end, once
        every rank's writes are done) also delete what is older than the `keep_last` newest ones
        (the writer thread prunes too, but only sees its own last snapshot complete if it is last)."""
        complete = complete_snapshots(self.flash.directory, self.flash.world_size)
        if complete:
            write_text_atomic(self.flash.directory / LATEST, complete[0].path.name + "\n")
        else:
            (self.flash.directory / LATEST).unlink(missing_ok=True)
        if prune and len(complete) > self.flash.keep_last:
            oldest_kept = complete[self.flash.keep_last - 1].step
            remove_step_dirs(self.flash.directory, lambda step: step < oldest_kept)

    def on_train_end(self, trainer: Trainer) -> None:
        self.fence()
        self.flash.close()
        self.barrier()
        if self.rank == 0:
            self.update_latest(prune=True)


class SyncPointSnapshots(SnapshotCallback):
    """A-EDiT's snapshots (see the module docstring): due at the same sync points as its
    checkpoints (`distributed.SyncPointSchedule`); named by rank 0's step (one broadcast, at that
    sync point only, where every rank is)."""

    def __init__(self, *args, local_sgd, world_size: int, device: torch.device, **kwargs):
        super().__init__(*args, **kwargs)
        self.schedule, self.device = SyncPointSchedule(local_sgd, self.every, world_size), device

    def on_train_start(self, trainer: Trainer) -> None:
        self.schedule.start()

    def due(self, trainer: Trainer, step: int) -> int | None:
        import torch.distributed as dist

        if not self.schedule.due():
            return None
        if not (dist.is_available() and dist.is_initialized()):  # one process: its own step
            return step
        name = torch.tensor([step], device=self.device)
        dist.broadcast(name, src=0)
        return int(name.item())

    def kill_now(self, step: int, snapshot_name: int | None) -> bool:
        """Ranks reach step K at different times here: the first snapshot named K or later instead
        (a sync point, where every rank is)."""
        return bool(self.kill_at) and snapshot_name is not None and snapshot_name >= self.kill_at


def snapshot_callback(config: RunConfig, out: Path, rank: int, world_size: int, optimizer: torch.optim.Optimizer,
                      trainer_state: Callable[[], dict], write: Callable[[dict], None],
                      barrier: Callable[[], None], local_sgd=None, device: torch.device | None = None
                      ) -> SnapshotCallback:
    """The callback `run.train` adds under `--snapshot-every N`; `optimizer` is the inner torch one;
    `local_sgd` (with `device`, for its broadcast) under --dist aedit."""
    flash = FlashCheckpointer(out / SNAPSHOTS_DIR, keep_last=config.keep_snapshots, optimizers=[optimizer],
                              rank=rank, world_size=world_size)
    if config.dist == "aedit":
        return SyncPointSnapshots(flash, config.snapshot_every, trainer_state, write, rank, barrier,
                                  local_sgd=local_sgd, world_size=world_size, device=device)
    return SnapshotCallback(flash, config.snapshot_every, trainer_state, write, rank, barrier)


def restart_event(source: ResumeSource, step: int, world_size: int) -> dict:
    return {"event": "restart", "attempt": restart_attempt(), "step": step,
            "from": str(source.path) if source.path else None, "world_size": world_size}


def rows_of_this_attempt(rows: list[dict]) -> list[dict]:
    """metrics.jsonl rows from the last restart on (a killed attempt's rows stay in the file)."""
    starts = [i for i, row in enumerate(rows) if row.get("event") == "restart"]
    return rows[starts[-1]:] if starts else rows
