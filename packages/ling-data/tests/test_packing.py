from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ling_data import DataError, PackedLoader, pack_documents

quick = settings(deadline=None, max_examples=150)


@quick
@given(
    token_lists=st.lists(st.lists(st.integers(0, 2**40), max_size=20), max_size=20),
    eos_id=st.integers(0, 2**40),
)
def test_packing_preserves_every_token_in_order(token_lists: list[list[int]], eos_id: int) -> None:
    stream = pack_documents(token_lists, eos_id)
    assert stream.dtype == torch.int64 and stream.ndim == 1
    assert stream.tolist() == [token for tokens in token_lists for token in [*tokens, eos_id]]


def test_packing_accepts_tensors_and_rejects_non_integers() -> None:
    assert pack_documents([torch.tensor([5, 6]), (7,)], 0).tolist() == [5, 6, 0, 7, 0]
    assert pack_documents(iter([[1], []]), 9).tolist() == [1, 9, 9]
    with pytest.raises(ValueError, match="document 1: expected a 1-D sequence of int token ids"):
        pack_documents([[1], [1.5]], 0)
    with pytest.raises(ValueError, match="eos_id"):
        pack_documents([[1]], -1)


@st.composite
def loader_configs(draw: st.DrawFn) -> dict[str, int]:
    seq_len = draw(st.integers(1, 8))
    batch_size = draw(st.integers(1, 4))
    world_size = draw(st.integers(1, 3))
    num_windows = draw(st.integers(batch_size * world_size, 40))
    # Any tail shorter than a window is unused; include one to check it is ignored.
    length = num_windows * seq_len + 1 + draw(st.integers(0, seq_len - 1))
    return {
        "length": length,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "world_size": world_size,
        "seed": draw(st.integers(0, 2**31)),
    }


def _loader(config: dict[str, int], rank: int = 0) -> PackedLoader:
    # Distinct tokens 1, 4, 7, ... so each window names itself by its first token.
    stream = torch.arange(config["length"]) * 3 + 1
    return PackedLoader(
        stream, config["seq_len"], config["batch_size"], seed=config["seed"], rank=rank, world_size=config["world_size"]
    )


