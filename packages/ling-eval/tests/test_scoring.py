"""The batched and context-sharing scorers against a one-request-at-a-time reference.

Tolerance: fp32 log-probabilities summed over <= 12 tokens; batching, padding and the KV cache
change only the order of float additions, so 1e-4 absolute covers it."""

import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from ling_eval import scoring
from ling_eval.model import select_rows
from ling_eval.scoring import Request
from ling_eval.toy import ByteTokenizer, TinyTransformer

MODEL = TinyTransformer(max_length=64, seed=1).eval()
TOL = 1e-4

tokens = st.lists(st.integers(4, 259), min_size=1, max_size=12).map(tuple)
requests_strategy = st.lists(st.tuples(st.sampled_from([(3, 40), (3, 50, 51, 52), (3,)]) | tokens, tokens),
                             min_size=1, max_size=10)


@torch.no_grad()
def reference(request: Request) -> tuple[float, bool]:
    full = torch.tensor([request.context + request.continuation])
    logprobs = F.log_softmax(MODEL(full[:, :-1])[0], dim=-1)
    n = len(request.continuation)
    targets = full[0, -n:]
    picked = logprobs[-n:].gather(-1, targets[:, None]).sum().item()
    return picked, bool((logprobs[-n:].argmax(-1) == targets).all())


@settings(max_examples=12, deadline=None)
@given(requests_strategy, st.integers(1, 4), st.booleans())
def test_batched_scores_match_one_at_a_time(pairs, batch_size, share_context):
    requests = [Request(c, k) for c, k in pairs]
    scores = scoring.loglikelihood(MODEL.as_eval_model(), requests, batch_size, share_context=share_context)
    for request, score in zip(requests, scores):
        logprob, greedy = reference(request)
        assert abs(score.logprob - logprob) < TOL
        assert score.greedy == greedy and score.tokens == len(request.continuation)


def test_sharing_needs_a_cache():
    import pytest
    with pytest.raises(ValueError, match="needs a model with an `extend`"):
        scoring.loglikelihood(MODEL.as_eval_model(use_cache=False), [Request((3,), (5,))], share_context=True)


def test_select_rows_repeats_nested_cache():
    cache = [(torch.arange(6).view(2, 3), {"v": torch.ones(2, 1)}), None]
    picked = select_rows(cache, torch.tensor([1, 1, 0]))
    assert picked[0][0].tolist() == [[3, 4, 5], [3, 4, 5], [0, 1, 2]] and picked[0][1]["v"].shape == (3, 1)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(4, 259), min_size=1, max_size=40), st.integers(1, 16))
def test_rolling_windows_cover_each_token_once(text, max_length):
    windows = scoring.rolling_windows(text, 3, max_length)
    assert [t for w in windows for t in w.continuation] == text
    for w in windows:
        assert 1 <= len(w.context) and len(w.context) + len(w.continuation) - 1 <= max_length


def test_rolling_loglikelihood_equals_full_sequence_when_it_fits():
    text = list(range(10, 40))
    total = scoring.rolling_loglikelihood(MODEL.as_eval_model(), [text], 3)[0]
    assert abs(total - reference(Request((3,), tuple(text)))[0]) < TOL


@settings(max_examples=10, deadline=None)
@given(st.lists(st.integers(4, 259), min_size=1, max_size=20), st.integers(1, 12))
def test_cached_generation_equals_full_recompute(prompt, max_new):
    tokenizer = ByteTokenizer()
    with_cache = scoring.greedy_generate(MODEL.as_eval_model(), tokenizer, [3, *prompt], max_new)
    without = scoring.greedy_generate(MODEL.as_eval_model(use_cache=False), tokenizer, [3, *prompt], max_new)
    assert with_cache == without


def test_generation_cuts_at_the_first_stop_string():
    from ling_eval_testing import ScriptedModel
    tokenizer = ByteTokenizer()
    model = ScriptedModel(tokenizer, "Paris.\nNext: Rome")
    assert scoring.greedy_generate(model.as_eval_model(), tokenizer, [3, 70], 50, ["\n"]) == "Paris."
    model.reset()
    assert scoring.greedy_generate(model.as_eval_model(), tokenizer, [3, 70], 50, ["Next", "."]) == "Paris"
    model.reset()
    assert scoring.greedy_generate(model.as_eval_model(), tokenizer, [3, 70], 50) == "Paris.\nNext: Rome"
    model.reset()
    assert scoring.greedy_generate(model.as_eval_model(), tokenizer, [3, 70], 3) == "Par"
