import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ling_kernels_testing import assert_close, kernel_mode, run_under_triton_interpreter
from ling_kernels import rms_norm
from ling_kernels.rms_norm import reference

DTYPES = [torch.float32, torch.bfloat16]
TESTS = Path(__file__).resolve().parent


def _inputs(shape, dtype, seed, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=generator) * 3).to(device, dtype).requires_grad_()
    weight = torch.randn(shape[-1], generator=generator).to(device, dtype).requires_grad_()
    grad_y = torch.randn(shape, generator=generator).to(device, dtype)
    return x, weight, grad_y


def _value_and_grads(fn, x, weight, grad_y, eps):
    x.grad = weight.grad = None
    y = fn(x, weight, eps)
    y.backward(grad_y)
    return y.detach(), x.grad, weight.grad


shapes = st.tuples(
    st.lists(st.integers(1, 5), min_size=0, max_size=2), st.integers(1, 70)
).map(lambda parts: (*parts[0], parts[1]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_runs_the_reference_in_every_mode(dtype):
    """CPU has no RMSNorm fast path (F.rms_norm measured no faster), so `fast` falls back."""
    x, weight, grad_y = _inputs((3, 2, 37), dtype, seed=0)
    expected = _value_and_grads(reference, x, weight, grad_y, 1e-6)
    for mode in ("reference", "fast", "auto"):
        with kernel_mode(mode):
            got = _value_and_grads(rms_norm, x, weight, grad_y, 1e-6)
        for a, b in zip(got, expected):
            assert torch.equal(a, b)


def test_reference_is_rms_normalisation():
    x = torch.tensor([[3.0, 4.0]])
    y = reference(x, torch.tensor([1.0, 2.0]), eps=0.0)
    rms = (12.5) ** 0.5
    torch.testing.assert_close(y, torch.tensor([[3.0 / rms, 8.0 / rms]]))


def test_weight_shape_is_checked():
    with pytest.raises(ValueError, match=r"weight must have shape \[H\]"):
        rms_norm(torch.ones(2, 3), torch.ones(4))


def test_triton_kernel_under_interpreter_on_cpu():
    """The Triton forward and backward kernels against the reference on hypothesis-drawn
    shapes and dtypes, run by Triton's interpreter on CPU tensors.

    A subprocess, because TRITON_INTERPRET must be set before the kernels are decorated, and
    this process may already have imported them without it."""
    run_under_triton_interpreter("triton_interpret_rms_norm.py")


@pytest.mark.gpu
@settings(max_examples=30, deadline=None)
@given(shape=shapes, dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_triton_on_cuda_matches_reference(shape, dtype, seed):
    x, weight, grad_y = _inputs(shape, dtype, seed, device="cuda")
    with kernel_mode("fast"):
        fast = _value_and_grads(rms_norm, x, weight, grad_y, 1e-6)
    expected = _value_and_grads(reference, x, weight, grad_y, 1e-6)
    for got, want in zip(fast, expected):
        assert_close(got, want, dtype)


def test_package_imports_and_runs_without_triton():
    """Triton is optional: with it unimportable, the package imports and both ops run on CPU."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, ling_kernels\n"
        "x = torch.randn(3, 8, requires_grad=True); w = torch.ones(8)\n"
        "ling_kernels.rms_norm(x, w).sum().backward()\n"
        "labels = torch.tensor([0, 1, -100])\n"
        "loss, _ = ling_kernels.fused_linear_cross_entropy(x, torch.randn(5, 8), labels)\n"
        "loss.backward()\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
