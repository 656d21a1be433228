"""Anomaly handling end to end on a tiny model: a fault injected into a run is caught, and the final
weights equal those of a clean run that never saw the bad input."""

from __future__ import annotations

import json

import pytest
import torch

from ling_core import build_model, preset
from ling_core.moe import Router
from ling_train.anomaly import AnomalyLoader, AnomalyMonitor, RobustWindow, anomaly_config
from ling_train.anomaly.detectors import ExpertCollapse
from ling_train.cli import main
from ling_train.trainer import Callback, Trainer, TrainerSettings

BATCH, SEQ = 4, 16
VOCAB = 512
STEPS = 14  # detectors check from step 7 (min_history 6); faults go in at batch 8-10
CLEAN_VOCAB = 128  # clean data uses only these tokens; corrupt batches use the others


class TokenLoader:
    """Seeded batches of counting sequences over CLEAN_VOCAB (quick to learn, so a corrupt batch
    stands out within a few steps); `inserted` maps a draw number to a corrupt
    batch returned *in addition to* the clean stream (so skipping it recovers the clean run)."""

    def __init__(self, inserted: dict[int, str] | None = None, seed: int = 0):
        self.inserted = inserted or {}
        self.seed = seed
        self.draws = 0
        self.clean_drawn = 0

    def next_batch(self):
        kind = self.inserted.get(self.draws)
        self.draws += 1
        if kind == "unseen_tokens":  # tokens the model has learnt never occur: a loss spike
            ids = torch.randint(CLEAN_VOCAB, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(99 + self.draws))
        elif kind == "constant":  # one token repeated: every token routes to the same experts
            ids = torch.full((BATCH, SEQ + 1), 7)
        else:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.clean_drawn)
            self.clean_drawn += 1
            starts = torch.randint(CLEAN_VOCAB, (BATCH, 1), generator=generator)
            ids = (starts + torch.arange(SEQ + 1)) % CLEAN_VOCAB  # learnable: each token's successor
        return ids[:, :-1], ids[:, 1:]

    def state_dict(self):
        return {"draws": self.draws, "clean_drawn": self.clean_drawn}

    def load_state_dict(self, state):
        self.draws, self.clean_drawn = state["draws"], state["clean_drawn"]


def tiny_model():
    config = preset("tiny").replace(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_experts=8,
                                    moe_intermediate_size=32, routing_warmup_steps=0,
                                    balance_loss_weight=0.5)
    return build_model(config, device="cpu", seed=0)


def run(steps, inserted=None, anomaly=None, skip_batches=(), extra_callbacks=()):
    """Train `steps` optimizer steps; returns (model, events, monitor or None, trainer)."""
    torch.manual_seed(0)
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / 3, 1.0))
    loader = AnomalyLoader(TokenLoader(inserted), seed=0)
    loader.skip(skip_batches)
    events: list[dict] = []
    callbacks = list(extra_callbacks)
    monitor = None
    if anomaly is not None:
        table = {"min_history": 6, "window": 20, "router_every": 1, **anomaly}
        monitor = AnomalyMonitor(anomaly_config(table, "test"), loader, events.append, Router)
        callbacks.insert(0, monitor)
    trainer = Trainer(model, optimizer, scheduler, loader, TrainerSettings(total_steps=steps), torch.device("cpu"),
                      callbacks)
    trainer.fit()
    return model, events, monitor, trainer


def assert_same_weights(a, b, atol=0.0):
    sa, sb = a.state_dict(), b.state_dict()
    for key in sa:
        assert torch.allclose(sa[key], sb[key], rtol=0, atol=atol), key


@pytest.fixture(scope="module")
def clean_run():
    """STEPS clean steps with every detector on: nothing fires, and the weights equal a run without them."""
    return run(STEPS, anomaly={}), run(STEPS)


def test_clean_run_has_no_false_positives_and_no_effect(clean_run):
    (watched, events, monitor, _), (plain, *_rest) = clean_run
    assert events == [] and monitor.interventions == 0
    assert_same_weights(watched, plain)  # exact: the monitor changed nothing


def test_corrupt_batch_spike_is_skipped_and_weights_equal_the_clean_run(clean_run):
    model, events, monitor, _ = run(STEPS, inserted={9: "unseen_tokens"}, anomaly={"on_loss_spike": "skip"})
    spikes = [e for e in events if e["event"] == "loss_spike"]
    assert len(spikes) == 1 and spikes[0]["batch"] == 9 and spikes[0]["step"] == 10
    assert spikes[0]["statistic"]["z"] > 6 and spikes[0]["response"] == "skip"
    assert_same_weights(model, clean_run[1][0])  # exact


