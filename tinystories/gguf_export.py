"""Export a checkpoint as one GGUF file, the format of llama.cpp (and of what runs on it: Ollama,
LM Studio, llama-server).

    tinystories export --checkpoint runs/tiny --format gguf --out tiny.gguf [--outtype f16]
    export_gguf("runs/tiny", "tiny.gguf", "q8_0")    # the same, from Python; returns the file's path

    llama-simple -m tiny.gguf -n 200 "Once upon a time"    # llama.cpp, greedy

Written with the `gguf` package, the reader and writer llama.cpp publishes on PyPI
(pip install 'tinystories[gguf]'). The file holds the weights, the hyperparameters and the
tokenizer, so llama.cpp needs nothing else.

Which architecture. llama.cpp names an architecture in `general.architecture` and computes a fixed
network for each; the layout decides which of them computes exactly what our model does (the same
lists as the Hugging Face export, export.layout_differences):
  - learned positions, LayerNorm, tanh-GELU, global scaled attention: `gpt2` (llama.cpp's GPT-2;
    its GELU is the tanh approximation too). llama.cpp's GPT-2 always has biases and an output
    matrix: a model without biases gets zero biases (which change nothing), and a tied output layer
    is written twice, as token_embd and output (what llama.cpp's own converter does).
  - RoPE, RMSNorm, SwiGLU, no biases, global scaled attention: `llama`; with qk_norm, `qwen3`
    (per-head RMSNorm of q and k before the rotation, as ours). A tied output layer is left out:
    both load token_embd in its place.
  - GPT-Neo (local attention layers or unscaled attention scores: the `ts-*` presets): llama.cpp
    has no architecture for it, and it is refused. So is any layout neither family holds.
Refusals are one line naming the options in the way, before anything is written.

RoPE. Our rotation is Hugging Face's (rotate_half: frequency i turns the pair (i, i + head_dim/2)).
llama.cpp's `llama` rotates the pairs (2i, 2i + 1) instead ("normal" RoPE, Meta's original), so
the rows of q and k are reordered within each head, pair (i, i + head_dim/2) to rows (2i, 2i + 1),
exactly as llama.cpp's convert_hf_to_gguf.py permutes a Hugging Face Llama. Queries and keys are
permuted alike, so every q.k, and the model, is unchanged (tests/test_gguf.py checks the scores).
`qwen3` uses rotate_half itself ("NeoX" RoPE): no permutation there, as in llama.cpp's converter.

Tensor types (--outtype, default f16 as llama.cpp's converter): every matrix in f32, f16, bf16 or
q8_0 (blocks of 32 values sharing one f16 scale). What llama.cpp keeps in f32 stays in f32 here
too: 1-D tensors (norm gains, biases) and GPT-2's position table. A matrix whose rows are not a
multiple of 32 long cannot be q8_0 and is written f16, as llama.cpp's converter does.

Tokenizer. Both of ours are byte-level BPEs with GPT-2's pre-tokenizer, which llama.cpp runs as
`tokenizer.ggml.model = "gpt2"` with `tokenizer.ggml.pre = "gpt-2"`:
  - gpt2: OpenAI's tokens (encoder.json) and merges (vocab.bpe).
  - bpe-N (tokenizer.json, trained by `prepare`): its own tokens and merges. The pre-tokenizer
    name is "gpt-2" too, and that is exact, not the closest guess: `tokenizers`' ByteLevel
    pre-tokenizer with use_regex (ours: tokenizer.train_bpe) splits with GPT-2's regex, the one
    llama.cpp runs for "gpt-2", with no prefix space and no normalizer. A tokenizer.json that is
    anything else (another pre-tokenizer, a normalizer, not BPE) is refused rather than written
    under a name that would tokenize differently.
<|endoftext|> is a control token and serves as bos, eos and padding; add_bos_token is false,
because our prompts start bare (as `tinystories generate` feeds them). A model whose vocab_size is
larger than the tokenizer's gets unused "[PAD<id>]" tokens in the gaps (as llama.cpp's converter).
One difference no key can turn off: for "gpt-2" llama.cpp's whole-text detokenizer (not the
token-by-token printing of llama-simple or llama-cli) drops a space before punctuation, as Hugging
Face's clean_up_tokenization_spaces does; our decode gives back the exact text.
Also written: the sampling defaults of `tinystories generate` (general.sampling.temp 0.8, top_p
0.95, top_k 0 = off), which newer llama.cpp reads, and `tinystories.*` keys saying where it came
from (step, val loss, tokenizer, version).

Choices about `--out`: one file, written to a temporary sibling, synced and renamed into place,
so a failed export never leaves half a file. A new path, or an earlier GGUF export of ours (which
it replaces) is fine; an existing file that is anything else is refused with one line.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

from tinystories import __version__
from tinystories.errors import UserError
from tinystories.export import GENERATION_DEFAULTS, GPT2_NEEDS, LLAMA_NEEDS, is_neo, layout_differences
from tinystories.outputs import check_output_file, write_file
from tinystories.tokenizer import BPE_FILE, EOT, GPT2_FILES

GGUF_FORMAT = "tinystories-gguf-export"  # the value of our `tinystories.format` key
# --outtype -> (GGML type of the matrices, llama.cpp's file type), by name in the gguf package
OUTTYPES = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
}
DEFAULT_OUTTYPE = "f16"
INSTALL = "pip install 'tinystories[gguf]'"
# The defaults of `tinystories generate` (as the HF export's generation_config.json), as llama.cpp's
# general.sampling.* keys
SAMPLING = {"temp": GENERATION_DEFAULTS["temperature"], "top_p": GENERATION_DEFAULTS["top_p"]}


def export_gguf(checkpoint_path, out_file, outtype: str = DEFAULT_OUTTYPE) -> Path:
    """Write the GGUF file for a checkpoint (or run folder); return the file's path."""
    gguf = _import_gguf()
    from tinystories.checkpoint import load_checkpoint

    if outtype not in OUTTYPES:
        raise UserError(f"--outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    out = Path(os.path.abspath(out_file))
    _check_out(out)  # before loading, so a mistyped --out fails fast
    ckpt = load_checkpoint(checkpoint_path, device="cpu")
    arch = gguf_architecture(ckpt.model.config)  # refuses a layout llama.cpp has no architecture for
    vocab = gguf_vocab(ckpt.tokenizer, ckpt.model.config.vocab_size)
    tensors = gguf_tensors(ckpt.model, arch)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            _add_metadata(writer, gguf, arch, ckpt.model, ckpt.tokenizer, ckpt.config, outtype, vocab)
            for name, array in tensors.items():
                qtype = tensor_type(gguf, name, array, outtype)
                writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        with open(tmp, "rb") as f:  # on disk before the rename makes it visible
            os.fsync(f.fileno())

    note = "the earlier file there is unchanged" if out.exists() else "nothing was written"
    for tmp in out.parent.glob(f".{glob.escape(out.name)}.tmp-*"):
        if _left_by_a_dead_process(tmp):  # an export that was killed; a running one's file is its own
            tmp.unlink(missing_ok=True)
    try:
        return write_file(out, b"", write=write)  # write(tmp) makes the file, renamed to `out` when complete
    except UserError as e:
        raise UserError(f"{e}; {note}") from None


def _left_by_a_dead_process(tmp: Path) -> bool:
    """True for a temporary file of write_file (`.NAME.tmp-PID`) whose process no longer runs.
    write_file removes its file when the write fails; only a killed process leaves one behind."""
    pid = tmp.name.rsplit("-", 1)[1]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)  # signal 0: no signal sent, only whether the process exists
    except ProcessLookupError:
        return True
    except OSError:  # it exists but is another user's (PermissionError), or the pid is out of range
        return False
    return False


