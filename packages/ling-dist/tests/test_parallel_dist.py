"""DDP, FSDP2, expert parallel and HSDP + expert parallel over real gloo processes give the
single-process loss and gradients on the same rows."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp
from parallel_testing import mixed_worker, parallel_worker, reference


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# fp32 throughout; the only differences from the reference are summation order (the all-reduce
# or reduce-scatter adds per-rank means where the reference sums all rows at once, and experts
# see their rows in another order), a few ulp on values of size ~1: 1e-6 absolute and relative
# is ~10 ulp of headroom, while a missing 1/W factor or a token sent to the wrong expert is
# off by tens of percent.
TOLERANCE = dict(rtol=1e-5, atol=1e-6)


@pytest.mark.dist
@pytest.mark.parametrize("world_size, modes", [(2, ["staged", "ep_random", "flash_fsdp", "ddp", "fsdp", "ep"]),
                                                     (4, ["hsdp_ep"])])
def test_parallel_matches_single_process(world_size: int, modes: list[str], tmp_path) -> None:
    """hsdp_ep: a 2 x 2 mesh, experts split inside each pair and replicated across pairs, the
    rest sharded inside each pair (FSDP2 HSDP) and replicated across pairs."""
    mp.start_processes(parallel_worker, nprocs=world_size, start_method="spawn",
                       args=(world_size, free_port(), str(tmp_path), modes))
    expected = reference(world_size)
    if "staged" in modes:
        check_staged(tmp_path, world_size)
    if "ep_random" in modes:
        for rank in range(world_size):  # fp32, a few products and sums of values ~1 reordered
            worst = torch.load(tmp_path / f"ep_random-rank{rank}.pt")
            assert all(difference <= 1e-6 for difference in worst.values()), worst
    if "flash_fsdp" in modes:  # flash snapshot of sharded state, restored as DTensors: exact replay
        for rank in range(world_size):
            assert torch.load(tmp_path / f"flash_fsdp-rank{rank}.pt") == {"step": 1, "equal": True, "sharded": "DTensor"}
    modes = [mode for mode in modes if mode not in ("staged", "ep_random", "flash_fsdp")]
    for mode in modes:
        results = [torch.load(tmp_path / f"{mode}-rank{r}.pt") for r in range(world_size)]
        for step in range(2):  # step 1 checks the optimizer stepped the (sharded) parameters right
            mean_loss = sum(result["losses"][step] for result in results) / world_size
            assert mean_loss == pytest.approx(expected["losses"][step], rel=1e-6), mode
        seen = set()
        for result in results:
            for name, grad in result["grads"].items():
                torch.testing.assert_close(grad, expected["grads"][name], **TOLERANCE, msg=f"{mode} {name}")
                seen.add(name)
        assert seen == set(expected["grads"]), mode  # every parameter checked on some rank
        if mode in ("ep", "hsdp_ep"):  # each rank holds only its share (half) of the experts
            mine = {n for n in results[0]["grads"] if ".experts." in n}
            assert len(mine) == len({n for n in expected["grads"] if ".experts." in n}) // 2


def check_staged(tmp_path, world_size: int) -> None:
    for rank in range(world_size):
        results = torch.load(tmp_path / f"staged-rank{rank}.pt")
        direct, staged = results[False], results[True]
        expected_sum = torch.arange(5.0) * sum(r + 1 for r in range(world_size))
        chunk = torch.arange(3 * rank, 3 * rank + 3, dtype=torch.float32).reshape(-1, 1)
        expected_rows = torch.cat([chunk + 100 * source for source in range(world_size)])
        for summed, received in (direct, staged):
            assert torch.equal(summed, expected_sum)
            assert torch.equal(received, expected_rows)


@pytest.mark.gpu
@pytest.mark.dist
def test_mixed_cpu_and_cuda_ranks_exchange_exactly(tmp_path, monkeypatch) -> None:
    """One GPU visible, 2 ranks: rank 0 computes on cuda:0, rank 1 on the CPU, one gloo group. The
    staged and the plain gloo collectives give the CPU-only results exactly (small integers)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    mp.start_processes(mixed_worker, nprocs=2, start_method="spawn", args=(2, free_port(), str(tmp_path)))
    results = [torch.load(tmp_path / f"mixed-rank{rank}.pt") for rank in range(2)]
    assert [r["device"] for r in results] == ["cuda", "cpu"]
    for rank, result in enumerate(results):
        assert torch.equal(result["summed"], torch.arange(5.0) * 3)
        chunk = torch.arange(3 * rank, 3 * rank + 3, dtype=torch.float32).reshape(-1, 1)
        assert torch.equal(result["received"], torch.cat([chunk, chunk + 100]))
        assert torch.equal(result["flat"], torch.full((7,), 3.0))
        assert torch.equal(result["anchor"], torch.arange(4.0))
        assert torch.equal(result["gathered"], torch.tensor([0.0, 1.0]))

