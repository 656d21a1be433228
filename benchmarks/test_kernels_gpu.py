"""ling-kernels ops on CUDA in bf16 at Ling-Lite shapes, each against anchors in the same run:
`torch.compile` of the op's reference, Liger-Kernel's op where `liger_kernel` is installed,
and the device's copy bandwidth (elementwise ops) or dense bf16 matmul rate (grouped GEMM).
The fused linear cross-entropy is measured by peak memory against the eager reference.

Run them all in one command on a CUDA machine:

    uv run pytest benchmarks/test_kernels_gpu.py --benchmark-only --benchmark-json=gpu.json

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


def grouped_mm_paths():
    """Every CUDA path of grouped_mm, callable directly (dispatch picks one of them)."""
    from ling_kernels.grouped_mm import _loop_of_mm, torch_grouped_mm, torch_grouped_mm_supported
    from ling_kernels.grouped_mm_triton import triton_grouped_mm

    paths = {"triton": triton_grouped_mm, "loop_of_mm": lambda x, w, c: _loop_of_mm(x, w, c, None)}
    probe = torch.empty(8, 8, device="cuda", dtype=DTYPE)
    if torch_grouped_mm_supported(probe, torch.empty(1, 8, 8, device="cuda", dtype=DTYPE)):
        paths["torch_grouped_mm"] = torch_grouped_mm
    return paths


@pytest.mark.parametrize("path", ["auto", "triton", "loop_of_mm", "torch_grouped_mm", "compiled_reference"])
def test_grouped_mm_vs_dense_matmul(benchmark, path):
    """fwd+bwd of one expert projection (12288 rows over 64 experts, 2048 -> 1408) by each
    path, against one dense [12288, 2048] x [2048, 1408] matmul's fwd+bwd (the same FLOPs)."""
    counts = torch.bincount(torch.randint(0, EXPERTS, (TOKENS * TOP_K,)), minlength=EXPERTS).tolist()
    x = leaf(TOKENS * TOP_K, HIDDEN)
    weights = leaf(EXPERTS, EXPERT_FFN, HIDDEN, scale=0.02)
    paths = grouped_mm_paths()
    paths["auto"] = lambda a, w, c: lk.grouped_mm(a, w, c)
    paths["compiled_reference"] = torch.compile(lk.grouped_mm_reference)
    if path not in paths:
        pytest.skip(f"{path} is not available on this device")
    run = fwd_bwd(lambda a, w: paths[path](a, w, counts), (x, weights))
    dense_a, dense_b = leaf(TOKENS * TOP_K, HIDDEN), leaf(EXPERT_FFN, HIDDEN)
    dense = fwd_bwd(torch.nn.functional.linear, (dense_a, dense_b))
    ours_seconds, dense_seconds = cuda_seconds(run), cuda_seconds(dense)
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    benchmark.extra_info.update({"path": path, "seconds": ours_seconds,
                                 "fraction_of_dense_matmul_rate": round(dense_seconds / ours_seconds, 3)})


def test_route_vs_compiled_reference(benchmark):
    """Triton routing (softmax, top-6 of 64, renormalise; fwd+bwd through weights and probs)
    against the eager and `torch.compile`d reference, and the copy bandwidth of its bytes."""
    scores = leaf(TOKENS, EXPERTS)

    def route_with(fn):
        def run(s):
            routed = fn(s, TOP_K, True)
            return routed.expert_weights, routed.probs
        return run

    ours = cuda_seconds(fwd_bwd(route_with(lk.route), (scores,)))
    eager = cuda_seconds(fwd_bwd(route_with(lk.route_reference), (scores,)))
    compiled = cuda_seconds(fwd_bwd(route_with(torch.compile(lk.route_reference)), (scores,)))
    # scores read (bf16), probs written (fp32); backward: probs and their gradient read, the
    # scores gradient written.
    nbytes = scores.numel() * (2 + 4 + 4 + 4 + 2)
    benchmark.pedantic(fwd_bwd(route_with(lk.route), (scores,)), rounds=5, warmup_rounds=1)
    benchmark.extra_info.update({
        "ours_seconds": ours, "speedup_over_eager_reference": round(eager / ours, 3),
        "speedup_over_torch_compile": round(compiled / ours, 3),
        "fraction_of_copy_bandwidth": round(nbytes / ours / copy_bandwidth(nbytes), 3),
        "liger": "Liger-Kernel has no routing op",
    })


def test_permute_unpermute_vs_compiled_reference(benchmark):
    """permute -> (x1.5) -> unpermute, fwd+bwd, 4096 tokens x top-6 x 2048 hidden: Triton
    against the plain-torch gathers, the eager and compiled references, and copy bandwidth."""
    from ling_kernels.permute import _Permute, _Unpermute, make_permute_map

    x = leaf(TOKENS, HIDDEN)
    weights = torch.rand(TOKENS, TOP_K, device="cuda").requires_grad_()
    indices = torch.rand(TOKENS, EXPERTS, device="cuda").topk(TOP_K, dim=-1).indices
    permute_map = make_permute_map(indices, EXPERTS)

    def ours(a, w):
        rows, m = lk.permute(a, indices, EXPERTS)
        return lk.unpermute(rows * 1.5, m, w)

    def torch_gathers(a, w):
        rows = _Permute.apply(a, permute_map.token_of_slot, permute_map.slot_of_assignment, TOP_K)
        return _Unpermute.apply(rows * 1.5, w, permute_map.token_of_slot, permute_map.slot_of_assignment)

    def reference(a, w):
        rows, m = lk.permute_reference(a, indices, EXPERTS)
        return lk.unpermute_reference(rows * 1.5, m, w)

    seconds = {name: cuda_seconds(fwd_bwd(fn, (x, weights))) for name, fn in
               (("ours", ours), ("torch_gathers", torch_gathers), ("eager_reference", reference),
                ("compiled_reference", torch.compile(reference)))}
    # permute reads T x H and writes T*k x H; unpermute the reverse; backward the same again.
    nbytes = 2 * 2 * (TOKENS + TOKENS * TOP_K) * HIDDEN * 2
    benchmark.pedantic(fwd_bwd(ours, (x, weights)), rounds=5, warmup_rounds=1)
    benchmark.extra_info.update({
        "ours_seconds": seconds["ours"],
        **{f"speedup_over_{name}": round(s / seconds["ours"], 3) for name, s in seconds.items()
           if name != "ours"},
        "fraction_of_copy_bandwidth": round(nbytes / seconds["ours"] / copy_bandwidth(nbytes), 3),
        "liger": "Liger-Kernel has no permute op",
    })


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
