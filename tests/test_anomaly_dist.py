"""Anomaly handling with several Local SGD workers: per-rank detectors, EDiT's outlier exclusion
reported as anomaly events, agreed stops, and the refusals where a rank-local response would
desynchronise the ranks."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ling_core import from_pretrained
from ling_core.moe import Router
from ling_dist import EDiT
from ling_train.anomaly import AnomalyLoader, AnomalyMonitor, anomaly_config
from ling_train.anomaly.local_sgd import LocalSGDAnomalies
from ling_train.cli import main
from ling_train.distributed import LocalSGDOptimizer
from ling_train.trainer import Callback, Trainer, TrainerSettings

# importlib mode does not make test modules importable: reuse the single-process tests' loader and
# model, and the multi-process tests' config and launch helpers
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_anomaly import TokenLoader, tiny_model  # noqa: E402
from test_train_dist import finish, write_config  # noqa: E402

WORKER = Path(__file__).with_name("anomaly_dist_worker.py")

SGD = 'optimizer = "sgd"\ngrad_clip = 0.0\nweight_decay = 0.0\ncheckpoint_every = 0\nsteps = 14\n'
ANOMALY = '\n[anomaly]\nmin_history = 4\non_grad_spike = "log"\non_nonfinite = "skip"\n'


def launch(tmp_path: Path, name: str, faults: dict, anomaly: bool) -> subprocess.Popen:
    """`ling-train --nproc 3 --dist edit --sync-every 1` under torchrun, with `faults` injected by
    tests/anomaly_dist_worker.py (ling-train's own CLI otherwise), with or without `[anomaly]`."""
    config = write_config(tmp_path, f"{name}.toml", lr=0.05, extra=SGD)  # test_train_dist's tiny model
    config.write_text(config.read_text() + (ANOMALY if anomaly else ""))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ANOMALY_TEST_FAULTS": json.dumps(faults)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3", str(WORKER),
               "--config", str(config), "--dist", "edit", "--sync-every", "1", "--out", str(tmp_path / name),
               "--no-progress"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def events(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("event") not in (None, "sync", "step_time", "straggler", "checkpoint")]


@pytest.mark.dist
@pytest.mark.slow
def test_poisoned_workers_are_caught_and_the_weights_equal_the_clean_reference(tmp_path):
    """3 EDiT workers, plain SGD (no inner optimizer state), sync every step. Two faults:
    rank 1's update at step 12 is scaled x1000 (the per-step detector only logs a grad spike,
    configured `log`, so the update goes through) and EDiT's penalty must drop it at sync 12 by its
    z-score; rank 2 is served an extra batch at draw 6 whose gradient is NaN, which its own monitor
    must skip. The reference is the clean run (no extra batch on rank 2) in which rank 1's
    pseudo-gradient is given weight 0 at sync 12 (its tracker untouched, as for an outlier): dropping
    a worker is exactly that, and after the sync every worker restarts from the anchor with no
    trace of the fault (SGD keeps no state), so the final weights must be bitwise equal. The
    reference runs without `[anomaly]`: its exclusion row names rank 1's batch from the loader's
    own position (no AnomalyLoader), which must agree with the poisoned run's."""
    poisoned = launch(tmp_path, "poisoned", {"scale": {"rank": 1, "forward": 12, "factor": 1000},
                                             "nan_batch": {"rank": 2, "draw": 6}}, anomaly=True)
    reference = launch(tmp_path, "reference", {"force_exclude": {"rank": 1, "sync": 12}}, anomaly=False)
    poisoned_summary, reference_summary = finish(poisoned), finish(reference)
    assert poisoned_summary["steps"] == reference_summary["steps"] == 14

    found = events(tmp_path / "poisoned")
    outliers = [e for e in found if e.get("detector") == "pseudo_gradient_outlier"]
    assert len(outliers) == 1, outliers
    outlier = outliers[0]
    assert (outlier["event"], outlier["rank"], outlier["step"], outlier["sync"]) == ("anomaly", 1, 12, 12)
    assert outlier["statistic"]["z"] > outlier["statistic"]["z_threshold"] == 3.0
    assert outlier["response"] == "excluded"
    [batch] = outlier["batches"]  # sync every step: the one batch rank 1 trained on since sync 11
    assert (batch["batch"], batch["epoch"], batch["position"]) == (11, 0, 11)
    assert len(batch["documents"]) == 4 and all(0 <= first <= last for first, last in batch["documents"])
    nonfinite = [e for e in found if e["event"] == "nonfinite"]
    assert len(nonfinite) == 1 and nonfinite[0]["rank"] == 2 and nonfinite[0]["step"] == 7
    assert nonfinite[0]["batch"] == 6 and nonfinite[0]["response"] == "skip"
    assert nonfinite[0]["statistic"] == {"grad_norm": "nan"}
    assert any(e["event"] == "grad_spike" and e["rank"] == 1 and e["step"] == 12 for e in found)
    [forced] = [e for e in events(tmp_path / "reference") if e.get("detector") == "pseudo_gradient_outlier"]
    assert (forced["rank"], forced["step"], forced["statistic"]["z"] < 3.0) == (1, 12, True)  # a forced exclusion
    assert forced["batches"] == [{k: v for k, v in batch.items() if k != "batch"}]  # same epoch, position, documents

    a = from_pretrained(tmp_path / "poisoned" / "checkpoints" / "step-14").state_dict()
    b = from_pretrained(tmp_path / "reference" / "checkpoints" / "step-14").state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)


