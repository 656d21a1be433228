"""`ling_dist.full_state`: whole model and optimizer state from FSDP2 + expert-parallel shards,
and back to shards at another world size (here one plain process), over real gloo processes;
plus the one-process round trip on hypothesis-drawn models and the errors."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from migration_testing import full_state_worker
from parallel_testing import batch, loss_fn
from parallel_testing import make_model as make_moe
from torch import nn

from ling_dist import (full_model_state_dict, full_optimizer_state_dict, local_optimizer_state_dict,
                       optimizer_state_by_name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def optimizer_for(model: nn.Module) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if "bias" not in n]
    no_decay = [p for n, p in model.named_parameters() if "bias" in n]
    return torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-2)


def chunk_of(whole: torch.Tensor, local: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """The FSDP2 Shard(0) piece of `whole` that `rank` holds (torch.chunk layout)."""
    if local.shape == whole.shape:
        return whole
    return whole.chunk(world_size)[rank] if rank < len(whole.chunk(world_size)) else whole[:0]


@pytest.mark.dist
@pytest.mark.slow  # one 2-rank spawn: ~15-25 s on 2 shared cores
def test_fsdp2_expert_parallel_whole_state_and_back(tmp_path):
    mp.start_processes(full_state_worker, nprocs=2, start_method="spawn", args=(2, free_port(), str(tmp_path)))
    whole = torch.load(tmp_path / "full.pt", weights_only=False)
    ranks = [torch.load(tmp_path / f"full-rank{r}.pt", weights_only=False) for r in range(2)]
    reference = make_moe()
    assert list(whole["model"]) == list(reference.state_dict())  # every tensor, in the unsharded order
    for rank, local in enumerate(ranks):
        for name, tensor in local["model"].items():  # the whole weights hold each rank's piece
            assert torch.equal(chunk_of(whole["model"][name], tensor, rank, 2), tensor), name
        for name, state in local["trained"].items():
            for key, value in state.items():  # ... and so does the whole optimizer state
                assert torch.equal(chunk_of(whole["optimizer"]["state"][name][key], value, rank, 2), value), name
        assert local["loaded"].keys() == local["trained"].keys()  # cut back: the very shards trained
        for name, state in local["trained"].items():
            assert all(torch.equal(local["loaded"][name][k], v) for k, v in state.items()), name
    # 2 -> 1: a plain process loads the whole state and continues.
    reference.load_state_dict(whole["model"])
    optimizer = optimizer_for(reference)
    optimizer.load_state_dict(local_optimizer_state_dict(reference, optimizer, whole["optimizer"]))
    names = {id(p): n for n, p in reference.named_parameters()}
    assert len(optimizer.state) == len(names)
    for param, state in optimizer.state.items():
        saved = whole["optimizer"]["state"][names[id(param)]]
        assert all(torch.equal(state[k], v) for k, v in saved.items()), names[id(param)]
    loss_fn(reference, *batch(0, 2)).backward()
    optimizer.step()
    assert all(float(s["step"]) == 3 for s in optimizer.state.values())


@settings(max_examples=10, deadline=None)
@given(widths=st.lists(st.integers(1, 6), min_size=2, max_size=4), steps=st.integers(0, 2), seed=st.integers(0, 99))
def test_one_process_round_trip_is_the_identity(widths, steps, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(*(nn.Linear(a, b) for a, b in zip(widths, widths[1:])))
    optimizer = optimizer_for(model)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(3, widths[0])).square().sum().backward()
        optimizer.step()
    weights = full_model_state_dict(model)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    whole = full_optimizer_state_dict(model, optimizer)
    by_name = optimizer_state_by_name(model, optimizer, optimizer.state_dict())  # a plain checkpoint's state
    assert by_name["param_groups"] == whole["param_groups"] and by_name["state"].keys() == whole["state"].keys()
    assert all(torch.equal(by_name["state"][n][k], v) for n, s in whole["state"].items() for k, v in s.items())
    copy = nn.Sequential(*(nn.Linear(a, b) for a, b in zip(widths, widths[1:])))
    copy_optimizer = optimizer_for(copy)
    copy_optimizer.load_state_dict(local_optimizer_state_dict(copy, copy_optimizer, whole))
    original, loaded = optimizer.state_dict(), copy_optimizer.state_dict()
    assert original["param_groups"] == loaded["param_groups"]
    assert original["state"].keys() == loaded["state"].keys()
    for index, state in original["state"].items():
        assert all(torch.equal(loaded["state"][index][k], v) for k, v in state.items())


def test_state_from_another_model_is_a_clear_error():
    model = nn.Linear(3, 2)
    optimizer = optimizer_for(model)
    model(torch.randn(1, 3)).sum().backward()
    optimizer.step()
    whole = full_optimizer_state_dict(model, optimizer)
    other = nn.Linear(4, 2)
    with pytest.raises(ValueError, match=r"optimizer state 'weight'\['exp_avg'\] has shape \[2, 3\]"):
        local_optimizer_state_dict(other, optimizer_for(other), whole)
    single_group = torch.optim.AdamW(other.parameters())
    with pytest.raises(ValueError, match="2 parameter groups, the optimizer 1"):
        local_optimizer_state_dict(other, single_group, whole)
    with pytest.raises(ValueError, match="keyed by parameter name"):
        local_optimizer_state_dict(other, single_group, optimizer.state_dict()["state"])
    with pytest.raises(ValueError, match=r"groups of sizes \[1, 1\], the optimizer \[2\]"):
        optimizer_state_by_name(other, single_group, optimizer.state_dict())
