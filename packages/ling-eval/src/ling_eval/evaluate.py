"""Run tasks on a model: `evaluate(model, tokenizer, tasks, seed) -> [TaskResult]`.

Each task kind turns its items into the queries of `ling_eval.scoring`, then into per-item
(numerator, denominator) pairs per metric, from which `TaskResult` computes the score and its
bootstrap interval. Per-item values are kept so two checkpoints can be compared item by item.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from ling_eval import scoring
from ling_eval.model import EvalModel, Tokenizer
from ling_eval.prompts import normalize, with_fewshot
from ling_eval.stats import bootstrap_interval
from ling_eval.tasks import GENERATION, MULTIPLE_CHOICE, PERPLEXITY, TOOL_CALL, Task
from ling_eval.toolcalls import STOP, parse_turn, score_turn


@dataclass(frozen=True)
class MetricSpec:
    higher_is_better: bool = True
    transform: str = "identity"  # "exp": score = exp(sum(num) / sum(den)) (perplexity)


METRICS: dict[str, dict[str, MetricSpec]] = {
    MULTIPLE_CHOICE: {"acc": MetricSpec(), "acc_norm_token": MetricSpec(), "acc_norm_byte": MetricSpec()},
    GENERATION: {"exact_match": MetricSpec(), "contains": MetricSpec()},
    PERPLEXITY: {"bits_per_byte": MetricSpec(False), "nll_per_token": MetricSpec(False),
                 "perplexity": MetricSpec(False, "exp")},
    TOOL_CALL: {"turn_acc": MetricSpec(), "tool_name": MetricSpec(), "arguments": MetricSpec(),
                "final_answer": MetricSpec(), "chain": MetricSpec()},
}
PRIMARY = {MULTIPLE_CHOICE: "acc", GENERATION: "exact_match", PERPLEXITY: "bits_per_byte", TOOL_CALL: "turn_acc"}
DEFAULT_MAX_NEW_TOKENS = {GENERATION: 32, TOOL_CALL: 128}


@dataclass
class MetricResult:
    value: float
    ci_low: float
    ci_high: float
    higher_is_better: bool


@dataclass
class TaskResult:
    task: str
    kind: str
    path: str
    sha256: str
    seed: int
    num_fewshot: int
    num_items: int
    primary: str
    metrics: dict[str, MetricResult]
    item_ids: list[str] = field(repr=False)
    # metric -> [numerators, denominators], aligned with item_ids (for paired comparisons)
    item_scores: dict[str, list[list[float]]] = field(repr=False)
    predictions: list[Any] = field(default_factory=list, repr=False)

    @property
    def score(self) -> float:
        return self.metrics[self.primary].value

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TaskResult":
        data = dict(data)
        data["metrics"] = {k: MetricResult(**v) for k, v in data["metrics"].items()}
        return cls(**data)


def _progress_bar(task: Task, total: int, enabled: bool):
    return tqdm(total=total, desc=task.name, unit="req", file=sys.stderr, disable=not enabled,
                leave=False, dynamic_ncols=True)


def _encode_context(tokenizer: Tokenizer, text: str) -> tuple[int, ...]:
    # Documents follow EOS in training, so EOS is the natural start of a context.
    return (tokenizer.eos_id, *tokenizer.encode(text))


def run_multiple_choice(model: EvalModel, tokenizer: Tokenizer, task: Task, seed: int, batch_size: int,
                        progress: bool, share_context: bool | None = None):
    requests, owners = [], []
    for i, item in enumerate(task.items):
        context = _encode_context(tokenizer, with_fewshot(task, i, seed, item["question"]))
        for choice in item["choices"]:
            requests.append(scoring.Request(context, tuple(tokenizer.encode(choice))))
            owners.append(i)
    with _progress_bar(task, len(requests), progress) as bar:
        scores = scoring.loglikelihood(model, requests, batch_size, share_context, progress=bar.update)
    per_item: dict[int, list[scoring.Score]] = {}
    for owner, score in zip(owners, scores):
        per_item.setdefault(owner, []).append(score)
    values: dict[str, list[float]] = {name: [] for name in METRICS[MULTIPLE_CHOICE]}
    predictions = []
    for i, item in enumerate(task.items):
        item_scores = per_item[i]
        byte_lengths = [max(len(c.encode("utf-8")), 1) for c in item["choices"]]
        raw = [s.logprob for s in item_scores]
        by_token = [s.logprob / s.tokens for s in item_scores]
        by_byte = [s.logprob / n for s, n in zip(item_scores, byte_lengths)]
        for name, row in (("acc", raw), ("acc_norm_token", by_token), ("acc_norm_byte", by_byte)):
            values[name].append(float(int(np.argmax(row)) == item["answer"]))
        predictions.append({"logprobs": raw, "choice": int(np.argmax(raw))})
    return {name: (v, [1.0] * len(v)) for name, v in values.items()}, predictions


def extract_answer(text: str, regex: str | None) -> str:
    if regex is None:
        return text
    match = re.search(regex, text)
    if match is None:
        return ""
    return match.group(1) if match.groups() else match.group(0)


def run_generation(model: EvalModel, tokenizer: Tokenizer, task: Task, seed: int, batch_size: int,
                   progress: bool, share_context: bool | None = None):
    max_new = task.options.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[GENERATION]
    exact, contains, predictions = [], [], []
    for i, item in enumerate(tqdm(task.items, desc=task.name, unit="item", file=sys.stderr,
                                  disable=not progress, leave=False, dynamic_ncols=True)):
        prompt = _encode_context(tokenizer, with_fewshot(task, i, seed, item["prompt"]))
        output = scoring.greedy_generate(model, tokenizer, prompt, max_new, task.options.stop)
        answers = [item["answer"]] if isinstance(item["answer"], str) else item["answer"]
        extracted = normalize(extract_answer(output, task.options.regex))
        gold = [normalize(a) for a in answers]
        exact.append(float(extracted in gold))
        contains.append(float(any(g and g in normalize(output) for g in gold)))
        predictions.append(output)
    ones = [1.0] * len(exact)
    return {"exact_match": (exact, ones), "contains": (contains, ones)}, predictions


def run_perplexity(model: EvalModel, tokenizer: Tokenizer, task: Task, seed: int, batch_size: int,
                   progress: bool, share_context: bool | None = None):
    tokens = [tokenizer.encode(item["text"]) for item in task.items]
    windows = sum(math.ceil(len(t) / model.max_length) for t in tokens)
    with _progress_bar(task, windows, progress) as bar:
        logprobs = scoring.rolling_loglikelihood(model, tokens, tokenizer.eos_id, batch_size, bar.update)
    nll = [-lp for lp in logprobs]
    n_bytes = [float(len(item["text"].encode("utf-8"))) for item in task.items]
    n_tokens = [float(len(t)) for t in tokens]
    bits = [x / math.log(2) for x in nll]
    return {"bits_per_byte": (bits, n_bytes), "nll_per_token": (nll, n_tokens),
            "perplexity": (nll, n_tokens)}, None


def run_tool_calls(model: EvalModel, tokenizer: Tokenizer, task: Task, seed: int, batch_size: int,
                   progress: bool, share_context: bool | None = None):
    """Teacher-forced: each turn starts from the gold history and is scored on its own."""
    max_new = task.options.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[TOOL_CALL]
    names = ("turn_acc", "tool_name", "arguments", "final_answer", "chain")
    values = {name: ([], []) for name in names}
    predictions = []
    turns_total = sum(len(item["turns"]) for item in task.items)
    with tqdm(total=turns_total, desc=task.name, unit="turn", file=sys.stderr, disable=not progress,
              leave=False, dynamic_ncols=True) as bar:
        for item in task.items:
            scores, outputs = [], []
            for turn in item["turns"]:
                prompt = _encode_context(tokenizer, turn["prompt"])
                output = scoring.greedy_generate(model, tokenizer, prompt, max_new, STOP[item["format"]])
                scores.append(score_turn(parse_turn(output, item["format"]), turn["expect"]))
                outputs.append(output)
                bar.update(1)
            calls = [s for s in scores if s.is_call]
            finals = [s for s in scores if not s.is_call]
            rows = {"turn_acc": (sum(s.correct for s in scores), len(scores)),
                    "tool_name": (sum(s.name_correct for s in calls), len(calls)),
                    "arguments": (sum(s.arguments_correct for s in calls), len(calls)),
                    "final_answer": (sum(s.answer_correct for s in finals), len(finals)),
                    "chain": (float(all(s.correct for s in scores)), 1)}
            for name, (num, den) in rows.items():
                values[name][0].append(float(num))
                values[name][1].append(float(den))
            predictions.append(outputs)
    return values, predictions


RUNNERS = {MULTIPLE_CHOICE: run_multiple_choice, GENERATION: run_generation,
           PERPLEXITY: run_perplexity, TOOL_CALL: run_tool_calls}


def evaluate_task(model: EvalModel, tokenizer: Tokenizer, task: Task, seed: int = 0, batch_size: int = 32,
                  progress: bool = False, share_context: bool | None = None, limit: int | None = None,
                  keep_predictions: bool = True, resamples: int = 1000) -> TaskResult:
    """Score one task. `limit`: only the first N items (few-shot examples still come from all)."""
    if limit is not None:
        task = _limited(task, limit)
    values, predictions = RUNNERS[task.kind](model, tokenizer, task, seed, batch_size, progress, share_context)
    metrics = {}
    for name, spec in METRICS[task.kind].items():
        num, den = values[name]
        if sum(den) == 0:  # e.g. no final-answer turns in these items
            continue
        interval = bootstrap_interval(num, den, spec.transform, resamples=resamples, seed=seed)
        metrics[name] = MetricResult(interval.value, interval.low, interval.high, spec.higher_is_better)
    return TaskResult(task.name, task.kind, task.path, task.sha256, seed, task.options.num_fewshot,
                      len(task.items), PRIMARY[task.kind], metrics, [item["id"] for item in task.items],
                      {name: [list(map(float, n)), list(map(float, d))] for name, (n, d) in values.items()},
                      (predictions or []) if keep_predictions else [])


def _limited(task: Task, limit: int) -> Task:
    """The first `limit` items; few-shot examples are drawn from the items kept."""
    from dataclasses import replace
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    items = task.items[:limit]
    if task.options.num_fewshot >= len(items):
        items = task.items[: task.options.num_fewshot + 1]
    return replace(task, items=items)


def evaluate(model: EvalModel, tokenizer: Tokenizer, tasks: Sequence[Task], seed: int = 0,
             batch_size: int = 32, progress: bool = False, **kwargs: Any) -> list[TaskResult]:
    return [evaluate_task(model, tokenizer, task, seed, batch_size, progress, **kwargs) for task in tasks]
