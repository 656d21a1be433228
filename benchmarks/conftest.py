"""Anchors shared by the benchmark suites.

Every benchmark reports against an anchor measured in the same pytest run, never a number
remembered from another day or machine. On a shared machine (CI runners, a laptop doing other
work) a timing can only be made slower by interference, never faster, so both the subject and
its anchors are reported as the best of several rounds, interleaved where the test allows.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable

import pytest
import torch

from ling_train.perf import measure_matmul_flops


class MatmulRate:
    """The machine's fp32 dense matmul rate (FLOP/s) as `ling_train.perf` measures it for MFU;
    `measure()` re-measures and returns the best rate seen in this session."""

    def __init__(self) -> None:
        self.best = 0.0

    def measure(self) -> float:
        self.best = max(self.best, measure_matmul_flops(torch.device("cpu"), torch.float32, min_seconds=1.0))
        return self.best


class BestTime:
    """Best (minimum) wall time of a callable over the calls made through `time(fn)`, and the
    mean count of minor page faults per call (fresh memory the OS had to hand out)."""

    def __init__(self) -> None:
        self.seconds = float("inf")
        self.calls = 0
        self.faults = 0

    def time(self, fn: Callable[[], object]) -> None:
        faults = minor_page_faults()
        start = time.perf_counter()
        fn()
        self.seconds = min(self.seconds, time.perf_counter() - start)
        self.faults += minor_page_faults() - faults
        self.calls += 1

    @property
    def faults_per_call(self) -> int:
        return self.faults // max(self.calls, 1)


def minor_page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@pytest.fixture(scope="session")
def matmul_rate() -> MatmulRate:
    return MatmulRate()


@pytest.fixture
def best_time() -> type[BestTime]:
    return BestTime


@pytest.fixture
def page_faults() -> Callable[[], int]:
    """This process's minor page faults so far (Linux/macOS `getrusage`)."""
    return minor_page_faults


@pytest.fixture
def best_seconds(benchmark) -> Callable[[], float | None]:
    """The benchmark's best round in seconds, or None under --benchmark-disable (no stats then)."""
    def best() -> float | None:
        return benchmark.stats.stats.min if benchmark.stats is not None else None
    return best
