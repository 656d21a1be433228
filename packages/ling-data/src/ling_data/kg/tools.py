"""The tools a model may call, as OpenAI-style JSON-schema definitions, and their executor.

`tool_definitions(graph)` is what goes to OUT/tools.json and into every system prompt.
`Executor(graph).call(name, arguments)` checks the arguments against the tool's schema first
(so a malformed call gets a `ToolError` that says which argument is wrong and what was
expected) and then answers from the graph. Results are plain JSON values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ling_data.kg.graph import Entity, KnowledgeGraph

DIVIDE_DECIMALS = 4
ARGMAX_ATTRIBUTES = {"population": "population", "area": "area_km2"}


class ToolError(ValueError):
    """A call the executor refuses: unknown tool, bad arguments, or a fact the graph lacks."""


def _string(description: str) -> dict:
    return {"type": "string", "description": description}


def _number(description: str) -> dict:
    return {"type": "number", "description": description}


def _strings(description: str) -> dict:
    return {"type": "array", "items": {"type": "string"}, "description": description}


def _function(name: str, description: str, **properties: dict) -> dict:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": properties,
                "required": list(properties),
                "additionalProperties": False,
            },
        },
    }


def tool_definitions(graph: KnowledgeGraph) -> list[dict]:
    """All tools, in a fixed order (the system prompt lists them in this order)."""
    country = _string("Country name in English, e.g. France.")
    city = _string("City name, e.g. Paris.")
    continents = [entity.name for entity in graph.entities("continent")]
    return [
        _function("get_capital", "The capital city of a country.", country=country),
        _function("get_population", "The population of a country.", country=country),
        _function("get_area", "The area of a country in square kilometres.", country=country),
        _function("get_currency", "The ISO 4217 code of a country's currency.", country=country),
        _function("get_continent", "The continent a country lies on.", country=country),
        _function(
            "get_neighbours",
            "The countries sharing a land border with a country, sorted.",
            country=country,
        ),
        _function("get_city_country", "The country a city is in.", city=city),
        _function("get_city_population", "The population of a city.", city=city),
        _function(
            "countries_in_continent",
            "All countries on a continent, sorted.",
            continent={"type": "string", "enum": continents, "description": "Continent name."},
        ),
        _function(
            "countries_with_currency",
            "All countries using a currency, sorted.",
            currency=_string("ISO 4217 currency code, e.g. EUR."),
        ),
        _function("add", "a + b.", a=_number("First number."), b=_number("Second number.")),
        _function(
            "subtract",
            "a - b.",
            a=_number("Number to subtract from."),
            b=_number("Number to subtract."),
        ),
        _function(
            "divide",
            f"a / b, rounded to {DIVIDE_DECIMALS} decimal places.",
            a=_number("Dividend."),
            b=_number("Divisor (not zero)."),
        ),
        _function(
            "compare",
            'Compare a with b: "greater", "less" or "equal".',
            a=_number("First number."),
            b=_number("Second number."),
        ),
        _function("count", "The number of items in a list.", items=_strings("Any list.")),
        _function(
            "intersection",
            "The items present in both lists, sorted.",
            a=_strings("First list."),
            b=_strings("Second list."),
        ),
        _function(
            "argmax",
            "The country with the largest value of an attribute among the given countries.",
            countries=_strings("Country names."),
            attribute={
                "type": "string",
                "enum": sorted(ARGMAX_ATTRIBUTES),
                "description": "What to maximise.",
            },
        ),
    ]


_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "number": lambda v: (
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}


def validate(value: Any, schema: dict, where: str) -> None:
    """Check `value` against the JSON-schema subset the tools use; raise ToolError naming `where`."""
    expected = schema.get("type")
    if expected is not None and not _JSON_TYPES[expected](value):
        raise ToolError(f"{where}: expected {expected}, got {type(value).__name__} {value!r}")
    if "enum" in schema and value not in schema["enum"]:
        raise ToolError(f"{where}: {value!r} is not one of {schema['enum']}")
    if expected == "array" and "items" in schema:
        for index, item in enumerate(value):
            validate(item, schema["items"], f"{where}[{index}]")
    if expected == "object":
        properties = schema.get("properties", {})
        missing = [key for key in schema.get("required", ()) if key not in value]
        if missing:
            raise ToolError(f"{where}: missing required argument(s) {missing}")
        if schema.get("additionalProperties") is False:
            extra = sorted(set(value) - set(properties))
            if extra:
                raise ToolError(
                    f"{where}: unexpected argument(s) {extra}; expected {sorted(properties)}"
                )
        for key, item in value.items():
            if key in properties:
                validate(item, properties[key], f"{where}.{key}")


class Executor:
    """Runs tool calls against a knowledge graph."""

    def __init__(self, graph: KnowledgeGraph) -> None:
        self.graph = graph
        self.schemas = {
            tool["function"]["name"]: tool["function"]["parameters"]
            for tool in tool_definitions(graph)
        }
        self._implementations: dict[str, Callable[..., Any]] = {
            "get_capital": lambda country: self._fact(self._country(country), "capital").name,
            "get_population": lambda country: self._fact(self._country(country), "population"),
            "get_area": lambda country: self._fact(self._country(country), "area_km2"),
            "get_currency": lambda country: self._fact(self._country(country), "currency").name,
            "get_continent": lambda country: self._fact(self._country(country), "continent").name,
            "get_neighbours": lambda country: _names(
                self.graph.objects(self._country(country), "borders")
            ),
            "get_city_country": lambda city: self._fact(self._city(city), "located_in").name,
            "get_city_population": lambda city: self._fact(self._city(city), "population"),
            "countries_in_continent": lambda continent: _names(
                self.graph.subjects("continent", self._named("continent", continent))
            ),
            "countries_with_currency": lambda currency: _names(
                self.graph.subjects("currency", self._named("currency", currency))
            ),
            "add": lambda a, b: a + b,
            "subtract": lambda a, b: a - b,
            "divide": self._divide,
            "compare": lambda a, b: "greater" if a > b else "less" if a < b else "equal",
            "count": lambda items: len(items),
            "intersection": lambda a, b: sorted(set(a) & set(b)),
            "argmax": self._argmax,
        }

    @property
    def tool_names(self) -> list[str]:
        return list(self.schemas)

    def call(self, name: str, arguments: Any) -> Any:
        """Validate the arguments against the tool's schema, then run it."""
        if name not in self.schemas:
            raise ToolError(f"unknown tool {name!r}; expected one of {self.tool_names}")
        validate(arguments, self.schemas[name], name)
        return self._implementations[name](**arguments)

    def _named(self, type: str, name: str) -> Entity:
        entity = self.graph.entity(type, name)
        if entity is None:
            raise ToolError(f"unknown {type} {name!r}")
        return entity

    def _country(self, name: str) -> Entity:
        return self._named("country", name)

    def _city(self, name: str) -> Entity:
        return self._named("city", name)

    def _fact(self, subject: Entity, relation: str) -> Any:
        value = self.graph.value(subject, relation)
        if value is None:
            raise ToolError(f"no {relation} is known for {subject.type} {subject.name!r}")
        return value

    def _divide(self, a: float, b: float) -> float:
        if b == 0:
            raise ToolError("divide: b must not be zero")
        return round(a / b, DIVIDE_DECIMALS)

    def _argmax(self, countries: list[str], attribute: str) -> str:
        if not countries:
            raise ToolError("argmax: countries must not be empty")
        relation = ARGMAX_ATTRIBUTES[attribute]
        values = [(self._fact(self._country(name), relation), name) for name in countries]
        # Largest value; ties go to the alphabetically first name, so the answer is unique.
        return min(values, key=lambda pair: (-pair[0], pair[1]))[1]


def _names(entities: list[Entity]) -> list[str]:
    return sorted(entity.name for entity in entities)
