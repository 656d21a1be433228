"""HF-layout save/load: identity, sharding, and specific errors for bad checkpoints."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from ling_core import CheckpointError, LingConfig, LingForCausalLM, build_model, from_pretrained, save_pretrained
from ling_core.config import ConfigError, preset


def cfg(**kw):
    base = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=3,
                num_experts_per_tok=2, num_shared_experts=1, moe_intermediate_size=8,
                first_k_dense_replace=1)
    base.update(kw)
    return LingConfig(**base)


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 1000), shard_bytes=st.sampled_from([512, 4096, 10**9]),
       dense=st.integers(0, 2), shared=st.integers(0, 2))
def test_save_then_load_is_identity(tmp_path_factory, seed, shard_bytes, dense, shared):
    model = build_model(cfg(first_k_dense_replace=dense, num_shared_experts=shared), seed=seed)
    path = tmp_path_factory.mktemp("ckpt") / "model"
    save_pretrained(model, path, max_shard_bytes=shard_bytes)
    loaded = from_pretrained(path)
    assert loaded.config == model.config
    assert same_weights(model, loaded)
    ids = torch.randint(0, 64, (1, 5))
    torch.testing.assert_close(model(ids).logits, loaded(ids).logits, rtol=0, atol=0)
    files = sorted(p.name for p in path.iterdir())
    if shard_bytes == 10**9:
        assert files == ["checksums.json", "config.json", "model.safetensors"]
    else:
        assert "model.safetensors.index.json" in files and len(files) > 3
        assert not any(p.name.startswith(".") for p in path.parent.iterdir())


def test_config_json_is_hf(tmp_path):
    model = build_model(cfg())
    save_pretrained(model, tmp_path / "m")
    hf = json.loads((tmp_path / "m" / "config.json").read_text())
    assert hf["model_type"] == "bailing_moe"
    assert hf["architectures"] == ["BailingMoeForCausalLM"]
    assert hf["num_experts_per_tok"] == 2 and hf["torch_dtype"] == "float32"
    assert LingConfig.from_hf(hf) == model.config


def test_unknown_hf_keys_round_trip():
    hf = preset("lite").to_hf() | {"use_cache": True, "rope_scaling": None}
    c = LingConfig.from_hf(hf)
    assert c.extra == {"use_cache": True, "rope_scaling": None}
    assert LingConfig.from_hf(c.to_hf()) == c
    with pytest.raises(ConfigError, match="model_type"):
        LingConfig.from_hf(hf | {"model_type": "llama"})


def test_refuses_to_overwrite(tmp_path):
    model = build_model(cfg())
    save_pretrained(model, tmp_path / "m")
    with pytest.raises(FileExistsError):
        save_pretrained(model, tmp_path / "m")
    save_pretrained(build_model(cfg(), seed=3), tmp_path / "m", overwrite=True)
    assert same_weights(from_pretrained(tmp_path / "m"), build_model(cfg(), seed=3))


@pytest.fixture
def saved(tmp_path):
    model = build_model(cfg())
    path = tmp_path / "m"
    save_pretrained(model, path)
    (path / "checksums.json").unlink()  # the structural checks below, which a checksum would pre-empt
    return path


def test_missing_tensor_is_named(saved):
    tensors = load_file(saved / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.2.up_proj.weight"]
    save_file(tensors, saved / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.layers.1.mlp.experts.2.up_proj.weight'.*\[8, 16\]"):
        from_pretrained(saved)


def test_unexpected_tensor_is_named(saved):
    tensors = load_file(saved / "model.safetensors")
    tensors["model.layers.9.bogus"] = torch.zeros(2)
    save_file(tensors, saved / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors: unexpected tensor 'model.layers.9.bogus'"):
        from_pretrained(saved)


def test_misshaped_tensor_names_expected_shape(saved):
    tensors = load_file(saved / "model.safetensors")
    tensors["lm_head.weight"] = torch.zeros(65, 16)
    save_file(tensors, saved / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'lm_head.weight' has shape \[65, 16\], expected \[64, 16\]"):
        from_pretrained(saved)


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.99])
def test_truncated_file_is_reported(saved, cut):
    f = saved / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt or truncated"):
        from_pretrained(saved)


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json: not found"):
        from_pretrained(tmp_path / "empty")


def test_missing_shard_is_named(tmp_path):
    model = build_model(cfg())
    save_pretrained(model, tmp_path / "m", max_shard_bytes=1024)
    shard = sorted((tmp_path / "m").glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}: missing shard"):
        from_pretrained(tmp_path / "m")


def test_lite_builds_on_meta_only():
    with torch.device("meta"):
        model = LingForCausalLM(preset("lite"))
    assert sum(p.numel() for p in model.parameters()) > 16e9


def nan_tensor_bytes(file):
    """Overwrite the first tensor bytes with 0xFF (NaN in fp32), keeping the file structurally valid."""
    data = bytearray(file.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    data[start:start + 256] = b"\xff" * 256
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("shard_bytes", [512, 10**9])
def test_corrupt_tensor_bytes_fail_the_checksum(tmp_path, shard_bytes):
    """A safetensors file that still parses but whose bytes changed is caught by checksums.json."""
    path = save_pretrained(build_model(cfg(), seed=0), tmp_path / "model", max_shard_bytes=shard_bytes)
    shard = sorted(path.glob("*.safetensors"))[-1]
    nan_tensor_bytes(shard)
    with pytest.raises(CheckpointError, match=f"{shard}: sha256 .* checksums.json"):
        from_pretrained(path)


def test_checkpoint_without_checksums_still_loads(tmp_path):
    """Checkpoints written before checksums.json existed stay loadable (nothing to verify)."""
    model = build_model(cfg(), seed=0)
    path = save_pretrained(model, tmp_path / "model")
    (path / "checksums.json").unlink()
    assert same_weights(model, from_pretrained(path))


def test_broken_checksums_file_is_named(tmp_path):
    path = save_pretrained(build_model(cfg(), seed=0), tmp_path / "model")
    (path / "checksums.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="checksums.json"):
        from_pretrained(path)
