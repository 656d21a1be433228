"""Run checkpoints: `RUN/checkpoints/step-N/` = HF-layout weights + `trainer_state/`.

Each checkpoint is written into a temporary directory and renamed, then `latest` (a one-line text
file naming the newest complete checkpoint) is replaced atomically; a crash at any point leaves the
previous checkpoint intact and `latest` pointing at a complete one. Files and directories are
fsynced before each rename, so a power loss cannot undo that either; a later run removes the temp
dirs a killed write left. `checksums.json` (ling_core.hf_io) lets every loader detect altered tensor
bytes; a checkpoint is written only with finite weights, and a failed write (disk full) is one line.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import tomllib
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from ling_core import CheckpointError, ConfigError, LingConfig
from ling_core.hf_io import CONFIG_NAME, atomic_directory, write_hf_files, write_text_atomic
from ling_train.config import RunConfig, RunConfigError

TRAINER_STATE_DIR = "trainer_state"
STATE_FILE = "state.pt"
RUN_CONFIG_FILE = "run_config.toml"
SUMMARY_FILE = "trainer_state.json"
LATEST = "latest"


class CheckpointWriteError(RuntimeError):
    """A checkpoint was not written (non-finite weights, disk full); `latest` still names the last
    good one. Not bad input (exit 1), but one line: the run's state is consistent."""


def save_checkpoint(model, trainer_state: dict[str, Any], run_config_toml: str, checkpoints_dir: Path,
                    step: int, max_shard_bytes: int, rank_states: dict[int, dict[str, Any]] | None = None,
                    weights: dict[str, torch.Tensor] | None = None) -> Path:
    """`trainer_state` is rank 0's; `rank_states` the other ranks' (rank-R.pt next to state.pt).
    `weights`: the whole model when `model` holds only this rank's shards (FSDP2, expert parallel)."""
    final = checkpoints_dir / f"step-{step}"
    check_finite(model.state_dict() if weights is None else weights, final)
    try:
        with atomic_directory(final) as tmp:
            write_hf_files(model if weights is None else _WholeWeights(model.config, weights), model.config, tmp,
                           max_shard_bytes)
            state_dir = tmp / TRAINER_STATE_DIR
            state_dir.mkdir()
            _torch_save(trainer_state, state_dir / STATE_FILE)
            for rank, state in (rank_states or {}).items():
                _torch_save(state, state_dir / rank_state_file(rank))
            (state_dir / RUN_CONFIG_FILE).write_text(run_config_toml)
            summary = {"step": step, "loader": trainer_state.get("loader")}
            (state_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")
        write_text_atomic(checkpoints_dir / LATEST, final.name + "\n")
    except (OSError, SafetensorError) as e:  # disk full, quota, read-only: the temp dir is already gone
        raise CheckpointWriteError(f"{final}: not written, {_describe_write_error(e)}; {checkpoints_dir / LATEST} "
                                   f"still names the previous checkpoint") from None
    return final


def _torch_save(obj: Any, path: Path) -> None:
    """torch.save through a Python file: a failed write raises OSError with its errno (ENOSPC), where
    torch's own writer only says `unexpected pos ...`."""
    with open(path, "wb") as file:
        torch.save(obj, file)


def _describe_write_error(error: BaseException) -> str:
    if isinstance(error, OSError):
        code = errno.errorcode.get(error.errno, error.errno) if error.errno else None
        return f"{error.strerror or error}" + (f" (errno {code})" if code else "")
    if "StorageFull" in str(error) or "code: 28" in str(error):  # safetensors' Rust io::Error
        return f"{os.strerror(errno.ENOSPC)} (errno ENOSPC)"
    return str(error)


def check_finite(weights: dict[str, torch.Tensor], final: Path) -> None:
    """A NaN/inf checkpoint would become `latest` and every resume would continue a dead run."""
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointWriteError(f"{final}: not written, tensor {name!r} holds non-finite values "
                                       f"(the run diverged); {LATEST} still names the previous checkpoint")


class _WholeWeights:
    """What `write_hf_files` reads from a model (`state_dict()`), for weights gathered elsewhere."""

    def __init__(self, config, weights: dict[str, torch.Tensor]):
        self.config, self.weights = config, weights

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.weights


def remove_partial_checkpoints(checkpoints_dir: Path) -> None:
    """What a killed checkpoint write left: `.step-N.tmp-*` dirs (never complete, and as big as a
    checkpoint), `.step-N.old-*` once step-N itself is back in place, and `.latest.tmp-*`.
    Rank 0, before it writes."""
    for leftover in checkpoints_dir.glob(f".{LATEST}.tmp-*"):
        leftover.unlink(missing_ok=True)
    for leftover in checkpoints_dir.glob(".step-*"):
        name, _, kind = leftover.name[1:].partition(".")
        if kind.startswith("tmp-") or (kind.startswith("old-") and (checkpoints_dir / name).is_dir()):
            shutil.rmtree(leftover, ignore_errors=True)


def latest_checkpoint(checkpoints_dir: Path) -> Path:
    pointer = checkpoints_dir / LATEST
    if not pointer.exists():
        raise CheckpointError(f"{checkpoints_dir}: no '{LATEST}' file (expected a run with at least one "
                              f"checkpoint)")
    path = checkpoints_dir / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{pointer}: names {path.name}, which does not exist")
    return path


def resolve_checkpoint(path: Path) -> Path:
    """Accept a checkpoint dir, a run's `checkpoints/` dir, or a run dir."""
    if (path / TRAINER_STATE_DIR).is_dir():
        return path
    if (path / LATEST).exists():
        return latest_checkpoint(path)
    if (path / "checkpoints").is_dir():
        return latest_checkpoint(path / "checkpoints")
    raise CheckpointError(f"{path}: not a checkpoint (expected step-N/ with {TRAINER_STATE_DIR}/, "
                          f"or a run directory with checkpoints/{LATEST})")


def read_run_config_toml(checkpoint: Path) -> str:
    path = checkpoint / TRAINER_STATE_DIR / RUN_CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"{path}: missing (the checkpoint has no run config)")
    return path.read_text()


