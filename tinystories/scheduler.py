"""Continuous batching: one worker thread decodes every running request in one forward pass.

    scheduler = Scheduler(model, slots=16, eot_id=tok.eot_id)
    job = Job(prompt_ids, max_tokens=200, deliver=print, temperature=0.8, top_p=0.95, seed=1)
    scheduler.submit(job)       # deliver((token, None)) per token, then deliver((token, "stop" | "length"))
    job.cancel()                # the client left: the job leaves the batch before the next step
    scheduler.close()

`tinystories serve` is the HTTP layer (serve.py); this module knows nothing of HTTP or text. It
owns a KV cache of `slots` rows of block_size positions each. A request takes a free slot (or waits
for one, first come first served), fills it with its prompt (prefill), then decodes one token per
step together with every other request in its decode phase, and leaves at end-of-text, at
max_tokens, or when cancelled. Requests join and leave between steps.

Batch invariance: a request's text never depends on what else runs. Each request samples with
its own torch.Generator and settings from its own row of logits (`sample_next` on that row
alone, as `stream` does at batch 1). The row's logits depend on nothing but the row:
- the decode step runs at one of a few fixed shapes, `step_shapes` (numbers of rows: 1, 2, 4,
  ... up to `slots`), the smallest that holds the slots in decode; the running requests are kept
  in the lowest slots (one that sits above a free slot moves down, its cache rows copied), so a
  lone request's step has 1 row (or 2) and 16 streams' have 16. A shape is used only if a row's
  logits at that shape are those of the full shape, bit for bit: the scheduler proves it when it
  starts (`_invariant_shapes`: random rows at every context length, each candidate shape against
  the full one), because whether a GEMM's row depends on the number of rows M is the kernel's
  choice, made by shape alone. Measured here (oneDNN, torch 2.13, AMD EPYC with AVX-512 BF16): the
  packed bf16 matmul gives every row the same bits at every M from 1 to 16, so bf16 steps run at
  1, 2, 4, 8, 16 rows; the fp32 one sums a single row in another order than 2 to 16 rows, so fp32
  steps run at 2, 4, 8, 16 (a lone request pays for one thrown-away row). Rows of no decoding job
  (a request still prefilling, a free slot) compute a row that is thrown away. Attention runs
  over blocks of `attention_block` keys, each row's own keys selected by its mask, each block
  at one shape; as many blocks run as the longest context in the batch needs, and a block past
  a row's keys adds exactly nothing to it (`_attend`), so a row's attention does not depend on
  the others either.
- a prefill runs one request alone (batch 1, its own slot's cache), in chunks of
  `prefill_chunk` tokens whose boundaries depend only on the prompt: many requests' prefills are
  never batched together, since their shape would depend on who else arrived.
- what is written to the cache is written only into the request's own slot.
tests/test_scheduler.py checks the logits bit for bit: one request alone, and beside others of
other lengths and settings that join and leave around it, in another slot and moving down to
slot 0 as they leave (so at several step shapes), at fp32 and bf16; and every kept step shape
against the full one on other rows than the probe's.

`tinystories serve` decodes with the weights' dtype that `generate` picks (--dtype auto: bf16 on
CPUs that multiply it natively): there a step of 16 rows costs ~2.5x less in its matmuls than at
fp32 and every number of rows is invariant. --dtype int8 is not batch-invariant at any shape (an
int8 matmul quantizes its input with one scale over all its rows), so it skips the probe and
steps at every candidate shape (1, 2, 4, ... rows).

Why a few shapes rather than one (measured, `tiny` shape, 2 cores, BENCHMARKS.md): with every
step over all 16 slots, a lone request ran at 0.41x the speed of the server before batching; a
step of 16 rows costs ~2.9x one of 1 row at bf16, ~1.9x one of 2 rows at fp32. Shapes that
follow the batch exactly (3 rows for 3 requests) would be as cheap, but only a proof per shape
keeps them honest, and powers of two keep the probe short while wasting at most half the rows.

Against `tinystories.generate.stream` (a request alone through the library): the same sampling,
the same sliding window (below), and the same prefill for a prompt of up to `prefill_chunk`
tokens; the decode steps compute the same sums in another order (blocked attention; 2 rows at
fp32), so a logit can differ in its last bit, which moves a sampled token only when the draw
lands within that of a boundary (never seen in the tests, which compare the server's stories
with `generate`'s).

Prefill does not stall the running batch for long: each round of the worker fills the first
chunk of every request that just took a slot (a short prompt is then done: its first token comes
at once), then at most `prefill_chunk` more prompt tokens (whole chunks, the oldest request
first), then runs a decode step, then gives free slots to the requests that arrived meanwhile. A
long prompt is filled over several rounds while the others keep decoding, and a request that
arrives meanwhile gets its first chunk at the next round, with or without others decoding. What a
prompt costs is bounded whatever its length: at most block_size tokens are filled (learned
positions; `reach` for a ring, below).

Contexts longer than block_size, as `stream` does them:
- learned positions: the visible context starts at `start`; when it outgrows block_size, `start`
  jumps so that only the last `window_keep` (block_size // 2) tokens stay visible, and the slot is
  filled again from them (a prefill, like a new request's, chunks and all). A prompt longer
  than block_size is cut the same way.
- rotary positions (no local layers): the slot is a ring; every token sees the last block_size
  tokens, itself included. The next token depends on the last `reach` (n_layer * (block_size - 1)
  + 1) tokens only, so the slot is filled from there, in chunks that go on past the ring's end.
"""

