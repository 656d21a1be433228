"""Offline fact-recall eval sets from the graph, on held-out entities only.

Multiple choice (`kg_mc.jsonl`): a sentence to continue and four same-type candidates, e.g.
"The capital of Kenya is" -> [" Nairobi", " Lusaka", ...]; each choice starts with a space so
that `question + choice` is the scored text. Generation (`kg_gen.jsonl`): a question prompt
and its accepted answers. Both use only the test split's countries and cities.
"""

from __future__ import annotations

import random
import unicodedata
from collections.abc import Callable

from ling_data.kg.graph import Entity, KnowledgeGraph
from ling_data.kg.split import EntitySplit
from ling_data.kg.wording import mention, sentence

N_CHOICES = 4

# relation name -> (MC stem, generation prompt, subject type, graph relation)
FACTS: dict[str, tuple[str, str, str, str]] = {
    "capital": (
        "The capital of {name} is",
        "Q: What is the capital of {name}?\nA:",
        "country",
        "capital",
    ),
    "continent": (
        "{name} is a country in",
        "Q: On which continent is {name}?\nA:",
        "country",
        "continent",
    ),
    "currency": (
        "The ISO code of the currency of {name} is",
        "Q: What is the ISO code of the currency of {name}?\nA:",
        "country",
        "currency",
    ),
    "city_country": (
        "{name} is a city in",
        "Q: In which country is the city of {name}?\nA:",
        "city",
        "located_in",
    ),
}


def _held_out_facts(
    graph: KnowledgeGraph, split: EntitySplit, subject_type: str, relation: str
) -> list[tuple[Entity, Entity]]:
    facts = []
    for subject in graph.entities(subject_type):
        if (
            str(subject) in split.test_entities
            and (value := graph.value(subject, relation)) is not None
        ):
            facts.append((subject, value))
    return facts


def _pool(graph: KnowledgeGraph, relation: str) -> list[str]:
    """Every value the relation takes anywhere in the graph: the distractor pool."""
    subject_type = "city" if relation == "located_in" else "country"
    return sorted(
        {
            graph.value(s, relation).name
            for s in graph.entities(subject_type)
            if graph.value(s, relation)
        }
    )


def _mention(subject: Entity) -> str:
    return mention(subject.name) if subject.type == "country" else subject.name


def _ascii(name: str) -> str:
    """The name without accents ("Brasília" -> "Brasilia"), an accepted spelling too."""
    decomposed = unicodedata.normalize("NFKD", name)
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def multiple_choice(graph: KnowledgeGraph, split: EntitySplit, seed: int) -> list[dict]:
    rng = random.Random(f"{seed}:kg-mc")
    rows = []
    for fact, (stem, _, subject_type, relation) in FACTS.items():
        pool = _pool(graph, relation)
        for subject, value in _held_out_facts(graph, split, subject_type, relation):
            distractors = rng.sample([name for name in pool if name != value.name], N_CHOICES - 1)
            choices = [value.name, *distractors]
            rng.shuffle(choices)
            rows.append(
                {
                    "id": f"kg-mc-{fact}-{len(rows):05d}",
                    "question": sentence(stem.format(name=_mention(subject))),
                    "choices": [f" {choice}" for choice in choices],
                    "answer": choices.index(value.name),
                }
            )
    return rows


def generation(
    graph: KnowledgeGraph, split: EntitySplit, currency_names: Callable[[str], list[str]]
) -> list[dict]:
    """`currency_names(code)` gives extra accepted spellings of a currency (e.g. "Euro")."""
    rows = []
    for fact, (_, prompt, subject_type, relation) in FACTS.items():
        for subject, value in _held_out_facts(graph, split, subject_type, relation):
            accepted = [value.name, _ascii(value.name)]
            if relation == "currency":
                accepted += currency_names(value.name)
            rows.append(
                {
                    "id": f"kg-gen-{fact}-{len(rows):05d}",
                    "prompt": prompt.format(name=_mention(subject)),
                    "answer": list(dict.fromkeys(accepted)),
                }
            )
    return rows