def test_nan_gradient_is_skipped_and_weights_equal_a_run_without_that_batch():
    poisoned_backward = 9

    class PoisonGradient(Callback):
        """NaN into one expert's gradient on the 9th backward, through a tensor hook."""
        def on_train_start(self, trainer):
            self.calls = 0
            param = trainer.model.get_parameter(next(n for n, _ in trainer.model.named_parameters() if "experts.0" in n))
            param.register_hook(self.hook)

        def hook(self, grad):
            self.calls += 1
            return grad * float("nan") if self.calls == poisoned_backward else grad

    poisoned, events, _, _ = run(12, anomaly={}, extra_callbacks=[PoisonGradient()])
    clean, *_ = run(12, skip_batches={poisoned_backward - 1})
    bad = [e for e in events if e["event"] == "nonfinite"]
    assert len(bad) == 1 and bad[0]["statistic"] == {"grad_norm": "nan"} and bad[0]["batch"] == poisoned_backward - 1
    assert_same_weights(poisoned, clean)


def test_loss_spike_rollback_replays_without_the_bad_batch(clean_run):
    model, events, monitor, trainer = run(STEPS, inserted={10: "unseen_tokens"},
                                          anomaly={"on_loss_spike": "rollback", "snapshot_every": 4})
    rollbacks = [e for e in events if e["event"] == "rollback"]
    assert rollbacks == [{"event": "rollback", "step": 11, "to_step": 8, "skipped_batches": [10]}]
    assert trainer.step == STEPS
    assert_same_weights(model, clean_run[1][0], atol=1e-6)


def test_rollback_waits_for_the_flash_snapshot_still_copying_the_weights(tmp_path):
    """An overlapped flash snapshot taken at step 10 is still being copied when step 11's loss
    spike rolls the weights back in place; the rollback must wait for the copy
    (`before_state_rewrite`), else the snapshot is discarded (a CheckpointError at the end), and
    it drops that snapshot, of a step being undone, until the replay writes step 10 again."""
    from ling_dist import FlashCheckpointer
    from ling_train.snapshots import SnapshotCallback

    live: dict = {}

    class KeepStepTen(Callback):
        def on_train_start(self, trainer):
            live["trainer"] = trainer

        def post_step(self, trainer, step, metrics):
            if step == 9 and "weights" in live:  # replaying after the rollback to step 8
                live["undone_snapshot_kept"] = (tmp_path / "step-000000010").exists()
            if step == 10:
                live["weights"] = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    snapshots = SnapshotCallback(FlashCheckpointer(tmp_path, overlap=True), 10,
                                 lambda: {"model": live["trainer"].model.state_dict()}, lambda row: None,
                                 rank=0, barrier=lambda: None)
    _, events, _, trainer = run(STEPS, inserted={10: "unseen_tokens"}, extra_callbacks=[KeepStepTen(), snapshots],
                                anomaly={"on_loss_spike": "rollback", "snapshot_every": 4})
    assert [e["step"] for e in events if e["event"] == "rollback"] == [11] and trainer.step == STEPS
    assert live["undone_snapshot_kept"] is False  # the rollback dropped the snapshot of an undone step
    step, state = FlashCheckpointer(tmp_path).restore()
    assert step == 10 and all(torch.equal(state["model"][k], v) for k, v in live["weights"].items())


def test_expert_forced_dead_is_caught_and_rolled_back(clean_run):
    """Three batches of one repeated token send every token to the same 2 of 8 experts: the
    others get nothing for 3 steps in a row."""
    model, events, monitor, _ = run(STEPS, inserted={8: "constant", 9: "constant", 10: "constant"},
                                    anomaly={"expert_dead_steps": 3, "on_expert_collapse": "rollback",
                                             "snapshot_every": 4, "on_loss_spike": "log", "on_grad_spike": "log",
                                             "router_entropy_min": 0.0})
    dead = [e for e in events if e["event"] == "expert_collapse"]
    assert dead and dead[0]["batches"] == [8, 9, 10]
    assert len(dead[0]["statistic"]["dead_experts"]) >= 4  # of 8; the router moves between the 3 steps
    assert any(e["event"] == "rollback" and e["skipped_batches"] == [8, 9, 10] for e in events)
    assert_same_weights(model, clean_run[1][0], atol=1e-6)


def test_expert_load_collapse_threshold_skips_the_batch(clean_run):
    model, events, _, _ = run(STEPS, inserted={8: "constant"}, anomaly={"expert_max_load": 3.5,
                                                                     "on_expert_collapse": "skip", "on_loss_spike": "skip"})
    collapse = [e for e in events if e["event"] == "expert_collapse"]
    assert len(collapse) == 1 and collapse[0]["statistic"]["max_expert_load"] == pytest.approx(4.0)
    assert_same_weights(model, clean_run[1][0])


