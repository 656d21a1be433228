"""A `ling-train` rank whose training fails with an internal error on rank 1 (rank 0 waits, as a
rank blocked in a collective would): run under `python -m ling_train.launch` by
tests/test_train_dist.py to check that internal errors still exit 1 with the traceback."""

import os
import sys
import time

import ling_train.run
from ling_train.cli import main


def train(*args, **kwargs):
    if os.environ["RANK"] == "1":
        raise RuntimeError("injected internal error on rank 1")
    time.sleep(300)  # until torchrun stops this rank because rank 1 failed


ling_train.run.train = train  # cli.main imports it at call time
sys.exit(main(sys.argv[1:]))