def rank_state_file(rank: int) -> str:
    return STATE_FILE if rank == 0 else f"rank-{rank}.pt"


def load_trainer_state(checkpoint: Path, rank: int = 0) -> dict[str, Any]:
    path = checkpoint / TRAINER_STATE_DIR / rank_state_file(rank)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (expected the trainer state of a checkpoint)") from None
    try:
        # map_location: a checkpoint written on CUDA loads on a CPU-only machine; the optimizer and
        # Local SGD loaders copy each tensor to its parameter's device.
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for truncated/corrupt pickles
        raise CheckpointError(f"{path}: corrupt or truncated trainer state ({type(e).__name__})") from None


def check_side_files(checkpoint: Path, state: dict[str, Any]) -> None:
    """The rule ling-eval applies, on resume too: a checkpoint whose files are broken or disagree
    with each other (config.json vs the run config that wrote it, trainer_state.json vs state.pt)
    is bad input, not something to resume from silently."""
    run_config_path = checkpoint / TRAINER_STATE_DIR / RUN_CONFIG_FILE
    try:
        model_config = RunConfig(**tomllib.loads(read_run_config_toml(checkpoint))).model_config(str(run_config_path))
    except (tomllib.TOMLDecodeError, TypeError, RunConfigError) as e:
        raise CheckpointError(f"{run_config_path}: not a valid run config ({e})") from None
    config_path = checkpoint / CONFIG_NAME
    try:
        saved = LingConfig.from_json_file(config_path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    for field in LingConfig.__dataclass_fields__:
        if field != "extra" and getattr(saved, field) != getattr(model_config, field):
            raise CheckpointError(f"{config_path}: {field} = {getattr(saved, field)!r}, but the checkpoint's run "
                                  f"config ({TRAINER_STATE_DIR}/{RUN_CONFIG_FILE}) has {getattr(model_config, field)!r}")
    summary_path = checkpoint / TRAINER_STATE_DIR / SUMMARY_FILE
    if not summary_path.exists():
        return  # a summary for people; its absence loses nothing
    try:
        summary = json.loads(summary_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{summary_path}: corrupt ({e}); expected a JSON object with the step") from None
    step = summary.get("step") if isinstance(summary, dict) else None
    if type(step) is not int or step != state.get("step"):
        raise CheckpointError(f"{summary_path}: step {step!r}, but {TRAINER_STATE_DIR}/{STATE_FILE} holds step "
                              f"{state.get('step')!r} (expected the same int)")
