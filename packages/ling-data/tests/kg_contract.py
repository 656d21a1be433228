"""The tool-use format contract (TOOLUSE_FORMAT.md) as ling-eval reads it, for the kg tests.

Written from the contract text, not from ling_data.kg.render, so the tests check the renderer
against the contract rather than against itself.
"""

from __future__ import annotations

import json
import re


def parse_continuation(continuation: str, format: str) -> dict | None:
    """What ling-eval reads from a model's continuation, following TOOLUSE_FORMAT.md."""
    stops = ["<|im_end|>"] if format == "json" else ["\nObservation:", "<|im_end|>"]
    for stop in stops:
        continuation = continuation.split(stop, 1)[0]
    if format == "json":
        call = re.search(r"<tool_call>(.*?)</tool_call>", continuation, flags=re.DOTALL)
        if call:
            parsed = json.loads(call.group(1))
            return {"tool_call": {"name": parsed["name"], "arguments": parsed["arguments"]}}
    else:
        action = re.search(r"^Action: (.+)$", continuation, flags=re.MULTILINE)
        action_input = re.search(r"^Action Input: (.+)$", continuation, flags=re.MULTILINE)
        if action and action_input:
            return {
                "tool_call": {
                    "name": action.group(1).strip(),
                    "arguments": json.loads(action_input.group(1)),
                }
            }
    final = re.search(r"^Final Answer: (.*)$", continuation, flags=re.MULTILINE)
    return {"final_answer": final.group(1)} if final else None


def check_rendering(sample: dict) -> None:
    """Each turn's prompt is a prefix of the text, ends where the contract says, and the text
    that follows it parses to exactly the expected call or answer. A turn gives its prompt
    as a string (`prompt`) or as the prompt's length in code points (`prompt_chars`, as the
    written files do: the prompt is `text[:prompt_chars]`)."""
    text, turns, calls, fmt = sample["text"], sample["turns"], sample["calls"], sample["format"]
    assert len(turns) == len(calls) + 1
    for index, turn in enumerate(turns):
        if "prompt_chars" in turn:
            assert set(turn) == {"prompt_chars", "expect"} and 0 < turn["prompt_chars"] <= len(text)
            prompt = text[: turn["prompt_chars"]]
        else:
            prompt = turn["prompt"]
        assert text.startswith(prompt)
        if fmt == "json" or index == 0:
            assert prompt.endswith("<|im_start|>assistant\n")
        else:
            assert re.search(r"\nObservation: [^\n]*\n\Z", prompt)
        assert parse_continuation(text[len(prompt) :], fmt) == turn["expect"]
    for call, turn in zip(calls, turns[:-1], strict=True):
        assert turn["expect"] == {
            "tool_call": {"name": call["name"], "arguments": call["arguments"]}
        }
    observed = re.findall(r"(?:<tool_response>|Observation: )(.*?)(?:</tool_response>|\n)", text)
    assert [json.loads(o) for o in observed] == [call["result"] for call in calls]
    assert text.endswith(f"Final Answer: {sample['answer']}<|im_end|>\n")
