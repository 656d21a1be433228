"""`LingConfig`: the model's hyperparameters, named exactly as Hugging Face Ling v1 `config.json`.

Keeping HF's key names means a checkpoint directory written by us loads in the HF ecosystem
(`model_type: bailing_moe`) and one written there loads here, with no translation table.
Fields after the HF block are Ling training options (auxiliary-loss weights, routing warmup);
HF configs accept extra keys, so they round-trip through `config.json` too.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_TYPE = "bailing_moe"
ARCHITECTURES = ["BailingMoeForCausalLM"]


class ConfigError(ValueError):
    """A config file or dict does not describe a valid Ling model."""


@dataclass
class LingConfig:
    # --- Hugging Face Ling v1 (bailing_moe) keys ---
    vocab_size: int = 126464
    hidden_size: int = 2048
    intermediate_size: int = 5632  # dense MLP of the first `first_k_dense_replace` layers
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    num_experts: int = 64
    num_experts_per_tok: int = 6
    num_shared_experts: int = 2
    moe_intermediate_size: int = 1408
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = True
    norm_head: bool = False  # the HF reference's default: a config.json without the key has no NormHead
    rope_theta: float = 600000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 16384
    initializer_range: float = 0.006
    tie_word_embeddings: bool = False
    use_bias: bool = False
    use_qkv_bias: bool = False
    hidden_act: str = "silu"
    pad_token_id: int = 126081
    eos_token_id: int = 126081
    # --- Ling training options (not read by HF) ---
    balance_loss_weight: float = 0.015
    router_z_loss_weight: float = 1e-4
    routing_warmup_steps: int = 0  # Stochastic Routing Warmup length W; 0 disables it
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # unknown HF keys, kept verbatim

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, what: str) -> None:
            if not cond:
                raise ConfigError(f"LingConfig: {what}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim"):
            need(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
             f"num_key_value_heads ({self.num_key_value_heads})")
        need(self.head_dim % 2 == 0, f"head_dim must be even for RoPE, got {self.head_dim}")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers,
             f"first_k_dense_replace must be in [0, num_hidden_layers], got {self.first_k_dense_replace}")
        if self.num_moe_layers:
            need(self.num_experts >= 1, f"num_experts must be >= 1, got {self.num_experts}")
            need(1 <= self.num_experts_per_tok <= self.num_experts,
                 f"num_experts_per_tok must be in [1, num_experts={self.num_experts}], "
                 f"got {self.num_experts_per_tok}")
            need(self.moe_intermediate_size > 0, "moe_intermediate_size must be > 0")
        if self.first_k_dense_replace:
            need(self.intermediate_size > 0, "intermediate_size must be > 0 when there are dense layers")
        need(self.hidden_act == "silu", f"hidden_act must be 'silu' (SwiGLU), got {self.hidden_act!r}")
        need(self.routing_warmup_steps >= 0, "routing_warmup_steps must be >= 0")

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace

    # --- HF config.json ---
    def to_hf(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d.update(self.extra)
        d["model_type"] = MODEL_TYPE
        d["architectures"] = list(ARCHITECTURES)
        return d

    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str = "config") -> "LingConfig":
        d = dict(d)
        model_type = d.pop("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ConfigError(f"{source}: model_type is {model_type!r}, expected {MODEL_TYPE!r}")
        d.pop("architectures", None)
        d.pop("torch_dtype", None)  # describes the stored tensors, not the model; written on save
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in known}
        extra = {k: v for k, v in d.items() if k not in known}
        try:
            return cls(**kwargs, extra=extra)
        except (TypeError, ConfigError) as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> "LingConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: not found (expected an HF config.json)") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_hf(d, source=str(path))

    def replace(self, **changes: Any) -> "LingConfig":
        changes.setdefault("extra", dict(self.extra))
        return dataclasses.replace(self, **changes)


# Presets. `tiny` is sized to train on a laptop CPU in minutes while exercising every MoE path
# (a dense first layer, routed experts with top-2, a shared expert). `lite` and `plus` are the
# Ling report's Ling-Lite and Ling-Plus, NormHead on as in the reference. `tiny` leaves NormHead
# off: with each hidden column of lm_head at unit norm over the vocabulary, a logit can reach
# only about hidden / sqrt(vocab) times the final norm's weight (2.8 for tiny, 5.8 for Lite,
# 15 for Plus), too little for the tiny model to learn to copy from its context
# (`scripts/copy_probe.py`; the numbers are in the root README, "Measured").
PRESETS: dict[str, LingConfig] = {
    "tiny": LingConfig(
        vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        num_experts=16, num_experts_per_tok=2, num_shared_experts=1, moe_intermediate_size=256,
        first_k_dense_replace=1, rope_theta=10000.0, max_position_embeddings=2048,
        initializer_range=0.02, pad_token_id=0, eos_token_id=3, norm_head=False,
    ),
    "lite": LingConfig(
        vocab_size=126464, hidden_size=2048, intermediate_size=5632, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=4, head_dim=128,
        num_experts=64, num_experts_per_tok=6, num_shared_experts=2, moe_intermediate_size=1408,
        first_k_dense_replace=0, norm_head=True,
    ),
    "plus": LingConfig(
        vocab_size=126464, hidden_size=5376, intermediate_size=14336, num_hidden_layers=88,
        num_attention_heads=42, num_key_value_heads=6, head_dim=128,
        num_experts=64, num_experts_per_tok=4, num_shared_experts=1, moe_intermediate_size=3072,
        first_k_dense_replace=0, norm_head=True,
    ),
}


def preset(name: str) -> LingConfig:
    """A fresh copy of a preset (callers may mutate it)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown size {name!r}; expected one of {', '.join(PRESETS)}")
    return PRESETS[name].replace()