def local_edit_run(steps: int, inserted: dict, anomaly: dict, sync_every: int = 4, extra=()):
    """One process, EDiT over no process group, with the monitor in several-worker mode (as on
    every rank of `--nproc N --dist edit`): returns (trainer, rows written, monitor)."""
    torch.manual_seed(0)
    model = tiny_model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(inner, lambda s: 1.0)
    lsgd = EDiT(model, inner, sync_every=sync_every, units=list(model.model.layers))
    loader = AnomalyLoader(TokenLoader(inserted), seed=0)
    rows: list[dict] = []
    config = anomaly_config({"min_history": 6, "window": 20, "router_entropy_min": 0.0, **anomaly}, "test")
    monitor = AnomalyMonitor(config, loader, rows.append, Router, workers=2)
    exchange = LocalSGDAnomalies(0, 1, lsgd, rows.append, monitor=monitor)
    monitor.emit = exchange.buffer  # what world_size > 1 does: rows go out at sync points
    trainer = Trainer(model, LocalSGDOptimizer(lsgd, tokens_per_step=64), scheduler, loader,
                      TrainerSettings(total_steps=steps), torch.device("cpu"), [*extra, monitor, exchange])
    trainer.fit()
    return trainer, rows, monitor


def test_exhausted_budget_stops_at_the_next_sync_point_not_at_once():
    """Two batches of one repeated token (every token routed to the same experts: max/mean load
    4.0 > 3.5) at steps 9 and 10 exhaust a budget of 1 at step 10; instead of restoring a
    rank-local snapshot, the rank keeps stepping to the sync at step 12 and every rank stops there."""
    trainer, rows, monitor = local_edit_run(16, {i: "constant" for i in (8, 10)},
                                            {"expert_max_load": 3.5, "on_expert_collapse": "skip",
                                             "max_interventions": 1})
    spikes = [r for r in rows if r["event"] == "expert_collapse"]
    assert [r["step"] for r in spikes] == [9, 10] and all(r["rank"] == 0 for r in spikes)
    [stop] = [r for r in rows if r["event"] == "anomaly_abort"]
    assert stop["step"] == 10 and stop["restored_step"] is None and stop["at"] == "next sync point"
    assert trainer.step == 12 and monitor.aborted == "rank 0: 2 interventions exceed max_interventions=1"
    assert monitor.snapshot is None  # no snapshots with several workers


def test_nonfinite_weights_stop_at_the_sync_instead_of_rolling_back():
    class BreakWeights(Callback):
        def post_step(self, trainer, step, metrics):
            if step == 5:
                with torch.no_grad():
                    next(trainer.model.parameters()).fill_(float("nan"))

    trainer, rows, monitor = local_edit_run(12, {}, {"param_check_every": 1}, extra=[BreakWeights()])
    kinds = [r["event"] for r in rows]
    assert "rollback" not in kinds and kinds.count("anomaly_abort") == 1
    [bad] = [r for r in rows if r["event"] == "nonfinite"]
    assert (bad["step"], bad["statistic"], bad["response"]) == (5, {"weights": "non-finite"}, "stop_at_sync")
    # The NaN pseudo-gradient is dropped at the step-8 sync (here the only worker: no outer step),
    # every worker restarts from the anchor, and all stop there.
    outliers = [r for r in rows if r.get("detector") == "pseudo_gradient_outlier"]
    assert [(r["step"], r["rank"], r["statistic"]["z"]) for r in outliers] == [(8, 0, "inf")]
    trainer.optimizer.local_sgd.finish_sync()  # layer-wise: as ling-train's final checkpoint does
    assert trainer.step == 8 and all(torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.mark.parametrize("dist, table, message", [
    ("ddp", "", "[anomaly] with --dist ddp on 2 processes: every rank must take every update together"),
    ("fsdp", "", "[anomaly] with --dist fsdp on 2 processes"),
    ("diloco", "", "DiLoCo averages every worker's pseudo-gradient"),
    ("edit", "on_loss_spike = 'rollback'\n", "on_loss_spike = 'rollback' with 2 processes"),
    ("aedit", "on_nonfinite = 'abort'\n", "on_nonfinite = 'abort' with 2 processes"),
])
def test_desynchronising_setups_are_refused_with_one_line(dist, table, message, tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(f"[anomaly]\n{table}")
    assert main(["--config", str(config), "--nproc", "2", "--dist", dist, "--out", str(tmp_path / "run"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_an_edit_checkpoint_written_under_anomaly_resumes_on_one_process(tmp_path):
    """The loader state saved under `[anomaly]` is the re-injecting wrapper's; at another world
    size its inner position is remapped (the per-rank skip set is not carried over)."""
    from train_dist_testing import launch as launch_two_ranks
    config = write_config(tmp_path, extra="checkpoint_every = 2\nsteps = 4\n")
    config.write_text(config.read_text() + ANOMALY)
    run = tmp_path / "run"
    finish(launch_two_ranks("--config", str(config), "--dist", "edit", "--sync-every", "2", "--out", str(run)))
    assert main(["--config", str(config), "--dist", "edit", "--sync-every", "2", "--out", str(run), "--no-progress",
                 "--resume", str(run / "checkpoints" / "step-2"), "--steps", "6"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    resume = next(r for r in rows if r.get("event") == "resume")
    assert (resume["step"], resume["from_world_size"], resume["world_size"]) == (2, 2, 1)
    final = torch.load(run / "checkpoints" / "step-6" / "trainer_state" / "state.pt", weights_only=False)
    # 2 ranks x 2 steps of 4 windows = 16 windows = 4 one-rank batches consumed, then 4 more steps
    assert final["loader"]["inner"]["position"] == 8 and final["world_size"] == 1
    assert all(math.isfinite(r["loss"]) for r in rows if "lm_loss" in r and "event" not in r)
