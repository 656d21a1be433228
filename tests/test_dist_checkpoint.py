"""The world-size and --dist rules of `ling_train.dist_checkpoint`, without processes: where a
loader resumes when the process count changes, how Local SGD's per-worker state is remapped, and
how the optimizer state moves between --dist modes."""

from __future__ import annotations

import copy

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ling_data import PackedLoader
from ling_dist import local_sgd_state_for_world_size
from ling_train.config import RunConfig
from ling_train.dist_checkpoint import loader_state_for_world_size, optimizer_for_this_run, optimizer_sha256, source_rank
from ling_train.distributed import DistSetup, wrap_optimizer


def windows_of(batch: torch.Tensor, seq_len: int) -> set[int]:
    """Window index of each row (the stream is 0, 1, 2, ..., so a window starts at its index x seq_len)."""
    return {int(row[0]) // seq_len for row in batch}


def rank_sizes(world: int) -> st.SearchStrategy[list[int]]:
    """Per-rank batch sizes: equal (one --batch-size for all) or drawn per rank (a list)."""
    return st.one_of(st.integers(1, 3).map(lambda size: [size] * world),
                     st.lists(st.integers(1, 3), min_size=world, max_size=world))


@settings(max_examples=60, deadline=None)
@given(old_sizes=st.integers(1, 4).flatmap(rank_sizes), new_sizes=st.integers(1, 4).flatmap(rank_sizes),
       windows=st.integers(12, 60), taken=st.integers(0, 12), seed=st.integers(0, 9))
def test_loader_resumes_after_the_consumed_windows_at_any_world_size(old_sizes, new_sizes, windows, taken, seed):
    """Old ranks take `taken` batches each; new ranks resume from the converted state. Within the
    epoch no window is served twice, and fewer than one new global batch is skipped (none when the
    consumed count is a multiple of it); past the epoch's end, the next epoch starts from its start.
    Per-rank batch sizes (old and new) follow the same rule, with global batch = their sum."""
    seq_len = 4
    stream = torch.arange(windows * seq_len + 1)
    old_world, new_world, new_global = len(old_sizes), len(new_sizes), sum(new_sizes)
    old = [PackedLoader(stream, seq_len, seed=seed, rank=rank, world_size=old_world, batch_sizes=old_sizes)
           for rank in range(old_world)]
    taken = min(taken, old[0].batches_per_epoch - 1)  # stay inside the epoch (the loader state never equals its end)
    consumed: set[int] = set()
    for _ in range(taken):
        for loader in old:
            consumed |= windows_of(loader.next_batch()[0], seq_len)
    new = [PackedLoader(stream, seq_len, seed=seed, rank=rank, world_size=new_world, batch_sizes=new_sizes)
           for rank in range(new_world)]
    state = loader_state_for_world_size(old[-1].state_dict(), new[0])
    for loader in new:
        loader.load_state_dict(state)  # accepted: world_size and batch sizes now match
    if state["epoch"] == 1:  # nothing left of this epoch at the new global batch: the next one
        assert len(consumed) + new_global > new[0].batches_per_epoch * new_global
        return
    served: set[int] = set()
    for _ in range(new[0].batches_per_epoch - state["position"]):
        for loader in new:
            batch = windows_of(loader.next_batch()[0], seq_len)
            assert not batch & served and not batch & consumed  # nothing twice within the epoch
            served |= batch
    order = torch.randperm(windows, generator=torch.Generator().manual_seed(seed)).tolist()
    covered = new[0].batches_per_epoch * new_global
    skipped = set(order[:covered]) - consumed - served
    assert len(skipped) < new_global
    if len(consumed) % new_global == 0:
        assert not skipped


def test_loader_state_from_before_per_rank_sizes_is_remapped():
    """A checkpoint's loader state written before per-rank sizes (one batch_size, world_size):
    2 ranks x 2 rows x 3 batches = 12 windows consumed, so [3, 1] resumes at global batch 3."""
    stream = torch.arange(40 * 4 + 1)
    old = {"epoch": 0, "position": 3, "seed": 0, "seq_len": 4, "batch_size": 2, "world_size": 2, "num_windows": 40}
    loader = PackedLoader(stream, 4, rank=1, world_size=2, batch_sizes=[3, 1])
    state = loader_state_for_world_size(old, loader)
    assert state["position"] == 3 and state["batch_sizes"] == [3, 1] and "batch_size" not in state
    loader.load_state_dict(state)


def test_local_sgd_per_worker_state_maps_new_rank_r_to_old_rank_r_mod_n():
    anchor = [torch.randn(3)]
    state = {"anchor": anchor, "weighting": {"trackers": [(1.0, 0.1, 5), (2.0, 0.2, 5)]}, "syncs": 4}
    three = local_sgd_state_for_world_size(state, 3)
    assert three["weighting"]["trackers"] == [(1.0, 0.1, 5), (2.0, 0.2, 5), (1.0, 0.1, 5)]
    assert three["anchor"] is anchor and three["syncs"] == 4  # shared state: unchanged
    assert local_sgd_state_for_world_size(state, 1)["weighting"]["trackers"] == [(1.0, 0.1, 5)]
    assert len(state["weighting"]["trackers"]) == 2  # the input is not modified
    no_penalty = {"anchor": anchor, "weighting": {}}
    assert local_sgd_state_for_world_size(no_penalty, 3) == no_penalty


def test_new_ranks_resume_old_rank_0_when_leaving_local_sgd_or_aedit():
    rank_1_of_2 = {(a, b): source_rank(1, 2, a, b) for a, b in [("edit", "edit"), ("ddp", "edit"), ("edit", "aedit"),
                                                                  ("edit", "ddp"), ("diloco", "fsdp"), ("aedit", "edit")]}
    assert rank_1_of_2 == {("edit", "edit"): 1, ("ddp", "edit"): 1, ("edit", "aedit"): 1,
                           ("edit", "ddp"): 0, ("diloco", "fsdp"): 0, ("aedit", "edit"): 0}


def test_optimizer_state_moves_between_dist_modes():
    """ddp -> edit -> diloco -> aedit -> ddp, and ddp -> fsdp (one process: the by-name round trip):
    the inner optimizer state arrives as saved at every hop; entering Local SGD anchors at the
    weights with no momentum; between Local SGD modes anchor, momentum and counters carry over
    under the new mode's schedule and weighting (which the old state would fail to load into)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    plain_optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    plain_optimizer.step()
    saved = copy.deepcopy(plain_optimizer.state_dict())

    def resume(state: dict, mode: str, **flags):
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        setup = DistSetup(mode, 0, 2, torch.device("cpu"))
        stepped = wrap_optimizer(setup, RunConfig(dist=mode, **flags), model, optimizer)
        stepped.load_state_dict(optimizer_for_this_run({**state, "step": 5}, setup, model, optimizer))
        assert optimizer_sha256(optimizer.state_dict()) == optimizer_sha256(saved), (state["dist"], mode)
        return stepped, setup.local_sgd

    edit, lsgd = resume({"dist": "ddp", "optimizer": saved}, "edit", sync_every=4)
    assert all(torch.equal(a, p) for a, p in zip(lsgd.anchor, model.parameters()))
    assert not lsgd.outer_optimizer.state and (lsgd.syncs, lsgd.global_inner_steps) == (0, 5 * 2)
    edit_state = {**edit.state_dict(), "syncs": 3, "weighting": {"trackers": [(1.0, 0.1, 3)] * 2}}
    edit_state["anchor"] = [a + 1 for a in edit_state["anchor"]]
    diloco, lsgd = resume({"dist": "edit", "optimizer": edit_state}, "diloco", sync_every=2)
    assert lsgd.syncs == 3 and lsgd.policy.sync_every == 2
    assert all(torch.equal(a, p + 1) for a, p in zip(lsgd.anchor, model.parameters()))
    aedit, lsgd = resume({"dist": "diloco", "optimizer": diloco.state_dict()}, "aedit", sync_seconds=1.0)
    assert lsgd.syncs == 3 and lsgd.weighting.trackers == []  # DiLoCo's token weighting has no statistics
    resume({"dist": "aedit", "optimizer": aedit.state_dict()}, "ddp")
    resume({"dist": "ddp", "optimizer": saved}, "fsdp")
