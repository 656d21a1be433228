"""Model behaviour: routing properties, MoE vs a per-token loop, causality, HF names, warmup."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ling_core import LingConfig, LingForCausalLM, build_model, preset
from ling_core.moe import MoE, Router


def small_config(**overrides) -> LingConfig:
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=6,
                num_experts_per_tok=2, num_shared_experts=1, moe_intermediate_size=16,
                first_k_dense_replace=1, rope_theta=10000.0, initializer_range=0.2)
    base.update(overrides)
    return LingConfig(**base)


@settings(max_examples=40, deadline=None)
@given(tokens=st.integers(1, 40), experts=st.integers(1, 12), data=st.data(),
       norm=st.booleans(), seed=st.integers(0, 2**16))
def test_router_sends_each_token_to_k_distinct_experts(tokens, experts, data, norm, seed):
    k = data.draw(st.integers(1, experts))
    torch.manual_seed(seed)
    router = Router(hidden_size=8, num_experts=experts, top_k=k, norm_topk_prob=norm)
    torch.nn.init.normal_(router.weight)
    r = router(torch.randn(tokens, 8))
    assert r.expert_indices.shape == (tokens, k)
    assert all(len(set(row)) == k for row in r.expert_indices.tolist())
    assert int(r.tokens_per_expert.sum()) == tokens * k
    assert torch.equal(r.tokens_per_expert, torch.bincount(r.expert_indices.flatten(), minlength=experts))
    if norm and k > 1:  # as HF: with k = 1 the weight stays the probability, so the router learns
        torch.testing.assert_close(r.expert_weights.sum(-1), torch.ones(tokens), rtol=0, atol=1e-6)
    assert (r.expert_weights >= 0).all()


def moe_per_token_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The specification: each token, one at a time, through its k experts and the shared ones."""
    router = moe.gate
    out = torch.empty_like(x)
    for t in range(x.shape[0]):
        probs = (x[t].float() @ router.weight.float().T).softmax(-1)
        weights, experts = probs.topk(router.top_k)
        if router.norm_topk_prob and router.top_k > 1:
            weights = weights / weights.sum()
        y = sum(w * moe.experts[int(e)](x[t]) for w, e in zip(weights, experts))
        if moe.shared_experts is not None:
            y = y + moe.shared_experts(x[t])
        out[t] = y
    return out


@settings(max_examples=25, deadline=None)
@given(tokens=st.integers(1, 24), experts=st.integers(1, 8), data=st.data(),
       shared=st.integers(0, 2), norm=st.booleans(), seed=st.integers(0, 2**16))
def test_moe_matches_per_token_loop(tokens, experts, data, shared, norm, seed):
    k = data.draw(st.integers(1, experts))
    cfg = small_config(num_experts=experts, num_experts_per_tok=k, num_shared_experts=shared,
                       norm_topk_prob=norm)
    torch.manual_seed(seed)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(tokens, cfg.hidden_size)
    out, _ = moe(x)
    # fp32, sums of <= k + 1 products reordered: a few ulps of the output's scale.
    torch.testing.assert_close(out, moe_per_token_reference(moe, x), rtol=1e-5, atol=1e-5)


def test_moe_gradients_reach_every_used_expert():
    cfg = small_config(num_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    out, routing = moe(torch.randn(64, cfg.hidden_size))
    out.sum().backward()
    for e, count in enumerate(routing.tokens_per_expert.tolist()):
        grad = moe.experts[e].up_proj.weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == (count > 0)
    assert moe.gate.weight.grad.abs().sum() > 0


def test_all_tokens_to_one_expert():
    cfg = small_config(num_experts=5, num_experts_per_tok=1)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[3] = 1.0
    x = torch.rand(10, cfg.hidden_size) + 0.1  # positive inputs: expert 3 wins every token
    out, routing = moe(x)
    assert routing.tokens_per_expert.tolist() == [0, 0, 0, 10, 0]
    torch.testing.assert_close(out, moe_per_token_reference(moe, x), rtol=1e-5, atol=1e-5)


@settings(max_examples=10, deadline=None)
@given(seq=st.integers(2, 24), position=st.data(), seed=st.integers(0, 2**16))
def test_causality_future_tokens_do_not_change_past_logits(seq, position, seed):
    model = build_model(small_config(), seed=seed).eval()
    cut = position.draw(st.integers(1, seq - 1))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (2, seq), generator=g)
    changed = ids.clone()
    changed[:, cut:] = torch.randint(0, 97, (2, seq - cut), generator=g)
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :cut], b[:, :cut], rtol=1e-5, atol=1e-5)


