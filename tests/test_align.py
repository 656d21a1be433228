"""Numerical alignment: the per-module comparison finds where two settings part ways."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from ling_core import build_model, preset
from ling_train.align import Setting, SettingError, align, relative_errors
from ling_train.cli import main


class PathDependent(nn.Module):
    """Adds 1e-2 to its output when LING_KERNELS=fast: a stand-in for a fast kernel that drifts."""

    def forward(self, x):
        return x + (1e-2 if os.environ.get("LING_KERNELS") == "fast" else 0.0)


def test_first_module_beyond_tolerance_is_the_one_that_drifts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), PathDependent(), nn.Linear(8, 8), nn.Tanh())
    batch = (torch.randn(4, 8),)
    report = align(model, batch, Setting.parse("cpu:fp32:kernels=reference"), Setting.parse("cpu:fp32:kernels=fast"),
                   lambda m, b: m(*b).square().mean())
    names = [m.name for m in report.modules]
    assert names == ["0", "1", "2", "3", "4"]
    assert report.modules[0].activation == (0.0, 0.0) and report.modules[1].activation == (0.0, 0.0)
    assert report.first_beyond.name == "2"
    assert report.modules[3].activation[0] > 1e-4  # the drift propagates downstream
    # upstream gradients differ too (backward flows through the drifted layers)
    assert report.modules[0].param_grad[0] > 0


def test_identical_settings_agree_exactly_and_bf16_is_flagged_where_it_drifts(tmp_path):
    config = preset("tiny").replace(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_experts=4,
                                    moe_intermediate_size=32)
    model = build_model(config, seed=0)
    ids = torch.randint(256, (2, 17), generator=torch.Generator().manual_seed(0))
    batch = (ids[:, :-1], ids[:, 1:])
    loss = lambda m, b: m(*b).loss  # noqa: E731
    same = align(model, batch, Setting.parse("cpu:fp32"), Setting.parse("cpu:fp32:sdpa=math"), loss)
    assert same.first_beyond is None
    assert max(m.worst() for m in same.modules) < 1e-5
    bf16 = align(model, batch, Setting.parse("cpu:fp32"), Setting.parse("cpu:bf16"), loss, tolerance=1e-3)
    first = bf16.first_beyond
    assert first is not None and first.worst() > 1e-3  # bf16 rounding: 2^-8 relative per op
    assert bf16.modules[0].activation == (0.0, 0.0)  # an embedding lookup does not round under autocast
    assert max(m.activation[0] for m in bf16.modules if m.activation[0] != float("inf")) > 1e-3
    markdown = bf16.to_markdown("align.png")
    assert f"**`{first.name}`**" in markdown and "| 0 | `model.word_embeddings` |" in markdown


def test_relative_errors_are_normwise():
    a = torch.tensor([1.0, -2.0, 0.0])
    assert relative_errors(a, a) == (0.0, 0.0)
    assert relative_errors(a, a + torch.tensor([0.0, 0.0, 0.2])) == pytest.approx((0.2 / 2, 0.2 / 3))
    assert relative_errors(a, torch.zeros(2)) == (float("inf"), float("inf"))


def test_setting_parse():
    assert Setting.parse("cuda:1:bf16:kernels=fast:sdpa=math") == Setting("cuda:1", "bf16", "fast", "math")
    for bad in ("cpu", "cpu:fp8", "tpu:fp32", "cpu:fp32:sdpa=fastest", "cpu:fp32:color=red"):
        with pytest.raises(SettingError):
            Setting.parse(bad)


def test_align_command_writes_markdown_and_png(tmp_path, small_run_toml, capsys):
    out = tmp_path / "align"
    assert main(["align", "--a", "cpu:fp32", "--b", "cpu:bf16", "--config", str(small_run_toml),
                 "--seq-len", "16", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "cpu:bf16 vs cpu:fp32" in printed and "first module beyond" in printed
    assert (out / "align.md").read_text().startswith("# Numerical alignment")
    assert (out / "align.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["align", "--a", "cpu:fp32", "--b", "cpu:fp8", "--out", str(out)]) == 2
    assert "fp8" in capsys.readouterr().err
