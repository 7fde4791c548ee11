"""The GPT-2-style language model: the network and nothing else.

Learned positions, pre-LayerNorm blocks, causal self-attention through
`torch.nn.functional.scaled_dot_product_attention`, tanh-GELU (= Hugging Face `gelu_new`), a 4x MLP,
dropout, the output layer tied to the token embedding, GPT-2 initialisation (Radford et al. 2019,
section 2.3: residual projections scaled by 1/sqrt(2 * n_layer)).

Newer block options are config fields that act where they apply (GPT-2 stays the default):
`pos_embedding="rope"` rotates queries and keys (Su et al. 2021, RoFormer) instead of adding learned
positions, `norm="rmsnorm"` (Zhang & Sennrich 2019), `mlp="swiglu"` (Shazeer 2020) or `"relu2"`
(So et al. 2021, Primer), `qk_norm` (an RMSNorm over each head's queries and keys, as Qwen3),
`tie_embeddings=False` (a separate output layer), `zero_init_proj` (residual projections start at
zero, so each block starts as the identity). RoPE + RMSNorm + SwiGLU without biases is the Llama
layout, and exports to Hugging Face's LlamaForCausalLM.

GPT-Neo (the paper's released TinyStories models) is the same network with three config switches:
`attention_layers` makes some blocks local (each token sees only the last `window_size` tokens),
`scale_attention=False` drops the 1/sqrt(head_dim) on attention scores, `qkv_bias=False` drops the
q/k/v biases. HF's GPT-Neo computes attention scores in fp32 even under autocast; ours follow the
autocast dtype (SDPA accumulates in fp32 either way).

Parameter names follow Hugging Face's GPT2LMHeadModel (`transformer.h.0.attn.c_attn.weight`, ...)
so export is a key map plus a transpose of the Conv1D weights.

    model = GPT(ModelConfig(...))
    logits, loss = model(idx, targets)          # training
    cache = model.new_kv_cache(batch_size=B, max_len=T)
    logits, _ = model(prompt, kv_cache=cache, only_last=True)   # prefill: (B, 1, V), then one token at a time
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinystories.config import ModelConfig
from tinystories.loss import cross_entropy


class KVCache:
    """Preallocated keys and values for every layer: (n_layer, B, n_head, max_len, head_dim).

    `length` counts the positions already written. Each forward pass with this cache writes its T
    new positions at [length, length + T) and attends over [0, length + T).
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store the new (B, n_head, T, head_dim) keys/values; return all of them so far.

        A full cache is a ring (RoPE models): the new key replaces the oldest, at index length %
        max_len. Keys carry their position in their rotation, and attention does not depend on the
        order of the keys, so nothing has to move. T > 1 new tokens (at most max_len) past the end
        get the slots as they were and their own keys, all max_len + T of them (the queries' mask
        says which each sees), and only then overwrite the oldest: the first of them still sees
        keys that the last ones replace.
        """
        T = k.shape[2]
        if self.length + T > self.max_len:
            if T == 1:
                slot = self.length % self.max_len
                self.k[layer, :, :, slot : slot + 1] = k
                self.v[layer, :, :, slot : slot + 1] = v
                return self.k[layer], self.v[layer]
            k, v = k.to(self.k.dtype), v.to(self.v.dtype)
            keys, values = torch.cat((self.k[layer], k), dim=2), torch.cat((self.v[layer], v), dim=2)
            slots = (self.length + torch.arange(T, device=k.device)) % self.max_len
            self.k[layer].index_copy_(2, slots, k)
            self.v[layer].index_copy_(2, slots, v)
            return keys, values  # (B, n_head, max_len + T, head_dim)
        end = self.length + T
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def norm(config: ModelConfig, dim: int) -> nn.Module:
    """The block's normalisation: LayerNorm (GPT-2) or RMSNorm (no mean, no bias; Llama)."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)


