"""Benchmark: greedy generation with our `33m` against transformers' `generate`, same weights.

    .venv/bin/python bench/generate.py --compare transformers [--rounds 5] [--sides ...]
    .venv/bin/python bench/generate.py --checkpoint RUN_DIR --agreement 20

One repetition writes --new-tokens (200) greedy tokens after a real story opening (every row the
same prompt, no end-of-text stop, so every side does the same work). Sides, each in its own
process (bench/_common.py), timed in turn, round after round:

  ours-b1              tinystories.generate.generate at batch 1 with the weights `tinystories
                       generate` uses on this machine (decode_dtype "auto": bf16 where the CPU
                       multiplies bf16 natively; see tinystories/generate.py, "Speed")
  ours-b16             the same at batch 16
  ours-fp32-b1         batch 1 with fp32 weights (shows what the packed layout alone is worth)
  transformers-b1      GPT2LMHeadModel.generate, fp32, SDPA attention, KV cache, batch 1
  transformers-b16     the same at batch 16

Printed: tokens/s per side (new tokens of all rows per second, median over rounds), our batch-1
against transformers' (median of per-round ratios), our batch 16 against our batch 1, the machine.

The model is the `33m` preset with random weights (seed 0) unless --checkpoint names a trained one.
--agreement N (with a trained --checkpoint) also writes N greedy stories from real story openings
with fp32 and with the default weights and reports how many tokens agree before the first
difference: bf16 rounding can flip a near-tie, after which the stories part.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED, Worker, interleave, load_average, machine, median, print_machine, serve  # noqa: E402

SIDES = ["ours-b1", "ours-b16", "ours-fp32-b1", "transformers-b1", "transformers-b16"]
DEFAULT_SIDES = ["ours-b1", "ours-b16", "transformers-b1"]
PROMPT = "Once upon a time, there was a little girl named Lily. She loved to"


def load_model(checkpoint: str | None):
    """(our GPT in eval mode, its tokenizer): the trained checkpoint, or the 33m preset at seed 0."""
    import torch

    from tinystories.config import get_preset
    from tinystories.model import GPT
    from tinystories.tokenizer import load_gpt2

    if checkpoint:
        from tinystories.checkpoint import load_checkpoint

        ckpt = load_checkpoint(checkpoint, "cpu")
        return ckpt.model.eval(), ckpt.tokenizer
    torch.manual_seed(0)
    return GPT(get_preset("33m")).eval(), load_gpt2(SHARED / "gpt2")


def setup_side(side: str, checkpoint: str | None, new_tokens: int):
    import torch

    model, tokenizer = load_model(checkpoint)
    prompt = tokenizer.encode(PROMPT)
    batch = int(side.rsplit("-b", 1)[1])

    if side.startswith("ours"):
        from tinystories.decoding import decode_dtype
        from tinystories.generate import generate

        dtype = torch.float32 if "fp32" in side else decode_dtype(torch.device("cpu"), "auto")

        def once():
            t0 = time.perf_counter()
            stories = generate(model, [prompt] * batch, new_tokens, temperature=0.0, dtype=dtype)
            seconds = time.perf_counter() - t0
            assert all(len(s) == new_tokens for s in stories)
            return seconds, stories[0][0]
    else:
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.utils import logging as hf_logging

        from tinystories.export import hf_config, hf_state_dict

        hf_logging.set_verbosity_error()
        config = hf_config(model.config, eot_id=tokenizer.eot_id, checkpoint_config={"tokenizer": {"name": "gpt2"}})
        config.pop("tinystories")
        hf = GPT2LMHeadModel(GPT2Config(**config, attn_implementation="sdpa")).eval()
        missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # lm_head is tied
        del model
        ids = torch.tensor([prompt] * batch)

        def once():
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eot_id)
            seconds = time.perf_counter() - t0
            assert out.shape == (batch, len(prompt) + new_tokens)
            return seconds, out[0, len(prompt)].item()

    return once


def compare(args) -> None:
    print_machine(machine())
    print(f"greedy generation, {args.checkpoint or '33m preset, random weights (seed 0)'}, {args.new_tokens} new tokens "
          f"per row, {args.warmup} warm-up + {args.rounds} timed runs per side; load average before: {load_average()}",
          flush=True)
    batch = {side: int(side.rsplit("-b", 1)[1]) for side in args.sides}
    extra = ["--new-tokens", str(args.new_tokens)] + (["--checkpoint", args.checkpoint] if args.checkpoint else [])
    workers = []
    try:
        for side in args.sides:
            workers.append(Worker(Path(__file__), side, extra))

        def log(r, replies):
            print(f"  round {r + 1}: " + ", ".join(
                f"{s} {batch[s] * args.new_tokens / float(v[0]):,.0f} tok/s" for s, v in replies.items()), flush=True)

        results = interleave(workers, args.warmup, args.rounds, log)
    finally:
        for w in workers:
            w.close()

    seconds = {side: [float(r[0]) for r in replies] for side, replies in results.items()}
    rate = {side: [batch[side] * args.new_tokens / t for t in ts] for side, ts in seconds.items()}
    print(f"load average after: {load_average()}")
    print(f"{'side':<18} {'tok/s (median)':>15}")
    for side, rs in rate.items():
        print(f"{side:<18} {median(rs):>15,.1f}")
    if "ours-b1" in rate and "transformers-b1" in rate:
        r = median([o / t for o, t in zip(rate["ours-b1"], rate["transformers-b1"])])
        print(f"RESULT generation 33m CPU batch 1 ours vs transformers generate: {r:.2f}x "
              f"({median(rate['ours-b1']):,.0f} vs {median(rate['transformers-b1']):,.0f} tok/s)")
    if "ours-b1" in rate and "ours-b16" in rate:
        r = median([b16 / b1 for b16, b1 in zip(rate["ours-b16"], rate["ours-b1"])])
        print(f"RESULT generation 33m CPU batch 16 vs our batch 1: {r:.2f}x "
              f"({median(rate['ours-b16']):,.0f} vs {median(rate['ours-b1']):,.0f} tok/s)")


def agreement(args) -> None:
    """Greedy stories with fp32 weights against the default weights, from real story openings."""
    import torch

    from tinystories.decoding import decode_dtype
    from tinystories.generate import generate

    model, tokenizer = load_model(args.checkpoint)
    dtype = decode_dtype(torch.device("cpu"), "auto")
    if dtype in (None, torch.float32):
        print("the default decoding weights are fp32 on this machine: nothing to compare")
        return
    text = (SHARED / "tinystories" / "TinyStoriesV2-valid.head.txt").read_text(encoding="utf-8")
    stories = [s.strip() for s in text.split("<|endoftext|>") if s.strip()][: args.agreement]
    prompts = [tokenizer.encode(" ".join(s.split()[:8])) for s in stories]  # the first eight words
    ref = generate(model, prompts, args.new_tokens, temperature=0.0, dtype=torch.float32)
    fast = generate(model, prompts, args.new_tokens, temperature=0.0, dtype=dtype)
    same_prefix = []
    for a, b in zip(ref, fast):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        same_prefix.append(n)
    identical = sum(a == b for a, b in zip(ref, fast))
    # What the rounding costs in quality: the loss of whole real stories (teacher-forced) both ways
    from tinystories.decoding import decoding_copy

    nats = {}
    for name, dt in (("fp32", torch.float32), ("default", dtype)):
        net, total, count = decoding_copy(model, dt), 0.0, 0
        for story in stories:
            ids = torch.tensor([[tokenizer.eot_id] + tokenizer.encode(story)])[:, : model.config.block_size + 1]  # (1, T + 1)
            with torch.inference_mode():
                logits, _ = net(ids[:, :-1])
            total += torch.nn.functional.cross_entropy(logits[0].float(), ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
        nats[name] = total / count
    print(f"greedy, {len(prompts)} real openings, {args.new_tokens} new tokens, {str(dtype).removeprefix('torch.')} "
          f"weights vs fp32: {identical}/{len(prompts)} stories identical; tokens before the first difference: "
          f"median {median(same_prefix):.0f}, min {min(same_prefix)}; first-token agreement "
          f"{sum(n > 0 for n in same_prefix)}/{len(prompts)}")
    print(f"loss of the same {len(stories)} whole stories: fp32 weights {nats['fp32']:.4f}, "
          f"{str(dtype).removeprefix('torch.')} weights {nats['default']:.4f} nats/token "
          f"(difference {nats['default'] - nats['fp32']:+.4f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare", choices=["transformers"], default="transformers", help="the baseline (only one)")
    ap.add_argument("--sides", nargs="+", choices=SIDES, default=DEFAULT_SIDES, help="what to time")
    ap.add_argument("--checkpoint", default=None, help="a trained checkpoint or run folder (default: random 33m)")
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs per side first")
    ap.add_argument("--rounds", type=int, default=5, help="timed runs per side (medians reported)")
    ap.add_argument("--agreement", type=int, default=0, metavar="N",
                    help="compare N greedy stories from fp32 and default weights instead of timing")
    ap.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        serve(lambda: setup_side(args.worker, args.checkpoint, args.new_tokens))
    elif args.agreement:
        agreement(args)
    else:
        compare(args)


if __name__ == "__main__":
    main()
