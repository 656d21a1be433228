"""Choose between an op's reference (plain torch, the specification) and its fast path.

`LING_KERNELS` is read on every call, so a test or a run can switch paths without reimporting:

- `auto` (default): the fast path where one exists for the device/dtype and is measured to be
  faster (or to save memory); otherwise the reference.
- `fast`: the fast path wherever one exists, even where `auto` would not pick it (to exercise
  it); the reference where the op has none for the device/dtype, so a model still runs on
  every device under `fast` (e.g. RMSNorm on CPU, whose only fast path is a CUDA kernel).
- `reference`: always the reference.
"""

from __future__ import annotations

import os

ENV_VAR = "LING_KERNELS"
MODES = ("reference", "fast", "auto")


def kernel_mode() -> str:
    """The path mode requested through `LING_KERNELS` (default `auto`)."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(
            f"environment variable {ENV_VAR}={os.environ[ENV_VAR]!r} is not a kernel mode; "
            f"expected one of {', '.join(MODES)}"
        )
    return value


def use_fast_path(op: str, *, available: bool, preferred: bool = True) -> bool:
    """Whether `op` should run its fast path.

    `available`: a fast path exists (and is correct) for these inputs. `preferred`: `auto`
    should pick it (it was measured to beat the reference there). `op` names the op in the
    error for a bad `LING_KERNELS`.
    """
    try:
        mode = kernel_mode()
    except ValueError as error:
        raise ValueError(f"{op}: {error}") from None
    if mode == "reference":
        return False
    if mode == "fast":
        return available
    return available and preferred
