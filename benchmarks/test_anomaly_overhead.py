"""Overhead of anomaly detection on a tiny-preset CPU training step (goal: <= 2%).

Subject: a block of 10 loop iterations (pre_step, `Trainer.train_step`, post_step) with an `AnomalyMonitor` running every detector (loss spike,
gradient-norm spike, NaN/Inf, expert-load collapse and dead experts, router entropy measured on
every step: `router_every = 1`, the worst case; the default is every 10 steps), the weight
check once per block (every 10 steps), no snapshots (rollback's memory copy is a response, measured below).
Anchor: the same step without the monitor, on an identical model, measured in the same rounds
(the anchor runs once before every subject round, so load bursts hit both alike).
Also recorded: the same with an in-memory snapshot per block (rollback enabled).
Batch 16 x 128 random tokens, fp32, as benchmarks/test_train_throughput.py.
"""

from __future__ import annotations

import pytest
import torch

from ling_core import build_model, preset
from ling_core.moe import Router
from ling_train.anomaly import AnomalyLoader, AnomalyMonitor, anomaly_config
from ling_train.trainer import Trainer, TrainerSettings

BATCH, SEQ_LEN = 16, 128


class RandomTokens:
    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.generator = torch.Generator().manual_seed(0)

    def next_batch(self):
        ids = torch.randint(self.vocab_size, (BATCH, SEQ_LEN + 1), generator=self.generator)
        return ids[:, :-1], ids[:, 1:]

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def make_trainer(anomaly: dict | None) -> Trainer:
    config = preset("tiny")
    model = build_model(config, device="cpu", seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loader = RandomTokens(config.vocab_size)
    callbacks = []
    if anomaly is not None:
        loader = AnomalyLoader(loader)
        monitor = AnomalyMonitor(anomaly_config(anomaly, "benchmark"), loader, lambda row: None, Router)
        callbacks.append(monitor)
    trainer = Trainer(model, optimizer, scheduler, loader, TrainerSettings(total_steps=10**9),
                      torch.device("cpu"), callbacks)
    for cb in callbacks:
        cb.on_train_start(trainer)
    return trainer


def step(trainer: Trainer) -> None:
    """One loop iteration as `Trainer.fit` runs it: pre_step, train_step, post_step."""
    for cb in trainer.callbacks:
        cb.pre_step(trainer, trainer.step + 1)
    metrics = trainer.train_step()
    if not metrics.get("skipped"):
        trainer.step += 1
        for cb in trainer.callbacks:
            cb.post_step(trainer, trainer.step, metrics)


BLOCK = 10  # steps per timed round: one weight check (and snapshot) per block, as in a run

ALL_DETECTORS = {"router_every": 1, "expert_max_load": 6.0, "snapshot_every": 0, "param_check_every": BLOCK,
                 "min_history": 5, "on_loss_spike": "log", "on_grad_spike": "log", "on_nonfinite": "log",
                 "on_expert_collapse": "log", "on_router_collapse": "log"}


def block(trainer: Trainer) -> None:
    for _ in range(BLOCK):
        step(trainer)


@pytest.mark.parametrize("snapshots", [False, True], ids=["detectors", "detectors+snapshots"])
def test_anomaly_detection_overhead(benchmark, best_time, best_seconds, snapshots):
    torch.manual_seed(0)
    anchor = make_trainer(None)
    subject = make_trainer({**ALL_DETECTORS, "snapshot_every": BLOCK} if snapshots else ALL_DETECTORS)
    anchor_time = best_time()
    benchmark.pedantic(block, args=(subject,), setup=lambda: anchor_time.time(lambda: block(anchor)),
                       rounds=5, warmup_rounds=1)
    monitor = subject.callbacks[0]
    assert monitor.interventions == 0
    seconds = best_seconds()
    if seconds is None:
        return
    benchmark.extra_info.update({
        "anchor": "the same train steps without AnomalyMonitor, interleaved round by round",
        "steps_per_round": BLOCK,
        "anchor_best_s_per_step": round(anchor_time.seconds / BLOCK, 5),
        "subject_best_s_per_step": round(seconds / BLOCK, 5),
        "overhead_ratio": round(seconds / anchor_time.seconds, 4),
        "events_logged": sum(monitor.counts.values()),
        "threads": torch.get_num_threads(),
    })
