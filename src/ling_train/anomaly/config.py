"""The `[anomaly]` table of a run config: which detectors run, their thresholds, and the response
each one triggers. Unknown keys and wrong types are errors, as everywhere in the run config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ling_train.config import RunConfigError, check_field_type

RESPONSES = ("log", "skip", "skip_reinject", "lower_lr", "rollback", "abort")


class AnomalyConfigError(RunConfigError):
    """A bad `[anomaly]` table (its message names the key and what was expected)."""


@dataclass
class AnomalyConfig:
    enabled: bool = True
    # Rolling statistics (loss and gradient-norm spikes): the last `window` healthy steps, checked
    # once `min_history` of them are seen, so warmup's first steps never count as spikes.
    window: int = 50
    min_history: int = 20
    # Loss spike: robust z = (loss - median) / (1.4826 MAD) above `loss_z`, and the loss at
    # least `loss_min_rise` nats above the median (a plateau makes the MAD tiny).
    loss_z: float = 6.0
    loss_min_rise: float = 0.2
    # Gradient-norm spike: the same on log(grad_norm), and at least `grad_min_ratio` x median.
    grad_z: float = 6.0
    grad_min_ratio: float = 3.0
    # Expert-load collapse: busiest expert's tokens over the mean above `expert_max_load` (0: off),
    # or an expert receiving no tokens for `expert_dead_steps` consecutive steps (0: off).
    expert_max_load: float = 0.0
    expert_dead_steps: int = 100
    # Router entropy collapse: mean per-token router entropy over log(num_experts) below
    # `router_entropy_min` (0: off), measured every `router_every` steps.
    router_entropy_min: float = 0.1
    router_every: int = 10
    # Responses per detector (one of RESPONSES). Non-finite weights always roll back (or abort
    # without a snapshot): no update can repair them.
    on_loss_spike: str = "skip_reinject"
    on_grad_spike: str = "skip"
    on_nonfinite: str = "skip"
    on_expert_collapse: str = "log"
    on_router_collapse: str = "log"
    # Persistent anomalies: `lower_lr_after` interventions within `window` steps scale the LR by
    # `lr_factor` for `lr_cooldown_steps` steps (0: never).
    lower_lr_after: int = 3
    lr_factor: float = 0.5
    lr_cooldown_steps: int = 100
    reinject_rows_per_batch: int = 1  # re-injected sequences appended to each later batch
    snapshot_every: int = 20  # in-memory snapshot for rollback, after a healthy step (0: none)
    param_check_every: int = 20  # steps between non-finite weight checks (0: never)
    max_interventions: int = 20  # skips, rollbacks and LR cuts before the run aborts

    @property
    def detector_responses(self) -> dict[str, str]:
        return {"loss_spike": self.on_loss_spike, "grad_spike": self.on_grad_spike,
                "nonfinite": self.on_nonfinite, "expert_collapse": self.on_expert_collapse,
                "router_collapse": self.on_router_collapse}

    def validate(self, source: str) -> None:
        for name in ("window", "min_history", "router_every", "reinject_rows_per_batch"):
            if getattr(self, name) < 1:
                raise AnomalyConfigError(f"{source}: [anomaly] {name}: must be >= 1, got {getattr(self, name)}")
        for name in ("expert_max_load", "expert_dead_steps", "router_entropy_min", "lower_lr_after",
                     "lr_cooldown_steps", "snapshot_every", "param_check_every", "max_interventions",
                     "loss_min_rise"):
            if getattr(self, name) < 0:
                raise AnomalyConfigError(f"{source}: [anomaly] {name}: must be >= 0, got {getattr(self, name)}")
        if self.min_history > self.window:
            raise AnomalyConfigError(f"{source}: [anomaly] min_history: must be <= window ({self.window}), "
                                     f"got {self.min_history}")
        if not 0 < self.lr_factor < 1:
            raise AnomalyConfigError(f"{source}: [anomaly] lr_factor: expected a float in (0, 1), got {self.lr_factor}")
        for key, response in self.detector_responses.items():
            if response not in RESPONSES:
                raise AnomalyConfigError(f"{source}: [anomaly] on_{key}: expected one of "
                                         f"{', '.join(RESPONSES)}, got {response!r}")
            if response == "rollback" and self.snapshot_every == 0:
                raise AnomalyConfigError(f"{source}: [anomaly] on_{key} = 'rollback' needs snapshot_every > 0")


FIELDS = {f.name: f for f in dataclasses.fields(AnomalyConfig)}


def anomaly_config(table: dict[str, Any], source: str = "config") -> AnomalyConfig:
    """Build and validate an AnomalyConfig from a TOML table (defaults for missing keys)."""
    defaults = AnomalyConfig()
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in FIELDS:
            raise AnomalyConfigError(f"{source}: [anomaly]: unknown key {key!r}; expected one of "
                                     f"{', '.join(FIELDS)}")
        values[key] = check_field_type(source, f"[anomaly] {key}", value, getattr(defaults, key),
                                       AnomalyConfigError)
    config = AnomalyConfig(**values)
    config.validate(source)
    return config


# Under several processes only the Local SGD modes whose inner steps are local, and whose penalty
# drops a worker with a non-finite pseudo-gradient, can let one rank skip an update.
WORKER_LOCAL_MODES = ("edit", "aedit")
RANK_LOCAL_RESPONSES = ("log", "skip", "skip_reinject", "lower_lr")


def check_workers(config: AnomalyConfig, dist: str, processes: int, source: str = "config") -> None:
    """Refuse (one line) an `[anomaly]` table that would desynchronise several processes.

    Under EDiT / A-EDiT each rank takes its inner steps alone, so a rank may drop or re-inject a
    batch (it reaches the next sync one batch later, at the same step count as the others) or lower
    its own learning rate. Rolling back or aborting on one rank would restore rank-local copies of
    the step and sync counters, so they are refused; a stop is agreed at the next sync point instead.
    """
    if processes <= 1 or not config.enabled:
        return
    if dist in ("ddp", "fsdp"):
        raise AnomalyConfigError(f"{source}: [anomaly] with --dist {dist} on {processes} processes: every rank must "
                                 f"take every update together (a skipped update on one rank would desynchronise "
                                 f"the gradient collectives); use --dist edit or aedit, whose inner steps are local")
    if dist not in WORKER_LOCAL_MODES:
        raise AnomalyConfigError(f"{source}: [anomaly] with --dist {dist} on {processes} processes: DiLoCo averages "
                                 f"every worker's pseudo-gradient, so a worker whose weights went non-finite would "
                                 f"poison the shared model; use --dist edit or aedit, whose penalty drops it")
    for key, response in config.detector_responses.items():
        if response not in RANK_LOCAL_RESPONSES:
            raise AnomalyConfigError(f"{source}: [anomaly] on_{key} = {response!r} with {processes} processes: a "
                                     f"rank-local {response} would put that rank's step and sync counters out of "
                                     f"step with the others; expected one of {', '.join(RANK_LOCAL_RESPONSES)}")
