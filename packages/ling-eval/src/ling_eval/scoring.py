"""The three model queries every task is built from, batched:

- `loglikelihood`: log P(continuation | context) and whether it is the greedy continuation;
- `rolling_loglikelihood`: log P(text) token by token over windows of the model's length;
- `greedy_generate`: greedy decoding until EOS, a stop string or a token budget.

Requests are sorted by length (longest first) and cut into batches, so padding is small and the
first batch is the largest (an out-of-memory error shows up at once). With a model that offers
a KV cache, requests sharing a context run it once and reuse its cache for every continuation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ling_eval.model import EvalModel, Tokenizer, select_rows

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Request:
    context: tuple[int, ...]  # non-empty: the first continuation token is predicted from its last token
    continuation: tuple[int, ...]


@dataclass(frozen=True)
class Score:
    logprob: float
    greedy: bool  # every continuation token is the model's argmax
    tokens: int


def _continuation_scores(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, bool]:
    """logits [n, vocab] predicting targets [n]."""
    logprobs = F.log_softmax(logits.float(), dim=-1)
    picked = logprobs.gather(-1, targets[:, None]).sum().item()
    greedy = bool((logits.argmax(-1) == targets).all().item())
    return picked, greedy


@torch.no_grad()
def loglikelihood(model: EvalModel, requests: Sequence[Request], batch_size: int = 32,
                  share_context: bool | None = None, progress: Progress | None = None) -> list[Score]:
    """Score every request. `share_context` (default: when the model has a KV cache) runs each
    distinct context once and continues all its requests from the cached context."""
    for r in requests:
        if not r.context or not r.continuation:
            raise ValueError("loglikelihood requests need a non-empty context and continuation")
    if share_context is None:
        share_context = model.has_cache
    if share_context and not model.has_cache:
        raise ValueError("share_context=True needs a model with an `extend` (KV cache) function")
    scores: list[Score | None] = [None] * len(requests)
    if share_context:
        _score_shared(model, requests, batch_size, scores, progress)
    else:
        _score_packed(model, requests, batch_size, scores, progress)
    return scores  # type: ignore[return-value]


def _score_packed(model: EvalModel, requests: Sequence[Request], batch_size: int,
                  scores: list, progress: Progress | None) -> None:
    """Each request as one row context+continuation[:-1], longest first, right-padded batches."""
    limit = model.max_length
    rows = []
    for index, r in enumerate(requests):
        full = (r.context + r.continuation)[-(limit + 1):]
        n = min(len(r.continuation), limit)
        rows.append((index, full[:-1], full[-n:]))
    rows.sort(key=lambda row: -len(row[1]))
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        logits = model.forward(model.tensor([row[1] for row in batch]))
        for b, (index, inputs, targets) in enumerate(batch):
            end = len(inputs)
            target = torch.as_tensor(targets, device=logits.device)
            logprob, greedy = _continuation_scores(logits[b, end - len(targets):end], target)
            scores[index] = Score(logprob, greedy, len(targets))
        if progress:
            progress(len(batch))


def _score_shared(model: EvalModel, requests: Sequence[Request], batch_size: int,
                  scores: list, progress: Progress | None) -> None:
    """Group requests by context; batch contexts (longest first) until their requests fill
    `batch_size` rows. Per batch: one call runs every context[:-1] (left-padded, masked), one
    call runs all their continuations (each row context[-1] + continuation[:-1], right-padded)
    on the cache rows of their context."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, r in enumerate(requests):
        groups.setdefault(r.context, []).append(index)
    batch: list[tuple[tuple[int, ...], list[int]]] = []
    rows = 0
    for context, members in sorted(groups.items(), key=lambda g: -len(g[0])):
        if batch and rows + len(members) > batch_size:
            _run_shared_batch(model, requests, batch, scores)
            if progress:
                progress(rows)
            batch, rows = [], 0
        batch.append((context, members))
        rows += len(members)
    if batch:
        _run_shared_batch(model, requests, batch, scores)
        if progress:
            progress(rows)


