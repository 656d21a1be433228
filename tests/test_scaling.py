"""Scaling fits: they recover known exponents from synthetic data, and their intervals mean it."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ling_train.plan.cli import main
from ling_train.scaling import FitError, Run, fit_power_law, fit_scaling, load_runs


@settings(max_examples=30, deadline=None)
@given(coefficient=st.floats(1e-3, 1e3), exponent=st.floats(-1.0, 1.0), seed=st.integers(0, 2**31))
def test_exact_power_law_is_recovered(coefficient, exponent, seed):
    x = np.geomspace(1e15, 1e20, 6)
    law = fit_power_law(x, coefficient * x ** exponent)
    assert law.exponent == pytest.approx(exponent, abs=1e-9)
    assert law.coefficient == pytest.approx(coefficient, rel=1e-6)


def test_confidence_interval_covers_the_truth_about_95_percent():
    # Log-normal noise: the t-based 95% interval should cover the true exponent ~95% of the time.
    rng = np.random.default_rng(0)
    x = np.geomspace(1e16, 1e20, 8)
    trials, covered = 400, 0
    for _ in range(trials):
        y = 0.3 * x ** -0.125 * np.exp(rng.normal(0, 0.1, x.size))
        lo, hi = fit_power_law(x, y).exponent_ci
        covered += lo <= -0.125 <= hi
    assert 0.91 <= covered / trials <= 0.99  # binomial sd at 400 trials is ~1.1%


def synthetic_runs(rng, lr_exponent=-0.25, batch_exponent=0.3, budgets=5):
    """A grid over lr x batch per budget whose loss is a bowl centred on the true optimum."""
    runs = []
    for i in range(budgets):
        compute = 1e16 * 4 ** i
        lr_opt, batch_opt = 0.5 * compute ** lr_exponent, 2e-2 * compute ** batch_exponent
        for lr in lr_opt * np.geomspace(1 / 8, 8, 13):
            for batch in batch_opt * np.geomspace(1 / 8, 8, 13):
                loss = (3 * compute ** -0.05 + 0.05 * np.log(lr / lr_opt) ** 2 + 0.03 * np.log(batch / batch_opt) ** 2
                        + rng.normal(0, 1e-4))
                runs.append(Run(compute, float(lr), float(batch), float(loss)))
    return runs


def test_optimal_lr_and_batch_exponents_are_recovered():
    runs = synthetic_runs(np.random.default_rng(1))
    fit = fit_scaling(runs, resamples=200)
    assert fit.lr.exponent == pytest.approx(-0.25, abs=0.03)
    assert fit.batch_tokens.exponent == pytest.approx(0.3, abs=0.03)
    assert fit.lr.exponent_ci[0] <= -0.25 <= fit.lr.exponent_ci[1]
    assert fit.loss.exponent == pytest.approx(-0.05, abs=0.005)
    suggestion = fit.suggest(1e19)
    assert suggestion["lr"] == pytest.approx(0.5 * 1e19 ** -0.25, rel=0.3)


def test_too_few_budgets_is_an_error():
    with pytest.raises(FitError, match=">= 3 compute budgets"):
        fit_scaling([Run(1e15, 1e-3, 1024, 3.0), Run(2e15, 1e-3, 1024, 2.9)])


def test_runs_file_errors_name_the_line(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_text(json.dumps({"compute": 1, "lr": 1, "batch_tokens": 1, "loss": 1}) + "\n{\"compute\": 1}\n")
    with pytest.raises(FitError, match=r"runs.jsonl:2: expected numbers"):
        load_runs(path)


def test_fit_cli_suggests_flags_and_plots(tmp_path, capsys):
    path = tmp_path / "runs.jsonl"
    runs = synthetic_runs(np.random.default_rng(2), budgets=3)
    path.write_text("".join(json.dumps(vars(r)) + "\n" for r in runs))
    assert main(["fit", str(path), "--budget", "1e18", "--resamples", "50", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "suggested flags: --lr " in out and "--batch-size " in out
    assert (tmp_path / "fit.png").stat().st_size > 10_000
    assert main(["fit", str(tmp_path / "missing.jsonl")]) == 2
