import pytest


@pytest.fixture
def small_run_toml(tmp_path):
    """A run config small enough for a test to train in seconds on CPU."""
    path = tmp_path / "small.toml"
    path.write_text(
        'steps = 8\nseq_len = 32\nbatch_size = 4\nwarmup_steps = 2\ncheckpoint_every = 4\n'
        'lr = 0.003\n\n[model]\nvocab_size = 512\nhidden_size = 64\nintermediate_size = 128\n'
        'num_hidden_layers = 2\nnum_attention_heads = 2\nnum_key_value_heads = 1\nhead_dim = 32\n'
        'num_experts = 4\nmoe_intermediate_size = 32\n'
    )
    return path
