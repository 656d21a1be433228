"""ling-eval on real Ling models: the KV-cache forward, the checkpoint loader plug-in and
agreement across kernel paths."""

import json
import shutil

import pytest
import torch
from hypothesis import given, settings, strategies as st

from ling_core import LingConfig, build_model
from ling_data import cached_tokenizer, embedded_corpus
from ling_eval import CheckpointLoadError, evaluate_task, load_task
from ling_eval.loaders import expand_checkpoints, load_checkpoint
from ling_eval.scoring import Request, loglikelihood
from ling_train.eval_model import extend, ling_eval_model

from ling_eval.tasks import BUILTIN_DIR as TASKS


def small_config(**overrides) -> LingConfig:
    base = dict(vocab_size=512, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
                num_experts_per_tok=2, num_shared_experts=1, moe_intermediate_size=16,
                first_k_dense_replace=1, rope_theta=10000.0, initializer_range=0.2)
    base.update(overrides)
    return LingConfig(**base)


# fp32 throughout; the cached path differs from the full forward only in the order of float
# additions (SDPA with an explicit mask vs is_causal, split prefill), so 1e-4 covers it.
TOL = dict(atol=1e-4, rtol=1e-4)


@settings(max_examples=6, deadline=None)
@given(st.integers(2, 24), st.data(), st.sampled_from([(4, 2), (4, 4), (2, 1)]), st.booleans())
def test_cached_forward_matches_the_full_forward(length, data, heads, norm_head):
    config = small_config(num_attention_heads=heads[0], num_key_value_heads=heads[1], norm_head=norm_head)
    model = build_model(config, seed=data.draw(st.integers(0, 5))).eval()
    ids = torch.randint(0, 512, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        full = model(ids).logits
    split = data.draw(st.integers(1, length))
    logits_a, cache = extend(model, ids[:, :split])
    pieces = [logits_a]
    for t in range(split, length):  # then one token at a time
        logits_t, cache = extend(model, ids[:, t:t + 1], cache)
        pieces.append(logits_t)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, **TOL)
    assert cache[0][0].shape == (2, heads[1], length, 8)


def test_context_sharing_on_a_ling_model_matches_packed_rows():
    model = ling_eval_model(build_model(small_config(), seed=1))
    gen = torch.Generator().manual_seed(0)
    requests = [Request(tuple(torch.randint(4, 512, (n,), generator=gen).tolist()),
                        tuple(torch.randint(4, 512, (m,), generator=gen).tolist()))
                for n, m in [(5, 3), (9, 1), (2, 6)] for _ in range(3)]
    shared = loglikelihood(model, requests, batch_size=9, share_context=True)  # mixed lengths in one batch
    packed = loglikelihood(model, requests, batch_size=4, share_context=False)
    for a, b in zip(shared, packed):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4) and a.greedy == b.greedy


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """RUN/ with two checkpoints of a small Ling model and the run's tokenizer.model."""
    run = tmp_path_factory.mktemp("run")
    tokenizer = cached_tokenizer(embedded_corpus(), vocab_size=512)
    shutil.copyfile(tokenizer.model_path, run / "tokenizer.model")
    for step, seed in ((2, 0), (4, 1)):
        build_model(small_config(), seed=seed).save_pretrained(run / "checkpoints" / f"step-{step}")
    return run


def test_loader_entry_point_finds_model_and_tokenizer(run_dir):
    checkpoints = expand_checkpoints(run_dir)
    assert [c.name for c in checkpoints] == ["step-2", "step-4"]
    model, tokenizer = load_checkpoint(checkpoints[0])
    assert tokenizer.decode(tokenizer.encode("The capital of France")) == "The capital of France"
    result = evaluate_task(model, tokenizer, load_task(TASKS / "facts_mc.jsonl"), limit=8)
    assert result.num_items == 8 and 0 <= result.score <= 1


@pytest.mark.parametrize("damage, message", [
    (lambda c: shutil.rmtree(c), "does not exist"),
    (lambda c: (c / "config.json").write_text("{not json"), "corrupt config.json"),
    (lambda c: (c / "model.safetensors").write_bytes(b"\0" * 16), "the file is corrupt"),  # checksums.json
    (lambda c: ((c / "checksums.json").unlink(), (c / "model.safetensors").write_bytes(b"\0" * 16)),
     "corrupt or truncated"),  # a checkpoint from before checksums.json
    (lambda c: (c.parent.parent / "tokenizer.model").unlink(), "no tokenizer.model"),
])
def test_damaged_checkpoints_raise_checkpoint_load_error(tmp_path, run_dir, damage, message):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    checkpoint = run / "checkpoints" / "step-2"
    damage(checkpoint)
    with pytest.raises(CheckpointLoadError, match=message):
        load_checkpoint(checkpoint)


def test_unknown_model_type_names_the_registered_loaders(tmp_path, run_dir):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(run_dir / "checkpoints" / "step-2", checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(CheckpointLoadError, match="no loader for model_type 'llama'.*bailing_moe"):
        load_checkpoint(checkpoint)


def score_under(mode: str, monkeypatch, checkpoint, device: str):
    monkeypatch.setenv("LING_KERNELS", mode)
    model, tokenizer = load_checkpoint(checkpoint, device)
    tasks = [load_task(TASKS / "facts_mc.jsonl"), load_task(TASKS / "corpus_ppl.jsonl")]
    return [evaluate_task(model, tokenizer, t, limit=16) for t in tasks]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_reference_and_fast_kernels_agree(monkeypatch, run_dir, device):
    """The Ling report kept cross-cluster deviation under 0.5%: the same checkpoint scored under
    LING_KERNELS=reference and fast must agree to 0.5% relative on bits-per-byte, and on the
    multiple-choice log-likelihoods of every choice to 1e-3 (fp32). (On CPU the fast RMSNorm has
    no kernel, so the two paths coincide; on CUDA the Triton RMSNorm runs.)"""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    checkpoint = run_dir / "checkpoints" / "step-4"
    reference = score_under("reference", monkeypatch, checkpoint, device)
    fast = score_under("fast", monkeypatch, checkpoint, device)
    mc_ref, mc_fast = reference[0].predictions, fast[0].predictions
    for a, b in zip(mc_ref, mc_fast):
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-3)
    bpb_ref, bpb_fast = reference[1].score, fast[1].score
    assert abs(bpb_fast - bpb_ref) / bpb_ref < 0.005
