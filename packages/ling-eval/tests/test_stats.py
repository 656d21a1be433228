import numpy as np
from hypothesis import given, settings, strategies as st

from ling_eval.stats import bootstrap_interval, mcnemar_exact, paired_comparison


@settings(max_examples=20, deadline=None)
@given(st.lists(st.booleans(), min_size=2, max_size=200), st.integers(0, 10))
def test_interval_brackets_the_mean_and_is_reproducible(correct, seed):
    num = np.array(correct, dtype=float)
    interval = bootstrap_interval(num, np.ones_like(num), seed=seed)
    assert interval.value == num.mean()
    assert 0 <= interval.low <= interval.value <= interval.high <= 1
    assert interval == bootstrap_interval(num, np.ones_like(num), seed=seed)


def test_interval_shrinks_with_more_items():
    rng = np.random.default_rng(0)
    widths = []
    for n in (100, 10_000):
        num = (rng.random(n) < 0.6).astype(float)
        i = bootstrap_interval(num, np.ones(n))
        widths.append(i.high - i.low)
    # Binomial standard error 0.049 at n=100 and 0.0049 at n=10000: a 1.96*2*se wide interval.
    assert abs(widths[0] - 0.19) < 0.04 and abs(widths[1] - 0.019) < 0.004


def test_ratio_metric_and_exp_transform():
    num, den = np.array([2.0, 4.0]), np.array([1.0, 3.0])
    assert bootstrap_interval(num, den).value == 1.5
    assert np.isclose(bootstrap_interval(num, den, "exp").value, np.exp(1.5))


def test_mcnemar_exact_known_values():
    a = np.array([True] * 10 + [False] * 0 + [True] * 5)
    b = np.array([False] * 10 + [True] * 5)
    # 10 discordant pairs all one way: p = 2 * 0.5**10
    assert np.isclose(mcnemar_exact(a, b), 2 * 0.5**10)
    assert mcnemar_exact(a, a) == 1.0
    # 3 vs 5 discordant: two-sided p = 2 * P(X <= 3), X ~ Bin(8, 0.5) = 2 * 93/256
    a = np.array([True] * 3 + [False] * 5)
    assert np.isclose(mcnemar_exact(a, ~a), 2 * 93 / 256)


def test_paired_comparison_tells_real_differences_from_noise():
    rng = np.random.default_rng(1)
    n = 400
    a = (rng.random(n) < 0.5).astype(float)
    same = paired_comparison("acc", a, np.ones(n), a, np.ones(n))
    assert not same.significant and same.p_value == 1.0 and same.test == "mcnemar"
    better = np.where(rng.random(n) < 0.3, 1.0, a)  # flips ~15% of items to correct
    real = paired_comparison("acc", a, np.ones(n), better, np.ones(n))
    assert real.significant and real.difference.low > 0 and "a real difference" in real.summary()
    noisy = np.where(rng.random(n) < 0.02, 1 - a, a)  # a handful of flips both ways
    assert not paired_comparison("acc", a, np.ones(n), noisy, np.ones(n)).significant
    # non-binary metric: paired bootstrap on a ratio
    bits_a, bytes_ = rng.random(n) * 10, np.full(n, 10.0)
    cmp = paired_comparison("bits_per_byte", bits_a, bytes_, bits_a * 0.9, bytes_)
    assert cmp.test == "paired_bootstrap" and cmp.significant and cmp.difference.high < 0