def _import_gguf():
    try:
        import gguf
    except ModuleNotFoundError as e:
        if e.name != "gguf":
            raise
        raise UserError(f"export --format gguf needs the gguf package: {INSTALL}") from None
    return gguf


def _check_out(out: Path) -> None:
    check_output_file(out, "--out")
    if out.exists() and not is_our_gguf(out):
        raise UserError(f"--out {out} already exists and is not a GGUF file tinystories wrote; "
                        "choose a new file name (or delete it)")


def is_our_gguf(path: Path) -> bool:
    """True for a GGUF file an earlier export of ours wrote (so replacing it loses nothing of anyone's)."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":  # before handing a file of any size to the reader
                return False
        from gguf import GGUFReader

        field = GGUFReader(path).get_field("tinystories.format")
        return field is not None and field.contents() == GGUF_FORMAT
    except Exception:  # unreadable, truncated or malformed: not a file of ours to replace
        return False


# -----------------------------------------------------------------------------
# Which llama.cpp architecture holds the model


def gguf_architecture(cfg) -> str:
    """The llama.cpp architecture that computes exactly what model `cfg` does: gpt2, llama or qwen3.

    Anything else is refused with one line naming the options in the way (see the module docstring).
    """
    gpt2, llama = layout_differences(cfg)
    if not gpt2 and is_neo(cfg):
        what = [x for x, on in (("local attention layers", any(cfg.is_local(i) for i in range(cfg.n_layer))),
                                ("scale_attention=false", not cfg.scale_attention)) if on]
        raise UserError(f"export --format gguf: llama.cpp has no GPT-Neo architecture, and this model has "
                        f"GPT-Neo's {' and '.join(what)}; export it with --format hf instead")
    if not gpt2:
        return "gpt2"
    if not llama:
        return "qwen3" if cfg.qk_norm else "llama"
    nearer = gpt2 if len(gpt2) < len(llama) else llama
    raise UserError(f"export --format gguf: no llama.cpp architecture holds this layout ({', '.join(nearer)}); "
                    f"gpt2 needs {GPT2_NEEDS}; llama needs {LLAMA_NEEDS}")


# -----------------------------------------------------------------------------
# Tensors: llama.cpp's names (gguf-py's constants.py, TENSOR_NAMES), our orientation


def gguf_tensors(model, arch: str) -> dict:
    """Our model's weights as float32 numpy arrays under llama.cpp's tensor names, in writing order.

    nn.Linear's (out, in) is already what llama.cpp wants (ggml lists dimensions the other way
    round, {in, out}), so nothing is transposed.
    """
    import torch

    cfg = model.config
    ours = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    out = {}

    def put(name, tensor):
        out[name] = tensor.contiguous().numpy()

    def bias(name, size):  # llama.cpp's GPT-2 has every bias; a model without them gets zeros
        return ours.pop(name) if name in ours else torch.zeros(size)

    lm_head = ours.pop("lm_head.weight")  # the token embedding itself when tied
    put("token_embd.weight", ours.pop("transformer.wte.weight"))
    if arch == "gpt2":
        put("position_embd.weight", ours.pop("transformer.wpe.weight"))
    for i in range(cfg.n_layer):
        ours_, blk = f"transformer.h.{i}.", f"blk.{i}."
        put(blk + "attn_norm.weight", ours.pop(ours_ + "ln_1.weight"))
        if arch == "gpt2":
            put(blk + "attn_norm.bias", bias(ours_ + "ln_1.bias", cfg.n_embd))
            put(blk + "attn_qkv.weight", ours.pop(ours_ + "attn.c_attn.weight"))  # rows q, k, v: llama.cpp's order
            put(blk + "attn_qkv.bias", bias(ours_ + "attn.c_attn.bias", 3 * cfg.n_embd))
            put(blk + "attn_output.weight", ours.pop(ours_ + "attn.c_proj.weight"))
            put(blk + "attn_output.bias", bias(ours_ + "attn.c_proj.bias", cfg.n_embd))
            put(blk + "ffn_norm.weight", ours.pop(ours_ + "ln_2.weight"))
            put(blk + "ffn_norm.bias", bias(ours_ + "ln_2.bias", cfg.n_embd))
            put(blk + "ffn_up.weight", ours.pop(ours_ + "mlp.c_fc.weight"))
            put(blk + "ffn_up.bias", bias(ours_ + "mlp.c_fc.bias", cfg.hidden_size))
            put(blk + "ffn_down.weight", ours.pop(ours_ + "mlp.c_proj.weight"))
            put(blk + "ffn_down.bias", bias(ours_ + "mlp.c_proj.bias", cfg.n_embd))
            continue
        q, k, v = ours.pop(ours_ + "attn.c_attn.weight").split(cfg.n_embd, dim=0)  # (3C, C) -> 3 x (C, C)
        if arch == "llama":  # llama.cpp's llama rotates pairs (2i, 2i + 1): see the module docstring
            q, k = interleave_rope_rows(q, cfg.n_head), interleave_rope_rows(k, cfg.n_head)
        put(blk + "attn_q.weight", q)
        put(blk + "attn_k.weight", k)
        put(blk + "attn_v.weight", v)
        if cfg.qk_norm:  # qwen3 only: no rows were reordered, so the per-head gains stay as they are
            put(blk + "attn_q_norm.weight", ours.pop(ours_ + "attn.q_norm.weight"))
            put(blk + "attn_k_norm.weight", ours.pop(ours_ + "attn.k_norm.weight"))
        put(blk + "attn_output.weight", ours.pop(ours_ + "attn.c_proj.weight"))
        put(blk + "ffn_norm.weight", ours.pop(ours_ + "ln_2.weight"))
        gate, up = ours.pop(ours_ + "mlp.c_fc.weight").chunk(2, dim=0)  # our SwiGLU: gate rows, then up rows
        put(blk + "ffn_gate.weight", gate)
        put(blk + "ffn_up.weight", up)
        put(blk + "ffn_down.weight", ours.pop(ours_ + "mlp.c_proj.weight"))
    put("output_norm.weight", ours.pop("transformer.ln_f.weight"))
    if arch == "gpt2":
        put("output_norm.bias", bias("transformer.ln_f.bias", cfg.n_embd))
    if arch == "gpt2" or not cfg.tie_embeddings:  # llama.cpp's GPT-2 needs output even when it is token_embd
        put("output.weight", lm_head)
    if ours:  # a parameter the map does not know would be silently lost
        raise RuntimeError(f"GGUF export does not know where to put {sorted(ours)}")
    return out


def interleave_rope_rows(w, n_head: int):
    """Rows of q or k (n_head * head_dim, C), each head's pair (i, i + head_dim/2) moved to rows (2i, 2i + 1).

    The permutation of llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute), from Hugging Face's
    rotate_half RoPE to llama.cpp's interleaved one.
    """
    rows, cols = w.shape
    head_dim = rows // n_head
    # (n_head, 2, head_dim/2, C): [h, 0, i] is row i of head h, [h, 1, i] row i + head_dim/2; swapping the
    # middle axes puts them next to each other
    return w.reshape(n_head, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def tensor_type(gguf, name: str, array, outtype: str):
    """The GGML type tensor `name` is stored in (see "Tensor types" in the module docstring)."""
    types = gguf.GGMLQuantizationType
    if array.ndim == 1 or name == "position_embd.weight":
        return types.F32
    if outtype == "q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[types.Q8_0][0]:
        return types.F16  # a q8_0 block is 32 values of one row
    return types[OUTTYPES[outtype][0]]


# -----------------------------------------------------------------------------
# Metadata


def _add_metadata(writer, gguf, arch, model, tokenizer, checkpoint_config, outtype, vocab) -> None:
    cfg = model.config
    family = {"gpt2": "GPT-2", "llama": "Llama", "qwen3": "Qwen3"}[arch]
    writer.add_type("model")
    writer.add_name(f"TinyStories {family} {model.num_params() / 1e6:.1f}M")
    writer.add_file_type(int(gguf.LlamaFileType[OUTTYPES[outtype][1]]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(cfg.hidden_size)
    writer.add_block_count(cfg.n_layer)
    writer.add_head_count(cfg.n_head)
    if arch == "gpt2":
        writer.add_layer_norm_eps(cfg.norm_eps)
    else:
        writer.add_head_count_kv(cfg.n_head)  # one k/v head per query head
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
        writer.add_rope_dimension_count(cfg.head_dim)  # every dimension of a head rotates
        writer.add_rope_freq_base(cfg.rope_theta)

    tokens, token_types, merges = vocab
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.eot_id)
    writer.add_eos_token_id(tokenizer.eot_id)
    writer.add_pad_token_id(tokenizer.eot_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)

    writer.add_float32("general.sampling.temp", SAMPLING["temp"])
    writer.add_float32("general.sampling.top_p", SAMPLING["top_p"])
    writer.add_int32("general.sampling.top_k", 0)  # off, as `tinystories generate`
    writer.add_string("tinystories.format", GGUF_FORMAT)
    writer.add_string("tinystories.version", __version__)
    writer.add_string("tinystories.tokenizer", tokenizer.name)
    writer.add_uint64("tinystories.step", int(checkpoint_config.get("step") or 0))
    val_loss = checkpoint_config.get("val_loss")
    if isinstance(val_loss, (int, float)):
        writer.add_float32("tinystories.val_loss", float(val_loss))


# -----------------------------------------------------------------------------
# Tokenizer


def gguf_vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, their llama.cpp token types, merges "a b" in rank order) for `tokenizer`.

    Tokens are in the byte-level alphabet both files use (a space is "Ġ"), as llama.cpp expects.
    """
    files = tokenizer.files()
    if BPE_FILE in files:
        vocab, special, merges = _tokenizer_json_vocab(files[BPE_FILE])
    elif set(GPT2_FILES) <= set(files):
        vocab = json.loads(files["encoder.json"])
        lines = files["vocab.bpe"].decode("utf-8").splitlines()[1:]  # line 0 is "#version: 0.2"
        merges = [line for line in lines if line]
        special = {EOT: True}
    else:
        raise UserError(f"cannot export tokenizer {tokenizer.name} to GGUF: unknown tokenizer files {sorted(files)}")

    if max(vocab.values()) >= vocab_size:
        raise UserError(f"the tokenizer has ids up to {max(vocab.values())} but the model only {vocab_size} rows")
    by_id = {i: token for token, i in vocab.items()}
    types = {"normal": 1, "control": 3, "user_defined": 4, "unused": 5}  # gguf.TokenType
    tokens, token_types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # rows the tokenizer never produces (as llama.cpp's converter names them)
            tokens.append(f"[PAD{i}]")
            token_types.append(types["unused"])
            continue
        token = by_id[i]
        tokens.append(token)
        kind = "normal" if token not in special else "control" if special[token] else "user_defined"
        token_types.append(types[kind])
    return tokens, token_types, merges


