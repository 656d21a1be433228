"""Few-shot prompts and answer normalisation."""

from __future__ import annotations

import math
import random
import re
from typing import Any

from ling_eval.tasks import GENERATION, MULTIPLE_CHOICE, Task

_WHITESPACE = re.compile(r"\s+")


def fewshot_indices(task: Task, index: int, seed: int) -> list[int]:
    """`num_fewshot` other items of the task, drawn by (seed, item id): the same item gets the
    same examples in every run and on every checkpoint, whatever the order of evaluation."""
    k = task.options.num_fewshot
    if k == 0:
        return []
    rng = random.Random(f"{seed}:{task.items[index]['id']}")
    others = [i for i in range(len(task.items)) if i != index]
    return rng.sample(others, k)


def solved_example(task: Task, item: dict[str, Any]) -> str:
    if task.kind == MULTIPLE_CHOICE:
        return item["question"] + item["choices"][item["answer"]]
    if task.kind == GENERATION:
        answers = item["answer"]
        return item["prompt"] + (answers if isinstance(answers, str) else answers[0])
    raise ValueError(f"few-shot examples are not defined for {task.kind} tasks")


def with_fewshot(task: Task, index: int, seed: int, text: str) -> str:
    shots = [solved_example(task, task.items[i]) for i in fewshot_indices(task, index, seed)]
    return task.options.fewshot_separator.join([*shots, text])


def normalize(text: str) -> str:
    """Strip, casefold, collapse whitespace."""
    return _WHITESPACE.sub(" ", text.strip().casefold())


def _as_number(text: str) -> float | None:
    try:
        value = float(text.replace(",", "")) if text else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def answers_match(predicted: Any, gold: Any) -> bool:
    """Normalised string equality; numbers compare as numbers (relative tolerance 1e-6)."""
    if isinstance(gold, (list, dict)) or isinstance(predicted, (list, dict)):
        if type(gold) is not type(predicted) or len(gold) != len(predicted):
            return False
        if isinstance(gold, dict):
            return gold.keys() == predicted.keys() and all(answers_match(predicted[k], gold[k]) for k in gold)
        return all(answers_match(p, g) for p, g in zip(predicted, gold))
    p, g = normalize(str(predicted)), normalize(str(gold))
    if isinstance(gold, bool) or isinstance(predicted, bool):
        return p == g
    pn, gn = _as_number(p), _as_number(g)
    if pn is not None and gn is not None:
        return math.isclose(pn, gn, rel_tol=1e-6, abs_tol=1e-12)
    return p == g
