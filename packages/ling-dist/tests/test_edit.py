"""EDiT / A-EDiT in one process: the penalty's arithmetic, the wall-time policy on a fake
clock, layer-wise == whole-model with parameters outside every unit, resume, bad input."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from ling_dist_testing import make_deep_model, make_inner, rank_batches
from torch import nn

from ling_dist import AEDiT, EDiT, EveryTSeconds, PseudoGradientPenalty

norms_st = st.floats(0.0, 50.0, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(1, 500), st.integers(1, 20), norms_st), min_size=1, max_size=6),
       temperature=st.one_of(st.none(), st.floats(0.05, 10.0)), clip=st.one_of(st.none(), st.floats(0.1, 20.0)),
       data=st.data())
def test_penalty_weights_are_a_distribution_independent_of_worker_order(rows, temperature, clip, data) -> None:
    """Before warm-up nothing is excluded: the weights are non-negative, sum to 1 (fp64, 1e-12),
    follow the workers when they are relabelled, and the clipped bound never exceeds clip_norm."""
    tokens, steps, norms = (list(column) for column in zip(*rows))
    penalty = PseudoGradientPenalty(temperature=temperature, clip_norm=clip)
    result = penalty.weigh(tokens, steps, norms)
    assert result.excluded == [] and min(result.weights) >= 0
    assert sum(result.weights) == pytest.approx(1.0, abs=1e-12)
    if clip is not None:
        assert result.scale * sum(w * n for w, n in zip(result.weights, norms)) <= clip * (1 + 1e-12)
    order = data.draw(st.permutations(range(len(rows))))
    permuted = PseudoGradientPenalty(temperature=temperature, clip_norm=clip).weigh(
        [tokens[i] for i in order], [steps[i] for i in order], [norms[i] for i in order])
    for position, i in enumerate(order):
        assert permuted.weights[position] == pytest.approx(result.weights[i], rel=1e-12, abs=1e-300)
    assert permuted.scale == pytest.approx(result.scale, rel=1e-12)


@settings(max_examples=30, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(1, 500), norms_st), min_size=2, max_size=5),
       temperature=st.floats(0.1, 10.0))
def test_weights_are_tokens_times_softmax_of_negative_norms(rows, temperature) -> None:
    """The spec restated directly: w_i = t_i exp(-n_i/T) / sum_j t_j exp(-n_j/T)."""
    tokens, norms = [t for t, _ in rows], [n for _, n in rows]
    result = PseudoGradientPenalty(temperature=temperature, clip_norm=None).weigh(tokens, [1] * len(rows), norms)
    raw = [t * math.exp(-n / temperature) for t, n in zip(tokens, norms)]
    if sum(raw) > 1e-250:  # the direct form underflows where the implementation (shifted by min) does not
        for got, r in zip(result.weights, raw):
            assert got == pytest.approx(r / sum(raw), rel=1e-9, abs=1e-300)


def test_step_weight_blends_in_each_workers_share_of_steps() -> None:
    result = PseudoGradientPenalty(temperature=None, step_weight=0.5).weigh([30, 10], [3, 1], [1.0, 1.0])
    assert result.weights == pytest.approx([0.5 * 0.75 + 0.5 * 0.75, 0.5 * 0.25 + 0.5 * 0.25])
    equal_steps = PseudoGradientPenalty(temperature=None, step_weight=0.5).weigh([30, 10], [2, 2], [1.0, 1.0])
    assert equal_steps.weights == pytest.approx([0.5 * 0.75 + 0.25, 0.5 * 0.25 + 0.25])


def test_anomaly_elimination_after_warmup() -> None:
    penalty = PseudoGradientPenalty(ewma_alpha=0.1, warmup_syncs=5, temperature=None)
    generator = torch.Generator().manual_seed(0)
    for _ in range(8):
        noise = (torch.rand(3, generator=generator) * 0.2).tolist()
        assert penalty.weigh([1, 1, 1], [1, 1, 1], [1.0 + x for x in noise]).excluded == []
    expected_z = [penalty.trackers[r].z_score(n, 0.1) for r, n in enumerate([1.1, 9.0, 0.2])]
    spike = penalty.weigh([1, 1, 1], [1, 1, 1], [1.1, 9.0, 0.2])  # a spike is dropped, a dip is not
    assert spike.excluded == [1] and spike.weights == [0.5, 0.0, 0.5]
    # the statistic the decision used, before the trackers saw this sync: exposed for anomaly logging
    assert spike.z_scores == expected_z and spike.z_scores[1] > penalty.z_threshold > spike.z_scores[0]
    count = penalty.trackers[1].count
    penalty.weigh([1, 1, 1], [1, 1, 1], [1.0, 9.0, 1.0])
    assert penalty.trackers[1].count == count  # outliers do not teach the tracker that spikes are normal
    assert penalty.weigh([1, 1, 1], [1, 1, 1], [9.0, 9.0, 9.0]).weights == [0.0, 0.0, 0.0]


def test_non_finite_norm_is_excluded_even_during_warmup() -> None:
    penalty = PseudoGradientPenalty()
    result = penalty.weigh([4, 4], [1, 1], [float("nan"), 1.0])
    assert result.excluded == [0] and result.weights == [0.0, 1.0] and result.z_scores == [math.inf, 0.0]
    assert penalty.weigh([4, 4], [1, 1], [1.0, float("inf")]).excluded == [1]


def test_norm_tracker_matches_the_exponentially_weighted_moments() -> None:
    """EWMA mean with the first value as start; variance sum (1-a)^k a (x - mean)^2 style
    recursion; after many updates on i.i.d. draws the corrected std approaches the true one."""
    penalty = PseudoGradientPenalty(ewma_alpha=0.05)
    values = torch.randn(2000, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.5 + 3.0
    for v in values.tolist():
        penalty.weigh([1], [1], [v])
    tracker = penalty.trackers[0]
    assert tracker.mean == pytest.approx(3.0, abs=0.15)
    assert math.sqrt(tracker.variance) == pytest.approx(0.5, rel=0.25)


class WithRootParameter(nn.Module):
    """A unit list that leaves a parameter at the root (a learned output scale)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = make_deep_model(0)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * self.scale