def test_persistent_spikes_lower_the_lr_then_the_budget_aborts():
    inserted = {i: "unseen_tokens" for i in (9, 10, 11, 12)}
    model, events, monitor, trainer = run(STEPS, inserted=inserted, anomaly={
        "on_loss_spike": "skip_reinject", "lower_lr_after": 2, "max_interventions": 3, "snapshot_every": 5})
    kinds = [e["event"] for e in events]
    assert kinds.count("loss_spike") == 4 and "lr_lowered" in kinds and kinds[-1] == "anomaly_abort"
    abort = events[-1]
    assert abort["restored_step"] == trainer.step and trainer.step < STEPS
    assert monitor.summary()["aborted"] and torch.isfinite(torch.cat([p.flatten() for p in model.parameters()])).all()


def test_reinjected_rows_come_back_inside_later_batches():
    loader = AnomalyLoader(TokenLoader(), seed=0, rows_per_batch=2)
    first, _ = loader.next_batch()
    loader.reinject_last()
    later = [loader.next_batch()[0] for _ in range(3)]
    assert [b.shape[0] for b in later] == [BATCH + 2, BATCH + 2, BATCH]
    returned = torch.cat(later[:2])
    for row in first:
        assert (returned == row).all(dim=1).any()
    state = loader.state_dict()
    again = AnomalyLoader(TokenLoader(), seed=5)
    again.load_state_dict(state)
    assert torch.equal(again.next_batch()[0], loader.next_batch()[0])


def test_nonfinite_weights_roll_back():
    class BreakWeights(Callback):
        def post_step(self, trainer, step, metrics):
            if step == 6 and not getattr(self, "done", False):
                self.done = True
                with torch.no_grad():
                    next(trainer.model.parameters()).fill_(float("nan"))

    model, events, _, trainer = run(9, anomaly={"snapshot_every": 4, "param_check_every": 0},
                                    extra_callbacks=[BreakWeights()])
    assert any(e["event"] == "nonfinite" and e["statistic"] == {"weights": "non-finite"} for e in events)
    assert any(e["event"] == "rollback" and e["to_step"] == 4 for e in events)
    assert trainer.step == 9 and all(torch.isfinite(p).all() for p in model.parameters())


def test_robust_window_ignores_one_outlier_and_expert_counter_needs_consecutive_steps():
    window = RobustWindow(10)
    for v in [1.0, 1.1, 0.9, 1.0, 50.0, 1.05, 0.95]:
        window.add(v)
    assert window.zscore(1.0)[0] == pytest.approx(0.0, abs=0.5) and window.zscore(3.0)[0] > 10
    detector = ExpertCollapse(max_load=0.0, dead_steps=2)
    idle = torch.tensor([[5, 0, 3]])
    busy = torch.tensor([[5, 1, 3]])
    for tokens, fires in [(idle, False), (busy, False), (idle, False), (idle, True), (idle, False)]:
        found = detector.check({"dead_experts": int((tokens == 0).sum())}, tokens)
        detector.accept()
        assert bool(found) == fires


def test_config_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    for text, fragment in [("[anomaly]\nloss_zz = 3\n", "loss_zz"),
                           ("[anomaly]\non_loss_spike = 'panic'\n", "on_loss_spike"),
                           ("[anomaly]\nwindow = 'big'\n", "expected int"),
                           ("[anomaly]\nsnapshot_every = 0\non_grad_spike = 'rollback'\n", "snapshot_every")]:
        bad.write_text(text)
        assert main(["--config", str(bad), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0] and "[anomaly]" in err[0], err


def test_cli_run_with_anomaly_table_on_the_corpus(tmp_path, small_run_toml, capsys):
    """The real corpus, every detector on and checking from step 6: no false positives; the table
    round-trips through RUN/config.toml and the monitor's state through the checkpoint."""
    config = tmp_path / "anomaly.toml"
    config.write_text(small_run_toml.read_text() + "\n[anomaly]\nmin_history = 5\nrouter_every = 1\n")
    out = tmp_path / "run"
    assert main(["--config", str(config), "--steps", "12", "--out", str(out), "--no-progress",
                 "--snapshot-every", "6"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["anomaly"]["interventions"] == 0 and summary["anomaly"]["counts"] == {}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in rows if r.get("event") not in (None, "checkpoint", "snapshot")]
    snapshot = torch.load(out / "snapshots" / "step-000000012" / "rank-00000.pt", weights_only=False)
    assert len(snapshot["callbacks"]["AnomalyMonitor"]["detectors"]["loss"]) == 12  # a restart resumes the monitor
    assert "[anomaly]" in (out / "config.toml").read_text()
    assert json.loads((out / "anomaly_report.json").read_text())["step"] == 12
    state = torch.load(out / "checkpoints" / "step-12" / "trainer_state" / "state.pt", weights_only=False)
    assert len(state["callbacks"]["AnomalyMonitor"]["detectors"]["loss"]) == 12
