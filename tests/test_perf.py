"""MFU as ling-train reports it: the peak it is taken against and the run's total."""

from __future__ import annotations

import json

import pytest
import torch

from ling_train.perf import calibration_path, matmul_peak, run_mfu, spec_bf16_peak


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LING_CACHE_DIR", str(tmp_path / "cache"))
    return calibration_path()


def measuring(rate):
    return lambda device, dtype: rate


def test_a_busy_start_up_cannot_lower_the_peak_below_the_calibration(cache):
    cpu = torch.device("cpu")
    quiet = matmul_peak(cpu, torch.float32, measuring(336e9))  # first run: measured and cached
    assert (quiet.flops, quiet.source) == (336e9, "measured now")
    busy = matmul_peak(cpu, torch.float32, measuring(68e9))  # the machine is loaded this time
    assert busy.flops == 336e9 and busy.measured_now == 68e9 and busy.source == f"calibration {cache}"
    faster = matmul_peak(cpu, torch.float32, measuring(400e9))  # a better reading raises the cache
    assert faster.flops == 400e9 and matmul_peak(cpu, torch.float32, measuring(1e9)).flops == 400e9
    assert matmul_peak(cpu, torch.bfloat16, measuring(50e9)).flops == 50e9  # one entry per dtype
    assert len(json.loads(cache.read_text())) == 2


def test_a_damaged_or_unwritable_calibration_falls_back_to_the_measurement(cache):
    cache.parent.mkdir(parents=True)
    for damaged in ("{not json", '["a list"]', '{"k": 3}', ""):
        cache.write_text(damaged)
        assert matmul_peak(torch.device("cpu"), torch.float32, measuring(5e9)).flops == 5e9
    cache.unlink()
    cache.mkdir()  # a directory where the file should be: neither readable nor writable as a file
    assert matmul_peak(torch.device("cpu"), torch.float32, measuring(7e9)).flops == 7e9


def test_run_mfu_is_total_flops_over_total_time_not_the_mean_of_step_ratios():
    # two steps of 1,000 tokens: one 1 s, one 3 s; 1e9 FLOPs/token against a 1e12 peak
    steps = [{"tokens": 1000, "step_time_s": 1.0}, {"tokens": 1000, "step_time_s": 3.0}]
    assert run_mfu(steps, 1e9, 1e12) == pytest.approx(2000 * 1e9 / 4.0 / 1e12)  # 0.5
    mean_of_ratios = (1000 * 1e9 / 1.0 + 1000 * 1e9 / 3.0) / 2 / 1e12  # 0.667: what was reported
    assert run_mfu(steps, 1e9, 1e12) < mean_of_ratios
    assert run_mfu([], 1e9, 1e12) == 0.0


@pytest.mark.parametrize("name, flops", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L40S", 362e12),
    ("NVIDIA L4", 121e12), ("NVIDIA A10G", 70e12), ("Some Future GPU", None)])
def test_spec_sheet_bf16_peak_of_known_gpus(name, flops):
    assert spec_bf16_peak(name) == flops
