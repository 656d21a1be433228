"""Training-step throughput of the tiny preset on CPU (fp32): tokens/s and MFU.

One step is `ling_train.trainer.Trainer.train_step`, the loop `ling-train` runs: forward,
backward, gradient clipping, AdamW (ling-train's own, `ling_train.run.build_optimizer`: torch's
fused kernel on CPU), zero_grad, scheduler, the metric `.item()`s. Batch 16 x 128 random tokens.
Anchors, measured in this run:

- the machine's fp32 matmul rate, which MFU is relative to (MFU = tokens/s x
  flops_per_token / rate, the same formula RUN/metrics.jsonl uses);
- a dense SwiGLU MLP at the model's width (256) whose intermediate size is chosen so one
  training step on the same tokens costs the same FLOPs, trained with the same AdamW: what
  these FLOPs cost when nothing but plain matmuls at this width is involved (its AdamW is the
  same fused kernel).
"""

from __future__ import annotations

import torch

from ling_core import build_model, flops_per_token, preset
from ling_core.moe import SwiGLU
from ling_train.config import RunConfig
from ling_train.run import build_optimizer
from ling_train.trainer import Trainer, TrainerSettings

BATCH, SEQ_LEN = 16, 128


class RandomTokens:
    """A `Loader` of uniformly random token ids, so the benchmark needs no corpus or tokenizer."""

    def __init__(self, vocab_size: int, seed: int = 0):
        self.vocab_size = vocab_size
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(self.vocab_size, (BATCH, SEQ_LEN + 1), generator=self.generator)
        return ids[:, :-1], ids[:, 1:]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def dense_anchor(hidden: int, step_flops: int, tokens: int):
    """A SwiGLU training step costing `step_flops` on `tokens` tokens; returns (step, its FLOPs)."""
    intermediate = round(step_flops / (18 * hidden * tokens) / 64) * 64
    torch.manual_seed(0)
    mlp = SwiGLU(hidden, intermediate)
    optimizer = torch.optim.AdamW(mlp.parameters(), lr=1e-4, fused=True)
    x = torch.randn(tokens, hidden)
    grad_out = torch.randn(tokens, hidden)

    def step() -> None:
        mlp(x).backward(grad_out)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, 18 * hidden * intermediate * tokens


def tiny_trainer(loader=None) -> Trainer:
    """The tiny preset on CPU with ling-train's optimizer and a constant lr, over `loader`
    (default: random tokens); also used by scripts/profile_cpu.py and scripts/time_train_step.py."""
    config = preset("tiny")
    model = build_model(config, device="cpu", seed=0)
    optimizer = build_optimizer(model, RunConfig(), torch.device("cpu"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return Trainer(model, optimizer, scheduler, loader if loader is not None else RandomTokens(config.vocab_size),
                   TrainerSettings(total_steps=10**9), torch.device("cpu"))


def test_train_step_tiny(benchmark, matmul_rate, best_time, best_seconds):
    config = preset("tiny")
    trainer = tiny_trainer()
    tokens = BATCH * SEQ_LEN
    flops_per_step = flops_per_token(config, SEQ_LEN) * tokens
    dense_step, dense_flops = dense_anchor(config.hidden_size, flops_per_step, tokens)
    dense_time = best_time()

    matmul_rate.measure()
    # The dense anchor runs once before every round, so load bursts hit both alike.
    benchmark.pedantic(trainer.train_step, setup=lambda: dense_time.time(dense_step), rounds=10, warmup_rounds=2)
    rate = matmul_rate.measure()
    seconds = best_seconds()
    if seconds is None:
        return
    tokens_per_s = tokens / seconds
    median_tokens_per_s = tokens / benchmark.stats.stats.median
    dense_flops_per_s = dense_flops / dense_time.seconds
    benchmark.extra_info.update({
        "tokens_per_step": tokens,
        "flops_per_token": flops_per_token(config, SEQ_LEN),
        "tokens_per_s": round(tokens_per_s, 1),
        "tokens_per_s_median": round(median_tokens_per_s, 1),
        "gflops_per_s": round(flops_per_step / seconds / 1e9, 2),
        "matmul_gflops_per_s": round(rate / 1e9, 2),
        "mfu": round(flops_per_step / seconds / rate, 3),
        "mfu_median": round(flops_per_step / benchmark.stats.stats.median / rate, 3),
        "dense_anchor_gflops_per_s": round(dense_flops_per_s / 1e9, 2),
        "dense_anchor_mfu": round(dense_flops_per_s / rate, 3),
        # > 1 would mean the MoE model beats a dense MLP at the same FLOPs.
        "model_over_dense_anchor": round(flops_per_step / seconds / dense_flops_per_s, 3),
        "threads": torch.get_num_threads(),
    })
