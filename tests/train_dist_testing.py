"""Helpers shared by the `ling-train --nproc 2` tests (test_train_dist*.py): a tiny run config, the
launcher and readers of a run directory. A plain module on sys.path, since the tests import in
importlib mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from ling_core import from_pretrained

# A-EDiT's --sync-seconds for tests that need a sync point at every step: a tiny step takes ~5 ms
# idle (nine fitted in one 50 ms interval, so a run synced only at its first and last step) and
# 500 ms loaded, so 1 ms makes every step end at a sync, at any machine speed.
SYNC_EVERY_STEP = "0.001"

TINY = """seq_len = 32
batch_size = 4
warmup_steps = 2
lr = {lr}
{extra}
[model]
vocab_size = 512
hidden_size = 64
intermediate_size = 128
num_hidden_layers = 2
num_attention_heads = 2
num_key_value_heads = 1
head_dim = 32
num_experts = 4
moe_intermediate_size = 32
"""


def write_config(tmp_path: Path, name: str = "tiny.toml", lr: float = 0.003, extra: str = "") -> Path:
    path = tmp_path / name
    path.write_text(TINY.format(lr=lr, extra=extra))
    return path


def launch(*args: str) -> subprocess.Popen:
    """`ling-train --nproc 2 ...` as a user would type it (`python -m ling_train`, as the console script)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "ling_train", "--nproc", "2", "--no-progress", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(process: subprocess.Popen, timeout: float = 600) -> dict:
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr[-3000:]
    return json.loads(stdout[stdout.index("{"):])


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def rank_states(checkpoint: Path) -> list[dict]:
    state_dir = checkpoint / "trainer_state"
    return [torch.load(state_dir / name, weights_only=False) for name in ("state.pt", "rank-1.pt")]


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return from_pretrained(checkpoint).state_dict()


def assert_eval_row_matches_checkpoint(row: dict, checkpoint: Path, tasks: list[str], limit: int) -> None:
    """An in-training eval row equals ling-eval run in this process on the checkpoint of the same
    weights. Tolerance rel 1e-4: fp32 on both sides, differing only in summation order (one
    thread in the ranks, several here); one flipped choice would move an accuracy by >= 1/limit."""
    import pytest
    from ling_eval import evaluate
    from ling_train.eval_callback import eval_row, load_eval_tasks
    from ling_train.eval_model import load_checkpoint

    model, tokenizer = load_checkpoint(checkpoint)
    expected = eval_row(row["step"], evaluate(model, tokenizer, load_eval_tasks(tasks), limit=limit,
                                              keep_predictions=False))
    scored, reference = ({k: v for k, v in r.items() if k.startswith("eval/")} for r in (row, expected))
    assert scored == pytest.approx(reference, rel=1e-4), (scored, reference)