def test_forward_outputs_and_loss_composition():
    cfg = small_config()
    model = build_model(cfg, seed=1)
    ids = torch.randint(0, cfg.vocab_size, (3, 10))
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    out = model(ids, labels, return_logits=True)
    assert out.logits.shape == (3, 10, cfg.vocab_size)
    assert model(ids, labels).logits is None  # training never materialises [tokens, vocab]
    assert out.tokens_per_expert.shape == (cfg.num_moe_layers, cfg.num_experts)
    assert out.tokens_per_expert.sum(1).tolist() == [30 * cfg.num_experts_per_tok] * cfg.num_moe_layers
    expected_ce = torch.nn.functional.cross_entropy(out.logits.reshape(-1, cfg.vocab_size),
                                                    labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.lm_loss, expected_ce)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.015 * out.balance_loss + 1e-4 * out.router_z_loss)
    assert out.balance_loss >= 1.0 - 1e-5  # E * sum f_e P_e is minimised (1) by uniform routing
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "experts." not in n
               or "shared_experts" in n)


def test_norm_head_normalises_each_hidden_column_over_the_vocabulary():
    """Hand-computed: lm_head [[3, 0], [4, 1]] has column norms 5 and 1 (over the vocabulary), so
    NormHead gives [[0.6, 0], [0.8, 1]]. The norm is detached (as in the HF reference): the
    gradient of sum(W_normed * G) is G divided column-wise by the norm, here [[0.2, 1], [0.2, 1]]
    for G = 1 (normalize's own gradient, through the norm, would give 0 in column 1)."""
    model = build_model(small_config(vocab_size=2, hidden_size=2, num_attention_heads=1, num_key_value_heads=1,
                                     head_dim=2, norm_head=True), seed=0)
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.tensor([[3.0, 0.0], [4.0, 1.0]]))
    weight = model.output_weight()
    # fp32: 3 / (5 + 1e-7) is 0.6 to within one ulp; 1e-6 covers it.
    torch.testing.assert_close(weight, torch.tensor([[0.6, 0.0], [0.8, 1.0]]), rtol=1e-6, atol=1e-6)
    weight.sum().backward()
    torch.testing.assert_close(model.lm_head.weight.grad, torch.tensor([[0.2, 1.0], [0.2, 1.0]]),
                               rtol=1e-6, atol=1e-6)
    final_hidden = []
    model.model.norm.register_forward_hook(lambda module, args, out: final_hidden.append(out.detach()))
    with torch.no_grad():
        logits = model(torch.tensor([[1, 0]])).logits[0]
    torch.testing.assert_close(logits, final_hidden[0][0] @ torch.tensor([[0.6, 0.0], [0.8, 1.0]]).T,
                               rtol=1e-5, atol=1e-6)
    plain = build_model(small_config(norm_head=False), seed=0)
    assert torch.equal(plain.output_weight(), plain.lm_head.weight)


def test_norm_head_defaults_off_as_in_the_reference_and_is_on_in_the_report_presets():
    """A config.json without `norm_head` loads as HF's BailingMoeConfig reads it (False). Lite and
    Plus have NormHead as the report's models do; tiny does not (see ling_core.config.PRESETS)."""
    from ling_core import PRESETS
    assert LingConfig().norm_head is False
    hf = small_config().to_hf()
    del hf["norm_head"]
    assert LingConfig.from_hf(hf).norm_head is False
    assert PRESETS["lite"].norm_head and PRESETS["plus"].norm_head
    assert not PRESETS["tiny"].norm_head


