"""count_params is exact (equal to the built model), presets match the report, FLOPs match a
measured count."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from ling_core import LingConfig, LingForCausalLM, build_model, count_params, flops_per_token, preset
from ling_core.counting import matmul_params_per_token


def built_counts(config):
    with torch.device("meta"):
        model = LingForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for p in model.model.layers[-1].mlp.experts[0].parameters()) if config.num_moe_layers else 0
    inactive = config.num_moe_layers * (config.num_experts - config.num_experts_per_tok) * expert
    return total, total - inactive


@settings(max_examples=25, deadline=None)
@given(layers=st.integers(1, 3), dense=st.integers(0, 3), experts=st.integers(1, 6), data=st.data(),
       shared=st.integers(0, 2), kv=st.sampled_from([1, 2, 4]), bias=st.booleans(), qkv_bias=st.booleans())
def test_count_params_equals_built_model(layers, dense, experts, data, shared, kv, bias, qkv_bias):
    config = LingConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=kv, head_dim=6, num_experts=experts,
                        num_experts_per_tok=data.draw(st.integers(1, experts)), num_shared_experts=shared,
                        moe_intermediate_size=10, first_k_dense_replace=min(dense, layers),
                        use_bias=bias, use_qkv_bias=qkv_bias)
    assert count_params(config) == built_counts(config)


@pytest.mark.parametrize("name", ["tiny", "lite", "plus"])
def test_preset_counts_equal_meta_model(name):
    assert count_params(preset(name)) == built_counts(preset(name))


def test_presets_match_the_report():
    total, active = count_params(preset("lite"))
    assert abs(total / 16.8e9 - 1) < 0.005 and abs(active / 2.75e9 - 1) < 0.005
    total, active = count_params(preset("plus"))
    assert abs(total / 290e9 - 1) < 0.01 and abs(active / 28.8e9 - 1) < 0.01
    tiny = preset("tiny")
    total, _ = count_params(tiny)
    assert 10e6 <= total <= 30e6
    assert tiny.num_experts >= 8 and tiny.num_experts_per_tok == 2 and tiny.num_shared_experts == 1
    assert tiny.first_k_dense_replace >= 1  # the dense-MLP path runs too


def test_flops_per_token_matches_measured_count(monkeypatch):
    """FlopCounterMode counts every matmul and attention FLOP of a real forward+backward.
    The reference kernel path is counted: the fused cross-entropy does the same three lm-head
    matmuls, but one is an in-place `addmm_`, which the counter does not see."""
    monkeypatch.setenv("LING_KERNELS", "reference")
    config = preset("tiny").replace(vocab_size=512)
    model = build_model(config, seed=0)
    batch, seq = 2, 64
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    with FlopCounterMode(display=False) as counter:
        model(ids, ids).loss.backward()
    counts = counter.get_flop_counts()["Global"]
    attention = sum(v for op, v in counts.items() if "attention" in str(op))
    measured_matmul = counter.get_total_flops() - attention
    # Matmuls: every active weight once per token, 2 FLOPs forward and 4 backward. The embedding
    # gradient is a scatter, not a matmul, so the counter sees none for it either.
    assert measured_matmul == 6 * matmul_params_per_token(config) * batch * seq
    # Attention: the counter charges the full square (no causal saving) and the fused backward's
    # recomputation of the scores (backward = 2.5x forward); model FLOPs charge the causal half
    # and backward = 2x forward. So counter = (1 + 2.5) * 2 * ours_forward = 7/3 * ours.
    ours = flops_per_token(config, seq) * batch * seq - 6 * matmul_params_per_token(config) * batch * seq
    assert attention * 3 == ours * 7
