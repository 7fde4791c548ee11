"""GGUF export (llama.cpp): read back with the `gguf` package's own reader, every tensor is the
checkpoint's (exactly in f32, as its rounding in f16/bf16, within the q8_0 error), the metadata is
complete and the tokenizer inside encodes like ours.

Small random models (weights at std 0.2, so that a wrong row order cannot hide) are saved as our
checkpoints and exported. With TINYSTORIES_LLAMA_SIMPLE pointing at llama.cpp's `llama-simple`
binary, llama.cpp itself loads each export and its greedy tokens are compared with ours (skipped
otherwise: llama.cpp is not a dependency).
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tinystories.checkpoint import save_checkpoint
from tinystories.cli import main
from tinystories.config import ModelConfig
from tinystories.errors import UserError
from tinystories.generate import generate
from tinystories.model import GPT, rope_angles, rotate
from tinystories.tokenizer import EOT, load_gpt2

gguf = pytest.importorskip("gguf")
from tinystories.gguf_export import export_gguf, interleave_rope_rows  # noqa: E402

Q = gguf.GGMLQuantizationType
LLAMA = dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False)
# name -> (ModelConfig options, the llama.cpp architecture it must become)
LAYOUTS = {
    "gpt2": (dict(), "gpt2"),
    "gpt2-nobias-untied": (dict(bias=False, tie_embeddings=False), "gpt2"),
    "llama": (LLAMA, "llama"),
    "llama-untied": (dict(LLAMA, tie_embeddings=False, rope_theta=500.0), "llama"),
    "qwen3": (dict(LLAMA, qk_norm=True), "qwen3"),
}
FILE_TYPES = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}  # llama.cpp's LlamaFileType
MATRIX_TYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}


def random_model(vocab_size, *, n_layer=2, n_head=4, n_embd=64, block_size=64, seed=0, **options) -> GPT:
    """Every weight at std 0.2 (norm gains around 1): logits far from uniform, nothing hides."""
    cfg = ModelConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                      vocab_size=vocab_size, dropout=0.0, **options)
    model = GPT(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = 1.0 if p.ndim == 1 and name.endswith(".weight") else 0.0
            p.copy_(gain + 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def gpt2(gpt2_dir):
    return load_gpt2(gpt2_dir)


def export(tmp_path, model, tokenizer, outtype="f32", name="model.gguf"):
    save_checkpoint(tmp_path / "ckpt", model, tokenizer, step=7, val_loss=1.25)
    return export_gguf(tmp_path / "ckpt", tmp_path / name, outtype)


def read(path):
    """(metadata by key, {tensor name: (GGML type, float32 array in our (out, in) orientation)})."""
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = (t.tensor_type, np.array(values, dtype=np.float32).reshape(tuple(reversed(t.shape.tolist()))))
    return fields, tensors


def our_names(tensors: dict, arch: str, cfg) -> dict:
    """The GGUF's tensors under our parameter names, with q/k rows back in our order (llama), fused
    matrices fused again: what the checkpoint's state dict should hold. The inverse of the export,
    written separately from it."""
    t = {name: torch.from_numpy(array) for name, (_, array) in tensors.items()}
    hd = cfg.head_dim

    def deinterleave(w):  # llama.cpp's rows (2i, 2i + 1) of each head back to (i, i + head_dim/2)
        return w.reshape(cfg.n_head, hd // 2, 2, -1).transpose(1, 2).reshape(w.shape)

    ours = {"transformer.wte.weight": t.pop("token_embd.weight"), "transformer.ln_f.weight": t.pop("output_norm.weight")}
    if arch == "gpt2":
        ours["transformer.wpe.weight"] = t.pop("position_embd.weight")
        ours["transformer.ln_f.bias"] = t.pop("output_norm.bias")
    for i in range(cfg.n_layer):
        o, b = f"transformer.h.{i}.", f"blk.{i}."
        ours[o + "ln_1.weight"] = t.pop(b + "attn_norm.weight")
        ours[o + "ln_2.weight"] = t.pop(b + "ffn_norm.weight")
        ours[o + "attn.c_proj.weight"] = t.pop(b + "attn_output.weight")
        ours[o + "mlp.c_proj.weight"] = t.pop(b + "ffn_down.weight")
        if arch == "gpt2":
            ours[o + "attn.c_attn.weight"] = t.pop(b + "attn_qkv.weight")
            ours[o + "mlp.c_fc.weight"] = t.pop(b + "ffn_up.weight")
            for ours_name, name in (("ln_1", "attn_norm"), ("ln_2", "ffn_norm"), ("attn.c_attn", "attn_qkv"),
                                    ("attn.c_proj", "attn_output"), ("mlp.c_fc", "ffn_up"), ("mlp.c_proj", "ffn_down")):
                ours[o + ours_name + ".bias"] = t.pop(b + name + ".bias")
            continue
        q, k = t.pop(b + "attn_q.weight"), t.pop(b + "attn_k.weight")
        if arch == "llama":
            q, k = deinterleave(q), deinterleave(k)
        ours[o + "attn.c_attn.weight"] = torch.cat([q, k, t.pop(b + "attn_v.weight")])
        ours[o + "mlp.c_fc.weight"] = torch.cat([t.pop(b + "ffn_gate.weight"), t.pop(b + "ffn_up.weight")])
        if arch == "qwen3":
            ours[o + "attn.q_norm.weight"] = t.pop(b + "attn_q_norm.weight")
            ours[o + "attn.k_norm.weight"] = t.pop(b + "attn_k_norm.weight")
    if "output.weight" in t:
        ours["lm_head.weight"] = t.pop("output.weight")
    assert not t, f"tensors the checkpoint does not have: {sorted(t)}"
    return ours


def assert_stored_as(got: torch.Tensor, want: torch.Tensor, qtype, name: str) -> None:
    """`got` (read back) is `want` (the checkpoint's) stored in `qtype`."""
    if qtype == Q.F32:
        assert torch.equal(got, want), name
    elif qtype == Q.F16:
        assert torch.equal(got, want.half().float()), name
    elif qtype == Q.BF16:
        assert torch.equal(got, want.bfloat16().float()), name
    elif qtype == Q.Q8_0:
        # blocks of 32 along each row share the scale d = max|x| / 127 (stored in f16): each value
        # is off by at most d/2 (rounding) + 127 * d * 2**-11 (the scale's f16 rounding)
        blocks, err = want.reshape(-1, 32), (got - want).reshape(-1, 32)
        bound = blocks.abs().amax(dim=1, keepdim=True) / 127 * (0.5 + 127 * 2**-11) + 1e-7
        assert (err.abs() <= bound).all(), f"{name}: q8_0 error {(err.abs() / bound).max():.2f} x its bound"
        assert err.abs().max() > 0, name  # really quantized
    else:
        raise AssertionError(f"{name}: unexpected type {qtype.name}")


# -----------------------------------------------------------------------------
# Tensors and metadata


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_tensor_is_the_checkpoints(tmp_path, bpe, layout, outtype):
    options, arch = LAYOUTS[layout]
    model = random_model(bpe.vocab_size, **options)
    fields, tensors = read(export(tmp_path, model, bpe, outtype))
    assert fields["general.architecture"] == arch

    for name, (qtype, array) in tensors.items():  # what llama.cpp keeps in f32 is f32
        f32 = array.ndim == 1 or name == "position_embd.weight"
        assert qtype == (Q.F32 if f32 else MATRIX_TYPES[outtype]), name

    cfg = model.config
    state = {k: v.detach() for k, v in model.state_dict().items()}
    read_back = our_names(tensors, arch, cfg)
    if not cfg.bias:  # GPT-2 in llama.cpp always has biases: ours has none, so they must be zero
        for name in [n for n in read_back if n.endswith(".bias")]:
            assert not read_back.pop(name).any(), name
    if cfg.tie_embeddings and arch == "gpt2":  # written twice: llama.cpp's GPT-2 needs an output matrix
        assert torch.equal(read_back["lm_head.weight"], read_back["transformer.wte.weight"])
    elif cfg.tie_embeddings:  # llama/qwen3 load token_embd in its place
        state.pop("lm_head.weight")
    assert sorted(read_back) == sorted(state)
    for name, want in state.items():
        # the type of the GGUF tensor this came from: matrices are all of one type, 1-D ones f32
        qtype = Q.F32 if want.ndim == 1 or name == "transformer.wpe.weight" else MATRIX_TYPES[outtype]
        assert_stored_as(read_back[name], want, qtype, name)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_metadata_is_complete(tmp_path, bpe, layout):
    options, arch = LAYOUTS[layout]
    model = random_model(bpe.vocab_size, n_layer=3, n_embd=96, block_size=48, mlp_hidden=160, **options)
    fields, _ = read(export(tmp_path, model, bpe, "q8_0"))
    cfg = model.config
    expected = {
        "general.architecture": arch,
        "general.type": "model",
        "general.file_type": FILE_TYPES["q8_0"],
        "general.quantization_version": 2,
        f"{arch}.vocab_size": bpe.vocab_size,
        f"{arch}.context_length": 48,
        f"{arch}.embedding_length": 96,
        f"{arch}.feed_forward_length": 160,
        f"{arch}.block_count": 3,
        f"{arch}.attention.head_count": 4,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": bpe.eot_id,
        "tokenizer.ggml.eos_token_id": bpe.eot_id,
        "tokenizer.ggml.padding_token_id": bpe.eot_id,
        "tokenizer.ggml.add_bos_token": False,
        "tinystories.format": "tinystories-gguf-export",
        "tinystories.tokenizer": "bpe-512",
        "tinystories.step": 7,
    }
    if arch == "gpt2":
        expected[f"{arch}.attention.layer_norm_epsilon"] = pytest.approx(cfg.norm_eps)
    else:
        expected.update({
            f"{arch}.attention.head_count_kv": 4,
            f"{arch}.attention.key_length": 24,
            f"{arch}.attention.value_length": 24,
            f"{arch}.attention.layer_norm_rms_epsilon": pytest.approx(cfg.norm_eps),
            f"{arch}.rope.dimension_count": 24,
            f"{arch}.rope.freq_base": cfg.rope_theta,
        })
    assert {k: fields.get(k) for k in expected} == expected
    assert fields["tinystories.val_loss"] == pytest.approx(1.25)
    assert fields["general.sampling.temp"] == pytest.approx(0.8)  # the defaults of `tinystories generate`
    assert fields["general.sampling.top_p"] == pytest.approx(0.95)
    assert len(fields["tokenizer.ggml.tokens"]) == len(fields["tokenizer.ggml.token_type"]) == bpe.vocab_size


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_file_type_per_outtype_and_default(tmp_path, bpe, outtype):
    fields, _ = read(export(tmp_path, random_model(bpe.vocab_size), bpe, outtype))
    assert fields["general.file_type"] == FILE_TYPES[outtype]
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--format", "gguf",
                 "--out", str(tmp_path / "default.gguf")]) == 0
    fields, tensors = read(tmp_path / "default.gguf")
    assert fields["general.file_type"] == FILE_TYPES["f16"]  # the default, as llama.cpp's converter
    assert tensors["blk.0.attn_qkv.weight"][0] == Q.F16


