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
from tinystories.generate import PackedLinear, decode_dtype, decoding_copy, generate, pack_linears
from tinystories.loss import cross_entropy
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
    monkeypatch.setattr(tinystories.loss, "_CHUNK_FLOATS", 7 * 300)


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
    from tinystories.generate import PackedMLP
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
