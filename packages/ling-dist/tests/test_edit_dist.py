"""EDiT and A-EDiT with real processes over gloo on CPU."""

from __future__ import annotations

import pytest
import torch
from ling_dist_testing import spawn

pytestmark = pytest.mark.dist


def test_layerwise_sync_equals_whole_model_sync(tmp_path) -> None:
    """Same arithmetic, unit by unit: bitwise the same parameters after every sync (the
    buckets are the same in both modes, so even the all-reduce sums are the same)."""
    steps, sync_every = 6, 2
    results = spawn("edit_layerwise_vs_whole", 2, tmp_path, steps=steps, sync_every=sync_every)
    for rank, result in enumerate(results):
        layer_wise, whole = result[True], result[False]
        assert layer_wise["hooks"] == 5 and whole["hooks"] == 0
        assert len(layer_wise["after_sync"]) == steps // sync_every
        for synced_lw, synced_whole in zip(layer_wise["after_sync"], whole["after_sync"]):
            for p, q in zip(synced_lw, synced_whole):
                assert torch.equal(p, q)
        for a, b in zip(layer_wise["anchor"], whole["anchor"]):
            assert torch.equal(a, b)
        assert layer_wise["bytes"] == whole["bytes"]
        stats = layer_wise["stats"][-1]
        assert stats.tokens == [5, 7] and stats.steps == [2, 2] and stats.excluded == []
        assert sum(stats.weights) == pytest.approx(1.0)
        # weights = tokens x softmax(-norm): the rank that moved less gets more than its token share
        token_share = [t / sum(stats.tokens) for t in stats.tokens]
        smaller = min(range(2), key=lambda r: stats.norms[r])
        assert stats.weights[smaller] > token_share[smaller]
    for p, q in zip(results[0][True]["after_sync"][-1], results[1][True]["after_sync"][-1]):
        assert torch.equal(p, q)


def test_outlier_worker_is_dropped_and_the_others_are_averaged(tmp_path) -> None:
    results = spawn("edit_with_outlier", 3, tmp_path, warmup_syncs=4, outlier_rank=2, scale=50.0)
    for result in results:
        assert result["excluded_during_warmup"] == []
        stats = result["stats"]
        assert stats.excluded == [2]
        assert stats.weights == [0.5, 0.5, 0.0]
        assert stats.norms[2] > 20 * max(stats.norms[:2])
        # anchor - (anchor - mean(p0, p1)) = mean(p0, p1), up to fp32 rounding of values ~0.5
        # (two subtractions and a halving: a few ulp, far below 1e-6).
        expected = [(p0 + p1) / 2 for p0, p1 in zip(results[0]["before"], results[1]["before"])]
        for got, want in zip(result["after"], expected):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_aedit_with_a_straggler_progresses_everywhere_and_the_fast_rank_does_more(tmp_path) -> None:
    results = spawn("aedit_with_straggler", 2, tmp_path, slow_rank=1, step_seconds=0.03, sync_seconds=0.3,
                    global_steps=90)
    fast, slow = results
    assert len(fast["reports"]) == len(slow["reports"]) >= 3
    for report in fast["reports"]:
        assert not report.skipped and min(report.steps) >= 1  # every rank contributes to every sync
    assert fast["inner_steps"] >= 1.5 * slow["inner_steps"]
    # more steps, more tokens: the fast rank's pseudo-gradients count more in the average
    assert sum(r.weights[0] for r in fast["reports"]) > 1.2 * sum(r.weights[1] for r in fast["reports"])
    for result in results:
        first, last = sum(result["losses"][:5]) / 5, sum(result["losses"][-5:]) / 5
        assert last < 0.7 * first
    for p, q in zip(fast["params"], slow["params"]):
        assert torch.equal(p, q)


def test_edit_across_fsdp2_groups_equals_unsharded_workers(tmp_path) -> None:
    """Sharding inside a group changes where the numbers live, not the method. Tolerance: FSDP2
    averages the two ranks' gradients by reduce-scatter, the unsharded run takes the gradient of
    the concatenated batch: the sums differ in order (~1e-7 relative), AdamW steps of 1e-2
    and two outer steps keep that far below 1e-5, while a worker's missing shard or a wrong
    group weight moves parameters by ~1e-3."""
    results = spawn("edit_inside_fsdp2_groups", 4, tmp_path, steps=4, sync_every=2)
    for result in results:
        sharded, unsharded = result[True], result[False]
        assert sharded["stats"].tokens == unsharded["stats"].tokens == [18, 18]  # 2 ranks x (4 + 5 rows)
        assert sharded["stats"].norms == pytest.approx(unsharded["stats"].norms, rel=1e-4)
        for p, q in zip(sharded["params"], unsharded["params"]):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-5)
    for p, q in zip(results[0][True]["params"], results[3][True]["params"]):
        assert torch.equal(p, q)
    # Each rank broadcasts and exchanges its own shards only (dim 0 split in two; the last
    # layer's single row goes to one rank), plus the 16-byte shard-group sum per sync.
    numel, syncs = sum(p.numel() for p in results[0][False]["params"]), 2
    assert results[0][True]["local_numel"] + results[1][True]["local_numel"] == numel
    for result in results:
        local = result[True]["local_numel"]
        assert local < numel
        assert result[True]["bytes"] == local * 4 + syncs * (16 + 24 + local * 4)
        assert result[False]["bytes"] == numel * 4 + syncs * (24 + numel * 4)
