"""The question patterns, in the Ling report's first-order-logic forms: lookups (one hop),
chains (x -r1-> y -r2-> z), counts, comparisons, superlatives, intersections and arithmetic
over looked-up values, from one to four calls; three question templates each."""

from __future__ import annotations

from ling_data.kg.bindings import (
    any_continent,
    capital_with_population,
    comparison_pattern,
    countries_sharing_a_neighbour,
    fact,
    largest,
    lookup_pattern,
    members,
    name_of,
    neighbours,
    non_capital_city,
    one_country,
    ordered_by_population,
    slot_country,
    two_countries,
)
from ling_data.kg.pattern import Pattern, Ref, Slots, Step

__all__ = ["PATTERNS", "PATTERNS_BY_NAME", "Pattern", "Ref", "Slots", "Step"]

PATTERNS: tuple[Pattern, ...] = (
    lookup_pattern(
        "capital",
        "get_capital",
        "capital",
        (
            "What is the capital of {country}?",
            "Which city is the capital of {country}?",
            "Name the capital city of {country}.",
        ),
        entity_result=True,
    ),
    lookup_pattern(
        "population",
        "get_population",
        "population",
        (
            "What is the population of {country}?",
            "How many people live in {country}?",
            "How many inhabitants does {country} have?",
        ),
        entity_result=False,
    ),
    lookup_pattern(
        "area",
        "get_area",
        "area_km2",
        (
            "What is the area of {country} in square kilometres?",
            "How large is {country}, in km2?",
            "How many square kilometres does {country} cover?",
        ),
        entity_result=False,
    ),
    lookup_pattern(
        "currency",
        "get_currency",
        "currency",
        (
            "What currency is used in {country}?",
            "Which currency does {country} use? Give its ISO code.",
            "What is the currency code of {country}?",
        ),
        entity_result=True,
    ),
    lookup_pattern(
        "continent",
        "get_continent",
        "continent",
        (
            "On which continent is {country}?",
            "Which continent does {country} belong to?",
            "{country} lies on which continent?",
        ),
        entity_result=True,
    ),
    Pattern(
        "neighbours",
        "lookup",
        (
            "Which countries border {country}?",
            "List the neighbouring countries of {country}.",
            "What countries share a land border with {country}?",
        ),
        one_country("borders"),
        lambda s: [("get_neighbours", {"country": s["country"]})],
        lambda g, s: sorted(c.name for c in neighbours(g, s)),
    ),
    Pattern(
        "city_country",
        "lookup",
        (
            "In which country is {city}?",
            "Which country is the city of {city} in?",
            "{city} is a city in which country?",
        ),
        non_capital_city,
        lambda s: [("get_city_country", {"city": s["city"]})],
        lambda g, s: name_of(g.value(g.entity("city", s["city"]), "located_in")),
    ),
    Pattern(
        "capital_population",
        "chain",
        (
            "What is the population of the capital of {country}?",
            "How many people live in the capital city of {country}?",
            "How populous is the capital of {country}?",
        ),
        capital_with_population,
        lambda s: [
            ("get_capital", {"country": s["country"]}),
            ("get_city_population", {"city": Ref(0)}),
        ],
        lambda g, s: fact(g, fact(g, slot_country(g, s), "capital"), "population"),
    ),
    Pattern(
        "city_continent",
        "chain",
        (
            "On which continent is the city of {city}?",
            "Which continent is {city} on?",
            "{city} is on which continent?",
        ),
        non_capital_city,
        lambda s: [
            ("get_city_country", {"city": s["city"]}),
            ("get_continent", {"country": Ref(0)}),
        ],
        lambda g, s: name_of(
            fact(g, fact(g, g.entity("city", s["city"]), "located_in"), "continent")
        ),
    ),
    Pattern(
        "city_currency",
        "chain",
        (
            "What currency would you pay with in {city}?",
            "Which currency is used in the city of {city}?",
            "What is the currency code of the country where {city} is?",
        ),
        non_capital_city,
        lambda s: [
            ("get_city_country", {"city": s["city"]}),
            ("get_currency", {"country": Ref(0)}),
        ],
        lambda g, s: name_of(
            fact(g, fact(g, g.entity("city", s["city"]), "located_in"), "currency")
        ),
    ),
    Pattern(
        "neighbour_count",
        "count",
        (
            "How many countries border {country}?",
            "How many neighbouring countries does {country} have?",
            "With how many countries does {country} share a land border?",
        ),
        one_country("borders"),
        lambda s: [("get_neighbours", {"country": s["country"]}), ("count", {"items": Ref(0)})],
        lambda g, s: len(neighbours(g, s)),
    ),
    Pattern(
        "continent_count",
        "count",
        (
            "How many countries are there in {continent}?",
            "How many countries does {continent} have?",
            "Count the countries of {continent}.",
        ),
        any_continent,
        lambda s: [
            ("countries_in_continent", {"continent": s["continent"]}),
            ("count", {"items": Ref(0)}),
        ],
        lambda g, s: len(members(g, s)),
    ),
    Pattern(
        "currency_sharing_count",
        "count",
        (
            "How many countries use the same currency as {country}, {country} included?",
            "Counting {country} itself, how many countries share its currency?",
            "In how many countries is the currency of {country} used?",
        ),
        one_country("currency"),
        lambda s: [
            ("get_currency", {"country": s["country"]}),
            ("countries_with_currency", {"currency": Ref(0)}),
            ("count", {"items": Ref(1)}),
        ],
        lambda g, s: len(g.subjects("currency", g.value(slot_country(g, s), "currency"))),
    ),
    comparison_pattern(
        "larger_population",
        "get_population",
        "population",
        (
            "Which has more people, {country_a} or {country_b}?",
            "Is the population of {country_a} or of {country_b} larger?",
            "Which country is more populous: {country_a} or {country_b}?",
        ),
    ),
    comparison_pattern(
        "larger_area",
        "get_area",
        "area_km2",
        (
            "Which is larger by area, {country_a} or {country_b}?",
            "Which covers more land: {country_a} or {country_b}?",
            "Does {country_a} or {country_b} have the larger area?",
        ),
    ),
    Pattern(
        "population_difference",
        "arithmetic",
        (
            "How many more people live in {country_a} than in {country_b}?",
            "By how much does the population of {country_a} exceed that of {country_b}?",
            "What is the population difference between {country_a} and {country_b}?",
        ),
        ordered_by_population(two_countries("population")),
        lambda s: [
            ("get_population", {"country": s["country_a"]}),
            ("get_population", {"country": s["country_b"]}),
            ("subtract", {"a": Ref(0), "b": Ref(1)}),
        ],
        lambda g, s: (
            fact(g, slot_country(g, s, "country_a"), "population")
            - fact(g, slot_country(g, s, "country_b"), "population")
        ),
    ),
    Pattern(
        "combined_population",
        "arithmetic",
        (
            "What is the combined population of {country_a} and {country_b}?",
            "How many people live in {country_a} and {country_b} together?",
            "Add up the populations of {country_a} and {country_b}.",
        ),
        two_countries("population"),
        lambda s: [
            ("get_population", {"country": s["country_a"]}),
            ("get_population", {"country": s["country_b"]}),
            ("add", {"a": Ref(0), "b": Ref(1)}),
        ],
        lambda g, s: (
            fact(g, slot_country(g, s, "country_a"), "population")
            + fact(g, slot_country(g, s, "country_b"), "population")
        ),
    ),
    Pattern(
        "population_density",
        "arithmetic",
        (
            "What is the population density of {country} in people per square kilometre?",
            "How many people per km2 live in {country}?",
            "Compute the population density of {country}.",
        ),
        one_country("population", "area_km2"),
        lambda s: [
            ("get_population", {"country": s["country"]}),
            ("get_area", {"country": s["country"]}),
            ("divide", {"a": Ref(0), "b": Ref(1)}),
        ],
        lambda g, s: round(
            fact(g, slot_country(g, s), "population") / fact(g, slot_country(g, s), "area_km2"), 4
        ),
    ),
    Pattern(
        "capital_share",
        "arithmetic",
        (
            "What fraction of the people of {country} live in its capital?",
            "What share of the population of {country} lives in the capital city?",
            "Divide the population of the capital of {country} by the population of {country}.",
        ),
        capital_with_population,
        lambda s: [
            ("get_capital", {"country": s["country"]}),
            ("get_city_population", {"city": Ref(0)}),
            ("get_population", {"country": s["country"]}),
            ("divide", {"a": Ref(1), "b": Ref(2)}),
        ],
        lambda g, s: round(
            fact(g, fact(g, slot_country(g, s), "capital"), "population")
            / fact(g, slot_country(g, s), "population"),
            4,
        ),
    ),
    Pattern(
        "common_neighbours",
        "intersection",
        (
            "Which countries border both {country_a} and {country_b}?",
            "Name the countries that are neighbours of {country_a} and also of {country_b}.",
            "What countries share a border with {country_a} as well as with {country_b}?",
        ),
        countries_sharing_a_neighbour,
        lambda s: [
            ("get_neighbours", {"country": s["country_a"]}),
            ("get_neighbours", {"country": s["country_b"]}),
            ("intersection", {"a": Ref(0), "b": Ref(1)}),
        ],
        lambda g, s: sorted(
            {c.name for c in neighbours(g, s, "country_a")}
            & {c.name for c in neighbours(g, s, "country_b")}
        ),
    ),
    Pattern(
        "most_populous_neighbour",
        "superlative",
        (
            "Which neighbour of {country} has the largest population?",
            "What is the most populous country bordering {country}?",
            "Of the countries bordering {country}, which has the most people?",
        ),
        one_country("borders"),
        lambda s: [
            ("get_neighbours", {"country": s["country"]}),
            ("argmax", {"countries": Ref(0), "attribute": "population"}),
        ],
        lambda g, s: name_of(largest(g, neighbours(g, s), "population")),
    ),
    Pattern(
        "largest_country_in_continent",
        "superlative",
        (
            "What is the largest country in {continent} by area?",
            "Which country of {continent} covers the most land?",
            "Name the biggest country by area in {continent}.",
        ),
        any_continent,
        lambda s: [
            ("countries_in_continent", {"continent": s["continent"]}),
            ("argmax", {"countries": Ref(0), "attribute": "area"}),
        ],
        lambda g, s: name_of(largest(g, members(g, s), "area_km2")),
    ),
    Pattern(
        "most_populous_country_in_continent",
        "superlative",
        (
            "What is the most populous country in {continent}?",
            "Which country of {continent} has the most people?",
            "Name the country with the largest population in {continent}.",
        ),
        any_continent,
        lambda s: [
            ("countries_in_continent", {"continent": s["continent"]}),
            ("argmax", {"countries": Ref(0), "attribute": "population"}),
        ],
        lambda g, s: name_of(largest(g, members(g, s), "population")),
    ),
    Pattern(
        "capital_of_most_populous_neighbour",
        "chain",
        (
            "What is the capital of the most populous country bordering {country}?",
            "Which city is the capital of the largest neighbour of {country} by population?",
            "Name the capital of the neighbour of {country} with the most people.",
        ),
        one_country("borders"),
        lambda s: [
            ("get_neighbours", {"country": s["country"]}),
            ("argmax", {"countries": Ref(0), "attribute": "population"}),
            ("get_capital", {"country": Ref(1)}),
        ],
        lambda g, s: name_of(fact(g, largest(g, neighbours(g, s), "population"), "capital")),
    ),
    Pattern(
        "capital_population_of_most_populous_neighbour",
        "chain",
        (
            "How many people live in the capital of the most populous country bordering {country}?",
            "What is the population of the capital of the largest neighbour of {country} by population?",
            "Among the neighbours of {country}, take the most populous one: how many people live in its capital?",
        ),
        one_country("borders"),
        lambda s: [
            ("get_neighbours", {"country": s["country"]}),
            ("argmax", {"countries": Ref(0), "attribute": "population"}),
            ("get_capital", {"country": Ref(1)}),
            ("get_city_population", {"city": Ref(2)}),
        ],
        lambda g, s: fact(
            g, fact(g, largest(g, neighbours(g, s), "population"), "capital"), "population"
        ),
    ),
)

PATTERNS_BY_NAME = {pattern.name: pattern for pattern in PATTERNS}
