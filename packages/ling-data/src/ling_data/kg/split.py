"""Hold out entities, not questions: a seeded set of countries, with their cities, is test-only.

A sample whose calls or results name any held-out country or city goes to test; every other
sample goes to train, so no held-out entity appears anywhere in a train sample (question,
arguments or tool results). Continents and currencies are shared vocabulary, not held out:
there are 7 continents, and a currency such as EUR belongs to many countries.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ling_data.kg.graph import KnowledgeGraph

HELD_OUT_TYPES = ("country", "city")


@dataclass(frozen=True)
class EntitySplit:
    test_entities: frozenset[str]  # "country:Kenya", "city:Nairobi", ...

    def split_of(self, entities: list[str]) -> str:
        return "test" if any(entity in self.test_entities for entity in entities) else "train"

    def test_countries(self) -> list[str]:
        return sorted(e.split(":", 1)[1] for e in self.test_entities if e.startswith("country:"))


def hold_out(graph: KnowledgeGraph, fraction: float, seed: int) -> EntitySplit:
    """Hold out round(fraction x countries) countries chosen by `seed`, and all their cities."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"test fraction must be in [0, 1), got {fraction}")
    countries = graph.entities("country")
    chosen = random.Random(f"{seed}:held-out-countries").sample(
        countries, round(fraction * len(countries))
    )
    held_out = {str(country) for country in chosen}
    for city in graph.entities("city"):
        if str(graph.value(city, "located_in")) in held_out:
            held_out.add(str(city))
    return EntitySplit(frozenset(held_out))
