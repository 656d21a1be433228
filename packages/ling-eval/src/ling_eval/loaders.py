"""Loading checkpoints without knowing the model: a plug-in point.

A loader is `load(path, device) -> (EvalModel, Tokenizer)` and raises CheckpointLoadError for a
missing or corrupt checkpoint. It is found either by name (`module:function`, e.g. the CLI's
`--loader`) or through the `ling_eval.model_loaders` entry-point group, keyed by the
checkpoint's `config.json` `model_type` (the root `ling` project registers `bailing_moe`).
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from ling_eval.errors import CheckpointLoadError, EvalError

ENTRY_POINT_GROUP = "ling_eval.model_loaders"
Loader = Callable[[Path, Any], tuple[Any, Any]]
_STEP = re.compile(r"step-(\d+)$")


def model_type(checkpoint: Path) -> str:
    if not checkpoint.exists():
        raise CheckpointLoadError(f"{checkpoint}: does not exist (expected an HF-layout checkpoint directory)")
    config = checkpoint / "config.json"
    if not checkpoint.is_dir() or not config.is_file():
        raise CheckpointLoadError(f"{checkpoint}: not a checkpoint (expected a directory with config.json)")
    try:
        data = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointLoadError(f"{config}: corrupt config.json ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise CheckpointLoadError(f"{config}: no string 'model_type' (needed to choose a loader)")
    return data["model_type"]


def loader_from_spec(spec: str) -> Loader:
    """`package.module:function` -> the function."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise EvalError(f"--loader: {spec!r} is not of the form module:function")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise EvalError(f"--loader: cannot import {spec!r} ({e})") from None


def registered_loaders() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def find_loader(checkpoint: Path) -> Loader:
    kind = model_type(checkpoint)
    loaders = registered_loaders()
    if kind not in loaders:
        known = ", ".join(sorted(loaders)) or "none installed"
        raise CheckpointLoadError(f"{checkpoint}: no loader for model_type {kind!r} (registered: {known}); "
                                  f"install the package that provides one or pass --loader module:function")
    return loaders[kind].load()


def load_checkpoint(checkpoint: str | Path, device: Any = "cpu", loader: str | Loader | None = None):
    """(EvalModel, Tokenizer) for an HF-layout checkpoint directory."""
    checkpoint = Path(checkpoint)
    if loader is None:
        fn = find_loader(checkpoint)
    else:
        model_type(checkpoint)  # the same existence checks and messages
        fn = loader_from_spec(loader) if isinstance(loader, str) else loader
    return fn(checkpoint, device)


def checkpoint_step(checkpoint: Path) -> int | None:
    """The training step of `RUN/checkpoints/step-N` (None for other names)."""
    match = _STEP.search(checkpoint.name)
    return int(match.group(1)) if match else None


def expand_checkpoints(path: Path) -> list[Path]:
    """A checkpoint dir stays itself; a run dir or its `checkpoints/` dir becomes every complete
    step-N checkpoint in it, by step (temp dirs of an interrupted save are skipped)."""
    for candidate in (path / "checkpoints", path):
        steps = [p for p in candidate.glob("step-*") if p.is_dir() and checkpoint_step(p) is not None] \
            if candidate.is_dir() and not (candidate / "config.json").exists() else []
        if steps:
            return sorted(steps, key=checkpoint_step)
    return [path]
