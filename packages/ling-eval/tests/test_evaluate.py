"""End to end on stand-in models: the metrics each task kind reports, against values worked out
by hand or by a one-request-at-a-time reference."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ling_eval import evaluate_task, load_task
from ling_eval.evaluate import TaskResult
from ling_eval.prompts import fewshot_indices
from ling_eval.toy import ByteTokenizer, TinyTransformer
from ling_eval_testing import ScriptedModel, write_jsonl

TOKENIZER = ByteTokenizer()
MODEL = TinyTransformer(max_length=128, seed=2).eval()


def mc_rows(n=12):
    return [{"id": f"q{i}", "question": f"Item {i} is", "choices": [" red", " a long green", " blue"],
             "answer": i % 3} for i in range(n)]


@torch.no_grad()
def naive_logprob(context: str, choice: str) -> tuple[float, int]:
    ctx = [3] + TOKENIZER.encode(context)
    cont = TOKENIZER.encode(choice)
    full = torch.tensor([ctx + cont])
    lp = F.log_softmax(MODEL(full[:, :-1])[0], -1)[-len(cont):]
    return lp.gather(-1, torch.tensor(cont)[:, None]).sum().item(), len(cont)


@pytest.mark.parametrize("share_context", [True, False])
def test_multiple_choice_matches_a_per_example_loop(tmp_path, share_context):
    task = load_task(write_jsonl(tmp_path / "mc.jsonl", mc_rows()), num_fewshot=2)
    result = evaluate_task(MODEL.as_eval_model(), TOKENIZER, task, seed=5, batch_size=4, share_context=share_context)
    from ling_eval.prompts import with_fewshot
    expected = {"acc": [], "acc_norm_token": [], "acc_norm_byte": []}
    for i, item in enumerate(task.items):
        context = with_fewshot(task, i, 5, item["question"])
        assert context.count("Item") == 3  # two solved examples, then the question
        scores = [naive_logprob(context, c) for c in item["choices"]]
        nbytes = [len(c.encode()) for c in item["choices"]]
        expected["acc"].append(int(np.argmax([s for s, _ in scores])) == item["answer"])
        expected["acc_norm_token"].append(int(np.argmax([s / n for s, n in scores])) == item["answer"])
        expected["acc_norm_byte"].append(int(np.argmax([s / b for (s, _), b in zip(scores, nbytes)])) == item["answer"])
    for name, correct in expected.items():
        assert result.metrics[name].value == pytest.approx(np.mean(correct))
        assert result.item_scores[name][0] == [float(c) for c in correct]
    assert result.sha256 == task.sha256 and result.seed == 5 and result.num_items == 12


def test_fewshot_examples_depend_on_seed_and_item_only(tmp_path):
    task = load_task(write_jsonl(tmp_path / "mc.jsonl", mc_rows(30)), num_fewshot=3)
    picks = [fewshot_indices(task, i, seed=0) for i in range(30)]
    assert all(i not in p and len(set(p)) == 3 for i, p in enumerate(picks))
    assert picks == [fewshot_indices(task, i, seed=0) for i in range(30)]
    assert picks != [fewshot_indices(task, i, seed=1) for i in range(30)]


def test_generation_exact_match_contains_and_regex(tmp_path):
    rows = [{"id": "a", "prompt": "Q: capital?\nA:", "answer": "Paris"},
            {"id": "b", "prompt": "Q: capital?\nA:", "answer": ["paris", "Lyon"]},
            {"id": "c", "prompt": "Q: capital?\nA:", "answer": "Rome"}]
    path = write_jsonl(tmp_path / "gen.jsonl", rows)
    model = ScriptedModel(TOKENIZER, " Paris is it.\nQ: next")
    result = evaluate_task(model.as_eval_model(), TOKENIZER, load_task(path))
    assert result.predictions == [" Paris is it."] * 3
    assert result.metrics["exact_match"].value == 0  # " paris is it." is not "paris"
    assert result.metrics["contains"].value == pytest.approx(2 / 3)
    (tmp_path / "gen.task.toml").write_text('regex = "(\\\\w+) is it"\nstop = ["."]\n')
    result = evaluate_task(model.as_eval_model(), TOKENIZER, load_task(path))
    assert result.predictions == [" Paris is it"] * 3
    assert result.metrics["exact_match"].value == pytest.approx(2 / 3)


def tool_item(fmt):
    prefix = "<|im_start|>system\nYou can call these tools: ...<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n"
    return {"id": f"t-{fmt}", "pattern": "chain2", "hops": 2, "format": fmt, "entities": [], "question": "Q",
            "calls": [{"name": "get_capital", "arguments": {"country": "France"}, "result": "Paris"}],
            "answer": "Paris", "text": "...",
            "turns": [{"prompt": prefix + "<|im_start|>assistant\n",
                       "expect": {"tool_call": {"name": "get_capital", "arguments": {"country": "France"}}}},
                      {"prompt": prefix + "...", "expect": {"final_answer": "Paris"}}]}


@pytest.mark.parametrize("fmt, script, expected", [
    ("json", '<tool_call>{"name": "get_capital", "arguments": {"country": "France"}}</tool_call><|im_end|>junk',
     {"turn_acc": 0.5, "tool_name": 1.0, "arguments": 1.0, "final_answer": 0.0, "chain": 0.0}),
    ("react", 'Thought: x\nAction: get_capital\nAction Input: {"country": "Spain"}\nObservation: "Madrid"',
     {"turn_acc": 0.0, "tool_name": 1.0, "arguments": 0.0, "final_answer": 0.0, "chain": 0.0}),
    ("react", "Thought: easy\nFinal Answer: paris<|im_end|>",
     {"turn_acc": 0.5, "tool_name": 0.0, "arguments": 0.0, "final_answer": 1.0, "chain": 0.0}),
])
def test_tool_calls_are_parsed_and_scored_per_turn(tmp_path, fmt, script, expected):
    path = write_jsonl(tmp_path / "tools.jsonl", [tool_item(fmt)])
    model = ScriptedModel(TOKENIZER, script)
    result = evaluate_task(model.as_eval_model(), TOKENIZER, load_task(path))
    assert {k: m.value for k, m in result.metrics.items()} == expected
    assert "Observation:" not in result.predictions[0][0] and "<|im_end|>" not in result.predictions[0][0]


def test_perplexity_and_bits_per_byte(tmp_path):
    rows = [{"id": "a", "text": "hello world " * 20}, {"id": "b", "text": "naïve café"}]
    task = load_task(write_jsonl(tmp_path / "ppl.jsonl", rows))
    model = TinyTransformer(max_length=32, seed=3).eval()  # shorter than the first text: rolling windows
    result = evaluate_task(model.as_eval_model(), TOKENIZER, task)
    with torch.no_grad():
        nll = 0.0
        for row in rows:  # byte tokens: scored left to right with up to 32 tokens of context
            ids = [3] + TOKENIZER.encode(row["text"])
            for start in range(1, len(ids), 32):
                window = ids[max(start - 1 - (32 - min(32, len(ids) - start)), 0):start + 32]
                n = min(32, len(ids) - start)
                lp = F.log_softmax(model(torch.tensor([window[:-1]]))[0], -1)[-n:]
                nll -= lp.gather(-1, torch.tensor(window[-n:])[:, None]).sum().item()
    n_bytes = sum(len(r["text"].encode()) for r in rows)
    assert result.metrics["bits_per_byte"].value == pytest.approx(nll / np.log(2) / n_bytes, rel=1e-5)
    assert result.metrics["perplexity"].value == pytest.approx(np.exp(nll / n_bytes), rel=1e-5)  # byte tokens
    assert result.metrics["bits_per_byte"].higher_is_better is False


def test_result_round_trips_through_json(tmp_path):
    task = load_task(write_jsonl(tmp_path / "mc.jsonl", mc_rows()))
    result = evaluate_task(MODEL.as_eval_model(), TOKENIZER, task, limit=5)
    assert result.num_items == 5
    back = TaskResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert back == result
    low, high = result.metrics["acc"].ci_low, result.metrics["acc"].ci_high
    assert low <= result.score <= high