def rope_angles(pos: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (B, 1, T, head_dim) of the rotation at each position (B, T), in fp32.

    Hugging Face's Llama layout: frequency i turns the pair (i, i + head_dim/2) of every head.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)
    angles = pos[:, None, :, None].float() * inv_freq  # (B, 1, T, head_dim/2)
    angles = torch.cat((angles, angles), dim=-1)  # (B, 1, T, head_dim)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply the rotary embedding to queries or keys x (B, n_head, T, head_dim)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)  # the pair (a, b) -> (-b, a)
    return (x * cos + rotated * sin).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        qkv_bias = config.bias if config.qkv_bias is None else config.qkv_bias  # GPT-Neo: none
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=qkv_bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_projection = True  # scaled at init, see GPT._init_weights
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        # None = SDPA's 1/sqrt(head_dim); GPT-Neo does not scale the scores at all
        self.scale = None if config.scale_attention else 1.0
        if config.qk_norm:  # each head's queries and keys RMS-normalised before RoPE (Qwen3's q_norm, k_norm)
            self.q_norm = nn.RMSNorm(config.head_dim, eps=config.norm_eps)
            self.k_norm = nn.RMSNorm(config.head_dim, eps=config.norm_eps)

    def forward(self, x, layer: int, kv_cache: KVCache | None, attn_mask: torch.Tensor | None, rope=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim): heads become a batch dimension
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # (cos, sin), each (B, 1, T, head_dim)
            q, k = rotate(q, *rope), rotate(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, n_head, length + T, head_dim)
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            # no mask: plain causal without a cache; with one, a single new token that sees every key
            is_causal=attn_mask is None and kv_cache is None,
            scale=self.scale,
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, n_head, T, hd) -> (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """GELU (GPT-2), ReLU squared (Primer), or SwiGLU (Llama: c_fc holds the gate, then the up
    projection, as one matrix of 2 x hidden rows)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.kind, hidden = config.mlp, config.hidden_size
        self.c_fc = nn.Linear(config.n_embd, (2 if self.kind == "swiglu" else 1) * hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:  # tanh approximation: what GPT-2 was trained with, and HF's `gelu_new`
            h = F.gelu(h, approximate="tanh")
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, layer, kv_cache, attn_mask, rope=None):
        x = x + self.attn(self.ln_1(x), layer, kv_cache, attn_mask, rope)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        learned_positions = config.pos_embedding == "learned"  # else RoPE: nothing to learn
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                **(dict(wpe=nn.Embedding(config.block_size, config.n_embd)) if learned_positions else {}),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=norm(config, config.n_embd),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # Weight tying (Press & Wolf 2017): one matrix embeds tokens and scores them.
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "is_residual_projection", False):
                # each block adds two residual branches; keep the stream's variance from growing
                std = 0.0 if self.config.zero_init_proj else 0.02 / math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters counted once (the tied output layer is the token embedding).

        non_embedding=True leaves out token and position embeddings (Kaplan et al. 2020 count N).
        """
        n = sum(p.numel() for p in self.parameters())  # .parameters() yields a tied tensor once
        if non_embedding:
            n -= self.transformer.wte.weight.numel()
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
        return n

    def new_kv_cache(self, batch_size: int, max_len: int | None = None, dtype=None) -> KVCache:
        p = self.transformer.wte.weight
        return KVCache(self.config, batch_size, max_len or self.config.block_size, p.device, dtype or p.dtype)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        kv_cache: KVCache | None = None,
        pos: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        window: int | None = None,
        only_last: bool = False,
    ):
        """Logits for every position of `idx` (B, T), and the mean cross-entropy when `targets` is given.

        kv_cache: keys/values of earlier positions; the T new ones are appended to it.
        pos:      (B, T) position of each token (default: cache length + 0..T-1). Left-padded batches
                  pass positions that start at 0 on each row's first real token.
        key_mask: (B, cache length + T) bool, False where a key is padding that must not be attended;
                  past a full cache's end (B, max_len + T): the slots', then the new tokens'.
        window:   RoPE models: every layer sees only the last `window` tokens, itself included, and
                  idx may be longer than block_size (what a full cache does, see KVCache.update).
        only_last: logits (B, 1, V) of the last position only (what a prefill uses: at a 50k
                  vocabulary the output layer over every position was most of a prompt's time).
        Targets equal to -1 are ignored by the loss.
        """
        B, T = idx.shape
        if only_last and targets is not None:
            raise ValueError("only_last computes no loss: the loss needs the logits of every position")
        start = kv_cache.length if kv_cache is not None else 0
        rope_only = self.config.pos_embedding == "rope" and "local" not in (self.config.attention_layers or ())
        ring = kv_cache is not None and start + T > kv_cache.max_len  # a full cache slides
        if (ring or window is not None) and not rope_only:
            raise ValueError("only a RoPE model without local layers slides")
        if ring and T > kv_cache.max_len:
            raise ValueError(f"{T} tokens at once past the end of a cache of {kv_cache.max_len}: at most that many")
        if start + T > self.config.block_size and not ring and window is None:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        if pos is None:
            pos = torch.arange(start, start + T, device=idx.device).unsqueeze(0)  # (1, T)

        attn_mask = None  # plain causal attention: the fast path SDPA handles itself
        # A cache needs a mask unless one new token sees every key (a decode step, no padding).
        needs_mask = key_mask is not None or (kv_cache is not None and T > 1)
        # Local layers (GPT-Neo) need a band mask once a query is window_size or more tokens past
        # a key; in shorter sequences they see exactly what global layers see.
        band = window or self.config.window_size
        banded = (window is not None or "local" in (self.config.attention_layers or ())) and start + T > band
        if ring and T == 1:  # one new token that may see every cached key but padding ones
            needs_mask = banded = False
            attn_mask = None if key_mask is None else key_mask[:, None, None, : kv_cache.max_len]  # (B, 1, 1, keys)
        elif ring:
            # T tokens past the end: the keys are the L slots, then the T new ones (KVCache.update).
            # Slot j holds the token of index start - L + ((j - start) mod L), the last one written
            # there (a negative index: never written). Query i (index start + i) sees key index k
            # when start + i - L < k <= start + i: the last L tokens, itself included, as a token
            # fed alone sees them. key_mask (B, L + T), if given: False on padding keys.
            needs_mask = banded = False
            L = kv_cache.max_len
            q_at = torch.arange(start, start + T, device=idx.device)
            held = start - L + (torch.arange(L, device=idx.device) - start) % L  # (L,)
            k_at = torch.cat((held, q_at))  # (L + T,)
            sees = (k_at[None, :] <= q_at[:, None]) & (k_at[None, :] > q_at[:, None] - L) & (k_at[None, :] >= 0)
            attn_mask = sees[None, None]  # (1, 1, T, L + T)
            if key_mask is not None:  # a query always sees itself (no all-masked row, see below)
                attn_mask = attn_mask & (key_mask[:, None, None, :] | (k_at[None, :] == q_at[:, None])[None, None])
        if needs_mask or banded:
            # query i (absolute position start + i) may see key j when j <= start + i ...
            q_at = torch.arange(start, start + T, device=idx.device)
            k_at = torch.arange(start + T, device=idx.device)
            attn_mask = (k_at[None, :] <= q_at[:, None])[None, None]  # (1, 1, T, start + T)
            if key_mask is not None:
                # ... and key j is not padding. A query always sees itself so that a padding row
                # never has every key masked (which would make SDPA return NaN).
                itself = k_at[None, :] == q_at[:, None]
                attn_mask = attn_mask & (key_mask[:, None, None, :] | itself[None, None])  # (B, 1, T, start + T)
        local_mask = attn_mask
        if banded:
            # ... and, in a local layer, j > start + i - window_size: the last window_size keys,
            # itself included (HF GPT-Neo's mask). Cache indices, not positions: left padding
            # shifts both alike, and padding is masked anyway.
            local_mask = attn_mask & (k_at[None, :] > q_at[:, None] - band)[None, None]
            if not needs_mask:
                attn_mask = None  # global layers keep SDPA's causal fast path

        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if self.config.pos_embedding == "rope":
            rope = rope_angles(pos.expand(B, T), self.config.head_dim, self.config.rope_theta)
        else:
            x = x + self.transformer.wpe(pos)
        x = self.transformer.drop(x)
        for layer, block in enumerate(self.transformer.h):
            local = window is not None or self.config.is_local(layer)
            x = block(x, layer, kv_cache, local_mask if local else attn_mask, rope)
        if kv_cache is not None:
            kv_cache.length = start + T
        if only_last:
            x = x[:, -1:]  # (B, 1, C); left-padded rows all end at the last position
        x = self.transformer.ln_f(x)

        if targets is None:
            return self.lm_head(x), None
        logits = self.lm_head(x)  # (B, T, vocab_size)
        # fp32 math in row chunks, never a full fp32 copy of the logits (tinystories/loss.py)
        loss = cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))  # (B*T, V), (B*T,)
        return logits, loss
