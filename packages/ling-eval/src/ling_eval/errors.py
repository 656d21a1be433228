"""Errors raised at ling-eval's boundaries (task files, checkpoints, options)."""


class EvalError(Exception):
    """Bad input to an evaluation: the message names the file (and line) and what was expected."""


class TaskError(EvalError):
    """A task file or one of its lines is malformed."""


class CheckpointLoadError(EvalError):
    """A checkpoint directory is missing, incomplete or corrupt, or no loader handles it."""
