"""Without a process group (one process, `python train.py`), the wrappers leave the model as it is,
so one script runs under python and under torchrun."""

from __future__ import annotations

import pytest
import torch
from parallel_testing import TinyModel, make_model

from ling_dist import apply_ddp, apply_expert_parallel, apply_fsdp, data_parallel_mesh


def test_wrappers_are_identity_in_one_process() -> None:
    assert not torch.distributed.is_initialized()
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert data_parallel_mesh() is None
    assert apply_expert_parallel(model, data_parallel_mesh()) == []
    assert apply_ddp(model) is model
    assert apply_fsdp(model, data_parallel_mesh(), units=[TinyModel]) is model
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_mesh_larger_than_one_process_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no process group, so only 1 x 1"):
        data_parallel_mesh(replicate=2)
