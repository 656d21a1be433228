from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ling_data.kg.graph import Entity, KnowledgeGraph, Triple
from ling_data.kg.tools import Executor, ToolError, tool_definitions


def country(name: str) -> Entity:
    return Entity("country", name)


def city(name: str) -> Entity:
    return Entity("city", name)


def tiny_graph() -> KnowledgeGraph:
    """Three countries in a row (A - B - C), B and C on the euro, A without a capital."""
    europe = Entity("continent", "Europe")
    facts = [
        (country("Aland"), "population", 100),
        (country("Aland"), "area_km2", 10.0),
        (country("Borduria"), "population", 300),
        (country("Borduria"), "area_km2", 30.0),
        (country("Carpania"), "population", 200),
        (country("Carpania"), "area_km2", 50.0),
        (country("Aland"), "currency", Entity("currency", "ALD")),
        (country("Borduria"), "currency", Entity("currency", "EUR")),
        (country("Carpania"), "currency", Entity("currency", "EUR")),
        (city("Szohod"), "located_in", country("Borduria")),
        (city("Szohod"), "population", 50),
        (country("Borduria"), "capital", city("Szohod")),
        (city("Tirana2"), "located_in", country("Carpania")),
        (city("Tirana2"), "population", 20),
    ]
    triples = [Triple(s, r, o) for s, r, o in facts]
    for name in ("Aland", "Borduria", "Carpania"):
        triples.append(Triple(country(name), "continent", europe))
    for a, b in (("Aland", "Borduria"), ("Borduria", "Carpania")):
        triples += [
            Triple(country(a), "borders", country(b)),
            Triple(country(b), "borders", country(a)),
        ]
    return KnowledgeGraph(triples)


@pytest.fixture(scope="module")
def executor() -> Executor:
    return Executor(tiny_graph())


def test_graph_refuses_triples_that_break_the_relation_signature() -> None:
    graph = KnowledgeGraph()
    with pytest.raises(ValueError, match="capital needs a city object"):
        graph.add(Triple(country("X"), "capital", country("Y")))
    with pytest.raises(ValueError, match="population needs a number"):
        graph.add(Triple(country("X"), "population", "many"))
    with pytest.raises(ValueError, match="unknown relation"):
        graph.add(Triple(country("X"), "anthem", 1))
    with pytest.raises(ValueError, match="borders needs a country subject"):
        graph.add(Triple(city("X"), "borders", country("Y")))


def test_graph_queries(executor: Executor) -> None:
    graph = executor.graph
    assert graph.value(country("Borduria"), "capital") == city("Szohod")
    assert graph.value(country("Aland"), "capital") is None
    assert graph.subjects("currency", Entity("currency", "EUR")) == [
        country("Borduria"),
        country("Carpania"),
    ]
    assert [e.name for e in graph.entities("country")] == ["Aland", "Borduria", "Carpania"]


def test_lookups_lists_and_arithmetic(executor: Executor) -> None:
    call = executor.call
    assert call("get_capital", {"country": "Borduria"}) == "Szohod"
    assert call("get_city_population", {"city": "Szohod"}) == 50
    assert call("get_neighbours", {"country": "Borduria"}) == ["Aland", "Carpania"]
    assert call("countries_with_currency", {"currency": "EUR"}) == ["Borduria", "Carpania"]
    assert call("countries_in_continent", {"continent": "Europe"}) == [
        "Aland",
        "Borduria",
        "Carpania",
    ]
    assert call("argmax", {"countries": ["Aland", "Carpania"], "attribute": "area"}) == "Carpania"
    assert (
        call("argmax", {"countries": ["Aland", "Borduria", "Carpania"], "attribute": "population"})
        == "Borduria"
    )
    assert call("intersection", {"a": ["Aland", "Carpania"], "b": ["Carpania", "Borduria"]}) == [
        "Carpania"
    ]
    assert call("divide", {"a": 1, "b": 3}) == 0.3333
    assert call("compare", {"a": 2, "b": 2.0}) == "equal"
    assert call("count", {"items": ["x", "y"]}) == 2


@pytest.mark.parametrize(
    ("name", "arguments", "message"),
    [
        ("get_capital", {"country": "Aland"}, "no capital is known for country 'Aland'"),
        ("get_capital", {"country": "Atlantis"}, "unknown country 'Atlantis'"),
        ("get_capital", {}, r"missing required argument\(s\) \['country'\]"),
        ("get_capital", {"country": "Aland", "year": 2020}, r"unexpected argument\(s\) \['year'\]"),
        ("get_capital", {"country": 7}, "get_capital.country: expected string, got int"),
        ("add", {"a": True, "b": 1}, "add.a: expected number, got bool"),
        ("count", {"items": ["x", 1]}, r"count.items\[1\]: expected string"),
        ("argmax", {"countries": ["Aland"], "attribute": "gdp"}, "'gdp' is not one of"),
        ("divide", {"a": 1, "b": 0}, "b must not be zero"),
        ("fly", {}, "unknown tool 'fly'"),
        ("get_capital", ["Aland"], "get_capital: expected object, got list"),
    ],
)
def test_bad_calls_get_clear_errors(executor: Executor, name: str, arguments, message: str) -> None:
    with pytest.raises(ToolError, match=message):
        executor.call(name, arguments)


def test_tool_definitions_are_openai_function_schemas(executor: Executor) -> None:
    for tool in tool_definitions(executor.graph):
        assert tool["type"] == "function"
        function = tool["function"]
        assert set(function) == {"name", "description", "parameters"}
        parameters = function["parameters"]
        assert parameters["type"] == "object" and parameters["additionalProperties"] is False
        assert set(parameters["required"]) == set(parameters["properties"])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
names = st.sampled_from(["Aland", "Borduria", "Carpania", "Szohod", "Europe", "EUR", "", "x"])
argument_values = json_values | names | st.lists(names, max_size=4)


@settings(max_examples=200, deadline=None)
@given(
    name=st.sampled_from(
        [t["function"]["name"] for t in tool_definitions(tiny_graph())] + ["nope"]
    ),
    arguments=st.dictionaries(
        st.sampled_from(
            [
                "country",
                "city",
                "continent",
                "currency",
                "a",
                "b",
                "items",
                "countries",
                "attribute",
                "z",
            ]
        ),
        argument_values,
        max_size=3,
    )
    | json_values,
)
def test_any_call_returns_json_or_raises_tool_error(name: str, arguments) -> None:
    """Fuzz: whatever a model writes, the executor answers or refuses with a ToolError."""
    executor = Executor(tiny_graph())
    try:
        result = executor.call(name, arguments)
    except ToolError:
        return
    assert isinstance(result, (str, int, float, list))
