"""Preference pairs for DPO from the KG samples: the verified turn vs a near miss, for free.

A sample's gold chain is verified against the graph, so any deviation from it is wrong. At one
assistant turn we keep everything before it (the shared prompt) and write two continuations:
the gold turn (chosen) and a near miss (rejected), each through the turn's stop sequence, so the
pair differs only in what the model writes next. Near misses, each where it applies:

- ``wrong_tool``: the call goes to another tool that takes the same arguments
  (``get_capital`` for ``get_population``);
- ``wrong_argument``: one argument replaced by a value another sample passes to the same
  argument (another country, city or number), or a list argument missing its last item;
- ``missing_hop``: the turn skips its call and writes the next one (or, at the last call, the
  final answer) as if the skipped result were known;
- ``wrong_answer``: the final answer replaced by another sample's answer of the same pattern.

Both continuations are rendered by `render` itself, so they read exactly as the gold samples
do; the replacement values come from the samples, so no graph is needed.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ling_data.errors import DataError
from ling_data.kg.answers import answers_match
from ling_data.kg.render import IM_END, IM_START, render
from ling_data.sft import STOP_SEQUENCES, ChatSample

NEAR_MISSES = ("wrong_tool", "wrong_argument", "missing_hop", "wrong_answer")


@dataclass(frozen=True)
class PreferencePair:
    """Two samples sharing `text[:prompt_chars]`; the loss covers the one turn after it."""

    chosen: ChatSample
    rejected: ChatSample
    kind: str
    turn: int


class _Pools:
    """What the samples themselves offer as plausible wrong values."""

    def __init__(self, rows: list[dict]):
        self.tools_by_arguments: dict[frozenset, set[str]] = defaultdict(set)
        self.values: dict[str, list] = defaultdict(list)
        self.answers: dict[str, list[str]] = defaultdict(list)
        seen: set[tuple[str, str]] = set()
        for row in rows:
            self.answers[row["pattern"]].append(row["answer"])
            for call in row["calls"]:
                self.tools_by_arguments[frozenset(call["arguments"])].add(call["name"])
                for name, value in call["arguments"].items():
                    key = (name, json.dumps(value, sort_keys=True))
                    if not isinstance(value, list) and key not in seen:
                        seen.add(key)
                        self.values[name].append(value)


def _system(row: dict, source: str) -> str:
    """The system turn opening the sample (its tool list), as `render` was given it; "" for a
    sample rendered without one (`--tool-list none`), which opens with the user's turn."""
    if row["text"].startswith(f"{IM_START}user\n"):
        return ""
    end = row["text"].find(IM_END)
    if not row["text"].startswith(f"{IM_START}system\n") or end < 0:
        raise DataError(f"{source}: the text does not open with a system turn")
    return row["text"][:end + len(IM_END) + 1]


def _turn_text(row: dict, system: str, calls: list[dict], answer: str, turn: int) -> tuple[str, int]:
    """(text through turn `turn`'s stop sequence, where that turn starts) of a rendering."""
    text, turns = render(row["question"], calls, answer, system, row["format"])
    start = len(turns[turn]["prompt"])
    end = min(found + len(stop) for stop in STOP_SEQUENCES[row["format"]]
              if (found := text.find(stop, start)) >= 0)
    return text[:end], start


def _near_miss(kind: str, row: dict, pools: _Pools, rng: random.Random) -> tuple[list[dict], str, int] | None:
    """(calls, answer, turn) of one near miss of `kind`, or None where it does not apply."""
    calls, answer = row["calls"], row["answer"]
    if kind == "wrong_answer":
        others = [a for a in pools.answers[row["pattern"]] if not answers_match(a, answer)]
        return (calls, rng.choice(others), len(calls)) if others else None
    if kind == "missing_hop":
        if not calls:
            return None
        turn = rng.randrange(len(calls))
        return calls[:turn] + calls[turn + 1:], answer, turn
    options = []
    for turn, call in enumerate(calls):
        if kind == "wrong_tool":
            options += [(turn, {**call, "name": name})
                        for name in sorted(pools.tools_by_arguments[frozenset(call["arguments"])] - {call["name"]})]
        else:  # wrong_argument
            for name, value in call["arguments"].items():
                if isinstance(value, list):
                    if value:
                        options.append((turn, {**call, "arguments": {**call["arguments"], name: value[:-1]}}))
                    continue
                others = [v for v in pools.values[name] if v != value and type(v) is type(value)]
                if others:
                    options.append((turn, {**call, "arguments": {**call["arguments"], name: rng.choice(others)}}))
    if not options:
        return None
    turn, wrong = rng.choice(options)
    return calls[:turn] + [wrong] + calls[turn + 1:], answer, turn


def preference_pairs(rows: list[dict], seed: int = 0, sources: list[str] | None = None,
                     kinds: tuple[str, ...] = NEAR_MISSES) -> list[PreferencePair]:
    """One pair per sample and near-miss kind that applies to it, in order, drawn by `seed`."""
    unknown = set(kinds) - set(NEAR_MISSES)
    if unknown:
        raise ValueError(f"unknown near-miss kinds {sorted(unknown)}; expected some of {NEAR_MISSES}")
    pools = _Pools(rows)
    pairs = []
    for index, row in enumerate(rows):
        source = sources[index] if sources else f"<row {index}>"
        system = _system(row, source)
        rng = random.Random(f"{seed}:{row['id']}")
        for kind in kinds:
            miss = _near_miss(kind, row, pools, rng)
            if miss is None:
                continue
            calls, answer, turn = miss
            chosen, start = _turn_text(row, system, row["calls"], row["answer"], turn)
            rejected, rejected_start = _turn_text(row, system, calls, answer, turn)
            if not row["text"].startswith(chosen) or rejected[:rejected_start] != chosen[:start]:
                raise DataError(f"{source}: re-rendering the gold chain does not give the sample's text (was it "
                                f"written by another version of ling-data kg?)")
            if rejected == chosen:  # e.g. a hop skipped onto an identical call: no preference to learn
                continue
            pairs.append(PreferencePair(ChatSample(chosen, (start,), row["format"], source),
                                        ChatSample(rejected, (start,), row["format"], source), kind, turn))
    return pairs


def read_preference_pairs(path: str | Path, seed: int = 0) -> list[PreferencePair]:
    """Pairs from a `ling-data kg` JSONL file (its rows keep `question`, `calls` and `answer`)."""
    path = Path(path)
    rows, sources = [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: not found (expected ling-data kg's train.jsonl)") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        source = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{source}: invalid JSON ({e.msg})") from None
        missing = [k for k in ("id", "pattern", "format", "question", "calls", "answer", "text")
                   if not isinstance(row, dict) or k not in row]
        if missing:
            raise DataError(f"{source}: missing {', '.join(missing)} (preference pairs are built from ling-data "
                            f"kg's rows, which keep the gold calls and answer)")
        rows.append(row)
        sources.append(source)
    return preference_pairs(rows, seed, sources)
