"""The world-size rules of `ling_train.dist_checkpoint`, without processes: where a loader resumes
when the process count changes, and how Local SGD's per-worker state is remapped."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ling_data import PackedLoader
from ling_dist import local_sgd_state_for_world_size
from ling_train.dist_checkpoint import loader_state_for_world_size


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
