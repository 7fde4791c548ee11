"""Writing stories: samplers, KV-cache decoding, streaming, and the `tinystories generate` command.

    tinystories generate --checkpoint RUN_DIR --prompt "Once upon a time" --seed 1

    tokens = sample_next(logits, temperature=0.8, top_p=0.95, generator=g)     # (B, V) -> (B,)
    for step in stream(model, [prompt_ids], 200, eot_id=tok.eot_id):          # one list per step
        ...                                                                    # [token or None] * B
    stories = generate(model, [ids_a, ids_b], 200, eot_id=tok.eot_id)         # new tokens per prompt

Decoding (gpt-fast style): one preallocated KV cache, one prefill of the left-padded batch of
prompts (padding masked by `key_mask`, each row's positions starting at 0 on its first real token),
then one-token decode steps. A row stops at end-of-text (which is yielded as its last token); the
batch stops when every row has stopped or after `max_new_tokens` steps. `use_cache=False` is the
oracle: a full forward over each row's visible context at every step, nothing cached, no padding.

Contexts longer than block_size (sliding window). Positions are learned, so the model cannot see
more than block_size tokens, and a cached key is only valid while its token keeps its position.
nanoGPT's rule, "crop the context to its last block_size tokens every step", shifts every position
at every step, which makes a cache useless. Ours: a row's visible context starts at `start`; when
it outgrows block_size, `start` jumps so that only the last `window_keep` tokens stay visible (by
default block_size // 2), and the cache is refilled from them (one prefill), after which decoding
is incremental again for block_size - window_keep steps. The rule (`window_start`) looks at one
row only, so a row writes the same greedy story alone or in any batch; both paths follow it, so
the cache path equals the oracle token for token. In a batch whose rows jump at different steps,
each jump refills the whole batch (up to B prefills per block_size - window_keep steps); the
command's batch (one prompt, N samples) jumps all at once. window_keep=block_size is exactly nanoGPT's crop
(at the price of a prefill per step once the context is full); a smaller window_keep trades
context right after a jump for speed. A prompt longer than block_size is cut the same way.

Rotary positions (RoPE, no local layers) slide without a refill: a key holds its position in its
rotation and attention scores depend only on distances, so once the cache is full each new token
replaces the oldest (a ring, `KVCache.update`) and every token sees the last block_size tokens,
itself included, however long the story grows. The oracle computes the same thing: a forward over
the whole context in which every layer sees only the last block_size tokens (`window`). Such a
model ignores `window_keep`. Through its layers a token reaches further back: each layer looks
block_size - 1 tokens back, so the next token depends on the last `reach` = n_layer * (block_size
- 1) + 1 tokens and on nothing before them. The cache is filled from there (chunks of at most
block_size tokens, written across the ring's end), so a prompt of any length costs a prefill of at
most `reach` tokens, and the tokens equal the oracle's over the whole context.

Speed: the cached path decodes with a copy of the model laid out for one-token steps (on the CPU,
matmul weights in oneDNN's blocked layout, bf16 where the CPU multiplies bf16 natively) and runs its
decode steps as a flat list of operations; `tinystories/decoding.py` says why and what each is worth.
The oracle always runs the model as it is.
"""

from __future__ import annotations

import math
import secrets
import sys
from typing import Iterator

import torch
from torch import Tensor

from tinystories.decoding import DecodeStep, decode_dtype_choice, decoding_copy
from tinystories.errors import UserError

# A prefill computes the output layer at the last position only, so what grows with the prompt
# is the activations: per token ≈ 4 * n_embd MLP floats and n_head * max_len attention scores.
# Long prompts of large batches go through in chunks that keep them under this many floats (64 MiB
# in fp32); a single `33m` prompt of 512 tokens is one chunk.
_PREFILL_ACTIVATIONS_BUDGET = 1 << 24


