"""Numerical precision of the models' forward passes: ``fp32`` or ``bf16`` autocast, and what
``auto`` means on a device.

``label.precision`` (teacher inference) and ``student.precision`` / ``teacher.precision`` (training)
take ``fp32 | bf16 | auto``. ``auto`` is bf16 on a GPU and on a CPU with native bf16 units
(AVX512-BF16 or AMX-BF16), fp32 on any other CPU: there oneDNN emulates bf16 with fp32 FMAs plus
conversions, which is slower (0.4x fp32 on a Xeon without them; ``jobs/benchmark.py precision``
measures both, and how far bf16 labels are from fp32 labels in each task's own metric;
``docs/benchmarks.md``). Autocast keeps the weights, the optimiser and the losses' reductions in
fp32, so bf16 needs no loss scaling.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, ContextManager

import torch

PRECISIONS = ("auto", "fp32", "bf16")

#: /proc/cpuinfo flags of native bf16 arithmetic (dot products, not just conversions)
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_bf16_flags() -> tuple[str, ...]:
    """The CPU's native bf16 features (a subset of :data:`NATIVE_BF16_FLAGS`), as the kernel
    reports them; empty where there are none or the flags cannot be read (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    found = tuple(flag for flag in NATIVE_BF16_FLAGS if flag in flags)
    if not found and getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        found = ("avx512_bf16",)
    return found


def resolve_precision(setting: str, device: torch.device | str) -> str:
    """``fp32`` or ``bf16``: what ``setting`` (``auto | fp32 | bf16``) means on ``device``."""
    if setting not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {setting!r}")
    if setting != "auto":
        return setting
    return "bf16" if torch.device(device).type == "cuda" or cpu_bf16_flags() else "fp32"


def autocast(precision: str, device: torch.device | str) -> ContextManager[Any]:
    """The autocast context of a resolved ``precision`` on ``device`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def to_float32(outputs: Any) -> Any:
    """``outputs`` (a tensor, or dicts / lists / tuples of them) with every floating tensor in
    fp32: what post-processing written for fp32 (NMS, thresholds, arg-max ties) gets after a bf16
    forward."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, dict):
        return {k: to_float32(v) for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(to_float32(v) for v in outputs)
    return outputs


__all__ = ["PRECISIONS", "NATIVE_BF16_FLAGS", "cpu_bf16_flags", "resolve_precision", "autocast", "to_float32"]