def test_q8_0_falls_back_to_f16_for_rows_not_a_multiple_of_32(tmp_path, bpe):
    model = random_model(bpe.vocab_size, n_embd=48, n_head=4)  # rows of 48 values; the MLP's down rows are 192
    _, tensors = read(export(tmp_path, model, bpe, "q8_0"))
    assert tensors["blk.0.attn_qkv.weight"][0] == Q.F16
    assert tensors["blk.0.ffn_up.weight"][0] == Q.F16
    assert tensors["blk.0.ffn_down.weight"][0] == Q.Q8_0
    want = model.state_dict()["transformer.h.0.attn.c_attn.weight"]
    assert_stored_as(torch.from_numpy(tensors["blk.0.attn_qkv.weight"][1]), want, Q.F16, "attn_qkv")


# -----------------------------------------------------------------------------
# RoPE: llama.cpp's llama rotates pairs (2i, 2i + 1); ours, pairs (i, i + head_dim/2)


def rope_interleaved(x, theta):
    """llama.cpp's "normal" RoPE (ggml_rope mode 0) of x (B, n_head, T, head_dim): pair (2i, 2i + 1)
    turned by position * theta**(-2i/head_dim)."""
    T, hd = x.shape[2], x.shape[3]
    angles = torch.arange(T, dtype=torch.float32)[:, None] * theta ** (-torch.arange(0, hd, 2) / hd)  # (T, hd/2)
    cos, sin = angles.cos(), angles.sin()
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)


