"""MinHash + LSH near-duplicate detection: ling_data's numpy MinHash against datasketch.

Both see the same documents and the same shingle sets (ling_data.dedup.shingles: 8-byte
windows of the case-folded, whitespace-collapsed text) and the same rule: a pair is reported
when LSH makes it a candidate and the two signatures agree on >= threshold of positions.
Ground truth is the exact Jaccard similarity of the shingle sets of every pair (a sparse
document x shingle matrix times its transpose). Documents: the embedded stdlib corpus plus,
for 300 seeded picks, copies with a random fraction (0-25%) of words replaced, so true
similarities spread across the threshold.

Run as a script for the table in packages/ling-data/README.md:
    uv run python benchmarks/minhash_quality.py
"""

from __future__ import annotations

import random
import time

import numpy as np

from ling_data import embedded_corpus
from ling_data.dedup import MinHasher, NearDuplicateIndex, shingles

THRESHOLD, NUM_PERM = 0.8, 128


def documents(variants: int = 300, seed: int = 0) -> list[str]:
    corpus = embedded_corpus()
    rng = random.Random(seed)
    out = list(corpus)
    for text in rng.sample(corpus, variants):
        words = text.split(" ")
        rate = rng.uniform(0.0, 0.25)
        out.append(" ".join(f"edit{rng.randrange(10**6)}" if rng.random() < rate else w for w in words))
    return out


def true_pairs(shingle_sets: list[np.ndarray], threshold: float) -> set[tuple[int, int]]:
    from scipy import sparse

    vocabulary, inverse = np.unique(np.concatenate(shingle_sets), return_inverse=True)
    rows = np.repeat(np.arange(len(shingle_sets)), [len(s) for s in shingle_sets])
    matrix = sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, inverse)),
                               shape=(len(shingle_sets), len(vocabulary)))
    intersection = (matrix @ matrix.T).tocoo()
    sizes = np.array([len(s) for s in shingle_sets])
    pairs = set()
    for i, j, shared in zip(intersection.row, intersection.col, intersection.data):
        if i < j and shared / (sizes[i] + sizes[j] - shared) >= threshold:
            pairs.add((int(i), int(j)))
    return pairs


def ours(shingle_sets: list[np.ndarray]) -> tuple[set[tuple[int, int]], float]:
    start = time.perf_counter()
    hasher, index = MinHasher(NUM_PERM), NearDuplicateIndex(THRESHOLD, NUM_PERM)
    pairs = set()
    for i, packed in enumerate(shingle_sets):
        signature = hasher.signature_of_shingles(packed)
        pairs.update((j, i) for j in index.matches(signature))
        index.add(signature)
    return pairs, time.perf_counter() - start


def datasketch_pairs(shingle_sets: list[np.ndarray]) -> tuple[set[tuple[int, int]], float]:
    from datasketch import MinHash, MinHashLSH

    start = time.perf_counter()
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
    sketches = []
    pairs = set()
    for i, packed in enumerate(shingle_sets):
        sketch = MinHash(num_perm=NUM_PERM)
        sketch.update_batch([value.tobytes() for value in packed])
        for j in lsh.query(sketch):
            if sketch.jaccard(sketches[j]) >= THRESHOLD:
                pairs.add((j, i))
        lsh.insert(i, sketch)
        sketches.append(sketch)
    return pairs, time.perf_counter() - start


def score(found: set, truth: set) -> dict[str, float]:
    hits = len(found & truth)
    return {"recall": hits / max(len(truth), 1), "precision": hits / max(len(found), 1),
            "pairs_found": len(found)}


def compare() -> dict[str, dict]:
    texts = documents()
    shingle_sets = [shingles(text) for text in texts]
    truth = true_pairs(shingle_sets, THRESHOLD)
    result = {"documents": len(texts), "true_pairs": len(truth)}
    for name, method in (("ling_data", ours), ("datasketch", datasketch_pairs)):
        found, seconds = method(shingle_sets)
        result[name] = {**score(found, truth), "seconds": seconds, "docs_per_s": len(texts) / seconds}
    return result


if __name__ == "__main__":
    outcome = compare()
    print(f"{outcome['documents']} documents, {outcome['true_pairs']} pairs with Jaccard >= {THRESHOLD}")
    for name in ("ling_data", "datasketch"):
        r = outcome[name]
        print(f"{name:11s} recall {r['recall']:.3f} precision {r['precision']:.3f} "
              f"({r['pairs_found']} pairs) {r['docs_per_s']:.0f} docs/s")
