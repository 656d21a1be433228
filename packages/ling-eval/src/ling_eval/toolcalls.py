"""Parse a model's tool-call turn (json or ReAct rendering) and score it against the gold turn.

The rendering and parsing rules are those of ling-data's KG tool-use samples (TOOLUSE_FORMAT.md):
- json: the first `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, or a line
  `Final Answer: X`; generation stops at `<|im_end|>`.
- react: `Action: NAME` + `Action Input: {json}`, or `Final Answer: X`; generation stops at
  `\\nObservation:` or `<|im_end|>`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ling_eval.prompts import answers_match

STOP = {"json": ("<|im_end|>",), "react": ("\nObservation:", "<|im_end|>")}
_TOOL_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
_FINAL = re.compile(r"Final Answer:[ \t]*(.*)")
_ACTION = re.compile(r"Action:[ \t]*(\S+)")
_ACTION_INPUT = re.compile(r"Action Input:[ \t]*(.*)", re.DOTALL)


@dataclass(frozen=True)
class Parsed:
    name: str | None = None
    arguments: Any = None  # the decoded JSON arguments, or None if they did not parse
    final_answer: str | None = None


def _first_json_object(text: str) -> Any:
    try:
        value, _ = json.JSONDecoder().raw_decode(text.strip())
        return value
    except json.JSONDecodeError:
        return None


def parse_turn(text: str, fmt: str) -> Parsed:
    """What the model did in one turn: a tool call, a final answer, or nothing recognisable."""
    if fmt == "json":
        call = _TOOL_CALL.search(text)
        if call:
            obj = _first_json_object(call.group(1))
            if isinstance(obj, dict) and isinstance(obj.get("name"), str):
                return Parsed(obj["name"], obj.get("arguments"))
    else:
        action = _ACTION.search(text)
        if action:
            after = text[action.end():]
            given = _ACTION_INPUT.search(after)
            return Parsed(action.group(1), _first_json_object(given.group(1)) if given else None)
    final = _FINAL.search(text)
    if final:
        return Parsed(final_answer=final.group(1).strip())
    return Parsed()


@dataclass(frozen=True)
class TurnScore:
    is_call: bool  # the gold turn is a tool call (else a final answer)
    name_correct: bool
    arguments_correct: bool
    answer_correct: bool

    @property
    def correct(self) -> bool:
        return self.arguments_correct if self.is_call else self.answer_correct


def score_turn(parsed: Parsed, expect: dict[str, Any]) -> TurnScore:
    if "tool_call" in expect:
        gold = expect["tool_call"]
        name_ok = parsed.name == gold["name"]
        args_ok = name_ok and isinstance(parsed.arguments, dict) and answers_match(parsed.arguments, gold["arguments"])
        return TurnScore(True, name_ok, args_ok, False)
    answer_ok = parsed.final_answer is not None and answers_match(parsed.final_answer, expect["final_answer"])
    return TurnScore(False, False, False, answer_ok)
