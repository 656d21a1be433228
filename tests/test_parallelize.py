"""ling_train.parallelize on a reduced Ling MoE over 2 gloo ranks: FSDP2 + expert parallel and
DDP + expert parallel give the single-process loss and gradients on the same tokens."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from ling_core import build_model

# Spawned workers unpickle their entry point by module name; importlib mode does not make test
# modules importable, so the worker lives in a plain module on sys.path (inherited by spawn).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from parallelize_testing import batch, config, worker  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.dist
@pytest.mark.parametrize("data_parallel", ["fsdp", pytest.param("ddp", marks=pytest.mark.slow)])
def test_parallelized_ling_matches_one_process(data_parallel: str, tmp_path) -> None:
    mp.start_processes(worker, nprocs=2, start_method="spawn", args=(2, free_port(), str(tmp_path), data_parallel))
    model = build_model(config(), seed=0)
    inputs, labels = zip(*(batch(r) for r in range(2)))
    loss = model(torch.cat(inputs), torch.cat(labels)).loss
    loss.backward()
    results = [torch.load(tmp_path / f"{data_parallel}-rank{r}.pt") for r in range(2)]
    # fp32: equal token counts per rank, so the mean of the two ranks' mean losses is the mean
    # over all tokens; differences are summation order only (a few ulp of values ~1).
    assert sum(r["loss"] for r in results) / 2 == pytest.approx(loss.item(), rel=1e-6)
    expected = {name: p.grad for name, p in model.named_parameters()}
    seen = set()
    for result in results:
        for name, grad in result["grads"].items():
            torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-6, msg=name)
            seen.add(name)
    assert seen == set(expected)