def _window_ids(inputs: torch.Tensor, seq_len: int) -> list[int]:
    return ((inputs[:, 0] - 1) // 3 // seq_len).tolist()


@quick
@given(config=loader_configs())
def test_batches_are_shifted_windows_of_the_stream(config: dict[str, int]) -> None:
    loader = _loader(config)
    seq_len = config["seq_len"]
    stream = torch.arange(config["length"]) * 3 + 1
    assert loader.num_windows == (config["length"] - 1) // seq_len
    for inputs, labels in itertools.islice(loader, 5):
        assert inputs.shape == labels.shape == (config["batch_size"], seq_len)
        assert inputs.dtype == labels.dtype == torch.int64
        for row, window in enumerate(_window_ids(inputs, seq_len)):
            start = window * seq_len
            assert torch.equal(inputs[row], stream[start : start + seq_len])
            assert torch.equal(labels[row], stream[start + 1 : start + seq_len + 1])


@quick
@given(config=loader_configs())
def test_ranks_are_disjoint_and_cover_the_epoch(config: dict[str, int]) -> None:
    world_size, batch_size = config["world_size"], config["batch_size"]
    seen_by_rank = []
    for rank in range(world_size):
        loader = _loader(config, rank)
        windows = [
            window
            for _ in range(loader.batches_per_epoch)
            for window in _window_ids(loader.next_batch()[0], config["seq_len"])
        ]
        assert loader.epoch == 1 and loader.position == 0
        assert len(windows) == len(set(windows))
        seen_by_rank.append(set(windows))
    union = set().union(*seen_by_rank)
    assert sum(map(len, seen_by_rank)) == len(union)  # pairwise disjoint
    num_windows = loader.num_windows
    used = loader.batches_per_epoch * batch_size * world_size
    assert num_windows - batch_size * world_size < used <= num_windows
    generator = torch.Generator().manual_seed(config["seed"])
    assert union == set(torch.randperm(num_windows, generator=generator)[:used].tolist())
    if num_windows % (batch_size * world_size) == 0:
        assert union == set(range(num_windows))


@quick
@given(config=loader_configs(), data=st.data())
def test_resume_from_state_dict_serves_the_same_batches(config: dict[str, int], data: st.DataObject) -> None:
    rank = data.draw(st.integers(0, config["world_size"] - 1))
    running = _loader(config, rank)
    consumed = data.draw(st.integers(0, 3 * running.batches_per_epoch + 1))
    for _ in range(consumed):
        running.next_batch()
    state = running.state_dict()
    resumed = _loader(config, rank)
    resumed.load_state_dict(dict(state))
    for _ in range(running.batches_per_epoch + 2):
        for expected, actual in zip(running.next_batch(), resumed.next_batch()):
            assert torch.equal(expected, actual)


@quick
@given(config=loader_configs())
def test_same_seed_same_batches(config: dict[str, int]) -> None:
    first, second = _loader(config), _loader(config)
    for (a_inputs, a_labels), (b_inputs, b_labels) in zip(itertools.islice(first, 10), itertools.islice(second, 10)):
        assert torch.equal(a_inputs, b_inputs) and torch.equal(a_labels, b_labels)


def test_different_seeds_and_epochs_shuffle_differently() -> None:
    stream = torch.arange(64 * 4 + 1)

    def epoch_order(loader: PackedLoader) -> list[int]:
        return [w for _ in range(loader.batches_per_epoch) for w in (loader.next_batch()[0][:, 0] // 4).tolist()]

    seed0, seed1 = PackedLoader(stream, 4, 8, seed=0), PackedLoader(stream, 4, 8, seed=1)
    first_epoch = epoch_order(seed0)
    assert sorted(first_epoch) == list(range(64))
    assert first_epoch != epoch_order(seed1)
    assert first_epoch != epoch_order(seed0)  # epoch 1 uses seed + 1


def test_iterating_matches_next_batch() -> None:
    stream = torch.arange(200)
    iterated = list(itertools.islice(PackedLoader(stream, 5, 3, seed=7), 20))
    explicit = PackedLoader(stream, 5, 3, seed=7)
    for inputs, labels in iterated:
        expected_inputs, expected_labels = explicit.next_batch()
        assert torch.equal(inputs, expected_inputs) and torch.equal(labels, expected_labels)


def test_too_short_stream_is_an_error() -> None:
    expected = r"10 tokens is too short: it gives 2 windows .* needs at least 4 windows \(17 tokens\)"
    with pytest.raises(DataError, match=expected):
        PackedLoader(torch.arange(10), 4, 2, world_size=2)
    PackedLoader(torch.arange(17), 4, 2, world_size=2)  # exactly enough
    with pytest.raises(DataError, match="too short"):
        PackedLoader(torch.arange(0), 4, 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seq_len": 0}, "seq_len=0"),
        ({"batch_size": -1}, "batch_size=-1"),
        ({"world_size": 0}, "world_size=0"),
        ({"rank": 2, "world_size": 2}, r"rank=2; expected an int in \[0, world_size=2\)"),
    ],
)
def test_bad_arguments(kwargs: dict[str, int], message: str) -> None:
    arguments = {"seq_len": 4, "batch_size": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        PackedLoader(torch.arange(100), **arguments)


def test_stream_must_be_one_dimensional() -> None:
    with pytest.raises(ValueError, match=r"shape \(10, 10\); expected a 1-D token stream"):
        PackedLoader(torch.zeros(10, 10, dtype=torch.int64), 4, 1)


def test_load_state_dict_rejects_mismatched_settings() -> None:
    stream = torch.arange(100)
    state = PackedLoader(stream, 4, 2, seed=1).state_dict()
    with pytest.raises(ValueError, match="state has seed=1 but this loader has seed=2"):
        PackedLoader(stream, 4, 2, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="num_windows"):
        PackedLoader(torch.arange(60), 4, 2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match=r"position=99; expected an int in \[0, 12\)"):
        PackedLoader(stream, 4, 2, seed=1).load_state_dict({"epoch": 0, "position": 99})


def test_any_ranks_state_restores_every_rank() -> None:
    stream = torch.arange(500)
    ranks = [PackedLoader(stream, 4, 2, rank=rank, world_size=3) for rank in range(3)]
    for loader in ranks:
        for _ in range(7):
            loader.next_batch()
    state = ranks[0].state_dict()
    for rank, loader in enumerate(ranks):
        restored = PackedLoader(stream, 4, 2, rank=rank, world_size=3)
        restored.load_state_dict(state)
        assert torch.equal(restored.next_batch()[0], loader.next_batch()[0])


@quick
@given(
    lengths=st.lists(st.integers(0, 12), min_size=1, max_size=25),
    seq_len=st.integers(1, 6),
    world_size=st.integers(1, 3),
    data=st.data(),
)
def test_batch_documents_name_the_documents_each_row_comes_from(lengths, seq_len, world_size, data) -> None:
    """Reference: label every token of the packed stream with its document (its EOS included),
    then read the labels of each served row's seq_len + 1 tokens."""
    eos = 0
    stream = pack_documents([[d + 1] * n for d, n in enumerate(lengths)], eos)  # tokens never equal EOS
    owner = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths) + 1)
    sizes = data.draw(st.lists(st.integers(1, 3), min_size=world_size, max_size=world_size))  # per rank
    if (len(stream) - 1) // seq_len < sum(sizes):
        return
    rank = data.draw(st.integers(0, world_size - 1))
    loader = PackedLoader(stream, seq_len, seed=data.draw(st.integers(0, 99)), rank=rank, world_size=world_size,
                          batch_sizes=sizes)
    for _ in range(loader.batches_per_epoch + 2):  # into the next epoch too
        epoch, position = loader.epoch, loader.position
        inputs, labels = loader.next_batch()
        documents = loader.batch_documents(epoch, position, eos)
        assert len(documents) == len(inputs) == sizes[rank]
        for row, (first, last) in enumerate(documents):
            offset = int(loader.window_indices(epoch, position)[row]) * seq_len
            assert torch.equal(stream[offset:offset + seq_len], inputs[row])
            touched = owner[offset:offset + seq_len + 1]
            assert (first, last) == (int(touched.min()), int(touched.max()))


@st.composite
def per_rank_configs(draw: st.DrawFn) -> dict:
    """A loader setting with one batch size per rank (equal sizes now and then)."""
    seq_len = draw(st.integers(1, 6))
    world_size = draw(st.integers(1, 4))
    if draw(st.booleans()):
        sizes = [draw(st.integers(1, 5))] * world_size
    else:
        sizes = draw(st.lists(st.integers(1, 5), min_size=world_size, max_size=world_size))
    num_windows = draw(st.integers(sum(sizes), 50))
    return {"length": num_windows * seq_len + 1, "seq_len": seq_len, "batch_sizes": sizes,
            "seed": draw(st.integers(0, 2**31))}


def _per_rank_loader(config: dict, rank: int) -> PackedLoader:
    stream = torch.arange(config["length"]) * 3 + 1
    return PackedLoader(stream, config["seq_len"], seed=config["seed"], rank=rank,
                        world_size=len(config["batch_sizes"]), batch_sizes=config["batch_sizes"])


@quick
@given(config=per_rank_configs())
def test_per_rank_batch_sizes_split_each_global_batch(config: dict) -> None:
    """Reference: an epoch's permutation cut into global batches of sum(sizes) windows, rank r
    taking sizes[r] of each from sum(sizes[:r]) on. Across ranks an epoch's batches are disjoint
    and cover exactly the first batches_per_epoch x sum(sizes) windows of the permutation."""
    sizes, seq_len = config["batch_sizes"], config["seq_len"]
    loaders = [_per_rank_loader(config, rank) for rank in range(len(sizes))]
    per_epoch = loaders[0].batches_per_epoch
    assert all(loader.batches_per_epoch == per_epoch for loader in loaders)
    num_windows, global_batch = loaders[0].num_windows, sum(sizes)
    assert per_epoch == num_windows // global_batch
    for epoch in range(2):
        order = torch.randperm(num_windows, generator=torch.Generator().manual_seed(config["seed"] + epoch)).tolist()
        seen: list[int] = []
        for position in range(per_epoch):
            global_windows = order[position * global_batch:(position + 1) * global_batch]
            for rank, loader in enumerate(loaders):
                inputs, labels = loader.next_batch()
                assert inputs.shape == labels.shape == (sizes[rank], seq_len)
                first = sum(sizes[:rank])
                assert _window_ids(inputs, seq_len) == global_windows[first:first + sizes[rank]]
                seen += _window_ids(inputs, seq_len)
        assert len(seen) == len(set(seen))  # disjoint across ranks and batches
        assert set(seen) == set(order[:per_epoch * global_batch])
        assert all(loader.epoch == epoch + 1 and loader.position == 0 for loader in loaders)


@quick
@given(config=loader_configs())
def test_equal_per_rank_sizes_serve_the_batches_of_one_batch_size(config: dict[str, int]) -> None:
    """Backward compatible: batch_sizes=[b] * world_size is batch_size=b, batch for batch, and
    both follow the layout from before per-rank sizes (rank r takes global batch slice r)."""
    world_size, batch_size, seq_len = config["world_size"], config["batch_size"], config["seq_len"]
    stream = torch.arange(config["length"]) * 3 + 1
    rank = config["seed"] % world_size
    plain = _loader(config, rank)
    listed = PackedLoader(stream, seq_len, seed=config["seed"], rank=rank, world_size=world_size,
                          batch_sizes=[batch_size] * world_size)
    order = torch.randperm(plain.num_windows, generator=torch.Generator().manual_seed(config["seed"])).tolist()
    for position in range(min(plain.batches_per_epoch, 6)):
        a, b = plain.next_batch()[0], listed.next_batch()[0]
        assert torch.equal(a, b)
        start = (position * world_size + rank) * batch_size  # the layout before per-rank sizes
        assert _window_ids(a, seq_len) == order[start:start + batch_size]


def test_per_rank_sizes_state_restores_every_rank_and_refuses_other_sizes() -> None:
    stream = torch.arange(500)
    ranks = [PackedLoader(stream, 4, rank=rank, world_size=2, batch_sizes=[3, 1]) for rank in range(2)]
    for loader in ranks:
        for _ in range(5):
            loader.next_batch()
    state = ranks[1].state_dict()
    assert state["batch_sizes"] == [3, 1] and "batch_size" not in state
    for rank, loader in enumerate(ranks):
        restored = PackedLoader(stream, 4, rank=rank, world_size=2, batch_sizes=[3, 1])
        restored.load_state_dict(state)
        assert torch.equal(restored.next_batch()[0], loader.next_batch()[0])
    with pytest.raises(ValueError, match=r"state has batch_sizes=\[3, 1\] but this loader has batch_sizes=\[2, 2\]"):
        PackedLoader(stream, 4, 2, world_size=2).load_state_dict(state)
    # A state saved before per-rank sizes (one batch_size for every rank) still loads where it should.
    old = {"epoch": 0, "position": 3, "seed": 0, "seq_len": 4, "batch_size": 2, "world_size": 2, "num_windows": 124}
    PackedLoader(stream, 4, rank=1, world_size=2, batch_sizes=[2, 2]).load_state_dict(old)
    with pytest.raises(ValueError, match=r"state has batch_sizes=\[2, 2\] but this loader has batch_sizes=\[3, 1\]"):
        PackedLoader(stream, 4, world_size=2, batch_sizes=[3, 1]).load_state_dict(old)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_sizes": [2]}, r"batch_sizes=\[2\]; expected 2 positive ints, one per rank"),
        ({"batch_sizes": [2, 0]}, r"batch_sizes=\[2, 0\]; expected 2 positive ints"),
        ({"batch_sizes": [2, 3], "batch_size": 2, "rank": 1}, r"batch_size=2 but batch_sizes\[1\]=3"),
        ({}, "give batch_size .* or batch_sizes"),
    ],
)
def test_bad_per_rank_sizes(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PackedLoader(torch.arange(100), 4, world_size=2, **kwargs)


def test_too_short_for_the_per_rank_sizes_names_them() -> None:
    with pytest.raises(DataError, match=r"batch_sizes=\[3, 1\] \(sum 4\) needs at least 4 windows"):
        PackedLoader(torch.arange(10), 4, world_size=2, batch_sizes=[3, 1])