def test_interleaved_q_k_rows_give_llama_cpp_the_same_attention_scores():
    n_head, hd, C, T, theta = 4, 16, 64, 12, 10000.0
    g = torch.Generator().manual_seed(0)
    wq, wk, x = (torch.randn(n_head * hd, C, generator=g), torch.randn(n_head * hd, C, generator=g),
                 torch.randn(1, T, C, generator=g))

    def heads(w):  # (1, T, C) @ (C, n_head * hd) -> (1, n_head, T, hd)
        return (x @ w.T).view(1, T, n_head, hd).transpose(1, 2)

    cos, sin = rope_angles(torch.arange(T)[None], hd, theta)
    ours = rotate(heads(wq), cos, sin) @ rotate(heads(wk), cos, sin).transpose(-1, -2)  # (1, n_head, T, T)
    theirs = (rope_interleaved(heads(interleave_rope_rows(wq, n_head)), theta)
              @ rope_interleaved(heads(interleave_rope_rows(wk, n_head)), theta).transpose(-1, -2))
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-4)
    unpermuted = rope_interleaved(heads(wq), theta) @ rope_interleaved(heads(wk), theta).transpose(-1, -2)
    assert (unpermuted - ours).abs().max() > 1.0  # without the reordering llama.cpp would compute another model


