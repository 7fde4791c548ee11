"""`tinystories evaluate`: loss, perplexity and bits per byte of a checkpoint on stories.

    tinystories evaluate --checkpoint runs/tiny --data data/ts --split test --json out/test.json
    tinystories evaluate --checkpoint runs/tiny --text TinyStoriesV2-GPT4-valid.txt

What is scored. Every token of the split exactly once: each story's tokens and the end-of-text
token that closes it (so `tokens` equals the split's token count in meta.json). Each story is
scored on its own, with its own beginning as context and nothing of the stories around it: the
model reads `<|endoftext|> story` and predicts `story <|endoftext|>`. The leading end-of-text is
what precedes every story in training, so the first word is predicted the way it was learned.
Scoring story by story makes the numbers independent of story order, which is why `--text FILE`
gives exactly the numbers of `--data DIR --split` made from that file.

Stories longer than block_size. A story of L > block_size targets is read through windows of
block_size tokens that start every `stride` tokens (default block_size // 2), the last one aligned
to the story's end. The first window scores all its targets; every later window scores only the
targets no earlier window scored. So each target is scored exactly once, and every target after
the first block_size has at least block_size - stride tokens of its story before it (Press et al.
2021 call this sliding-window evaluation). `plan_windows` is that rule as a pure function.

The numbers (units in their names):
    loss           token-weighted mean cross-entropy in nats per token, over every scored token
    perplexity     exp(loss)
    bits_per_byte  total nats / ln 2 / UTF-8 bytes of the stripped story texts. The end-of-text
                   targets count in the nats (they carry "the story ends here"), but not in the
                   bytes, since the separator is no part of any story. Comparable across tokenizers.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from tinystories.errors import UserError

# -----------------------------------------------------------------------------
# Pure pieces: where the stories are, how long ones are windowed, the reduction


def story_bounds(tokens: np.ndarray, eot_id: int, chunk: int = 1 << 26) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) of each story's targets in a token stream; an end includes its EOT.

    A trailing piece with no end-of-text (a cut-off file) is a story too, so the stories cover
    every token. Searched in chunks so a multi-GB memmap never needs a full-size boolean mask.
    """
    eots = [np.flatnonzero(tokens[i : i + chunk] == eot_id) + i for i in range(0, len(tokens), chunk)]
    ends = np.concatenate(eots) + 1 if eots else np.zeros(0, dtype=np.int64)
    if len(tokens) > (ends[-1] if len(ends) else 0):
        ends = np.append(ends, len(tokens))
    ends = ends.astype(np.int64)
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64) if len(ends) else ends.copy()
    return starts, ends


