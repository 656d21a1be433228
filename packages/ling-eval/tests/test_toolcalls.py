import pytest

from ling_eval.prompts import answers_match, normalize
from ling_eval.toolcalls import Parsed, parse_turn, score_turn

CALL = {"tool_call": {"name": "get_capital", "arguments": {"country": "France"}}}


@pytest.mark.parametrize("text, fmt, parsed", [
    ('<tool_call>{"name": "get_capital", "arguments": {"country": "France"}}</tool_call>', "json",
     Parsed("get_capital", {"country": "France"})),
    ('<tool_call>{"name": "f", "arguments": {"x": 1}}', "json", Parsed("f", {"x": 1})),  # stopped before </tool_call>
    ('<tool_call>{"name": "f", "arguments": {"x": </tool_call>', "json", Parsed()),
    ("Final Answer: 2138551", "json", Parsed(final_answer="2138551")),
    ('Thought: look it up.\nAction: get_capital\nAction Input: {"country": "France"}', "react",
     Parsed("get_capital", {"country": "France"})),
    ("Thought: done\nAction: f\nAction Input: not json", "react", Parsed("f", None)),
    ("Thought: I know.\nFinal Answer:  Paris ", "react", Parsed(final_answer="Paris")),
    ("gibberish", "react", Parsed()),
])
def test_parse_turn(text, fmt, parsed):
    assert parse_turn(text, fmt) == parsed


def test_score_turn():
    ok = score_turn(Parsed("get_capital", {"country": " france"}), CALL)
    assert ok.name_correct and ok.arguments_correct and ok.correct
    wrong_args = score_turn(Parsed("get_capital", {"country": "Spain"}), CALL)
    assert wrong_args.name_correct and not wrong_args.correct
    assert not score_turn(Parsed("other", {"country": "France"}), CALL).name_correct
    assert not score_turn(Parsed(final_answer="Paris"), CALL).correct
    final = {"final_answer": "2138551"}
    assert score_turn(Parsed(final_answer="2,138,551.0"), final).correct
    assert not score_turn(Parsed(final_answer="2138560"), final).correct  # rel. tol. 1e-6 = 2.1
    assert not score_turn(Parsed("f", {}), final).correct


def test_answer_normalisation():
    assert normalize("  Hello \n  World ") == "hello world"
    assert answers_match("1e3", 1000) and answers_match(" PARIS", "paris") and not answers_match("Par", "Paris")
    assert answers_match({"a": [1, "X"]}, {"a": [1.0000000001, "x"]}) and not answers_match({"a": 1}, {"b": 1})
    assert answers_match(True, True) and not answers_match("1", True)
