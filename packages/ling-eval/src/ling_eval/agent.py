"""Free-running tool use: the model writes a call, it is executed, the result goes back, until
the model gives a final answer (or runs out of calls).

Unlike the teacher-forced `tool calls` task, nothing of the gold chain is shown after the
question: a wrong first call changes what the model sees next, as it would in use. The tools
run through `execute(name, arguments) -> result` (for ling-data's KG tools:
`ling_data.kg.Executor(graph).call`); an exception from it goes back to the model as the
result `{"error": "..."}`. Results are rendered as ling-data renders gold results (the
contract of TOOLUSE_FORMAT.md): json: `<|im_end|>` then a `tool` turn
`<tool_response>RESULT</tool_response>` and a new assistant turn; react: `\\nObservation: RESULT\\n`.

Scores per episode, each a (numerator, denominator) pair so intervals resample episodes:
- `exact_sequence`: the calls made are the gold calls, in order (names and arguments), 1 or 0;
- `tool_name` / `arguments`: gold call i matched by call i (name; name and arguments);
- `final_answer`: the final answer matches the gold one;
- `json_valid`: the calls whose arguments parsed as a JSON object, of the turns that tried a
  call. A json-format call that does not parse has no name either, so it ends the episode; a
  react `Action:` with broken `Action Input` runs with arguments None and gets the error back.
`evaluate_agent` groups episodes (by pattern and by format, for ling-data's samples) and gives
each metric of each group its bootstrap interval.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from ling_eval import scoring
from ling_eval.model import EvalModel, Tokenizer
from ling_eval.prompts import answers_match
from ling_eval.stats import bootstrap_interval
from ling_eval.toolcalls import STOP, parse_turn

METRICS = ("exact_sequence", "tool_name", "arguments", "final_answer", "json_valid")
CALL_MARKER = {"json": "<tool_call>", "react": "Action:"}
Execute = Callable[[str, Any], Any]


@dataclass
class Episode:
    calls: list[tuple[str, Any]] = field(default_factory=list)  # (name, arguments) as the model wrote them
    attempts: int = 0  # turns that tried a call (`<tool_call>` / `Action:`), parsed or not
    final_answer: str | None = None
    outputs: list[str] = field(default_factory=list)  # each generated turn, as text


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def continuation(fmt: str, output: str, result: Any) -> str:
    """What follows a generated call turn in the context: the turn's end and the tool's result."""
    if fmt == "json":
        return (f"{output}<|im_end|>\n<|im_start|>tool\n<tool_response>{_dumps(result)}</tool_response>"
                f"<|im_end|>\n<|im_start|>assistant\n")
    return f"{output}\nObservation: {_dumps(result)}\n"


def run_episode(model: EvalModel, tokenizer: Tokenizer, prompt: str, fmt: str, execute: Execute,
                max_calls: int = 6, max_new_tokens: int = 256) -> Episode:
    """Generate from `prompt` (the sample's text up to the first assistant turn)."""
    episode, context = Episode(), prompt
    for _ in range(max_calls + 1):
        ids = (tokenizer.eos_id, *tokenizer.encode(context))  # as in training: a context follows EOS
        output = scoring.greedy_generate(model, tokenizer, ids, max_new_tokens, STOP[fmt])
        episode.outputs.append(output)
        parsed = parse_turn(output, fmt)
        episode.attempts += CALL_MARKER[fmt] in output
        if parsed.name is None:  # a final answer, or nothing recognisable: the episode ends
            episode.final_answer = parsed.final_answer
            break
        if len(episode.calls) == max_calls:
            break
        episode.calls.append((parsed.name, parsed.arguments))
        try:
            result = execute(parsed.name, parsed.arguments)
        except Exception as error:  # the model sees the failure, as a caller would report it
            result = {"error": str(error)}
        context += continuation(fmt, output, result)
    return episode


def score_episode(episode: Episode, gold_calls: Sequence[dict], gold_answer: Any) -> dict[str, tuple[float, float]]:
    made = episode.calls
    names = [name == gold["name"] for (name, _), gold in zip(made, gold_calls)]
    arguments = [ok and isinstance(args, dict) and answers_match(args, gold["arguments"])
                 for ok, (_, args), gold in zip(names, made, gold_calls)]
    return {
        "exact_sequence": (float(len(made) == len(gold_calls) and all(arguments)), 1.0),
        "tool_name": (float(sum(names)), float(len(gold_calls))),
        "arguments": (float(sum(arguments)), float(len(gold_calls))),
        "final_answer": (float(episode.final_answer is not None and answers_match(episode.final_answer, gold_answer)),
                         1.0),
        "json_valid": (float(sum(isinstance(args, dict) for _, args in made)), float(episode.attempts)),
    }


def first_prompt(item: dict) -> str:
    """The text up to the first assistant turn (`turns[0]`'s prompt, spelled out or by length)."""
    turn = item["turns"][0]
    return turn["prompt"] if "prompt" in turn else item["text"][:turn["prompt_chars"]]


@dataclass
class AgentResult:
    """Per group ("all", "pattern=...", "format=..."): metric -> (value, ci_low, ci_high, episodes)."""

    groups: dict[str, dict[str, tuple[float, float, float, int]]]
    episodes: list[dict[str, Any]] = field(repr=False)


def evaluate_agent(model: EvalModel, tokenizer: Tokenizer, items: Iterable[dict], execute: Execute,
                   group_by: Sequence[str] = ("pattern", "format"), seed: int = 0, max_calls: int = 6,
                   max_new_tokens: int = 256, resamples: int = 1000, progress: bool = False) -> AgentResult:
    """Run one episode per item (ling-data kg rows: `calls`, `answer`, `format`, `turns`)."""
    items = list(items)
    rows = []
    for item in tqdm(items, desc="tool use", unit="episode", file=sys.stderr, disable=not progress, leave=False):
        episode = run_episode(model, tokenizer, first_prompt(item), item["format"], execute, max_calls,
                              max_new_tokens)
        scores = score_episode(episode, item["calls"], item["answer"])
        rows.append({"id": item.get("id"), **{key: item.get(key) for key in group_by}, "scores": scores,
                     "calls": [[name, args] for name, args in episode.calls], "final_answer": episode.final_answer,
                     "outputs": episode.outputs})
    groups: dict[str, list[dict]] = {"all": rows}
    for key in group_by:
        for row in rows:
            groups.setdefault(f"{key}={row[key]}", []).append(row)
    summary = {}
    for name, members in groups.items():
        summary[name] = {}
        for metric in METRICS:
            num = [row["scores"][metric][0] for row in members]
            den = [row["scores"][metric][1] for row in members]
            if sum(den) == 0:
                continue
            interval = bootstrap_interval(num, den, resamples=resamples, seed=seed)
            summary[name][metric] = (interval.value, interval.low, interval.high, len(members))
    return AgentResult(summary, rows)
