"""ling-eval: fast, stable evaluation of any causal LM (multiple choice, generation, perplexity,
tool calls) with bootstrap confidence intervals and paired comparisons. Takes a model callable
and a tokenizer; imports no other ling package."""

from ling_eval.errors import CheckpointLoadError, EvalError, TaskError
from ling_eval.evaluate import MetricResult, TaskResult, evaluate, evaluate_task
from ling_eval.model import EvalModel, Tokenizer, select_rows
from ling_eval.stats import Comparison, bootstrap_interval, mcnemar_exact, paired_comparison
from ling_eval.tasks import Task, TaskOptions, load_task

__all__ = [
    "CheckpointLoadError", "EvalError", "TaskError", "MetricResult", "TaskResult", "evaluate",
    "evaluate_task", "EvalModel", "Tokenizer", "select_rows", "Comparison", "bootstrap_interval",
    "mcnemar_exact", "paired_comparison", "Task", "TaskOptions", "load_task",
]
