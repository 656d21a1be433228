"""Near-duplicate questions: word-shingle Jaccard similarity at a threshold, found exactly.

Templated questions that differ only in an entity ("... bordering Libya?" / "... bordering
Nepal?") look alike but ask different things, so two questions count as duplicates only when
they also share a key (the pipeline uses the answer): that catches the same question asked
twice, e.g. "Which has more people, France or Germany?" and "... Germany or France?".

Questions are short (5-20 words) and number in the thousands, so an exact similarity join is
cheap: prefix filtering (Chaudhuri et al. 2006; Bayardo et al. 2007) only compares pairs that
share a rare shingle in their prefixes, and no pair at or above the threshold is missed, unlike
MinHash-LSH, which trades recall for speed on long documents.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict

_WORD = re.compile(r"\w+")


def shingles(text: str, n: int = 3) -> frozenset[tuple[str, ...]]:
    """Word n-grams of the casefolded text, punctuation dropped (the whole text if shorter)."""
    words = _WORD.findall(text.casefold())
    if len(words) <= n:
        return frozenset([tuple(words)])
    return frozenset(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def near_duplicates(
    texts: list[str], threshold: float, n: int = 1, keys: list[str] | None = None
) -> list[int | None]:
    """For each text, the index of an earlier kept text it nearly duplicates, or None if kept.

    With `keys`, only texts with equal keys can be duplicates of each other.

    Greedy in input order: a text is compared with the texts kept before it, so the output
    depends only on the order of `texts` and is deterministic.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if keys is not None and len(keys) != len(texts):
        raise ValueError(f"{len(keys)} keys for {len(texts)} texts")
    sets = [shingles(text, n) for text in texts]
    frequency = Counter(shingle for s in sets for shingle in s)
    index: dict[tuple[str, ...], list[int]] = defaultdict(list)
    duplicate_of: list[int | None] = []
    for i, s in enumerate(sets):
        # Rarest shingles first: two sets with Jaccard >= t share one of their first
        # |s| - ceil(t |s|) + 1 shingles in this global order.
        ordered = sorted(s, key=lambda shingle: (frequency[shingle], shingle))
        prefix = ordered[: len(ordered) - math.ceil(threshold * len(ordered) - 1e-9) + 1]
        candidates = sorted({j for shingle in prefix for j in index[shingle]})
        match = next(
            (
                j
                for j in candidates
                if (keys is None or keys[i] == keys[j]) and jaccard(s, sets[j]) >= threshold
            ),
            None,
        )
        duplicate_of.append(match)
        if match is None:
            for shingle in prefix:
                index[shingle].append(i)
    return duplicate_of
