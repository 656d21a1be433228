"""Straggler detection over real gloo processes: one of three ranks sleeps 3x longer per step."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp
from parallel_testing import straggler_worker

from ling_dist import StragglerMonitor

STEPS, SLOW_RANK, WORLD_SIZE = 9, 1, 3  # intervals of 3 steps end at steps 3, 6, 9; patience 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.dist
def test_persistently_slow_rank_is_flagged(tmp_path) -> None:
    mp.start_processes(straggler_worker, nprocs=WORLD_SIZE, start_method="spawn",
                       args=(WORLD_SIZE, free_port(), str(tmp_path), SLOW_RANK, STEPS))
    results = [torch.load(tmp_path / f"straggler-rank{r}.pt") for r in range(WORLD_SIZE)]
    for result in results[1:]:  # every rank sees the same verdict
        assert result["records"] == results[0]["records"]
    records = results[0]["records"]
    assert [len(step) for step in records] == [0, 0, 3] * 3  # every rank's record, at each interval's end
    for interval, step in enumerate((2, 5, 8)):
        by_rank = {r["rank"]: r for r in records[step]}
        slow = by_rank[SLOW_RANK]
        assert slow["slowdown"] > 1.5  # ~3x; sleep never returns early, so only load can shrink it
        assert slow["slow_intervals"] == interval + 1
        assert slow["straggler"] == (interval + 1 >= 2) and slow["event"] == ("straggler" if interval else "step_time")
        assert not any(by_rank[r]["straggler"] for r in range(WORLD_SIZE) if r != SLOW_RANK)
    assert len(results[0]["log"]) == 2 and "straggler rank(s) 1" in results[0]["log"][0]
    assert results[1]["log"] == [] and results[2]["log"] == []  # rank 0 logs for everyone


def test_one_process_is_never_a_straggler() -> None:
    monitor = StragglerMonitor(interval=2, factor=1.5, patience=1)
    assert monitor.record(1.0) == []
    [record] = monitor.record(5.0)
    assert record.mean_step_s == 3.0 and record.slowdown == 1.0 and not record.straggler


@pytest.mark.parametrize("kwargs", [dict(interval=0), dict(patience=0), dict(factor=1.0)])
def test_bad_settings_are_clear_errors(kwargs) -> None:
    with pytest.raises(ValueError, match="expected"):
        StragglerMonitor(**kwargs)
