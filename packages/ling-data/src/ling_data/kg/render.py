"""Render a question and its gold calls as a chat, in the two tool-call formats of the contract.

"json": one assistant turn `<tool_call>{"name", "arguments"}</tool_call>` per call, each answered
by a `tool` turn `<tool_response>RESULT</tool_response>`, then an assistant "Final Answer: X".
"react": one assistant turn holding Thought / Action / Action Input / Observation steps and a
closing "Final Answer: X". Both return the full `text` and the teacher-forced `turns`, whose
prompts end exactly where the model starts writing.

Every prompt is a prefix of `text`, so the written samples store a turn as `prompt_chars`
(the prompt is `text[:prompt_chars]`, counted in Unicode code points) rather than the prompt
itself (`compact_turns`): the ~5 KB tool list then appears once per sample, not once per turn.
"""

from __future__ import annotations

import json
from typing import Any

from ling_data.kg.wording import mention

FORMATS = ("json", "react")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"

THOUGHTS = {
    "get_capital": "I need the capital of {country}.",
    "get_population": "I need the population of {country}.",
    "get_area": "I need the area of {country}.",
    "get_currency": "I need the currency of {country}.",
    "get_continent": "I need the continent of {country}.",
    "get_neighbours": "I need the neighbours of {country}.",
    "get_city_country": "I need the country of {city}.",
    "get_city_population": "I need the population of {city}.",
    "countries_in_continent": "I need the countries of {continent}.",
    "countries_with_currency": "I need the countries that use {currency}.",
    "add": "I add the two numbers.",
    "subtract": "I subtract the second number from the first.",
    "divide": "I divide the first number by the second.",
    "compare": "I compare the two numbers.",
    "count": "I count the items.",
    "intersection": "I keep the countries that are in both lists.",
    "argmax": "I pick the country with the largest {attribute}.",
}


def dumps(value: Any) -> str:
    """JSON as it appears inside a rendering: default separators, non-ASCII kept as is."""
    return json.dumps(value, ensure_ascii=False)


def _turn(role: str, content: str) -> str:
    return f"{IM_START}{role}\n{content}{IM_END}\n"


TOOL_LISTS = ("json", "signatures", "none")


def system_prompt(tools: list[dict], tool_list: str = "json") -> str:
    """The system turn listing the tools: their JSON schemas as written to tools.json ("json",
    ~5.3K characters, ~1,750 tokens of the default tokenizer), or one signature line per tool
    ("signatures", ~1.4K characters, ~500 tokens), short enough for a small model's context on a CPU.
    "none" leaves the system turn out: with one fixed tool set the list is the same in every
    sample, and a model as small as the tiny preset learnt to read the question only without it
    (see the root README's tool-use section)."""
    if tool_list == "none":
        return ""
    if tool_list == "json":
        listing = json.dumps(tools, ensure_ascii=False, separators=(",", ":"))
    elif tool_list == "signatures":
        listing = "\n".join(signature(tool) for tool in tools)
    else:
        raise ValueError(f"unknown tool list {tool_list!r}; expected one of {TOOL_LISTS}")
    return _turn("system", f"You can call these tools:\n{listing}")


def signature(tool: dict) -> str:
    """`name(arg: type, ...): description` of an OpenAI-style function schema."""
    function = tool["function"]
    parameters = function["parameters"]
    required = set(parameters.get("required", ()))
    args = ", ".join(f"{name}{'' if name in required else '?'}: {_type_name(schema)}"
                     for name, schema in parameters["properties"].items())
    return f"{function['name']}({args}): {function['description']}"


def _type_name(schema: dict) -> str:
    if "enum" in schema:
        return " | ".join(dumps(value) for value in schema["enum"])
    if schema.get("type") == "array":
        return f"list of {_type_name(schema.get('items', {}))}"
    return str(schema.get("type", "any"))


def render(
    question: str, calls: list[dict], answer: str, system: str, format: str
) -> tuple[str, list[dict]]:
    """(text, turns) for one sample; `system` is `system_prompt(tools)`, shared by all samples."""
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {FORMATS}")
    context = system + _turn("user", question)
    turns = []
    if format == "json":
        for call in calls:
            turns.append({"prompt": context + f"{IM_START}assistant\n", "expect": _tool_call(call)})
            request = dumps({"name": call["name"], "arguments": call["arguments"]})
            context += _turn("assistant", f"<tool_call>{request}</tool_call>")
            context += _turn("tool", f"<tool_response>{dumps(call['result'])}</tool_response>")
        prompt = context + f"{IM_START}assistant\n"
    else:
        context += f"{IM_START}assistant\n"
        for call in calls:
            turns.append({"prompt": context, "expect": _tool_call(call)})
            thought = THOUGHTS[call["name"]].format(**_worded(call["arguments"]))
            context += (
                f"Thought: {thought}\nAction: {call['name']}\nAction Input: {dumps(call['arguments'])}\n"
                f"Observation: {dumps(call['result'])}\n"
            )
        prompt = context
    turns.append({"prompt": prompt, "expect": {"final_answer": answer}})
    return prompt + f"Final Answer: {answer}{IM_END}\n", turns


def compact_turns(text: str, turns: list[dict]) -> list[dict]:
    """`turns` as `{"prompt_chars", "expect"}`; ling-eval expands `text[:prompt_chars]` back."""
    compact = []
    for index, turn in enumerate(turns):
        if not text.startswith(turn["prompt"]):
            raise ValueError(f"turns[{index}].prompt is not a prefix of the sample's text")
        compact.append({"prompt_chars": len(turn["prompt"]), "expect": turn["expect"]})
    return compact


def _worded(arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        k: mention(v) if k == "country" and isinstance(v, str) else v for k, v in arguments.items()
    }


def _tool_call(call: dict) -> dict:
    return {"tool_call": {"name": call["name"], "arguments": call["arguments"]}}
