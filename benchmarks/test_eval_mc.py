"""Multiple-choice eval speed on a real Ling model (tiny preset, random init, fp32 CPU).

Subject: `ling_eval.evaluate_task` on the built-in `facts_mc` task, 3-shot (contexts of ~40-70
tokens, choices of 1-4 tokens): contexts batched and run once per question, choices continued
from the cached context. Anchor, measured in this run on the same model, tokenizer and prompts:
a per-example loop, one forward of context+choice per (question, choice), the way a first
evaluation script is usually written. Both must pick the same choice for every question.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ling_core import build_model, preset
from ling_data import cached_tokenizer, embedded_corpus
from ling_eval import evaluate_task, load_task
from ling_eval.prompts import with_fewshot
from ling_eval.tasks import BUILTIN_DIR
from ling_train.eval_model import ling_eval_model

ITEMS, SHOTS = 32, 3


@torch.no_grad()
def per_example_loop(model, tokenizer, task) -> list[int]:
    picks = []
    for i, item in enumerate(task.items):
        context = [tokenizer.eos_id] + tokenizer.encode(with_fewshot(task, i, 0, item["question"]))
        scores = []
        for choice in item["choices"]:
            cont = tokenizer.encode(choice)
            ids = torch.tensor([context + cont])
            logprobs = F.log_softmax(model(ids[:, :-1]).logits[0, -len(cont):].float(), dim=-1)
            scores.append(logprobs.gather(-1, torch.tensor(cont)[:, None]).sum().item())
        picks.append(max(range(len(scores)), key=scores.__getitem__))
    return picks


def test_multiple_choice_eval_vs_per_example_loop(benchmark, best_time):
    tokenizer = cached_tokenizer(embedded_corpus(), vocab_size=preset("tiny").vocab_size)
    model = build_model(preset("tiny"), seed=0).eval()
    task = load_task(BUILTIN_DIR / "facts_mc.jsonl", num_fewshot=SHOTS)
    task = type(task)(**{**task.__dict__, "items": task.items[:ITEMS]})
    eval_model = ling_eval_model(model)

    def subject():
        return evaluate_task(eval_model, tokenizer, task, batch_size=32, resamples=200)

    def packed():  # batched rows of context+choice, no cache: the no-KV-cache fallback
        return evaluate_task(eval_model, tokenizer, task, batch_size=32, share_context=False, resamples=200)

    loop, packed_time = best_time(), best_time()
    loop_picks = per_example_loop(model, tokenizer, task)  # also the warm-up
    for _ in range(2):
        loop.time(lambda: per_example_loop(model, tokenizer, task))
        packed_time.time(packed)
    result = benchmark.pedantic(subject, rounds=3, iterations=1)
    assert [p["choice"] for p in result.predictions] == loop_picks
    best = benchmark.stats.stats.min if benchmark.stats is not None else None
    if best is not None:
        benchmark.extra_info.update({
            "items": ITEMS, "shots": SHOTS, "choices": sum(len(i["choices"]) for i in task.items),
            "per_example_loop_s": loop.seconds, "packed_no_cache_s": packed_time.seconds, "subject_s": best,
            "speedup_vs_per_example_loop": loop.seconds / best,
            "packed_speedup_vs_per_example_loop": loop.seconds / packed_time.seconds,
        })
