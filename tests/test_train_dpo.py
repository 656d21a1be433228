"""ling-train dpo: the DPO loss against hand-computed and per-sample references, and the run end to end."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ling_core import LingConfig, build_model, from_pretrained
from ling_data.kg.cli import main as kg_main
from ling_data.sft import IGNORE_INDEX
from ling_train.cli import main
from ling_train.dpo import DPOObjective, dpo_loss, segment_logps


def test_dpo_loss_against_a_hand_computed_case():
    # policy log p: chosen -1, rejected -2; reference: -1.5 both. Rewards beta * (policy - ref):
    # chosen 0.1 * 0.5 = 0.05, rejected 0.1 * -0.5 = -0.05; margin 0.1;
    # loss = -log sigmoid(0.1) = log(1 + e^-0.1) = 0.6443966600735709
    t = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    loss, metrics = dpo_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=0.1)
    assert loss.item() == pytest.approx(0.6443966600735709, abs=1e-15)
    assert metrics["chosen_reward"].item() == pytest.approx(0.05, abs=1e-15)
    assert metrics["rejected_reward"].item() == pytest.approx(-0.05, abs=1e-15)
    assert metrics["reward_margin"].item() == pytest.approx(0.1, abs=1e-15)
    assert metrics["reward_accuracy"].item() == 1.0
    # the loss falls as the margin grows, and its gradient pushes chosen up and rejected down
    chosen, rejected = t(-1.0).requires_grad_(), t(-2.0).requires_grad_()
    dpo_loss(chosen, rejected, t(-1.5), t(-1.5), beta=0.1)[0].backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()
    assert chosen.grad.item() == pytest.approx(-0.1 * (1 - 1 / (1 + math.exp(-0.1))), abs=1e-15)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(0, 3), st.integers(0, 2**31 - 1))
def test_segment_logps_against_a_per_token_sum(chosen_len, rejected_len, padding, seed):
    generator = torch.Generator().manual_seed(seed)
    seq, vocab = chosen_len + rejected_len + padding, 11
    logits = torch.randn(2, seq, vocab, generator=generator)
    labels = torch.randint(0, vocab, (2, seq), generator=generator)
    labels[torch.rand(2, seq, generator=generator) < 0.3] = IGNORE_INDEX
    segment_ids = torch.tensor([1] * chosen_len + [2] * rejected_len + [0] * padding).repeat(2, 1)
    chosen, rejected = segment_logps(logits, labels, segment_ids)
    for row in range(2):
        expected = {1: 0.0, 2: 0.0}
        for t in range(seq):
            if labels[row, t] != IGNORE_INDEX and int(segment_ids[row, t]) in expected:
                expected[int(segment_ids[row, t])] += F.log_softmax(logits[row, t].double(), -1)[labels[row, t]].item()
        # fp32 log-softmax over 11 logits, summed over <= 6 tokens: ~1e-6 absolute
        assert chosen[row].item() == pytest.approx(expected[1], abs=1e-5)
        assert rejected[row].item() == pytest.approx(expected[2], abs=1e-5)


SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, head_dim=16, num_experts=4, moe_intermediate_size=16, num_experts_per_tok=2)


def test_the_objective_starts_at_log_2_and_trains_only_the_policy():
    torch.manual_seed(0)
    policy = build_model(LingConfig(**SMALL), seed=0)
    reference = copy.deepcopy(policy)
    objective = DPOObjective(policy, reference, beta=0.1, balance_weight=0.0, z_loss_weight=0.0)
    assert set(objective.state_dict()) == {f"policy.{k}" for k in policy.state_dict()}  # no reference inside
    ids = torch.randint(0, 64, (2, 12))
    labels = torch.randint(0, 64, (2, 12))
    labels[:, :3] = IGNORE_INDEX
    segments = torch.tensor([[1] * 6 + [2] * 6, [1] * 5 + [2] * 5 + [0] * 2])
    objective.train()
    assert not reference.training
    out = objective(ids, labels, segments)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)  # policy == reference: margin 0
    assert out.metrics["reward_margin"].item() == 0.0
    out.loss.backward()
    assert all(p.grad is None for p in reference.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 4-step pretraining run of a small model and a small `ling-data kg` set."""
    root = tmp_path_factory.mktemp("dpo")
    toml = root / "small.toml"
    toml.write_text('steps = 4\nseq_len = 32\nbatch_size = 4\nwarmup_steps = 2\ncheckpoint_every = 4\n\n[model]\n'
                    'vocab_size = 512\nhidden_size = 64\nintermediate_size = 128\nnum_hidden_layers = 2\n'
                    'num_attention_heads = 2\nnum_key_value_heads = 1\nhead_dim = 32\nnum_experts = 4\n'
                    'moe_intermediate_size = 32\n')
    assert main(["--config", str(toml), "--out", str(root / "pre"), "--no-progress"]) == 0
    assert kg_main(["--out", str(root / "kg"), "--samples-per-pattern", "1", "--tool-list", "signatures",
                    "--formats", "json"]) == 0
    return root / "pre", root / "kg"


