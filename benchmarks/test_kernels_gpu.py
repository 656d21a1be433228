"""ling-kernels ops on CUDA in bf16 at Ling-Lite shapes, each against anchors in the same run:
`torch.compile` of the op's reference, Liger-Kernel's op where `liger_kernel` is installed,
and the device's copy bandwidth (elementwise ops) or dense bf16 matmul rate (grouped GEMM).
The fused linear cross-entropy is measured by peak memory against the eager reference.

Skipped without CUDA. NOT MEASURED YET: no GPU was available when these were written, so
they have never run; expect to fix small things on first use.
"""

from __future__ import annotations

import pytest
import torch

import ling_kernels as lk

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

TOKENS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 4096, 2048, 16, 4, 128
EXPERTS, TOP_K, EXPERT_FFN, VOCAB = 64, 6, 1408, 126464
DTYPE = torch.bfloat16


def cuda_seconds(fn, repeats: int = 20) -> float:
    """Best of `repeats` timings of fn() with CUDA events (after two warm-up calls)."""
    for _ in range(2):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


def copy_bandwidth(nbytes: int) -> float:
    """Bytes/s of a device-to-device copy moving `nbytes` (read + write)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() * 2 / cuda_seconds(lambda: dst.copy_(src))


def leaf(*shape, scale=1.0):
    return (torch.randn(*shape, device="cuda") * scale).to(DTYPE).requires_grad_()


def fwd_bwd(fn, inputs):
    def run():
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    return run


def elementwise_cases():
    x, w = leaf(TOKENS, HIDDEN), leaf(HIDDEN)
    gate, up = leaf(TOKENS * TOP_K, EXPERT_FFN), leaf(TOKENS * TOP_K, EXPERT_FFN)
    q, k = leaf(1, HEADS, TOKENS, HEAD_DIM), leaf(1, KV_HEADS, TOKENS, HEAD_DIM)
    angles = torch.rand(TOKENS, HEAD_DIM // 2, device="cuda") * TOKENS
    angles = torch.cat([angles, angles], -1)
    cos, sin = angles.cos(), angles.sin()
    # (op, ours, reference, inputs, bytes moved by fwd+bwd at minimum)
    return {
        "rms_norm": (lambda a, b: lk.rms_norm(a, b), lk.rms_norm_reference, (x, w),
                     5 * x.numel() * 2),
        "swiglu": (lk.swiglu, lk.swiglu_reference, (gate, up), 7 * gate.numel() * 2),
        "apply_rope": (lambda a, b: lk.apply_rope(a, b, cos, sin),
                       lambda a, b: lk.apply_rope_reference(a, b, cos, sin), (q, k),
                       4 * (q.numel() + k.numel()) * 2),
    }


def liger_op(name):
    try:
        if name == "rms_norm":
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction
            return lambda a, b: LigerRMSNormFunction.apply(a, b, 1e-6)
        if name == "swiglu":
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction
            return LigerSiLUMulFunction.apply
    except ImportError:
        return None
    return None  # Liger's rope takes [B, H, S, D] with position tables of its own layout


@pytest.mark.parametrize("op", ["rms_norm", "swiglu", "apply_rope"])
def test_elementwise_op_bandwidth(benchmark, op):
    ours, reference, inputs, nbytes = elementwise_cases()[op]
    ours_seconds = cuda_seconds(fwd_bwd(ours, inputs))
    compiled_seconds = cuda_seconds(fwd_bwd(torch.compile(reference), inputs))
    liger = liger_op(op)
    liger_seconds = cuda_seconds(fwd_bwd(liger, inputs)) if liger else None
    bandwidth = copy_bandwidth(nbytes)
    benchmark.pedantic(fwd_bwd(ours, inputs), rounds=5, warmup_rounds=1)
    benchmark.extra_info.update({
        "ours_seconds": ours_seconds,
        "fraction_of_copy_bandwidth": round(nbytes / ours_seconds / bandwidth, 3),
        "speedup_over_torch_compile": round(compiled_seconds / ours_seconds, 3),
        "speedup_over_liger": round(liger_seconds / ours_seconds, 3) if liger_seconds else None,
    })


def test_grouped_mm_vs_dense_matmul(benchmark):
    counts = torch.bincount(torch.randint(0, EXPERTS, (TOKENS * TOP_K,)), minlength=EXPERTS)
    x = leaf(TOKENS * TOP_K, HIDDEN)
    weights = leaf(EXPERTS, EXPERT_FFN, HIDDEN, scale=0.02)
    run = fwd_bwd(lambda a, w: lk.grouped_mm(a, w, counts), (x, weights))
    dense_a, dense_b = leaf(TOKENS * TOP_K, HIDDEN), leaf(EXPERT_FFN, HIDDEN)
    dense = fwd_bwd(torch.nn.functional.linear, (dense_a, dense_b))
    ours_seconds, dense_seconds = cuda_seconds(run), cuda_seconds(dense)
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    benchmark.extra_info["fraction_of_dense_matmul_rate"] = round(dense_seconds / ours_seconds, 3)


def test_fused_linear_cross_entropy_peak_memory(benchmark):
    hidden, weight = leaf(TOKENS, HIDDEN), leaf(VOCAB, HIDDEN, scale=HIDDEN**-0.5)
    labels = torch.randint(0, VOCAB, (TOKENS,), device="cuda")

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss, _ = fn(hidden, weight, labels)
        loss.backward()
        torch.cuda.synchronize()
        hidden.grad = weight.grad = None
        return torch.cuda.max_memory_allocated() - before

    eager_peak = peak(lk.fused_linear_cross_entropy_reference)
    fused_peak = peak(lk.fused_linear_cross_entropy)
    benchmark.pedantic(lambda: peak(lk.fused_linear_cross_entropy), rounds=3)
    benchmark.extra_info.update({"eager_peak_bytes": eager_peak, "fused_peak_bytes": fused_peak,
                                 "fused_over_eager_peak": round(fused_peak / eager_peak, 3)})
