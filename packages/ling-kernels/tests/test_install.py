"""`pip install packages/ling-kernels` into a fresh venv works on its own: it pulls only torch,
imports, and runs ops forward and backward (no other ling package, no Triton needed on CPU)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PACKAGE = Path(__file__).resolve().parents[1]

SMOKE = """
import importlib.util, torch, ling_kernels
assert importlib.util.find_spec("ling_core") is None, "ling_core must not be installed"
gate = torch.randn(4, 8, requires_grad=True)
up = torch.randn(4, 8, requires_grad=True)
out = ling_kernels.grouped_mm(ling_kernels.swiglu(gate, up), [torch.randn(3, 8)] * 2, [1, 3])
out.sum().backward()
print("ok", tuple(out.shape), tuple(gate.grad.shape))
"""


@pytest.mark.slow
def test_fresh_venv_install_imports_and_runs(tmp_path):
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH (the project is run with `uv run pytest`)")
    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    subprocess.run([uv, "venv", "-q", str(venv), "--python", sys.executable], check=True, timeout=120)
    # Pin torch to the version under test so uv's cache serves the wheels (no multi-GB download).
    torch_version = torch.__version__.split("+")[0]
    install = subprocess.run(
        [uv, "pip", "install", "-q", "--python", str(python), str(PACKAGE), f"torch=={torch_version}"],
        capture_output=True, text=True, timeout=600,
    )
    assert install.returncode == 0, install.stderr
    result = subprocess.run([str(python), "-c", SMOKE], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == "ok (4, 3) (4, 8)", result.stdout
