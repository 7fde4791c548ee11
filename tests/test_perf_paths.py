"""The fast paths give the reference path's results: the chunked loss, the allocator setting, the
packed decoding copy and its bf16 weights (bench/ and BENCHMARKS.md say what each is worth)."""

import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import tinystories.loss
from tinystories.config import ModelConfig
from tinystories.device import cpu_supports_bf16
from tinystories.errors import UserError
from tinystories.decoding import (Int8Linear, PackedLinear, decode_dtype, decoding_copy, int8_supported, pack_linears,
                                  quantize_per_channel)
from tinystories.generate import generate
from tinystories.loss import chunk_rows, cross_entropy
from tinystories.model import GPT

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def random_model(vocab_size=512, seed=0, scale=3.0, **kw):
    torch.manual_seed(seed)
    config = ModelConfig(**{**dict(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=vocab_size, dropout=0.0), **kw})
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)  # logits far from flat: greedy has clear winners
    return model


# -----------------------------------------------------------------------------
# The chunked cross-entropy


@pytest.fixture
def small_chunks(monkeypatch):
    # 7 rows per chunk at vocab 300: 100 rows make 15 chunks, the last one partial
    monkeypatch.setitem(tinystories.loss.CHUNK_FLOATS, "cpu", 7 * 300)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_and_gradient_equal_the_plain_ones(small_chunks, dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(100, 300, generator=g) * 4).to(dtype).requires_grad_()
    targets = torch.randint(0, 300, (100,), generator=g)
    targets[::9] = -1  # ignored rows
    plain = F.cross_entropy(logits.float(), targets, ignore_index=-1)
    (plain_grad,) = torch.autograd.grad(plain * 3.0, logits)  # a non-unit upstream gradient too
    ours = cross_entropy(logits, targets)
    (ours_grad,) = torch.autograd.grad(ours * 3.0, logits)
    assert ours.dtype == torch.float32
    assert abs(ours.item() - plain.item()) < 1e-6
    assert ours_grad.dtype == dtype
    assert torch.allclose(ours_grad.float(), plain_grad.float(), atol=1e-6 if dtype == torch.float32 else 1e-3, rtol=0)
    assert torch.all(ours_grad[::9] == 0)  # ignored rows get no gradient


@pytest.mark.parametrize("device_type", ["cuda", "mps"])
def test_the_gpu_chunk_sizes_give_the_plain_loss_and_gradient(device_type):
    """Every device takes the chunked path, with its own chunk size: the GPUs' (1,024 rows at
    50,257) run here on CPU tensors, at a vocabulary where 16,000 rows make several chunks."""
    V = 50257
    rows = chunk_rows(device_type, V)
    assert rows == 1024
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(rows + 100, V, generator=g) * 3).requires_grad_()
    targets = torch.randint(0, V, (len(logits),), generator=g)
    targets[::11] = -1
    plain = F.cross_entropy(logits, targets, ignore_index=-1)
    (plain_grad,) = torch.autograd.grad(plain, logits)
    ours = cross_entropy(logits, targets, chunk=rows)
    (ours_grad,) = torch.autograd.grad(ours, logits)
    assert abs(ours.item() - plain.item()) < 1e-5
    assert torch.allclose(ours_grad, plain_grad, atol=1e-7, rtol=1e-4)


def test_chunked_loss_of_only_ignored_targets_is_nan_like_the_plain_one():
    logits = torch.randn(4, 10)
    targets = torch.full((4,), -1)
    assert torch.isnan(F.cross_entropy(logits, targets, ignore_index=-1))
    assert torch.isnan(cross_entropy(logits, targets))


def test_chunked_loss_refuses_wrong_shapes():
    with pytest.raises(ValueError, match="expected logits"):
        cross_entropy(torch.randn(2, 3, 10), torch.zeros(2, 3, dtype=torch.long))


