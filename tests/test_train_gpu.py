"""ling-train on CUDA: the paths a CPU machine cannot run (marked `gpu`, skipped without CUDA).

Run on a machine with one GPU: `uv run pytest tests/test_train_gpu.py`. Each test states what it
checks; none has run yet where this file was written (no GPU there), so a failure here is the
first sighting of a CUDA-side bug, not a flaky test.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ling_train.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent))  # importlib mode: make the helpers importable
from train_dist_testing import rows, write_config  # noqa: E402

pytestmark = pytest.mark.gpu


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows(run) if "loss" in r}


def test_a_cpu_checkpoint_resumes_on_cuda(tmp_path):
    """Cluster migration CPU -> CUDA: weights, AdamW state, schedule and loader position move to the
    GPU (loaded with map_location="cpu", copied to each parameter's device). fp32 on both sides, so
    the first resumed loss matches the CPU run's next loss to 1e-3 relative (cuBLAS and the CPU
    sum in different orders; TF32 is off for fp32 matmuls by default)."""
    config = write_config(tmp_path, extra="checkpoint_every = 2\nprecision = 'fp32'\n")
    assert main(["--config", str(config), "--steps", "4", "--device", "cpu", "--out", str(tmp_path / "cpu"),
                 "--no-progress"]) == 0
    assert main(["--resume", str(tmp_path / "cpu" / "checkpoints" / "step-2"), "--device", "cuda",
                 "--out", str(tmp_path / "cuda"), "--no-progress"]) == 0
    cpu, cuda = losses(tmp_path / "cpu"), losses(tmp_path / "cuda")
    assert sorted(cuda) == [3, 4]
    assert cuda[3] == pytest.approx(cpu[3], rel=1e-3) and cuda[4] == pytest.approx(cpu[4], rel=1e-3)
    summary = json.loads((tmp_path / "cuda" / "summary.json").read_text())
    assert summary["device"].startswith("cuda")


def launch(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")}
    return subprocess.run([sys.executable, "-m", "ling_train.cli", "--no-progress", *args], capture_output=True,
                          text=True, env=env, timeout=600)


def test_nccl_data_parallel_and_edit_side_stream_on_one_gpu(tmp_path):
    """One process on the GPU under torchrun, in an nccl group of one: `--dist ddp` (DDP itself
    wraps only with >= 2 ranks, so it is not exercised on a one-GPU machine) and EDiT (its exchange
    on nccl's own stream) with flash snapshots from pinned host memory."""
    config = write_config(tmp_path, extra="checkpoint_every = 0\n")
    for dist_mode, extra in (("ddp", []), ("edit", ["--sync-every", "2", "--snapshot-every", "2"])):
        out = tmp_path / dist_mode
        result = launch("--nproc", "1", "--dist", dist_mode, "--device", "cuda", "--config", str(config),
                        "--steps", "6", "--out", str(out), *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        run_losses = losses(out)
        assert sorted(run_losses) == list(range(1, 7)) and all(math.isfinite(v) for v in run_losses.values())
    assert (tmp_path / "edit" / "snapshots" / "latest").read_text().strip() == "step-000000006"


def test_mixed_job_one_rank_on_the_gpu_one_on_the_cpu(tmp_path):
    """`--device mixed` with 2 processes and one visible GPU: rank 0 computes on cuda:0, rank 1 on the
    CPU, in one gloo group; EDiT's exchanges cross the two (CUDA tensors staged through host
    memory). The job trains: losses finite and falling, syncs counted with their bytes."""
    config = write_config(tmp_path, extra="checkpoint_every = 0\n")
    out = tmp_path / "mixed"
    result = launch("--nproc", "2", "--dist", "edit", "--device", "mixed", "--sync-every", "2",
                    "--config", str(config), "--steps", "10", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["device"].startswith("cuda") and summary["syncs"] >= 4
    run_losses = losses(out)
    assert all(math.isfinite(v) for v in run_losses.values()) and run_losses[10] < run_losses[1]
    ranks = [r for r in rows(out) if r.get("event") == "sync"]
    assert ranks and ranks[-1]["bytes_communicated"] > 0
