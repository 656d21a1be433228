"""FlashCheckpointer: copy semantics, atomicity (torn and tampered snapshots), retention, errors."""

from __future__ import annotations

import json
from collections import namedtuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ling_dist.flash_checkpoint import (CheckpointError, FlashCheckpointer, copy_on_this_thread, latest_complete,
                                       list_snapshots)

Position = namedtuple("Position", "epoch index")


def make_state(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(3, 4, generator=generator), "b": torch.zeros(4, dtype=torch.bfloat16)},
            "optimizer": [torch.randn(5, generator=generator), {"step": 7}],
            "loader": {"position": Position(epoch=1, index=42), "seed": seed},
            "rng": torch.get_rng_state()}


def assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_save_copies_then_persists_and_restores(tmp_path) -> None:
    state = make_state()
    expected = {"model": {k: v.clone() for k, v in state["model"].items()},
                "optimizer": [state["optimizer"][0].clone(), {"step": 7}],
                "loader": state["loader"], "rng": state["rng"]}
    checkpointer = FlashCheckpointer(tmp_path, keep_last=2)
    checkpointer.save(10, state)
    state["model"]["w"].add_(1.0)  # the training step overwrites live tensors right after save returns
    state["optimizer"][1]["step"] = 8
    checkpointer.wait()
    step, restored = FlashCheckpointer(tmp_path).restore()
    assert step == 10
    assert_same(restored, expected)


def test_keeps_the_last_n_and_resumes_from_the_newest(tmp_path) -> None:
    checkpointer = FlashCheckpointer(tmp_path, keep_last=2)
    for step in range(1, 6):
        checkpointer.save(step, make_state(step))
    checkpointer.close()
    assert [s.step for s in list_snapshots(tmp_path)] == [4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000004", "step-000000005"]
    step, restored = FlashCheckpointer(tmp_path).restore()
    assert step == 5 and torch.equal(restored["model"]["w"], make_state(5)["model"]["w"])


def test_torn_or_partial_snapshots_are_never_picked(tmp_path) -> None:
    checkpointer = FlashCheckpointer(tmp_path)
    checkpointer.save(3, make_state())
    checkpointer.close()
    good = tmp_path / "step-000000003"
    # A worker killed mid-write: a temp file, no manifest.
    torn = tmp_path / "step-000000004"
    torn.mkdir()
    (torn / ".rank-00000.pt.tmp-123").write_bytes(b"PK\x03\x04half")
    # Data renamed into place but truncated afterwards: the size no longer matches the manifest.
    truncated = tmp_path / "step-000000005"
    truncated.mkdir()
    for name in ("rank-00000.pt", "rank-00000.json"):
        (truncated / name).write_bytes((good / name).read_bytes())
    with open(truncated / "rank-00000.pt", "r+b") as file:
        file.truncate(10)
    # Two ranks wrote step 6 but only rank 0 finished.
    partial = tmp_path / "step-000000006"
    partial.mkdir()
    (partial / "rank-00000.pt").write_bytes((good / "rank-00000.pt").read_bytes())
    manifest = json.loads((good / "rank-00000.json").read_text())
    (partial / "rank-00000.json").write_text(json.dumps({**manifest, "step": 6, "world_size": 2}))
    assert latest_complete(tmp_path).step == 3
    assert FlashCheckpointer(tmp_path).restore()[0] == 3


def test_altered_data_fails_the_checksum(tmp_path) -> None:
    checkpointer = FlashCheckpointer(tmp_path)
    checkpointer.save(1, make_state())
    checkpointer.close()
    data = tmp_path / "step-000000001" / "rank-00000.pt"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, different content
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="rank-00000.pt: sha256 .* but the manifest recorded"):
        FlashCheckpointer(tmp_path).restore()


