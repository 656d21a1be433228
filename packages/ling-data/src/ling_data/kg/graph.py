"""A small typed knowledge graph: entities of a few types joined by typed relations.

Every fact is a `Triple(subject, relation, object)`; `RELATIONS` names, for each relation, the
type of its subject and the type of its object ("number" for literal values), so a triple
that breaks its relation's signature is refused when it is added.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

ENTITY_TYPES = ("country", "city", "continent", "currency")

# relation -> (subject type, object type); "number" objects are int/float literals.
RELATIONS: dict[str, tuple[str, str]] = {
    "capital": ("country", "city"),
    "located_in": ("city", "country"),
    "continent": ("country", "continent"),
    "currency": ("country", "currency"),
    "borders": ("country", "country"),
    "population": ("country|city", "number"),
    "area_km2": ("country", "number"),
}


@dataclass(frozen=True, order=True)
class Entity:
    """A node: its type and its name (unique within the type)."""

    type: str
    name: str

    def __str__(self) -> str:
        return f"{self.type}:{self.name}"


@dataclass(frozen=True)
class Triple:
    subject: Entity
    relation: str
    object: Entity | int | float


class KnowledgeGraph:
    """Typed triples with the few indexes the tools and the question patterns need."""

    def __init__(self, triples: Iterable[Triple] = ()) -> None:
        self._triples: list[Triple] = []
        self._by_type: dict[str, dict[str, Entity]] = {t: {} for t in ENTITY_TYPES}
        self._forward: dict[tuple[Entity, str], list[Entity | int | float]] = defaultdict(list)
        self._backward: dict[tuple[str, Entity], list[Entity]] = defaultdict(list)
        for triple in triples:
            self.add(triple)

    def add(self, triple: Triple) -> None:
        if triple.relation not in RELATIONS:
            raise ValueError(
                f"unknown relation {triple.relation!r}; expected one of {sorted(RELATIONS)}"
            )
        subject_types, object_type = RELATIONS[triple.relation]
        if triple.subject.type not in subject_types.split("|"):
            raise ValueError(
                f"{triple.relation} needs a {subject_types} subject, got {triple.subject}"
            )
        if object_type == "number":
            if not isinstance(triple.object, (int, float)) or isinstance(triple.object, bool):
                raise ValueError(f"{triple.relation} needs a number object, got {triple.object!r}")
        elif not isinstance(triple.object, Entity) or triple.object.type != object_type:
            raise ValueError(f"{triple.relation} needs a {object_type} object, got {triple.object}")
        self._triples.append(triple)
        self._register(triple.subject)
        self._forward[(triple.subject, triple.relation)].append(triple.object)
        if isinstance(triple.object, Entity):
            self._register(triple.object)
            self._backward[(triple.relation, triple.object)].append(triple.subject)

    def _register(self, entity: Entity) -> None:
        if entity.type not in self._by_type:
            raise ValueError(f"unknown entity type {entity.type!r}; expected one of {ENTITY_TYPES}")
        self._by_type[entity.type].setdefault(entity.name, entity)

    def __iter__(self) -> Iterator[Triple]:
        return iter(self._triples)

    def __len__(self) -> int:
        return len(self._triples)

    def entity(self, type: str, name: str) -> Entity | None:
        """The entity of this type and name, or None when the graph has no such node."""
        return self._by_type.get(type, {}).get(name)

    def entities(self, type: str) -> list[Entity]:
        """All entities of a type, sorted by name (a stable order for seeded sampling)."""
        return sorted(self._by_type[type].values())

    def objects(self, subject: Entity, relation: str) -> list:
        """Objects of `subject --relation-->`, in insertion order."""
        return list(self._forward.get((subject, relation), ()))

    def value(self, subject: Entity, relation: str):
        """The single object of a functional relation, or None when the fact is missing."""
        found = self._forward.get((subject, relation), ())
        if len(found) > 1:
            raise ValueError(f"{subject} has {len(found)} {relation!r} facts; expected at most one")
        return found[0] if found else None

    def subjects(self, relation: str, object: Entity) -> list[Entity]:
        """Subjects of `--relation--> object`, sorted by name."""
        return sorted(self._backward.get((relation, object), ()))
