"""Draw questions from the patterns: distinct bindings per pattern, chosen by a seeded RNG."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ling_data.kg.graph import KnowledgeGraph
from ling_data.kg.patterns import Pattern, Ref, Slots, Step
from ling_data.kg.tools import Executor, ToolError
from ling_data.kg.wording import mention, sentence

log = logging.getLogger(__name__)
ATTEMPTS_PER_SAMPLE = 20


@dataclass
class Draft:
    """A question before verification: its plan, the executed calls and the graph's answer."""

    pattern: Pattern
    slots: Slots
    question: str
    truth: Any  # the answer read from the graph
    calls: list[dict] | None  # executed plan; None when a call failed
    error: str | None = None


def resolve(arguments: dict[str, Any], results: list[Any]) -> dict[str, Any]:
    """Replace `Ref(i)` arguments by the result of call i."""
    return {
        key: results[value.index] if isinstance(value, Ref) else value
        for key, value in arguments.items()
    }


def execute(plan: list[Step], executor: Executor) -> list[dict]:
    """Run a plan call by call, feeding results forward; raises ToolError on a failed call."""
    calls: list[dict] = []
    for name, arguments in plan:
        literal = resolve(arguments, [call["result"] for call in calls])
        calls.append({"name": name, "arguments": literal, "result": executor.call(name, literal)})
    return calls


def draw_questions(
    pattern: Pattern, graph: KnowledgeGraph, executor: Executor, count: int, seed: int
) -> list[Draft]:
    """Up to `count` drafts with distinct bindings (fewer when the pattern has fewer)."""
    rng = random.Random(f"{seed}:{pattern.name}")
    seen: set[tuple] = set()
    drafts: list[Draft] = []
    for _ in range(count * ATTEMPTS_PER_SAMPLE):
        if len(drafts) == count:
            break
        slots = pattern.draw(graph, rng)
        if slots is None or (key := tuple(sorted(slots.items()))) in seen:
            continue
        seen.add(key)
        truth = pattern.truth(graph, slots)
        if truth is None:  # the graph lacks a fact this question needs
            continue
        wording = {
            key: mention(value) if key.startswith("country") else value
            for key, value in slots.items()
        }
        question = sentence(rng.choice(pattern.templates).format(**wording))
        try:
            drafts.append(
                Draft(pattern, slots, question, truth, execute(pattern.plan(slots), executor))
            )
        except ToolError as error:
            drafts.append(Draft(pattern, slots, question, truth, None, str(error)))
    if len(drafts) < count:
        log.info(
            "pattern %s: %d distinct questions (asked for %d)", pattern.name, len(drafts), count
        )
    return drafts


def draw_all(
    patterns: Iterable[Pattern], graph: KnowledgeGraph, executor: Executor, count: int, seed: int
) -> list[Draft]:
    return [
        draft
        for pattern in patterns
        for draft in draw_questions(pattern, graph, executor, count, seed)
    ]
