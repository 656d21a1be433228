"""Elastic restart under torchrun: SIGKILL one of two CPU workers mid-run; torchrun restarts the
job (--max-restarts 1), which resumes from the newest complete flash snapshot (loader position
included) and ends with exactly the parameters of an uninterrupted run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent / "elastic_train.py"
STEPS, SNAPSHOT_EVERY, KILL_AT = 12, 3, 7


def torchrun(out: Path, *extra: str) -> subprocess.Popen:
    out.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--max-restarts", "1", "--monitor-interval", "0.5", str(SCRIPT), str(out),
               "--steps", str(STEPS), "--snapshot-every", str(SNAPSHOT_EVERY), *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow  # ~40-60 s on 2 shared cores: three torchrun worker groups start up
@pytest.mark.dist
def test_sigkilled_worker_restarts_and_resumes_to_the_same_parameters(tmp_path) -> None:
    # Both jobs at once: each is mostly process start-up, which overlaps well.
    jobs = {"uninterrupted": torchrun(tmp_path / "uninterrupted"),
            "killed": torchrun(tmp_path / "killed", "--kill-at", str(KILL_AT))}
    for name, job in jobs.items():
        output, _ = job.communicate(timeout=300)
        assert job.returncode == 0, f"{name} job failed:\n{output[-4000:]}"

    killed = tmp_path / "killed"
    assert (killed / "attempts.log").read_text().splitlines() == [
        "attempt 0 resumed_from 0", f"attempt 1 resumed_from {KILL_AT // SNAPSHOT_EVERY * SNAPSHOT_EVERY}"]
    assert (tmp_path / "uninterrupted" / "attempts.log").read_text().splitlines() == ["attempt 0 resumed_from 0"]
    expected = torch.load(tmp_path / "uninterrupted" / "final.pt")
    got = torch.load(killed / "final.pt")
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)  # same data, same order of the same float ops: bitwise equal
