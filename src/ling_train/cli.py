"""`ling-train`: train a Ling MoE model. Progress on stderr, results on stdout.

Exit codes: 0 success, 2 bad input (one line naming the flag/file and what was expected),
1 internal error (with a traceback). Under `--nproc N` the same holds for what a rank finds
after start-up (see `ling_train.launch`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import traceback
from pathlib import Path

EXAMPLES = """\
examples:
  ling-train                                  # tiny model, embedded corpus, CPU, a few minutes
  ling-train --steps 50 --out runs/quick      # a shorter run into a chosen directory
  ling-train --size plus --dry-run            # params, FLOPs/token and memory, nothing allocated
  ling-train --config run.toml --data docs/   # TOML config, your own .txt/.jsonl documents
  ling-train --data shards/                   # token shards written by `ling-data tokenize`
  ling-train --out runs/quick --resume        # continue runs/quick from its latest checkpoint
  ling-train --resume runs/quick/checkpoints/step-20 --out runs/branch
  ling-train --steps 200 --eval-every 50      # score the built-in eval tasks into metrics.jsonl
  ling-train align --a cpu:fp32 --b cpu:bf16 --out align/   # per-module numerical alignment
  ling-train sft --init runs/quick --data data/kg --seq-len 1024 --batch-size 4   # fine-tune on tool use
  ling-train dpo --init runs/tiny-sft --data data/kg --seq-len 2048 --batch-size 2 --dpo-beta 0.1  # then prefer
  ling-train --nproc 2 --dist ddp             # 2 processes (torchrun; gloo on CPU), data parallel
  ling-train --nproc 4 --dist edit --sync-every 8 --outer-lr 0.7 --outer-momentum 0.9
  ling-train --nproc 2 --dist aedit --sync-seconds 2   # sync by wall time: slow ranks never wait
  ling-train --nproc 2 --dist diloco --device mixed --batch-size 8,2   # 8 sequences/step on the GPU, 2 on the CPU
  torchrun --nproc-per-node 2 -m ling_train --dist diloco   # the same, launched by hand
  ling-train --nproc 2 --dist ddp --snapshot-every 10 --max-restarts 3   # survive a killed worker
  torchrun --nproc-per-node 2 --max-restarts 3 -m ling_train --dist ddp --snapshot-every 10
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ling-train", description="Pretrain a Ling Mixture-of-Experts language model.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", help="model preset: tiny, lite or plus (default tiny)")
    p.add_argument("--steps", type=int, help="optimizer steps (default 300)")
    p.add_argument("--out", help="run directory (default runs/<size>-<timestamp>)")
    p.add_argument("--config", help="run config TOML; flags override its values")
    p.add_argument("--data", help="file or directory of .txt/.jsonl documents, or a token shard directory "
                                   "from `ling-data tokenize` (default: embedded corpus)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N or mixed (default auto); mixed: each process on its GPU if it "
                                     "has one, else the CPU, in one gloo group (Local SGD modes)")
    p.add_argument("--seed", type=int, help="seed for data order and initialisation (default 0)")
    p.add_argument("--batch-size", dest="batch_size", metavar="B[,B...]",
                   help="sequences per step (default 16); with --dist diloco, edit or aedit one per process, "
                        "e.g. 8,2 for a GPU and a CPU process (the sync weights each by its tokens)")
    p.add_argument("--seq-len", type=int, dest="seq_len", help="tokens per sequence (default 128)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 3e-3)")
    p.add_argument("--init", metavar="CHECKPOINT",
                   help="ling-train sft: the HF-layout checkpoint (step-N dir or run dir) to fine-tune; its weights, "
                        "model shape and tokenizer are used, the optimizer starts fresh; ling-train dpo: also the "
                        "frozen reference")
    p.add_argument("--dpo-beta", type=float, dest="dpo_beta", metavar="BETA",
                   help="ling-train dpo: how far the policy may move from the reference (default 0.1)")
    p.add_argument("--resume", nargs="?", const="", metavar="CHECKPOINT",
                   help="continue from CHECKPOINT (a step-N dir or a run dir); alone: from --out's latest")
    p.add_argument("--eval-every", type=int, dest="eval_every", metavar="N",
                   help="score the run config's eval_tasks every N steps into metrics.jsonl (default 0: off)")
    p.add_argument("--dry-run", action="store_true",
                   help="print parameters, FLOPs per token and memory without allocating the model")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    d = p.add_argument_group("distributed (ling-dist)")
    d.add_argument("--dist", help="none, ddp, fsdp, diloco, edit or aedit (default none); several processes "
                                  "come from torchrun or --nproc")
    d.add_argument("--nproc", type=int, metavar="N",
                   help="relaunch this command under torchrun with N processes on this machine")
    d.add_argument("--snapshot-every", type=int, dest="snapshot_every", metavar="N",
                   help="per-process flash snapshots into RUN/snapshots every N steps, written in the background "
                        "(default 0: off); a restarted or --resume'd run continues from the newest complete one")
    d.add_argument("--keep-snapshots", type=int, dest="keep_snapshots", metavar="K",
                   help="complete snapshots kept in RUN/snapshots (default 2)")
    d.add_argument("--max-restarts", type=int, dest="max_restarts", metavar="K",
                   help="with --nproc: torchrun restarts all workers up to K times after a failure; they resume "
                        "from the newest complete snapshot or checkpoint in --out (default 0)")
    d.add_argument("--sync-every", type=int, dest="sync_every", metavar="H",
                   help="diloco/edit: inner steps between syncs (default 8)")
    d.add_argument("--sync-seconds", type=float, dest="sync_seconds", metavar="T",
                   help="aedit: seconds of wall time between syncs (default 1)")
    d.add_argument("--outer-lr", type=float, dest="outer_lr", help="Local SGD outer learning rate (default 0.7)")
    d.add_argument("--outer-momentum", type=float, dest="outer_momentum",
                   help="Local SGD outer Nesterov momentum (default 0.9; 0: plain SGD)")
    d.add_argument("--expert-parallel", type=int, dest="expert_parallel", metavar="N",
                   help="ddp/fsdp: split the experts over groups of N ranks (fsdp shards inside them)")
    return p