def plan_windows(length: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows (begin, score_from, end) over a story of `length` targets, each target scored once.

    Window k reads positions [begin, end) and scores targets [score_from, end). Windows begin at
    0, stride, 2*stride, ... until one reaches the end; the last is aligned to the end so it is
    full. Every scored target beyond the first window has >= block_size - stride earlier tokens in
    its window.
    """
    if not 1 <= stride <= block_size:
        raise ValueError(f"stride must be in [1, block_size={block_size}], got {stride}")
    if length <= block_size:
        return [(0, 0, length)]
    windows, begin, scored = [], 0, 0
    while True:
        end = begin + block_size
        if end >= length:
            begin, end = length - block_size, length
        windows.append((begin, scored, end))
        if end == length:
            return windows
        scored, begin = end, begin + stride


def summarize(total_nats: float, tokens: int, n_bytes: int) -> dict:
    """The reported numbers from the two sums (token-weighted, never a mean of batch means)."""
    loss = total_nats / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": total_nats / math.log(2) / n_bytes if n_bytes else None,
        "total_nats": total_nats,
        "tokens": tokens,
        "bytes": n_bytes,
    }


# -----------------------------------------------------------------------------
# Scoring


def _jobs(tokens: np.ndarray, eot_id: int, block_size: int, stride: int) -> np.ndarray:
    """All windows of all stories as rows (story_start, begin, score_from, end), longest first."""
    starts, ends = story_bounds(tokens, eot_id)
    lengths = ends - starts
    short = lengths <= block_size  # nearly every story: one window, built without a Python loop
    rows = [np.stack([starts[short], np.zeros(short.sum(), np.int64), np.zeros(short.sum(), np.int64),
                      lengths[short]], axis=1)]
    for s, L in zip(starts[~short], lengths[~short]):
        rows.append(np.array([(s, b, f, e) for b, f, e in plan_windows(int(L), block_size, stride)], np.int64))
    jobs = np.concatenate(rows).reshape(-1, 4)
    # longest first: batches of similar length waste little on padding, and an out-of-memory
    # error (if the batch is too big) shows up at once rather than at the end
    return jobs[np.argsort(-(jobs[:, 3] - jobs[:, 1]), kind="stable")]


def score_tokens(model, tokens: np.ndarray, eot_id: int, *, stride: int | None = None, batch_size: int = 8,
                 device="cpu", dtype=None, progress: bool = True) -> tuple[float, int]:
    """Total cross-entropy in nats over every token of `tokens`, and the number of tokens scored.

    `tokens` is a story stream as prepared data holds it (each story followed by `eot_id`); see
    the module docstring for what is scored with what context. dtype: autocast dtype (None = fp32).
    """
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    block_size = model.config.block_size
    stride = stride or max(1, block_size // 2)
    jobs = _jobs(tokens, eot_id, block_size, stride)
    device = torch.device(device)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype not in (None, torch.float32)
                else torch.autocast(device.type, enabled=False))
    total, count = 0.0, 0
    was_training = model.training
    model.eval()  # no dropout while scoring, whoever calls (training calls this on its live model)
    # disable=None: tqdm shows the bar only on a terminal, so logs and pipes stay clean
    bar = tqdm(total=len(tokens), unit="tok", unit_scale=True, desc="evaluate", disable=None if progress else True)
    try:
        with torch.inference_mode(), bar:
            for i in range(0, len(jobs), batch_size):
                batch = jobs[i : i + batch_size]
                T = int((batch[:, 3] - batch[:, 1]).max())
                x = np.zeros((len(batch), T), dtype=np.int64)  # padding after the real tokens: causal
                y = np.full((len(batch), T), -1, dtype=np.int64)  # attention never lets them be seen
                for r, (s, b, f, e) in enumerate(batch):
                    # inputs are the story shifted right behind an end-of-text: input i predicts target i
                    seq = np.asarray(tokens[s + b - 1 : s + e] if b > 0 else np.r_[eot_id, tokens[s : s + e]])
                    n = e - b
                    x[r, :n] = seq[:n]
                    y[r, f - b : n] = seq[f - b + 1 : n + 1]
                xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
                with autocast:
                    logits, _ = model(xt)  # (B, T, vocab_size)
                nats = F.cross_entropy(logits.float().flatten(0, 1), yt.flatten(), ignore_index=-1, reduction="none")
                # float64 sums, exact enough over billions of tokens, made by numpy on the host: no
                # float64 tensor on the device (MPS has none)
                total += float(nats.cpu().numpy().astype(np.float64).sum())
                scored = int((y != -1).sum())
                count += scored
                bar.update(scored)
    finally:
        model.train(was_training)
    return total, count


# -----------------------------------------------------------------------------
# The two sources: a prepared split, or a text file


def text_stories(path) -> tuple[list[str], int]:
    """The stories of a text file and their UTF-8 bytes, read and cleaned by prepare's own code.

    The same checks (UTF-8, separators present), mojibake repair, stripping and dropping of empty
    stories as `tinystories prepare`, so a split made from this file holds exactly these stories
    (unless it was prepared with --dedupe and the file repeats a story). Official-format .txt, and
    whatever else prepare reads (.json, .jsonl, .parquet).
    """
    from tinystories.prepare import FORMATS, Source, check_source, clean_stories, new_counts

    path = Path(path)
    if not path.is_file():
        raise UserError(f"text file {path} does not exist")
    if path.suffix.lower() not in FORMATS:
        raise UserError(f"{path}: unsupported file type {path.suffix or '(no extension)'!r}; use an official-format "
                        ".txt (each story followed by a <|endoftext|> line), .json, .jsonl or .parquet")
    src = Source(path, {"path": str(path.resolve())})
    check_source(src, lambda n: None)
    pairs = list(clean_stories([src], new_counts(), lambda n: None))
    return [story for story, _ in pairs], sum(n for _, n in pairs)


def tokenize_stories(stories: list[str], tokenizer) -> np.ndarray:
    """The token stream prepare writes for these stories (its own function): each followed by end-of-text."""
    from tinystories.prepare import encode_stories

    return encode_stories(tokenizer, stories, np.int64)


def evaluate(ckpt, *, data=None, split="val", text=None, stride=None, batch_size=8, device="cpu",
             dtype=None, progress=True) -> dict:
    """Score a loaded checkpoint on a prepared split (`data`, `split`) or a text file (`text`)."""
    from tinystories.data import open_split, read_meta
    from tinystories.tokenizer import check_same_tokenizer

    block_size = ckpt.model.config.block_size
    stride = stride or max(1, block_size // 2)
    if not 1 <= stride <= block_size:
        raise UserError(f"--stride must be between 1 and block_size ({block_size}), got {stride}")
    tok_spec = ckpt.config["tokenizer"]
    if data is not None:
        meta = read_meta(data)
        check_same_tokenizer(tok_spec, meta["tokenizer"], f"checkpoint {ckpt.path}", f"data {data}")
        tokens = open_split(data, split)
        info = meta["splits"][split]
        stories, n_bytes = info["stories"], info["bytes"]
        source = {"data": str(data), "split": split}
    else:
        story_texts, n_bytes = text_stories(text)
        tokens = tokenize_stories(story_texts, ckpt.tokenizer)
        stories = len(story_texts)
        source = {"text": str(text), "split": None}
    if len(tokens) == 0:
        raise UserError(f"{text or f'the {split} split of {data}'} holds no stories to score")

    t0 = time.perf_counter()
    total, count = score_tokens(ckpt.model, tokens, tok_spec["eot_id"], stride=stride, batch_size=batch_size,
                                device=device, dtype=dtype, progress=progress)
    seconds = time.perf_counter() - t0
    assert count == len(tokens), (count, len(tokens))  # every token scored exactly once
    return {
        **summarize(total, count, n_bytes),
        "stories": stories,
        "tokenizer": tok_spec["name"],
        **source,
        "checkpoint": str(ckpt.path),
        "step": ckpt.config.get("step"),
        "settings": {
            "context": "per story, behind one end-of-text token; sliding windows beyond block_size",
            "block_size": block_size,
            "stride": stride,
            "batch_size": batch_size,
            "device": str(device),
            "dtype": str(dtype or "float32").replace("torch.", ""),
            "tokenizer_spec": tok_spec,
            "model": ckpt.config.get("model"),
        },
        "seconds": round(seconds, 3),
        "tokens_per_second": round(count / seconds, 1) if seconds > 0 else None,
    }


def summary_lines(r: dict) -> list[str]:
    """The short human summary printed on stdout."""
    where = f"the {r['split']} split of {r['data']}" if r.get("data") else r["text"]
    bpb = f"{r['bits_per_byte']:.4f}" if r["bits_per_byte"] is not None else "n/a"
    return [
        f"{r['checkpoint']} (step {r['step']}) on {where}",
        f"  {r['stories']:,} stories, {r['tokens']:,} {r['tokenizer']} tokens, {r['bytes']:,} bytes",
        f"  loss {r['loss']:.4f} nats/token | perplexity {r['perplexity']:.3f} | {bpb} bits/byte",
        f"  block_size {r['settings']['block_size']}, stride {r['settings']['stride']}, "
        f"{r['seconds']:.1f} s ({r['tokens_per_second'] or 0:,.0f} tokens/s)",
    ]


def run(args) -> int:
    from tinystories.checkpoint import load_checkpoint
    from tinystories.device import pick_device, pick_dtype
    from tinystories.outputs import check_output_file, write_file

    if args.json:  # before the evaluation, which can take long, not after it
        check_output_file(args.json, "--json")
    device = pick_device(args.device)
    dtype = pick_dtype(device, args.dtype)
    ckpt = load_checkpoint(args.checkpoint, device)
    result = evaluate(ckpt, data=args.data, split=args.split, text=args.text, stride=args.stride,
                      batch_size=args.batch_size, device=device, dtype=dtype)
    if args.json:
        write_file(args.json, json.dumps(result, indent=2) + "\n")
    print("\n".join(summary_lines(result)))
    if args.json:
        print(f"  wrote {args.json}")
    return 0
