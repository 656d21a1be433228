"""ling-kernels: Fused training ops (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy, MoE routing/permute/grouped GEMM) with Triton fast paths and plain-PyTorch reference fallbacks.

Not filled yet (issue 9); it exports no API.
"""
