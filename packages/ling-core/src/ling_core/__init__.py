"""ling-core: the Ling (HF `bailing_moe`) MoE model, its presets, counts and HF-layout weights IO."""

from ling_core.config import PRESETS, ConfigError, LingConfig, preset
from ling_core.counting import count_params, flops_per_token
from ling_core.hf_io import CheckpointError, from_pretrained, load_weights, save_pretrained
from ling_core.model import IGNORE_INDEX, LingForCausalLM, LingOutput, build_model
from ling_core.moe import MoE, Router, Routing

__all__ = [
    "PRESETS", "ConfigError", "LingConfig", "preset", "count_params", "flops_per_token",
    "CheckpointError", "from_pretrained", "load_weights", "save_pretrained", "IGNORE_INDEX",
    "LingForCausalLM", "LingOutput", "build_model", "MoE", "Router", "Routing",
]
