"""The lm-eval `LM` adapter. Its request handling is tested on stand-in `Instance`s (objects with
`.args`, which is all the adapter reads) against ling-eval's own scorers; the real-`LM` test
runs where lm-eval is installed (`uv run --with lm-eval pytest ...`, or the `lm-eval` extra)."""

import builtins
import importlib.util
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from ling_eval import scoring
from ling_eval.lm_eval_adapter import LingEvalRequests, lm_eval_model
from ling_eval.toy import ByteTokenizer, TinyTransformer
from ling_eval_testing import ScriptedModel

TOKENIZER = ByteTokenizer()
MODEL = TinyTransformer(max_length=64, seed=4).eval()


@dataclass
class StandInInstance:
    args: tuple


def adapter(model=None) -> LingEvalRequests:
    return LingEvalRequests(model or MODEL.as_eval_model(), TOKENIZER, batch_size=3)


@torch.no_grad()
def direct_logprob(context: str, continuation: str) -> float:
    ids = [3] + TOKENIZER.encode(context + continuation)
    n = len(TOKENIZER.encode(continuation))
    lp = F.log_softmax(MODEL(torch.tensor([ids[:-1]]))[0], -1)[-n:]
    return lp.gather(-1, torch.tensor(ids[-n:])[:, None]).sum().item()


def test_loglikelihood_moves_trailing_spaces_into_the_continuation():
    requests = [StandInInstance(("The sky is ", "blue")), StandInInstance(("The sky is", " green")),
                StandInInstance(("", "x"))]
    results = adapter().loglikelihood(requests)
    assert results[0][0] == pytest.approx(direct_logprob("The sky is", " blue"), abs=1e-4)
    assert results[1][0] == pytest.approx(direct_logprob("The sky is", " green"), abs=1e-4)
    assert results[2][0] == pytest.approx(direct_logprob("", "x"), abs=1e-4)  # empty context: EOS only
    assert all(isinstance(ll, float) and isinstance(greedy, bool) for ll, greedy in results)


def test_loglikelihood_rolling_scores_every_token():
    text = "hello world, " * 10  # longer than max_length 64: several windows
    (total,) = adapter().loglikelihood_rolling([StandInInstance((text,))])
    expected = scoring.rolling_loglikelihood(MODEL.as_eval_model(), [TOKENIZER.encode(text)], 3)[0]
    assert total == pytest.approx(expected) and total < 0


def test_generate_until_stops_at_until_and_budget():
    model = ScriptedModel(TOKENIZER, "Paris.\nQ: next")
    out = adapter(model.as_eval_model()).generate_until(
        [StandInInstance(("Q: capital?\nA: ", {"until": ["\n"], "max_gen_toks": 50})),
         StandInInstance(("Q: capital?\nA: ", {"until": "Q:", "max_gen_toks": 3}))])
    assert out == ["Paris.", "Par"]


def test_missing_lm_eval_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name.startswith("lm_eval"):
            raise ImportError("No module named 'lm_eval'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(ImportError, match=r"ling-eval\[lm-eval\]"):
        lm_eval_model(MODEL.as_eval_model(), TOKENIZER)


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                    reason="lm-eval not installed (extra ling-eval[lm-eval]); the stand-in tests above cover the adapter")
def test_real_lm_eval_instances():
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import LM

    lm = lm_eval_model(MODEL.as_eval_model(), TOKENIZER)
    assert isinstance(lm, LM)
    request = Instance(request_type="loglikelihood", doc={}, arguments=("The sky is", " blue"), idx=0)
    ((ll, greedy),) = lm.loglikelihood([request])
    assert ll == pytest.approx(direct_logprob("The sky is", " blue"), abs=1e-4)
    gen = Instance(request_type="generate_until", doc={}, arguments=("Q: ", {"until": ["\n"], "max_gen_toks": 4}), idx=0)
    assert isinstance(lm.generate_until([gen])[0], str)
