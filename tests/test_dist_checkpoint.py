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


@settings(max_examples=60, deadline=None)
@given(old_world=st.integers(1, 4), new_world=st.integers(1, 4), batch_size=st.integers(1, 3),
       windows=st.integers(12, 60), taken=st.integers(0, 12), seed=st.integers(0, 9))
def test_loader_resumes_after_the_consumed_windows_at_any_world_size(old_world, new_world, batch_size,
                                                                     windows, taken, seed):
    """Old ranks take `taken` batches each; new ranks resume from the converted state. Within the
    epoch no window is served twice, and fewer than one new global batch is skipped (none when the
    consumed count is a multiple of it); past the epoch's end, the next epoch starts from its start."""
    seq_len = 4
    stream = torch.arange(windows * seq_len + 1)
    old = [PackedLoader(stream, seq_len, batch_size, seed, rank, old_world) for rank in range(old_world)]
    taken = min(taken, old[0].batches_per_epoch - 1)  # stay inside the epoch (the loader state never equals its end)
    consumed: set[int] = set()
    for _ in range(taken):
        for loader in old:
            consumed |= windows_of(loader.next_batch()[0], seq_len)
    new = [PackedLoader(stream, seq_len, batch_size, seed, rank, new_world) for rank in range(new_world)]
    state = loader_state_for_world_size(old[0].state_dict(), new[0])
    for loader in new:
        loader.load_state_dict(state)  # accepted: world_size now matches
    if state["epoch"] == 1:  # nothing left of this epoch at the new global batch: the next one
        assert len(consumed) + new_world * batch_size > new[0].batches_per_epoch * new_world * batch_size
        return
    served: set[int] = set()
    for _ in range(new[0].batches_per_epoch - state["position"]):
        for loader in new:
            batch = windows_of(loader.next_batch()[0], seq_len)
            assert not batch & served and not batch & consumed  # nothing twice within the epoch
            served |= batch
    order = torch.randperm(windows, generator=torch.Generator().manual_seed(seed)).tolist()
    covered = new[0].batches_per_epoch * new_world * batch_size
    skipped = set(order[:covered]) - consumed - served
    assert len(skipped) < new_world * batch_size
    if len(consumed) % (new_world * batch_size) == 0:
        assert not skipped


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
