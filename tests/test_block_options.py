"""The block options of the one model (RoPE, RMSNorm, SwiGLU/ReLU², QK-norm, untied output, zero-init
projections) and the Llama layout they make: each keeps the model causal, its KV-cache greedy tokens
equal the no-cache oracle (batched, padded, past block_size), the flat decode step equals the forward
pass, and a short training run lowers the loss on real text."""

import pytest
import torch

from conftest import TINYSTORIES_DIR, read_stories
from tinystories.config import ModelConfig
from tinystories.decoding import DecodeStep, decoding_copy
from tinystories.errors import UserError
from tinystories.generate import generate
from tinystories.model import GPT

LLAMA = dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False)
OPTIONS = {
    "rope": dict(pos_embedding="rope"),
    "rmsnorm": dict(norm="rmsnorm"),
    "swiglu": dict(mlp="swiglu"),
    "relu2": dict(mlp="relu2"),
    "qk_norm": dict(qk_norm=True),
    "untied": dict(tie_embeddings=False),
    "zero_init_proj": dict(zero_init_proj=True),
    "llama": LLAMA,
    "qwen3": dict(LLAMA, qk_norm=True, tie_embeddings=False),
}


def random_model(options, block_size=32, vocab_size=64, seed=0, scale=4.0):
    torch.manual_seed(seed)
    config = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size, vocab_size=vocab_size,
                         dropout=0.0, **options)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02).mul_(scale)  # zero-initialised weights too: logits far from flat
    return model


def random_prompts(lengths, vocab_size=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("name", OPTIONS)
def test_causal(name):
    model = random_model(OPTIONS[name])
    idx = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(2))
    changed = idx.clone()
    changed[:, 12] = (changed[:, 12] + 1) % 64
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    assert torch.equal(a[:, :12], b[:, :12])  # nothing before position 12 sees it
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("name", OPTIONS)
def test_kv_cache_greedy_equals_the_oracle(name):
    model = random_model(OPTIONS[name], block_size=16)
    prompts = random_prompts([7, 1, 12, 3])  # a padded batch that outgrows block_size
    cached = generate(model, prompts, 30, temperature=0.0, dtype=torch.float32)
    assert cached == generate(model, prompts, 30, temperature=0.0, use_cache=False)
    assert cached == [generate(model, [p], 30, temperature=0.0)[0] for p in prompts]  # alone = batched
    assert len({t for story in cached for t in story}) > 5  # not one token over and over


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", OPTIONS)
def test_flat_decode_step_equals_the_forward(name, dtype):
    fast = decoding_copy(random_model(OPTIONS[name]), dtype)
    step = DecodeStep.of(fast)
    assert step is not None  # every option has the fast path
    g = torch.Generator().manual_seed(1)
    B, T = 3, 9
    idx = torch.randint(0, 64, (B, T), generator=g)
    pad = torch.tensor([0, 2, 5])  # left padding, as a batch of prompts
    pos = (torch.arange(T).repeat(B, 1) - pad[:, None]).clamp(min=0)
    key_mask = torch.arange(T + 4)[None, :] >= pad[:, None]
    with torch.inference_mode():
        ours, theirs = fast.new_kv_cache(B, T + 4), fast.new_kv_cache(B, T + 4)
        for cache in (ours, theirs):
            fast(idx, kv_cache=cache, pos=pos, key_mask=key_mask[:, :T])
        for i in range(4):
            new = torch.randint(0, 64, (B,), generator=g)
            at = pos[:, -1] + 1 + i
            expected, _ = fast(new[:, None], kv_cache=theirs, pos=at[:, None], key_mask=key_mask[:, : T + i + 1])
            got = step(new, at, ours, key_mask[:, : T + i + 1])
            assert torch.allclose(got, expected[:, -1], atol=1e-5, rtol=1e-5), (got - expected[:, -1]).abs().max()


