"""ling-dist: The distributed runtime on torch.distributed: DDP/FSDP2/expert parallel and the Local SGD family (DiLoCo, EDiT, A-EDiT) across heterogeneous devices, flash checkpoint, elastic restart.

Not filled yet (issue 5); it exports no API.
"""