def test_model_loss_and_gradients_equal_the_plain_loss(small_chunks):
    model = random_model(vocab_size=300, scale=1.0)
    x = torch.randint(0, 300, (3, 40), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, dims=1)
    y[0, -5:] = -1
    logits, loss = model(x, y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    reference = F.cross_entropy(logits.detach().view(-1, 300).float(), y.view(-1), ignore_index=-1)
    assert abs(loss.item() - reference.item()) < 1e-6
    ref_logits, _ = model(x)
    ref_loss = F.cross_entropy(ref_logits.view(-1, 300), y.view(-1), ignore_index=-1)
    ref_grads = torch.autograd.grad(ref_loss, list(model.parameters()))
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_bf16_autocast_loss_is_close_to_fp32():
    model = random_model(vocab_size=300, scale=1.0).train()
    x = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(2))
    y = torch.roll(x, -1, dims=1)
    _, fp32 = model(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, bf16 = model(x, y)
    bf16.backward()
    assert bf16.dtype == torch.float32
    assert abs(bf16.item() - fp32.item()) < 0.02 * fp32.item()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# -----------------------------------------------------------------------------
# Keeping freed memory (a process-wide setting: checked in a child process)

_FAULTS = """
import resource, statistics, sys, torch
from tinystories.allocator import keep_freed_memory
from tinystories.config import ModelConfig
from tinystories.model import GPT
if sys.argv[1] == "keep":
    assert keep_freed_memory() and keep_freed_memory()  # takes effect; a second call is harmless
torch.manual_seed(0)
model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=64, block_size=128, vocab_size=50257, dropout=0.0))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.randint(0, 50257, (4, 128))  # logits of 512 x 50,257: 103 MB in fp32
faults = []
for step in range(7):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    _, loss = model(x, x)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(statistics.median(faults[2:]))  # after two steps of warming up
"""


@pytest.mark.slow
@pytest.mark.skipif(not GLIBC, reason="the setting is glibc's")
def test_kept_memory_is_reused_instead_of_mapped_again_each_step():
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
        return float(out.stdout)

    assert faults("default") > 10_000  # pages of 4 KB mapped (and zeroed) afresh every step
    assert faults("keep") < 1_000  # freed blocks reused (now and then one more is mapped)


# -----------------------------------------------------------------------------
# The decoding copy: packed Linear weights, bf16 weights


def test_packed_linear_equals_f_linear():
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 100)
    x = torch.randn(3, 5, 48)
    packed = PackedLinear(linear, torch.float32)
    assert packed(x).shape == (3, 5, 100)
    assert torch.allclose(packed(x), F.linear(x, linear.weight, linear.bias), atol=1e-5, rtol=1e-5)
    # bf16: what autocast computes (inputs, weight and bias in bf16), returned in the input's dtype
    half = PackedLinear(linear, torch.bfloat16)
    expected = F.linear(x.bfloat16(), linear.weight.bfloat16(), linear.bias.bfloat16()).float()
    out = half(x)
    assert out.dtype == torch.float32
    assert torch.allclose(out, expected, atol=1e-2, rtol=1e-2)


