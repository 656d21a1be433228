import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from ling_kernels_testing import assert_close, kernel_mode
from ling_kernels import fused_linear_cross_entropy
from ling_kernels.fused_linear_cross_entropy import default_chunk_size, reference

DTYPES = [torch.float32, torch.bfloat16]


def _inputs(n, h, v, dtype, ignored, seed):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=generator).to(dtype).requires_grad_()
    # Scaled so logits are O(1), as in a trained lm head.
    weight = (torch.randn(v, h, generator=generator) * h**-0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=generator)
    if ignored == "all":
        labels[:] = -100
    elif ignored == "some":
        labels[torch.rand(n, generator=generator) < 0.4] = -100
    return hidden, weight, labels


def _loss_and_grads(fn, hidden, weight, labels, upstream, **kwargs):
    hidden.grad = weight.grad = None
    loss, z_loss = fn(hidden, weight, labels, **kwargs)
    # A non-unit upstream gradient checks that backward scales the stashed gradients.
    (loss * upstream).backward()
    return loss.detach(), z_loss, hidden.grad, weight.grad


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 40),
    h=st.integers(1, 24),
    v=st.integers(1, 70),
    chunk_size=st.integers(1, 48),
    dtype=st.sampled_from(DTYPES),
    ignored=st.sampled_from(["none", "some", "all"]),
    z_loss_weight=st.sampled_from([0.0, 1e-2, 0.5]),
    upstream=st.sampled_from([1.0, 1.7]),
    seed=st.integers(0, 2**16),
)
def test_fast_matches_reference(n, h, v, chunk_size, dtype, ignored, z_loss_weight, upstream, seed):
    hidden, weight, labels = _inputs(n, h, v, dtype, ignored, seed)
    with kernel_mode("fast"):
        fast = _loss_and_grads(
            fused_linear_cross_entropy, hidden, weight, labels, upstream,
            z_loss_weight=z_loss_weight, chunk_size=chunk_size,
        )
    expected = _loss_and_grads(
        reference, hidden, weight, labels, upstream, z_loss_weight=z_loss_weight
    )
    for got, want in zip(fast, expected):
        assert got.dtype == want.dtype
        assert_close(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_ignored_gives_zero_loss_and_zero_grads(dtype):
    hidden, weight, labels = _inputs(5, 8, 11, dtype, "all", seed=0)
    with kernel_mode("fast"):
        loss, z_loss, grad_hidden, grad_weight = _loss_and_grads(
            fused_linear_cross_entropy, hidden, weight, labels, 1.0, z_loss_weight=0.1
        )
    assert loss.item() == 0.0 and z_loss.item() == 0.0
    assert torch.equal(grad_hidden, torch.zeros_like(hidden))
    assert torch.equal(grad_weight, torch.zeros_like(weight))


def test_loss_is_mean_cross_entropy_plus_weighted_z_loss():
    hidden, weight, labels = _inputs(9, 6, 13, torch.float32, "some", seed=1)
    logits = (hidden @ weight.T).detach()
    valid = labels != -100
    ce = torch.nn.functional.cross_entropy(logits[valid], labels[valid])
    z = torch.logsumexp(logits[valid], -1).square().mean()
    loss, z_loss = fused_linear_cross_entropy(hidden, weight, labels, z_loss_weight=0.3)
    assert_close(z_loss, z, torch.float32)
    assert_close(loss.detach(), ce + 0.3 * z, torch.float32)
    assert not z_loss.requires_grad


def test_leading_batch_dims_and_frozen_weight():
    hidden, weight, labels = _inputs(12, 5, 7, torch.float32, "some", seed=2)
    weight = weight.detach()
    loss, _ = fused_linear_cross_entropy(hidden.view(3, 4, 5), weight, labels.view(3, 4))
    loss.backward()
    assert weight.grad is None and hidden.grad.shape == (12, 5)
    assert_close(loss.detach(), reference(hidden, weight, labels)[0].detach(), torch.float32)


def test_bad_shapes_and_chunk_size_raise():
    hidden, weight, labels = _inputs(4, 5, 7, torch.float32, "none", seed=3)
    with pytest.raises(ValueError, match="share H"):
        fused_linear_cross_entropy(hidden, weight[:, :4], labels)
    with pytest.raises(ValueError, match="labels must have"):
        fused_linear_cross_entropy(hidden, weight, labels[:3])
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_cross_entropy(hidden, weight, labels, chunk_size=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_and_fast_modes_give_the_same_loss(dtype):
    hidden, weight, labels = _inputs(33, 16, 50, dtype, "some", seed=4)
    losses = {}
    for mode in ("reference", "fast", "auto"):
        with kernel_mode(mode):
            losses[mode] = fused_linear_cross_entropy(hidden, weight, labels, z_loss_weight=1e-3)
    for mode in ("fast", "auto"):
        for got, want in zip(losses[mode], losses["reference"]):
            assert_close(got.detach(), want.detach(), dtype)


def test_invalid_mode_raises_from_the_op():
    hidden, weight, labels = _inputs(2, 3, 4, torch.float32, "none", seed=5)
    with kernel_mode("fastest"), pytest.raises(ValueError, match="LING_KERNELS"):
        fused_linear_cross_entropy(hidden, weight, labels)


class _LargestTensor(TorchDispatchMode):
    """Records the largest numel of any tensor an op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.largest_shape = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.numel() > self.largest:
                self.largest, self.largest_shape = tensor.numel(), tuple(tensor.shape)
        return out


@pytest.mark.parametrize("path", ["fused", "reference"])
def test_fused_never_materialises_full_logits(path):
    """Every tensor created during forward+backward is watched; the fused path's largest is a
    [chunk, V] logits block or a [V, H] weight gradient, never [N, V]. The reference run
    proves the check can fail."""
    n, h, v, chunk = 256, 16, 512, 32
    hidden, weight, labels = _inputs(n, h, v, torch.float32, "some", seed=6)
    watch = _LargestTensor()
    with watch:
        if path == "fused":
            with kernel_mode("fast"):
                loss, _ = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=chunk)
        else:
            loss, _ = reference(hidden, weight, labels)
        (loss * 2.0).backward()
    if path == "fused":
        assert watch.largest <= max(chunk * v, v * h, n * h), watch.largest_shape
    else:
        assert watch.largest >= n * v, watch.largest_shape


def test_default_chunk_keeps_logits_block_near_hidden_size():
    assert default_chunk_size(4096, 1024, 32768) == 256  # Liger's 128, raised to MIN_CHUNK_TOKENS
    assert default_chunk_size(2048, 256, 8192) == 256  # the tiny preset's loss: Liger's rule gives 64
    assert default_chunk_size(100, 256, 8192) == 128  # fewer tokens than the minimum: one chunk
    assert default_chunk_size(1 << 20, 256, 8192) == 1 << 15  # Liger's rule above the minimum
    assert default_chunk_size(1, 8, 100000) == 1
    assert default_chunk_size(10, 4096, 1000) == 16  # one chunk covers every token
