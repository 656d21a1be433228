"""The run config: defaults < `--config run.toml` < command-line flags, resolved into `RunConfig`.

TOML layout: top-level keys are `RunConfig` fields; an optional `[model]` table overrides fields
of the chosen preset (HF `config.json` key names); an optional `[anomaly]` table turns on
anomaly detection and responses (ling_train.anomaly.config). Unknown keys anywhere are errors,
so a typo never silently trains the wrong model.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from ling_core import PRESETS, LingConfig, preset


LOCAL_SGD_MODES = ("diloco", "edit", "aedit")


class RunConfigError(ValueError):
    """Bad run configuration (a flag, a TOML file or one of its keys)."""


@dataclass
class RunConfig:
    size: str = "tiny"
    steps: int = 300
    seq_len: int = 128
    batch_size: int | list[int] = 16  # sequences per step; a list: one per process (Local SGD modes)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"  # auto: cuda if available, else cpu; mixed: each rank its GPU if it has one, else cpu
    precision: str = "auto"  # auto: bf16 autocast where the device supports it, else fp32
    data: str = ""  # "" = the embedded corpus; else a file or directory of .txt / .jsonl documents
    out: str = ""  # "" = runs/<size>-<timestamp>
    log_every: int = 1
    checkpoint_every: int = 100  # 0: only at the end
    snapshot_every: int = 0  # N: per-rank flash snapshots into RUN/snapshots every N steps (0: off)
    keep_snapshots: int = 2  # complete snapshots kept in RUN/snapshots
    max_shard_gb: float = 2.0
    eval_every: int = 0  # 0: no in-training eval; N: score eval_tasks every N steps (metrics.jsonl)
    eval_tasks: list[str] = field(default_factory=lambda: ["facts_mc", "corpus_ppl"])  # files or built-ins
    eval_limit: int = 0  # 0: every item; N: the first N items of each task
    optimizer: str = "adamw"  # adamw, or sgd (plain SGD, e.g. to compare Local SGD with data parallel exactly)
    # Distributed training (ling-dist): see ling_train/distributed.py and the README.
    dist: str = "none"  # none, ddp, fsdp, diloco, edit, aedit
    sync_every: int = 0  # diloco/edit: inner steps between syncs (0: 8)
    sync_seconds: float = 0.0  # aedit: seconds of wall time between syncs (0: 1.0)
    outer_lr: float = 0.7  # Local SGD outer SGD learning rate
    outer_momentum: float = 0.9  # Local SGD outer Nesterov momentum (0: plain SGD)
    expert_parallel: int = 0  # ddp/fsdp: split experts over groups of this many ranks (0: off)
    # Post-training (ling_train.sft): task "sft" fine-tunes the `init` checkpoint on chat samples
    task: str = "pretrain"  # pretrain, sft or dpo (data: a `ling-data kg` directory or JSONL file)
    init: str = ""  # sft, dpo: the HF-layout checkpoint (step-N dir or run dir) whose weights it starts from
    dpo_beta: float = 0.1  # dpo (ling_train.dpo): the KL weight; the reference is the init checkpoint
    model: dict[str, Any] = field(default_factory=dict)  # LingConfig overrides
    anomaly: dict[str, Any] | None = None  # [anomaly] table (even empty: defaults); None = off

    def validate(self, source: str = "config") -> None:
        for f in dataclasses.fields(self):  # nan slips past every `< 0` check below; inf trains NaN
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise RunConfigError(f"{source}: {f.name} (--{f.name.replace('_', '-')}): expected a finite "
                                     f"number, got {value}")
        if self.size not in PRESETS:
            raise RunConfigError(f"{source}: size: unknown size {self.size!r}; expected one of "
                                 f"{', '.join(PRESETS)}")
        for name in ("steps", "seq_len", "log_every"):
            if getattr(self, name) < 1:
                raise RunConfigError(f"{source}: {name}: must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "checkpoint_every", "grad_clip", "weight_decay", "lr", "eval_every",
                     "eval_limit"):
            if getattr(self, name) < 0:
                raise RunConfigError(f"{source}: {name}: must be >= 0, got {getattr(self, name)}")
        if not all(isinstance(t, str) for t in self.eval_tasks):
            raise RunConfigError(f"{source}: eval_tasks: expected a list of task files or built-in names")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise RunConfigError(f"{source}: precision: expected auto, fp32 or bf16, got {self.precision!r}")
        if self.task not in ("pretrain", "sft", "dpo"):
            raise RunConfigError(f"{source}: task: expected pretrain, sft or dpo, got {self.task!r}")
        if not 0 < self.dpo_beta < float("inf"):
            raise RunConfigError(f"{source}: dpo_beta: expected a finite number > 0, got {self.dpo_beta}")
        validate_dist(self, source)
        validate_batch_size(self, source)
        validate_snapshots(self, source)
        self.model_config(source)  # validates the [model] overrides
        self.anomaly_config(source)

    def batch_sizes(self, world_size: int) -> list[int]:
        """Every process's sequences per step: the list, whose length must be the process count,
        or the one int for all."""
        if isinstance(self.batch_size, int):
            return [self.batch_size] * world_size
        if len(self.batch_size) != world_size:
            raise RunConfigError(f"batch_size (--batch-size) {format_batch_size(self.batch_size)}: "
                                 f"{len(self.batch_size)} per-process sizes, but the run has {world_size} "
                                 f"process(es); give one size per process, or one int for all")
        return list(self.batch_size)

    def anomaly_config(self, source: str = "config"):
        """The `[anomaly]` table as an AnomalyConfig, or None when the table is absent."""
        from ling_train.anomaly.config import anomaly_config
        return anomaly_config(self.anomaly, source) if self.anomaly is not None else None

    def model_config(self, source: str = "config") -> LingConfig:
        fields = {f.name for f in dataclasses.fields(LingConfig)} - {"extra"}
        unknown = sorted(set(self.model) - fields)
        if unknown:
            raise RunConfigError(f"{source}: [model]: unknown key {unknown[0]!r}; expected LingConfig "
                                 f"(HF config.json) keys such as hidden_size, num_experts")
        try:
            return preset(self.size).replace(**self.model)
        except (ValueError, TypeError) as e:
            raise RunConfigError(f"{source}: [model]: {e}") from None

    def to_toml(self) -> str:
        d = dataclasses.asdict(self)
        model = d.pop("model")
        if model:
            d["model"] = model
        anomaly = d.pop("anomaly")
        if anomaly is not None:
            d["anomaly"] = anomaly
        return tomli_w.dumps(d)


# Settings that only some --dist modes take (0: off / the mode's default).
MODE_SETTINGS = {"sync_every": ("diloco", "edit"), "sync_seconds": ("aedit",), "expert_parallel": ("ddp", "fsdp")}


def settings_for_dist(values: dict[str, Any], dist: str) -> dict[str, Any]:
    """A checkpoint's run config continued under `dist`, which may be another --dist: the old
    mode's settings that `dist` does not take are dropped, so that its own defaults apply."""
    kept = {k: v for k, v in values.items() if k not in MODE_SETTINGS or dist in MODE_SETTINGS[k]}
    if kept.get("device") == "mixed" and dist not in LOCAL_SGD_MODES:  # CPU+GPU ranks cannot run DDP/FSDP2
        kept.pop("device")
    return kept


