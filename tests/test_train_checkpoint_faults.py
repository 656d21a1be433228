"""ling-train checkpoint faults (issue 15): corrupt bytes, non-finite state, disk full, torn writes,
broken side files. Each is one line naming the file, and `latest` keeps naming a good checkpoint."""

import json

import pytest
import torch

from ling_core import build_model
from ling_train import checkpoint as ckpt
from ling_train.cli import main


def train(out, toml, *flags):
    assert main(["--config", str(toml), "--steps", "4", "--out", str(out), "--no-progress", *flags]) == 0
    return out / "checkpoints" / "step-4"


def resume(capsys, checkpoint, out, *flags):
    capsys.readouterr()
    code = main(["--resume", str(checkpoint), "--out", str(out), "--no-progress", *flags])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ling-train: error:")]
    return code, errors


def nan_tensor_bytes(file):
    """0xFF over the first tensor bytes (NaN in fp32): the safetensors file still parses."""
    data = bytearray(file.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    data[start:start + 4096] = b"\xff" * 4096
    file.write_bytes(bytes(data))


def test_corrupt_tensor_bytes_are_a_one_line_error(tmp_path, small_run_toml, capsys):
    checkpoint = train(tmp_path / "run", small_run_toml)
    nan_tensor_bytes(checkpoint / "model.safetensors")
    code, errors = resume(capsys, checkpoint, tmp_path / "next")
    assert code == 2 and len(errors) == 1, errors
    assert f"{checkpoint / 'model.safetensors'}: sha256" in errors[0]


def test_non_finite_loss_right_after_resume_names_the_checkpoint(tmp_path, small_run_toml, capsys):
    """Without checksums (an old checkpoint) NaN weights load; the first step's loss gives them away."""
    checkpoint = train(tmp_path / "run", small_run_toml)
    (checkpoint / "checksums.json").unlink()
    nan_tensor_bytes(checkpoint / "model.safetensors")
    code, errors = resume(capsys, checkpoint, tmp_path / "run", "--steps", "8")
    assert code == 2 and len(errors) == 1, errors
    assert str(checkpoint) in errors[0] and "loss" in errors[0]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step-4"
    assert not (tmp_path / "run" / "checkpoints" / "step-8").exists()


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    model = build_model(ckpt_config(), seed=0)
    directory = tmp_path / "checkpoints"
    ckpt.save_checkpoint(model, {"step": 1}, "", directory, 1, 10**9)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(ckpt.CheckpointWriteError, match="step-2.*lm_head.weight.*non-finite"):
        ckpt.save_checkpoint(model, {"step": 2}, "", directory, 2, 10**9)
    assert (directory / "latest").read_text().strip() == "step-1"
    assert sorted(p.name for p in directory.iterdir()) == ["latest", "step-1"]


def ckpt_config():
    from ling_core import LingConfig
    return LingConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=3,
                      num_experts_per_tok=2, num_shared_experts=1, moe_intermediate_size=8)


@pytest.mark.parametrize("file, text, expected", [
    ("config.json", "{not json", "invalid JSON"),
    ("config.json", "[1, 2]", "expected a JSON object"),
    ("config.json", "hidden_size=128", "hidden_size"),
    ("trainer_state/trainer_state.json", "{not json", "corrupt"),
    ("trainer_state/trainer_state.json", '{"step": "four"}', "step"),
    ("trainer_state/trainer_state.json", '{"step": 3}', "step"),
])
def test_broken_or_disagreeing_side_files_are_a_one_line_error(tmp_path, small_run_toml, capsys, file, text,
                                                               expected):
    """One rule, as ling-eval applies it: a checkpoint whose files are broken or disagree is bad input."""
    checkpoint = train(tmp_path / "run", small_run_toml)
    path = checkpoint / file
    if text.startswith("hidden_size="):  # parses, but disagrees with the weights and the run config
        hf = json.loads(path.read_text())
        hf["hidden_size"] = 128
        text = json.dumps(hf)
    path.write_text(text)
    code, errors = resume(capsys, checkpoint, tmp_path / "next")
    assert code == 2 and len(errors) == 1, errors
    assert str(path) in errors[0] and expected in errors[0], errors[0]
    assert not (tmp_path / "next").exists()
