"""Benchmark: batch-1 decoding, prefill and int8 weights of our `33m` against transformers (and
llama.cpp when given), same weights.

    .venv/bin/python bench/generate.py --compare transformers [--rounds 5] [--sides ...]
    .venv/bin/python bench/generate.py --llama-bench PATH --gguf 33m-bf16.gguf 33m-q8_0.gguf
    .venv/bin/python bench/generate.py --checkpoint RUN_DIR --agreement 20 [--data DATA_DIR]

Decode sides write --new-tokens (200) greedy tokens after a real story opening (every row the same
prompt, no end-of-text stop, so every side does the same work); prefill sides take one prompt of
--prompt-tokens (256) tokens of a real story and time until the next token's logits. Sides, each in
its own process (bench/_common.py), timed in turn, round after round:

  ours-b1              tinystories.generate.generate at batch 1 with the weights `tinystories
                       generate` uses by default on this machine (--dtype auto: bf16 where the CPU
                       multiplies bf16 natively; see tinystories/generate.py, "Speed")
  ours-int8-b1         the same with int8 weights (--dtype int8, tinystories/decoding.py Int8Linear)
  ours-b16             auto weights at batch 16
  ours-fp32-b1         batch 1 with fp32 weights (what the packed layout alone is worth)
  ours-prefill         the cached decoder's prefill of one prompt (auto weights)
  ours-int8-prefill    the same with int8 weights
  transformers-b1      GPT2LMHeadModel.generate, fp32, SDPA attention, KV cache, batch 1
  transformers-b16     the same at batch 16
  transformers-prefill GPT2LMHeadModel's forward over the prompt with a cache, logits of the last
                       position only (what its generate does)
  llama.cpp:NAME       with --llama-bench and --gguf: `llama-bench -p PROMPT -n NEW -r 1` on each
                       GGUF file (NAME: its file name), one run per round; it reports both its
                       text generation (tg, from an empty context) and prompt processing (pp)

Printed: tokens/s per side (median over rounds), and the ratios (medians of per-round ratios) of
our batch 1, int8 and prefill against transformers and llama.cpp, batch 16 against batch 1, and
the machine and its load. The benchmark runs a given llama-bench; it never builds one. A GGUF of
this benchmark's random model: `tinystories export --format gguf` of it (BENCHMARKS.md's figures
were measured with files from llama.cpp's convert_hf_to_gguf.py --outtype bf16 / q8_0, run on a
`tinystories export` folder; BENCHMARKS.md has the commands).

The model is the `33m` preset with random weights (seed 0) unless --checkpoint names a trained one.
--agreement N (with a trained --checkpoint) writes N greedy stories from real story openings with
fp32, bf16 and int8 weights and reports how many tokens agree (greedy rounding can flip a near-tie,
after which the stories part), and the loss of each: of the N whole stories, and with --data of
the first --test-tokens tokens of its test split.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (SHARED, Worker, interleave, load_average, machine, median, print_machine, serve,  # noqa: E402
                     stories)

SIDES = ["ours-b1", "ours-int8-b1", "ours-b16", "ours-fp32-b1", "ours-prefill", "ours-int8-prefill",
         "transformers-b1", "transformers-b16", "transformers-prefill"]
DEFAULT_SIDES = ["ours-b1", "ours-int8-b1", "ours-prefill", "ours-int8-prefill", "transformers-b1",
                 "transformers-prefill"]
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


def story_prompt(tokenizer, n_tokens: int) -> list[int]:
    """The first n_tokens tokens of real stories (V2 validation head), joined as prepare joins them."""
    ids: list[int] = []
    for story in stories(SHARED / "tinystories" / "TinyStoriesV2-valid.head.txt"):
        ids += tokenizer.encode(story) + [tokenizer.eot_id]
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
    raise ValueError(f"the stories hold fewer than {n_tokens} tokens")


def kind(side: str) -> str:
    """decode (tokens written), prefill (prompt tokens read) or llama (both, from llama-bench)."""
    if side.startswith("llama.cpp:"):
        return "llama"
    return "prefill" if side.endswith("-prefill") else "decode"


def side_dtype(side: str):
    import torch

    from tinystories.decoding import decode_dtype

    name = "int8" if "-int8" in side else "fp32" if "-fp32" in side else "auto"
    return decode_dtype(torch.device("cpu"), name)


def setup_side(side: str, args):
    """One side's repetition: a function returning (seconds, a check value) or llama-bench's rates."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if kind(side) == "llama":
        gguf = next(g for g in args.gguf if f"llama.cpp:{Path(g).name}" == side)
        cmd = [args.llama_bench, "-m", gguf, "-p", str(args.prompt_tokens), "-n", str(args.new_tokens),
               "-r", "1", "-o", "json", "-t", str(torch.get_num_threads())]  # the threads our sides use

        def once():
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600).stdout
            rate = {("tg" if r["n_gen"] else "pp"): r["avg_ts"] for r in json.loads(out)}
            return rate["tg"], rate["pp"]

        return once

    model, tokenizer = load_model(args.checkpoint)
    if kind(side) == "prefill":
        prompt = story_prompt(tokenizer, args.prompt_tokens)
    else:
        prompt = tokenizer.encode(PROMPT)
    batch = 1 if kind(side) == "prefill" else int(side.rsplit("-b", 1)[1])

    if side.startswith("ours"):
        from tinystories.decoding import decoding_copy
        from tinystories.generate import _CachedDecoder, generate

        dtype = side_dtype(side)
        if kind(side) == "prefill":
            fast = decoding_copy(model, dtype)

            def once():
                with torch.inference_mode():
                    decoder = _CachedDecoder(fast, 1, model.config.block_size)  # what stream() makes
                    t0 = time.perf_counter()
                    logits = decoder.prefill([prompt])
                    seconds = time.perf_counter() - t0
                return seconds, int(logits[0].argmax())
        else:
            def once():
                t0 = time.perf_counter()
                stories = generate(model, [prompt] * batch, args.new_tokens, temperature=0.0, dtype=dtype)
                seconds = time.perf_counter() - t0
                assert all(len(s) == args.new_tokens for s in stories)
                return seconds, stories[0][0]
        return once

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

    if kind(side) == "prefill":
        def once():
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = hf(ids, use_cache=True, logits_to_keep=1)
            seconds = time.perf_counter() - t0
            return seconds, int(out.logits[0, -1].argmax())
    else:
        def once():
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                  min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tokenizer.eot_id)
            seconds = time.perf_counter() - t0
            assert out.shape == (batch, len(prompt) + args.new_tokens)
            return seconds, out[0, len(prompt)].item()
    return once


