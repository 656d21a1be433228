"""`ling-train --resume` under every `--dist` mode and at another world size, with real processes
(torchrun, gloo on CPU) and a tiny model; the one-process legs run in this process.

Exactness checks rely on how the loss is logged: each row is rank 0's own loss on its own batch.
After N -> 1 at step s, the single process's step s+1 batch is the first slice of the next global
batch, i.e. old rank 0's step s+1 batch; with the same weights (DDP, FSDP2, or Local SGD at a sync
point) its loss equals the uninterrupted run's logged step s+1 loss exactly. 1 -> 2 likewise.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from ling_train.cli import main
from ling_core import from_pretrained
from ling_train.dist_checkpoint import local_sgd_fingerprints, optimizer_sha256, tensors_sha256

sys.path.insert(0, str(Path(__file__).resolve().parent))  # importlib mode: make the helpers importable
from train_dist_testing import (SYNC_EVERY_STEP, finish, launch, rank_states, rows, weights,  # noqa: E402
                                write_config)

pytestmark = pytest.mark.dist


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows(run) if "loss" in r}


def resume_event(run: Path) -> dict:
    return next(r for r in rows(run) if r.get("event") == "resume")


def in_process(*args: str) -> dict:
    """A one-process run of `ling-train` (no torchrun, no process group) in this interpreter."""
    out = Path(args[args.index("--out") + 1])
    assert main([*args, "--no-progress"]) == 0
    return json.loads((out / "summary.json").read_text())


def assert_carried_over(run: Path, checkpoint: Path) -> None:
    """The resumed process holds exactly the saved anchor and outer momentum (its resume event
    fingerprints them after loading), and the outer momentum is not empty."""
    saved = torch.load(checkpoint / "trainer_state" / "state.pt", weights_only=False)["optimizer"]
    assert saved["outer_optimizer"]["state"], "no outer momentum in the checkpoint"
    event = resume_event(run)
    expected = local_sgd_fingerprints(saved)
    assert {k: event[k] for k in expected} == expected


@pytest.mark.slow
def test_fsdp_and_expert_parallel_resume_bitwise_and_on_one_process(tmp_path):
    """FSDP2 and FSDP2 + expert parallel write whole HF weights and a whole optimizer state; an
    interrupted 2-rank run resumed on 2 ranks matches the uninterrupted one bitwise, and on one
    process (each of the two) continues from the same weights and optimizer state with the next
    batch in order."""
    config = write_config(tmp_path, extra="checkpoint_every = 2\n")
    variants = {"fsdp": [], "ep": ["--expert-parallel", "2"]}
    full = {name: launch("--config", str(config), "--steps", "4", "--out", str(tmp_path / name), "--dist", "fsdp",
                         *flags) for name, flags in variants.items()}
    for process in full.values():
        finish(process)
    resumed = {name: launch("--resume", str(tmp_path / name / "checkpoints" / "step-2"),
                            "--out", str(tmp_path / f"{name}-resumed")) for name in variants}
    for process in resumed.values():
        finish(process)
    for name in variants:
        a, b = losses(tmp_path / name), losses(tmp_path / f"{name}-resumed")
        assert sorted(b) == [3, 4] and all(a[s] == b[s] for s in b), (name, a, b)  # exact
        wa = weights(tmp_path / name / "checkpoints" / "step-4")
        wb = weights(tmp_path / f"{name}-resumed" / "checkpoints" / "step-4")
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    # Both variants train the same model the same way (expert parallel moves experts, not sums).
    w_fsdp, w_ep = (weights(tmp_path / name / "checkpoints" / "step-2") for name in variants)
    assert w_fsdp.keys() == w_ep.keys()
    assert all(torch.allclose(w_fsdp[k], w_ep[k], rtol=1e-4, atol=1e-6) for k in w_fsdp)
    # 2 -> 1: FSDP2 + expert parallel checkpoint, one process without either.
    in_process("--resume", str(tmp_path / "ep" / "checkpoints" / "step-2"), "--out", str(tmp_path / "one"),
               "--expert-parallel", "0")
    one = losses(tmp_path / "one")
    assert one[3] == losses(tmp_path / "ep")[3] and one[4] < one[3]
    assert resume_event(tmp_path / "one")["from_world_size"] == 2
    # 2 -> 1: plain FSDP2 (its shards gathered by name, then cut for one process).
    in_process("--resume", str(tmp_path / "fsdp" / "checkpoints" / "step-2"), "--out", str(tmp_path / "one-fsdp"))
    one = losses(tmp_path / "one-fsdp")
    assert one[3] == losses(tmp_path / "fsdp")[3] and one[4] < one[3]
    assert resume_event(tmp_path / "one-fsdp")["from_world_size"] == 2


@pytest.mark.slow
def test_local_sgd_and_ddp_resume_on_fewer_and_more_processes(tmp_path):
    """2 -> 1 for DDP, DiLoCo (checkpoint at a sync point) and EDiT (mid-interval), 1 -> 2 for
    DiLoCo: anchor and outer momentum arrive exactly, the loader continues with the next windows
    in order (exact losses where the weights are the same), and the loss keeps going down."""
    config = write_config(tmp_path, extra="checkpoint_every = 2\n")
    edit_config = write_config(tmp_path, "edit.toml", extra="checkpoint_every = 3\n")
    sources = {  # name: (flags, checkpoint step)
        "ddp": (["--config", str(config), "--dist", "ddp"], 2),
        "diloco": (["--config", str(config), "--dist", "diloco", "--sync-every", "2", "--outer-momentum", "0.8"], 2),
        # step 3: one sync (step 2) behind it, mid-interval
        "edit": (["--config", str(edit_config), "--dist", "edit", "--sync-every", "2", "--outer-momentum", "0.8"], 3),
    }
    launched = {name: launch(*flags, "--steps", "4", "--out", str(tmp_path / name))
                for name, (flags, _) in sources.items()}
    # Meanwhile, in this process: the one-process DiLoCo source for 1 -> 2 and its uninterrupted run.
    one_rank = ["--config", str(config), "--dist", "diloco", "--sync-every", "2", "--outer-momentum", "0.8"]
    in_process(*one_rank, "--steps", "4", "--out", str(tmp_path / "single"))
    for process in launched.values():
        finish(process)
    up = launch("--resume", str(tmp_path / "single" / "checkpoints" / "step-2"), "--out", str(tmp_path / "up"))

    for name, (_, step) in sources.items():
        checkpoint = tmp_path / name / "checkpoints" / f"step-{step}"
        in_process("--resume", str(checkpoint), "--out", str(tmp_path / f"{name}-down"), "--steps", "6")
        full, down = losses(tmp_path / name), losses(tmp_path / f"{name}-down")
        assert sorted(down) == list(range(step + 1, 7))
        if name != "edit":  # rank 0's weights are the whole job's (DDP; DiLoCo right after a sync)
            assert down[step + 1] == full[step + 1], (name, full, down)
        assert down[6] < full[1] and all(math.isfinite(v) for v in down.values())
        if name != "ddp":
            assert_carried_over(tmp_path / f"{name}-down", checkpoint)
    states = rank_states(tmp_path / "edit" / "checkpoints" / "step-3")
    assert states[0]["params_sha256"] != states[1]["params_sha256"]  # EDiT really was mid-interval

    finish(up)
    assert_carried_over(tmp_path / "up", tmp_path / "single" / "checkpoints" / "step-2")
    assert resume_event(tmp_path / "up")["from_world_size"] == 1
    # 1 -> 2 at a sync point: rank 0 takes the single process's next batch with the same weights.
    assert losses(tmp_path / "up")[3] == losses(tmp_path / "single")[3]
    assert losses(tmp_path / "up")[4] < losses(tmp_path / "single")[1]


@pytest.mark.slow
def test_aedit_checkpoints_at_sync_points_and_resumes(tmp_path):
    """A-EDiT (wall-time syncs, unequal steps per rank) saves after the sync at which all ranks'
    steps pass a multiple of checkpoint_every x ranks; resuming continues from that anchor and
    outer momentum and finishes. (Bitwise equality is impossible: the syncs follow wall time.)"""
    config = write_config(tmp_path, extra="checkpoint_every = 2\n")
    # A sync at every step: the totals 4, 8, ... (the checkpoints) are passed before the end (20).
    common = ["--dist", "aedit", "--sync-seconds", SYNC_EVERY_STEP, "--outer-momentum", "0.8"]
    summary = finish(launch("--config", str(config), "--steps", "10", "--out", str(tmp_path / "full"), *common))
    checkpoints = sorted((tmp_path / "full" / "checkpoints").glob("step-*"), key=lambda p: int(p.name[5:]))
    periodic = [c for c in checkpoints if c.name != f"step-{summary['steps']}"]
    assert periodic, [c.name for c in checkpoints]
    first = periodic[0]
    states = rank_states(first)
    assert states[0]["params_sha256"] == states[1]["params_sha256"]  # every rank at the anchor
    saved_global = states[0]["optimizer"]["global_inner_steps"]
    assert saved_global >= 4 and states[1]["optimizer"]["global_inner_steps"] == saved_global
    assert states[0]["optimizer"]["steps_since_sync"] == states[1]["optimizer"]["steps_since_sync"] == 0

    assert states[0]["optimizer"]["weighting"]["trackers"]  # the norm penalty's per-worker statistics

    resumed = launch("--resume", str(first), "--out", str(tmp_path / "resumed"))
    # Meanwhile, 2 -> 1 in this process: it alone must now bring the agreed total to 10 x 1 steps.
    one = in_process("--resume", str(first), "--out", str(tmp_path / "one"))
    assert_carried_over(tmp_path / "one", first)
    final = torch.load(Path(one["checkpoint"]) / "trainer_state" / "state.pt", weights_only=False)
    assert final["world_size"] == 1 and final["optimizer"]["global_inner_steps"] >= 10
    assert len(final["optimizer"]["weighting"]["trackers"]) == 1  # remapped to one worker
    finish(resumed)
    assert_carried_over(tmp_path / "resumed", first)
    syncs = [r for r in rows(tmp_path / "resumed") if r.get("event") == "sync"]
    assert syncs and syncs[0]["global_inner_steps"] > saved_global and syncs[-1]["global_inner_steps"] >= 20
    assert all(math.isfinite(r["loss"]) for r in rows(tmp_path / "resumed") if "loss" in r)


@pytest.mark.slow
def test_resume_under_another_dist_ddp_to_edit_and_back(tmp_path):
    """`--dist ddp` (one process) -> `edit` on 2 ranks -> `ddp` on 2 ranks from a mid-interval EDiT
    checkpoint. Each leg continues from the saved weights and batch (its first loss equals the
    previous run's at that step), holds the saved inner optimizer state (fingerprinted in the
    `resume` event); entering EDiT anchors at the resumed weights with zero momentum and counters;
    leaving it, both DDP ranks take rank 0's weights and optimizer state (they stay identical)."""
    config = write_config(tmp_path, extra="checkpoint_every = 2\n")
    in_process("--config", str(config), "--dist", "ddp", "--steps", "3", "--out", str(tmp_path / "ddp"))
    ddp_checkpoint = tmp_path / "ddp" / "checkpoints" / "step-2"
    # EDiT from step 2, syncing every 3 steps: its step-4 checkpoint is mid-interval, its one sync at step 5.
    finish(launch("--resume", str(ddp_checkpoint), "--out", str(tmp_path / "edit"), "--dist", "edit",
                  "--sync-every", "3", "--steps", "5"))
    edit_checkpoint = tmp_path / "edit" / "checkpoints" / "step-4"
    finish(launch("--resume", str(edit_checkpoint), "--out", str(tmp_path / "back"), "--dist", "ddp"))

    saved = torch.load(ddp_checkpoint / "trainer_state" / "state.pt", weights_only=False)["optimizer"]
    assert len(saved["state"]) == len(list(from_pretrained(ddp_checkpoint).parameters()))  # AdamW moments, all
    event = resume_event(tmp_path / "edit")
    assert [event[k] for k in ("from_dist", "dist", "from_world_size", "world_size")] == ["ddp", "edit", 1, 2]
    assert event["optimizer_sha256"] == optimizer_sha256(saved)
    resumed = [p.float() for p in from_pretrained(ddp_checkpoint).parameters()]
    assert event["anchor_sha256"] == tensors_sha256(resumed) and event["outer_momentum_sha256"] == tensors_sha256([])
    edit = losses(tmp_path / "edit")
    assert sorted(edit) == [3, 4, 5] and edit[3] == losses(tmp_path / "ddp")[3]  # same weights, same batch
    syncs = [r for r in rows(tmp_path / "edit") if r.get("event") == "sync"]
    assert [(r["step"], r["index"], r["global_inner_steps"]) for r in syncs] == [(5, 1, 2 * 2 + 3 * 2)]

    states = rank_states(edit_checkpoint)
    assert states[0]["params_sha256"] != states[1]["params_sha256"]  # mid-interval: the ranks' weights differ
    event = resume_event(tmp_path / "back")
    assert [event[k] for k in ("from_dist", "dist")] == ["edit", "ddp"]
    assert event["optimizer_sha256"] == optimizer_sha256(states[0]["optimizer"]["inner_optimizer"])
    back = losses(tmp_path / "back")
    assert back == {5: edit[5]} and math.isfinite(back[5])  # rank 0's weights and batch: rank 0's loss
    final = rank_states(tmp_path / "back" / "checkpoints" / "step-5")
    assert final[0]["params_sha256"] == final[1]["params_sha256"]


