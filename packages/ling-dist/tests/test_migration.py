"""Cluster migration over real gloo processes: an FSDP2 checkpoint written by 4 ranks resumes on
2 (resharded), and the 2-rank one on a single process without a process group; model, AdamW
state and the extra (anchor, outer momentum, counter) arrive bit-identical."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp
from migration_testing import extra_template, make_model, migration_worker
from torch import nn

from ling_dist.migration import load_resharded


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_equal_trees(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_equal_trees(a[key], b[key], f"{where}/{key}")
    else:
        assert a == b, where


@pytest.mark.slow  # two spawned groups (4 + 2 ranks): ~30 s on 2 shared cores
@pytest.mark.dist
def test_four_ranks_to_two_to_one(tmp_path) -> None:
    mp.start_processes(migration_worker, nprocs=4, start_method="spawn",
                       args=(4, free_port(), str(tmp_path), None, "ckpt4"))
    mp.start_processes(migration_worker, nprocs=2, start_method="spawn",
                       args=(2, free_port(), str(tmp_path), "ckpt4", "ckpt2"))
    written = torch.load(tmp_path / "ckpt4.pt")
    assert written["optimizer"] and written["extra"]["syncs"] == 3  # AdamW state exists after 2 steps
    assert_equal_trees(torch.load(tmp_path / "ckpt2.pt"), written)  # 4 -> 2: resharded, bit-identical

    # 2 -> 1: one plain process, no process group, no FSDP.
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    extra = load_resharded(tmp_path / "ckpt2", model, optimizer, extra=extra_template(model))
    assert_equal_trees(extra, written["extra"])
    assert_equal_trees(dict(model.state_dict()), written["model"])
    names = dict((id(p), n) for n, p in model.named_parameters())
    for param, state in optimizer.state.items():
        assert_equal_trees(dict(state), written["optimizer"][names[id(param)]], names[id(param)])
    # The loaded optimizer steps like the original would: exp_avg etc. are in use, not reset.
    assert all(float(state["step"]) == 2 for state in optimizer.state.values())
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()


def test_loading_an_incomplete_checkpoint_is_a_clear_error(tmp_path) -> None:
    (tmp_path / "ckpt").mkdir()
    model = nn.Linear(2, 2)
    with pytest.raises(FileNotFoundError, match="not a complete reshardable checkpoint"):
        load_resharded(tmp_path / "ckpt", model)
