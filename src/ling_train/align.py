"""Numerical alignment: run one model, with the same weights and batch, under two settings (device,
dtype, kernel path, attention backend) and compare every module's activations and gradients.

Generic over `nn.Module`: forward hooks record each module's output and, through a tensor hook,
the gradient flowing into that output; parameter gradients are compared per owning module.
Errors are normwise, relative to setting A (the reference):
    max_rel  = max|a - b| / max|a|       mean_rel = mean|a - b| / mean|a|
(elementwise ratios explode where a value crosses zero). Flagged: the first module in forward
order whose activation is beyond the tolerance, or, when every activation agrees, the first in
backward order whose gradients are (a backward-only difference): where the settings part ways.

A setting is `DEVICE:DTYPE[:kernels=reference|fast|auto][:sdpa=math|flash|efficient|cudnn]`, e.g.
`cpu:fp32`, `cuda:bf16:kernels=fast`, `cpu:fp32:sdpa=math`. A dtype other than fp32 runs the
forward under autocast, as `ling-train` trains.
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SDPA_BACKENDS = ("math", "flash", "efficient", "cudnn")
KERNEL_MODES = ("reference", "fast", "auto")


class SettingError(ValueError):
    """A setting string that does not parse (the message says what was expected)."""


@dataclass(frozen=True)
class Setting:
    device: str
    dtype: str = "fp32"
    kernels: str | None = None  # LING_KERNELS for the run; None: leave the environment as it is
    sdpa: str | None = None  # force one scaled_dot_product_attention backend

    @classmethod
    def parse(cls, text: str) -> "Setting":
        parts = text.split(":")
        if len(parts) < 2:
            raise SettingError(f"{text!r}: expected DEVICE:DTYPE[:kernels=...][:sdpa=...], e.g. cpu:fp32")
        if parts[1].isdigit() and len(parts) > 2:  # cuda:0:bf16
            parts = [f"{parts[0]}:{parts[1]}", *parts[2:]]
        device, dtype, options = parts[0], parts[1], parts[2:]
        try:
            torch.device(device)
        except RuntimeError:
            raise SettingError(f"{text!r}: unknown device {device!r}; expected cpu, cuda or cuda:N") from None
        if dtype not in DTYPES:
            raise SettingError(f"{text!r}: unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
        values: dict[str, str] = {}
        for option in options:
            key, _, value = option.partition("=")
            allowed = {"kernels": KERNEL_MODES, "sdpa": SDPA_BACKENDS}.get(key)
            if allowed is None or value not in allowed:
                raise SettingError(f"{text!r}: bad option {option!r}; expected kernels=({'|'.join(KERNEL_MODES)}) "
                                   f"or sdpa=({'|'.join(SDPA_BACKENDS)})")
            values[key] = value
        return cls(device, dtype, **values)

    def __str__(self) -> str:
        extra = "".join(f":{k}={v}" for k, v in (("kernels", self.kernels), ("sdpa", self.sdpa)) if v)
        return f"{self.device}:{self.dtype}{extra}"

    @contextlib.contextmanager
    def active(self):
        """Environment for one run: LING_KERNELS, the SDPA backend and autocast."""
        with contextlib.ExitStack() as stack:
            if self.kernels is not None:
                previous = os.environ.get("LING_KERNELS")
                os.environ["LING_KERNELS"] = self.kernels
                stack.callback(_restore_env, "LING_KERNELS", previous)
            if self.sdpa is not None:
                from torch.nn.attention import SDPBackend, sdpa_kernel
                backend = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
                           "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
                stack.enter_context(sdpa_kernel(backend[self.sdpa]))
            if self.dtype != "fp32":
                stack.enter_context(torch.autocast(torch.device(self.device).type, dtype=DTYPES[self.dtype]))
            yield


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


@dataclass
class Capture:
    """One run's per-module tensors (float32, on CPU), in forward order."""
    order: list[str] = field(default_factory=list)
    activations: dict[str, torch.Tensor] = field(default_factory=dict)
    output_grads: dict[str, torch.Tensor] = field(default_factory=dict)
    param_grads: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    loss: float = float("nan")


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None  # dataclass outputs (a router's Routing, the model's LingOutput) are not compared


