"""The lm-head matmul and the token cross-entropy, fused and chunked over tokens.

`fused_linear_cross_entropy(hidden [N, H], weight [V, H], labels [N])` returns `(loss, z_loss)`:

- `loss` = mean over non-ignored tokens of `logsumexp(logits) - logits[label]`, plus
  `z_loss_weight * z_loss`. It is the one differentiable output: backpropagate it.
- `z_loss` = mean over non-ignored tokens of `logsumexp(logits) ** 2`, unweighted and
  detached, for logging (computed whatever `z_loss_weight` is; it costs nothing extra).

If every label is `ignore_index`, both are 0 and the gradients are zero (no 0/0 NaN).
Logits are computed in the input dtype (as `F.linear` does) and everything after the matmul
is fp32, so bf16 inputs accumulate the loss and the weight gradient in fp32.

The fast path never holds the full [N, V] logits: it walks `chunk_size` tokens at a time and,
Liger-Kernel style, computes the chunk's gradients for hidden and weight during the forward
(the backward only scales them by the incoming gradient). Against recomputing the logits in
the backward this saves one of the four [chunk, V] x H matmuls at no more peak memory (both
hold an fp32 [V, H] weight gradient); see the README for the measurements.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ling_kernels.allocator import keep_freed_memory_if_training
from ling_kernels.dispatch import use_fast_path

__all__ = ["fused_linear_cross_entropy", "reference", "default_chunk_size"]


# The chunk's token count is the inner dimension of the weight-gradient matmul
# (grad_weight += grad_logits.T @ hidden_chunk), which also rereads and rewrites the whole fp32
# [V, H] gradient once per chunk. Below ~256 tokens that pass is memory-bound: the tiny preset's
# loss (2048 tokens, H 256, V 8192, Liger's rule gives 64) took 312 ms fwd+bwd at 64 tokens per
# chunk against 222 ms at 256 and 215 ms at 2048 (2 threads, fp32, 2026-12-05).
MIN_CHUNK_TOKENS = 256


def default_chunk_size(num_tokens: int, hidden_size: int, vocab_size: int) -> int:
    """Tokens per chunk so that one chunk's logits hold about as many elements as `hidden`
    (Liger-Kernel's rule), but at least MIN_CHUNK_TOKENS (or all tokens, if fewer), rounded up
    to a power of two for matmul-friendly shapes."""
    chunks = max(1, -(-vocab_size // max(hidden_size, 1)))
    tokens = max(1, -(-num_tokens // chunks), min(MIN_CHUNK_TOKENS, num_tokens))
    return 1 << (tokens - 1).bit_length()


def reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    z_loss_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The specification: full fp32 logits, then `F.cross_entropy` (sum / non-ignored count)."""
    hidden, labels = _flatten(hidden, weight, labels)
    logits = F.linear(hidden, weight).float()
    valid = labels != ignore_index
    count = valid.sum().clamp(min=1)
    ce = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum") / count
    lse = torch.logsumexp(logits, dim=-1)
    z_loss = (lse.square() * valid).sum() / count
    loss = ce + z_loss_weight * z_loss if z_loss_weight else ce
    return loss, z_loss.detach()


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    z_loss_weight: float = 0.0,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of `F.linear(hidden, weight)` against `labels`, as `(loss, z_loss)`.

    `hidden` may have leading batch dimensions ([..., H] with labels [...]); `chunk_size` is
    tokens per chunk (default: `default_chunk_size`). Dispatch follows `LING_KERNELS`; the
    chunked path is plain torch, so it exists on every device and dtype.
    """
    if not use_fast_path("fused_linear_cross_entropy", available=True):
        return reference(hidden, weight, labels, ignore_index, z_loss_weight)
    hidden, labels = _flatten(hidden, weight, labels)
    num_tokens = hidden.shape[0]
    if chunk_size is None:
        chunk_size = default_chunk_size(num_tokens, weight.shape[1], weight.shape[0])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    need_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    keep_freed_memory_if_training((hidden, weight))  # the [V, H] weight gradient, every step: reuse it
    return _ChunkedLinearCrossEntropy.apply(
        hidden, weight, labels, ignore_index, float(z_loss_weight), chunk_size, need_grads
    )


def _flatten(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden [..., H] and weight [V, H] must share H; got hidden {tuple(hidden.shape)} "
            f"and weight {tuple(weight.shape)}"
        )
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels must have hidden's leading shape {tuple(hidden.shape[:-1])}, "
            f"got {tuple(labels.shape)}"
        )
    return hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)


def _accumulate_weight_grad(
    grad_weight: torch.Tensor, grad_logits: torch.Tensor, hidden_chunk: torch.Tensor
) -> None:
    """grad_weight (fp32) += grad_logits [V, chunk] @ hidden_chunk, without a [V, H] fp32
    temporary."""
    if hidden_chunk.dtype == torch.float32:
        grad_weight.addmm_(grad_logits, hidden_chunk)
    else:
        # Low-precision matmul (fp32 accumulation inside), one rounding per chunk, fp32 sum.
        grad_weight.add_(grad_logits @ hidden_chunk)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, z_loss_weight, chunk_size, need_grads):
        num_tokens = hidden.shape[0]
        valid = labels != ignore_index
        # Clamped so an all-ignored batch gives 0 / 1 = 0 rather than NaN, with no host sync.
        count = valid.sum().clamp(min=1).float()
        safe_labels = torch.where(valid, labels, 0)
        ce_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        z_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = (
            torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
            if need_grads and hidden.requires_grad
            else None
        )
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            if need_grads and weight.requires_grad
            else None
        )
        for start in range(0, num_tokens, chunk_size):
            end = min(start + chunk_size, num_tokens)
            hidden_chunk = hidden[start:end]
            # Vocabulary-major logits [V, chunk]: `weight @ hidden.T` ran at 178 GFLOP/s where
            # `hidden @ weight.T` ran at 145 (tiny lm head, 2 threads), and both gradient
            # matmuls below then read it without a transpose copy.
            logits = torch.mm(weight, hidden_chunk.t()).float()
            rows = torch.arange(end - start, device=logits.device)
            chunk_labels = safe_labels[start:end]
            chunk_valid = valid[start:end]
            target_logit = logits[chunk_labels, rows]
            # One pass of exp, in place: lse = max + log(sum(exp(logits - max))), and
            # exp(logits - max) / sum is the softmax the gradient needs (torch.logsumexp would
            # allocate and exponentiate a second [V, chunk] copy).
            row_max = logits.amax(dim=0)
            exp_sum = logits.sub_(row_max).exp_().sum(dim=0)
            lse = row_max + exp_sum.log()
            ce_sum += ((lse - target_logit) * chunk_valid).sum()
            z_sum += (lse.square() * chunk_valid).sum()
            if not need_grads:
                continue
            # d/dlogits of (lse - logit_y + w * lse^2) / count:
            # softmax * (1 + 2 w lse) - onehot(y), zero on ignored rows.
            scale = (1.0 + 2.0 * z_loss_weight * lse) * chunk_valid / count
            grad_logits = logits.mul_(scale / exp_sum)
            grad_logits[chunk_labels, rows] -= chunk_valid / count
            grad_logits = grad_logits.to(hidden.dtype)
            if grad_hidden is not None:
                torch.mm(grad_logits.t(), weight, out=grad_hidden[start:end])
            if grad_weight is not None:
                _accumulate_weight_grad(grad_weight, grad_logits, hidden_chunk)
        ce = ce_sum / count
        z_loss = z_sum / count
        loss = ce + z_loss_weight * z_loss
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(z_loss)
        return loss, z_loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_z_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        # The usual case is `loss.backward()`: hand the stashed gradients over as they are
        # rather than allocating scaled copies (a [V, H] copy is the size of the lm head).
        if torch.equal(grad_loss, torch.ones_like(grad_loss)):
            return grad_hidden, grad_weight, None, None, None, None, None
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight * grad_loss.to(grad_weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None