def train(model, edit, batches) -> None:
    for x, y, n in batches:
        edit.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        edit.step(tokens=n)


def test_layerwise_equals_whole_model_with_parameters_outside_every_unit() -> None:
    models = [WithRootParameter(), WithRootParameter()]
    edits = [EDiT(m, make_inner(m), sync_every=2, units=list(m.body), layer_wise=lw)
             for m, lw in zip(models, (True, False))]
    assert len(edits[0].units) == 6  # the root parameter's unit, then five Linear layers
    batches = rank_batches(0, 7, rows=3)
    for step, batch in enumerate(batches):
        for model, edit in zip(models, edits):
            train(model, edit, [batch])
        if step % 2 == 1:
            assert edits[0]._pending is not None and edits[1]._pending is None
    with torch.no_grad():
        models[0](batches[0][0])  # the forward completes the pending layer-wise exchange
    assert edits[0]._pending is None
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(p, q)


def test_state_dict_with_an_exchange_pending_resumes_identically() -> None:
    batches = rank_batches(0, 9, rows=3)
    penalty = dict(warmup_syncs=2, ewma_alpha=0.5)
    reference = make_deep_model(0)
    edit = EDiT(reference, make_inner(reference), sync_every=2, penalty=PseudoGradientPenalty(**penalty))
    train(reference, edit, batches)

    first = make_deep_model(0)
    interrupted = EDiT(first, make_inner(first), sync_every=2, penalty=PseudoGradientPenalty(**penalty))
    train(first, interrupted, batches[:6])  # the third sync is pending (layer-wise, no forward yet)
    assert interrupted._pending is not None
    buffer = io.BytesIO()
    saved_edit = interrupted.state_dict()  # completes the exchange before saving
    torch.save({"model": first.state_dict(), "edit": saved_edit}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    assert len(saved["edit"]["weighting"]["trackers"]) == 1 and saved["edit"]["weighting"]["trackers"][0][2] == 3

    resumed_model = make_deep_model(seed=123)
    resumed_model.load_state_dict(saved["model"])
    resumed = EDiT(resumed_model, make_inner(resumed_model), sync_every=2, penalty=PseudoGradientPenalty(**penalty))
    resumed.load_state_dict(saved["edit"])
    train(resumed_model, resumed, batches[6:])
    edit.finish_sync()
    resumed.finish_sync()
    for p, q in zip(reference.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
    assert resumed.syncs == edit.syncs == 4


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_wall_time_policy_syncs_when_the_deadline_passes_and_skips_short_intervals() -> None:
    clock = FakeClock()
    model = make_deep_model(0)
    edit = EDiT(model, make_inner(model), policy=EveryTSeconds(10.0, min_total_steps=3, clock=clock))
    batches = rank_batches(0, 8, rows=2)
    train(model, edit, batches[:2])
    assert edit.sync_points == 0
    clock.now = 10.0
    train(model, edit, batches[2:3])  # due: 3 steps in total, enough
    edit.finish_sync()
    assert (edit.sync_points, edit.syncs, edit.global_inner_steps) == (1, 1, 3)
    assert edit.last_sync.steps == [3] and not edit.last_sync.skipped
    clock.now = 15.0
    train(model, edit, batches[3:4])
    assert edit.sync_points == 1  # the deadline restarted at the sync: 20 s
    clock.now = 20.0
    train(model, edit, batches[4:5])  # due, but only 2 steps: skipped, progress kept
    assert (edit.sync_points, edit.syncs, edit.steps_since_sync) == (2, 1, 2) and edit.last_sync.skipped
    assert edit._pending is None
    clock.now = 30.0
    train(model, edit, batches[5:6])
    edit.finish_sync()
    assert (edit.sync_points, edit.syncs, edit.global_inner_steps, edit.steps_since_sync) == (3, 2, 6, 0)


def test_bad_arguments_are_refused() -> None:
    model = make_deep_model(0)
    with pytest.raises(ValueError, match="exactly one of sync_every"):
        EDiT(model, make_inner(model))
    with pytest.raises(ValueError, match="sync_seconds=0"):
        AEDiT(model, make_inner(model), sync_seconds=0)
    with pytest.raises(ValueError, match="min_total_steps=0"):
        AEDiT(model, make_inner(model), sync_seconds=1, min_total_steps=0)
    for kwargs, message in [(dict(ewma_alpha=0.0), "ewma_alpha=0.0"), (dict(warmup_syncs=1), "warmup_syncs=1"),
                            (dict(temperature=0.0), "temperature=0.0"), (dict(clip_norm=-1.0), "clip_norm=-1.0"),
                            (dict(step_weight=1.5), "step_weight=1.5"), (dict(z_threshold=0), "z_threshold=0")]:
        with pytest.raises(ValueError, match=message):
            PseudoGradientPenalty(**kwargs)
    stepwise = EDiT(model, make_inner(model), sync_every=2)
    timed = AEDiT(model, make_inner(model), sync_seconds=5)
    with pytest.raises(ValueError, match="written with a step schedule"):
        timed.load_state_dict(stepwise.state_dict())
    with pytest.raises(ValueError, match="sync_every=None"):
        stepwise.load_state_dict(timed.state_dict())
    with pytest.raises(ValueError, match="penalty state tracks 1 workers, this sync has 2"):
        penalty = PseudoGradientPenalty()
        penalty.weigh([1], [1], [1.0])
        penalty.weigh([1, 1], [1, 1], [1.0, 1.0])


def test_remove_hooks_detaches_layerwise_sync() -> None:
    model = make_deep_model(0)
    edit = EDiT(model, make_inner(model), sync_every=1)
    train(model, edit, rank_batches(0, 1, rows=2))
    assert edit._pending is not None
    edit.remove_hooks()
    assert edit._pending is None and edit._hooks == []


def test_each_unit_is_synced_before_its_forward_with_the_next_one_already_in_flight() -> None:
    """Observed from a second pre-hook on every unit (runs after EDiT's): when unit k computes,
    its exchange is done, unit k+1's is launched (prefetch) and nothing later has started."""
    model = make_deep_model(0)
    edit = EDiT(model, make_inner(model), sync_every=1)
    units = [m for m in model if isinstance(m, nn.Linear)]
    seen = []
    for k, unit in enumerate(units):
        unit.register_forward_pre_hook(lambda module, args, k=k: seen.append(
            (k, k in edit._done, edit._next_launch, all(torch.equal(p, a) for p, a in
                                                         zip(module.parameters(), unit_anchor(edit, module))))))
    train(model, edit, rank_batches(0, 1, rows=2))  # the sync starts; unit 0 launched
    assert edit._next_launch == 1 and not edit._done
    seen.clear()  # drop the training forward's observations (no sync was pending then)
    with torch.no_grad():
        model(torch.randn(3, 4))
    assert seen == [(k, True, min(k + 2, len(units)), True) for k in range(len(units))]


def unit_anchor(edit: EDiT, module: nn.Module) -> list[torch.Tensor]:
    ids = [id(p) for p in module.parameters()]
    return [a for p, a in zip(edit.params, edit.anchor) if id(p) in ids]
