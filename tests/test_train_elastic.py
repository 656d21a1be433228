"""`ling-train --snapshot-every N --max-restarts K`: per-rank flash snapshots in RUN/snapshots and
the resume after a killed worker, with real processes (torchrun, gloo on CPU) and a tiny model.

The bitwise checks rest on the same determinism as the `--resume` tests: a snapshot holds every
rank's weights, optimizer, scheduler, loader position, RNG and Local SGD state, so the restarted
job replays the steps after the snapshot exactly.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ling_dist.flash_checkpoint import FlashCheckpointer
from ling_train.cli import main
from ling_train.config import RunConfigError
from ling_train.dist_checkpoint import local_sgd_fingerprints
from ling_train.snapshots import (KILL_AT_STEP_ENV, KILL_RANK_ENV, choose_snapshot, complete_snapshots,
                                  load_snapshot, resolve_resume)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # importlib mode: make the helpers importable
from train_dist_testing import SYNC_EVERY_STEP, finish, rank_states, rows, weights, write_config  # noqa: E402


def write_two_rank_snapshots(directory: Path, steps: list[int]) -> None:
    """Snapshots as two ranks of one job would write them (each rank its own file and manifest)."""
    writers = [FlashCheckpointer(directory, keep_last=len(steps), rank=rank, world_size=2) for rank in (0, 1)]
    for step in steps:
        for rank, writer in enumerate(writers):
            writer.save(step, {"rank": rank, "step": step, "weights": torch.full((64,), float(step + rank))})
            writer.wait()
    for writer in writers:
        writer.close()


def test_incomplete_or_damaged_snapshot_is_never_chosen(tmp_path):
    write_two_rank_snapshots(tmp_path, [2, 4, 6, 8])
    (tmp_path / "step-000000008" / "rank-00001.json").unlink()  # rank 1 killed before its manifest
    (tmp_path / "step-000000006" / "rank-00000.json").write_text('{"step": 6, "ra')  # damaged manifest
    data = tmp_path / "step-000000004" / "rank-00001.pt"  # same size, other bytes: only the sha256 tells
    damaged = bytearray(data.read_bytes())
    damaged[-20] ^= 0xFF
    data.write_bytes(bytes(damaged))

    candidates = complete_snapshots(tmp_path, world_size=2)
    assert [s.step for s in candidates] == [4, 2]
    assert complete_snapshots(tmp_path, world_size=3) == []

    def rank_ok(snapshot, rank):
        try:
            load_snapshot(snapshot, rank)
            return True
        except Exception:
            return False

    # What the all-reduce over both ranks decides: usable only if every rank's checksum holds.
    for rank in (0, 1):
        snapshot, state = choose_snapshot(candidates, rank, lambda s, ok: ok and all(rank_ok(s, r) for r in (0, 1)))
        assert snapshot.step == 2 and state["rank"] == rank
        assert torch.equal(state["weights"], torch.full((64,), 2.0 + rank))


def test_resume_prefers_a_newer_snapshot_only_at_its_world_size(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-2" / "trainer_state").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step-2\n")
    write_two_rank_snapshots(run / "snapshots", [4])
    assert resolve_resume(run, world_size=2) == run / "snapshots" / "step-000000004"
    with pytest.raises(RunConfigError, match=r"--nproc 2.*checkpoints/step-2"):
        resolve_resume(run, world_size=1)
    (run / "config.toml").write_text('dist = "edit"\n')
    assert resolve_resume(run, world_size=2, dist="edit") == run / "snapshots" / "step-000000004"
    assert resolve_resume(run, world_size=2, dist="ddp") is None  # another --dist: the HF checkpoint
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(RunConfigError, match=r"snapshot step 4, of a --dist edit run.*resume with --dist edit"):
        resolve_resume(run, world_size=2, dist="ddp")
    (run / "checkpoints" / "step-6" / "trainer_state").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step-6\n")
    assert resolve_resume(run, world_size=1) is None  # the HF checkpoint is newer: the caller takes it


def test_resume_from_a_snapshot_in_one_process_is_bitwise(tmp_path):
    """`--resume SNAPSHOT` continues bitwise; `--resume --out RUN` takes the snapshot when it is newer
    than RUN's latest HF checkpoint (as after a kill between the two)."""
    config = write_config(tmp_path, extra="checkpoint_every = 0\n")
    common = ["--no-progress", "--device", "cpu"]
    assert main(["--config", str(config), "--steps", "4", "--snapshot-every", "2", "--out", str(tmp_path / "a"),
                 *common]) == 0
    snapshot = tmp_path / "a" / "snapshots" / "step-000000002"
    assert (tmp_path / "a" / "snapshots" / "latest").read_text().strip() == "step-000000004"
    assert main(["--resume", str(snapshot), "--out", str(tmp_path / "b"), *common]) == 0
    a, b = weights(tmp_path / "a" / "checkpoints" / "step-4"), weights(tmp_path / "b" / "checkpoints" / "step-4")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    snapshot_rows = [r for r in rows(tmp_path / "a") if r.get("event") == "snapshot"]
    assert [r["step"] for r in snapshot_rows] == [2, 4] and all(r["snapshot_blocking_s"] > 0 for r in snapshot_rows)

    shutil.rmtree(tmp_path / "a" / "checkpoints" / "step-4")  # the HF checkpoint before snapshot 4: only b's
    shutil.copytree(tmp_path / "b" / "checkpoints" / "step-4", tmp_path / "a" / "checkpoints" / "step-3")
    (tmp_path / "a" / "checkpoints" / "latest").write_text("step-3\n")  # (a stand-in: only its name matters)
    assert main(["--resume", "--out", str(tmp_path / "a"), *common]) == 0  # nothing left to train: saves step 4
    resumed = [r for r in rows(tmp_path / "a") if r.get("event") == "resume"]
    assert resumed[-1]["step"] == 4 and resumed[-1]["from"].endswith("snapshots/step-000000004")
    c = weights(tmp_path / "a" / "checkpoints" / "step-4")
    assert all(torch.equal(b[k], c[k]) for k in b)


