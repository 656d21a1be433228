"""init_distributed without a process group: single-process defaults and the env errors.
Joining a real group is covered by the spawned workers in test_local_sgd_dist.py."""

from __future__ import annotations

import pytest
import torch

from ling_dist import DistributedEnvError, init_distributed

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def torchrun_env(monkeypatch: pytest.MonkeyPatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)

    def set_env(**values: str) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, value)
    return set_env


def full_env(**overrides: str) -> dict[str, str]:
    env = dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    env.update(overrides)
    return env


def test_without_torchrun_env_is_one_process_on_cpu(torchrun_env) -> None:
    assert init_distributed() == (0, 1, torch.device("cpu"))
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("env, message", [
    (dict(RANK="0", WORLD_SIZE="2"), "partial.*LOCAL_RANK, MASTER_ADDR, MASTER_PORT missing"),
    (full_env(RANK="two"), "RANK='two': expected an integer"),
    (full_env(RANK="2"), r"RANK=2: expected 0 <= RANK < WORLD_SIZE=2"),
    (full_env(RANK="-1"), "RANK=-1"),
    (full_env(WORLD_SIZE="0"), "WORLD_SIZE=0: expected >= 1"),
    (full_env(RANK="0", LOCAL_RANK="1"), r"LOCAL_RANK=1: expected 0 <= LOCAL_RANK <= RANK=0"),
    (full_env(MASTER_PORT="http"), "MASTER_PORT='http'"),
])
def test_inconsistent_env_is_a_clear_error(torchrun_env, env, message) -> None:
    torchrun_env(**env)
    with pytest.raises(DistributedEnvError, match=message):
        init_distributed()
    assert not torch.distributed.is_initialized()


def test_nccl_without_cuda_is_a_clear_error(torchrun_env, monkeypatch: pytest.MonkeyPatch) -> None:
    torchrun_env(**full_env())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DistributedEnvError, match="nccl.*needs CUDA"):
        init_distributed(backend="nccl")


def test_unknown_backend_is_a_clear_error(torchrun_env) -> None:
    torchrun_env(**full_env())
    with pytest.raises(DistributedEnvError, match="backend='mpi'"):
        init_distributed(backend="mpi")


@pytest.mark.parametrize("kwargs, message", [
    (dict(device="tpu"), "device='tpu': expected None, 'auto', 'cpu' or 'cuda'"),
    (dict(device="auto", backend="nccl"), "device='auto'.*needs backend gloo"),
    (dict(device="cpu", backend="nccl"), "device='cpu' with backend='nccl'"),
])
def test_bad_device_is_a_clear_error(torchrun_env, monkeypatch: pytest.MonkeyPatch, kwargs, message) -> None:
    torchrun_env(**full_env())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    with pytest.raises(DistributedEnvError, match=message):
        init_distributed(**kwargs)
    assert not torch.distributed.is_initialized()


def test_cuda_device_without_a_gpu_is_a_clear_error(torchrun_env, monkeypatch: pytest.MonkeyPatch) -> None:
    torchrun_env(**full_env())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DistributedEnvError, match="device='cuda' but LOCAL_RANK=0 has no visible CUDA device"):
        init_distributed(backend="gloo", device="cuda")


def test_auto_device_without_torchrun_is_this_process_device(torchrun_env) -> None:
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert init_distributed(device="auto") == (0, 1, expected)