from __future__ import annotations

import collections
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from tinystories.decoding import PackedLinear, PackedMLP, decoding_copy
from tinystories.errors import one_line
from tinystories.generate import reach, sample_next, slides, window_start
from tinystories.model import KVCache, rope_angles, rotate

PREFILL_CHUNK = 64  # prompt tokens a prefill forward pass takes at once, and filled per round of the worker
ATTENTION_BLOCK = 64  # keys a decode step's attention takes at once (Scheduler._attend)


@dataclass(eq=False)
class Job:
    """One request: its prompt and settings, where its tokens go, and its place in the batch.

    deliver((token, finish_reason)) is called from the worker thread for every sampled token,
    finish_reason None but on the last ("stop": the token is end-of-text; "length": max_tokens
    reached); deliver(exception) if the worker failed. It must be quick (hand the token on).
    """

    prompt_ids: list[int]
    max_tokens: int
    deliver: Callable
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    record_logits: bool = False  # keep each step's logits row in `logits` (tests check invariance with it)

    cancelled: threading.Event = field(default_factory=threading.Event)
    logits: list[Tensor] = field(default_factory=list)
    # the worker's state
    context: list[int] = field(default_factory=list)  # prompt and sampled tokens so far
    start: int = 0  # context[start:] is visible (a ring: what the next token depends on)
    filled: int = 0  # tokens of context[start:] in the slot's cache
    slot: int = -1
    generator: torch.Generator | None = None

    def cancel(self) -> None:
        """Leave the batch before the next step (thread-safe; the worker sends nothing more)."""
        self.cancelled.set()


class _SlotCache(KVCache):
    """One slot of the shared cache as a batch-1 KVCache for the model's forward pass: its tensors
    are views, so a prefill writes straight into the slot."""

    def __init__(self, cache: KVCache, slot: int, length: int):
        self.k, self.v, self.length = cache.k[:, slot : slot + 1], cache.v[:, slot : slot + 1], length


