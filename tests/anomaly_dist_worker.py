"""`ling-train` under torchrun with faults injected into chosen ranks (tests/test_anomaly_dist.py).

Launched as `python -m torch.distributed.run ... tests/anomaly_dist_worker.py <ling-train args>`;
the faults come from the JSON in $ANOMALY_TEST_FAULTS, so the production code has no test hooks:

- "scale": {"rank", "forward", "factor"}: on that rank, the gradient of every parameter from that
  forward (1-based) is multiplied by `factor` (a worker whose update blows up);
- "nan_batch": {"rank", "draw"}: on that rank, an extra batch is served at that draw (0-based)
  without advancing the real loader, and its gradient is NaN (a corrupt batch the run never needed);
- "force_exclude": {"rank", "sync"}: EDiT's penalty treats that rank as an outlier at that sync
  (1-based), whatever its norm (the reference run: that worker's pseudo-gradient weighted 0).
"""

from __future__ import annotations

import json
import os
import sys

import torch

import ling_train.run
from ling_dist import PseudoGradientPenalty
from ling_train.cli import main

FAULTS = json.loads(os.environ.get("ANOMALY_TEST_FAULTS", "{}"))
RANK = int(os.environ.get("RANK", "0"))


class ExtraBatch:
    """Serves the wrapped loader's batches, plus one extra batch at draw `draw`."""

    def __init__(self, inner, draw: int):
        self.inner, self.draw, self.draws = inner, draw, 0

    def next_batch(self):
        self.draws += 1
        if self.draws - 1 == self.draw:  # the next real batch, reversed, and the loader rewound
            state = self.inner.state_dict()
            input_ids, labels = self.inner.next_batch()
            self.inner.load_state_dict(state)
            return input_ids.flip(0), labels.flip(0)
        return self.inner.next_batch()

    def __getattr__(self, name):
        return getattr(self.inner, name)


def gradient_faults(model: torch.nn.Module) -> None:
    faults = {}
    if FAULTS.get("scale", {}).get("rank") == RANK:
        faults[FAULTS["scale"]["forward"]] = float(FAULTS["scale"]["factor"])
    if FAULTS.get("nan_batch", {}).get("rank") == RANK:
        faults[FAULTS["nan_batch"]["draw"] + 1] = float("nan")
    if not faults:
        return
    forwards = [0]
    model.register_forward_pre_hook(lambda module, args: forwards.__setitem__(0, forwards[0] + 1))
    for param in model.parameters():
        param.register_hook(lambda grad: grad * faults[forwards[0]] if forwards[0] in faults else grad)


def patch() -> None:
    build_model, build_data = ling_train.run.build_model, ling_train.run.build_data

    def faulty_model(*args, **kwargs):
        model = build_model(*args, **kwargs)
        gradient_faults(model)
        return model

    def faulty_data(*args, **kwargs):
        data = build_data(*args, **kwargs)
        if FAULTS.get("nan_batch", {}).get("rank") == RANK:
            data.loader = ExtraBatch(data.loader, FAULTS["nan_batch"]["draw"])
        return data

    ling_train.run.build_model, ling_train.run.build_data = faulty_model, faulty_data
    if "force_exclude" in FAULTS:
        forced = (FAULTS["force_exclude"]["rank"], FAULTS["force_exclude"]["sync"])
        weigh, is_outlier = PseudoGradientPenalty.weigh, PseudoGradientPenalty.is_outlier

        def counting_weigh(self, tokens, steps, norms):
            self.test_syncs = getattr(self, "test_syncs", 0) + 1
            return weigh(self, tokens, steps, norms)

        def forced_outlier(self, rank, norm):
            return (rank, self.test_syncs) == forced or is_outlier(self, rank, norm)

        PseudoGradientPenalty.weigh, PseudoGradientPenalty.is_outlier = counting_weigh, forced_outlier


if __name__ == "__main__":
    patch()
    sys.exit(main(sys.argv[1:]))
