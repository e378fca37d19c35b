"""``precision: fp32 | bf16 | auto`` (must_ray/models/precision.py): what auto means per device, the
autocast it gives, and floating outputs back in fp32 for post-processing and losses."""
import pytest
import torch

from must_ray.models.precision import autocast, cpu_bf16_flags, resolve_precision, to_float32


def test_auto_is_bf16_on_gpu_and_on_cpus_with_native_bf16_only():
    assert resolve_precision("auto", "cuda") == "bf16"
    assert resolve_precision("auto", "cpu") == ("bf16" if cpu_bf16_flags() else "fp32")
    assert resolve_precision("fp32", "cuda") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16", "cpu")


def test_bf16_autocast_runs_convolutions_in_bf16_and_outputs_come_back_in_fp32():
    conv = torch.nn.Conv2d(3, 4, 3)
    x = torch.randn(2, 3, 8, 8)
    with autocast("bf16", "cpu"):
        y = conv(x)
    with autocast("fp32", "cpu"):
        z = conv(x)
    assert y.dtype == torch.bfloat16 and z.dtype == torch.float32
    assert torch.allclose(y.float(), z, atol=0.05, rtol=0.05)
    out = to_float32({"a": y, "b": [y, torch.arange(3)], "c": (y,), "d": "text"})
    assert out["a"].dtype == out["b"][0].dtype == out["c"][0].dtype == torch.float32
    assert out["b"][1].dtype == torch.int64 and out["d"] == "text"
