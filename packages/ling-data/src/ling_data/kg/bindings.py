"""Building blocks for the patterns: seeded draws of entity bindings, graph reads that
compute a pattern's truth without the tools, and constructors for families of patterns."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from ling_data.kg.graph import Entity, KnowledgeGraph
from ling_data.kg.pattern import Pattern, Ref, Slots

Draw = Callable[[KnowledgeGraph, random.Random], Slots | None]


def countries_with(graph: KnowledgeGraph, *relations: str) -> list[Entity]:
    return [c for c in graph.entities("country") if all(graph.objects(c, r) for r in relations)]


def one_country(*relations: str) -> Draw:
    def draw(graph: KnowledgeGraph, rng: random.Random) -> Slots | None:
        candidates = countries_with(graph, *relations)
        return {"country": rng.choice(candidates).name} if candidates else None

    return draw


def capital_with_population(graph: KnowledgeGraph, rng: random.Random) -> Slots | None:
    candidates = [
        c
        for c in graph.entities("country")
        if graph.value(c, "capital") is not None
        and graph.value(graph.value(c, "capital"), "population") is not None
    ]
    return {"country": rng.choice(candidates).name} if candidates else None


def non_capital_city(graph: KnowledgeGraph, rng: random.Random) -> Slots | None:
    capitals = {graph.value(c, "capital") for c in graph.entities("country")}
    candidates = [city for city in graph.entities("city") if city not in capitals]
    return {"city": rng.choice(candidates).name} if candidates else None


def two_countries(relation: str) -> Draw:
    """Two countries on the same continent whose `relation` values differ (a clear winner)."""

    def draw(graph: KnowledgeGraph, rng: random.Random) -> Slots | None:
        candidates = countries_with(graph, relation, "continent")
        if not candidates:
            return None
        first = rng.choice(candidates)
        continent = graph.value(first, "continent")
        others = [
            c
            for c in graph.subjects("continent", continent)
            if c != first and graph.value(c, relation) not in (None, graph.value(first, relation))
        ]
        if not others:
            return None
        return {"country_a": first.name, "country_b": rng.choice(others).name}

    return draw


def ordered_by_population(
    draw2: Callable,
) -> Draw:
    """Like `draw2`, with the more populous country first (so a difference is positive)."""

    def draw(graph: KnowledgeGraph, rng: random.Random) -> Slots | None:
        slots = draw2(graph, rng)
        if slots is None:
            return None
        a, b = (graph.entity("country", slots[k]) for k in ("country_a", "country_b"))
        if graph.value(a, "population") < graph.value(b, "population"):
            slots = {"country_a": b.name, "country_b": a.name}
        return slots

    return draw


def countries_sharing_a_neighbour(graph: KnowledgeGraph, rng: random.Random) -> Slots | None:
    candidates = countries_with(graph, "borders")
    if not candidates:
        return None
    first = rng.choice(candidates)
    second_hop = {
        other
        for neighbour in graph.objects(first, "borders")
        for other in graph.objects(neighbour, "borders")
        if other != first
    }
    if not second_hop:
        return None
    return {"country_a": first.name, "country_b": rng.choice(sorted(second_hop)).name}


def any_continent(graph: KnowledgeGraph, rng: random.Random) -> Slots | None:
    candidates = [
        c for c in graph.entities("continent") if len(graph.subjects("continent", c)) >= 2
    ]
    return {"continent": rng.choice(candidates).name} if candidates else None


def slot_country(graph: KnowledgeGraph, slots: Slots, key: str = "country") -> Entity:
    return graph.entity("country", slots[key])


def fact(graph: KnowledgeGraph, subject: Entity | None, relation: str) -> Any:
    return None if subject is None else graph.value(subject, relation)


def name_of(entity: Entity | None) -> str | None:
    return None if entity is None else entity.name


def largest(graph: KnowledgeGraph, countries: list[Entity], relation: str) -> Entity | None:
    scored = [
        (graph.value(c, relation), c.name, c)
        for c in countries
        if graph.value(c, relation) is not None
    ]
    return min(scored, key=lambda s: (-s[0], s[1]))[2] if scored else None


def winner(calls: list[dict]) -> str:
    """The country whose value the final `compare` found greater."""
    verdict = calls[-1]["result"]
    if verdict == "equal":
        return "neither"
    return calls[0 if verdict == "greater" else 1]["arguments"]["country"]


def lookup_pattern(
    name: str, tool: str, relation: str, templates: tuple[str, ...], entity_result: bool
) -> Pattern:
    def truth(graph: KnowledgeGraph, slots: Slots) -> Any:
        value = fact(graph, slot_country(graph, slots), relation)
        return name_of(value) if entity_result else value

    return Pattern(
        name,
        "lookup",
        templates,
        one_country(relation),
        lambda s: [(tool, {"country": s["country"]})],
        truth,
    )


def comparison_pattern(name: str, tool: str, relation: str, templates: tuple[str, ...]) -> Pattern:
    def truth(graph: KnowledgeGraph, slots: Slots) -> str:
        a, b = (
            fact(graph, slot_country(graph, slots, k), relation) for k in ("country_a", "country_b")
        )
        return slots["country_a"] if a > b else slots["country_b"] if b > a else "neither"

    return Pattern(
        name,
        "comparison",
        templates,
        two_countries(relation),
        lambda s: [
            (tool, {"country": s["country_a"]}),
            (tool, {"country": s["country_b"]}),
            ("compare", {"a": Ref(0), "b": Ref(1)}),
        ],
        truth,
        winner,
    )


def neighbours(graph: KnowledgeGraph, slots: Slots, key: str = "country") -> list[Entity]:
    return graph.objects(slot_country(graph, slots, key), "borders")


def members(graph: KnowledgeGraph, slots: Slots) -> list[Entity]:
    return graph.subjects("continent", graph.entity("continent", slots["continent"]))
