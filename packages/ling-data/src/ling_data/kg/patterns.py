"""Question patterns: small subgraph shapes, each with its tool-call plan and its truth.

A `Pattern` draws a binding of entities from the graph (`draw`), says which tool calls
answer it (`plan`, where `Ref(i)` stands for the result of call i), how the final answer
follows from the call results (`finish`), and what the answer is according to the graph
itself (`truth`, read straight from the triples without the tools). The verifier keeps a
question only when executing the plan reproduces the truth.

The forms follow the Ling report's first-order-logic shapes: lookups (one hop), chains
(x -r1-> y -r2-> z), counts, comparisons, superlatives, intersections and arithmetic over
looked-up values, from one to four calls.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ling_data.kg.graph import Entity, KnowledgeGraph


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
        return self.plan(dict.fromkeys(("country", "country_a", "country_b", "city", "continent"), "?"))

    @property
    def hops(self) -> int:
        return len(self.shape())


def _countries_with(graph: KnowledgeGraph, *relations: str) -> list[Entity]:
    return [c for c in graph.entities("country") if all(graph.objects(c, r) for r in relations)]


def _one_country(*relations: str) -> Callable[[KnowledgeGraph, random.Random], Slots | None]:
    def draw(graph: KnowledgeGraph, rng: random.Random) -> Slots | None:
        candidates = _countries_with(graph, *relations)
        return {"country": rng.choice(candidates).name} if candidates else None

    return draw


def _capital_with_population(graph: KnowledgeGraph, rng: random.Random) -> Slots | None:
    candidates = [
        c for c in graph.entities("country")
        if graph.value(c, "capital") is not None and graph.value(graph.value(c, "capital"), "population") is not None
    ]
    return {"country": rng.choice(candidates).name}


def _non_capital_city(graph: KnowledgeGraph, rng: random.Random) -> Slots | None:
    capitals = {graph.value(c, "capital") for c in graph.entities("country")}
    candidates = [city for city in graph.entities("city") if city not in capitals]
    return {"city": rng.choice(candidates).name}


def _two_countries(relation: str) -> Callable[[KnowledgeGraph, random.Random], Slots | None]:
    """Two countries on the same continent whose `relation` values differ (a clear winner)."""

    def draw(graph: KnowledgeGraph, rng: random.Random) -> Slots | None:
        first = rng.choice(_countries_with(graph, relation, "continent"))
        continent = graph.value(first, "continent")
        others = [
            c for c in graph.subjects("continent", continent)
            if c != first and graph.value(c, relation) not in (None, graph.value(first, relation))
        ]
        if not others:
            return None
        return {"country_a": first.name, "country_b": rng.choice(others).name}

    return draw


def _ordered_by_population(draw2: Callable) -> Callable[[KnowledgeGraph, random.Random], Slots | None]:
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


def _countries_sharing_a_neighbour(graph: KnowledgeGraph, rng: random.Random) -> Slots | None:
    first = rng.choice(_countries_with(graph, "borders"))
    second_hop = {
        other
        for neighbour in graph.objects(first, "borders")
        for other in graph.objects(neighbour, "borders")
        if other != first
    }
    if not second_hop:
        return None
    return {"country_a": first.name, "country_b": rng.choice(sorted(second_hop)).name}


def _continent(graph: KnowledgeGraph, rng: random.Random) -> Slots | None:
    candidates = [c for c in graph.entities("continent") if len(graph.subjects("continent", c)) >= 2]
    return {"continent": rng.choice(candidates).name}


def _country(graph: KnowledgeGraph, slots: Slots, key: str = "country") -> Entity:
    return graph.entity("country", slots[key])


def _fact(graph: KnowledgeGraph, subject: Entity | None, relation: str) -> Any:
    return None if subject is None else graph.value(subject, relation)


def _name(entity: Entity | None) -> str | None:
    return None if entity is None else entity.name


def _largest(graph: KnowledgeGraph, countries: list[Entity], relation: str) -> Entity | None:
    scored = [(graph.value(c, relation), c.name, c) for c in countries if graph.value(c, relation) is not None]
    return min(scored, key=lambda s: (-s[0], s[1]))[2] if scored else None


def _winner(calls: list[dict]) -> str:
    """The country whose value the final `compare` found greater."""
    verdict = calls[-1]["result"]
    if verdict == "equal":
        return "neither"
    return calls[0 if verdict == "greater" else 1]["arguments"]["country"]


def _lookup(name: str, tool: str, relation: str, templates: tuple[str, ...], entity_result: bool) -> Pattern:
    def truth(graph: KnowledgeGraph, slots: Slots) -> Any:
        value = _fact(graph, _country(graph, slots), relation)
        return _name(value) if entity_result else value

    return Pattern(name, "lookup", templates, _one_country(relation), lambda s: [(tool, {"country": s["country"]})], truth)


def _compare(name: str, tool: str, relation: str, templates: tuple[str, ...]) -> Pattern:
    def truth(graph: KnowledgeGraph, slots: Slots) -> str:
        a, b = (_fact(graph, _country(graph, slots, k), relation) for k in ("country_a", "country_b"))
        return slots["country_a"] if a > b else slots["country_b"] if b > a else "neither"

    return Pattern(
        name, "comparison", templates, _two_countries(relation),
        lambda s: [(tool, {"country": s["country_a"]}), (tool, {"country": s["country_b"]}),
                   ("compare", {"a": Ref(0), "b": Ref(1)})],
        truth, _winner,
    )


def _neighbours(graph: KnowledgeGraph, slots: Slots, key: str = "country") -> list[Entity]:
    return graph.objects(_country(graph, slots, key), "borders")


def _members(graph: KnowledgeGraph, slots: Slots) -> list[Entity]:
    return graph.subjects("continent", graph.entity("continent", slots["continent"]))


PATTERNS: tuple[Pattern, ...] = (
    _lookup("capital", "get_capital", "capital", (
        "What is the capital of {country}?",
        "Which city is the capital of {country}?",
        "Name the capital city of {country}.",
    ), entity_result=True),
    _lookup("population", "get_population", "population", (
        "What is the population of {country}?",
        "How many people live in {country}?",
        "How many inhabitants does {country} have?",
    ), entity_result=False),
    _lookup("area", "get_area", "area_km2", (
        "What is the area of {country} in square kilometres?",
        "How large is {country}, in km2?",
        "How many square kilometres does {country} cover?",
    ), entity_result=False),
    _lookup("currency", "get_currency", "currency", (
        "What currency is used in {country}?",
        "Which currency does {country} use? Give its ISO code.",
        "What is the currency code of {country}?",
    ), entity_result=True),
    _lookup("continent", "get_continent", "continent", (
        "On which continent is {country}?",
        "Which continent does {country} belong to?",
        "{country} lies on which continent?",
    ), entity_result=True),
    Pattern("neighbours", "lookup", (
        "Which countries border {country}?",
        "List the neighbouring countries of {country}.",
        "What countries share a land border with {country}?",
    ), _one_country("borders"), lambda s: [("get_neighbours", {"country": s["country"]})],
        lambda g, s: sorted(c.name for c in _neighbours(g, s))),
    Pattern("city_country", "lookup", (
        "In which country is {city}?",
        "Which country is the city of {city} in?",
        "{city} is a city in which country?",
    ), _non_capital_city, lambda s: [("get_city_country", {"city": s["city"]})],
        lambda g, s: _name(g.value(g.entity("city", s["city"]), "located_in"))),
    Pattern("capital_population", "chain", (
        "What is the population of the capital of {country}?",
        "How many people live in the capital city of {country}?",
        "How populous is the capital of {country}?",
    ), _capital_with_population,
        lambda s: [("get_capital", {"country": s["country"]}), ("get_city_population", {"city": Ref(0)})],
        lambda g, s: _fact(g, _fact(g, _country(g, s), "capital"), "population")),
    Pattern("city_continent", "chain", (
        "On which continent is the city of {city}?",
        "Which continent is {city} on?",
        "{city} is on which continent?",
    ), _non_capital_city,
        lambda s: [("get_city_country", {"city": s["city"]}), ("get_continent", {"country": Ref(0)})],
        lambda g, s: _name(_fact(g, _fact(g, g.entity("city", s["city"]), "located_in"), "continent"))),
    Pattern("city_currency", "chain", (
        "What currency would you pay with in {city}?",
        "Which currency is used in the city of {city}?",
        "What is the currency code of the country where {city} is?",
    ), _non_capital_city,
        lambda s: [("get_city_country", {"city": s["city"]}), ("get_currency", {"country": Ref(0)})],
        lambda g, s: _name(_fact(g, _fact(g, g.entity("city", s["city"]), "located_in"), "currency"))),
    Pattern("neighbour_count", "count", (
        "How many countries border {country}?",
        "How many neighbouring countries does {country} have?",
        "With how many countries does {country} share a land border?",
    ), _one_country("borders"),
        lambda s: [("get_neighbours", {"country": s["country"]}), ("count", {"items": Ref(0)})],
        lambda g, s: len(_neighbours(g, s))),
    Pattern("continent_count", "count", (
        "How many countries are there in {continent}?",
        "How many countries does {continent} have?",
        "Count the countries of {continent}.",
    ), _continent,
        lambda s: [("countries_in_continent", {"continent": s["continent"]}), ("count", {"items": Ref(0)})],
        lambda g, s: len(_members(g, s))),
    Pattern("currency_sharing_count", "count", (
        "How many countries use the same currency as {country}, {country} included?",
        "Counting {country} itself, how many countries share its currency?",
        "In how many countries is the currency of {country} used?",
    ), _one_country("currency"),
        lambda s: [("get_currency", {"country": s["country"]}), ("countries_with_currency", {"currency": Ref(0)}),
                   ("count", {"items": Ref(1)})],
        lambda g, s: len(g.subjects("currency", g.value(_country(g, s), "currency")))),
    _compare("larger_population", "get_population", "population", (
        "Which has more people, {country_a} or {country_b}?",
        "Is the population of {country_a} or of {country_b} larger?",
        "Which country is more populous: {country_a} or {country_b}?",
    )),
    _compare("larger_area", "get_area", "area_km2", (
        "Which is larger by area, {country_a} or {country_b}?",
        "Which covers more land: {country_a} or {country_b}?",
        "Does {country_a} or {country_b} have the larger area?",
    )),
    Pattern("population_difference", "arithmetic", (
        "How many more people live in {country_a} than in {country_b}?",
        "By how much does the population of {country_a} exceed that of {country_b}?",
        "What is the population difference between {country_a} and {country_b}?",
    ), _ordered_by_population(_two_countries("population")),
        lambda s: [("get_population", {"country": s["country_a"]}), ("get_population", {"country": s["country_b"]}),
                   ("subtract", {"a": Ref(0), "b": Ref(1)})],
        lambda g, s: _fact(g, _country(g, s, "country_a"), "population") - _fact(g, _country(g, s, "country_b"), "population")),
    Pattern("combined_population", "arithmetic", (
        "What is the combined population of {country_a} and {country_b}?",
        "How many people live in {country_a} and {country_b} together?",
        "Add up the populations of {country_a} and {country_b}.",
    ), _two_countries("population"),
        lambda s: [("get_population", {"country": s["country_a"]}), ("get_population", {"country": s["country_b"]}),
                   ("add", {"a": Ref(0), "b": Ref(1)})],
        lambda g, s: _fact(g, _country(g, s, "country_a"), "population") + _fact(g, _country(g, s, "country_b"), "population")),
    Pattern("population_density", "arithmetic", (
        "What is the population density of {country} in people per square kilometre?",
        "How many people per km2 live in {country}?",
        "Compute the population density of {country}.",
    ), _one_country("population", "area_km2"),
        lambda s: [("get_population", {"country": s["country"]}), ("get_area", {"country": s["country"]}),
                   ("divide", {"a": Ref(0), "b": Ref(1)})],
        lambda g, s: round(_fact(g, _country(g, s), "population") / _fact(g, _country(g, s), "area_km2"), 4)),
    Pattern("capital_share", "arithmetic", (
        "What fraction of the people of {country} live in its capital?",
        "What share of the population of {country} lives in the capital city?",
        "Divide the population of the capital of {country} by the population of {country}.",
    ), _capital_with_population,
        lambda s: [("get_capital", {"country": s["country"]}), ("get_city_population", {"city": Ref(0)}),
                   ("get_population", {"country": s["country"]}), ("divide", {"a": Ref(1), "b": Ref(2)})],
        lambda g, s: round(_fact(g, _fact(g, _country(g, s), "capital"), "population")
                           / _fact(g, _country(g, s), "population"), 4)),
    Pattern("common_neighbours", "intersection", (
        "Which countries border both {country_a} and {country_b}?",
        "Name the countries that are neighbours of {country_a} and also of {country_b}.",
        "What countries share a border with {country_a} as well as with {country_b}?",
    ), _countries_sharing_a_neighbour,
        lambda s: [("get_neighbours", {"country": s["country_a"]}), ("get_neighbours", {"country": s["country_b"]}),
                   ("intersection", {"a": Ref(0), "b": Ref(1)})],
        lambda g, s: sorted({c.name for c in _neighbours(g, s, "country_a")} & {c.name for c in _neighbours(g, s, "country_b")})),
    Pattern("most_populous_neighbour", "superlative", (
        "Which neighbour of {country} has the largest population?",
        "What is the most populous country bordering {country}?",
        "Of the countries bordering {country}, which has the most people?",
    ), _one_country("borders"),
        lambda s: [("get_neighbours", {"country": s["country"]}), ("argmax", {"countries": Ref(0), "attribute": "population"})],
        lambda g, s: _name(_largest(g, _neighbours(g, s), "population"))),
    Pattern("largest_country_in_continent", "superlative", (
        "What is the largest country in {continent} by area?",
        "Which country of {continent} covers the most land?",
        "Name the biggest country by area in {continent}.",
    ), _continent,
        lambda s: [("countries_in_continent", {"continent": s["continent"]}), ("argmax", {"countries": Ref(0), "attribute": "area"})],
        lambda g, s: _name(_largest(g, _members(g, s), "area_km2"))),
    Pattern("most_populous_country_in_continent", "superlative", (
        "What is the most populous country in {continent}?",
        "Which country of {continent} has the most people?",
        "Name the country with the largest population in {continent}.",
    ), _continent,
        lambda s: [("countries_in_continent", {"continent": s["continent"]}), ("argmax", {"countries": Ref(0), "attribute": "population"})],
        lambda g, s: _name(_largest(g, _members(g, s), "population"))),
    Pattern("capital_of_most_populous_neighbour", "chain", (
        "What is the capital of the most populous country bordering {country}?",
        "Which city is the capital of the largest neighbour of {country} by population?",
        "Name the capital of the neighbour of {country} with the most people.",
    ), _one_country("borders"),
        lambda s: [("get_neighbours", {"country": s["country"]}), ("argmax", {"countries": Ref(0), "attribute": "population"}),
                   ("get_capital", {"country": Ref(1)})],
        lambda g, s: _name(_fact(g, _largest(g, _neighbours(g, s), "population"), "capital"))),
    Pattern("capital_population_of_most_populous_neighbour", "chain", (
        "How many people live in the capital of the most populous country bordering {country}?",
        "What is the population of the capital of the largest neighbour of {country} by population?",
        "Among the neighbours of {country}, take the most populous one: how many people live in its capital?",
    ), _one_country("borders"),
        lambda s: [("get_neighbours", {"country": s["country"]}), ("argmax", {"countries": Ref(0), "attribute": "population"}),
                   ("get_capital", {"country": Ref(1)}), ("get_city_population", {"city": Ref(2)})],
        lambda g, s: _fact(g, _fact(g, _largest(g, _neighbours(g, s), "population"), "capital"), "population")),
)

PATTERNS_BY_NAME = {pattern.name: pattern for pattern in PATTERNS}
