"""Multi-node launch as the README documents it: one torchrun agent per node, joined by the c10d
rendezvous (`torchrun --nnodes 2 --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:PORT -m
ling_train ...`). Here both "nodes" are agents on localhost with one gloo worker each, sharing the
run directory as nodes share a filesystem. The job must equal `ling-train --nproc 2` bitwise, and
survive a SIGKILLed worker: its agent restarts it, the other agent restarts its own (a membership
change), and the ranks agree that the job resumes from the newest snapshot."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ling_dist.runtime import shared_store_restart_warning
from ling_train.snapshots import KILL_AT_STEP_ENV, KILL_RANK_ENV

sys.path.insert(0, str(Path(__file__).resolve().parent))  # importlib mode: make the helpers importable
from train_dist_testing import finish, launch, rows, weights, write_config  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def two_node_job(out: Path, config: Path, env: dict[str, str], *args: str) -> dict:
    """Two torchrun agents (`--nnodes 2`, one worker each) rendezvousing on one port, each with the
    README's TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (with torchrun's shared store a restarted rank could
    read the killed attempt's gloo addresses, or the nodes wait on different keys); the summary of whichever worker
    became rank 0."""
    port = free_port()
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
         "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}",
         "--rdzv-id", out.name, "--max-restarts", "1", "--monitor-interval", "0.2",
         "-m", "ling_train", "--no-progress", "--config", str(config), "--out", str(out), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **env}) for node in (0, 1)]
    try:  # ~30 s on 2 cores; ranks that disagree on resuming wait on each other for ever
        outputs = [agent.communicate(timeout=300) for agent in agents]
    except subprocess.TimeoutExpired:
        for agent in agents:
            agent.kill()
        pytest.fail("the two-node job hung:\n" + "\n".join(agent.communicate()[1][-2000:] for agent in agents))
    for agent, (_, stderr) in zip(agents, outputs):
        assert agent.returncode == 0, stderr[-3000:]
        assert "pytorch#135712" not in stderr
    summaries = [json.loads(stdout[stdout.index("{"):]) for stdout, _ in outputs if "{" in stdout]
    assert len(summaries) == 1, [stdout for stdout, _ in outputs]
    return summaries[0]


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("dist_args", [["--dist", "ddp"], ["--dist", "edit", "--sync-every", "3"]],
                         ids=["ddp", "edit"])
def test_two_torchrun_agents_match_one_node_and_restart_a_sigkilled_worker(tmp_path, dist_args):
    config = write_config(tmp_path, extra="checkpoint_every = 0\n")
    args = ["--steps", "6", "--snapshot-every", "2", *dist_args]
    one_node = launch("--config", str(config), "--out", str(tmp_path / "one-node"), *args)
    summary = two_node_job(tmp_path / "two-nodes", config, {KILL_AT_STEP_ENV: "3", KILL_RANK_ENV: "1"}, *args)
    assert finish(one_node)["steps"] == summary["steps"] == 6 and summary["world_size"] == 2

    run_rows = rows(tmp_path / "two-nodes")
    restarts = [i for i, r in enumerate(run_rows) if r.get("event") == "restart"]
    assert len(restarts) == 1, "expected exactly one restart"
    restart = run_rows[restarts[0]]
    assert restart["attempt"] == 1 and restart["step"] == 2 and restart["from"].endswith("snapshots/step-000000002")
    reference = {r["step"]: r["loss"] for r in rows(tmp_path / "one-node") if "loss" in r}
    before = {r["step"]: r["loss"] for r in run_rows[:restarts[0]] if "loss" in r}
    after = {r["step"]: r["loss"] for r in run_rows[restarts[0]:] if "loss" in r}
    assert sorted(before) == [1, 2, 3] and sorted(after) == [3, 4, 5, 6]
    assert all(before[s] == reference[s] for s in before) and all(after[s] == reference[s] for s in after), \
        (reference, before, after)
    a, b = (weights(tmp_path / name / "checkpoints" / "step-6") for name in ("one-node", "two-nodes"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_restartable_torchrun_sharing_its_store_is_warned_about():
    agent_store = {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_MAX_RESTARTS": "3", "GROUP_WORLD_SIZE": "2"}
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in shared_store_restart_warning(agent_store)
    assert shared_store_restart_warning({**agent_store, "GROUP_WORLD_SIZE": "1"}) is None  # one node: consistent
    assert shared_store_restart_warning({**agent_store, "TORCHELASTIC_USE_AGENT_STORE": "False"}) is None
    assert shared_store_restart_warning({**agent_store, "TORCHELASTIC_MAX_RESTARTS": "0"}) is None