def test_background_failure_is_raised_on_the_next_call(tmp_path) -> None:
    checkpointer = FlashCheckpointer(tmp_path)
    checkpointer.save(1, {"unpicklable": lambda: None})  # torch.save fails in the writer thread
    with pytest.raises(CheckpointError, match="writing a snapshot failed"):
        checkpointer.wait()
    assert latest_complete(tmp_path) is None and not list((tmp_path / "step-000000001").iterdir())
    checkpointer.save(2, make_state())  # the checkpointer stays usable
    checkpointer.close()
    assert latest_complete(tmp_path).step == 2


def test_restore_with_another_world_size_is_a_clear_error(tmp_path) -> None:
    checkpointer = FlashCheckpointer(tmp_path, rank=0, world_size=1)
    checkpointer.save(1, make_state())
    checkpointer.close()
    with pytest.raises(CheckpointError, match="written by 1 ranks, this job has 2"):
        FlashCheckpointer(tmp_path, rank=1, world_size=2).restore()


dtypes = st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool])


def random_tensor(shape: list[int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 10).to(dtype)


tensors = st.builds(random_tensor, st.lists(st.integers(0, 4), max_size=3), dtypes, st.integers(0, 2**16))
states = st.recursive(
    tensors | st.integers() | st.text(max_size=5) | st.none(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=8)


@settings(max_examples=25, deadline=None)
@given(states)
def test_save_then_restore_is_the_identity(tmp_path_factory, state) -> None:
    directory = tmp_path_factory.mktemp("flash")
    checkpointer = FlashCheckpointer(directory)
    checkpointer.save(0, state)
    checkpointer.close()
    assert_same(FlashCheckpointer(directory).restore()[1], state)


def mlp_training(width: int = 256):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.Linear(width, width))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    return model, optimizer


def clone_state(state):
    if isinstance(state, torch.Tensor):
        return state.clone()
    if isinstance(state, dict):
        return {key: clone_state(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(clone_state(value) for value in state)
    return state


def test_overlapped_is_the_default_with_optimizers_and_only_then(tmp_path) -> None:
    model, optimizer = mlp_training(8)
    assert FlashCheckpointer(tmp_path / "a", optimizers=[optimizer]).overlap
    assert not FlashCheckpointer(tmp_path / "b").overlap


def test_optimizer_step_right_after_save_does_not_reach_the_snapshot(tmp_path) -> None:
    """The default with `optimizers`: save() returns before the copy is done, and the optimizer
    step that follows at once (no forward/backward to hide the copy behind) overwrites the
    parameters and AdamW moments in place. Its pre-step hook must hold it until the copy is
    done: the snapshot holds the values at save(), for every tensor. Without the fence the
    step races the copy and (the copy of ~2 MB taking far longer than reaching the step) the
    check at the commit discards the snapshot with an error, which fails this test."""
    model, optimizer = mlp_training()
    checkpointer = FlashCheckpointer(tmp_path, optimizers=[optimizer], keep_last=1)
    model(torch.randn(16, 256)).square().mean().backward()
    optimizer.step()  # the moments exist
    for step in range(3):
        model(torch.randn(16, 256)).square().mean().backward()  # gradients for the next step
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
        before = clone_state(state)
        checkpointer.save(step, state)
        optimizer.step()  # mutates every parameter and moment in place, straight after save()
        with torch.no_grad():
            model[0].weight.mul_(0.0)  # an in-place update after the fence: must not reach the file either
        checkpointer.wait()
        restored = FlashCheckpointer(tmp_path).restore()[1]
        assert_same(restored["model"], before["model"])
        assert_same(restored["optimizer"], before["optimizer"])
        assert not torch.equal(model[2].weight, before["model"]["2.weight"])  # the step did run
    checkpointer.close()


def test_an_unfenced_in_place_update_discards_the_snapshot(tmp_path) -> None:
    """Overlapped without the optimizer passed in: a mutation between save() and
    wait_for_snapshot() is found by the version check and the snapshot is not committed."""
    model, optimizer = mlp_training()
    checkpointer = FlashCheckpointer(tmp_path, overlap=True)
    checkpointer.save(1, {"model": model.state_dict()})
    with torch.no_grad():
        model[2].bias.add_(1.0)  # no wait_for_snapshot() first
    with pytest.raises(CheckpointError, match=r"snapshot of step 1 discarded: state\['model'\]\['2.bias'\] "
                                              r"changed in place between save\(\) and wait_for_snapshot\(\)"):
        checkpointer.wait()
    assert latest_complete(tmp_path) is None and not list((tmp_path / "step-000000001").iterdir())
    checkpointer.save(2, {"model": model.state_dict()})  # usable afterwards; a fenced update is fine
    checkpointer.wait_for_snapshot()
    with torch.no_grad():
        model[2].bias.add_(1.0)
    checkpointer.close()
    assert latest_complete(tmp_path).step == 2


def test_overlapped_copy_is_fenced_by_the_optimizer_step(tmp_path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    checkpointer = FlashCheckpointer(tmp_path, optimizers=[optimizer])
    for step in range(3):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        checkpointer.save(step, {"model": model.state_dict()})
        model(torch.randn(8, 64)).square().mean().backward()
        optimizer.step()  # waits for the snapshot copy, then overwrites the parameters
        optimizer.zero_grad()
        checkpointer.wait()
        assert_same(FlashCheckpointer(tmp_path).restore()[1]["model"], before)
        assert not torch.equal(model.weight, before["weight"])
    checkpointer.close()


copy_dtypes = st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int8, torch.bool])


@settings(max_examples=30, deadline=None)
@given(numel=st.one_of(st.integers(0, 40), st.integers(32768 - 3, 32768 * 3 + 3)), dtype=copy_dtypes,
       transposed=st.booleans(), seed=st.integers(0, 2**16))
def test_copy_on_this_thread_equals_copy(numel, dtype, transposed, seed) -> None:
    """Chunked (contiguous, >= the grain size) or not (small, non-contiguous): bitwise `copy_`."""
    source = random_tensor([numel], dtype, seed)
    if transposed and numel >= 2:
        source = source[: numel - numel % 2].view(2, -1).t()  # non-contiguous: the plain copy_ path
    expected = torch.empty_like(source).copy_(source)
    buffer = torch.empty(source.shape, dtype=dtype)
    copy_on_this_thread(buffer, source)
    assert buffer.dtype == dtype and torch.equal(buffer, expected)  # finite values: equal is bitwise here


@pytest.mark.gpu
def test_overlapped_snapshot_of_cuda_state_goes_through_pinned_memory(tmp_path) -> None:
    """On CUDA the copy is a non-blocking device-to-host copy into pinned buffers, synchronised on
    the writer thread; the optimizer step after save() must wait for it (the fence)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    checkpointer = FlashCheckpointer(tmp_path, optimizers=[optimizer])
    for step in range(3):
        model(torch.randn(32, 256, device="cuda")).square().mean().backward()
        before = {"model": {k: v.cpu() for k, v in model.state_dict().items()}}
        checkpointer.save(step, {"model": model.state_dict()})
        optimizer.step()  # fenced: waits for the copy before overwriting the parameters
        optimizer.zero_grad()
        checkpointer.wait()
        restored = FlashCheckpointer(tmp_path).restore()[1]
        assert_same(restored, before)
    assert all(buffer.is_pinned() for buffer in checkpointer._buffers.values())
    checkpointer.close()



def test_snapshot_files_and_directories_are_fsynced_before_the_manifest(tmp_path, monkeypatch) -> None:
    """The manifest marks a rank's snapshot complete: once it survives a power loss, so must the data
    file's bytes, its name, and the step directory's name."""
    import os

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda src, dst: (events.append(("replace", str(dst))),
                                                         real_replace(src, dst)))
    checkpointer = FlashCheckpointer(tmp_path, keep_last=2)
    checkpointer.save(3, make_state())
    checkpointer.wait()
    step_dir = tmp_path / "step-000000003"
    data = events.index(("replace", str(step_dir / "rank-00000.pt")))
    manifest = events.index(("replace", str(step_dir / "rank-00000.json")))
    assert ("fsync", str(step_dir)) in events[data:manifest]
    assert ("fsync", str(tmp_path)) in events[:manifest]
