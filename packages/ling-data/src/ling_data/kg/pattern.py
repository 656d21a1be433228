"""The `Pattern` type: a small subgraph shape with its tool-call plan and its truth.

A `Pattern` draws a binding of entities from the graph (`draw`), says which tool calls
answer it (`plan`, where `Ref(i)` stands for the result of call i), how the final answer
follows from the call results (`finish`), and what the answer is according to the graph
itself (`truth`, read straight from the triples without the tools). The verifier keeps a
question only when executing the plan reproduces the truth.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ling_data.kg.graph import KnowledgeGraph


@dataclass(frozen=True)
class Ref:
    """Placeholder for the result of an earlier call in the same plan."""

    index: int


Step = tuple[str, dict[str, Any]]
Slots = dict[str, str]


@dataclass(frozen=True)
class Pattern:
    name: str
    form: str
    templates: tuple[str, ...]
    draw: Callable[[KnowledgeGraph, random.Random], Slots | None]
    plan: Callable[[Slots], list[Step]]
    truth: Callable[[KnowledgeGraph, Slots], Any]
    # The final answer from the executed calls ({"name", "arguments", "result"} each).
    finish: Callable[[list[dict]], Any] = lambda calls: calls[-1]["result"]

    def shape(self) -> list[Step]:
        """The plan's tool names and `Ref` wiring, which do not depend on the binding."""
        return self.plan(
            dict.fromkeys(("country", "country_a", "country_b", "city", "continent"), "?")
        )

    @property
    def hops(self) -> int:
        return len(self.shape())
