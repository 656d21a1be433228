"""The verifier: re-execute a gold chain and keep the sample only if it reproduces the answer.

`check_chain` re-runs every call with its recorded arguments, checks each result against the
recorded one, checks that arguments the pattern wires from earlier results (`Ref`) carry those
results, and checks that the pattern's final step over the re-executed calls gives the answer.
It returns why a chain fails, or None when it holds.
"""

from __future__ import annotations

from typing import Any

from ling_data.kg.answers import answers_match, format_answer
from ling_data.kg.patterns import PATTERNS_BY_NAME, Pattern, Ref
from ling_data.kg.tools import Executor, ToolError


def check_chain(pattern: Pattern, calls: list[dict], answer: str, executor: Executor) -> str | None:
    shape = pattern.shape()
    if [call["name"] for call in calls] != [name for name, _ in shape]:
        return f"calls {[c['name'] for c in calls]} do not follow the pattern's plan {[n for n, _ in shape]}"
    rerun: list[dict] = []
    for index, (call, (_, wiring)) in enumerate(zip(calls, shape, strict=True)):
        for key, source in wiring.items():
            if (
                isinstance(source, Ref)
                and call["arguments"].get(key) != rerun[source.index]["result"]
            ):
                return f"call {index} argument {key!r} is not the result of call {source.index}"
        try:
            result = executor.call(call["name"], call["arguments"])
        except ToolError as error:
            return f"call {index} fails: {error}"
        if not _same(result, call["result"]):
            return f"call {index} returns {result!r}, recorded {call['result']!r}"
        rerun.append({**call, "result": result})
    derived = format_answer(pattern.finish(rerun))
    if not answers_match(derived, answer):
        return f"the chain gives {derived!r}, the answer is {answer!r}"
    return None


def check_sample(sample: dict, executor: Executor) -> str | None:
    """`check_chain` for an emitted JSONL sample (looked up by its pattern name)."""
    pattern = PATTERNS_BY_NAME.get(sample.get("pattern"))
    if pattern is None:
        return f"unknown pattern {sample.get('pattern')!r}"
    return check_chain(pattern, sample["calls"], sample["answer"], executor)


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b
