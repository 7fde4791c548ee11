"""Benchmark: training-step throughput of our `33m` against transformers' GPT2LMHeadModel, same weights.

    .venv/bin/python bench/train_step.py --compare transformers [--rounds 5] [--sides ...]
    .venv/bin/python bench/train_step.py --loss-curve [--curve-steps 150]

One training step = forward, loss, backward, gradient clipping, AdamW step, on a batch of 8 x 256
real TinyStories tokens (GPT-2 tokenizer), model in train mode (dropout 0.1, as the preset). Sides,
each in its own process (bench/_common.py), timed in turn, round after round:

  ours                 what `tinystories train` does on this CPU: the autocast dtype it picks (bf16
                       where the CPU multiplies bf16 natively), fused AdamW over its parameter groups,
                       glibc told to keep freed memory (tinystories/allocator.py), the chunked loss
  ours-fp32            the same in fp32 (shows what bf16 alone is worth)
  transformers         GPT2LMHeadModel from our weights (tinystories/export.py's config and key
                       map), SDPA attention, fp32, fused AdamW (the HF Trainer's default optimizer
                       on torch >= 2.8), in a plain process: the baseline of issue 7
  transformers-heap    the same, with our allocator setting, to show how much of the gap is that
  transformers-bf16    the same in a plain process under bf16 autocast

Printed: tok/s per side (median over rounds), each side's ratio to `transformers` (median of the
per-round ratios), the machine and its load average before and after.

--loss-curve trains the `tiny` preset (real stories, a 4,096-token BPE) for --curve-steps steps with
the real `tinystories train` command three times: fp32, bf16 autocast with the same seed, and fp32
with another seed. bf16 matches fp32 "within noise" when its curve is as close to fp32's as a
different seed is: both distances are printed, with the final losses.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, SHARED, Worker, interleave, load_average, machine, median, print_machine, serve  # noqa: E402

SIDES = ["ours", "ours-fp32", "transformers", "transformers-heap", "transformers-bf16"]
DEFAULT_SIDES = ["ours", "transformers", "transformers-heap"]


# -----------------------------------------------------------------------------
# Worker: one side's training step


def real_batches(batch_size: int, seq_len: int, n: int):
    """`n` (x, y) batches of consecutive real tokens (V1 validation head, GPT-2 tokenizer)."""
    import torch

    from tinystories.tokenizer import load_gpt2

    tok = load_gpt2(SHARED / "gpt2")
    text = (SHARED / "tinystories" / "TinyStories-valid.head.txt").read_text(encoding="utf-8")
    stories = [s.strip() for s in text.split("<|endoftext|>") if s.strip()]
    ids: list[int] = []
    for story in stories:
        ids += tok.encode(story) + [tok.eot_id]
        if len(ids) > n * batch_size * (seq_len + 1):
            break
    rows = torch.tensor(ids[: n * batch_size * (seq_len + 1)]).view(n, batch_size, seq_len + 1)  # (n, B, T + 1)
    return [(r[:, :-1].contiguous(), r[:, 1:].contiguous()) for r in rows]


def setup_side(side: str, preset: str, batch_size: int, seq_len: int):
    from contextlib import nullcontext

    import torch

    from tinystories.config import TRAIN_PRESETS, TrainConfig, get_preset
    from tinystories.device import pick_dtype
    from tinystories.model import GPT
    from tinystories.train import param_groups

    cfg = get_preset(preset)
    train_cfg = TrainConfig(**TRAIN_PRESETS[preset])
    torch.manual_seed(0)
    ours = GPT(cfg).train()
    batches = real_batches(batch_size, seq_len, 8)
    device = torch.device("cpu")

    if side.startswith("ours"):
        # As tinystories/train.py sets up a CPU run.
        from tinystories.allocator import keep_freed_memory

        keep_freed_memory()
        dtype = torch.float32 if side == "ours-fp32" else pick_dtype(device, "auto")
        model = ours
        groups = param_groups(model, train_cfg.weight_decay)

        def loss_of(x, y):
            return model(x, y)[1]
    else:
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.utils import logging as hf_logging

        from tinystories.export import hf_config, hf_state_dict

        hf_logging.set_verbosity_error()
        if side == "transformers-heap":
            from tinystories.allocator import keep_freed_memory

            keep_freed_memory()
        dtype = torch.bfloat16 if side == "transformers-bf16" else torch.float32
        config = hf_config(cfg, eot_id=50256, checkpoint_config={"tokenizer": {"name": "gpt2"}})
        config.pop("tinystories")
        model = GPT2LMHeadModel(GPT2Config(**config, attn_implementation="sdpa")).train()
        missing, unexpected = model.load_state_dict(hf_state_dict(ours), strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # lm_head is tied
        del ours
        groups = param_groups(model, train_cfg.weight_decay)

        def loss_of(x, y):
            return model(input_ids=x, labels=x).loss  # HF shifts the labels itself

    optimizer = torch.optim.AdamW(groups, lr=train_cfg.learning_rate, betas=(train_cfg.beta1, train_cfg.beta2), fused=True)
    autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else nullcontext()
    n = [0]

    def step():
        x, y = batches[n[0] % len(batches)]
        n[0] += 1
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        with autocast:
            loss = loss_of(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        # page faults: memory the kernel had to map (and zero) for this step
        return seconds, round(loss.item(), 4), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults

    return step


# -----------------------------------------------------------------------------
# Throughput comparison


def compare(args) -> None:
    info = machine()
    print_machine(info)
    tokens = args.batch_size * args.seq_len
    print(f"training step, {args.preset}, batch {args.batch_size} x {args.seq_len} = {tokens:,} tokens, "
          f"{args.warmup} warm-up + {args.rounds} timed steps per side; load average before: {load_average()}", flush=True)
    worker_args = ["--preset", args.preset, "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
    workers = []
    try:
        for side in args.sides:
            workers.append(Worker(Path(__file__), side, worker_args))

        def log(r, replies):
            print(f"  round {r + 1}: " + ", ".join(f"{s} {tokens / float(v[0]):,.0f} tok/s" for s, v in replies.items()),
                  flush=True)

        results = interleave(workers, args.warmup, args.rounds, log)
    finally:
        for w in workers:
            w.close()

    seconds = {side: [float(r[0]) for r in replies] for side, replies in results.items()}
    base = "transformers" if "transformers" in seconds else None
    print(f"load average after: {load_average()}")
    print(f"{'side':<20} {'tok/s (median)':>15} {'vs transformers':>16}")
    for side, ts in seconds.items():
        ratio = ""
        if base and side != base:
            ratio = f"{median([b / t for b, t in zip(seconds[base], ts)]):.2f}x"
        print(f"{side:<20} {tokens / median(ts):>15,.0f} {ratio:>16}")
    if base and "ours" in seconds:
        r = median([b / t for b, t in zip(seconds[base], seconds["ours"])])
        print(f"RESULT train {args.preset} CPU ours ({'bf16' if info['bf16_matmul'] else 'fp32'}) vs transformers fp32: "
              f"{r:.2f}x ({tokens / median(seconds['ours']):,.0f} vs {tokens / median(seconds[base]):,.0f} tok/s)")


# -----------------------------------------------------------------------------
# bf16 against fp32 on a short real run


def cli(*args) -> None:
    subprocess.run([sys.executable, "-m", "tinystories", *map(str, args)], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL)


def smoothed(xs: list[float], k: int = 10) -> list[float]:
    return [sum(xs[max(0, i - k + 1) : i + 1]) / len(xs[max(0, i - k + 1) : i + 1]) for i in range(len(xs))]


def loss_curve(args) -> None:
    print_machine(machine())
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        print(f"preparing {args.curve_stories} real stories with a 4,096-token BPE ...", flush=True)
        cli("prepare", "--source", SHARED / "tinystories" / "TinyStories-train.head.txt", "--tokenizer", "bpe-4096",
            "--max-stories", args.curve_stories, "--test", SHARED / "tinystories" / "TinyStories-valid.head.txt",
            "--out", data)
        runs = {"fp32": ("fp32", 1337), "bf16": ("bf16", 1337), "fp32, other seed": ("fp32", 2024)}
        logs = {}
        for name, (dtype, seed) in runs.items():
            t0 = time.perf_counter()
            out = Path(tmp) / name.replace(" ", "_").replace(",", "")
            cli("train", "--data", data, "--preset", "tiny", "--out", out, "--max-steps", args.curve_steps,
                "--dtype", dtype, "--seed", seed, "--eval-interval", args.curve_steps)
            logs[name] = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
            print(f"  {name:<17} {args.curve_steps} steps in {time.perf_counter() - t0:.0f}s", flush=True)

    curves = {name: smoothed([r["loss"] for r in log]) for name, log in logs.items()}
    last = {name: log[-1] for name, log in logs.items()}
    half = args.curve_steps // 2

    def gap(a, b) -> float:  # mean |difference| of the smoothed curves over the second half
        return sum(abs(x - y) for x, y in zip(curves[a][half:], curves[b][half:])) / len(curves[a][half:])

    print(f"{'run':<17} " + " ".join(f"{'step ' + str(s):>9}" for s in (1, half // 2, half, args.curve_steps))
          + f" {'val loss':>9} {'test loss':>9}")
    for name, curve in curves.items():
        points = [curve[i - 1] for i in (1, half // 2, half, args.curve_steps)]
        print(f"{name:<17} " + " ".join(f"{p:>9.4f}" for p in points)
              + f" {last[name].get('val_loss', float('nan')):>9.4f} {last[name].get('test_loss', float('nan')):>9.4f}")
    bf16_gap, seed_gap = gap("bf16", "fp32"), gap("fp32, other seed", "fp32")
    print(f"mean |difference| of the smoothed train-loss curves over steps {half + 1}-{args.curve_steps}: "
          f"bf16 vs fp32 {bf16_gap:.4f}, another seed vs fp32 {seed_gap:.4f} (the noise)")
    print(f"RESULT bf16 loss curve {'within' if bf16_gap <= seed_gap else 'OUTSIDE'} seed noise of fp32 "
          f"(val loss bf16 {last['bf16']['val_loss']:.4f}, fp32 {last['fp32']['val_loss']:.4f}, "
          f"other seed {last['fp32, other seed']['val_loss']:.4f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare", choices=["transformers"], default="transformers", help="the baseline (only one)")
    ap.add_argument("--sides", nargs="+", choices=SIDES, default=DEFAULT_SIDES, help="what to time")
    ap.add_argument("--preset", default="33m")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    ap.add_argument("--rounds", type=int, default=5, help="timed steps per side (medians reported)")
    ap.add_argument("--loss-curve", action="store_true", help="compare bf16 and fp32 loss curves instead")
    ap.add_argument("--curve-steps", type=int, default=150)
    ap.add_argument("--curve-stories", type=int, default=2000)
    ap.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        serve(lambda: setup_side(args.worker, args.preset, args.batch_size, args.seq_len))
    elif args.loss_curve:
        loss_curve(args)
    else:
        compare(args)


if __name__ == "__main__":
    main()