class UsageError(Exception):
    pass


def build_config(args: argparse.Namespace):
    from ling_train import checkpoint as ckpt
    from ling_train.config import load_toml, parse_batch_size, resolve
    from ling_train.run import default_out

    import tomllib

    flags = {k: getattr(args, k) for k in ("size", "steps", "out", "data", "device", "seed", "init", "task",
                                           "batch_size", "seq_len", "lr", "eval_every", "dist", "sync_every",
                                           "sync_seconds", "outer_lr", "outer_momentum", "expert_parallel",
                                           "snapshot_every", "keep_snapshots", "dpo_beta")}
    if args.batch_size is not None:
        flags["batch_size"] = parse_batch_size(args.batch_size)
    from ling_train import snapshots

    base: dict = {}
    resume_from = None
    if args.resume is not None:
        if args.resume == "" and not args.out:
            raise UsageError("--resume: give a checkpoint path, or --out RUN to resume RUN's latest")
        given = Path(args.resume or args.out)
        world_size = args.nproc if args.nproc is not None else int(os.environ.get("WORLD_SIZE") or 1)
        resume_from = snapshots.resolve_resume(given, world_size, args.dist) or ckpt.resolve_checkpoint(given)
        base = tomllib.loads(snapshots.run_config_of(resume_from) if snapshots.is_snapshot(resume_from)
                             else ckpt.read_run_config_toml(resume_from))
        if not args.out:  # default: continue in the run the checkpoint belongs to
            flags["out"] = str(resume_from.parent.parent)
    toml_values = load_toml(args.config) if args.config else {}
    from ling_train.config import LOCAL_SGD_MODES, settings_for_dist
    if base:  # resuming, perhaps under another --dist (ling_train.dist_checkpoint)
        base = settings_for_dist(base, flags["dist"] or toml_values.get("dist") or base.get("dist", "none"))
    config = resolve({**base, **toml_values}, flags, source=args.config or "flags")
    for flag in ("outer_lr", "outer_momentum"):
        if flags[flag] is not None and config.dist not in LOCAL_SGD_MODES:
            raise UsageError(f"--{flag.replace('_', '-')}: applies to --dist diloco, edit or aedit, not {config.dist}")
    if args.max_restarts is not None:
        if args.nproc is None:
            raise UsageError("--max-restarts: needs --nproc (launched by hand, give torchrun its own --max-restarts)")
        if args.max_restarts < 0:
            raise UsageError(f"--max-restarts: expected >= 0, got {args.max_restarts}")
    if args.nproc is not None:
        if args.nproc < 1:
            raise UsageError(f"--nproc: expected >= 1, got {args.nproc}")
        if args.nproc > 1 and config.dist == "none":
            raise UsageError("--nproc: several processes need --dist ddp, fsdp, diloco, edit or aedit")
        config.batch_sizes(args.nproc)  # a per-process list must have --nproc entries
        if config.expert_parallel and args.nproc % config.expert_parallel:
            raise UsageError(f"--expert-parallel {config.expert_parallel}: must divide --nproc {args.nproc}")
        if config.anomaly is not None:  # before relaunching, so the refusal is one line, not one per rank
            from ling_train.anomaly.config import check_workers
            check_workers(config.anomaly_config(args.config or "flags"), config.dist, args.nproc,
                          args.config or "flags")
    if config.task in ("sft", "dpo"):
        from ling_train import sft
        sft.sample_file(config.data)  # one line now, not after the model is built
        if resume_from is None:  # the init checkpoint's shape; a resumed run's config already holds it
            config.model = {**sft.model_fields(config.init), **config.model}
            config.validate(args.config or "flags")
    if not config.out:
        config.out = default_out(config.size if config.task == "pretrain" else f"{config.size}-{config.task}")
    return config, resume_from


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["align"]:  # `ling-train align ...`: numerical alignment of two settings
        from ling_train.align_cli import main as align_main
        return align_main(argv[1:])
    task = None
    if argv[:1] in (["sft"], ["dpo"]):  # `ling-train sft --init CKPT --data KG_DIR ...`: the same run, task = "sft"
        task, argv = argv[0], argv[1:]
    args = parser().parse_args(argv)
    args.task = task
    from ling_train.launch import failed_on_bad_input_before
    if failed_on_bad_input_before():  # a --max-restarts restart after exit 2: the launcher prints that line
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    from ling_core import CheckpointError, ConfigError
    from ling_data import DataError
    from ling_eval import EvalError
    from ling_train.checkpoint import CheckpointWriteError
    from ling_train.config import RunConfigError

    bad_input = (UsageError, RunConfigError, ConfigError, CheckpointError, DataError, EvalError)
    try:
        config, resume_from = build_config(args)
        if args.nproc is not None and not args.dry_run and "RANK" not in os.environ:
            return relaunch(([task] if task else []) + argv, args.nproc, args.max_restarts or 0)
        if args.dry_run:
            from ling_train.dry_run import dry_run_report
            print(dry_run_report(config.size, config.model_config(), config.seq_len, config.batch_size))
            return 0
        from ling_train.run import train
        try:
            summary = train(config, resume_from, progress=not args.no_progress)
        finally:
            from ling_train.distributed import shutdown
            shutdown()
    except bad_input as e:
        report_bad_input(f"ling-train: error: {e}")
        return 2
    except CheckpointWriteError as e:  # not bad input (exit 1), but one line: nothing was lost
        from ling_train.launch import write_rank_report

        line = f"ling-train: error: {e}"
        if not write_rank_report("traceback", line + "\n"):  # under --nproc: the launcher's exit-1 report
            print(line, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ling-train: interrupted; resume from the latest checkpoint with --resume", file=sys.stderr)
        return 130
    except Exception:
        # In a rank under `--nproc` the launcher shows this traceback only if no rank failed on bad
        # input (else it is a consequence, e.g. a collective whose peer exited 2).
        from ling_train.launch import write_rank_report

        if not write_rank_report("traceback", traceback.format_exc()):
            raise
        return 1
    if summary:  # rank 0 only
        print(json.dumps(summary, indent=2))
    aborted = (summary or {}).get("anomaly", {}).get("aborted")
    if aborted:
        print(f"ling-train: aborted by anomaly handling: {aborted}", file=sys.stderr)
        return 1
    return 0


def report_bad_input(line: str) -> None:
    """Print the one-line error, or, in a rank started by `--nproc` (`ling_train.launch`), leave it
    for the launcher, which prints it once for all ranks and exits 2."""
    from ling_train.launch import write_rank_report

    if not write_rank_report("txt", line + "\n"):
        print(line, file=sys.stderr)


def relaunch(argv: list[str], nproc: int, max_restarts: int = 0) -> int:
    """`--nproc N`: run the same command as N local processes under torch.distributed.run
    (through `ling_train.launch`, which keeps a rank's bad-input exit as exit 2); `--max-restarts K`
    goes to torchrun."""
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--nproc", "--max-restarts"):
            skip = True
        elif not arg.startswith(("--nproc=", "--max-restarts=")):
            rest.append(arg)
    command = [sys.executable, "-m", "ling_train.launch", "--standalone", f"--nproc-per-node={nproc}",
               f"--max-restarts={max_restarts}", "-m", "ling_train", *rest]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run(command, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
