"""`ling-train --dry-run`: what a model needs, computed from the config without allocating it."""

from __future__ import annotations

import torch

from ling_core import LingConfig, LingForCausalLM, count_params, flops_per_token

GIB = 1024**3


def dry_run_report(size: str, config: LingConfig, seq_len: int, batch_size: int | list[int]) -> str:
    """`batch_size`: one process's sequences per step, or the per-process list, whose FLOPs per
    step are the whole job's (the sum)."""
    if isinstance(batch_size, list):
        batch = sum(batch_size)
        batch_text = f"{'+'.join(map(str, batch_size))} = {batch}, all processes"
    else:
        batch, batch_text = batch_size, str(batch_size)
    total, active = count_params(config)
    with torch.device("meta"):  # cross-check the arithmetic against the real module tree, for free
        built = sum(p.numel() for p in LingForCausalLM(config).parameters())
    fpt = flops_per_token(config, seq_len)
    # Mixed-precision AdamW keeps fp32 master weights, fp32 grads and two fp32 moments.
    weights, grads, optimizer = 4 * total, 4 * total, 8 * total
    rows = [
        ("preset", size),
        ("total parameters", f"{total:,} ({total / 1e9:.2f}B)"),
        ("active parameters / token", f"{active:,} ({active / 1e9:.2f}B)"),
        ("built on meta (check)", f"{built:,} {'ok' if built == total else 'MISMATCH'}"),
        ("layers (dense + MoE)", f"{config.first_k_dense_replace} + {config.num_moe_layers}"),
        ("experts", f"{config.num_experts} routed (top-{config.num_experts_per_tok}) + "
                    f"{config.num_shared_experts} shared"),
        (f"training FLOPs / token (seq {seq_len})", f"{fpt:.4g}"),
        (f"training FLOPs / step (batch {batch_text})", f"{fpt * seq_len * batch:.4g}"),
        ("weights, fp32 (1 device)", f"{weights / GIB:,.2f} GiB"),
        ("gradients, fp32", f"{grads / GIB:,.2f} GiB"),
        ("AdamW states, 2 x fp32", f"{optimizer / GIB:,.2f} GiB"),
        ("weights + grads + optimizer", f"{(weights + grads + optimizer) / GIB:,.2f} GiB"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append("(activations depend on batch, sequence and recomputation; not included)")
    return "\n".join(lines)