def test_packed_mlp_equals_the_mlp():
    from tinystories.decoding import PackedMLP
    from tinystories.model import MLP

    torch.manual_seed(0)
    mlp = MLP(ModelConfig(n_layer=1, n_head=2, n_embd=48, block_size=8, vocab_size=10, dropout=0.0)).eval()
    x = torch.randn(3, 5, 48)
    with torch.no_grad():
        assert torch.allclose(PackedMLP(mlp, torch.float32)(x), mlp(x), atol=1e-5, rtol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16: what autocast computes
            expected = mlp(x).float()
        got = PackedMLP(mlp, torch.bfloat16)(x)
    assert got.dtype == torch.float32 and torch.allclose(got, expected, atol=2e-2, rtol=2e-2)


def test_decoding_copy_packs_a_copy_and_leaves_the_model_alone():
    model = random_model()
    fast = decoding_copy(model, torch.bfloat16)
    assert fast is not model
    assert isinstance(fast.lm_head, PackedLinear) and isinstance(fast.transformer.h[0].attn.c_attn, PackedLinear)
    assert type(fast.transformer.h[0].mlp).__name__ == "PackedMLP"
    assert isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.weight is model.transformer.wte.weight
    assert model.transformer.wte.weight.dtype == torch.float32
    assert fast.transformer.wte.weight.dtype == torch.float32  # activations and KV cache stay fp32
    assert not pack_linears(torch.nn.Sequential(torch.nn.ReLU()), torch.float32)  # nothing to pack


def test_decoding_copy_is_cached_until_a_weight_changes():
    model = random_model()
    first = decoding_copy(model, torch.float32)
    assert decoding_copy(model, torch.float32) is first
    assert decoding_copy(model, torch.bfloat16) is not first  # another dtype, another copy
    prompt = [[1, 2, 3]]
    before = generate(model, prompt, 10, temperature=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model.train()
    _, loss = model(torch.tensor([[1, 2, 3, 4]]), torch.tensor([[2, 3, 4, 5]]))
    loss.backward()
    opt.step()  # in place, as training does between generations
    model.eval()
    assert decoding_copy(model, torch.float32) is not first
    after = generate(model, prompt, 10, temperature=0.0)
    assert after == generate(model, prompt, 10, temperature=0.0, use_cache=False)  # follows the new weights
    assert after != before


def test_packed_fp32_decoding_gives_the_oracle_tokens():
    model = random_model()
    prompts = [[5, 6, 7], [9], [1, 2, 3, 4, 5, 6]]
    fast = generate(model, prompts, 30, temperature=0.0, dtype=torch.float32)
    assert fast == generate(model, prompts, 30, temperature=0.0, use_cache=False)


def test_bf16_decoding_logits_are_close_and_greedy_tokens_mostly_equal():
    model = random_model()
    x = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref, _ = model(x)
        bf16, _ = decoding_copy(model, torch.bfloat16)(x)
    assert bf16.dtype == torch.float32
    assert (bf16 - ref).abs().max() < 0.05 * ref.abs().max()
    assert (bf16.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    prompts = [[i, i + 1] for i in range(8)]
    a = generate(model, prompts, 20, temperature=0.0, dtype=torch.float32)
    b = generate(model, prompts, 20, temperature=0.0, dtype=torch.bfloat16)
    assert sum(x == y for s, t in zip(a, b) for x, y in zip(s, t)) >= 0.8 * 8 * 20


def test_decode_dtype():
    cpu = torch.device("cpu")
    assert decode_dtype(cpu, "fp32") == torch.float32
    assert decode_dtype(cpu, "bf16") == torch.bfloat16
    assert decode_dtype(cpu, "auto") == (torch.bfloat16 if cpu_supports_bf16() else None)
    with pytest.raises(UserError, match="unknown dtype"):
        decode_dtype(cpu, "fp8")
    # int8 runs on PyTorch's x86 CPU kernels only: anywhere else one line saying what to use instead
    for device in (torch.device("cuda"), torch.device("mps")):
        with pytest.raises(UserError, match="CPU only.*bf16"):
            decode_dtype(device, "int8")
    if int8_supported():
        assert decode_dtype(cpu, "int8") == torch.int8
    else:
        with pytest.raises(UserError, match="fbgemm"):
            decode_dtype(cpu, "int8")


# -----------------------------------------------------------------------------
# int8 weights

needs_int8 = pytest.mark.skipif(not int8_supported(), reason="no fbgemm kernels in this PyTorch build")


def test_per_channel_quantization_round_trip_is_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 96, generator=g) * torch.logspace(-3, 1, 300)[:, None]  # rows of very different scales
    w[7] = 0.0  # an all-zero row
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.shape == (300,)
    assert int(q.min()) >= -127 and int(q.max()) <= 127
    assert torch.all(q.abs().amax(dim=1)[torch.arange(300) != 7] == 127)  # each row uses its whole range
    error = (q.float() * scale[:, None] - w).abs()
    assert torch.all(error <= scale[:, None] / 2 * (1 + 1e-6))  # at most half a step, per row
    assert torch.all(q[7] == 0) and torch.all(error[7] == 0)
    # per row, not per tensor: the smallest rows keep their relative precision
    assert (error[:10].amax() / w[:10].abs().amax()) < 1 / 200


@needs_int8
@pytest.mark.parametrize("gelu", [False, True])
def test_int8_linear_is_close_to_f_linear(gelu):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 200)
    x = torch.randn(3, 5, 96)
    expected = F.linear(x, linear.weight, linear.bias)
    if gelu:
        expected = F.gelu(expected, approximate="tanh")
    got = Int8Linear(linear, gelu=gelu)(x)
    assert got.dtype == torch.float32 and got.shape == (3, 5, 200)
    relative = (got - expected).norm() / expected.norm()
    assert relative < 0.02  # 8-bit weights and inputs: about 1 %


@needs_int8
def test_int8_decoding_logits_are_close_and_argmax_mostly_agrees():
    model = random_model()
    fast = decoding_copy(model, torch.int8)
    assert isinstance(fast.lm_head, Int8Linear) and isinstance(fast.transformer.h[0].mlp.c_fc, Int8Linear)
    assert model.transformer.wte.weight.dtype == torch.float32  # the model itself is left alone
    x = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref, _ = model(x)
        got, _ = fast(x)
    assert got.dtype == torch.float32
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.85


@needs_int8
def test_int8_copy_of_a_swiglu_model_with_outlier_weights_is_made():
    # A trained Llama-layout `tiny` rounds its SwiGLU MLP to 2.4 % of the largest output on random
    # inputs (outlier weights widen each row's scale). The kernel check must let rounding through.
    from tinystories.decoding import PackedMLP

    model = random_model(scale=1.0, pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "wte" not in name:
                p[:, ::16] *= 20.0  # an outlier column in every row
    mlp, x = model.transformer.h[0].mlp, torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        error = (PackedMLP(mlp, torch.int8)(x) - mlp(x)).abs().max() / mlp(x).abs().max()
    assert error > 0.02  # rounding as large as the trained model's
    fast = decoding_copy(model, torch.int8)
    assert isinstance(fast.transformer.h[0].mlp.c_fc, Int8Linear)


@needs_int8
def test_cached_int8_decoding_follows_the_int8_oracle():
    # The oracle here is a full forward of the int8 copy at every step. Each int8 matmul quantizes
    # its input with one scale per call, so a full forward (every position in one call) and a
    # one-token step round a little differently: equal logits up to that rounding, and the same
    # greedy tokens until a near-tie flips, not bit for bit.
    model = random_model()
    fast = decoding_copy(model, torch.int8)
    prompt = [[5, 6, 7, 8]]
    cached = generate(model, prompt, 30, temperature=0.0, dtype=torch.int8)[0]
    oracle = generate(fast, prompt, 30, temperature=0.0, use_cache=False)[0]
    agree = next((i for i, (a, b) in enumerate(zip(cached, oracle)) if a != b), len(cached))
    assert agree >= 10
    with torch.inference_mode():  # teacher-forced on the oracle's tokens, every logit is close
        ids = torch.tensor([prompt[0] + oracle])
        full, _ = fast(ids)
        cache = fast.new_kv_cache(1, ids.shape[1])
        step = [fast(ids[:, :4], kv_cache=cache, only_last=True)[0][:, -1]]
        from tinystories.decoding import DecodeStep

        flat = DecodeStep.of(fast)
        for t in range(4, ids.shape[1]):
            step.append(flat(ids[:, t], torch.tensor([t]), cache))
    step = torch.stack(step, dim=1)  # (1, T - 3, V)
    assert (step - full[:, 3:]).abs().max() < 0.05 * full.abs().max()


@needs_int8
@pytest.mark.slow
def test_int8_loss_is_within_1_percent_of_the_models_on_a_trained_model(v1_train_head):
    from conftest import read_stories
    from tinystories.evaluate import score_tokens
    from tinystories.tokenizer import train_bpe

    stories = read_stories(v1_train_head, limit=400)
    tok = train_bpe(stories[:300], 512, show_progress=False)
    train, held_out = ([t for s in part for t in [tok.eot_id] + tok.encode(s)]
                       for part in (stories[:350], stories[350:]))
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=tok.vocab_size, dropout=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data, g = torch.tensor(train), torch.Generator().manual_seed(0)
    for _ in range(150):
        at = torch.randint(0, len(data) - 65, (16,), generator=g)
        batch = torch.stack([data[i : i + 65] for i in at.tolist()])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    tokens = torch.tensor(held_out).numpy()
    nats = {}
    for name, net in (("model", model), ("int8", decoding_copy(model, torch.int8))):
        total, count = score_tokens(net, tokens, tok.eot_id, progress=False)
        nats[name] = total / count
    assert nats["model"] < 4.5  # learned something (log 512 = 6.2): the comparison means something
    assert abs(nats["int8"] - nats["model"]) < 0.01 * nats["model"]


# -----------------------------------------------------------------------------
# The flat decode step, and 2 MB pages under the packed weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("case", ["plain", "padded", "gpt-neo", "llama"])
def test_flat_decode_step_equals_the_models_forward(dtype, case):
    from tinystories.decoding import DecodeStep

    if dtype == torch.int8 and not int8_supported():
        pytest.skip("no fbgemm kernels in this PyTorch build")
    kw = {}
    if case == "gpt-neo":  # a local layer whose window (5) the cache outgrows, no attention scaling
        kw = dict(attention_layers=("global", "local"), window_size=5, scale_attention=False, qkv_bias=False)
    if case == "llama":  # RoPE, RMSNorm, a SwiGLU MLP (whose product of two int8 matmuls is the hardest probe)
        kw = dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    fast = decoding_copy(random_model(**kw), dtype)
    step = DecodeStep.of(fast)
    assert step is not None
    g = torch.Generator().manual_seed(1)
    B, T = 3, 9
    idx = torch.randint(0, 512, (B, T), generator=g)
    pos = torch.arange(T).repeat(B, 1)
    key_mask = None
    if case == "padded":  # rows 1 and 2 start 2 and 5 tokens late (left padding, as a batch of prompts)
        pad = torch.tensor([0, 2, 5])
        pos = (pos - pad[:, None]).clamp(min=0)
        key_mask = torch.arange(T + 4)[None, :] >= pad[:, None]  # (B, T + 4): room for 4 steps
    with torch.inference_mode():
        ours, theirs = fast.new_kv_cache(B, T + 4), fast.new_kv_cache(B, T + 4)
        for cache in (ours, theirs):
            fast(idx, kv_cache=cache, pos=pos, key_mask=None if key_mask is None else key_mask[:, :T])
        for i in range(4):  # four one-token steps, each appending to both caches
            new = torch.randint(0, 512, (B,), generator=g)
            at = pos[:, -1] + 1 + i
            mask = None if key_mask is None else key_mask[:, : T + i + 1]
            expected, _ = fast(new[:, None], kv_cache=theirs, pos=at[:, None], key_mask=mask)
            got = step(new, at, ours, mask)
            assert got.dtype == torch.float32 and got.shape == (B, 512)
            if case == "gpt-neo":  # the band is a slice here, a mask there: summation order may differ
                assert torch.allclose(got, expected[:, -1], atol=1e-5, rtol=1e-5)
            else:
                assert torch.equal(got, expected[:, -1])
            assert ours.length == theirs.length == T + i + 1
        assert torch.allclose(ours.k, theirs.k, atol=1e-6) and torch.allclose(ours.v, theirs.v, atol=1e-6)


def test_the_flat_step_is_what_generate_runs(monkeypatch):
    from tinystories.decoding import DecodeStep
    from tinystories.generate import _CachedDecoder

    calls = []
    real = DecodeStep.__call__
    monkeypatch.setattr(DecodeStep, "__call__", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    model, prompts = random_model(), [[1, 2], [3]]  # a padded batch
    stories = generate(model, prompts, 10, temperature=0.0, dtype=torch.float32)
    assert len(calls) == 9  # every step after the prefill
    assert stories == generate(model, prompts, 10, temperature=0.0, use_cache=False)  # and it gives the oracle's tokens
    assert _CachedDecoder(random_model(), 2, 16).step is None  # an unpacked model: the module path


def test_new_memory_ranges_are_cut_to_huge_page_boundaries():
    from tinystories.hugepages import HUGE_PAGE, anonymous_ranges, new_ranges

    M = HUGE_PAGE
    maps = (f"{0:x}-{M:x} r-xp 00000000 08:01 1234 /usr/bin/python3\n"
            f"{M:x}-{9 * M:x} rw-p 00000000 00:00 0 [heap]\n"
            f"{10 * M:x}-{11 * M:x} rw-p 00000000 00:00 0\n"
            f"{12 * M:x}-{13 * M:x} rw-s 00000000 00:05 77 /dev/shm/x\n"
            f"{14 * M:x}-{15 * M:x} r--p 00000000 00:00 0\n")
    assert anonymous_ranges(maps) == [(M, 9 * M), (10 * M, 11 * M)]  # code, shared and read-only left out
    before = [(M, 3 * M)]
    # the heap grew from 3M to 9M + 4096, a new map appeared at 10M; only their 2 MB-aligned news count
    after = [(M, 9 * M + 4096), (10 * M + 4096, 13 * M)]
    assert new_ranges(before, after) == [(3 * M, 9 * M), (11 * M, 13 * M)]
    assert new_ranges(after, after) == []
    assert new_ranges([(4 * M, 5 * M)], [(M, 9 * M)]) == [(M, 4 * M), (5 * M, 9 * M)]  # an old range inside


def _thp_setting() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "absent"
    return text.split("[")[1].split("]")[0]


def _kernel_version() -> tuple[int, int]:
    import re

    m = re.match(r"(\d+)\.(\d+)", platform.release())
    return (int(m[1]), int(m[2])) if m else (0, 0)


@pytest.mark.skipif(platform.system() != "Linux" or _thp_setting() in ("never", "absent") or _kernel_version() < (6, 1),
                    reason="2 MB pages on request need Linux 6.1+ with transparent huge pages not 'never'")
def test_memory_made_in_the_block_lands_on_huge_pages():
    import ctypes
    import mmap

    from tinystories.hugepages import new_memory_on_huge_pages

    from tinystories.hugepages import _MADV_COLLAPSE, HUGE_PAGE, _madvise

    probe = mmap.mmap(-1, 2 * HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    probe.write(b"\x01" * len(probe))
    start = -(-ctypes.addressof(ctypes.c_char.from_buffer(probe)) // HUGE_PAGE) * HUGE_PAGE
    if _madvise()(start, HUGE_PAGE, _MADV_COLLAPSE) != 0:  # e.g. a container that may not
        pytest.skip(f"this system refuses MADV_COLLAPSE (errno {ctypes.get_errno()})")

    size = 24 * 2**20
    with new_memory_on_huge_pages() as moved:
        # a fresh anonymous mapping, written through (a tensor might reuse memory freed earlier)
        mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        mm.write(b"\x01" * size)
    assert moved.bytes >= 16 * 2**20
    middle = ctypes.addressof(ctypes.c_char.from_buffer(mm)) + size // 2  # the ends may lie outside
    huge_kb = 0                                                          # the 2 MB-aligned part
    with open("/proc/self/smaps") as f:  # the AnonHugePages of the mapping that holds the middle
        inside = False
        for line in f:
            first = line.split()[0]
            if "-" in first and not first.endswith(":"):
                lo, hi = (int(x, 16) for x in first.split("-"))
                inside = lo <= middle < hi
            elif inside and line.startswith("AnonHugePages:"):
                huge_kb = int(line.split()[1])
    assert huge_kb >= 16 * 1024
    mm.seek(0)
    assert mm.read(size) == b"\x01" * size  # the contents moved with the pages