class Scheduler:
    """The worker thread, the shared KV cache and the queue of requests waiting for a slot."""

    def __init__(self, model, slots: int, eot_id: int, prefill_chunk: int = PREFILL_CHUNK,
                 window_keep: int | None = None, dtype: torch.dtype | None = None,
                 attention_block: int = ATTENTION_BLOCK, step_shapes: tuple[int, ...] | None = None):
        config = model.config
        if min(slots, prefill_chunk, attention_block) < 1:
            raise ValueError(f"slots, prefill_chunk and attention_block must be >= 1, got {slots}, {prefill_chunk} "
                             f"and {attention_block}")
        self.slots, self.eot_id, self.prefill_chunk = slots, eot_id, prefill_chunk
        self.attention_block = attention_block
        self.block_size = config.block_size
        self.window_keep = config.block_size // 2 if window_keep is None else window_keep
        if not 1 <= self.window_keep <= self.block_size:
            raise ValueError(f"window_keep must be in [1, block_size={self.block_size}], got {self.window_keep}")
        # RoPE without local layers slides as a ring; learned positions refill (see the module docstring)
        self.ring = slides(config)
        self.reach = reach(config)
        # The model laid out for decoding, as `stream` uses it (on the CPU: packed matmul weights).
        self.model = decoding_copy(model, dtype)
        self.int8 = dtype == torch.int8  # its rows share an input scale: no shape is batch-invariant
        self.device = model.transformer.wte.weight.device
        with torch.inference_mode():
            self.cache = self.model.new_kv_cache(batch_size=slots, max_len=config.block_size)
        # per layer: how many keys back it sees (None: all); GPT-Neo's local layers see window_size
        self.windows = [config.window_size if config.is_local(i) else None for i in range(config.n_layer)]
        # the copy's parts as the step uses them, per layer: its modules, attention scale and window
        transformer = self.model.transformer
        self.wte, self.ln_f, self.lm_head = transformer.wte.weight, transformer.ln_f, self.model.lm_head
        self.wpe = transformer.wpe.weight if "wpe" in transformer else None  # None: RoPE
        self.layers = [(b.ln_1, b.attn.c_attn, getattr(b.attn, "q_norm", None), getattr(b.attn, "k_norm", None),
                        b.attn.c_proj, b.attn.scale if b.attn.scale is not None else config.head_dim**-0.5,
                        b.ln_2, b.mlp, window) for b, window in zip(transformer.h, self.windows)]
        self.running: list[Job] = []  # in slots; filling or decoding
        self.free = list(range(slots - 1, -1, -1))  # slot numbers, the lowest taken first
        self.waiting: collections.deque[Job] = collections.deque()
        self.lock = threading.Condition()
        self.stopping = False
        with torch.inference_mode():
            self.step_shapes = self._invariant_shapes(step_shapes)
        self.thread = threading.Thread(target=self._work, name="tinystories-scheduler", daemon=True)
        self.thread.start()

    # -------------------------------------------------------------------------
    # The HTTP side's calls (any thread)

    def submit(self, job: Job) -> None:
        if not job.prompt_ids or job.max_tokens < 1:
            raise ValueError("a job needs at least one prompt token and max_tokens >= 1")
        job.generator = torch.Generator().manual_seed(job.seed)  # on the CPU: a seed means one story everywhere
        job.context = list(job.prompt_ids)
        if self.ring:  # the tokens before the last `reach` change nothing: never fed
            job.start = max(0, len(job.context) - self.reach)
        else:
            job.start = window_start(len(job.context), 0, self.block_size, self.window_keep)
        job.filled = 0
        with self.lock:
            if self.stopping:
                raise RuntimeError("the scheduler is closed")
            self.waiting.append(job)
            self.lock.notify()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker after its current step; jobs still there are told so (an exception)."""
        with self.lock:
            self.stopping = True
            self.lock.notify()
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(timeout)
        with self.lock:
            left, self.running, self.waiting = [*self.running, *self.waiting], [], collections.deque()
        for job in left:
            if not job.cancelled.is_set():
                job.deliver(RuntimeError("the server is stopping"))

    def load(self) -> tuple[int, int]:
        """(requests in slots, requests waiting for one)."""
        with self.lock:
            return len(self.running), len(self.waiting)

    # -------------------------------------------------------------------------
    # The worker

    def _work(self) -> None:
        with torch.inference_mode():  # per thread: the worker enters it itself
            while self._admit():
                try:
                    self._fill()
                    self._decode()
                except Exception as e:  # a bug: every running request hears of it, and the server goes on
                    print(f"tinystories serve: the decode step failed: {type(e).__name__}: {one_line(e)}", file=sys.stderr)
                    with self.lock:
                        for job in self.running:
                            job.deliver(e)
                        self._leave(list(self.running))

    def _admit(self) -> bool:
        """Drop cancelled jobs, give free slots to waiting ones; wait while there is nothing to do.
        False once the scheduler is closing."""
        with self.lock:
            while True:
                if self.stopping:
                    return False
                self._leave([job for job in self.running if job.cancelled.is_set()])
                while self.free and self.waiting:
                    job = self.waiting.popleft()
                    if not job.cancelled.is_set():
                        job.slot = self.free.pop()
                        self.running.append(job)
                self._compact()
                if self.running:
                    return True
                self.lock.wait()

    def _compact(self) -> None:
        """Keep the running jobs in the lowest slots, 0 .. len(running) - 1, so that a decode step
        can run at the smallest shape that holds them: a job in a higher slot moves (its cache
        rows are copied) into the lowest free one."""
        n = len(self.running)
        for job in sorted(self.running, key=lambda job: -job.slot):
            if job.slot < n or self.free[-1] >= n:
                break
            to = self.free.pop()
            kept = min(job.filled, self.block_size)  # the keys and values it has
            for t in (self.cache.k, self.cache.v):  # (n_layer, slots, n_head, L, head_dim)
                t[:, to, :, :kept] = t[:, job.slot, :, :kept]
            self.free.append(job.slot)
            self.free.sort(reverse=True)
            job.slot = to

    def _leave(self, jobs: list[Job]) -> None:
        for job in jobs:
            self.running.remove(job)
            self.free.append(job.slot)
            self.free.sort(reverse=True)

    def _fill(self) -> None:
        """Prefill: the first chunk of every new job at once (its time to the first token), then
        whole chunks, the oldest job first, until `prefill_chunk` tokens are filled this round.
        Bounded even with no job decoding: a request that arrives while a long prompt fills gets
        its first chunk at the next round, not after the whole prompt."""
        budget = self.prefill_chunk
        for job in list(self.running):
            if job.filled == 0 and len(job.context) == len(job.prompt_ids) and not job.cancelled.is_set():
                budget -= self._fill_chunk(job)
        for job in list(self.running):
            while budget > 0 and not job.cancelled.is_set() and self._filling(job):
                budget -= self._fill_chunk(job)
            if budget <= 0:
                return

    def _filling(self, job: Job) -> bool:
        """Whether the job's visible context is not yet in its slot (more than the last token missing,
        or nothing at all: a new or refilled slot is always filled by a prefill)."""
        missing = len(job.context) - job.start - job.filled
        return missing > 1 or job.filled == 0

    def _fill_chunk(self, job: Job) -> int:
        """Feed the next chunk of the job's visible context into its slot; the number of tokens fed.
        The last chunk's logits give the job its next token."""
        visible = job.context[job.start :]
        i = job.filled
        # a chunk may go on past the cache's end (a ring), at most block_size tokens at once
        j = min(i + min(self.prefill_chunk, self.block_size), len(visible))
        idx = torch.tensor([visible[i:j]], dtype=torch.long, device=self.device)  # (1, T)
        cache = _SlotCache(self.cache, job.slot, i)
        # positions i..j-1, the slot's own cache only; the output layer at the last one only
        logits, _ = self.model(idx, kv_cache=cache, only_last=True)
        job.filled = j
        if j == len(visible):
            self._sample(job, logits[0, -1])
        return j - i

    def _decode(self) -> None:
        """One step for every job in its decode phase, at the smallest of `step_shapes` that holds
        their slots (they are the lowest ones: `_compact`)."""
        jobs = sorted((job for job in self.running if not job.cancelled.is_set() and not self._filling(job)),
                      key=lambda job: job.slot)
        if not jobs:
            return
        highest = max(job.slot for job in jobs)
        S = next(shape for shape in self.step_shapes if shape > highest)
        idx, lengths = [0] * S, [0] * S  # rows of no decoding job: token 0 at position 0, thrown away
        for job in jobs:
            idx[job.slot], lengths[job.slot] = job.context[-1], job.filled  # filled: tokens before this one
        n_keys = max(min(job.filled + 1, self.block_size) for job in jobs)  # the longest context in the batch
        logits = self._step(*(torch.tensor(v, dtype=torch.long, device=self.device)
                              for v in (idx, lengths, [job.slot for job in jobs])), n_keys)
        for job in jobs:
            job.filled += 1
            self._sample(job, logits[job.slot])

    def _invariant_shapes(self, candidates: tuple[int, ...] | None) -> list[int]:
        """The step shapes (numbers of rows, ascending, `slots` last) at which a row's logits are
        those of the full shape, bit for bit, on this machine: `candidates` (default 1, 2, 4, ...
        below `slots`) that pass a probe. Whether a matmul's row depends on how many rows it has is
        the kernel's choice, made by shape alone (oneDNN's fp32 kernel for one row sums in another
        order than for 2 to 16 rows; its bf16 kernel does not), so equal logits on random rows at
        every position and context length mean equal logits for any rows at that shape."""
        if candidates is None:
            candidates = tuple(2**i for i in range(self.slots.bit_length()))
        S, L, V = self.slots, self.block_size, self.model.config.vocab_size
        if self.int8:
            # An int8 matmul quantizes its input with one scale over all its rows, so no shape passes
            # the probe and a row's logits depend on the others at every shape, the full one too:
            # --dtype int8 gives up batch invariance (documented), so it takes every candidate shape
            # and a lone request steps at 1 row rather than paying for all `slots`.
            return [*(n for n in sorted(set(candidates)) if 1 <= n < S), S]
        gen = torch.Generator().manual_seed(0)
        for t in (self.cache.k, self.cache.v):
            t.copy_(torch.randn(t.shape, generator=gen))  # keys and values to attend to (cleared below)
        idx = torch.randint(0, V, (S,), generator=gen).to(self.device)
        lengths = torch.randint(0, L, (S,), generator=gen).to(self.device)
        lengths[0] = L - 1  # every key block runs
        none = torch.zeros(0, dtype=torch.long, device=self.device)  # no row writes the cache
        full = self._step(idx, lengths, none, L)
        shapes = [n for n in sorted(set(candidates)) if 1 <= n < S
                  and torch.equal(self._step(idx[:n], lengths[:n], none, L), full[:n])]
        self.cache.k.zero_()
        self.cache.v.zero_()
        return [*shapes, S]

    def _step(self, idx: Tensor, lengths: Tensor, rows: Tensor, n_keys: int) -> Tensor:
        """Logits (S, V) after the token idx (S,) of each of the first S slots at position lengths
        (S,); only `rows` write their keys and values (at index length, or length % block_size in
        a ring), and no row of `rows` sees more than the first n_keys keys of its slot.

        The model's forward pass for one new token per row, written out so that each row has its
        own cache length (the KVCache of model.py has one length for the whole batch), and flat as
        `DecodeStep` is (PackedLinear's matmul where the copy is packed: no module tree per op).
        """
        config = self.model.config
        S, C, H, D, L = idx.shape[0], config.n_embd, config.n_head, config.head_dim, self.block_size
        # where each active row's new key goes, as rows of the cache layer viewed as (S * n_head * L, head_dim)
        at = lengths[rows] % L  # (A,)
        rows_heads = rows[:, None] * H + torch.arange(H, device=idx.device)  # (A, n_head)
        where = (rows_heads * L + at[:, None]).reshape(-1)  # (A * n_head,) in the (S * n_head * L, head_dim) view
        rows_heads = rows_heads.reshape(-1)
        keys = torch.arange(L, device=idx.device)
        seen = keys[None, :] <= lengths[:, None]  # (S, L); a full ring: every key
        seen[:, 0] = True  # a row of no job sees something (no all-masked row, whose attention is NaN)
        dtype = torch.promote_types(self.cache.k.dtype, torch.float32)  # scores in fp32 (see _attend)
        masks = {None: _additive(seen, H, dtype)}
        for window in set(self.windows) - {None}:  # a local layer: the last `window` keys, itself included
            band = seen & (keys[None, :] > lengths[:, None] - window)
            band[:, 0] |= ~band.any(dim=-1)
            masks[window] = _additive(band, H, dtype)
        x = F.embedding(idx, self.wte)  # (S, C)
        if self.wpe is not None:
            x = x + F.embedding(lengths, self.wpe)
        else:
            rope = rope_angles(lengths[:, None], D, config.rope_theta)  # cos, sin: (S, 1, 1, head_dim)
        every_row = rows.shape[0] == S  # rows is then 0 .. S - 1 (_decode sorts it): no gather
        for i, (ln_1, c_attn, q_norm, k_norm, c_proj, scale, ln_2, mlp, window) in enumerate(self.layers):
            qkv = _linear(c_attn, ln_1(x))  # (S, 3C)
            qk, v = qkv[:, : 2 * C].reshape(S, 2 * H, 1, D), qkv[:, 2 * C :].reshape(S, H, 1, D)
            if q_norm is not None:
                qk = torch.cat((q_norm(qk[:, :H]), k_norm(qk[:, H:])), dim=1)
            if self.wpe is None:
                qk = rotate(qk, *rope)  # queries and keys at once (elementwise: the same as one by one)
            q, k = qk[:, :H] * scale, qk[:, H:]  # (S, n_head, 1, head_dim); q scaled here, not its scores
            cache_k, cache_v = self.cache.k[i, :S], self.cache.v[i, :S]  # (S, n_head, L, head_dim)
            new_k, new_v = k.reshape(S * H, D), v.reshape(S * H, D)
            if not every_row:
                new_k, new_v = new_k[rows_heads], new_v[rows_heads]
            cache_k.view(-1, D).index_copy_(0, where, new_k)
            cache_v.view(-1, D).index_copy_(0, where, new_v)
            y = self._attend(q.reshape(S * H, 1, D), cache_k.view(S * H, L, D), cache_v.view(S * H, L, D),
                             masks[window], n_keys)  # (S * n_head, 1, head_dim)
            x = x + _linear(c_proj, y.reshape(S, C))  # (S * n_head, 1, head_dim) -> (S, C)
            h = ln_2(x)
            x = x + (mlp.c_proj.matmul(mlp.hidden(h)).to(x.dtype) if isinstance(mlp, PackedMLP) else mlp(h))
        return _linear(self.lm_head, self.ln_f(x)).float()  # (S, V)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, n_keys: int) -> Tensor:
        """Attention of each row and head's scaled query q (S * n_head, 1, head_dim) over its slot's
        keys and values k, v (S * n_head, L, head_dim), `mask` (S * n_head, 1, L) added to the scores
        (-inf: not seen); 3-d for bmm and baddbmm, which take the mask into the matmul.

        Over blocks of `attention_block` keys, only as many as hold the first n_keys keys: the
        cost follows the longest context in the batch, not block_size. Yet a row's result does not
        depend on how many blocks run: each block's scores, sum of probabilities and weighted sum
        of values are operations of one fixed shape, the blocks' results are added one after the
        other, and a block past the row's keys adds exactly nothing (its scores are -inf, so its
        probabilities are 0; the maximum over all blocks' scores does not see it). SDPA's CPU kernel,
        given a smaller span of keys, sums in another order (tests/test_scheduler.py catches that),
        and took ~1 ms a layer here anyway.
        """
        B = self.attention_block
        out_dtype = q.dtype
        # A 16-bit cache (the copy on a GPU) is attended in fp32, as SDPA's fused kernels do inside
        # for `generate`: scores and probabilities rounded to 16 bits would move the text.
        q = q.float()  # k and v block by block below (a no-op on the CPU's fp32 cache)
        spans = [(a, min(a + B, k.shape[1])) for a in range(0, n_keys, B)]
        scores = [torch.baddbmm(mask[..., a:b], q, k[:, a:b].float().transpose(1, 2)) for a, b in spans]  # (S*H, 1, keys)
        # each row's maximum score (S * n_head, 1, 1): finite, as every row sees a key (_step's masks)
        m = scores[0].amax(dim=-1, keepdim=True)
        for block in scores[1:]:
            m = torch.maximum(m, block.amax(dim=-1, keepdim=True))
        l = o = None  # noqa: E741 (flash attention's names: the sum of probabilities, the output)
        for (a, b), block in zip(spans, scores):
            p = (block - m).exp()
            l = p.sum(dim=-1, keepdim=True) if l is None else l + p.sum(dim=-1, keepdim=True)  # noqa: E741
            o = torch.bmm(p, v[:, a:b].float()) if o is None else o + torch.bmm(p, v[:, a:b].float())
        return (o / l).to(out_dtype)

    def _sample(self, job: Job, logits: Tensor) -> None:
        """The job's next token from its row of logits (V,), with its own generator; deliver it,
        then end the job or move its window."""
        if job.record_logits:
            job.logits.append(logits.clone())
        token = int(sample_next(logits[None], job.temperature, job.top_k, job.top_p, job.generator)[0])
        job.context.append(token)
        n_new = len(job.context) - len(job.prompt_ids)
        finish = "stop" if token == self.eot_id else "length" if n_new >= job.max_tokens else None
        job.deliver((token, finish))
        if finish is not None:
            with self.lock:
                self._leave([job])
            return
        if not self.ring:
            start = window_start(len(job.context), job.start, self.block_size, self.window_keep)
            if start != job.start:  # the window jumped: fill the slot again from the new start
                job.start, job.filled = start, 0


def _linear(linear: nn.Module, x: Tensor) -> Tensor:
    """A Linear of the decoding copy, packed or not, with an output in x's dtype."""
    return linear.matmul(x).to(x.dtype) if isinstance(linear, PackedLinear) else linear(x)


def _additive(seen: Tensor, n_head: int, dtype: torch.dtype) -> Tensor:
    """A key mask (S, L) as the scores' addend for every head (S * n_head, 1, L): 0 where seen,
    -inf elsewhere."""
    S, L = seen.shape
    return torch.where(seen, 0.0, float("-inf")).to(dtype)[:, None].expand(S, n_head, L).reshape(S * n_head, 1, L)

