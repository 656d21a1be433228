"""When the Local SGD workers synchronise: every H inner steps, or every T seconds of wall time.

A policy only answers "is this rank due?" after each inner step. Ranks need no extra message to
agree on *which* sync they are at: every sync is a sequence of collectives, and the k-th sync of
one rank meets the k-th sync of every other rank. What differs is *when* each rank gets there:

- `EveryHSteps`: all ranks take the same number of steps, so they arrive together (DiLoCo, EDiT).
- `EveryTSeconds`: each rank runs until its own deadline, `T` seconds after the previous sync
  ended. A sync ends at about the same moment on every rank (the collective returns on all of
  them once the last one joins), so the deadlines line up, and a fast rank waits at most for
  the slow rank's current step, not for the H steps a step-count schedule would force on it
  (A-EDiT). No clock is compared across machines: each rank reads its own monotonic clock.
"""

from __future__ import annotations

import time
from typing import Any, Protocol


class SyncPolicy(Protocol):
    min_total_steps: int

    def due(self, steps_since_sync: int) -> bool:
        """Whether this rank should enter the next sync now."""

    def restart(self) -> None:
        """A sync point was passed (done or skipped): the next interval starts now."""

    def state_dict(self) -> dict[str, Any]: ...

    def check_compatible(self, state: dict[str, Any]) -> None:
        """Raise ValueError when a checkpoint was written under another schedule."""


class EveryHSteps:
    """Synchronise after every `sync_every` inner steps (all ranks in lockstep)."""

    min_total_steps = 1

    def __init__(self, sync_every: int) -> None:
        if sync_every < 1:
            raise ValueError(f"sync_every={sync_every}: expected >= 1 inner steps between syncs")
        self.sync_every = sync_every

    def due(self, steps_since_sync: int) -> bool:
        return steps_since_sync >= self.sync_every

    def restart(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"sync_every": self.sync_every}

    def check_compatible(self, state: dict[str, Any]) -> None:
        if state.get("sync_every") != self.sync_every:
            raise ValueError(f"checkpoint has sync_every={state.get('sync_every')}, this run {self.sync_every}; "
                             "resuming mid-interval needs the same value")


class EveryTSeconds:
    """Synchronise when `sync_seconds` of wall time have passed since the previous sync ended.

    `min_total_steps`: a sync point where all ranks together took fewer inner steps than this is
    skipped (nothing but the step counts is exchanged; everyone keeps training locally), because
    an outer step on a handful of inner steps costs a full exchange for little progress.
    `clock` is injectable for tests; it must be monotonic.
    """

    def __init__(self, sync_seconds: float, *, min_total_steps: int = 1, clock=time.monotonic) -> None:
        if not sync_seconds > 0:
            raise ValueError(f"sync_seconds={sync_seconds}: expected > 0")
        if min_total_steps < 1:
            raise ValueError(f"min_total_steps={min_total_steps}: expected >= 1")
        self.sync_seconds = float(sync_seconds)
        self.min_total_steps = min_total_steps
        self.clock = clock
        self.deadline = clock() + self.sync_seconds

    def due(self, steps_since_sync: int) -> bool:
        return self.clock() >= self.deadline

    def restart(self) -> None:
        self.deadline = self.clock() + self.sync_seconds

    def state_dict(self) -> dict[str, Any]:
        # The deadline is a reading of this process's clock, meaningless after a restart.
        return {"sync_seconds": self.sync_seconds, "min_total_steps": self.min_total_steps}

    def check_compatible(self, state: dict[str, Any]) -> None:
        if "sync_seconds" not in state:
            raise ValueError(f"checkpoint was written with a step schedule ({state}), this run syncs every "
                             f"{self.sync_seconds} s")