def _tokenizer_json_vocab(data: bytes) -> tuple[dict[str, int], dict[str, bool], list[str]]:
    """(vocab, added tokens -> special?, merges) of a `tokenizers` byte-level BPE with GPT-2's pre-tokenizer."""
    tok = json.loads(data)
    model, pre = tok.get("model") or {}, tok.get("pre_tokenizer") or {}
    problems = []
    if model.get("type") != "BPE":
        problems.append(f"its model is {model.get('type')}, not BPE")
    if tok.get("normalizer") is not None:
        problems.append("it has a normalizer")
    if not (pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")):
        problems.append("its pre-tokenizer is not ByteLevel with GPT-2's regex and no prefix space")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") or model.get("byte_fallback"):
        problems.append("its BPE has subword prefixes/suffixes or byte fallback")
    if problems:
        raise UserError(f"the tokenizer.json cannot be written as llama.cpp's gpt-2 tokenizer: {'; '.join(problems)}")
    # merges: "a b" strings (older tokenizers files) or [a, b] pairs (newer ones)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    special = {t["content"]: bool(t.get("special")) for t in tok.get("added_tokens", [])}
    vocab = dict(model["vocab"])
    for t in tok.get("added_tokens", []):
        vocab.setdefault(t["content"], t["id"])
    return vocab, special, merges
