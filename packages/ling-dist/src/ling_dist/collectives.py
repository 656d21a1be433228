"""Collectives that also work in a mixed job: some ranks on CUDA, some on CPU, one gloo group.

nccl cannot include a CPU-only rank, so a heterogeneous job (the Ling report moved training
across clusters of different accelerators) runs every rank in one gloo group and keeps its
compute on its own device. gloo's CUDA support is partial (no all_to_all, device-specific
algorithms), so a CUDA tensor is *staged*: copied to host memory, reduced over gloo, copied
back. That costs two PCIe copies per collective, which is why it suits Local SGD (one sync
every H steps) and not per-step DDP over slow links.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def needs_staging(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> bool:
    """True when `tensor` is not on the CPU but the group's backend is gloo."""
    return tensor.device.type != "cpu" and dist.get_backend(group) == "gloo"


def all_reduce(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
               group: dist.ProcessGroup | None = None, *, stage: bool | None = None) -> torch.Tensor:
    """In-place all-reduce of `tensor`, staged through host memory when `stage` (default:
    `needs_staging`). Returns `tensor`. gloo has no AVG: use SUM and divide."""
    if stage is None:
        stage = needs_staging(tensor, group)
    if not stage:
        dist.all_reduce(tensor, op=op, group=group)
        return tensor
    host = tensor.detach().to("cpu", copy=True)
    dist.all_reduce(host, op=op, group=group)
    with torch.no_grad():
        tensor.copy_(host)
    return tensor


def all_to_all_single(output: torch.Tensor, input: torch.Tensor, output_split_sizes: list[int] | None,
                      input_split_sizes: list[int] | None, group: dist.ProcessGroup | None = None, *,
                      stage: bool | None = None) -> torch.Tensor:
    """`dist.all_to_all_single` into `output` (rows split per rank), staged like `all_reduce`."""
    if stage is None:
        stage = needs_staging(input, group)
    if not stage:
        dist.all_to_all_single(output, input.contiguous(), output_split_sizes, input_split_sizes, group=group)
        return output
    host_out = torch.empty(output.shape, dtype=output.dtype, device="cpu")
    dist.all_to_all_single(host_out, input.detach().to("cpu").contiguous(), output_split_sizes,
                           input_split_sizes, group=group)
    with torch.no_grad():
        output.copy_(host_out)
    return output