def test_plain_checkpoint_cannot_resume_under_expert_parallel(tmp_path, capsys):
    """The one remaining refusal: a per-rank (by position) optimizer state cannot be cut into
    expert-parallel shards. Exit 2, one line, before anything is written. Into `--dist fsdp`
    without expert parallel it maps (by parameter name): the resumed process holds it as saved."""
    config = write_config(tmp_path, extra="checkpoint_every = 0\n")
    in_process("--config", str(config), "--steps", "1", "--out", str(tmp_path / "plain"), "--dist", "ddp")
    capsys.readouterr()
    for flags in (["--expert-parallel", "1"], ["--dist", "fsdp", "--expert-parallel", "1"]):
        assert main(["--resume", str(tmp_path / "plain"), "--out", str(tmp_path / "ep"), *flags, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert "written without --expert-parallel (--dist ddp" in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "ep").exists()
    in_process("--resume", str(tmp_path / "plain"), "--out", str(tmp_path / "fsdp"), "--dist", "fsdp", "--steps", "2")
    saved = torch.load(tmp_path / "plain" / "checkpoints" / "step-1" / "trainer_state" / "state.pt",
                       weights_only=False)["optimizer"]
    event = resume_event(tmp_path / "fsdp")
    assert [event[k] for k in ("from_dist", "dist")] == ["ddp", "fsdp"] and saved["state"]
    assert event["optimizer_sha256"] == optimizer_sha256(saved)