@pytest.mark.parametrize("name", OPTIONS)
def test_short_training_lowers_the_loss_on_real_text(name):
    text = " ".join(read_stories(TINYSTORIES_DIR / "TinyStoriesV2-train.sample.txt", limit=20)).encode()
    data = torch.tensor(list(text[: 33 * 16]), dtype=torch.long).view(16, 33)  # bytes as tokens
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=256, dropout=0.0,
                            **OPTIONS[name]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        _, loss = model(data[:, :-1], data[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses[::10]


def test_parameter_counts_follow_the_options():
    base = ModelConfig(n_layer=2, n_head=2, n_embd=192, block_size=64, vocab_size=100)
    n = GPT(base).num_params()
    rope = GPT(ModelConfig(**{**base.to_dict(), "pos_embedding": "rope"}))
    assert "wpe" not in rope.transformer and rope.num_params() == n - 64 * 192
    untied = GPT(ModelConfig(**{**base.to_dict(), "tie_embeddings": False}))
    assert untied.lm_head.weight is not untied.transformer.wte.weight and untied.num_params() == n + 100 * 192
    swiglu = ModelConfig(**{**base.to_dict(), "mlp": "swiglu"})
    assert swiglu.hidden_size == 512  # 8/3 x 192: three matrices of 192 x 512 hold what GELU's two do
    no_bias = ModelConfig(**{**base.to_dict(), "bias": False})
    assert GPT(ModelConfig(**{**swiglu.to_dict(), "bias": False})).num_params() == GPT(no_bias).num_params()
    zero = GPT(ModelConfig(**{**base.to_dict(), "zero_init_proj": True}))
    assert all(b.attn.c_proj.weight.abs().max() == 0 and b.mlp.c_proj.weight.abs().max() == 0
               for b in zero.transformer.h)


@pytest.mark.parametrize("bad, message", [
    (dict(pos_embedding="alibi"), "pos_embedding must be one of"),
    (dict(norm="batchnorm"), "norm must be one of"),
    (dict(mlp="tanh"), "mlp must be one of"),
    (dict(rope_theta=0.0), "rope_theta must be a positive"),
    (dict(norm_eps=float("nan")), "norm_eps must be a finite number"),
    (dict(norm_eps=-1e-5), "norm_eps must be a positive"),
    (dict(mlp_hidden=0), "mlp_hidden must be a positive"),
    (dict(qk_norm="yes"), "qk_norm must be true or false"),
    (dict(pos_embedding="rope", n_embd=30, n_head=2), "even head_dim"),
])
def test_bad_options_are_refused(bad, message):
    with pytest.raises(UserError, match=message):
        ModelConfig(**{**dict(n_layer=1, n_head=2, n_embd=32), **bad})


@pytest.mark.parametrize("name", ["rope", "llama", "qwen3"])
def test_rope_slides_past_block_size_without_a_refill(name, monkeypatch):
    """Past block_size a RoPE model's cache is a ring: no prefill after the first, and the greedy
    tokens equal the oracle in which every token sees the last block_size tokens (alone = batched)."""
    from tinystories.generate import _CachedDecoder

    model = random_model(OPTIONS[name], block_size=16)
    prompts = random_prompts([3, 10, 15, 40])  # the last is longer than block_size from the start
    prefills = []
    real = _CachedDecoder.prefill
    monkeypatch.setattr(_CachedDecoder, "prefill", lambda self, w: prefills.append(1) or real(self, w))
    for dtype in (torch.float32, None):  # the packed copy's flat step, and the module path
        cached = generate(model, prompts, 45, temperature=0.0, dtype=dtype)
        assert len(prefills) == 1
        prefills.clear()
        assert cached == generate(model, prompts, 45, temperature=0.0, use_cache=False)
    assert cached == [generate(model, [p], 45, temperature=0.0)[0] for p in prompts]
    # the window is real: each layer looks 15 tokens back, so two layers reach 30 and no further
    with torch.no_grad():
        seq = torch.tensor([random_prompts([40])[0]])
        far = seq.clone()
        far[0, 0] = (far[0, 0] + 1) % 64
        a, _ = model(seq, window=16)
        b, _ = model(far, window=16)
    assert torch.equal(a[0, 31:], b[0, 31:]) and not torch.allclose(a[0, 16:31], b[0, 16:31])


def test_only_rope_models_slide():
    model = random_model({}, block_size=16)  # learned positions
    with pytest.raises(ValueError, match="only a RoPE model"):
        model(torch.zeros(1, 20, dtype=torch.long), window=16)
    cache = model.new_kv_cache(1, 16)
    model(torch.zeros(1, 16, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="only a RoPE model"):
        model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)