# -----------------------------------------------------------------------------
# Tokenizer


def gguf_tokenizer(fields):
    """A `tokenizers` BPE built from nothing but the GGUF's tokens and merges, with the pre-tokenizer
    llama.cpp runs for "gpt-2" (GPT-2's regex, byte-level, no prefix space)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(fields["tokenizer.ggml.tokens"])}
    merges = [tuple(m.split(" ")) for m in fields["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


@pytest.mark.parametrize("kind", ["gpt2", "bpe"])
def test_tokens_and_merges_encode_like_ours(tmp_path, request, stories, kind):
    tokenizer = request.getfixturevalue(kind)
    fields, _ = read(export(tmp_path, random_model(tokenizer.vocab_size), tokenizer, "q8_0"))
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert tokens[tokenizer.eot_id] == EOT and types[tokenizer.eot_id] == gguf.TokenType.CONTROL
    assert sum(t != gguf.TokenType.NORMAL for t in types) == 1
    assert len(fields["tokenizer.ggml.merges"]) == tokenizer.vocab_size - 257  # 256 bytes and <|endoftext|>

    rebuilt = gguf_tokenizer(fields)
    texts = stories[:100] + ["  two spaces, tabs\tand\nnewlines; digits 12345, 'quotes' don't", "émigré naïve ☃"]
    for text in texts:
        ids = tokenizer.encode(text)
        assert rebuilt.encode(text).ids == ids
        assert rebuilt.decode(ids) == text


def test_a_model_wider_than_its_tokenizer_gets_unused_tokens(tmp_path, bpe):
    fields, _ = read(export(tmp_path, random_model(bpe.vocab_size + 64), bpe, "f32"))
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == bpe.vocab_size + 64
    assert tokens[-1] == f"[PAD{bpe.vocab_size + 63}]" and types[-1] == gguf.TokenType.UNUSED


# -----------------------------------------------------------------------------
# Refusals and --out


@pytest.mark.parametrize("options, message", [
    (dict(attention_layers=["global", "local"], window_size=16), "no GPT-Neo architecture, and this model has "
                                                                 "GPT-Neo's local attention layers"),
    (dict(scale_attention=False), "no GPT-Neo architecture, and this model has GPT-Neo's scale_attention=false"),
    (dict(mlp="relu2"), "no llama.cpp architecture holds this layout (mlp=relu2)"),
    (dict(LLAMA, mlp="gelu"), "no llama.cpp architecture holds this layout (mlp=gelu)"),
    (dict(pos_embedding="learned", norm="rmsnorm", mlp="swiglu"), "(pos_embedding=learned, bias=true)"),
])
def test_a_layout_with_no_llama_cpp_architecture_is_refused(tmp_path, bpe, capfd, options, message):
    save_checkpoint(tmp_path / "ckpt", random_model(bpe.vocab_size, **options), bpe)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf")
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--format", "gguf",
                 "--out", str(tmp_path / "m.gguf")]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # nothing written


def test_out_may_be_new_or_an_earlier_gguf_export(tmp_path, bpe):
    out = export(tmp_path, random_model(bpe.vocab_size), bpe, "f32", name="sub/dir/m.gguf")  # folders are made
    assert read(out)[0]["general.file_type"] == FILE_TYPES["f32"]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    (out.parent / f".m.gguf.tmp-{dead}").write_bytes(b"GGUF half")  # left by an export that was killed
    running = out.parent / f".m.gguf.tmp-{os.getppid()}"  # a concurrent export's file, still being written
    running.write_bytes(b"GGUF hal")
    assert export_gguf(tmp_path / "ckpt", out, "q8_0") == out  # ours: replaced
    assert read(out)[0]["general.file_type"] == FILE_TYPES["q8_0"]
    # the dead process's temporary file is gone, the running one's is left alone
    assert sorted(p.name for p in out.parent.iterdir()) == [running.name, "m.gguf"]


def test_bad_out_is_refused_and_untouched(tmp_path, bpe, capfd):
    save_checkpoint(tmp_path / "ckpt", random_model(bpe.vocab_size), bpe)
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    other_gguf = tmp_path / "other.gguf"  # a GGUF file someone else wrote
    writer = gguf.GGUFWriter(other_gguf, "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    before = other_gguf.read_bytes()
    cases = [
        (tmp_path, "is a folder"),
        (notes, "already exists and is not a GGUF file tinystories wrote"),
        (other_gguf, "already exists and is not a GGUF file tinystories wrote"),
        (notes / "m.gguf", "is a file, not a folder"),
    ]
    for out, message in cases:
        assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--format", "gguf", "--out", str(out)]) == 2
        err = capfd.readouterr().err
        assert err.count("\n") == 1 and message in err and "Traceback" not in err, err
    assert notes.read_text() == "mine" and other_gguf.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "notes.txt", "other.gguf"]


def test_outtype_is_for_gguf_only(tmp_path, bpe, capfd):
    save_checkpoint(tmp_path / "ckpt", random_model(bpe.vocab_size), bpe)
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--outtype", "q8_0", "--out", str(tmp_path / "hf")]) == 2
    assert "--outtype is for --format gguf" in capfd.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_failed_write_keeps_the_earlier_file(tmp_path, bpe, monkeypatch):
    out = export(tmp_path, random_model(bpe.vocab_size), bpe, "f32")
    before = out.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)  # fails after the header is written
    with pytest.raises(UserError, match=r"\(No space left on device\); the earlier file there is unchanged"):
        export_gguf(tmp_path / "ckpt", out, "q8_0")
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "model.gguf"]


def test_missing_gguf_package_is_one_line(tmp_path, bpe, monkeypatch, capfd):
    save_checkpoint(tmp_path / "ckpt", random_model(bpe.vocab_size), bpe)
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)  # `import gguf` now fails as if not installed
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--format", "gguf",
                 "--out", str(tmp_path / "m.gguf")]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "pip install 'tinystories[gguf]'" in err
    assert not (tmp_path / "m.gguf").exists()


# -----------------------------------------------------------------------------
# llama.cpp itself (TINYSTORIES_LLAMA_SIMPLE=/path/to/llama.cpp/build/bin/llama-simple)

LLAMA_SIMPLE = os.environ.get("TINYSTORIES_LLAMA_SIMPLE")


def token_bytes(tokenizer, ids) -> bytes:
    """The bytes of the tokens `ids` (a token may hold part of a UTF-8 character, as llama.cpp prints it)."""
    from tinystories.gguf_export import gguf_vocab

    # GPT-2's byte <-> printable character table (both tokenizers' tokens are written in it)
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = dict(zip(printable, printable))
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    to_byte = {chr(c): b for b, c in chars.items()}
    tokens = gguf_vocab(tokenizer, tokenizer.vocab_size)[0]
    return b"".join(bytes(to_byte[ch] for ch in tokens[i]) for i in ids)


# A random model's greedy choice is sometimes a near-tie (top two logits 0.002 apart, seen), which
# llama.cpp's own float arithmetic (on CPU its GELU is a table of f16 values) may break the other way;
# tokens are compared up to the first step where ours is closer than this, at least 10 of them.
NEAR_TIE = 0.03


@pytest.mark.skipif(not LLAMA_SIMPLE, reason="set TINYSTORIES_LLAMA_SIMPLE to llama.cpp's llama-simple to run")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["bpe", "gpt2"])
def test_llama_cpp_greedy_tokens_equal_ours(tmp_path, request, stories, layout, kind):
    tokenizer = request.getfixturevalue(kind)
    options, arch = LAYOUTS[layout]
    model = random_model(tokenizer.vocab_size, n_layer=3, block_size=128, seed=1, **options)
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)  # logits 3x further apart: fewer near-ties (the embedding too, when tied)
    out = export(tmp_path, model, tokenizer, "f32")
    prompt = stories[3][:80]
    ids = tokenizer.encode(prompt)
    n_new = 40
    new = generate(model, [ids], n_new, temperature=0.0, eot_id=tokenizer.eot_id)[0]
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids + new]))
    top2 = logits[0, len(ids) - 1 : -1].topk(2).values  # (n_new, 2): the two best logits at each step
    clear = int(torch.cumprod(top2[:, 0] - top2[:, 1] > NEAR_TIE, dim=0).sum())  # steps before the first near-tie
    assert clear >= 10, f"only {clear} clear greedy steps: choose another seed"

    r = subprocess.run([LLAMA_SIMPLE, "-m", str(out), "-n", str(n_new), prompt], capture_output=True, timeout=120)
    if r.returncode != 0 and b"unknown model architecture" in r.stderr:
        pytest.skip(f"this llama.cpp has no {arch} architecture")
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
    # llama-simple prints the prompt's tokens, then each new one (stopping before end-of-text), then a newline
    want = token_bytes(tokenizer, ids + [t for t in new[:clear] if t != tokenizer.eot_id])
    assert r.stdout.startswith(want), f"llama.cpp: {r.stdout[:300]!r}\nours:      {want[:300]!r}"
    if clear == len(new):
        assert r.stdout == token_bytes(tokenizer, ids + [t for t in new if t != tokenizer.eot_id]) + b"\n"
