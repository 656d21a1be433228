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
    """`ling-train --nproc 2 ...` as a user would type it (the console script is `ling_train.cli:main`)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "ling_train.cli", "--nproc", "2", "--no-progress", *args],
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
