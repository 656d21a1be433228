"""A/B: the benchmark MoE block (benchmarks/test_moe_block.py) fwd+bwd with glibc's default
allocator settings against `ling_kernels.allocator.keep_freed_memory()`.

Allocator settings are process-global and `release_freed_memory()` does not restore glibc's
dynamic thresholds, so each subject runs in a fresh process; processes alternate
(default, keep, default, keep, ...), so a burst of load on the machine hits both. Each process
reports its best round (wall seconds and process CPU seconds, i.e. user + system, which counts
page-fault handling but not waiting for a core), minor page faults per round, its peak
resident memory (`ru_maxrss`) and what it holds between steps (gradients
cleared; Linux `/proc/self/statm`), and the fp32 matmul rate on the same clocks.

    uv run python packages/ling-kernels/scripts/measure_allocator.py [--pairs 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[3] / "benchmarks"


def worker(keep: bool, threads: int, rounds: int) -> dict:
    import torch

    from ling_kernels.allocator import keep_freed_memory

    sys.path.insert(0, str(BENCHMARKS))
    from test_moe_block import block_flops, clear_grads, forward_backward, make_block, make_inputs

    torch.set_num_threads(threads)
    if not keep:  # the default subject: the ops' own keep_freed_memory_for_training must not act
        os.environ["LING_KERNELS_MALLOC"] = "default"
    applied = keep_freed_memory() if keep else False
    block = make_block()
    x, grad_out = make_inputs()
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best = {"wall": float("inf"), "cpu": float("inf"), "mm_wall": float("inf"), "mm_cpu": float("inf")}
    faults = 0
    for round_ in range(rounds + 1):  # round 0 warms up
        clear_grads(block, x)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        wall, cpu = time.perf_counter(), time.process_time()
        forward_backward(block, x, grad_out)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        mm_wall, mm_cpu = time.perf_counter(), time.process_time()
        for _ in range(20):
            a @ b
        mm_wall, mm_cpu = time.perf_counter() - mm_wall, time.process_time() - mm_cpu
        if round_:
            faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
            for key, value in (("wall", wall), ("cpu", cpu), ("mm_wall", mm_wall), ("mm_cpu", mm_cpu)):
                best[key] = min(best[key], value)
    mm_flops = 20 * 2 * 1024**3
    clear_grads(block, x)  # between steps: what the process holds when no step is running
    rss_between_steps = int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
    return {
        "keep": keep, "applied": applied, "wall_s": best["wall"], "cpu_s": best["cpu"],
        "fraction_wall": block_flops() / best["wall"] / (mm_flops / best["mm_wall"]),
        "fraction_cpu": block_flops() / best["cpu"] / (mm_flops / best["mm_cpu"]),
        "faults_per_round": faults // rounds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_between_steps_mib": rss_between_steps / 2**20,
    }


def summary(results: dict[str, list[dict]]) -> dict:
    """Best-of-processes numbers per subject and the keep/default ratios."""
    out = {}
    for subject, rows in results.items():
        out[subject] = {key: (min if key in ("wall_s", "cpu_s") else max)(r[key] for r in rows)
                        for key in ("wall_s", "cpu_s", "fraction_wall", "fraction_cpu",
                                    "peak_rss_mib", "rss_between_steps_mib")}
        out[subject]["faults_per_round"] = min(r["faults_per_round"] for r in rows)
    out["keep_faster_by_wall"] = out["default"]["wall_s"] / out["keep"]["wall_s"]
    out["keep_faster_by_cpu"] = out["default"]["cpu_s"] / out["keep"]["cpu_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3, help="processes per subject, alternating")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per process")
    parser.add_argument("--json", action="store_true", help="print only a JSON summary line")
    parser.add_argument("--worker", choices=["default", "keep"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker == "keep", args.threads, args.rounds)))
        return
    results: dict[str, list[dict]] = {"default": [], "keep": []}
    for _ in range(args.pairs):
        for subject in results:
            out = subprocess.run(
                [sys.executable, __file__, "--worker", subject, "--threads", str(args.threads),
                 "--rounds", str(args.rounds)],
                check=True, capture_output=True, text=True,
            ).stdout
            results[subject].append(json.loads(out.strip().splitlines()[-1]))
            row = results[subject][-1]
            if args.json:
                continue
            print(f"{subject:8s} wall {row['wall_s']:.3f} s ({row['fraction_wall']:.3f} of matmul) "
                  f"cpu {row['cpu_s']:.3f} s ({row['fraction_cpu']:.3f}) "
                  f"faults/round {row['faults_per_round']:7d}  peak RSS {row['peak_rss_mib']:.0f} MiB, "
                  f"between steps {row['rss_between_steps_mib']:.0f} MiB",
                  flush=True)
    if args.json:
        print(json.dumps(summary(results)))
        return
    print(f"{args.threads} thread(s), {args.pairs} alternating processes each, best of "
          f"{args.rounds} rounds per process")
    for key in ("wall_s", "cpu_s"):
        default = min(r[key] for r in results["default"])
        keep = min(r[key] for r in results["keep"])
        print(f"best {key}: default {default:.3f}  keep {keep:.3f}  keep faster by {default / keep:.3f}x")
    for key in ("fraction_wall", "fraction_cpu", "faults_per_round", "peak_rss_mib",
                "rss_between_steps_mib"):
        print(f"{key}: default " + " ".join(f"{r[key]:.3f}" for r in results["default"])
              + " | keep " + " ".join(f"{r[key]:.3f}" for r in results["keep"]))


if __name__ == "__main__":
    main()
