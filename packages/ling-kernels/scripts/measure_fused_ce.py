"""Peak memory and time of one forward+backward of the lm-head cross-entropy on CPU.

    uv run python packages/ling-kernels/scripts/measure_fused_ce.py \
        --tokens 2048 --hidden 256 --vocab 8192 [--dtype bfloat16]

Each implementation runs in its own subprocess, so its peak resident set (`ru_maxrss`) minus the
resident set just before the first call is the memory it needed on top of inputs (including the
.grad tensors it leaves behind). `recompute` is the alternative design that was measured and
not chosen: save only the per-token logsumexp and recompute the logits chunk by chunk in the
backward; it lives here, not in the package.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

IMPLEMENTATIONS = ("reference", "fused", "recompute")


class _RecomputeLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size):
        valid = labels != -100
        count = valid.sum().clamp(min=1).float()
        safe = torch.where(valid, labels, 0)
        lse = torch.empty(hidden.shape[0], dtype=torch.float32)
        total = torch.zeros(())
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            logits = F.linear(hidden[start:end], weight).float()
            lse[start:end] = torch.logsumexp(logits, -1)
            target = logits.gather(1, safe[start:end, None]).squeeze(1)
            total += ((lse[start:end] - target) * valid[start:end]).sum()
        ctx.save_for_backward(hidden, weight, safe, valid, lse, count)
        ctx.chunk_size = chunk_size
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, safe, valid, lse, count = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = min(start + ctx.chunk_size, hidden.shape[0])
            logits = F.linear(hidden[start:end], weight).float()
            scale = valid[start:end] * grad_loss / count
            grad_logits = logits.sub_(lse[start:end, None]).exp_().mul_(scale[:, None])
            grad_logits[torch.arange(end - start), safe[start:end]] -= scale
            grad_logits = grad_logits.to(hidden.dtype)
            torch.mm(grad_logits, weight, out=grad_hidden[start:end])
            if hidden.dtype == torch.float32:
                grad_weight.addmm_(grad_logits.t(), hidden[start:end])
            else:
                grad_weight.add_(grad_logits.t() @ hidden[start:end])
        return grad_hidden, grad_weight.to(weight.dtype), None, None


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def _run_one(
    impl: str, tokens: int, hidden_size: int, vocab: int, dtype: str, repeats: int
) -> dict:
    from ling_kernels.fused_linear_cross_entropy import (
        default_chunk_size,
        fused_linear_cross_entropy,
        reference,
    )

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    hidden = torch.randn(tokens, hidden_size, dtype=dt, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size) * hidden_size**-0.5).to(dt).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,))
    chunk = default_chunk_size(tokens, hidden_size, vocab)

    def step() -> torch.Tensor:
        hidden.grad = weight.grad = None
        if impl == "reference":
            loss = reference(hidden, weight, labels)[0]
        elif impl == "fused":
            loss = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=chunk)[0]
        else:
            loss = _RecomputeLinearCrossEntropy.apply(hidden, weight, labels, chunk)
        loss.backward()
        return loss

    baseline = _rss_bytes()
    step()
    seconds = float("inf")
    for _ in range(repeats):  # best of several: the machine's cores are shared
        start = time.perf_counter()
        loss = step()
        seconds = min(seconds, time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"impl": impl, "loss": loss.item(), "seconds": seconds,
            "peak_extra_MiB": (peak - baseline) / 2**20, "chunk_size": chunk}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=3, help="timed steps; the best counts")
    parser.add_argument("--impl", choices=IMPLEMENTATIONS, help="run one, in this process")
    args = parser.parse_args()
    if args.impl:
        result = _run_one(
            args.impl, args.tokens, args.hidden, args.vocab, args.dtype, args.repeats
        )
        print(json.dumps(result))
        return
    logits_mib = args.tokens * args.vocab * 4 / 2**20
    print(f"N={args.tokens} H={args.hidden} V={args.vocab} {args.dtype}; "
          f"one fp32 [N, V] = {logits_mib:.0f} MiB; torch threads={torch.get_num_threads()}")
    for impl in IMPLEMENTATIONS:
        out = subprocess.run(
            [sys.executable, __file__, "--impl", impl, "--tokens", str(args.tokens),
             "--hidden", str(args.hidden), "--vocab", str(args.vocab), "--dtype", args.dtype,
             "--repeats", str(args.repeats)],
            capture_output=True, text=True,
        )
        if out.returncode != 0:
            sys.exit(f"{impl} failed:\n{out.stderr}")
        r = json.loads(out.stdout)
        print(f"{impl:10s} fwd+bwd {r['seconds']:7.3f} s  peak +{r['peak_extra_MiB']:7.1f} MiB  "
              f"loss {r['loss']:.6f}  chunk {r['chunk_size']}")


if __name__ == "__main__":
    main()
