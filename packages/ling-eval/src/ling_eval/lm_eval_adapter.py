"""An lm-evaluation-harness `LM` over any ling-eval model, so harness tasks run on our models:

    from ling_eval.lm_eval_adapter import lm_eval_model
    lm = lm_eval_model(model, tokenizer)          # model: EvalModel, tokenizer: encode/decode/eos_id
    lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"])

Needs the extra `ling-eval[lm-eval]`; lm-eval is imported only when an adapter is made. The three
request types map onto ling-eval's batched scorers: `loglikelihood` (context shared across
continuations through the KV cache when the model has one), `loglikelihood_rolling` (disjoint
windows, every token scored once) and `generate_until` (greedy, KV cache, stop strings).
"""

from __future__ import annotations

import logging
from typing import Any

from ling_eval import scoring
from ling_eval.model import EvalModel, Tokenizer

log = logging.getLogger(__name__)
EXTRA_HINT = ("the lm-eval adapter needs lm-evaluation-harness: install the extra "
              "`pip install 'ling-eval[lm-eval]'` (or `uv sync --extra lm-eval`)")


def _lm_base():
    try:
        from lm_eval.api.model import LM
    except ImportError as e:
        raise ImportError(f"{EXTRA_HINT} ({e})") from None
    return LM


class LingEvalRequests:
    """The harness's three request types over an EvalModel; requests are objects with `.args`
    (lm-eval `Instance`s). Mixed into lm-eval's `LM` by `lm_eval_model`."""

    def __init__(self, model: EvalModel, tokenizer: Tokenizer, batch_size: int = 32, max_gen_toks: int = 256):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self._batch_size = batch_size
        self.max_gen_toks = max_gen_toks

    def _split(self, context: str, continuation: str) -> scoring.Request:
        # As the harness does: trailing spaces of the context belong to the continuation, and the
        # continuation's tokens are those the whole string has beyond the context's.
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        context_ids = self.tokenizer.encode(context)
        whole = self.tokenizer.encode(context + continuation)
        if whole[:len(context_ids)] != context_ids:  # the boundary merged: encode the parts apart
            whole = context_ids + self.tokenizer.encode(continuation)
        return scoring.Request((self.tokenizer.eos_id, *context_ids), tuple(whole[len(context_ids):]))

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        converted = [self._split(*r.args) for r in requests]
        scores = scoring.loglikelihood(self.model, converted, self._batch_size)
        return [(s.logprob, s.greedy) for s in scores]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        texts = [self.tokenizer.encode(r.args[0]) for r in requests]
        return scoring.rolling_loglikelihood(self.model, texts, self.tokenizer.eos_id, self._batch_size)

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        outputs = []
        for r in requests:
            context, gen_kwargs = r.args
            gen_kwargs = dict(gen_kwargs or {})
            if gen_kwargs.get("do_sample"):
                log.warning("generate_until: do_sample requested; ling-eval decodes greedily")
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            prompt = [self.tokenizer.eos_id, *self.tokenizer.encode(context)]
            outputs.append(scoring.greedy_generate(self.model, self.tokenizer, prompt, max_new, until))
        return outputs


def lm_eval_model(model: EvalModel, tokenizer: Tokenizer, batch_size: int = 32, max_gen_toks: int = 256):
    """An instance of lm-eval's `LM` backed by `model` (raises ImportError naming the extra)."""
    base = _lm_base()
    cls = type("LingEvalLM", (LingEvalRequests, base), {"__doc__": LingEvalRequests.__doc__})
    return cls(model, tokenizer, batch_size, max_gen_toks)