def dpo_args(pretrained, out, *extra):
    pre, data = pretrained
    return ["dpo", "--init", str(pre), "--data", str(data), "--seq-len", "3072", "--batch-size", "2",
            "--out", str(out), "--no-progress", *extra]


def step_rows(run_dir):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "event" not in r]


def test_dpo_run_logs_the_margins_and_resumes_bit_identically(pretrained, tmp_path, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(dpo_args(pretrained, full, "--steps", "4", "--lr", "3e-3", "--dpo-beta", "0.5")) == 0
    summary = json.loads(capsys.readouterr().out)
    steps = step_rows(full)
    assert len(steps) == 4
    for row in steps:
        assert {"dpo_loss", "chosen_reward", "rejected_reward", "reward_margin", "reward_accuracy"} <= row.keys()
        assert row["beta"] == 0.5
    assert steps[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)  # step 1: the policy is the reference
    assert steps[0]["reward_margin"] == 0.0 and steps[-1]["reward_margin"] != 0.0
    counts = summary["dpo"]
    assert counts["pairs"] > 0 and set(counts["kinds"]) <= {"wrong_tool", "wrong_argument", "missing_hop", "wrong_answer"}
    assert 'task = "dpo"' in (full / "config.toml").read_text()
    init = from_pretrained(pretrained[0] / "checkpoints" / "step-4").state_dict()
    tuned = from_pretrained(full / "checkpoints" / "step-4").state_dict()
    assert init.keys() == tuned.keys() and any(not torch.equal(init[k], tuned[k]) for k in init)

    assert main(dpo_args(pretrained, part, "--steps", "2", "--lr", "3e-3", "--dpo-beta", "0.5")) == 0
    assert main(["--resume", str(part), "--steps", "4", "--no-progress"]) == 0
    a = {r["step"]: (r["loss"], r["reward_margin"]) for r in step_rows(full)}
    b = {r["step"]: (r["loss"], r["reward_margin"]) for r in step_rows(part)}
    assert [a[s] for s in (3, 4)] == [b[s] for s in (3, 4)]  # exact: the reference reloads from --init


def test_dpo_bad_input_is_one_line(pretrained, tmp_path):
    pre, data = pretrained
    def run(*args):
        return subprocess.run([sys.executable, "-m", "ling_train", *args], capture_output=True, text=True)
    for result, fragment in ((run("dpo", "--init", str(pre), "--data", str(data), "--dpo-beta", "0"), "dpo_beta"),
                             (run("dpo", "--init", str(pre), "--data", str(pre / "metrics.jsonl"),
                                  "--out", str(tmp_path / "a")), "missing id")):
        assert result.returncode == 2, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.startswith("ling-train: error:")]
        assert len(lines) == 1 and "Traceback" not in result.stderr and fragment in lines[0], result.stderr