def compare(args) -> None:
    print_machine(machine())
    sides = list(args.sides)
    if args.llama_bench:
        if not Path(args.llama_bench).is_file():
            raise SystemExit(f"--llama-bench {args.llama_bench}: no such file "
                             "(the benchmark runs one, never builds it)")
        sides += [f"llama.cpp:{Path(g).name}" for g in args.gguf]
    print(f"threads per side: {args.threads or 'torch default'}; "
          f"{args.checkpoint or '33m preset, random weights (seed 0)'}: "
          f"decode {args.new_tokens} greedy tokens per row, "
          f"prefill one {args.prompt_tokens}-token prompt; {args.warmup} warm-up + {args.rounds} timed runs per side; "
          f"load average before: {load_average()}", flush=True)
    extra = ["--new-tokens", str(args.new_tokens), "--prompt-tokens", str(args.prompt_tokens)]
    extra += ["--threads", str(args.threads)] if args.threads else []
    extra += ["--checkpoint", args.checkpoint] if args.checkpoint else []
    extra += ["--llama-bench", args.llama_bench, "--gguf", *args.gguf] if args.llama_bench else []

    def rates(side: str, reply: list[str]) -> dict[str, float]:
        """tok/s of a reply: decode = new tokens of all rows per second, prefill = prompt tokens per second."""
        if kind(side) == "llama":
            return {"decode": float(reply[0]), "prefill": float(reply[1])}
        if kind(side) == "prefill":
            return {"prefill": args.prompt_tokens / float(reply[0])}
        return {"decode": int(side.rsplit("-b", 1)[1]) * args.new_tokens / float(reply[0])}

    workers = []
    try:
        for side in sides:
            workers.append(Worker(Path(__file__), side, extra))

        def log(r, replies):
            print(f"  round {r + 1}: " + ", ".join(
                f"{s} " + "/".join(f"{v:,.0f}" for v in rates(s, reply).values()) for s, reply in replies.items()),
                flush=True)

        results = interleave(workers, args.warmup, args.rounds, log)
    finally:
        for w in workers:
            w.close()

    per_round = {side: [rates(side, reply) for reply in replies] for side, replies in results.items()}
    print(f"load average after: {load_average()}")
    print(f"{'side':<28} {'decode tok/s':>13} {'prefill tok/s':>14}   (medians)")
    for side, rs in per_round.items():
        cells = [f"{median([r[k] for r in rs]):,.0f}" if k in rs[0] else "" for k in ("decode", "prefill")]
        print(f"{side:<28} {cells[0]:>13} {cells[1]:>14}")

    def ratio(what: str, a: str, b: str, label: str) -> None:
        if a in per_round and b in per_round and what in per_round[a][0] and what in per_round[b][0]:
            ra, rb = [r[what] for r in per_round[a]], [r[what] for r in per_round[b]]
            x = median([p / q for p, q in zip(ra, rb)])
            print(f"RESULT {label}: {x:.2f}x ({median(ra):,.0f} vs {median(rb):,.0f} tok/s; "
                  f"rounds {', '.join(f'{p / q:.2f}' for p, q in zip(ra, rb))})")

    ratio("decode", "ours-b1", "transformers-b1", "decode 33m batch 1, ours vs transformers generate")
    ratio("decode", "ours-int8-b1", "ours-b1", "decode batch 1, our int8 vs our default weights")
    ratio("decode", "ours-b16", "ours-b1", "decode batch 16 vs our batch 1")
    ratio("prefill", "ours-prefill", "transformers-prefill", "prefill, ours vs transformers")
    ratio("prefill", "ours-int8-prefill", "ours-prefill", "prefill, our int8 vs our default weights")
    for g in args.gguf if args.llama_bench else []:
        llama = f"llama.cpp:{Path(g).name}"
        ours = "ours-int8" if "q8" in Path(g).name.lower() else "ours"
        ratio("decode", f"{ours}-b1", llama, f"decode batch 1, {ours} vs {llama} (tg{args.new_tokens})")
        ratio("prefill", f"{ours}-prefill", llama, f"prefill, {ours} vs {llama} (pp{args.prompt_tokens})")