def test_hf_parameter_names():
    cfg = small_config(num_experts=2, first_k_dense_replace=1, num_hidden_layers=2)
    with torch.device("meta"):
        names = set(LingForCausalLM(cfg).state_dict())
    expected = {"model.word_embeddings.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(2):
        p = f"model.layers.{i}."
        expected |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight",
                     p + "attention.query_key_value.weight", p + "attention.dense.weight"}
        if i == 0:
            expected |= {p + f"mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")}
        else:
            expected.add(p + "mlp.gate.weight")
            for m in ("gate_proj", "up_proj", "down_proj"):
                expected |= {p + f"mlp.experts.{e}.{m}.weight" for e in range(2)}
                expected.add(p + f"mlp.shared_experts.{m}.weight")
    assert names == expected
    with torch.device("meta"):
        model = LingForCausalLM(cfg)
    assert model.model.layers[1].mlp.gate.weight.shape == (2, cfg.hidden_size)
    assert model.model.layers[1].mlp.shared_experts.up_proj.weight.shape == (16, cfg.hidden_size)


def test_meta_build_then_init_is_deterministic():
    cfg = small_config()
    a, b = build_model(cfg, seed=7), build_model(cfg, seed=7)
    c = build_model(cfg, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    with torch.device("meta"):
        big = LingForCausalLM(preset("lite"))  # 16.8B parameters, no memory
    assert big.lm_head.weight.is_meta


def test_stochastic_routing_warmup():
    cfg = small_config(routing_warmup_steps=10)
    router = MoE(cfg).gate
    torch.nn.init.normal_(router.weight)
    x = torch.randn(200, cfg.hidden_size)
    router.train()
    router.step = 10  # warmup over: alpha = 1, no noise
    torch.manual_seed(0)
    clean = router(x)
    router.step = 0  # alpha = 0: pure noise, routing ignores the logits
    torch.manual_seed(0)
    noisy = router(x)
    assert not torch.equal(clean.expert_indices, noisy.expert_indices)
    router.step = 5
    assert router.warmup_alpha() == 0.5
    router.eval()
    router.step = 0
    assert router.warmup_alpha() == 1.0
    torch.testing.assert_close(router(x).expert_weights, clean.expert_weights)
    # the z-loss is always computed on the router's own logits, not the blended ones
    torch.testing.assert_close(noisy.router_z_loss, clean.router_z_loss)


def test_set_step_reaches_every_router():
    model = build_model(small_config(routing_warmup_steps=4))
    model.set_step(3)
    routers = [m for m in model.modules() if isinstance(m, Router)]
    assert routers and all(r.step == 3 for r in routers)


def test_initial_loss_is_near_uniform():
    cfg = small_config(initializer_range=0.02, norm_head=False)
    model = build_model(cfg, seed=0)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    assert abs(model(ids, ids).lm_loss.item() - math.log(cfg.vocab_size)) < 0.1
    # NormHead: unit columns over the vocabulary make each weight ~1/sqrt(vocab); against a final
    # hidden state of norm ~sqrt(hidden) the logits' scale is sqrt(hidden / vocab), whatever the init
    normed = build_model(cfg.replace(norm_head=True), seed=0)
    expected = math.sqrt(cfg.hidden_size / cfg.vocab_size)
    assert 0.5 < normed(ids).logits.std().item() / expected < 2.0


def test_bf16_autocast_forward_backward():
    model = build_model(small_config(), seed=0)
    ids = torch.randint(0, 97, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("bad, message", [
    (dict(num_attention_heads=6, num_key_value_heads=4), "multiple of num_key_value_heads"),
    (dict(num_experts_per_tok=9, num_experts=8), "num_experts_per_tok"),
    (dict(head_dim=7), "head_dim must be even"),
])
def test_invalid_config_is_rejected(bad, message):
    with pytest.raises(ValueError, match=message):
        small_config(**bad)


def _loss_and_grads(cfg, ids, labels, mode, autocast, monkeypatch):
    monkeypatch.setenv("LING_KERNELS", mode)
    model = build_model(cfg, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(ids, labels)
    out.loss.backward()
    return out, {name: p.grad for name, p in model.named_parameters()}


def test_kernel_paths_give_the_same_loss_and_gradients_fp32(monkeypatch):
    """LING_KERNELS=reference and fast run every ling-kernels op the model calls (rms_norm,
    apply_rope, swiglu, route, permute, grouped_mm, unpermute, fused CE) down different code
    paths; the loss, the auxiliaries, the routing and every parameter gradient must agree to
    1e-5 relative to the tensor's largest entry: the same fp32 math in a different summation
    order (chunked CE, gathers instead of scatter-adds), i.e. ~1e-7 apart."""
    cfg = small_config(vocab_size=300)
    ids = torch.randint(0, cfg.vocab_size, (3, 17), generator=torch.Generator().manual_seed(0))
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    ref, ref_grads = _loss_and_grads(cfg, ids, labels, "reference", False, monkeypatch)
    fast, fast_grads = _loss_and_grads(cfg, ids, labels, "fast", False, monkeypatch)
    assert torch.equal(ref.tokens_per_expert, fast.tokens_per_expert)
    for field in ("loss", "lm_loss", "balance_loss", "router_z_loss"):
        torch.testing.assert_close(getattr(fast, field), getattr(ref, field), rtol=1e-5, atol=1e-5)
    assert ref_grads.keys() == fast_grads.keys()
    for name, ref_grad in ref_grads.items():
        assert (ref_grad is None) == (fast_grads[name] is None), name
        if ref_grad is not None:
            scale = max(ref_grad.abs().max().item(), 1e-3)
            torch.testing.assert_close(fast_grads[name], ref_grad, rtol=1e-5, atol=1e-5 * scale,
                                       msg=lambda m, n=name: f"{n}: {m}")


def test_kernel_paths_under_bf16_autocast_are_as_accurate_as_the_reference(monkeypatch):
    """Under bf16 autocast the two paths round in different places (the fast swiglu/rope
    backward works in fp32 and rounds once; the reference rounds after each op), so they are
    compared by accuracy instead: against the fp32 model, the fast path's loss is within 1e-2
    (bf16 keeps 8 mantissa bits, ~0.4% per rounding) and its gradients' error is at most twice
    the reference path's own bf16 error (plus 1e-3 of the tensor's scale), per parameter."""
    cfg = small_config(vocab_size=300)
    ids = torch.randint(0, cfg.vocab_size, (3, 17), generator=torch.Generator().manual_seed(0))
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    exact, exact_grads = _loss_and_grads(cfg, ids, labels, "reference", False, monkeypatch)
    ref, ref_grads = _loss_and_grads(cfg, ids, labels, "reference", True, monkeypatch)
    fast, fast_grads = _loss_and_grads(cfg, ids, labels, "fast", True, monkeypatch)
    for field in ("loss", "lm_loss", "balance_loss", "router_z_loss"):
        torch.testing.assert_close(getattr(fast, field).float(), getattr(exact, field),
                                   rtol=1e-2, atol=1e-2)
    for name, exact_grad in exact_grads.items():
        if exact_grad is None or ref_grads[name] is None:
            assert fast_grads[name] is None or fast_grads[name].abs().max() == 0, name
            continue
        scale = exact_grad.abs().max().item()
        ref_error = (ref_grads[name].float() - exact_grad).abs().max().item()
        fast_error = (fast_grads[name].float() - exact_grad).abs().max().item()
        assert fast_error <= 2 * ref_error + 1e-3 * scale, (name, fast_error, ref_error, scale)


@settings(max_examples=15, deadline=None)
@given(lengths=st.lists(st.integers(1, 9), min_size=1, max_size=4), padding=st.integers(0, 4),
       seed=st.integers(0, 1000))
def test_packed_samples_give_the_logits_each_gives_alone(lengths, padding, seed):
    """One row holding several samples (segment ids 1..n, padding 0) scores each sample as the
    model scores it alone. fp32: RoPE is relative, so a sample placed at an offset differs only by
    the rounding of its angles and of the masked softmax, a few ulps per layer; 1e-4 covers it."""
    from ling_core.model import packed_causal_mask
    model = build_model(small_config(norm_head=True), seed=seed).eval()
    generator = torch.Generator().manual_seed(seed)
    samples = [torch.randint(1, 97, (n,), generator=generator) for n in lengths]
    row = torch.cat([*samples, torch.zeros(padding, dtype=torch.long)])[None]
    segments = torch.cat([torch.full((n,), i + 1) for i, n in enumerate(lengths)] + [torch.zeros(padding)])[None]
    with torch.no_grad():
        packed = model(row, segment_ids=segments.long()).logits[0]
        start = 0
        for sample in samples:
            alone = model(sample[None]).logits[0]
            torch.testing.assert_close(packed[start:start + len(sample)], alone, rtol=1e-4, atol=1e-4)
            start += len(sample)
        if len(samples) > 1:  # the mask is what isolates them: without it the second sample sees the first
            plain = model(row).logits[0]
            assert not torch.allclose(plain[lengths[0]:lengths[0] + lengths[1]],
                                      packed[lengths[0]:lengths[0] + lengths[1]], atol=1e-3)
    mask = packed_causal_mask(segments.long())
    assert mask.shape == (1, 1, row.shape[1], row.shape[1]) and mask.diagonal(dim1=-2, dim2=-1).all()


@settings(max_examples=10, deadline=None)
@given(seq=st.integers(2, 24), data=st.data(), seed=st.integers(0, 1000))
def test_packed_loss_on_the_target_tokens_only_matches_full_logits(seq, data, seed):
    """With segment ids the head runs only on labelled tokens; the loss and every gradient must
    be those of F.cross_entropy over the full logits (ignored labels included, as -100). fp32,
    only the summation order of the head's chunks differs: 1e-5 relative covers it. All-ignored
    rows give loss 0 and zero head gradients, as the unpacked path does."""
    import torch.nn.functional as F
    model = build_model(small_config(), seed=seed)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (2, seq), generator=generator)
    keep = torch.tensor(data.draw(st.lists(st.booleans(), min_size=2 * seq, max_size=2 * seq))).view(2, seq)
    labels = torch.where(keep, torch.randint(1, 97, (2, seq), generator=generator), -100)
    segments = torch.ones(2, seq, dtype=torch.long)

    def loss_and_grads(packed: bool):
        model.zero_grad()
        if packed:
            loss = model(ids, labels, segment_ids=segments).lm_loss
        else:
            logits = model(ids, segment_ids=segments).logits
            loss = (F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
                    / keep.sum().clamp(min=1))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fast, fast_grads = loss_and_grads(True)
    exact, exact_grads = loss_and_grads(False)
    torch.testing.assert_close(fast, exact, rtol=1e-5, atol=1e-6)
    for name, grad in exact_grads.items():
        torch.testing.assert_close(fast_grads.get(name, torch.zeros_like(grad)), grad, rtol=1e-4, atol=1e-6)


def test_a_model_built_directly_is_initialised_as_build_model_does():
    """Only a model built on meta waits for init_weights(); one built on a real device used to hold
    whatever memory torch.empty returned (NaN losses in a plain training loop)."""
    cfg = small_config()
    direct, built = LingForCausalLM(cfg), build_model(cfg, seed=0)
    for (name, a), (_, b) in zip(direct.named_parameters(), built.named_parameters()):
        assert torch.equal(a, b), name