def test_aedit_snapshots_in_one_process(tmp_path):
    """One A-EDiT process (no process group): its sync-point snapshots are named by its own step."""
    config = write_config(tmp_path, extra="checkpoint_every = 0\n")
    assert main(["--config", str(config), "--dist", "aedit", "--sync-seconds", SYNC_EVERY_STEP, "--snapshot-every", "2",
                 "--steps", "4", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert [s.step for s in complete_snapshots(tmp_path / "run" / "snapshots")]


def test_max_restarts_needs_nproc(capsys):
    assert main(["--max-restarts", "1", "--dry-run"]) == 2
    assert "--max-restarts: needs --nproc" in capsys.readouterr().err


def launch(out: Path, config: Path, env: dict[str, str], *args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "ling_train.cli", "--nproc", "2", "--no-progress", "--config", str(config),
               "--out", str(out), *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def killed_and_whole(tmp_path: Path, args: list[str], kill_at: int, resumed_at: int) -> tuple[Path, Path]:
    """The same job twice at once, uninterrupted and with rank 1 SIGKILLed after step `kill_at` on
    its first attempt; checks that the restart resumed from snapshot `resumed_at` and that every
    loss after it equals the uninterrupted run's exactly."""
    config = write_config(tmp_path, extra="checkpoint_every = 0\n")
    jobs = {"whole": launch(tmp_path / "whole", config, {}, *args),
            "killed": launch(tmp_path / "killed", config, {KILL_AT_STEP_ENV: str(kill_at), KILL_RANK_ENV: "1"}, *args)}
    summaries = {name: finish(job) for name, job in jobs.items()}
    steps = summaries["whole"]["steps"]
    assert summaries["killed"]["steps"] == steps

    killed_rows = rows(tmp_path / "killed")
    restart = [i for i, r in enumerate(killed_rows) if r.get("event") == "restart"]
    assert len(restart) == 1, "expected exactly one restart"
    event = killed_rows[restart[0]]
    assert event["attempt"] == 1 and event["step"] == resumed_at
    assert event["from"].endswith(f"snapshots/step-{resumed_at:09d}")
    assert max(r["step"] for r in killed_rows[:restart[0]] if "loss" in r) == kill_at  # the killed attempt's progress
    whole = {r["step"]: r["loss"] for r in rows(tmp_path / "whole") if "loss" in r}
    after = {r["step"]: r["loss"] for r in killed_rows[restart[0]:] if "loss" in r}
    assert sorted(after) == list(range(resumed_at + 1, steps + 1)) and all(after[s] == whole[s] for s in after), \
        (whole, after)
    final = tuple(tmp_path / name / "checkpoints" / f"step-{steps}" for name in ("whole", "killed"))
    a, b = weights(final[0]), weights(final[1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return final


@pytest.mark.slow
@pytest.mark.dist
def test_sigkilled_edit_worker_restarts_from_the_latest_snapshot_bitwise(tmp_path):
    """EDiT on 2 ranks, a snapshot every 2 steps; rank 1 SIGKILLed after step 5 on the first attempt.
    torchrun restarts both workers, which resume from snapshot 4 (loader, RNG, anchor, outer momentum,
    rank 1's own weights) and end exactly as an uninterrupted run."""
    args = ["--steps", "8", "--dist", "edit", "--sync-every", "3", "--snapshot-every", "2", "--max-restarts", "1"]
    whole, killed = killed_and_whole(tmp_path, args, kill_at=5, resumed_at=4)
    (state_a, rank1_a), (state_b, rank1_b) = rank_states(whole), rank_states(killed)
    assert state_a["loader"] == state_b["loader"] and rank1_a["loader"] == rank1_b["loader"]
    assert all(torch.equal(rank1_a["local_model"][k], rank1_b["local_model"][k]) for k in rank1_a["local_model"])
    snapshots = sorted(p.name for p in (tmp_path / "killed" / "snapshots").glob("step-*"))
    assert snapshots == ["step-000000006", "step-000000008"]  # keep_snapshots = 2
    assert (tmp_path / "killed" / "snapshots" / "latest").read_text().strip() == "step-000000008"


@pytest.mark.slow
@pytest.mark.dist
def test_sigkilled_fsdp_expert_parallel_worker_restarts_from_its_shards_bitwise(tmp_path):
    """FSDP2 + expert parallel: each rank snapshots its own shards and experts (nothing gathered)
    and gets them back as DTensors / owned experts after the restart. Alongside (one test, to share
    the machine's idle time): a DDP job killed before any snapshot starts over in its own run
    directory (its earlier attempt's metrics.jsonl is not taken for another run) and replays step 1
    exactly."""
    scratch_config = write_config(tmp_path, name="scratch.toml", extra="checkpoint_every = 0\n")
    scratch = launch(tmp_path / "scratch", scratch_config, {KILL_AT_STEP_ENV: "1", KILL_RANK_ENV: "1"},
                     "--steps", "2", "--dist", "ddp", "--snapshot-every", "4", "--max-restarts", "1")
    args = ["--steps", "4", "--dist", "fsdp", "--expert-parallel", "2", "--snapshot-every", "2",
            "--max-restarts", "1"]
    killed_and_whole(tmp_path, args, kill_at=3, resumed_at=2)

    assert finish(scratch)["steps"] == 2
    run_rows = rows(tmp_path / "scratch")
    restart = next(i for i, r in enumerate(run_rows) if r.get("event") == "restart")
    assert run_rows[restart]["from"] is None and run_rows[restart]["step"] == 0
    before = [r["loss"] for r in run_rows[:restart] if "loss" in r]
    after = [r["loss"] for r in run_rows[restart:] if "loss" in r]
    assert len(before) == 1 and len(after) == 2 and before[0] == after[0]
    assert not list((tmp_path / "scratch" / "snapshots").glob("step-*"))


@pytest.mark.slow
@pytest.mark.dist
def test_sigkilled_aedit_worker_restarts_from_a_sync_point_snapshot(tmp_path):
    """A-EDiT's ranks reach step N at different times, so its snapshots are taken right after the
    sync point where the agreed step total passes a multiple of N x ranks, named by rank 0's step.
    Rank 1 is SIGKILLed after the first snapshot named 3 or later; the restart resumes from a
    complete snapshot with exactly its anchor and outer momentum, and the job reaches its total.
    (Not bitwise: the syncs follow wall time.)"""
    config = write_config(tmp_path, extra="checkpoint_every = 0\n")
    out = tmp_path / "killed"
    summary = finish(launch(out, config, {KILL_AT_STEP_ENV: "3", KILL_RANK_ENV: "1"}, "--steps", "8",
                            "--dist", "aedit", "--sync-seconds", SYNC_EVERY_STEP, "--outer-momentum", "0.8",
                            "--snapshot-every", "2", "--keep-snapshots", "50", "--max-restarts", "1"))
    run_rows = rows(out)
    restart = [r for r in run_rows if r.get("event") == "restart"]
    assert len(restart) == 1 and restart[0]["step"] >= 3 and "snapshots/step-" in restart[0]["from"]
    snapshot = Path(restart[0]["from"])
    states = [load_snapshot(s, rank) for s in complete_snapshots(snapshot.parent) if s.path == snapshot
              for rank in (0, 1)]
    assert states[0]["step"] == restart[0]["step"]  # named by rank 0's step
    local_sgd = [state["optimizer"] for state in states]  # one consistent cut: the same sync on both ranks
    assert local_sgd[0]["global_inner_steps"] == local_sgd[1]["global_inner_steps"] >= 4
    assert local_sgd[0]["outer_optimizer"]["state"], "no outer momentum in the snapshot"
    resumed = next(r for r in run_rows[run_rows.index(restart[0]):] if r.get("event") == "resume")
    expected = local_sgd_fingerprints(local_sgd[0])
    assert {k: resumed[k] for k in expected} == expected
    syncs = [r for r in run_rows if r.get("event") == "sync"]
    assert syncs[-1]["global_inner_steps"] >= 16 and summary["syncs"] > 0
