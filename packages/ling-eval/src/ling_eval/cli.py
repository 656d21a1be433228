"""`ling-eval`: score HF-layout checkpoints on tasks -> JSON results, a markdown report, plots.

Exit codes: 0 success, 2 bad input (one line: the file or flag and what was expected), 1 an
internal error (with a traceback). Progress on stderr, the JSON summary on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

EXAMPLES = """\
examples:
  ling-eval runs/quick                          # every checkpoint of a run, all built-in tasks
  ling-eval runs/quick/checkpoints/step-300 --tasks facts_mc corpus_ppl --limit 20
  ling-eval CKPT_A CKPT_B --compare             # paired test: is B really better than A?
  ling-eval CKPT --tasks my_task.jsonl --num-fewshot 3 --seed 1 --out results/
  ling-eval CKPT --loader my_pkg.loaders:load   # a model type without a registered loader
  ling-eval --list-tasks
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ling-eval", description="Evaluate language-model checkpoints on tasks.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="*", metavar="CHECKPOINT",
                   help="HF-layout checkpoint dirs, or run dirs (every RUN/checkpoints/step-N)")
    p.add_argument("--tasks", nargs="+", metavar="TASK", help="task .jsonl files or built-in names (default: all built-in)")
    p.add_argument("--out", help="directory for results.json, report.md and plots/ (default: RUN/eval and "
                                 "RUN/plots for a run directory, else ./ling-eval-results)")
    p.add_argument("--seed", type=int, default=0, help="few-shot draws and bootstrap resampling (default 0)")
    p.add_argument("--num-fewshot", type=int, dest="num_fewshot", help="override every task's few-shot count")
    p.add_argument("--limit", type=int, help="only the first N items of each task")
    p.add_argument("--batch-size", type=int, default=32, dest="batch_size", help="rows per forward (default 32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--loader", help="module:function returning (EvalModel, tokenizer) for a checkpoint dir "
                                    "(default: the loader registered for config.json's model_type)")
    p.add_argument("--compare", action="store_true", help="paired comparison of the first and last checkpoint")
    p.add_argument("--list-tasks", action="store_true", help="list the built-in tasks and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _check_args(args) -> None:
    from ling_eval.errors import EvalError
    if not args.checkpoints:
        raise EvalError("CHECKPOINT: give at least one checkpoint or run directory (see --help)")
    for flag, value, minimum in (("--limit", args.limit, 1), ("--batch-size", args.batch_size, 1),
                                 ("--num-fewshot", args.num_fewshot, 0)):
        if value is not None and value < minimum:
            raise EvalError(f"{flag}: must be >= {minimum}, got {value}")
    if args.device != "cpu":
        import torch
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise EvalError(f"--device: unknown device {args.device!r}; expected cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise EvalError(f"--device: {args.device} requested but CUDA is not available on this machine")


def _default_out(paths: list[Path]) -> Path:
    first = paths[0]
    if (first / "checkpoints").is_dir():
        return first / "eval"
    return Path("ling-eval-results")


def run(args) -> dict:
    from ling_eval.evaluate import evaluate_task
    from ling_eval.loaders import checkpoint_step, expand_checkpoints, load_checkpoint, model_type
    from ling_eval.report import CheckpointResults, compare_results, summary, write_report
    from ling_eval.outputs import output_dir_problem
    from ling_eval.tasks import builtin_tasks, resolve_task

    _check_args(args)
    tasks = [resolve_task(t) for t in (args.tasks or list(builtin_tasks()))]
    if args.num_fewshot is not None:
        from ling_eval.tasks import load_task
        tasks = [load_task(t.path, t.name, num_fewshot=args.num_fewshot) for t in tasks]
    roots = [Path(p) for p in args.checkpoints]
    checkpoints = [c for root in roots for c in expand_checkpoints(root)]
    for checkpoint in checkpoints:  # cheap checks for every checkpoint before the long work
        model_type(checkpoint)
    if args.compare and len(checkpoints) < 2:
        from ling_eval.errors import EvalError
        raise EvalError("--compare: needs at least two checkpoints")
    out = Path(args.out) if args.out else _default_out(roots)
    problem = output_dir_problem(out)  # before the evaluation, whose results would have nowhere to go
    if problem:
        from ling_eval.errors import EvalError
        raise EvalError(f"--out: {problem}")
    runs = []
    for checkpoint in checkpoints:
        logging.getLogger("ling_eval").info("evaluating %s", checkpoint)
        model, tokenizer = load_checkpoint(checkpoint, args.device, args.loader)
        run_results = CheckpointResults(str(checkpoint), checkpoint_step(checkpoint))
        for task in tasks:
            run_results.results.append(evaluate_task(model, tokenizer, task, seed=args.seed,
                                                     batch_size=args.batch_size, progress=not args.no_progress,
                                                     limit=args.limit))
        runs.append(run_results)
        del model
    comparisons = ([compare_results(a, b, seed=args.seed) for a, b in zip(runs[0].results, runs[-1].results)]
                   if args.compare else [])
    # A run directory's plots live with its other plots (RUN/plots, the run-directory contract).
    plots_dir = roots[0] / "plots" if not args.out and out == roots[0] / "eval" else None
    try:
        files = write_report(runs, out, comparisons, plots_dir)
    except OSError as e:  # e.g. the disk filled up while evaluating
        from ling_eval.errors import EvalError
        raise EvalError(f"--out: writing the report into {out} failed: {e.strerror or e} (errno {e.errno})") from None
    result = summary(runs)
    if comparisons:
        result["comparisons"] = [c.summary() for c in comparisons]
    result["files"] = {name: str(path) for name, path in files.items()}
    return result


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from ling_eval.errors import EvalError

    if args.list_tasks:
        from ling_eval.tasks import builtin_tasks, load_task
        for name, path in builtin_tasks().items():
            task = load_task(path)
            print(f"{name}\t{task.kind}\t{len(task.items)} items\t{path}")
        return 0
    try:
        result = run(args)
    except EvalError as e:
        print(f"ling-eval: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ling-eval: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
