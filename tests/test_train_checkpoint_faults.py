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


KILL_IN_CHECKPOINT = """
import os, signal, sys
import ling_core.hf_io as hf_io
from ling_train.cli import main
real_save = hf_io.save_file
def save_then_die(*args, **kwargs):  # the step-8 checkpoint is half written when the process dies
    real_save(*args, **kwargs)
    if "step-8" in str(args[1]):
        os.kill(os.getpid(), signal.SIGKILL)
hf_io.save_file = save_then_die
sys.exit(main(sys.argv[1:]))
"""


def test_resume_removes_what_a_killed_checkpoint_left(tmp_path, small_run_toml):
    import subprocess
    import sys

    out = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", KILL_IN_CHECKPOINT, "--config", str(small_run_toml), "--out",
                             str(out), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    checkpoints = out / "checkpoints"
    assert [p.name for p in checkpoints.glob(".step-8.tmp-*")]  # what the SIGKILL left
    assert (checkpoints / "latest").read_text().strip() == "step-4"
    assert main(["--out", str(out), "--resume", "--no-progress"]) == 0
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-4", "step-8"]


def test_checkpoint_files_and_directories_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    """So a power loss cannot leave `latest` naming a checkpoint whose files never reached the disk."""
    import os

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda src, dst: (events.append(("replace", str(src), str(dst))),
                                                         real_replace(src, dst)))
    directory = tmp_path / "checkpoints"
    final = ckpt.save_checkpoint(build_model(ckpt_config(), seed=0), {"step": 1}, "", directory, 1, 10**9)
    rename = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(final))
    tmp = events[rename][1]
    synced = {e[1] for e in events[:rename] if e[0] == "fsync"}
    files = [str(p).replace(str(final), tmp) for p in final.rglob("*")] + [tmp]
    assert all(f in synced for f in files), sorted(set(files) - synced)
    latest = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(directory / "latest"))
    later = [e[1] for e in events[rename:latest] if e[0] == "fsync"]
    assert str(directory) in later and events[latest][1] in later  # the rename, and latest's bytes
    assert ("fsync", str(directory)) in events[latest:]  # the pointer's rename


def no_space(*args, **kwargs):
    import errno
    import os
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("writer", ["ling_core.hf_io.save_file", "torch.save"])
def test_disk_full_at_a_checkpoint_is_one_line_naming_the_path(tmp_path, small_run_toml, capsys, monkeypatch,
                                                               writer):
    checkpoint = train(tmp_path / "run", small_run_toml)
    monkeypatch.setattr(writer, no_space)
    capsys.readouterr()
    code = main(["--resume", str(checkpoint), "--out", str(tmp_path / "run"), "--steps", "8", "--no-progress"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ling-train: error:")]
    assert code == 1 and len(errors) == 1 and "Traceback" not in err, errors
    assert str(tmp_path / "run" / "checkpoints" / "step-8") in errors[0]
    assert "No space left on device" in errors[0] and "ENOSPC" in errors[0]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-4"]  # consistent, as before
    assert (checkpoints / "latest").read_text().strip() == "step-4"


def test_ling_eval_loader_rejects_corrupt_tensor_bytes(tmp_path, small_run_toml):
    """ling-eval's bailing_moe loader (and ling-train sft --init) load through the same checked path."""
    from ling_eval.errors import CheckpointLoadError
    from ling_train.eval_model import load_checkpoint

    checkpoint = train(tmp_path / "run", small_run_toml)
    load_checkpoint(checkpoint)
    nan_tensor_bytes(checkpoint / "model.safetensors")
    with pytest.raises(CheckpointLoadError, match="model.safetensors: sha256"):
        load_checkpoint(checkpoint)
