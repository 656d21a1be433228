"""Free-running tool-use eval (ling_eval.agent) against ling-data's KG tools: a model that writes
exactly the gold turns sees exactly the teacher-forced prompts, and scores 1 everywhere; near
misses score what they miss. The two packages share only the rendering contract, checked here."""

from __future__ import annotations

import pytest
import torch

from ling_eval.agent import continuation, evaluate_agent, first_prompt, run_episode
from ling_eval.model import EvalModel
from ling_eval.toolcalls import STOP
from ling_eval.toy import ByteTokenizer


BYTES = 2048  # the byte tokenizer spends a token per byte; a long list argument takes hundreds


class PolicyModel:
    """Greedy decoding writes `respond(context)`, then EOS: the context is decoded from the prompt
    (after its EOS), and each forward of a longer sequence continues the same response."""

    def __init__(self, respond):
        self.tokenizer = ByteTokenizer()
        self.respond = respond
        self.contexts: list[str] = []
        self.prompt_len = None
        self.script: list[int] = []

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        if self.prompt_len is None or length <= self.prompt_len or length - self.prompt_len >= len(self.script):
            context = self.tokenizer.decode(input_ids[0, 1:].tolist())
            self.contexts.append(context)
            self.prompt_len = length
            self.script = self.tokenizer.encode(self.respond(context)) + [self.tokenizer.eos_id]
        logits = torch.zeros(1, 1, 260)  # greedy decoding reads the last position only
        logits[0, -1, self.script[length - self.prompt_len]] = 1.0
        return logits

    def eval_model(self) -> EvalModel:
        return EvalModel(self.forward, None, max_length=100_000)


@pytest.fixture(scope="module")
def kg(tmp_path_factory):
    from ling_data.kg import Executor, SynthesisConfig, build_graph, synthesize
    graph = build_graph()
    synthesis = synthesize(SynthesisConfig(samples_per_pattern=3, seed=1), graph)
    return synthesis.test, Executor(graph)


def gold_turns(item) -> list[str]:
    """What the assistant writes at each turn of the rendered gold sample, before the stop."""
    text, outputs = item["text"], []
    for turn in item["turns"]:
        start = turn["prompt_chars"]
        outputs.append(text[start:min(i for i in (text.find(s, start) for s in STOP[item["format"]]) if i >= 0)])
    return outputs


def test_gold_behaviour_sees_the_teacher_forced_prompts_and_scores_one(kg):
    items, executor = kg
    assert {item["format"] for item in items} == {"json", "react"}
    for item in items[:20]:
        turns = iter(gold_turns(item))
        policy = PolicyModel(lambda context: next(turns))
        tokenizer = policy.tokenizer
        episode = run_episode(policy.eval_model(), tokenizer, first_prompt(item), item["format"], executor.call,
                              max_new_tokens=BYTES)
        # the executor's results, rendered by ling-eval, rebuild ling-data's rendering exactly
        assert policy.contexts == [item["text"][:turn["prompt_chars"]] for turn in item["turns"]], item["id"]
        assert episode.calls == [(c["name"], c["arguments"]) for c in item["calls"]]
    policy_for = {}

    def respond(context):
        return policy_for["turns"].pop(0)

    result = None
    for item in items[:10]:
        policy_for["turns"] = gold_turns(item)
        result = evaluate_agent(PolicyModel(respond).eval_model(), ByteTokenizer(), [item], executor.call,
                                max_new_tokens=BYTES)
        assert all(value == 1.0 for value, *_ in result.groups["all"].values()), (item["id"], result.groups)
    assert {"pattern=" + items[9]["pattern"], "format=" + items[9]["format"]} <= result.groups.keys()


def _scores(item, executor, turns):
    policy = PolicyModel(lambda context, turns=list(turns): turns.pop(0) if turns else "Final Answer: ?")
    result = evaluate_agent(policy.eval_model(), ByteTokenizer(), [item], executor.call, max_new_tokens=BYTES)
    return result.episodes[0]["scores"], policy.contexts


def test_near_misses_score_what_they_miss(kg):
    items, executor = kg
    item = next(i for i in items if i["format"] == "json" and len(i["calls"]) >= 2)
    gold, calls = gold_turns(item), len(item["calls"])
    wrong_name = gold[0].replace(f'"name": "{item["calls"][0]["name"]}"', '"name": "get_area"')
    assert wrong_name != gold[0]
    scores, _ = _scores(item, executor, [wrong_name, *gold[1:]])
    assert scores["exact_sequence"] == (0.0, 1.0) and scores["tool_name"] == (calls - 1, calls)
    assert scores["json_valid"] == (calls, calls)

    broken = '<tool_call>{"name": "get_capital", "arguments": {"country": </tool_call>'
    scores, contexts = _scores(item, executor, [broken])
    assert scores["json_valid"] == (0.0, 1.0) and scores["arguments"] == (0.0, calls) and len(contexts) == 1

    scores, _ = _scores(item, executor, ["Final Answer: " + str(item["answer"])])
    assert scores["final_answer"] == (1.0, 1.0) and scores["tool_name"] == (0.0, calls)
    assert scores["json_valid"] == (0.0, 0.0) and scores["exact_sequence"] == (0.0, 1.0)

    react = next(i for i in items if i["format"] == "react")
    scores, contexts = _scores(react, executor, ['Thought: x\nAction: get_capital\nAction Input: {"country": '])
    assert scores["json_valid"] == (0.0, 1.0) and '\nObservation: {"error": ' in contexts[1]


def test_continuation_matches_the_contract_rendering():
    assert continuation("react", "Action: add\nAction Input: {\"a\": 1, \"b\": 2}", 3) == \
        'Action: add\nAction Input: {"a": 1, "b": 2}\nObservation: 3\n'
    assert continuation("json", "<tool_call>{}</tool_call>", "Avarua") == (
        '<tool_call>{}</tool_call><|im_end|>\n<|im_start|>tool\n<tool_response>"Avarua"</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n")