def agreement(args) -> None:
    """Greedy stories and losses with fp32, bf16 and int8 decoding weights, from real story openings."""
    import numpy as np
    import torch

    from tinystories.decoding import decoding_copy
    from tinystories.evaluate import score_tokens
    from tinystories.generate import generate

    model, tokenizer = load_model(args.checkpoint)
    openings = stories(SHARED / "tinystories" / "TinyStoriesV2-valid.head.txt")[: args.agreement]
    prompts = [tokenizer.encode(" ".join(s.split()[:8])) for s in openings]  # the first eight words
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}
    written = {name: generate(model, prompts, args.new_tokens, temperature=0.0, dtype=dt)
               for name, dt in dtypes.items()}
    print(f"greedy, {len(prompts)} real openings, {args.new_tokens} new tokens each")
    for a, b in (("bf16", "fp32"), ("int8", "fp32"), ("int8", "bf16")):
        same_prefix, same = [], 0
        for x, y in zip(written[a], written[b]):
            same_prefix.append(next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y))))
            same += sum(s == t for s, t in zip(x, y))
        total = sum(len(y) for y in written[b])
        print(f"  {a} vs {b}: {same / total:.1%} of tokens equal at their position, "
              f"{sum(x == y for x, y in zip(written[a], written[b]))}/{len(prompts)} stories identical; tokens before "
              f"the first difference: median {median(same_prefix):.0f}, min {min(same_prefix)}")

    story_tokens = [t for s in openings for t in tokenizer.encode(s) + [tokenizer.eot_id]]
    sets = {"stories": np.asarray(story_tokens, dtype=np.int64)}
    if args.data:
        from tinystories.data import open_split, read_meta
        from tinystories.tokenizer import check_same_tokenizer

        if args.checkpoint:
            from tinystories.checkpoint import read_checkpoint_config

            ours, theirs = read_checkpoint_config(args.checkpoint)["tokenizer"], read_meta(args.data)["tokenizer"]
            check_same_tokenizer(ours, theirs, f"checkpoint {args.checkpoint}", f"data {args.data}")
        test = np.asarray(open_split(args.data, "test")[: args.test_tokens], dtype=np.int64)
        ends = np.nonzero(test == tokenizer.eot_id)[0]
        sets[f"test split of {args.data} (first {ends[-1] + 1:,} tokens)"] = test[: ends[-1] + 1]  # whole stories
    for what, tokens in sets.items():
        nats = {}
        for name, dt in dtypes.items():
            total, count = score_tokens(decoding_copy(model, dt), tokens, tokenizer.eot_id, progress=False)
            nats[name] = total / count
        print(f"loss of {what}: " + ", ".join(f"{k} {v:.5f}" for k, v in nats.items()) + " nats/token; "
              f"int8 vs bf16 {nats['int8'] - nats['bf16']:+.5f} ({(nats['int8'] - nats['bf16']) / nats['bf16']:+.3%}), "
              f"bf16 vs fp32 {(nats['bf16'] - nats['fp32']) / nats['fp32']:+.3%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare", choices=["transformers"], default="transformers", help="the baseline (only one)")
    ap.add_argument("--sides", nargs="+", choices=SIDES, default=DEFAULT_SIDES, help="what to time")
    ap.add_argument("--checkpoint", default=None, help="a trained checkpoint or run folder (default: random 33m)")
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--prompt-tokens", type=int, default=256, help="tokens of the prefill sides' prompt")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs per side first")
    ap.add_argument("--rounds", type=int, default=5, help="timed runs per side (medians reported)")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads of every side, llama.cpp's included (default: torch's, one per core)")
    ap.add_argument("--llama-bench", default=None, metavar="PATH", help="an existing llama-bench binary to time too")
    ap.add_argument("--gguf", nargs="+", default=[], metavar="FILE", help="GGUF files for --llama-bench, one side each")
    ap.add_argument("--agreement", type=int, default=0, metavar="N",
                    help="compare N greedy stories and losses of fp32, bf16 and int8 weights instead of timing")
    ap.add_argument("--data", default=None, help="with --agreement: also the loss of this DATA_DIR's test split")
    ap.add_argument("--test-tokens", type=int, default=200_000, help="with --data: how much of the test split")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.llama_bench and not args.gguf:
        ap.error("--llama-bench needs --gguf FILE [FILE ...]")
    if args.worker:
        serve(lambda: setup_side(args.worker, args))
    elif args.agreement:
        agreement(args)
    else:
        compare(args)


if __name__ == "__main__":
    main()
