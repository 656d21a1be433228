"""Unicode normalisation and heuristic quality filters (Gopher-style rules, each configurable).

A document is dropped by the *first* filter it fails, in the order of
:data:`FILTER_ORDER`; the report counts drops per filter. Setting a threshold to ``None``
disables that filter. Defaults follow the Gopher paper's rules (Rae et al., 2021, appendix A),
loosened where technical prose (code, numbers) would otherwise be dropped wholesale.
"""

from __future__ import annotations

import dataclasses
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ling_data.errors import DataError

NORMALIZATION_FORMS = ("NFC", "NFKC", "none")


def normalize(text: str, form: str = "NFC") -> str:
    """``text`` in Unicode normal form ``form`` (``"none"`` leaves it as is)."""
    if form == "none":
        return text
    if form not in NORMALIZATION_FORMS:
        raise ValueError(f"normalization form {form!r}; expected one of {NORMALIZATION_FORMS}")
    return unicodedata.normalize(form, text)


@dataclass
class FilterConfig:
    min_chars: int | None = 50
    max_chars: int | None = 1_000_000
    min_words: int | None = 10
    # Fraction of non-space characters that are neither letters nor digits.
    max_symbol_ratio: float | None = 0.35
    max_digit_ratio: float | None = 0.3
    # Fraction of non-blank lines that repeat an earlier line of the same document.
    max_duplicate_line_fraction: float | None = 0.3
    # Fraction of word characters covered by the single most frequent word n-gram.
    max_top_ngram_fraction: dict[int, float] = field(default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16})
    # Fraction of word characters inside word n-grams that repeat an earlier n-gram.
    max_duplicate_ngram_fraction: dict[int, float] = field(default_factory=lambda: {5: 0.15, 10: 0.1})

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str) -> FilterConfig:
        """Build from a TOML table; ``false`` disables a filter. Unknown keys are errors."""
        names = {f.name for f in dataclasses.fields(cls)}
        config = cls()
        for key, value in values.items():
            if key not in names:
                raise DataError(f"{source}: unknown filter {key!r}; expected one of {sorted(names)}")
            if value is False:
                value = {} if key.endswith("ngram_fraction") else None
            elif key.endswith("ngram_fraction"):
                if not isinstance(value, dict) or not all(
                        k.isdigit() and isinstance(v, (int, float)) for k, v in value.items()):
                    raise DataError(f"{source}: {key} must be a table of n = fraction (e.g. {{2 = 0.2}})")
                value = {int(k): float(v) for k, v in value.items()}
            elif not isinstance(value, (int, float)) or isinstance(value, bool):
                raise DataError(f"{source}: {key} = {value!r}; expected a number or false")
            setattr(config, key, value)
        return config


FILTER_ORDER = (
    "min_chars", "max_chars", "min_words", "max_symbol_ratio", "max_digit_ratio",
    "max_duplicate_line_fraction", "max_top_ngram_fraction", "max_duplicate_ngram_fraction",
)


def failed_filter(text: str, config: FilterConfig) -> str | None:
    """Name of the first filter ``text`` fails (``"max_top_ngram_fraction:3"`` for n-gram
    rules), or ``None`` if it passes them all."""
    if config.min_chars is not None and len(text) < config.min_chars:
        return "min_chars"
    if config.max_chars is not None and len(text) > config.max_chars:
        return "max_chars"
    words = text.split()
    if config.min_words is not None and len(words) < config.min_words:
        return "min_words"
    if config.max_symbol_ratio is not None or config.max_digit_ratio is not None:
        visible = digits = alnum = 0
        for char in text:
            if not char.isspace():
                visible += 1
                if char.isdigit():
                    digits += 1
                if char.isalnum():
                    alnum += 1
        visible = max(visible, 1)
        if config.max_symbol_ratio is not None and (visible - alnum) / visible > config.max_symbol_ratio:
            return "max_symbol_ratio"
        if config.max_digit_ratio is not None and digits / visible > config.max_digit_ratio:
            return "max_digit_ratio"
    if config.max_duplicate_line_fraction is not None:
        lines = [line.strip() for line in text.split("\n") if line.strip()]
        if lines and 1 - len(set(lines)) / len(lines) > config.max_duplicate_line_fraction:
            return "max_duplicate_line_fraction"
    total_chars = sum(map(len, words)) or 1
    for n, limit in sorted(config.max_top_ngram_fraction.items()):
        if top_ngram_fraction(words, n, total_chars) > limit:
            return f"max_top_ngram_fraction:{n}"
    for n, limit in sorted(config.max_duplicate_ngram_fraction.items()):
        if duplicate_ngram_fraction(words, n, total_chars) > limit:
            return f"max_duplicate_ngram_fraction:{n}"
    return None


def top_ngram_fraction(words: list[str], n: int, total_chars: int) -> float:
    if len(words) < n:
        return 0.0
    counts = Counter(zip(*(words[i:] for i in range(n))))
    gram, count = counts.most_common(1)[0]
    return count * sum(map(len, gram)) / total_chars if count > 1 else 0.0


def duplicate_ngram_fraction(words: list[str], n: int, total_chars: int) -> float:
    if len(words) < n:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    covered = bytearray(len(words))
    for start, gram in enumerate(zip(*(words[i:] for i in range(n)))):
        if gram in seen:
            covered[start:start + n] = b"\x01" * n
        else:
            seen.add(gram)
    return sum(len(word) for word, flag in zip(words, covered) if flag) / total_chars
