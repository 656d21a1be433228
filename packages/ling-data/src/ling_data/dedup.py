"""Exact and near-duplicate detection: content hashes, and MinHash + LSH banding.

Near-duplicates are judged on byte shingles: the text is case-folded, runs of whitespace become
one space, and every ``shingle_bytes``-byte window of its UTF-8 (up to 8, packed exactly into
a uint64) is a shingle. The MinHash of a document is, for each of ``num_perm`` hash functions
``h_i(x) = (a_i * mix(x) + b_i) mod 2^64 >> 32`` (multiply-shift, Dietzfelbinger et al. 1997;
``mix`` is the splitmix64 finaliser), the minimum over its shingles, all computed with numpy in
one pass. LSH splits the signature into ``bands`` of ``rows`` and indexes each band; a document
that shares a band with a kept one *and* whose signatures agree on at least ``threshold`` of
positions is a near-duplicate. ``bands``/``rows`` are chosen, as datasketch does, to minimise
the false-positive plus false-negative probability mass around ``threshold``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

_WHITESPACE = re.compile(r"\s+")
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_BLOCK_SHINGLES = 8192  # bounds the [shingles, num_perm] temporary to 8 MiB at 128 perms


def canonical_bytes(text: str) -> bytes:
    """What near-dedup compares: case-folded, whitespace runs collapsed, UTF-8."""
    return _WHITESPACE.sub(" ", text.casefold()).strip().encode("utf-8")


def shingles(text: str, shingle_bytes: int = 8) -> np.ndarray:
    """The document's distinct shingles as uint64 (each packs ``shingle_bytes`` bytes exactly)."""
    return np.unique(_packed_windows(canonical_bytes(text), shingle_bytes))


def _packed_windows(data: bytes, width: int) -> np.ndarray:
    raw = np.frombuffer(data, dtype=np.uint8)
    if len(raw) < width:  # a short document is one shingle: itself, zero-padded
        raw = np.concatenate([raw, np.zeros(width - len(raw), np.uint8)])
    count = len(raw) - width + 1
    packed = np.zeros(count, dtype=np.uint64)
    for offset in range(width):
        packed |= raw[offset:offset + count].astype(np.uint64) << np.uint64(8 * offset)
    return packed


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


class MinHasher:
    """MinHash signatures (``num_perm`` uint32 values) of documents' byte shingles."""

    def __init__(self, num_perm: int = 128, shingle_bytes: int = 8, seed: int = 1) -> None:
        if not 1 <= shingle_bytes <= 8:
            raise ValueError(f"shingle_bytes={shingle_bytes}; expected 1..8 (packed into a uint64)")
        if num_perm < 2:
            raise ValueError(f"num_perm={num_perm}; expected at least 2")
        rng = np.random.default_rng(seed)
        self.num_perm = num_perm
        self.shingle_bytes = shingle_bytes
        self._a = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd
        self._b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)

    def signature(self, text: str) -> np.ndarray:
        return self.signature_of_shingles(_packed_windows(canonical_bytes(text), self.shingle_bytes))

    def signature_of_shingles(self, packed: np.ndarray) -> np.ndarray:
        mixed = _splitmix64(packed.astype(np.uint64, copy=False))
        result = np.full(self.num_perm, np.iinfo(np.uint32).max, dtype=np.uint32)
        with np.errstate(over="ignore"):
            for start in range(0, len(mixed), _BLOCK_SHINGLES):
                block = mixed[start:start + _BLOCK_SHINGLES, None]
                hashed = ((block * self._a + self._b) >> np.uint64(32)).astype(np.uint32)
                np.minimum(result, hashed.min(axis=0), out=result)
        return result


def optimal_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """``(bands, rows)`` with ``bands * rows <= num_perm`` minimising the probability mass of
    false positives (Jaccard < threshold, yet a band matches) plus false negatives."""
    grid = np.linspace(0.0, 1.0, 1001)
    best = (float("inf"), 1, num_perm)
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            hit = 1 - (1 - grid**rows) ** bands
            below, above = grid < threshold, grid >= threshold
            error = np.trapezoid(hit[below], grid[below]) + np.trapezoid(1 - hit[above], grid[above])
            if error < best[0]:
                best = (error, bands, rows)
    return best[1], best[2]


class NearDuplicateIndex:
    """An LSH index over the signatures of kept documents."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold={threshold}; expected a Jaccard similarity in (0, 1]")
        self.threshold = threshold
        self.bands, self.rows = optimal_bands(threshold, num_perm)
        self._buckets: list[dict[bytes, list[int]]] = [{} for _ in range(self.bands)]
        self._signatures: list[np.ndarray] = []

    def _band_keys(self, signature: np.ndarray) -> list[bytes]:
        used = signature[: self.bands * self.rows].reshape(self.bands, self.rows)
        return [band.tobytes() for band in used]

    def find(self, signature: np.ndarray) -> int | None:
        """Index of a kept document this one near-duplicates, or ``None``."""
        return next(self._matches(signature), None)

    def matches(self, signature: np.ndarray) -> list[int]:
        """Indices of every indexed document this one near-duplicates."""
        return list(self._matches(signature))

    def _matches(self, signature: np.ndarray):
        seen: set[int] = set()
        for buckets, key in zip(self._buckets, self._band_keys(signature)):
            for candidate in buckets.get(key, ()):
                if candidate in seen:
                    continue
                seen.add(candidate)
                if np.mean(self._signatures[candidate] == signature) >= self.threshold:
                    yield candidate

    def add(self, signature: np.ndarray) -> int:
        index = len(self._signatures)
        self._signatures.append(signature)
        for buckets, key in zip(self._buckets, self._band_keys(signature)):
            buckets.setdefault(key, []).append(index)
        return index


def exact_key(text: str) -> bytes:
    """A 128-bit content hash of the (already normalised) text, for exact dedup."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


@dataclass
class DedupStats:
    exact_duplicates: int = 0
    near_duplicates: int = 0


class Deduplicator:
    """Streaming dedup: keeps the first of each exact or near-duplicate group."""

    def __init__(self, near_threshold: float | None = 0.8, num_perm: int = 128,
                 shingle_bytes: int = 8, seed: int = 1, exact: bool = True) -> None:
        self._exact: set[bytes] | None = set() if exact else None
        self._hasher = MinHasher(num_perm, shingle_bytes, seed) if near_threshold is not None else None
        self._index = NearDuplicateIndex(near_threshold, num_perm) if near_threshold is not None else None
        self.stats = DedupStats()

    def verdict(self, text: str) -> str | None:
        """``"exact_duplicate"``, ``"near_duplicate"``, or ``None`` (kept and remembered)."""
        if self._exact is not None:
            key = exact_key(text)
            if key in self._exact:
                self.stats.exact_duplicates += 1
                return "exact_duplicate"
            self._exact.add(key)
        if self._index is not None:
            signature = self._hasher.signature(text)
            if self._index.find(signature) is not None:
                self.stats.near_duplicates += 1
                return "near_duplicate"
            self._index.add(signature)
        return None
