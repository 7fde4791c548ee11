"""Model FLOPs utilisation (MFU): the FLOPs a step needs, and what the GPU could do at its peak.

    flops = flops_per_token(model)                      # training FLOPs per token (forward + backward)
    peak = peak_flops(device, torch.bfloat16)           # FLOP/s of this card at this dtype, or None
    mfu = flops * tokens_per_s / peak

MFU counts only the model's arithmetic (PaLM, Chowdhery et al. 2022, appendix B): recomputation,
padding and the optimizer do not count, so it compares runs across machines and code.
"""

from __future__ import annotations

import re

import torch
from torch import nn


def flops_per_token(model: nn.Module) -> float:
    """Training FLOPs per token: 6 per weight of every matmul (2 forward, 4 backward), the output
    layer included whether or not it is tied to the embedding (it is the largest matmul of a small
    model: 116 of 194 MFLOP a token in `33m`), plus attention's 12 x n_layer x n_embd x block_size
    (the score and value matmuls over a full window, as PaLM counts them). Embedding lookups and
    norms are not matmuls. tests/test_mfu.py checks it against FlopCounterMode on every preset."""
    matmul_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    c = model.config
    return 6 * matmul_weights + 12 * c.n_layer * c.n_embd * c.block_size


# Dense (no 2:4 sparsity) peak tensor-core TFLOP/s by card, from the vendor datasheets, for the
# dtype a run computes in: bf16, fp16, and tf32 for fp32 runs (tinystories train allows TF32 matmuls
# on CUDA). Cards without bf16 (compute capability < 8.0) have none. Patterns are matched in order
# against the lower-cased device name, as whole words, so "l4" does not match "l40s", "a10" does
# not match "a100", and "h100" without "pcie" or "nvl" is the SXM part.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    (r"gh200|h200 nvl", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7}),
    (r"h200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7}),
    (r"h100 nvl", {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5}),
    (r"h100 pcie", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0}),
    (r"h100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7}),
    (r"h800", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7}),
    (r"b200", {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0}),
    (r"a100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0}),
    (r"a800", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0}),
    # AWS's A10G is the A10's chip (GA102) and has no datasheet of its own: taken as the A10's
    (r"a10g", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5}),
    (r"a10", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5}),
    (r"l40s", {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0}),
    (r"l40", {"bf16": 181.0, "fp16": 181.0, "tf32": 90.5}),
    (r"l4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0}),
    (r"rtx a6000", {"bf16": 154.8, "fp16": 154.8, "tf32": 77.4}),
    (r"rtx 6000 ada", {"bf16": 364.2, "fp16": 364.2, "tf32": 182.1}),
    (r"rtx 4090", {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6}),
    (r"rtx 3090", {"bf16": 71.0, "fp16": 71.0, "tf32": 35.6}),
    (r"v100s", {"fp16": 130.0, "tf32": 16.4}),  # no TF32 before Ampere: fp32 is the plain FMA rate
    (r"v100[- ]pcie", {"fp16": 112.0, "tf32": 14.0}),
    (r"v100", {"fp16": 125.0, "tf32": 15.7}),
    (r"t4", {"fp16": 65.0, "tf32": 8.1}),
    (r"p100[- ]sxm2", {"fp16": 21.2, "tf32": 10.6}),
    (r"p100", {"fp16": 18.7, "tf32": 9.3}),  # no tensor cores: fp16 at twice the fp32 rate
]

_DTYPE_KEY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "tf32"}


def peak_tflops_of(card: str, dtype: torch.dtype) -> float | None:
    """The card's dense peak TFLOP/s at `dtype`, or None for a card (or dtype) the table lacks."""
    name = re.sub(r"\s+", " ", card.lower())
    for pattern, peaks in PEAK_TFLOPS:
        if re.search(rf"(?<![a-z0-9])(?:{pattern})(?![a-z0-9])", name):
            return peaks.get(_DTYPE_KEY.get(dtype, ""))
    return None


def peak_flops(device: torch.device, dtype: torch.dtype, override_tflops: float | None = None) -> float | None:
    """FLOP/s at the peak of `device` for `dtype` (None where unknown: MFU is then not reported);
    `override_tflops` (--peak-tflops) wins, for cards the table lacks or other clocks."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    tflops = peak_tflops_of(torch.cuda.get_device_name(device), dtype)
    return None if tflops is None else tflops * 1e12