def validate_dist(config: "RunConfig", source: str) -> None:
    """Combinations of the `--dist` family that make no sense, as RunConfigError (exit 2)."""
    modes = ("none", "ddp", "fsdp", *LOCAL_SGD_MODES)
    if config.dist not in modes:
        raise RunConfigError(f"{source}: dist: unknown mode {config.dist!r}; expected one of {', '.join(modes)}")
    if config.sync_every < 0 or config.sync_seconds < 0 or config.expert_parallel < 0:
        raise RunConfigError(f"{source}: sync_every, sync_seconds and expert_parallel must be >= 0")
    if config.sync_every and config.dist not in MODE_SETTINGS["sync_every"]:
        raise RunConfigError(f"{source}: sync_every (--sync-every) applies to --dist diloco or edit, "
                             f"not {config.dist}")
    if config.sync_seconds and config.dist not in MODE_SETTINGS["sync_seconds"]:
        raise RunConfigError(f"{source}: sync_seconds (--sync-seconds) applies to --dist aedit, not {config.dist}")
    if config.device == "mixed" and config.dist in ("ddp", "fsdp"):
        raise RunConfigError(f"{source}: device = 'mixed' (--device mixed) needs --dist diloco, edit or aedit "
                             f"(none for one process), not {config.dist}: DDP and FSDP2 exchange gradients "
                             f"every step and need one kind of device")
    if config.expert_parallel and config.dist not in MODE_SETTINGS["expert_parallel"]:
        raise RunConfigError(f"{source}: expert_parallel (--expert-parallel) needs --dist ddp or fsdp, "
                             f"not {config.dist}")
    if not 0 <= config.outer_momentum < 1 or config.outer_lr <= 0:
        raise RunConfigError(f"{source}: outer_lr must be > 0 and outer_momentum in [0, 1)")
    if config.optimizer not in ("adamw", "sgd"):
        raise RunConfigError(f"{source}: optimizer: expected adamw or sgd, got {config.optimizer!r}")


