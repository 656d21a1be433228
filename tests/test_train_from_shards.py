"""`ling-data` prepare -> train-tokenizer -> tokenize, then `ling-train --data SHARDS`, resumed."""

import json

import torch

from ling_core import from_pretrained
from ling_data import embedded_corpus
from ling_data.cli import main as ling_data
from ling_train.cli import main as ling_train


def step_losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "event" not in r}


def test_train_from_token_shards_and_resume_bit_identically(tmp_path, small_run_toml):
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps({"text": text}) + "\n" for text in embedded_corpus()[:60]))
    prepared, model, shards = tmp_path / "prepared", tmp_path / "tok.model", tmp_path / "shards"
    assert ling_data(["prepare", str(raw), "--out", str(prepared), "--no-progress"]) == 0
    assert ling_data(["train-tokenizer", str(prepared), "--vocab-size", "512", "--out", str(model)]) == 0
    assert ling_data(["tokenize", str(prepared), "--tokenizer", str(model), "--out", str(shards),
                      "--workers", "1", "--shard-mb", "0.05", "--no-progress"]) == 0

    full = tmp_path / "full"
    assert ling_train(["--config", str(small_run_toml), "--data", str(shards), "--out", str(full),
                       "--no-progress"]) == 0
    losses = step_losses(full)
    assert sorted(losses) == list(range(1, 9)) and all(loss == loss for loss in losses.values())
    assert (full / "tokenizer.model").read_bytes() == model.read_bytes()

    resumed = tmp_path / "resumed"
    assert ling_train(["--resume", str(full / "checkpoints" / "step-4"), "--out", str(resumed),
                       "--no-progress"]) == 0
    again = step_losses(resumed)
    assert sorted(again) == [5, 6, 7, 8] and [losses[s] for s in again] == [again[s] for s in again]
    wa = from_pretrained(full / "checkpoints" / "step-8").state_dict()
    wb = from_pretrained(resumed / "checkpoints" / "step-8").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_shards_with_a_larger_vocabulary_than_the_model_exit_2(tmp_path, small_run_toml, capsys):
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps({"text": text}) + "\n" for text in embedded_corpus()[:60]))
    model, shards = tmp_path / "tok.model", tmp_path / "shards"
    assert ling_data(["train-tokenizer", str(raw), "--vocab-size", "900", "--out", str(model)]) == 0
    assert ling_data(["tokenize", str(raw), "--tokenizer", str(model), "--out", str(shards),
                      "--workers", "1", "--no-progress"]) == 0
    capsys.readouterr()
    assert ling_train(["--config", str(small_run_toml), "--data", str(shards), "--out", str(tmp_path / "r"),
                       "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "its tokenizer has 900 tokens but the model's vocab_size is 512" in err
