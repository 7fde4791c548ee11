"""Choosing the device and the dtype, in one place, with the reason for each choice.

    device = pick_device("auto")                   # cuda, then mps, then cpu
    dtype, why = choose_dtype(device, "auto")      # the autocast dtype for training and evaluation
    print(describe(device, dtype, why))            # "cuda:0 (Tesla T4, compute capability 7.5), float16: ..."

What `auto` picks for training, and why:
- CUDA from compute capability 8.0 (A100, A10, L4, RTX 30xx/40xx, H100) and ROCm: bf16, which these
  GPUs multiply natively; no loss scaling needed.
- CUDA below 8.0 (T4, V100, P100): fp16 with a grad scaler. `torch.cuda.is_bf16_supported()` says
  True there too (bf16 is emulated), but emulated bf16 runs without tensor cores, torch.compile skips
  it and attention falls back to the math kernel, which needs several times the memory.
- MPS (Apple GPUs): fp32. Apple GPUs up to M4 run fp16 arithmetic at the fp32 rate, fp16 training
  needs the grad scaler, and bf16 needs macOS 14; fp32 trains everywhere without a surprise. `--dtype
  bf16` is the opt-in (one outside measurement, cited in the README: +31 % tokens/s on an M5 Pro).
- CPU: bf16 where the CPU has native bf16 instructions (AVX-512 BF16 or AMX), else fp32.
"""

from __future__ import annotations

import os

import torch

from tinystories.errors import UserError

DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str = "auto") -> torch.device:
    """The device `name` asks for (auto: cuda, then mps, then cpu). A CUDA device is made current
    (torch.cuda.set_device), so that kernels, the caching allocator and NCCL all use that GPU."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif mps_available():
            return torch.device("mps")
        else:
            return torch.device("cpu")
    # first, so that "cuda:x" is one line here rather than a RuntimeError from torch.device on a GPU machine
    if name not in ("cpu", "mps", "cuda") and not (name.startswith("cuda:") and name[5:].isascii() and name[5:].isdigit()):
        raise UserError(f"unknown device {name!r}; use auto, cuda, cuda:N, mps or cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
        index = int(name[5:]) if name.startswith("cuda:") else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                            f"numbered from 0; use --device cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if name == "mps" and not mps_available():
        raise UserError("--device mps was asked for but Apple MPS is not available; use --device cpu or auto")
    return torch.device(name)


def mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX-512 BF16 or AMX), where bf16 pays."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cuda_capability(device: torch.device) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(device))


def native_bf16(device: torch.device) -> bool:
    """Whether the hardware multiplies bf16 natively (not whether torch can emulate it)."""
    if device.type == "cuda":
        return bool(torch.version.hip) or cuda_capability(device) >= (8, 0)
    if device.type == "cpu":
        return cpu_supports_bf16()
    return False


def device_name(device: torch.device) -> str:
    """The hardware behind `device`, as a person would name it."""
    if device.type == "cuda":
        major, minor = cuda_capability(device)
        return f"{torch.cuda.get_device_name(device)}, compute capability {major}.{minor}"
    if device.type == "mps":
        return "Apple GPU"
    return "CPU with native bf16" if cpu_supports_bf16() else "CPU"


def choose_dtype(device: torch.device, name: str = "auto") -> tuple[torch.dtype, str]:
    """The autocast dtype for training or evaluation on `device`, and why (see the module docstring)."""
    if name != "auto":
        if name not in DTYPE_NAMES:
            raise UserError(f"unknown dtype {name!r}; use auto, bf16, fp16 or fp32")
        dtype, why = DTYPE_NAMES[name], f"as asked (--dtype {name})"
        if name == "bf16" and device.type != "mps" and not native_bf16(device):
            why += ("; this GPU has no native bf16 (compute capability below 8.0), so it is emulated and slow: "
                    "--dtype fp16 (or auto) is faster" if device.type == "cuda"
                    else "; this CPU has no native bf16, so it is emulated and slow: fp32 is faster")
        if name == "fp16":
            why += " (with a grad scaler)"
            if device.type == "cpu":
                why += "; CPUs have no fast fp16 matmuls: expect it slower than fp32"
        return dtype, why
    if device.type == "cuda":
        if native_bf16(device):
            return torch.bfloat16, "the GPU multiplies bf16 natively"
        major, minor = cuda_capability(device)
        return torch.float16, (f"with a grad scaler, as this GPU (compute capability {major}.{minor}) has no native "
                               "bf16, only an emulation without tensor cores")
    if device.type == "mps":
        return torch.float32, "the safe choice on Apple GPUs (--dtype bf16 is the opt-in; see the README)"
    if cpu_supports_bf16():
        return torch.bfloat16, "the CPU has native bf16 instructions (AVX-512 BF16 or AMX)"
    return torch.float32, "the CPU has no native bf16"


def pick_dtype(device: torch.device, name: str = "auto") -> torch.dtype:
    """The autocast dtype alone (see choose_dtype)."""
    return choose_dtype(device, name)[0]


def memory_of(device: torch.device) -> int | None:
    """Bytes of memory a program can have on `device` (None where it cannot be told): a GPU's total,
    an Apple GPU's recommended working set, the CPU's available memory (Linux) or physical memory."""
    try:
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[1]
        if device.type == "mps":
            return torch.mps.recommended_max_memory()
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, RuntimeError, AttributeError, ValueError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def describe(device: torch.device, dtype: torch.dtype | None, why: str) -> str:
    """One line for the start of a command: the device, the dtype and why."""
    dtype_name = str(dtype).removeprefix("torch.") if dtype is not None else "the model's own dtype"
    return f"device {device} ({device_name(device)}), {dtype_name}: {why}"