def validate_batch_size(config: "RunConfig", source: str) -> None:
    """One positive int for every process, or a list of them, one per process: a list only where
    the ranks' updates are averaged by the tokens each processed (the Local SGD modes). DDP and
    FSDP2 average gradients with equal weight per rank, so unequal batches would be mis-weighted."""
    sizes = config.batch_size if isinstance(config.batch_size, list) else [config.batch_size]
    if not sizes or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes):
        raise RunConfigError(f"{source}: batch_size: expected a positive int or a list of them (one per process), "
                             f"got {config.batch_size!r}")
    if isinstance(config.batch_size, list) and config.dist not in LOCAL_SGD_MODES:
        why = ("DDP and FSDP2 average gradients with equal weight per rank" if config.dist in ("ddp", "fsdp")
               else "one process takes one int")
        raise RunConfigError(f"{source}: batch_size (--batch-size) {format_batch_size(config.batch_size)}: per-process "
                             f"sizes need --dist diloco, edit or aedit, not {config.dist}: {why}")


def format_batch_size(batch_size: int | list[int]) -> str:
    """As `--batch-size` takes it: 16, or 8,2."""
    return ",".join(map(str, batch_size)) if isinstance(batch_size, list) else str(batch_size)


def parse_batch_size(text: str) -> int | list[int]:
    """`--batch-size 16` (every process) or `--batch-size 8,2` (one per process)."""
    parts = text.split(",")
    if not all(part.strip().isdigit() for part in parts):
        raise RunConfigError(f"--batch-size: expected a positive int or a comma-separated list of them, one per "
                             f"process (e.g. 8,2), got {text!r}")
    sizes = [int(part) for part in parts]
    return sizes[0] if len(sizes) == 1 else sizes


def validate_snapshots(config: "RunConfig", source: str) -> None:
    """Flash snapshots (ling_train.snapshots) and the combinations they cannot serve."""
    if config.snapshot_every < 0 or config.keep_snapshots < 1:
        raise RunConfigError(f"{source}: snapshot_every must be >= 0 and keep_snapshots >= 1, got "
                             f"{config.snapshot_every} and {config.keep_snapshots}")


RUN_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def check_field_type(source: str, key: str, value: Any, default: Any,
                     error: type[RunConfigError] = RunConfigError) -> Any:
    """`value` if it has the type of `default` (an int is accepted for a float), else `error`."""
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise error(f"{source}: {key}: expected {expected.__name__}, got {value!r}")
    return value


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a run TOML into a dict of RunConfig fields, checking keys and types."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise RunConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise RunConfigError(f"{path}: invalid TOML ({e})") from None
    defaults = RunConfig()
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in RUN_FIELDS:
            raise RunConfigError(f"{path}: unknown key {key!r}; expected one of {', '.join(RUN_FIELDS)}")
        if key in ("model", "anomaly"):
            if not isinstance(value, dict):
                raise RunConfigError(f"{path}: {key}: expected a [{key}] table")
            out[key] = dict(value)
        elif key == "batch_size" and isinstance(value, list):  # one per process; checked by validate
            out[key] = value
        else:
            out[key] = check_field_type(str(path), key, value, getattr(defaults, key))
    return out


def resolve(toml_values: dict[str, Any], flag_values: dict[str, Any], source: str) -> RunConfig:
    values = {**toml_values, **{k: v for k, v in flag_values.items() if v is not None}}
    config = RunConfig(**values)
    config.validate(source)
    return config