def _run_shared_batch(model: EvalModel, requests: Sequence[Request], batch, scores: list) -> None:
    contexts = []
    for context, members in batch:
        longest = max(len(requests[i].continuation) for i in members)
        contexts.append(context[-max(model.max_length - longest, 1):])
    prefix_len = max(len(c) - 1 for c in contexts)
    cache = prefix_mask = None
    if prefix_len > 0:
        prefix_mask = torch.zeros(len(contexts), prefix_len, dtype=torch.long)
        prefix_ids = torch.zeros(len(contexts), prefix_len, dtype=torch.long)
        for k, context in enumerate(contexts):
            n = len(context) - 1
            if n:
                prefix_ids[k, prefix_len - n:] = torch.as_tensor(context[:-1])
                prefix_mask[k, prefix_len - n:] = 1
        prefix_mask = prefix_mask.to(model.device)
        _, cache = model.extend(prefix_ids.to(model.device), None, prefix_mask)
    row_rows, row_context, row_request = [], [], []
    for k, (_, members) in enumerate(batch):
        for i in members:
            row_rows.append((contexts[k][-1],) + requests[i].continuation[:-1])
            row_context.append(k)
            row_request.append(i)
    row_ids = model.tensor(row_rows)
    row_mask = torch.zeros(row_ids.shape, dtype=torch.long, device=row_ids.device)
    for b, row in enumerate(row_rows):
        row_mask[b, :len(row)] = 1
    which = torch.as_tensor(row_context, dtype=torch.long)
    if cache is not None:
        cache = select_rows(cache, which)
        row_mask = torch.cat([prefix_mask.index_select(0, which.to(prefix_mask.device)), row_mask], dim=1)
    logits, _ = model.extend(row_ids, cache, row_mask)
    for b, i in enumerate(row_request):
        cont = requests[i].continuation
        target = torch.as_tensor(cont, device=logits.device)
        logprob, greedy = _continuation_scores(logits[b, :len(cont)], target)
        scores[i] = Score(logprob, greedy, len(cont))


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_length: int) -> list[Request]:
    """Disjoint windows covering every token once; each window is predicted from the tokens just
    before it (up to `max_length` of them), the first from `prefix_token` (EOS: documents follow
    EOS in training)."""
    tokens = tuple(tokens)
    full = (prefix_token,) + tokens
    requests = []
    for start in range(0, len(tokens), max_length):
        piece = tokens[start:start + max_length]
        context_len = max_length + 1 - len(piece)
        context = full[max(start + 1 - context_len, 0):start + 1]
        requests.append(Request(context, piece))
    return requests


def rolling_loglikelihood(model: EvalModel, texts: Sequence[Sequence[int]], prefix_token: int,
                          batch_size: int = 32, progress: Progress | None = None) -> list[float]:
    """log P(tokens) of each token list, every token scored once."""
    requests, owners = [], []
    for i, tokens in enumerate(texts):
        windows = rolling_windows(tokens, prefix_token, model.max_length)
        requests.extend(windows)
        owners.extend([i] * len(windows))
    scores = loglikelihood(model, requests, batch_size, share_context=False, progress=progress)
    totals = [0.0] * len(texts)
    for owner, score in zip(owners, scores):
        totals[owner] += score.logprob
    return totals


def _find_stop(text: str, stops: Iterable[str]) -> int:
    found = [text.find(s) for s in stops]
    found = [i for i in found if i >= 0]
    return min(found) if found else -1


@torch.no_grad()
def greedy_generate(model: EvalModel, tokenizer: Tokenizer, prompt: Sequence[int],
                    max_new_tokens: int, stop: Sequence[str] = ()) -> str:
    """Greedy continuation of `prompt`, cut before the first stop string; ends at EOS.
    With a KV cache each step runs one token; without one, the whole sequence."""
    prompt = list(prompt)[-max(model.max_length - max_new_tokens, 1):]
    generated: list[int] = []
    cache = None
    next_input = prompt
    for _ in range(max_new_tokens):
        if model.has_cache:
            logits, cache = model.extend(model.tensor([next_input]), cache)
        else:
            logits = model.forward(model.tensor([(prompt + generated)[-model.max_length:]]))
        token = int(logits[0, -1].argmax().item())
        if token == tokenizer.eos_id:
            break
        generated.append(token)
        next_input = [token]
        if stop:
            text = tokenizer.decode(generated)
            cut = _find_stop(text, stop)
            if cut >= 0:
                return text[:cut]
    return tokenizer.decode(generated)
