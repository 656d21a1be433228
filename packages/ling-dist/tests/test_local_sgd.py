"""DiLoCo in one process (no process group): the degenerate case equals the inner optimizer,
resuming from state_dict is bit-identical, the simulation the multi-process test trusts is
independent of worker order, and bad input is refused."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from ling_dist_testing import inner_step, make_inner, make_model, rank_batches, simulate_diloco
from torch import nn

from ling_dist import DiLoCo


def train(model: nn.Module, diloco: DiLoCo, batches) -> None:
    for x, y, n in batches:
        diloco.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        diloco.step(tokens=n)


def test_one_worker_sync_every_step_without_outer_momentum_is_the_inner_optimizer() -> None:
    """With H=1, outer lr 1 and momentum 0 the outer step sets anchor - (anchor - local) = local.
    That is exact in fp32 when anchor - local is exact, which Sterbenz's lemma guarantees while
    each local value stays within a factor 2 of its anchor; the parameters are moved to
    [0.5, 1.5] so that small AdamW steps never take one across zero, where rounding could
    differ by an ulp."""
    plain, wrapped = make_model(0), make_model(0)
    for model in (plain, wrapped):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.rand(p.shape, generator=torch.Generator().manual_seed(p.numel())) + 0.5)
    plain_inner = make_inner(plain)
    diloco = DiLoCo(wrapped, make_inner(wrapped), sync_every=1, outer_lr=1.0, outer_momentum=0.0)
    for x, y, n in rank_batches(0, 8, rows=3):
        inner_step(plain, plain_inner, x, y)
        train(wrapped, diloco, [(x, y, n)])
        for p, q in zip(plain.parameters(), wrapped.parameters()):
            assert torch.equal(p, q)
    assert diloco.syncs == 8
    assert diloco.bytes_communicated == 0  # no process group: nothing is sent


def test_state_dict_round_trip_mid_interval_resumes_identically() -> None:
    batches = rank_batches(0, 11, rows=3)
    reference = make_model(0)
    diloco = DiLoCo(reference, make_inner(reference), sync_every=3)
    train(reference, diloco, batches)

    first = make_model(0)
    interrupted = DiLoCo(first, make_inner(first), sync_every=3)
    train(first, interrupted, batches[:5])  # one sync done, two steps into the next interval
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "diloco": interrupted.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)

    resumed_model = make_model(seed=123)  # a different init: everything must come from the checkpoint
    resumed_model.load_state_dict(saved["model"])
    resumed = DiLoCo(resumed_model, make_inner(resumed_model), sync_every=3)
    resumed.load_state_dict(saved["diloco"])
    assert (resumed.inner_steps, resumed.steps_since_sync, resumed.tokens_since_sync) == (5, 2, 7)
    train(resumed_model, resumed, batches[5:])

    for p, q in zip(reference.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
    for a, b in zip(diloco.anchor, resumed.anchor):
        assert torch.equal(a, b)
    assert resumed.syncs == diloco.syncs == 3


def test_load_keeps_this_instances_outer_hyperparameters_and_restores_the_momentum() -> None:
    """A resumed run may change --outer-lr / --outer-momentum: the saved momentum buffers come
    back, the saved lr and momentum do not."""
    model = make_model(0)
    saved = DiLoCo(model, make_inner(model), sync_every=1, outer_lr=0.7, outer_momentum=0.9)
    train(model, saved, rank_batches(0, 2, rows=3))  # two syncs: a momentum buffer exists
    state = saved.state_dict()
    resumed = DiLoCo(model, make_inner(model), sync_every=1, outer_lr=0.3, outer_momentum=0.0)
    resumed.load_state_dict(state)
    group = resumed.outer_optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"]) == (0.3, 0.0, False)
    buffers = [resumed.outer_optimizer.state[a]["momentum_buffer"] for a in resumed.anchor]
    assert all(torch.equal(b, saved.outer_optimizer.state[a]["momentum_buffer"]) for a, b in zip(saved.anchor, buffers))


@settings(max_examples=15, deadline=None)
@given(rows=st.lists(st.integers(1, 6), min_size=2, max_size=4), data=st.data())
def test_weighted_average_is_independent_of_worker_order(rows: list[int], data: st.DataObject) -> None:
    """Relabelling the workers must not change the result: the weighted average is a sum, equal
    up to fp32 reassociation (a few ulp of values <~ 1, far below 1e-6)."""
    workers = [rank_batches(seed, 4, rows=r) for seed, r in enumerate(rows)]
    order = data.draw(st.permutations(range(len(workers))))
    kwargs = dict(sync_every=2, outer_lr=0.7, outer_momentum=0.9)
    straight = simulate_diloco(workers, **kwargs)
    permuted = simulate_diloco([workers[i] for i in order], **kwargs)
    for a, b in zip(straight, permuted):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_bad_arguments_are_refused() -> None:
    model = make_model(0)
    with pytest.raises(ValueError, match="sync_every=0"):
        DiLoCo(model, make_inner(model), sync_every=0)
    diloco = DiLoCo(model, make_inner(model), sync_every=2)
    with pytest.raises(ValueError, match="tokens=-1"):
        diloco.step(tokens=-1)
    with pytest.raises(TypeError):
        diloco.step(tokens=1.5)
    with pytest.raises(ValueError, match="sync_every=2, this run 3"):
        DiLoCo(model, make_inner(model), sync_every=3).load_state_dict(diloco.state_dict())
    wider = nn.Sequential(nn.Linear(4, 9), nn.Tanh(), nn.Linear(9, 1))
    with pytest.raises(ValueError, match=r"anchor\[0\] has shape \(8, 4\)"):
        DiLoCo(wider, make_inner(wider), sync_every=2).load_state_dict(diloco.state_dict())


def test_sync_without_tokens_is_refused() -> None:
    model = make_model(0)
    diloco = DiLoCo(model, make_inner(model), sync_every=2)
    diloco.step(tokens=0)
    with pytest.raises(RuntimeError, match="no rank processed any tokens"):
        diloco.step(tokens=0)


def test_frozen_parameters_are_left_alone() -> None:
    model = make_model(0)
    model[0].weight.requires_grad_(False)
    frozen = copy.deepcopy(model[0].weight)
    diloco = DiLoCo(model, make_inner(model), sync_every=1)
    train(model, diloco, rank_batches(0, 2, rows=3))
    assert len(diloco.anchor) == 3
    assert torch.equal(model[0].weight, frozen)


def test_explicit_sync_ends_on_the_anchor_and_is_idle_right_after_a_sync() -> None:
    model = make_model(0)
    diloco = DiLoCo(model, make_inner(model), sync_every=3)
    train(model, diloco, rank_batches(0, 4, rows=3))  # one sync, then one local step
    assert not all(torch.equal(p, a) for p, a in zip(model.parameters(), diloco.anchor))
    diloco.sync()
    assert diloco.syncs == 2 and diloco.steps_since_sync == 0
    after = [a.clone() for a in diloco.anchor]
    diloco.sync()
    assert diloco.syncs == 2
    for p, a, b in zip(model.parameters(), diloco.anchor, after):
        assert torch.equal(p, a) and torch.equal(a, b)
