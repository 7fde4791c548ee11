"""Choosing the device and the mixed-precision dtype, in one place.

    device = pick_device("auto")          # cuda, then mps, then cpu
    dtype = pick_dtype(device, "auto")    # torch.bfloat16 where supported, else fp16 (GPU) or fp32
"""

from __future__ import annotations

import torch

from tinystories.errors import UserError


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    # first, so that "cuda:x" is one line here rather than a RuntimeError from torch.device on a GPU machine
    if name not in ("cpu", "mps", "cuda") and not (name.startswith("cuda:") and name[5:].isascii() and name[5:].isdigit()):
        raise UserError(f"unknown device {name!r}; use auto, cuda, cuda:N, mps or cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps was asked for but Apple MPS is not available; use --device cpu or auto")
    return torch.device(name)


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX-512 BF16 or AMX), where bf16 pays."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def pick_dtype(device: torch.device, name: str = "auto") -> torch.dtype:
    """The autocast dtype: bf16 where the hardware has it, fp16 on older GPUs, fp32 otherwise."""
    if name == "fp32":
        return torch.float32
    if name == "bf16":
        return torch.bfloat16
    if name == "fp16":
        if device.type == "cpu":
            raise UserError("fp16 training is for GPUs; use --dtype bf16 or fp32 on CPU")
        return torch.float16
    if name != "auto":
        raise UserError(f"unknown dtype {name!r}; use auto, bf16, fp16 or fp32")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32