# -----------------------------------------------------------------------------
# Samplers: pure functions of the logits and an explicit generator


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Refuse sampler settings that have no meaning, with a message that says what is allowed."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise UserError(f"temperature must be a number >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise UserError(f"top-k must be an integer >= 1 (or not given), got {top_k}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise UserError(f"top-p must be in (0, 1] (1 keeps every token), got {top_p}")


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One token id per row of `logits` (B, V) -> (B,) int64.

    temperature 0 is greedy (argmax; the lowest id wins a tie). top_k keeps exactly the k most
    likely tokens, chosen by index so ties at the k-th value cannot let more in. top_p keeps the
    smallest set of most likely tokens whose probability reaches top_p (after top_k), which always
    includes the most likely token. The same `generator` state gives the same tokens.

    Only candidates are sorted and sampled from: the top_k tokens, or for top_p alone the 64 most
    likely, then 256, ... until every row's nucleus ends inside them. Sorting all 50,257 GPT-2
    tokens took 7.6 ms a call on our CPU (more than a whole decode step of the `33m` model); a
    peaked distribution's shortlist, 0.6 ms (BENCHMARKS.md).
    """
    check_sampling(temperature, top_k, top_p)
    logits = logits.float()
    # Below float32's smallest normal number a temperature is greedy in effect, and one under ~1e-45
    # becomes 0.0 in float32, where dividing by it would give 0/0 = NaN for the most likely token.
    if temperature < torch.finfo(torch.float32).tiny:
        return logits.argmax(dim=-1)
    # Subtract the max before dividing, so a tiny temperature gives -inf, never inf - inf = NaN.
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    V = logits.size(-1)
    cut_k = top_k is not None and top_k < V
    nucleus = top_p is not None and top_p < 1.0
    if not cut_k and not nucleus:
        return _draw(logits.softmax(dim=-1), generator)
    k = top_k if cut_k else min(V, 64)
    while True:
        values, chosen = torch.topk(logits, k, dim=-1)  # (B, k): exactly k tokens, ties or not
        if cut_k:
            probs = values.softmax(dim=-1)  # renormalised over the k kept tokens
        else:
            probs = (values - logits.logsumexp(dim=-1, keepdim=True)).exp()  # shares of the whole vocabulary
        if not nucleus:
            break
        # most likely first, the lowest id first among equals (topk leaves ties in any order)
        by_id = chosen.argsort(dim=-1)
        chosen, probs = chosen.gather(-1, by_id), probs.gather(-1, by_id)
        probs, order = probs.sort(dim=-1, descending=True, stable=True)
        chosen = chosen.gather(-1, order)
        mass_before = probs.cumsum(dim=-1) - probs  # (B, k); exactly 0 for the first
        keep = mass_before < top_p  # stop once the kept tokens reach top_p
        # the most likely token always: a top_p below float32's resolution (1e-320) compares 0 < 0
        keep[:, 0] = True
        if not cut_k and k < V:
            # the nucleus may go on past the candidates, or end on a value that tokens left out share
            last_kept = probs.gather(-1, keep.sum(dim=-1, keepdim=True) - 1)  # (B, 1)
            if bool((keep[:, -1] | (probs[:, -1] == last_kept[:, 0])).any()):
                k = min(V, 4 * k)
                continue
        probs = probs.masked_fill(~keep, 0.0)
        break
    return chosen.gather(-1, _draw(probs, generator)[:, None]).squeeze(-1)


def _draw(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One index per row of `probs` (B, n), in proportion to its (unnormalised) values."""
    device = probs.device
    if generator is not None and generator.device != device:
        probs = probs.to(generator.device)  # sample where the generator lives: a seed means one thing
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(device)


def _finite(logits: Tensor, step: int) -> Tensor:
    """`logits`, refused with one line if any is NaN or inf: torch.multinomial would fail on them with
    a RuntimeError, and argmax (greedy) would pick a token that means nothing."""
    if not bool(torch.isfinite(logits).all()):
        raise UserError(f"the model's logits are not finite (NaN or inf) at step {step + 1}: its weights are damaged")
    return logits


# -----------------------------------------------------------------------------
# Decoding


def slides(config) -> bool:
    """Whether the model slides past block_size as a ring: rotary positions, no local layers."""
    return config.pos_embedding == "rope" and "local" not in (config.attention_layers or ())


def reach(config) -> int:
    """How many of the last tokens the next token of a RoPE model without local layers depends on:
    each layer sees the last block_size tokens, so n_layer layers reach n_layer * (block_size - 1)
    tokens behind it."""
    return config.n_layer * (config.block_size - 1) + 1


def window_start(n_tokens: int, start: int, block_size: int, window_keep: int) -> int:
    """Where a row's visible context begins, given its length and where it began one step ago."""
    if n_tokens - start > block_size:
        return n_tokens - window_keep
    return start


def stream(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eot_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    window_keep: int | None = None,
    dtype: torch.dtype | None = None,
) -> Iterator[list[int | None]]:
    """Continue each prompt, yielding once per step the new token of every row (None once it ended).

    A row ends after it produced `eot_id` (yielded as its last token). Stops when every row has
    ended or after `max_new_tokens` steps. The model is put in eval mode meanwhile and given back
    in the mode it came in. See the module docstring for contexts longer than block_size
    (`window_keep`, default block_size // 2) and for what `use_cache=False` computes. `dtype`:
    the weights the cached path decodes with (default: the model's own; see `decoding_copy`).
    """
    check_sampling(temperature, top_k, top_p)
    block_size, vocab_size = model.config.block_size, model.config.vocab_size
    window_keep = block_size // 2 if window_keep is None else window_keep
    if not 1 <= window_keep <= block_size:
        raise ValueError(f"window_keep must be in [1, block_size={block_size}], got {window_keep}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (use [eot_id] to start a fresh story)")
    if any(not 0 <= t < vocab_size for p in prompts for t in p):
        raise ValueError(f"prompt token ids must be in [0, vocab_size={vocab_size})")

    contexts = [list(p) for p in prompts]  # every token of each row so far, prompt included
    # RoPE without local layers: the cache slides as a ring, every token seeing the last block_size
    ring = slides(model.config)
    starts = [0 if ring else window_start(len(c), 0, block_size, window_keep) for c in contexts]
    # the cache holds each row's tokens from `fed` on (its positions count from there): the visible
    # context, or in a ring the tokens the next one depends on (the oracle runs over all of them)
    fed, behind = starts, reach(model.config) if ring else block_size
    finished = [False] * len(contexts)
    decoder = None
    if use_cache:
        longest = max(len(c) for c in contexts)
        fast = decoding_copy(model, dtype)
        with torch.inference_mode():
            decoder = _CachedDecoder(fast, len(contexts), min(block_size, longest + max_new_tokens))
    was_training = model.training
    model.eval()
    try:
        for step in range(max_new_tokens):
            new_starts = starts if ring else [window_start(len(c), s, block_size, window_keep)
                                                for c, s in zip(contexts, starts)]
            # No autograd graph (it would keep every step's activations alive). Entered per step,
            # not around the generator, so the caller's code between steps keeps its own mode.
            with torch.inference_mode():
                if decoder is None:
                    logits = _full_forward_logits(model, contexts, new_starts, block_size if ring else None)
                elif step == 0 or new_starts != starts:  # the first step, or a window jumped: refill
                    fed = [max(s, len(c) - behind) for c, s in zip(contexts, new_starts)]
                    logits = decoder.prefill([c[f:] for c, f in zip(contexts, fed)])
                else:  # the cache holds c[f:-1] of each row: feed the token sampled last
                    last = [c[-1] for c in contexts]
                    logits = decoder.decode(last, [len(c) - 1 - f for c, f in zip(contexts, fed)])
                tokens = sample_next(_finite(logits, step), temperature, top_k, top_p, generator).tolist()
            starts = new_starts

            out: list[int | None] = []
            for row, token in enumerate(tokens):
                # Ended rows keep decoding (the batch moves in lockstep) but their tokens are dropped.
                contexts[row].append(token)
                out.append(None if finished[row] else token)
                finished[row] = finished[row] or token == eot_id
            yield out
            if all(finished):
                return
    finally:
        model.train(was_training)


def generate(model, prompts: list[list[int]], max_new_tokens: int, **kwargs) -> list[list[int]]:
    """The new tokens of each prompt (ending with eot_id when the model produced it); see `stream`."""
    stories: list[list[int]] = [[] for _ in prompts]
    for step in stream(model, prompts, max_new_tokens, **kwargs):
        for story, token in zip(stories, step):
            if token is not None:
                story.append(token)
    return stories


def _full_forward_logits(model, contexts: list[list[int]], starts: list[int], window: int | None = None) -> Tensor:
    """The oracle: next-token logits (B, V) from a plain forward over each row's visible context
    (a RoPE model's whole context, each token seeing the last `window` tokens)."""
    device = model.transformer.wte.weight.device
    rows = []
    for context, start in zip(contexts, starts):
        idx = torch.tensor([context[start:]], dtype=torch.long, device=device)  # (1, T)
        logits, _ = model(idx, window=window)
        rows.append(logits[0, -1])
    return torch.stack(rows)  # (B, V)


class _CachedDecoder:
    """A preallocated KV cache over a left-padded batch: `prefill` the windows, then `decode`."""

    def __init__(self, model, batch_size: int, max_len: int):
        self.model = model
        self.step = DecodeStep.of(model)  # the flat one-token step, where the copy is packed
        self.device = model.transformer.wte.weight.device
        self.cache = model.new_kv_cache(batch_size=batch_size, max_len=max_len)
        self.key_mask: Tensor | None = None  # (B, max_len), False on padding; None when no row is padded

    def prefill(self, windows: list[list[int]]) -> Tensor:
        """Empty the cache and fill it with each row's window; logits (B, V) after the last token."""
        B, T = len(windows), max(len(w) for w in windows)
        pad = torch.tensor([T - len(w) for w in windows], device=self.device)  # (B,)
        idx = torch.tensor([[0] * (T - len(w)) + w for w in windows], dtype=torch.long, device=self.device)
        # Each row's positions start at 0 on its first real token; padding sits at 0 too (masked).
        pos = (torch.arange(T, device=self.device)[None, :] - pad[:, None]).clamp(min=0)  # (B, T)
        self.key_mask = None
        if bool((pad > 0).any()):
            self.key_mask = torch.arange(self.cache.max_len, device=self.device)[None, :] >= pad[:, None]
        self.cache.length = 0  # stale keys past `length` are never attended, only overwritten
        L, config = self.cache.max_len, self.model.config
        # A RoPE window longer than the cache goes on past its end (a ring) in chunks of at most L
        # tokens, each attending over the L slots and itself.
        keys = 2 * L if T > L else L
        chunk = min(L, max(1, _PREFILL_ACTIVATIONS_BUDGET // (B * (4 * config.n_embd + config.n_head * keys))))
        real = torch.arange(T, device=self.device)[None, :] >= pad[:, None]  # (B, T), False on padding
        for i in range(0, T, chunk):
            j = min(i + chunk, T)
            key_mask = self.key_mask
            if key_mask is not None:  # the keys so far, or past the end: the slots', then the chunk's
                key_mask = key_mask[:, :j] if j <= L else torch.cat((key_mask, real[:, i:j]), dim=1)
            logits, _ = self.model(idx[:, i:j], kv_cache=self.cache, pos=pos[:, i:j], key_mask=key_mask, only_last=True)
            if j > L and self.key_mask is not None:  # the slots now hold tokens i..j-1
                self.key_mask[:, torch.arange(i, j, device=self.device) % L] = real[:, i:j]
        return logits[:, -1]

    def decode(self, tokens: list[int], positions: list[int]) -> Tensor:
        """Append one token per row at the given positions; logits (B, V) after it."""
        idx = torch.tensor(tokens, dtype=torch.long, device=self.device)  # (B,)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)  # (B,)
        key_mask, slot = None, self.cache.length % self.cache.max_len
        if self.key_mask is not None:
            # the new key's slot (in a ring: the oldest, overwritten); a query always sees itself, so
            # no row of only padding makes attention NaN
            self.key_mask[:, slot] = True
            key_mask = self.key_mask[:, : self.cache.length + 1]
        if self.step is not None:
            logits = self.step(idx, pos, self.cache, key_mask)
        else:
            logits = self.model(idx[:, None], kv_cache=self.cache, pos=pos[:, None], key_mask=key_mask)[0][:, -1]
        return logits


# -----------------------------------------------------------------------------
# Text as it is written, and the command


class TextStream:
    """Turns tokens into text one at a time without printing half a character.

    A token can hold part of a multi-byte UTF-8 character; decoding it alone gives U+FFFD. Tokens
    are held back until the text they decode to no longer ends in U+FFFD (or the story ends).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pending: list[int] = []

    def push(self, token: int) -> str:
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd"):
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending = []
        return text


def run(args) -> int:
    """`tinystories generate`: print the prompt, then the story as it is written.

    With --num-samples N > 1 the N stories are written in one batch; each is printed under a
    `=== sample i/N ===` line, the first as it is written, the others when the batch is done.
    An empty prompt starts a story from scratch (the context is just end-of-text). A prompt
    longer than block_size is cut to its end, as the sliding window would (a note on stderr says
    how much of it the model sees).
    """
    from tinystories.checkpoint import load_checkpoint
    from tinystories.cli import MAX_NEW_TOKENS, MAX_SAMPLES, SEED_MAX
    from tinystories.device import describe, pick_device

    # The command line checks these as it parses them; here for callers that build `args` themselves.
    check_sampling(args.temperature, args.top_k, args.top_p)
    if not 1 <= args.max_new_tokens <= MAX_NEW_TOKENS:
        raise UserError(f"--max-new-tokens must be from 1 to {MAX_NEW_TOKENS:,}, got {args.max_new_tokens}")
    if not 1 <= args.num_samples <= MAX_SAMPLES:
        raise UserError(f"--num-samples must be from 1 to {MAX_SAMPLES} (each sample holds its own KV cache), "
                        f"got {args.num_samples}")
    if args.seed is not None and not 0 <= args.seed <= SEED_MAX:  # what torch.Generator.manual_seed takes, and more
        raise UserError(f"--seed must be an integer from 0 to 2**63 - 1, got {args.seed}")
    device = pick_device(args.device)
    # --dtype (auto: bf16 matmul weights where the hardware has bf16; see "Speed" above)
    dtype, why = decode_dtype_choice(device, args.dtype)
    ckpt = load_checkpoint(args.checkpoint, device)
    model, tokenizer = ckpt.model, ckpt.tokenizer
    block_size = model.config.block_size

    prompt_ids = tokenizer.encode(args.prompt) or [tokenizer.eot_id]
    if len(prompt_ids) > block_size:
        if slides(model.config):
            sees = (f"each token sees the last {block_size}, and through {model.config.n_layer} layers the next "
                    f"one depends on the last {reach(model.config):,} at most")
        else:
            sees = f"the model sees only its last {block_size // 2}"
        print(f"tinystories generate: note: the prompt has {len(prompt_ids):,} tokens, more than the "
              f"model's block_size {block_size}; {sees}", file=sys.stderr)
    # once nothing is left to refuse: a mistake stays a one-line error
    print(f"tinystories generate: {describe(device, dtype, why)}", file=sys.stderr)
    seed = args.seed
    if seed is None:
        seed = secrets.randbits(63)
        print(f"tinystories generate: seed {seed} (pass --seed {seed} to write these stories again)", file=sys.stderr)
    generator = torch.Generator(device=device).manual_seed(seed)

    n = args.num_samples
    texts = [TextStream(tokenizer) for _ in range(n)]
    later = [""] * n  # samples 2..N, printed once the batch is done
    out = sys.stdout
    if n > 1:
        out.write(f"=== sample 1/{n} ===\n")
    out.write(args.prompt)
    out.flush()
    steps = stream(model, [prompt_ids] * n, args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, eot_id=tokenizer.eot_id, generator=generator, dtype=dtype)
    for step in steps:
        for row, token in enumerate(step):
            if token is None or token == tokenizer.eot_id:
                continue
            text = texts[row].push(token)
            if row == 0:
                if text:
                    out.write(text)
                    out.flush()
            else:
                later[row] += text
    out.write(texts[0].flush() + "\n")
    for row in range(1, n):
        out.write(f"=== sample {row + 1}/{n} ===\n{args.prompt}{later[row]}{texts[row].flush()}\n")
    out.flush()
    return 0
