"""Benchmark: the product on a CUDA GPU, in one prepared run (sized to fit 8 minutes on one H100).

    PYTHONPATH=. python bench/gpu.py [--out gpu.md]          # on a CUDA machine
    PYTHONPATH=. python bench/gpu.py --quick --device cpu     # the same code, tiny sizes (the test suite)

Measures, with random weights and random tokens (speed and memory do not depend on the text):
  train    `33m` and `33m-tuned` at the brief's micro-batch (32 x 512), steps of --grad-accum
           micro-batches, in the dtype `tinystories train` picks (bf16 from compute capability 8.0),
           eager and torch.compile'd: tokens/s, MFU (tinystories/mfu.py), the peak memory, and the
           compile time (the first steps, not counted in tokens/s)
  fp16     `33m` eager under fp16 autocast with the grad scaler (the path of a T4 or V100): tokens/s,
           steps the scaler skipped, the final loss scale
  decode   batch-1 and batch-16 decoding of `33m` (tinystories.generate.stream, the dtype `generate
           --dtype auto` picks): new tokens/s over 200 tokens, after a warm-up
The training step is the product's own: tinystories.train's optimizers (AdamW, or Muon + AdamW for
`33m-tuned`), model wrapping, micro-batch loop and chunked loss, clipping and optimizer steps.
Prints a Markdown table for BENCHMARKS.md and writes it to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
import types
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tinystories.config import TRAIN_PRESETS, ModelConfig, TrainConfig, get_preset  # noqa: E402
from tinystories.decoding import decode_dtype_choice  # noqa: E402
from tinystories.device import choose_dtype, device_name, pick_device  # noqa: E402
from tinystories.generate import stream  # noqa: E402
from tinystories.mfu import flops_per_token, peak_flops  # noqa: E402
from tinystories.model import GPT  # noqa: E402
from tinystories.train import (  # noqa: E402
    _cuda_can_compile, _forward_backward, _synchronize, make_optimizers, step_optimizers, unscale_and_clip, wrap_model,
)

GiB = 2**30


class RandomBatches:
    """Micro-batches of random tokens, made on the device once (the data path is not measured)."""

    def __init__(self, vocab_size: int, batch_size: int, block_size: int, device, n: int = 4):
        g = torch.Generator(device="cpu").manual_seed(0)
        self.batches = [torch.randint(0, vocab_size, (batch_size, block_size + 1), generator=g).to(device)
                        for _ in range(n)]
        self.i = 0

    def next_batch(self, device):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return b[:, :-1], b[:, 1:]


def model_config(preset: str, block_size: int | None, n_layer: int | None) -> ModelConfig:
    config = get_preset(preset)
    changes = {k: v for k, v in (("block_size", block_size), ("n_layer", n_layer)) if v is not None}
    return ModelConfig(**{**config.to_dict(), **changes}) if changes else config


def train_case(preset: str, device, dtype: torch.dtype, compiled: bool, args) -> dict:
    """Steps of `preset` as `tinystories train` runs them: tokens/s, MFU and peak memory."""
    torch.manual_seed(0)
    config = model_config(preset, args.block_size, args.n_layer)
    cfg = TrainConfig(**{**TRAIN_PRESETS[preset], "batch_size": args.batch_size, "grad_accum": args.grad_accum})
    raw = GPT(config).to(device)
    optimizers = make_optimizers(raw, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    r = types.SimpleNamespace(
        device=device, world_size=1, scaler=scaler, model=wrap_model(raw, compiled, False, device),
        autocast=torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext(),
        batches=RandomBatches(config.vocab_size, args.batch_size, config.block_size, device),
    )
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    skipped, losses = 0, []

    def step():
        nonlocal skipped
        loss_sum = _forward_backward(r, cfg.grad_accum)
        skipped += step_optimizers(optimizers, scaler, unscale_and_clip(optimizers, scaler, raw, cfg.grad_clip))[0]
        losses.append(loss_sum)

    t0 = time.perf_counter()
    for _ in range(args.warmup_steps):  # the compile happens here
        step()
    _synchronize(device)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    _synchronize(device)
    seconds = time.perf_counter() - t0
    tokens = args.steps * cfg.grad_accum * args.batch_size * config.block_size
    tok_s = tokens / seconds
    peak = peak_flops(device, dtype)
    final_loss = float(losses[-1]) / cfg.grad_accum
    return {
        "preset": preset, "dtype": str(dtype).removeprefix("torch."), "compiled": compiled, "tokens_per_s": tok_s,
        "mfu": None if peak is None else flops_per_token(raw) * tok_s / peak,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None,
        "warmup_s": warmup_s, "skipped": skipped, "loss_scale": scaler.get_scale() if scaler.is_enabled() else None,
        "final_loss": final_loss,
    }


def decode_case(device, batch: int, args) -> dict:
    torch.manual_seed(0)
    model = GPT(model_config("33m", args.block_size, args.n_layer)).to(device).eval()
    dtype, _ = decode_dtype_choice(device, "auto")
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8]] * batch
    n = args.new_tokens

    def run():
        g = torch.Generator(device=device).manual_seed(1)
        count = 0
        for step in stream(model, prompts, n, temperature=1.0, generator=g, dtype=dtype):
            count += sum(t is not None for t in step)
        _synchronize(device)
        return count

    run()  # warm-up: the decoding copy, kernels, the allocator
    t0 = time.perf_counter()
    count = run()
    seconds = time.perf_counter() - t0
    return {"batch": batch, "dtype": str(dtype).removeprefix("torch.") if dtype else "model's", "tokens": count,
            "tokens_per_s": count / seconds}


def table(results: dict, header: str) -> str:
    lines = [header, "", "| training case | tokens/s | MFU | peak memory | first steps (compile) | skipped | final loss |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["train"]:
        if "error" in r:
            lines.append(f"| {r['case']} | failed: {r['error']} | | | | | |")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_memory_gib']:.2f} GiB" if r["peak_memory_gib"] is not None else "n/a"
        scale = f" (scale {r['loss_scale']:g})" if r["loss_scale"] is not None else ""
        lines.append(f"| {r['preset']} {r['dtype']} {'compiled' if r['compiled'] else 'eager'} | "
                     f"{r['tokens_per_s']:,.0f} | {mfu} | {mem} | {r['warmup_s']:.1f} s | {r['skipped']}{scale} | "
                     f"{r['final_loss']:.3f} |")
    lines += ["", "| decoding (33m, random weights) | dtype | new tokens/s |", "| --- | --- | --- |"]
    for r in results["decode"]:
        if "error" in r:
            lines.append(f"| {r['case']} | failed: {r['error']} | |")
            continue
        lines.append(f"| batch {r['batch']} | {r['dtype']} | {r['tokens_per_s']:,.0f} |")
    return "\n".join(lines) + "\n"


def guarded(case: str, fn, *a) -> dict:
    """One case; a failure is reported in the table and the run goes on to the next."""
    print(f"-- {case}", flush=True)
    try:
        result = fn(*a)
    except Exception as e:  # noqa: BLE001 - a benchmark reports what broke and measures the rest
        traceback.print_exc()
        result = {"case": case, "error": " ".join(str(e).split())[:200] or type(e).__name__}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print(f"   {json.dumps(result)}", flush=True)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=None, help="write the Markdown table here too")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, measures nothing")
    args = p.parse_args()
    sizes = dict(batch_size=32, grad_accum=4, warmup_steps=3, steps=10, block_size=None, n_layer=None, new_tokens=200)
    if args.quick:
        sizes = dict(batch_size=2, grad_accum=2, warmup_steps=1, steps=1, block_size=32, n_layer=1, new_tokens=4)
    vars(args).update(sizes)
    device = pick_device(args.device)
    dtype, why = choose_dtype(device, "auto")
    compiles = device.type == "cuda" and _cuda_can_compile(device, True)
    header = (f"{device_name(device)}; torch {torch.__version__}, CUDA {torch.version.cuda}, python "
              f"{platform.python_version()}; {time.strftime('%Y-%m-%d %H:%M %Z')}. Micro-batch {args.batch_size} x "
              f"{args.block_size or 512}, {args.grad_accum} micro-batches a step, {args.steps} timed steps after "
              f"{args.warmup_steps}; training dtype {str(dtype).removeprefix('torch.')} ({why}).")
    print(header, flush=True)
    results = {"train": [], "decode": []}
    for preset in ("33m", "33m-tuned"):
        for compiled in ([False, True] if compiles else [False]):
            case = f"{preset} {'compiled' if compiled else 'eager'}"
            results["train"].append(guarded(case, train_case, preset, device, dtype, compiled, args))
    if device.type == "cuda" or args.quick:
        results["train"].append(guarded("33m fp16 + scaler", train_case, "33m", device, torch.float16, False, args))
    for batch in (1, 16):
        results["decode"].append(guarded(f"decode batch {batch}", decode_case, device, batch, args))
    text = table(results, header)
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps({"header": header, **results}, indent=2) + "\n")
    failed = [r["case"] for part in results.values() for r in part if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
