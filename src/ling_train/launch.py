"""The launcher behind `ling-train --nproc N`: torch.distributed.run, with a rank's bad input kept
as the CLI's exit 2 and one line instead of torchrun's exit 1 and failure dump.

Why: torchrun turns any failed worker into a `ChildFailedError` (a traceback, a table of failed
ranks, exit 1), so a bad flag or file that only a rank can detect (a data directory, a checkpoint,
an `--expert-parallel` that does not divide `num_experts`) looked like a crash. Here every rank
gets `LING_TRAIN_ERROR_DIR`. A rank that fails on bad input writes its one-line message to
`rank-R.txt` there and exits 2; a rank that fails otherwise writes its traceback to
`rank-R.traceback` and exits 1 (`ling_train.cli.main`). When any rank exited 2, this launcher
prints each distinct message once (lowest rank first) and exits 2: the other ranks' failures are
consequences (a collective whose peer left). Otherwise it is an internal error: the ranks'
tracebacks, torchrun's log lines (held back until then) and its failure report are shown, exit 1.

With `--max-restarts K` (`ling-train --nproc N --max-restarts K`) torchrun restarts every worker
after a failure, up to K times, and the ranks resume from what the run saved
(`ling_train.snapshots`); all of the above applies once the restarts are used up. torchrun
restarts a bad-input exit like a crash (it cannot tell them apart), but the restarted ranks find
the first attempt's report in the error directory and exit 2 before doing any work
(`failed_on_bad_input_before`): the input is still bad, so the restarts end in seconds.

Run as `python -m ling_train.launch TORCHRUN_ARGS...` (what `cli.relaunch` does).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

ERROR_DIR_ENV = "LING_TRAIN_ERROR_DIR"
BAD_INPUT_EXIT = 2


def write_rank_report(kind: str, text: str) -> bool:
    """In a rank started by this launcher, leave `text` as `rank-R.<kind>` in its error directory
    (temp + rename) and return True; elsewhere (one process, torchrun by hand) return False."""
    error_dir, rank = os.environ.get(ERROR_DIR_ENV), os.environ.get("RANK")
    if not error_dir or rank is None:
        return False
    path = Path(error_dir) / f"rank-{rank}.{kind}"
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(text, encoding="utf-8")
    temp.replace(path)
    return True


def failed_on_bad_input_before() -> bool:
    """In a rank started by this launcher: whether a rank of an earlier attempt (before a
    `--max-restarts` restart) already failed on bad input, so this attempt would fail the same way."""
    error_dir = os.environ.get(ERROR_DIR_ENV)
    return bool(error_dir) and any(Path(error_dir).glob("rank-*.txt"))


def rank_reports(error_dir: Path, kind: str) -> list[tuple[int, str]]:
    """`(rank, text)` of every `rank-R.<kind>` in `error_dir`, lowest rank first."""
    reports = [(int(path.name.split(".")[0].removeprefix("rank-")), path.read_text(encoding="utf-8"))
               for path in error_dir.glob(f"rank-*.{kind}")]
    return sorted(reports)


def distinct_messages(error_dir: Path) -> list[str]:
    """The ranks' one-line bad-input messages, each once, lowest rank first."""
    messages: list[str] = []
    for _, text in rank_reports(error_dir, "txt"):
        if text.strip() and text.strip() not in messages:
            messages.append(text.strip())
    return messages


class _HeldRecords(logging.Handler):
    """Stands in for torch.distributed's log handlers while the ranks run, holding torchrun's
    records ("failed (exitcode: 2)", "Sending process ... SIGTERM") until we know whether the
    failure was bad input (dropped) or internal (passed on to the original handlers)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def main(torchrun_args: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(torchrun_args)
    logger = logging.getLogger("torch.distributed")  # torch gives it its own stderr handler
    original_handlers, held = logger.handlers[:], _HeldRecords()
    logger.handlers = [held]

    def release_held_records() -> None:
        logger.handlers = original_handlers
        for record in held.records:
            for handler in original_handlers:
                if record.levelno >= handler.level:
                    handler.handle(record)
        held.records.clear()

    with tempfile.TemporaryDirectory(prefix="ling-train-errors-") as error_dir:
        os.environ[ERROR_DIR_ENV] = error_dir  # the elastic agent passes its environment to the ranks
        try:
            run(args)
        except ChildFailedError as failed:
            messages = distinct_messages(Path(error_dir))  # also when torchrun saw a consequence first
            if messages or any(failure.exitcode == BAD_INPUT_EXIT for failure in failed.failures.values()):
                held.records.clear()
                for message in messages:
                    print(message, file=sys.stderr)
                return BAD_INPUT_EXIT
            for rank, text in rank_reports(Path(error_dir), "traceback"):
                print("".join(f"[rank{rank}]: {line}\n" for line in text.splitlines()), end="", file=sys.stderr)
            raise
        finally:
            release_held_records()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
