"""The machine's measured matmul rate: the ceiling MFU is reported against.

We measure rather than read a spec sheet: on a laptop CPU the achievable rate depends on cores,
vector units and the BLAS build, and a spec-sheet peak would make every MFU look tiny. On a known
GPU the run also reports MFU against the spec-sheet bf16 peak, to compare with other frameworks.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch


def measure_matmul_flops(device: torch.device, dtype: torch.dtype = torch.float32,
                         size: int = 1024, min_seconds: float = 0.3) -> float:
    """Sustained FLOP/s of a square `size` matmul on `device` in `dtype` (best of repeated runs)."""
    if device.type == "cuda" and size < 4096:
        size = 8192
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):
        a @ b
    sync()
    best = float("inf")
    deadline = time.perf_counter() + min_seconds
    while True:
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
        if time.perf_counter() > deadline:
            break
    return 2 * size**3 / best


# Dense bf16 tensor-core peaks from the vendors' spec sheets (no sparsity), as torchtitan reports
# them; matched against torch.cuda.get_device_name, most specific name first.
SPEC_BF16_PEAK_FLOPS = (
    ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("H20", 148e12),
    ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12),
    ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12),
    ("V100", 125e12),
)


def spec_bf16_peak(device_name: str) -> float | None:
    """The spec-sheet dense bf16 peak of a known GPU (`device_name` as CUDA reports it), else None."""
    for name, flops in SPEC_BF16_PEAK_FLOPS:
        if name in device_name:
            return flops
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"{model or platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def calibration_path() -> Path:
    """Where the best matmul rate seen on this machine is kept: $LING_CACHE_DIR, else
    $XDG_CACHE_HOME/ling, else ~/.cache/ling."""
    root = os.environ.get("LING_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ling"
    return Path(root) / "matmul_peak.json"


@dataclass(frozen=True)
class MatmulPeak:
    """The rate MFU is reported against, and where it came from."""
    flops: float
    measured_now: float
    source: str  # "measured now" or "calibration <path>"


def matmul_peak(device: torch.device, dtype: torch.dtype, measure=measure_matmul_flops) -> MatmulPeak:
    """The best of this start-up's measurement and the best rate cached for this machine, device,
    dtype, thread count and torch build. A busy machine measures low (68 vs 336 GFLOP/s on the
    2-core CI machine), and MFU against a low peak reads above 1; interference can only slow a
    matmul down, so the best rate ever seen is the honest ceiling. The cache is best-effort: an
    unreadable or unwritable file only means the start-up measurement is used."""
    now = measure(device, dtype)
    key = f"{device_name(device)} | {dtype} | torch {torch.__version__}"
    path = calibration_path()
    try:
        cache = json.loads(path.read_text())
        cached = float(cache.get(key, {}).get("flops", 0.0))
    except (OSError, ValueError, AttributeError, TypeError):
        cache, cached = {}, 0.0
    if not math.isfinite(cached):
        cached = 0.0
    if now > cached:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            cache[key] = {"flops": now, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, path)
        except OSError:
            pass
        return MatmulPeak(now, now, "measured now")
    return MatmulPeak(cached, now, f"calibration {path}")


def run_mfu(steps: list[dict], flops_per_token: float, peak_flops: float) -> float:
    """A run's MFU: the useful FLOPs of all its steps over their total wall time, over the peak.
    (The mean of per-step ratios overweights fast steps and is not a fraction of anything.)"""
    seconds = sum(r["step_time_s"] for r in steps)
    if not steps or seconds <= 0:
        return 0.0
    return sum(r["tokens"] for r in steps) * flops_per_token / seconds / peak_flops
