"""Quality filters, normalisation, and MinHash/LSH against exact Jaccard."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ling_data import DataError
from ling_data.dedup import Deduplicator, MinHasher, NearDuplicateIndex, _splitmix64, optimal_bands, shingles
from ling_data.filters import FilterConfig, failed_filter, normalize

PROSE = ("The quick brown fox jumps over the lazy dog while a careful reader checks every "
         "sentence of this small paragraph for errors, omissions and repeated words. ") * 1


def test_normalization_forms() -> None:
    assert normalize("e\u0301", "NFC") == "\u00e9"
    assert normalize("\uff46\uff55\uff4c\uff4c", "NFKC") == "full"
    assert normalize("\uff46", "none") == "\uff46"


@pytest.mark.parametrize("text, reason", [
    ("short", "min_chars"),
    ("#$%& " * 30 + PROSE[:60], "max_symbol_ratio"),
    ("1234 5678 9012 " * 10 + PROSE[:80], "max_digit_ratio"),
    ("same line here\n" * 10 + PROSE, "max_duplicate_line_fraction"),
    ("buy now " * 40 + PROSE, "max_top_ngram_fraction:2"),
])
def test_each_filter_fires_on_its_pattern(text: str, reason: str) -> None:
    assert failed_filter(PROSE, FilterConfig()) is None
    assert failed_filter(text, FilterConfig()) == reason


def test_filters_are_configurable_and_unknown_keys_are_errors() -> None:
    relaxed = FilterConfig.from_dict({"min_chars": 3, "min_words": False}, "f.toml")
    assert failed_filter("short", relaxed) is None
    with pytest.raises(DataError, match="f.toml: unknown filter 'min_char'"):
        FilterConfig.from_dict({"min_char": 3}, "f.toml")
    config = FilterConfig.from_dict({"max_top_ngram_fraction": {"2": 0.9}}, "f.toml")
    assert config.max_top_ngram_fraction == {2: 0.9}


def jaccard(a: str, b: str) -> float:
    sa, sb = set(shingles(a).tolist()), set(shingles(b).tolist())
    return len(sa & sb) / len(sa | sb)


@settings(deadline=None, max_examples=30)
@given(seed=st.integers(0, 2**32 - 1), keep=st.floats(0.3, 1.0))
def test_minhash_agreement_estimates_jaccard(seed: int, keep: float) -> None:
    rng = random.Random(seed)
    words = [f"w{rng.randrange(5000)}" for _ in range(400)]
    other = [w if rng.random() < keep else f"x{rng.randrange(5000)}" for w in words]
    a, b = " ".join(words), " ".join(other)
    hasher = MinHasher(num_perm=256)
    estimate = float(np.mean(hasher.signature(a) == hasher.signature(b)))
    # The estimate is a mean of 256 Bernoulli(J) draws: 4 standard deviations <= 4 * 0.5/16.
    assert abs(estimate - jaccard(a, b)) <= 0.125


def test_signature_is_deterministic_and_blocked_path_matches() -> None:
    text = PROSE * 300  # more shingles than one block
    one, two = MinHasher(seed=3), MinHasher(seed=3)
    assert np.array_equal(one.signature(text), two.signature(text))
    # The reference: Python ints, one hash function at a time, over the distinct shingles.
    mixed = _splitmix64(shingles(text)).tolist()
    a, b = one._a[:4].tolist(), one._b[:4].tolist()
    expected = [min(((ai * x + bi) % 2**64) >> 32 for x in mixed) for ai, bi in zip(a, b)]
    assert one.signature(text)[:4].tolist() == expected


def test_optimal_bands_fit_the_signature() -> None:
    bands, rows = optimal_bands(0.8, 128)
    # The same choice as datasketch (9 bands of 13 rows): sharp around the threshold.
    assert bands * rows <= 128 and 1 - (1 - 0.9**rows) ** bands > 0.9 and 1 - (1 - 0.5**rows) ** bands < 0.01


def test_deduplicator_drops_exact_and_near_duplicates_keeps_distinct() -> None:
    rng = random.Random(0)
    base = " ".join(f"w{rng.randrange(10_000)}" for _ in range(300))
    near = base.replace(base.split()[5], "changed", 1)
    distinct = " ".join(f"w{rng.randrange(10_000)}" for _ in range(300))
    dedup = Deduplicator(near_threshold=0.8)
    assert [dedup.verdict(t) for t in (base, base, near, distinct)] == [None, "exact_duplicate", "near_duplicate", None]
    assert jaccard(base, near) > 0.9 and jaccard(base, distinct) < 0.2
    index = NearDuplicateIndex(0.8)
    with pytest.raises(ValueError):
        NearDuplicateIndex(0.0)
    assert index.find(MinHasher().signature(base)) is None
