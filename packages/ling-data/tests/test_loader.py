"""TokenLoader: the documented order, rank sharding, exact resume, prefetch, corrupt shards."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ling_data import DataError, TokenLoader
from ling_data.shards import FORMAT, decode_shard, encode_shard, load_manifest

EOS = 3
props = settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])


def write_shard_dir(root: Path, shards: list[list[list[int]]], vocab_size: int = 1000) -> Path:
    """A shard directory holding ``shards`` (lists of documents' token lists)."""
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for index, documents in enumerate(shards):
        lengths = np.array([len(d) for d in documents], dtype=np.uint32)
        tokens = np.array([t for d in documents for t in d], dtype=np.int64)
        data = encode_shard(lengths, tokens, "uint16")
        name = f"shard-{index:05d}.zst"
        (root / name).write_bytes(data)
        entries.append({"file": name, "documents": len(documents), "tokens": len(tokens), "bytes": len(data),
                        "sha256": hashlib.sha256(data).hexdigest()})
    manifest = {"format": FORMAT, "dtype": "uint16", "vocab_size": vocab_size, "eos_id": EOS,
                "tokens": sum(e["tokens"] for e in entries), "documents": sum(e["documents"] for e in entries),
                "tokenizer": "tokenizer.model", "shards": entries}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def random_shards(rng: np.random.Generator, count: int) -> list[list[list[int]]]:
    return [[rng.integers(4, 1000, size=rng.integers(1, 40)).tolist() for _ in range(rng.integers(1, 12))]
            for _ in range(count)]


def reference_epoch(shards, seq_len: int, seed: int, epoch: int, documents: bool = False) -> list[list[int]]:
    """The documented epoch order, written plainly: a list of windows of seq_len + 1 tokens
    (`documents`: each token replaced by its document's number across the directory, EOS included)."""
    first = np.cumsum([0] + [len(shard_documents) for shard_documents in shards])
    windows = []
    for shard in np.random.default_rng([seed, epoch]).permutation(len(shards)).tolist():
        stream = [int(first[shard]) + d if documents else t
                  for d, document in enumerate(shards[shard]) for t in [*document, EOS]]
        starts = np.arange((len(stream) - 1) // seq_len) * seq_len
        np.random.default_rng([seed, epoch, shard]).shuffle(starts)
        windows += [stream[s:s + seq_len + 1] for s in starts.tolist()]
    return windows


@props
@given(seed=st.integers(0, 2**16), seq_len=st.integers(1, 16), batch_size=st.integers(1, 4),
       world_size=st.integers(1, 3), prefetch=st.sampled_from([0, 2]))
def test_batches_follow_the_documented_order_and_ranks_partition(tmp_path, seed, seq_len, batch_size,
                                                                 world_size, prefetch) -> None:
    shards = random_shards(np.random.default_rng(seed), 3)
    directory = write_shard_dir(tmp_path / f"s{seed}", shards)
    total_windows = sum(len(reference_epoch([s], seq_len, seed, 0)) for s in shards)
    if total_windows < batch_size * world_size:
        with pytest.raises(DataError, match="needs at least"):
            TokenLoader(directory, seq_len, batch_size, seed=seed, world_size=world_size)
        return
    loaders = [TokenLoader(directory, seq_len, batch_size, seed=seed, rank=r, world_size=world_size,
                           prefetch=prefetch) for r in range(world_size)]
    per_epoch = loaders[0].batches_per_epoch
    for epoch in range(2):
        expected = reference_epoch(shards, seq_len, seed, epoch)
        for batch in range(per_epoch):
            for rank, loader in enumerate(loaders):
                inputs, labels = loader.next_batch()
                first = (batch * world_size + rank) * batch_size
                windows = torch.tensor(expected[first:first + batch_size])
                assert inputs.dtype == torch.int64 and inputs.shape == (batch_size, seq_len)
                assert torch.equal(inputs, windows[:, :-1]) and torch.equal(labels, windows[:, 1:])
    for loader in loaders:
        loader.close()


@props
@given(seed=st.integers(0, 2**16), seq_len=st.integers(1, 16), batch_size=st.integers(1, 4),
       world_size=st.integers(1, 3))
def test_batch_documents_name_the_documents_each_row_comes_from(tmp_path, seed, seq_len, batch_size,
                                                                world_size) -> None:
    shards = random_shards(np.random.default_rng(seed), 3)
    directory = write_shard_dir(tmp_path / f"d{seed}", shards)
    if sum(len(reference_epoch([s], seq_len, seed, 0)) for s in shards) < batch_size * world_size:
        return  # too few windows: the constructor refuses (tested above)
    for rank in range(world_size):
        loader = TokenLoader(directory, seq_len, batch_size, seed=seed, rank=rank, world_size=world_size, prefetch=0)
        for epoch in range(2):
            owners = reference_epoch(shards, seq_len, seed, epoch, documents=True)
            for batch in range(loader.batches_per_epoch):
                first = (batch * world_size + rank) * batch_size
                expected = [[min(w), max(w)] for w in owners[first:first + batch_size]]
                assert loader.batch_documents(epoch, batch) == expected


@props
@given(seed=st.integers(0, 2**16), seq_len=st.integers(1, 16),
       sizes=st.lists(st.integers(1, 4), min_size=1, max_size=3), prefetch=st.sampled_from([0, 2]))
def test_per_rank_batch_sizes_split_each_global_batch(tmp_path, seed, seq_len, sizes, prefetch) -> None:
    """Per-rank sizes: the documented epoch order cut into global batches of sum(sizes), rank r
    taking sizes[r] windows from sum(sizes[:r]) on; across ranks an epoch's batches are disjoint
    and cover exactly its first batches_per_epoch x sum(sizes) windows. batch_documents agrees."""
    shards = random_shards(np.random.default_rng(seed), 3)
    directory = write_shard_dir(tmp_path / f"p{seed}", shards)
    world_size, global_batch = len(sizes), sum(sizes)
    if sum(len(reference_epoch([s], seq_len, seed, 0)) for s in shards) < global_batch:
        with pytest.raises(DataError, match="needs at least"):
            TokenLoader(directory, seq_len, seed=seed, world_size=world_size, batch_sizes=sizes)
        return
    loaders = [TokenLoader(directory, seq_len, seed=seed, rank=r, world_size=world_size, prefetch=prefetch,
                           batch_sizes=sizes) for r in range(world_size)]
    per_epoch = loaders[0].batches_per_epoch
    for epoch in range(2):
        expected = reference_epoch(shards, seq_len, seed, epoch)
        owners = reference_epoch(shards, seq_len, seed, epoch, documents=True)
        assert per_epoch == len(expected) // global_batch
        seen: list[int] = []  # window numbers in the epoch's order
        for batch in range(per_epoch):
            for rank, loader in enumerate(loaders):
                inputs, labels = loader.next_batch()
                first = batch * global_batch + sum(sizes[:rank])
                windows = torch.tensor(expected[first:first + sizes[rank]])
                assert inputs.shape == (sizes[rank], seq_len)
                assert torch.equal(inputs, windows[:, :-1]) and torch.equal(labels, windows[:, 1:])
                assert loader.batch_documents(epoch, batch) == [[min(w), max(w)]
                                                                for w in owners[first:first + sizes[rank]]]
                seen += range(first, first + sizes[rank])
        assert sorted(seen) == list(range(per_epoch * global_batch))  # disjoint, and exactly the first ones
    for loader in loaders:
        loader.close()


def test_per_rank_sizes_are_in_the_state(tmp_path: Path) -> None:
    directory = write_shard_dir(tmp_path, random_shards(np.random.default_rng(4), 3))
    ranks = [TokenLoader(directory, 4, rank=r, world_size=2, prefetch=0, batch_sizes=[3, 1]) for r in range(2)]
    for loader in ranks:
        loader.next_batch()
    state = json.loads(json.dumps(ranks[1].state_dict()))
    assert state["batch_sizes"] == [3, 1]
    restored = TokenLoader(directory, 4, rank=0, world_size=2, prefetch=0, batch_sizes=[3, 1])
    restored.load_state_dict(state)  # any rank's state restores every rank
    assert torch.equal(restored.next_batch()[0], ranks[0].next_batch()[0])
    with pytest.raises(ValueError, match=r"state has batch_sizes=\[3, 1\] but this loader has batch_sizes=\[2, 2\]"):
        TokenLoader(directory, 4, 2, world_size=2).load_state_dict(state)
    old = {**state, "batch_size": 2}  # saved before per-rank sizes: one batch_size for every rank
    del old["batch_sizes"]
    TokenLoader(directory, 4, 2, world_size=2).load_state_dict(old)
    with pytest.raises(ValueError, match=r"batch_sizes=\[2, 2\] but this loader has batch_sizes=\[3, 1\]"):
        TokenLoader(directory, 4, world_size=2, batch_sizes=[3, 1]).load_state_dict(old)


@pytest.mark.parametrize("prefetch", [0, 3])
def test_resume_sees_exactly_the_uninterrupted_tokens(tmp_path: Path, prefetch: int) -> None:
    directory = write_shard_dir(tmp_path, random_shards(np.random.default_rng(0), 4))
    straight = TokenLoader(directory, seq_len=8, batch_size=2, seed=7, prefetch=prefetch)
    steps = 2 * straight.batches_per_epoch + 3  # crosses two epoch boundaries
    expected = [straight.next_batch() for _ in range(steps)]
    for cut in (0, 1, straight.batches_per_epoch - 1, straight.batches_per_epoch, steps - 1):
        first = TokenLoader(directory, seq_len=8, batch_size=2, seed=7, prefetch=prefetch)
        for _ in range(cut):
            first.next_batch()
        state = json.loads(json.dumps(first.state_dict()))  # survives serialisation
        first.next_batch()  # the prefetch thread has run ahead; the state must not have
        resumed = TokenLoader(directory, seq_len=8, batch_size=2, seed=7, prefetch=prefetch)
        resumed.load_state_dict(state)
        for got, want in zip((resumed.next_batch() for _ in range(steps - cut)), expected[cut:]):
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        # Loading a state into a loader that already ran also rewinds it.
        first.load_state_dict(state)
        assert torch.equal(first.next_batch()[0], expected[cut][0])
        first.close()
        resumed.close()
    straight.close()


def test_state_from_other_settings_is_refused(tmp_path: Path) -> None:
    directory = write_shard_dir(tmp_path, random_shards(np.random.default_rng(1), 2))
    state = TokenLoader(directory, 4, 2, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        TokenLoader(directory, 4, 2, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="batch="):
        TokenLoader(directory, 4, 2, seed=1).load_state_dict({**state, "batch": 10**6})


def test_checksum_mismatch_surfaces_from_the_prefetch_thread(tmp_path: Path) -> None:
    directory = write_shard_dir(tmp_path, random_shards(np.random.default_rng(2), 2))
    manifest = load_manifest(directory)
    path = directory / manifest["shards"][0]["file"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    loader = TokenLoader(directory, 4, 1, seed=0, prefetch=2)
    with pytest.raises(DataError, match=r"shard-00000\.zst: sha256 .* does not match"):
        for _ in range(loader.batches_per_epoch):
            loader.next_batch()


def test_manifest_errors_name_the_field(tmp_path: Path) -> None:
    directory = write_shard_dir(tmp_path, random_shards(np.random.default_rng(3), 1))
    manifest = json.loads((directory / "manifest.json").read_text())
    del manifest["shards"][0]["sha256"]
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"manifest.json: shards\[0\].sha256"):
        TokenLoader(directory, 4, 1)
    with pytest.raises(DataError, match="does not exist"):
        TokenLoader(tmp_path / "nowhere", 4, 1)


@settings(deadline=None, max_examples=300)
@given(data=st.binary(max_size=300), documents=st.integers(0, 50), tokens=st.integers(0, 500))
def test_decode_shard_fuzz_random_bytes_give_data_error(data: bytes, documents: int, tokens: int) -> None:
    try:
        shard = decode_shard(data, documents, tokens, "uint16", "fuzz.zst")
    except DataError:
        return
    assert len(shard.lengths) == documents and len(shard.tokens) == tokens


@settings(deadline=None, max_examples=200)
@given(lengths=st.lists(st.integers(0, 30), min_size=1, max_size=20), cut=st.integers(0, 10_000),
       flip=st.integers(0, 10_000))
def test_decode_shard_fuzz_damaged_shards(lengths, cut, flip) -> None:
    tokens = np.arange(sum(lengths)) % 1000
    data = bytearray(encode_shard(np.array(lengths), tokens, "uint16"))
    whole = len(data)
    data = data[: cut % (whole + 1)]
    if data and flip % 2:
        data[flip % len(data)] ^= 1 << (flip % 8)
    try:
        shard = decode_shard(bytes(data), len(lengths), len(tokens), "uint16", "fuzz.zst")
    except DataError:
        return
    assert shard.lengths.tolist() == lengths or len(data) == whole


@settings(deadline=None, max_examples=200)
@given(text=st.one_of(st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
                      st.recursive(st.none() | st.integers() | st.text(max_size=5),
                                   lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                                       st.sampled_from(["format", "dtype", "shards", "tokens", "file"]), inner,
                                       max_size=4)).map(json.dumps)))
def test_load_manifest_fuzz(tmp_path_factory, text: str) -> None:
    directory = tmp_path_factory.mktemp("m")
    (directory / "manifest.json").write_text(text, encoding="latin-1")
    with pytest.raises(DataError):
        load_manifest(directory)
