"""Rendering parses back to the gold calls (with a parser written from the format contract),
and the prefix-filtered near-dedup equals brute force."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ling_data.kg.answers import answers_match, format_answer
from ling_data.kg.dedup import jaccard, near_duplicates, shingles
from ling_data.kg.render import FORMATS, THOUGHTS, compact_turns, render, system_prompt
from ling_data.kg.wording import mention, sentence

sys.path.insert(
    0, str(Path(__file__).resolve().parent)
)  # importlib mode: make kg_contract importable
from kg_contract import check_rendering  # noqa: E402

TOOLS = [
    {"type": "function", "function": {"name": "get_capital", "description": "d", "parameters": {}}}
]
# Entity-like names: any printable text without the chat frame's markers or line breaks.
names = st.text(
    st.characters(
        blacklist_categories=("Cs", "Cc", "Zl", "Zp"), blacklist_characters="<>\u2028\u2029\x85"
    ),
    min_size=1,
    max_size=12,
)
results = st.recursive(
    names
    | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.booleans(),
    lambda inner: st.lists(inner, max_size=3),
    max_leaves=5,
)


@st.composite
def chains(draw) -> list[dict]:
    calls = []
    for _ in range(draw(st.integers(1, 4))):
        name = draw(st.sampled_from(sorted(THOUGHTS)))
        placeholders = re.findall(r"\{(\w+)\}", THOUGHTS[name])
        arguments = {key: draw(names) for key in placeholders} | draw(
            st.dictionaries(st.sampled_from("abz"), results, max_size=2)
        )
        calls.append({"name": name, "arguments": arguments, "result": draw(results)})
    return calls


@settings(max_examples=100, deadline=None)
@given(
    question=names,
    calls=chains(),
    answer=names.map(str.strip).filter(bool),
    fmt=st.sampled_from(FORMATS),
)
def test_rendering_parses_back_to_the_gold_calls(
    question: str, calls: list[dict], answer: str, fmt: str
) -> None:
    text, turns = render(question, calls, answer, system_prompt(TOOLS), fmt)
    check_rendering({"text": text, "turns": turns, "calls": calls, "format": fmt, "answer": answer})
    compact = compact_turns(text, turns)
    assert [{"prompt": text[: t["prompt_chars"]], "expect": t["expect"]} for t in compact] == turns


def test_compact_turns_rejects_a_prompt_that_is_not_a_prefix() -> None:
    with pytest.raises(ValueError, match=r"turns\[1\]\.prompt is not a prefix"):
        compact_turns("abc", [{"prompt": "a", "expect": {}}, {"prompt": "b", "expect": {}}])


def test_json_rendering_matches_the_contract_example() -> None:
    calls = [
        {"name": "get_capital", "arguments": {"country": "France"}, "result": "Paris"},
        {"name": "get_city_population", "arguments": {"city": "Paris"}, "result": 2138551},
    ]
    text, turns = render("Q?", calls, "2138551", "", "json")
    assert text == (
        "<|im_start|>user\nQ?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>{"name": "get_capital", "arguments": {"country": "France"}}</tool_call><|im_end|>\n'
        '<|im_start|>tool\n<tool_response>"Paris"</tool_response><|im_end|>\n'
        '<|im_start|>assistant\n<tool_call>{"name": "get_city_population", "arguments": {"city": "Paris"}}</tool_call><|im_end|>\n'
        "<|im_start|>tool\n<tool_response>2138551</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nFinal Answer: 2138551<|im_end|>\n"
    )
    react, _ = render("Q?", calls[:1], "Paris", "", "react")
    assert react == (
        "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\nThought: I need the capital of France.\n"
        'Action: get_capital\nAction Input: {"country": "France"}\nObservation: "Paris"\nFinal Answer: Paris<|im_end|>\n'
    )
    assert system_prompt(TOOLS).startswith("<|im_start|>system\nYou can call these tools:\n[{")


def test_answers_compare_as_the_contract_says() -> None:
    assert answers_match(" new  YORK ", "New York")
    assert answers_match("2138551.0", "2138551")
    assert answers_match("0.1234567", "0.12345670000001")
    assert not answers_match("0.1234", "0.1235")
    assert format_answer(["Belgium", "Spain"]) == "Belgium, Spain"
    assert format_answer([]) == "none"
    assert format_answer(12.5) == "12.5"


def brute_force(texts: list[str], threshold: float, n: int, keys: list[str]) -> list[int | None]:
    sets = [shingles(text, n) for text in texts]
    kept: list[int] = []
    result: list[int | None] = []
    for i, s in enumerate(sets):
        match = next(
            (j for j in kept if keys[i] == keys[j] and jaccard(s, sets[j]) >= threshold), None
        )
        result.append(match)
        if match is None:
            kept.append(i)
    return result


@settings(max_examples=150, deadline=None)
@given(
    texts=st.lists(
        st.lists(st.sampled_from("a b c d e f g h".split()), max_size=8).map(" ".join), max_size=30
    ),
    threshold=st.sampled_from([0.3, 0.5, 0.6, 0.75, 0.8, 0.9, 1.0]),
    n=st.integers(1, 3),
    data=st.data(),
)
def test_prefix_filtered_dedup_equals_brute_force(texts, threshold, n, data) -> None:
    keys = data.draw(st.lists(st.sampled_from("xy"), min_size=len(texts), max_size=len(texts)))
    assert near_duplicates(texts, threshold, n, keys) == brute_force(texts, threshold, n, keys)


def test_dedup_catches_reordered_questions_but_not_other_entities() -> None:
    texts = [
        "Which has more people, France or Germany?",
        "Which has more people, Germany or France?",
        "Which has more people, France or Spain?",
    ]
    assert near_duplicates(texts, 0.9, keys=["France", "France", "France"]) == [None, 0, None]
    with pytest.raises(ValueError, match="threshold"):
        near_duplicates(texts, 0.0)


@pytest.mark.parametrize(
    ("country", "mid_sentence"),
    [
        ("France", "France"),
        ("Cook Islands", "the Cook Islands"),
        ("The Netherlands", "the Netherlands"),
        ("United States", "the United States"),
        ("Democratic Republic of the Congo", "the Democratic Republic of the Congo"),
        ("South Georgia and the South Sandwich Islands", "South Georgia and the South Sandwich Islands"),
    ],
)
def test_countries_read_naturally_in_questions(country: str, mid_sentence: str) -> None:
    assert mention(country) == mid_sentence
    assert sentence(f"{mention(country)} lies on which continent?")[0].isupper()


def test_the_signature_tool_list_names_every_tool_and_argument() -> None:
    """One line per tool, with every argument and its type or enum, at a fraction of the JSON."""
    from ling_data.kg import build_graph
    from ling_data.kg.render import signature
    from ling_data.kg.tools import tool_definitions
    tools = tool_definitions(build_graph())
    lines = system_prompt(tools, "signatures").removesuffix("<|im_end|>\n").split("\n")[2:]
    assert len(lines) == len(tools)
    for line, tool in zip(lines, tools):
        function = tool["function"]
        assert line == signature(tool)
        assert line.startswith(function["name"] + "(") and function["description"] in line
        assert all(f"{arg}: " in line for arg in function["parameters"]["properties"])
    argmax = next(t for t in tools if t["function"]["name"] == "argmax")
    assert signature(argmax).startswith('argmax(countries: list of string, attribute: "area" | "population"): ')
    assert len(system_prompt(tools, "signatures")) < len(system_prompt(tools)) / 3  # 1.4K vs 5.2K characters
    with pytest.raises(ValueError, match="unknown tool list 'xml'"):
        system_prompt(tools, "xml")
