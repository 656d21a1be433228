"""Shared stand-ins for ling-eval's tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ling_eval.model import EvalModel
from ling_eval.toy import ByteTokenizer


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


class ScriptedModel:
    """Greedy decoding of any prompt yields `script` (then EOS): the logits at the last position
    of a sequence of length L put all mass on script[L - prompt_len], where prompt_len is the
    length of the first call's input (one prompt at a time, no cache)."""

    def __init__(self, tokenizer: ByteTokenizer, script: str, vocab_size: int = 260):
        self.script = tokenizer.encode(script) + [tokenizer.eos_id]
        self.vocab_size = vocab_size
        self.prompt_len = None

    def reset(self) -> None:
        self.prompt_len = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        if self.prompt_len is None or length < self.prompt_len or length - self.prompt_len >= len(self.script):
            self.prompt_len = length  # a new prompt
        logits = torch.zeros(input_ids.shape[0], length, self.vocab_size)
        logits[:, -1, self.script[length - self.prompt_len]] = 10.0
        return logits

    def as_eval_model(self) -> EvalModel:
        return EvalModel(self.forward, None, max_length=512)