def capture(model: nn.Module, batch: tuple[torch.Tensor, ...], setting: Setting,
            loss_fn: Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor]) -> Capture:
    """Run `loss_fn(copy of model on setting.device, batch on that device)` forward and backward
    under `setting`, recording every module's output, output gradient and parameter gradients."""
    device = torch.device(setting.device)
    model = copy.deepcopy(model).to(device)
    model.zero_grad(set_to_none=True)
    result = Capture()
    handles = []

    def hook(name: str):
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            tensor = _first_tensor(output)
            if tensor is None or not tensor.is_floating_point():
                return
            if name not in result.activations:
                result.order.append(name)
            result.activations[name] = tensor.detach().float().cpu()
            if tensor.requires_grad:
                tensor.register_hook(lambda grad: result.output_grads.__setitem__(name, grad.detach().float().cpu()))
        return record

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(hook(name)))
    try:
        with setting.active():
            loss = loss_fn(model, tuple(t.to(device) for t in batch))
        loss.float().backward()
    finally:
        for handle in handles:
            handle.remove()
    result.loss = float(loss.detach())
    for name, module in model.named_modules():
        grads = [p.grad.detach().float().cpu() for p in module.parameters(recurse=False) if p.grad is not None]
        if name and grads:
            result.param_grads[name] = grads
    return result


