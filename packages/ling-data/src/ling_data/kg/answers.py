"""Canonical answer strings, the contract's answer comparison, and the entities a chain touches."""

from __future__ import annotations

import json
import math
import re
from typing import Any

# Which entity type a tool's argument or result names (lists name one entity per item).
ARGUMENT_TYPES = {
    "country": "country",
    "city": "city",
    "continent": "continent",
    "currency": "currency",
    "countries": "country",
}
RESULT_TYPES = {
    "get_capital": "city",
    "get_currency": "currency",
    "get_continent": "continent",
    "get_neighbours": "country",
    "get_city_country": "country",
    "countries_in_continent": "country",
    "countries_with_currency": "country",
    "intersection": "country",
    "argmax": "country",
}


def format_answer(value: Any) -> str:
    """The canonical final-answer string: names as they are, numbers as JSON, lists comma-joined."""
    if isinstance(value, list):
        return ", ".join(format_answer(item) for item in value) if value else "none"
    if isinstance(value, str):
        return value
    return json.dumps(value)


def normalise_answer(text: str) -> str:
    return " ".join(text.strip().casefold().split())


def _as_number(text: str) -> float | None:
    if not re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*", text):
        return None
    return float(text)


def answers_match(predicted: str, gold: str) -> bool:
    """The contract's comparison: normalised strings, numbers as numbers (relative 1e-6)."""
    a, b = _as_number(predicted), _as_number(gold)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=0.0) or a == b
    return normalise_answer(predicted) == normalise_answer(gold)


def entities_of(calls: list[dict]) -> list[str]:
    """Every "type:name" entity named in the calls' arguments or results, sorted."""
    found: set[str] = set()

    def add(type: str, value: Any) -> None:
        for name in value if isinstance(value, list) else [value]:
            if isinstance(name, str):
                found.add(f"{type}:{name}")

    for call in calls:
        for key, value in call["arguments"].items():
            if key in ARGUMENT_TYPES:
                add(ARGUMENT_TYPES[key], value)
        if call["name"] in RESULT_TYPES:
            add(RESULT_TYPES[call["name"]], call["result"])
    return sorted(found)
