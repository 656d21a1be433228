"""ling-train sft end to end: from a pretraining checkpoint to fine-tuned weights, resume, bad input."""

import json
import subprocess
import sys

import pytest
import torch

from ling_core import from_pretrained
from ling_train.cli import main

ANSWERS = ["Paris", "Rome", "Lima", "Oslo", "Bern", "Kyiv"]


def chat_row(index: int) -> dict:
    """A short json-format chat as `ling-data kg` renders one: a tool call, its result, an answer."""
    country = ANSWERS[index % len(ANSWERS)]
    text = "<|im_start|>system\nTools: get_capital(country)<|im_end|>\n<|im_start|>user\n"
    text += f"Capital of country {index}?<|im_end|>\n<|im_start|>assistant\n"
    first = len(text)
    text += (f'<tool_call>{{"name": "get_capital", "arguments": {{"country": "c{index}"}}}}</tool_call><|im_end|>\n'
             f"<|im_start|>tool\n<tool_response>\"{country}\"</tool_response><|im_end|>\n<|im_start|>assistant\n")
    second = len(text)
    text += f"Final Answer: {country}<|im_end|>\n"
    return {"text": text, "format": "json", "turns": [{"prompt_chars": first}, {"prompt_chars": second}]}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 4-step pretraining run of a small model (its tokenizer has the chat symbols)."""
    root = tmp_path_factory.mktemp("sft")
    toml = root / "small.toml"
    toml.write_text('steps = 4\nseq_len = 32\nbatch_size = 4\nwarmup_steps = 2\ncheckpoint_every = 4\n\n[model]\n'
                    'vocab_size = 512\nhidden_size = 64\nintermediate_size = 128\nnum_hidden_layers = 2\n'
                    'num_attention_heads = 2\nnum_key_value_heads = 1\nhead_dim = 32\nnum_experts = 4\n'
                    'moe_intermediate_size = 32\n')
    assert main(["--config", str(toml), "--out", str(root / "pre"), "--no-progress"]) == 0
    data = root / "kg"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(chat_row(i)) + "\n" for i in range(24)))
    return root / "pre", data


def sft_args(pretrained, out, *extra):
    pre, data = pretrained
    return ["sft", "--init", str(pre), "--data", str(data), "--seq-len", "320", "--batch-size", "2",
            "--out", str(out), "--no-progress", *extra]


def step_rows(run_dir):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "event" not in r]


def test_sft_starts_from_the_checkpoint_and_trains_on_the_assistant_tokens(pretrained, tmp_path, capsys):
    out = tmp_path / "sft"
    assert main(sft_args(pretrained, out, "--steps", "6", "--lr", "3e-3")) == 0
    summary = json.loads(capsys.readouterr().out)
    steps = step_rows(out)
    assert len(steps) == 6 and all(0 < r["target_tokens"] < r["tokens"] for r in steps)
    counts = summary["sft"]
    assert counts["samples"] == 24 and counts["target_tokens"] > 0 and counts["context_tokens"] > counts["target_tokens"]
    assert counts["target_tokens_trained"] == sum(r["target_tokens"] for r in steps)
    # the loss is over the assistant's tokens only: the weights moved from the init checkpoint
    init = from_pretrained(pretrained[0] / "checkpoints" / "step-4").state_dict()
    tuned = from_pretrained(out / "checkpoints" / "step-6").state_dict()
    assert init.keys() == tuned.keys() and any(not torch.equal(init[k], tuned[k]) for k in init)
    config = (out / "config.toml").read_text()
    assert 'task = "sft"' in config and "hidden_size = 64" in config  # the init's shape, complete
    assert (out / "tokenizer.model").read_bytes() == (pretrained[0] / "tokenizer.model").read_bytes()
    # step 1's loss is the init model's loss on the targets: near uniform over a 512-token vocab
    # would be ~6.2; the pretrained model scores the targets, so the first row is finite and sane
    assert 0 < steps[0]["lm_loss"] < 10


def test_sft_resumes_bit_identically(pretrained, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(sft_args(pretrained, full, "--steps", "6")) == 0
    assert main(sft_args(pretrained, part, "--steps", "3")) == 0
    assert main(["--resume", str(part), "--steps", "6", "--no-progress"]) == 0
    a = {r["step"]: r["loss"] for r in step_rows(full)}
    b = {r["step"]: r["loss"] for r in step_rows(part)}
    assert [a[s] for s in range(4, 7)] == [b[s] for s in range(4, 7)]  # exact, not a tolerance
    wa = from_pretrained(full / "checkpoints" / "step-6").state_dict()
    wb = from_pretrained(part / "checkpoints" / "step-6").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "ling_train.cli", *args], capture_output=True, text=True)


def one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("ling-train: error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert all(fragment in lines[0] for fragment in fragments), lines[0]


def test_sft_bad_input_is_one_line(pretrained, tmp_path):
    pre, data = pretrained
    one_line_error(run_cli("sft", "--data", str(data), "--out", str(tmp_path / "a")), "init (--init)")
    one_line_error(run_cli("sft", "--init", str(tmp_path / "nope"), "--data", str(data)), "--init", "does not exist")
    one_line_error(run_cli("sft", "--init", str(pre)), "task sft needs chat samples")
    one_line_error(run_cli("sft", "--init", str(pre), "--data", str(data), "--seq-len", "16", "--out",
                           str(tmp_path / "b")), f"{data / 'train.jsonl'}:", "longer than seq_len 16")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(chat_row(0)) + "\n" + json.dumps({**chat_row(1), "format": "xml"}) + "\n")
    one_line_error(run_cli("sft", "--init", str(pre), "--data", str(bad), "--out", str(tmp_path / "c")),
                   f"{bad}:2:", "unknown format 'xml'")
    assert not any((tmp_path / name).exists() for name in "abc")
