import hashlib

import pytest

from ling_eval import TaskError, load_task
from ling_eval.tasks import GENERATION, MULTIPLE_CHOICE, PERPLEXITY, TOOL_CALL

from ling_eval_testing import write_jsonl

MC = {"id": "q1", "question": "The sky is", "choices": [" blue", " green"], "answer": 0}
GEN = {"id": "g1", "prompt": "2+2=", "answer": ["4", "four"]}
PPL = {"id": "p1", "text": "Some text."}
TOOL = {"id": "t1", "format": "json", "question": "?", "calls": [], "answer": "x",
        "turns": [{"prompt": "p", "expect": {"final_answer": "x"}}]}


@pytest.mark.parametrize("row, kind", [(MC, MULTIPLE_CHOICE), (GEN, GENERATION), (PPL, PERPLEXITY),
                                       (TOOL, TOOL_CALL)])
def test_kind_is_told_by_fields_and_hash_is_of_the_file(tmp_path, row, kind):
    path = write_jsonl(tmp_path / "t.jsonl", [row, {**row, "id": "other"}])
    task = load_task(path)
    assert task.kind == kind and task.name == "t" and len(task.items) == 2
    assert task.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("bad, message", [
    ("{not json", "not valid JSON"),
    ('[1, 2]', "expected a JSON object"),
    ({"id": "x", "foo": 1}, "cannot tell the task kind"),
    ({**MC, "answer": 2}, "'answer' is 2"),
    ({**MC, "answer": "0"}, "field 'answer' is str"),
    ({**MC, "choices": ["only one"]}, "at least 2"),
    ({**MC, "id": 7}, "field 'id' is int"),
    ({k: v for k, v in MC.items() if k != "question"}, "missing field 'question'"),
    (GEN, "a generation item in a multiple_choice task"),
    ({**MC, "id": "q1"}, "duplicate id 'q1' (first on line 1)"),
    ({**TOOL, "id": "t2", "turns": [{"prompt": "p", "expect": {}}]}, "a tool_call item"),
])
def test_malformed_line_names_file_and_line(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [MC, "", bad])
    with pytest.raises(TaskError) as info:
        load_task(path)
    assert str(info.value).startswith(f"{path}:3: ")
    assert message in str(info.value)


def test_tool_turn_validation(tmp_path):
    bad = {**TOOL, "turns": [{"prompt": "p", "expect": {"tool_call": {"name": "f"}}}]}
    with pytest.raises(TaskError, match=r"t.jsonl:1: turns\[0\]: 'expect.tool_call' must have"):
        load_task(write_jsonl(tmp_path / "t.jsonl", [bad]))


def test_tool_turn_prompt_given_as_its_length_in_the_text(tmp_path):
    compact = {**TOOL, "text": "system\nuser\nassistant\nFinal Answer: x",
               "turns": [{"prompt_chars": 22, "expect": {"final_answer": "x"}}]}
    task = load_task(write_jsonl(tmp_path / "t.jsonl", [compact, {**TOOL, "id": "t2"}]))
    assert task.items[0]["turns"] == [{"prompt": "system\nuser\nassistant\n", "expect": {"final_answer": "x"}}]
    assert task.items[1]["turns"] == TOOL["turns"]  # the spelled-out form still loads as is


@pytest.mark.parametrize("turn, text, message", [
    ({"prompt_chars": 0}, "abc", "'prompt_chars' is 0, expected an integer in [1, 3]"),
    ({"prompt_chars": 4}, "abc", "'prompt_chars' is 4"),
    ({"prompt_chars": "2"}, "abc", "'prompt_chars' is \"2\""),
    ({"prompt_chars": 2}, None, "needs the item's string 'text'"),
])
def test_bad_prompt_chars_names_the_turn(tmp_path, turn, text, message):
    bad = {**TOOL, "turns": [{**turn, "expect": {"final_answer": "x"}}]} | ({"text": text} if text else {})
    with pytest.raises(TaskError) as info:
        load_task(write_jsonl(tmp_path / "t.jsonl", [bad]))
    assert str(info.value).startswith(f"{tmp_path / 't.jsonl'}:1: turns[0]: ") and message in str(info.value)


def test_sidecar_options_and_overrides(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [GEN, {**GEN, "id": "g2"}, {**GEN, "id": "g3"}])
    (tmp_path / "g.task.toml").write_text('num_fewshot = 1\nstop = ["."]\nregex = "= (\\\\d+)"\n')
    task = load_task(path)
    assert task.options.num_fewshot == 1 and task.options.stop == (".",) and task.options.regex == r"= (\d+)"
    assert load_task(path, num_fewshot=2).options.num_fewshot == 2


@pytest.mark.parametrize("toml, message", [("colour = 1", "unknown option 'colour'"),
                                           ("num_fewshot = -1", "'num_fewshot' must be an integer"),
                                           ('regex = "("', "not a valid regular expression"),
                                           ("num_fewshot = 5", "num_fewshot=5 needs more than 1 items")])
def test_bad_options(tmp_path, toml, message):
    path = write_jsonl(tmp_path / "g.jsonl", [GEN])
    (tmp_path / "g.task.toml").write_text(toml)
    with pytest.raises(TaskError, match=message):
        load_task(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(TaskError, match="task file not found"):
        load_task(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TaskError, match="no items"):
        load_task(tmp_path / "empty.jsonl")