def relative_errors(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max_rel, mean_rel) of b against the reference a (normwise, see the module docstring)."""
    if a.shape != b.shape:
        return float("inf"), float("inf")
    diff = (a - b).abs()
    ref = a.abs()
    tiny = torch.finfo(torch.float32).tiny
    return (float(diff.max() / ref.max().clamp_min(tiny)) if a.numel() else 0.0,
            float(diff.mean() / ref.mean().clamp_min(tiny)) if a.numel() else 0.0)


@dataclass
class ModuleError:
    name: str
    activation: tuple[float, float]  # (max_rel, mean_rel)
    output_grad: tuple[float, float] | None
    param_grad: tuple[float, float] | None  # over the module's own parameters, concatenated

    def worst(self) -> float:
        return max(e[0] for e in (self.activation, self.output_grad, self.param_grad) if e is not None)


@dataclass
class AlignmentReport:
    a: Setting
    b: Setting
    tolerance: float
    loss_a: float
    loss_b: float
    modules: list[ModuleError]

    @property
    def first_beyond(self) -> ModuleError | None:
        """Where the settings part ways: the first module in forward order whose activation is
        beyond tolerance (every gradient then differs too, downstream of the loss); if all
        activations agree, the first module in backward order whose gradients are beyond it."""
        forward = next((m for m in self.modules if m.activation[0] > self.tolerance), None)
        if forward is not None:
            return forward
        return next((m for m in reversed(self.modules) if m.worst() > self.tolerance), None)

    def to_markdown(self, plot_name: str | None = None) -> str:
        first = self.first_beyond
        lines = [f"# Numerical alignment: `{self.a}` (reference) vs `{self.b}`", "",
                 f"- loss: {self.loss_a:.6f} vs {self.loss_b:.6f} "
                 f"(relative difference {abs(self.loss_a - self.loss_b) / max(abs(self.loss_a), 1e-30):.2e})",
                 f"- tolerance (max relative error): {self.tolerance:g}",
                 "- first module beyond tolerance: " + (f"**`{first.name}`** ({first.worst():.2e})" if first
                                                         else "none"), ""]
        if plot_name:
            lines += [f"![per-module relative error]({plot_name})", ""]
        lines += ["Errors are max|a-b|/max|a| and mean|a-b|/mean|a| against the reference, per module in "
                  "forward order. 'shape differs': the module saw a different number of rows (an MoE "
                  "expert after a routing decision flipped).", "",
                  "| # | module | act max | act mean | out-grad max | out-grad mean | param-grad max | param-grad mean | |",
                  "|---|---|---|---|---|---|---|---|---|"]
        def fmt(error: tuple[float, float] | None, i: int) -> str:
            if error is None:
                return "-"
            return "shape differs" if error[i] == float("inf") else f"{error[i]:.2e}"

        for i, m in enumerate(self.modules):
            flag = "beyond" if m.worst() > self.tolerance else ""
            if first is not None and m is first:
                flag = "**first beyond**"
            lines.append(f"| {i} | `{m.name}` | {fmt(m.activation, 0)} | {fmt(m.activation, 1)} | "
                         f"{fmt(m.output_grad, 0)} | {fmt(m.output_grad, 1)} | {fmt(m.param_grad, 0)} | "
                         f"{fmt(m.param_grad, 1)} | {flag} |")
        return "\n".join(lines) + "\n"

    def plot(self, path: Path) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        x = range(len(self.modules))
        floor = 1e-10  # log axis: exact agreement is drawn at the floor
        series = {"activation": [m.activation[0] for m in self.modules],
                  "output grad": [m.output_grad[0] if m.output_grad else float("nan") for m in self.modules],
                  "param grad": [m.param_grad[0] if m.param_grad else float("nan") for m in self.modules]}
        fig, ax = plt.subplots(figsize=(max(8, len(self.modules) * 0.12), 4.5))
        for label, values in series.items():
            ax.plot(x, [max(v, floor) for v in values], marker=".", linewidth=1, label=label)
        ax.axhline(self.tolerance, color="red", linestyle="--", linewidth=1, label=f"tolerance {self.tolerance:g}")
        first = self.first_beyond
        if first is not None:
            ax.axvline(self.modules.index(first), color="red", alpha=0.3, label=f"first beyond: {first.name}")
        ax.set_yscale("log")
        ax.set_xlabel("module (forward order)")
        ax.set_ylabel("max relative error")
        ax.set_title(f"{self.b} vs {self.a}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp, dpi=120)
        plt.close(fig)
        tmp.replace(path)


def default_tolerance(a: Setting, b: Setting) -> float:
    """bf16 keeps 8 mantissa bits (4e-3 relative rounding per op); activations of the tiny model
    stay within ~6e-3 of fp32 but gradients, rounded through every op of the backward, reach
    ~0.1 max-relative (measured: `ling-train align --a cpu:fp32 --b cpu:bf16`), so 0.2 flags
    what rounding alone does not explain (a flipped routing decision). fp16: 3 more bits. fp32
    against fp32 with other kernels differs by summation order, ~1e-6 per op."""
    dtypes = {a.dtype, b.dtype}
    if "bf16" in dtypes:
        return 2e-1
    if "fp16" in dtypes:
        return 5e-2
    return 1e-4


def align(model: nn.Module, batch: tuple[torch.Tensor, ...], a: Setting, b: Setting,
          loss_fn: Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor],
          tolerance: float | None = None) -> AlignmentReport:
    """Compare `model` on `batch` under settings `a` (reference) and `b`, module by module."""
    cap_a = capture(model, batch, a, loss_fn)
    cap_b = capture(model, batch, b, loss_fn)
    rows = []
    for name in cap_a.order:
        if name not in cap_b.activations:
            continue
        grads = None
        if name in cap_a.output_grads and name in cap_b.output_grads:
            grads = relative_errors(cap_a.output_grads[name], cap_b.output_grads[name])
        params = None
        if name in cap_a.param_grads and name in cap_b.param_grads:
            params = relative_errors(torch.cat([g.flatten() for g in cap_a.param_grads[name]]),
                                     torch.cat([g.flatten() for g in cap_b.param_grads[name]]))
        rows.append(ModuleError(name, relative_errors(cap_a.activations[name], cap_b.activations[name]), grads, params))
    tol = default_tolerance(a, b) if tolerance is None else tolerance
    return AlignmentReport(a, b, tol, cap_a.loss, cap_b.loss, rows)
