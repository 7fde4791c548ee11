"""Export a checkpoint as a Hugging Face `transformers` model folder: GPT2LMHeadModel, or
GPTNeoForCausalLM for GPT-Neo models, LlamaForCausalLM or Qwen3ForCausalLM for the Llama layout
(see "Which class" below). `--format gguf` writes one GGUF file for llama.cpp instead: gguf_export.py.

    tinystories export --checkpoint runs/tiny --out hf/tiny-stories
    export_hf("runs/tiny", "hf/tiny-stories")     # the same, from Python; returns the folder

The folder loads with no code of ours:

    model = transformers.AutoModelForCausalLM.from_pretrained("hf/tiny-stories")
    tok = transformers.AutoTokenizer.from_pretrained("hf/tiny-stories")

What it holds:
    config.json              the class's config fields (GPT-2: gelu_new, the model's LayerNorm eps,
                             tied or untied embeddings), plus a `tinystories` entry saying where it
                             came from (also how we recognise our own exports)
    model.safetensors        HF key names; a tied lm_head.weight is not stored (transformers re-ties
                             it, as its own save_pretrained does); GPT-2's Linear weights transposed
                             to Conv1D
    generation_config.json   the defaults of `tinystories generate`: sampling at temperature 0.8,
                             top-p 0.95, no top-k (top_k 0, else transformers would apply 50),
                             stop at end-of-text, 200 new tokens but at most half the context
                             (transformers has no sliding window: a position past block_size is
                             an IndexError, so a short prompt must always leave room)
    tokenizer files          gpt2: vocab.json + merges.txt (OpenAI's encoder.json + vocab.bpe) and a
                             tokenizer.json built from them; bpe-N: our tokenizer.json. Both with a
                             tokenizer_config.json naming <|endoftext|> as bos, eos, unk and pad.
    README.md                a model card

Why the transpose: our model uses nn.Linear, whose weight is (out, in); GPT-2's Conv1D stores
(in, out). Everything else (names, GELU flavour, LayerNorm eps, weight tying) already matches by
construction (see model.py), so the export is a key map plus a transpose. A model trained without
biases exports zero biases, which computes the same function.

GPT-Neo. A model with local attention layers or unscaled attention (the `ts-*` presets, imported
TinyStories models) is written as GPTNeoForCausalLM: our fused c_attn is split into q_proj, k_proj,
v_proj, c_proj becomes out_proj, and attention_layers is written in GPT-Neo's run-length form
(attention_types). GPT-Neo never scales attention scores, so a model that does (local layers with
scale_attention=True) has 1/sqrt(head_dim) folded into q_proj, which computes the same function.
GPT-Neo has no q/k/v biases: a model with them is refused. Importing a GPT-Neo model and exporting
it gives back identical tensors (tests/test_neo.py).

Which class. The layout decides (hf_family), and anything no class computes exactly is refused with
one line naming the options in the way:
  - learned positions, LayerNorm, GELU, no qk_norm: GPT2LMHeadModel, or GPTNeoForCausalLM (above).
  - rope, rmsnorm, swiglu, no biases, global scaled attention: LlamaForCausalLM; with qk_norm,
    Qwen3ForCausalLM (its q_norm/k_norm are per-head RMSNorms before the rotation, as ours).
  - anything else (relu2, RoPE with LayerNorm or GELU, learned positions with RMSNorm, biases with
    RoPE, qk_norm without the rest of the Qwen3 layout, ...) has no class to go to.
Untied output layers (tie_embeddings=false) are written as lm_head.weight with tie_word_embeddings
false, in every family; zero_init_proj only changes the initialisation, so it needs nothing.

Llama and Qwen3. The key map is llama_key_map: c_attn (rows q, k, v) splits into q_proj, k_proj,
v_proj, c_fc (rows gate, up) into gate_proj, up_proj, c_proj becomes o_proj / down_proj, ln_1 / ln_2
input_layernorm / post_attention_layernorm, ln_f model.norm, wte model.embed_tokens. Our RoPE is
Hugging Face's convention (rotate_half, the pair (i, i + head_dim/2)), so q and k need no
permutation. num_key_value_heads = num_attention_heads, and head_dim is always written (Qwen3's
default of 128 is not hidden_size / heads).

Choices about `--out`:
  - The folder is written to a temporary sibling and renamed into place, so a failed export never
    leaves half a model folder.
  - A new or empty folder is fine. An earlier export of ours is replaced, but only when it holds
    nothing except the files an export writes (a `.git` or a file someone added is never deleted);
    anything else is refused with one line.
  - Tokenizer padding is on the left, because batched generation (the main use of a TinyStories
    model) needs it; `padding_side="right"` when loading changes it.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from pathlib import Path

from tinystories import __version__
from tinystories.errors import UserError
from tinystories.outputs import check_output_dir, writing
from tinystories.tokenizer import BPE_FILE, EOT, GPT2_FILES

EXPORT_FORMAT = "tinystories-hf-export"
EXPORT_FORMAT_VERSION = 1
# Everything an export may contain; an existing --out holding anything else is not ours to replace.
EXPORT_FILES = {
    "config.json", "model.safetensors", "generation_config.json", "README.md",
    "tokenizer_config.json", "tokenizer.json", "vocab.json", "merges.txt",
}
# Our nn.Linear weights inside each block; HF GPT-2 has Conv1D there, which stores the transpose.
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# The defaults of `tinystories generate` (cli.py); keep them in step.
GENERATION_DEFAULTS = dict(do_sample=True, temperature=0.8, top_p=0.95, top_k=0, max_new_tokens=200)


def run(args) -> int:
    if args.format == "gguf":
        from tinystories.gguf_export import DEFAULT_OUTTYPE, export_gguf

        out = export_gguf(args.checkpoint, args.out, args.outtype or DEFAULT_OUTTYPE)
        print(f"exported {args.checkpoint} to {out} ({out.stat().st_size:,} bytes, {args.outtype or DEFAULT_OUTTYPE})")
        return 0
    if args.outtype is not None:
        raise UserError("--outtype is for --format gguf; the Hugging Face export is always float32")
    out = export_hf(args.checkpoint, args.out)
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    print(f"exported {args.checkpoint} to {out} ({files})")
    return 0


def export_hf(checkpoint_path, out_dir) -> Path:
    """Write the Hugging Face folder for a checkpoint (or run folder); return the folder's path."""
    from safetensors.torch import save as safetensors_bytes

    from tinystories.checkpoint import load_checkpoint

    out = Path(os.path.abspath(out_dir))  # "." has no name to put a temporary sibling beside
    _check_out(out)  # before loading, so a mistyped --out fails fast
    ckpt = load_checkpoint(checkpoint_path, device="cpu")
    model, tokenizer = ckpt.model, ckpt.tokenizer
    family = hf_family(model.config)  # refuses a layout no class holds, before anything is written

    kept = "the earlier export there is unchanged" if out.exists() else "nothing was written"
    with writing(out, note=kept):
        out.parent.mkdir(parents=True, exist_ok=True)
        for stale in out.parent.glob(f".{glob.escape(out.name)}.tmp-*"):  # left by an export that was killed
            shutil.rmtree(stale)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        tmp.mkdir()
    try:
        with writing(out, note=kept):  # a full disk: one line, the tmp folder removed below
            # bytes, then write: safetensors' save_file makes the file private (0600); an export is for sharing
            state_dict, config = WRITERS[family]
            state = state_dict(model)
            weights = safetensors_bytes(state, metadata={"format": "pt"})  # "pt": transformers checks it
            (tmp / "model.safetensors").write_bytes(weights)
            del weights, state
            config = config(model.config, tokenizer.eot_id, ckpt.config)
            _write_json(tmp / "config.json", config)
            _write_json(tmp / "generation_config.json", generation_config(tokenizer.eot_id, model.config.block_size))
            for name, data in tokenizer_files(tokenizer, model.config.block_size).items():
                (tmp / name).write_bytes(data)
            (tmp / "README.md").write_text(model_card(model, tokenizer, ckpt.config), encoding="utf-8")
            for p in tmp.iterdir():  # contents on disk before the rename makes them visible
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
            _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder to write the Hugging Face model to")
    check_output_dir(out, "--out", sibling=True)  # built beside it and renamed into place
    if out.is_dir() and any(out.iterdir()) and not is_our_export(out):
        raise UserError(
            f"--out {out} already holds files that are not a tinystories export; "
            "choose a new or empty folder"
        )


def is_our_export(folder: Path) -> bool:
    """True for a folder an earlier export wrote and nobody added to (so replacing it loses nothing)."""
    names = {p.name for p in Path(folder).iterdir()}
    if not names <= EXPORT_FILES or "config.json" not in names:
        return False
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and isinstance(config.get("tinystories"), dict) \
        and config["tinystories"].get("format") == EXPORT_FORMAT


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`; an existing `out` (empty, or our earlier export) is moved aside first."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)  # put the earlier export back
        raise
    shutil.rmtree(old)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


# -----------------------------------------------------------------------------
# Which Hugging Face class holds the model


# Each family's layout: the ModelConfig values its HF class computes (anything else it cannot hold).
# Bias is absent from GPT-2's: a model without biases exports zero biases, which change nothing.
GPT2_LAYOUT = {"pos_embedding": "learned", "norm": "layernorm", "mlp": "gelu", "qk_norm": False}
LLAMA_LAYOUT = {"pos_embedding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False}
# What each family needs, for the refusals (here and in gguf_export.py)
GPT2_NEEDS = "pos_embedding=learned, norm=layernorm, mlp=gelu, qk_norm=false"
LLAMA_NEEDS = (", ".join(f"{k}={str(v).lower()}" for k, v in LLAMA_LAYOUT.items())
               + ", qkv_bias=false, scale_attention=true, no local layers (Qwen3: the same with qk_norm=true)")
LAYOUT_NEEDS = f"GPT-2/GPT-Neo need {GPT2_NEEDS}; Llama needs {LLAMA_NEEDS}"


def hf_family(cfg) -> str:
    """The HF model_type that computes exactly what model `cfg` does: gpt2, gpt_neo, llama or qwen3.

    Anything else is refused with one line naming the options in the way (compared with the nearer
    of the two families, so the list is short).
    """
    gpt2, llama = layout_differences(cfg)
    if not gpt2:
        if is_neo(cfg) and (cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias):
            raise UserError("GPT-Neo has no q/k/v biases, and this model has them: it cannot be exported as "
                            "GPT-Neo (train with --qkv-bias false)")
        return "gpt_neo" if is_neo(cfg) else "gpt2"
    if not llama:
        return "qwen3" if cfg.qk_norm else "llama"
    nearer = gpt2 if len(gpt2) < len(llama) else llama
    raise UserError(f"export: no Hugging Face class tinystories writes holds this layout ({', '.join(nearer)}); "
                    f"{LAYOUT_NEEDS}")


def layout_differences(cfg) -> tuple[list[str], list[str]]:
    """The options of `cfg` in the way of the GPT-2 layout and of the Llama layout ("name=value" each).

    An empty list names the family that holds the model (GPT-2's includes GPT-Neo: see is_neo); the
    two are never both empty (GPT-2 needs learned positions, Llama RoPE). The GGUF export
    (gguf_export.py) decides with the same lists.
    """
    gpt2 = _differences(cfg, GPT2_LAYOUT)
    llama = _differences(cfg, LLAMA_LAYOUT)
    if cfg.qkv_bias:  # Llama's attention_bias would also give o_proj a bias; ours has none when bias=false
        llama.append("qkv_bias=true")
    if any(cfg.is_local(i) for i in range(cfg.n_layer)):  # Llama/Qwen3 attend globally everywhere
        llama.append("local attention layers")
    if not cfg.scale_attention:  # Llama always scales by 1/sqrt(head_dim) (folding it into q is not done here)
        llama.append("scale_attention=false")
    return gpt2, llama


def _differences(cfg, layout: dict) -> list[str]:
    """Each option of `cfg` that is not what `layout` needs, as "name=value"."""
    return [f"{name}={str(getattr(cfg, name)).lower()}" for name, wanted in layout.items()
            if getattr(cfg, name) != wanted]


# -----------------------------------------------------------------------------
# Weights and config (GPT-2)


def hf_state_dict(model) -> dict:
    """Our GPT's weights under GPT2LMHeadModel's key names, Conv1D orientation, CPU, contiguous."""
    import torch

    cfg = model.config
    ours = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        ours.pop("lm_head.weight")  # tied to transformer.wte.weight; transformers re-ties it on load
    names = ["transformer.wte.weight", "transformer.wpe.weight"]
    for i in range(cfg.n_layer):
        for module in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            names += [f"transformer.h.{i}.{module}.weight", f"transformer.h.{i}.{module}.bias"]
    names += ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    if not cfg.tie_embeddings:
        names.append("lm_head.weight")  # a matrix of its own (tie_word_embeddings false)

    hf = {}
    for name in names:
        if name in ours:
            tensor = ours.pop(name)
        else:  # bias=False model: GPT-2 always has biases, and a zero bias changes nothing
            weight = hf[name.removesuffix(".bias") + ".weight"]
            # Conv1D weight is (in, out) after the transpose below; LayerNorm's is (C,)
            tensor = torch.zeros(weight.shape[-1], dtype=weight.dtype)
        if name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()  # nn.Linear (out, in) -> Conv1D (in, out)
        hf[name] = tensor.contiguous()
    if ours:  # a parameter the map does not know would be silently lost
        raise RuntimeError(f"export does not know where to put {sorted(ours)}")
    return hf


def hf_config(cfg, eot_id: int, checkpoint_config: dict) -> dict:
    """config.json of a GPT2LMHeadModel equal to our model `cfg` (a ModelConfig)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": _inner(cfg),
        "activation_function": "gelu_new",  # tanh-approximated GELU
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": cfg.norm_eps,
        "initializer_range": 0.02,
        "scale_attn_weights": True,  # 1/sqrt(head_dim), as SDPA
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "use_cache": True,
        "dtype": "float32",
        "tinystories": _provenance(checkpoint_config),
    }


def _inner(cfg) -> int | None:
    """GPT-2's n_inner / GPT-Neo's intermediate_size: None (= 4 x width, written so for the usual MLP)."""
    return None if cfg.hidden_size == 4 * cfg.n_embd else cfg.hidden_size


def _provenance(checkpoint_config: dict) -> dict:
    """config.json's `tinystories` entry: where the export came from (and how we recognise our own)."""
    return {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "tinystories_version": __version__,
        "step": checkpoint_config.get("step"),
        "val_loss": checkpoint_config.get("val_loss"),
        "tokenizer": checkpoint_config["tokenizer"].get("name"),
    }


# -----------------------------------------------------------------------------
# GPT-Neo (see the module docstring)


def is_neo(cfg) -> bool:
    """Whether a model needs GPT-Neo's format: GPT-2 has neither local attention nor unscaled scores."""
    return any(cfg.is_local(i) for i in range(cfg.n_layer)) or not cfg.scale_attention


def neo_state_dict(model) -> dict:
    """Our GPT's weights under GPTNeoForCausalLM's key names (all nn.Linear: no transposes)."""
    import math

    import torch

    cfg = model.config  # hf_family refused q/k/v biases: GPT-Neo has none
    ours = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    lm_head = ours.pop("lm_head.weight")  # tied, as in GPT-2's export, or a matrix of its own
    hf = {}
    for name in ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"]:
        hf[name] = ours.pop(name, None)
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}"
        q, k, v = ours.pop(f"{p}.attn.c_attn.weight").split(cfg.n_embd, dim=0)  # (3C, C) -> 3 x (C, C)
        if cfg.scale_attention:
            q = q / math.sqrt(cfg.head_dim)  # (q / sqrt(d)) . k = (q . k) / sqrt(d)
        hf.update({f"{p}.attn.attention.q_proj.weight": q, f"{p}.attn.attention.k_proj.weight": k,
                   f"{p}.attn.attention.v_proj.weight": v})
        for ours_name, hf_name in (("attn.c_proj", "attn.attention.out_proj"), ("ln_1", "ln_1"), ("ln_2", "ln_2"),
                                   ("mlp.c_fc", "mlp.c_fc"), ("mlp.c_proj", "mlp.c_proj")):
            hf[f"{p}.{hf_name}.weight"] = ours.pop(f"{p}.{ours_name}.weight")
            hf[f"{p}.{hf_name}.bias"] = ours.pop(f"{p}.{ours_name}.bias", None)
    if not cfg.tie_embeddings:
        hf["lm_head.weight"] = lm_head
    for name, tensor in hf.items():
        if tensor is None:  # bias=False model: GPT-Neo always has these biases, and zero changes nothing
            tensor = torch.zeros(hf[name.removesuffix(".bias") + ".weight"].shape[0])
        hf[name] = tensor.contiguous()
    if ours:  # a parameter the map does not know would be silently lost
        raise RuntimeError(f"export does not know where to put {sorted(ours)}")
    return hf


def attention_types(layers: list[str]) -> list:
    """GPT-Neo's run-length form of per-layer attention: the shortest repeating pattern and its count.

    ["global", "local"] * 4 -> [[["global", "local"], 4]], as in the released TinyStories configs.
    """
    n = len(layers)
    period = next(p for p in range(1, n + 1) if n % p == 0 and layers == layers[:p] * (n // p))
    return [[layers[:period], n // period]]


def neo_config(cfg, eot_id: int, checkpoint_config: dict) -> dict:
    """config.json of a GPTNeoForCausalLM equal to our model `cfg` (a ModelConfig)."""
    layers = [("local" if cfg.is_local(i) else "global") for i in range(cfg.n_layer)]
    return {
        "architectures": ["GPTNeoForCausalLM"],
        "model_type": "gpt_neo",
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.block_size,
        "hidden_size": cfg.n_embd,
        "num_layers": cfg.n_layer,
        "num_heads": cfg.n_head,
        "attention_types": attention_types(layers),
        "window_size": cfg.window_size,
        "intermediate_size": _inner(cfg),
        "activation_function": "gelu_new",  # tanh-approximated GELU
        "resid_dropout": cfg.dropout,
        "embed_dropout": cfg.dropout,
        "attention_dropout": cfg.dropout,
        "layer_norm_epsilon": cfg.norm_eps,
        "initializer_range": 0.02,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "use_cache": True,
        "dtype": "float32",
        "tinystories": _provenance(checkpoint_config),
    }


# -----------------------------------------------------------------------------
# Llama and Qwen3 (see the module docstring)


def llama_key_map(cfg) -> list[tuple[str, list[str]]]:
    """(our parameter name, its LlamaForCausalLM / Qwen3ForCausalLM names) for model `cfg`.

    One of ours with several HF names is those tensors stacked along dim 0 (nn.Linear rows):
    c_attn is q, k, v (our attention splits it in that order) and c_fc is gate, up (our SwiGLU
    chunks it so). Both directions use this map: export splits, import (hf_import.py) stacks.
    """
    keys = [("transformer.wte.weight", ["model.embed_tokens.weight"])]
    for i in range(cfg.n_layer):
        ours, hf = f"transformer.h.{i}.", f"model.layers.{i}."
        keys += [
            (ours + "ln_1.weight", [hf + "input_layernorm.weight"]),
            (ours + "attn.c_attn.weight", [hf + f"self_attn.{x}_proj.weight" for x in "qkv"]),
            (ours + "attn.c_proj.weight", [hf + "self_attn.o_proj.weight"]),
            (ours + "ln_2.weight", [hf + "post_attention_layernorm.weight"]),
            (ours + "mlp.c_fc.weight", [hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"]),
            (ours + "mlp.c_proj.weight", [hf + "mlp.down_proj.weight"]),
        ]
        if cfg.qk_norm:  # Qwen3: per-head RMSNorm of q and k before the rotation, as ours
            keys += [(ours + "attn.q_norm.weight", [hf + "self_attn.q_norm.weight"]),
                     (ours + "attn.k_norm.weight", [hf + "self_attn.k_norm.weight"])]
    keys.append(("transformer.ln_f.weight", ["model.norm.weight"]))
    if not cfg.tie_embeddings:  # tied: transformers re-ties lm_head to embed_tokens on load
        keys.append(("lm_head.weight", ["lm_head.weight"]))
    return keys


def llama_state_dict(model) -> dict:
    """Our GPT's weights under LlamaForCausalLM's (or Qwen3ForCausalLM's) names: no transposes."""
    ours = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        ours.pop("lm_head.weight")
    hf = {}
    for name, hf_names in llama_key_map(model.config):
        # equal parts: q, k, v are n_embd rows each, gate and up hidden_size rows each
        for hf_name, part in zip(hf_names, ours.pop(name).chunk(len(hf_names), dim=0)):
            hf[hf_name] = part.contiguous()
    if ours:  # a parameter the map does not know would be silently lost
        raise RuntimeError(f"export does not know where to put {sorted(ours)}")
    return hf


def llama_config(cfg, eot_id: int, checkpoint_config: dict) -> dict:
    """config.json of a LlamaForCausalLM equal to our model `cfg`, or Qwen3ForCausalLM with qk_norm."""
    qwen3 = cfg.qk_norm
    config = {
        "architectures": ["Qwen3ForCausalLM" if qwen3 else "LlamaForCausalLM"],
        "model_type": "qwen3" if qwen3 else "llama",
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.block_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.hidden_size,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_head,  # one k/v head per query head: no grouped-query attention
        "head_dim": cfg.head_dim,  # Qwen3's default is 128, not hidden_size / heads: always written
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        # plain RoPE, no scaling; transformers 5 reads rope_parameters, earlier versions rope_theta
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        # HF drops only attention weights; ours also drops on the residual branches (training only)
        "attention_dropout": cfg.dropout,
        "initializer_range": 0.02,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "use_cache": True,
        "dtype": "float32",
    }
    if qwen3:  # every layer full attention (Qwen3's sliding window is off unless use_sliding_window)
        config.update({"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.n_layer,
                       "layer_types": ["full_attention"] * cfg.n_layer})
    else:
        config.update({"mlp_bias": False, "pretraining_tp": 1})
    config["tinystories"] = _provenance(checkpoint_config)
    return config


# The state dict and config.json writers of each family (hf_family says which).
WRITERS = {
    "gpt2": (hf_state_dict, hf_config),
    "gpt_neo": (neo_state_dict, neo_config),
    "llama": (llama_state_dict, llama_config),
    "qwen3": (llama_state_dict, llama_config),
}


def generation_config(eot_id: int, block_size: int) -> dict:
    config = {"bos_token_id": eot_id, "eos_token_id": eot_id, "pad_token_id": eot_id, **GENERATION_DEFAULTS}
    config["max_new_tokens"] = min(config["max_new_tokens"], block_size // 2)  # see the module docstring
    return config


# -----------------------------------------------------------------------------
# Tokenizer files


def tokenizer_files(tokenizer, block_size: int) -> dict[str, bytes]:
    """The files that let `AutoTokenizer.from_pretrained` rebuild `tokenizer` exactly."""
    files = tokenizer.files()
    if BPE_FILE in files:  # our trained byte-level BPE: tokenizer.json already is HF's format
        out = {BPE_FILE: files[BPE_FILE]}
        tokenizer_class = "PreTrainedTokenizerFast"
    elif set(GPT2_FILES) <= set(files):
        out = {"vocab.json": files["encoder.json"], "merges.txt": files["vocab.bpe"]}
        out[BPE_FILE] = _gpt2_tokenizer_json(out["vocab.json"], out["merges.txt"])
        tokenizer_class = "GPT2Tokenizer"
    else:
        raise UserError(f"cannot export tokenizer {tokenizer.name}: unknown tokenizer files {sorted(files)}")
    config = {
        "tokenizer_class": tokenizer_class,
        "bos_token": EOT,
        "eos_token": EOT,
        "unk_token": EOT,  # byte-level: nothing is ever unknown, but some tools want one
        "pad_token": EOT,  # GPT-2 has no pad token; padding is masked out anyway
        "add_bos_token": False,  # we train on stories joined by EOT, and prompts start bare
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,  # decode must give back the exact text
        "model_max_length": block_size,
        "padding_side": "left",
    }
    out["tokenizer_config.json"] = (json.dumps(config, indent=2) + "\n").encode("utf-8")
    return out


def _gpt2_tokenizer_json(vocab_json: bytes, merges_txt: bytes) -> bytes:
    """GPT-2's tokenizer in `tokenizers` format, for tools that read only tokenizer.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = json.loads(vocab_json)
    lines = merges_txt.decode("utf-8").splitlines()[1:]  # line 0 is "#version: 0.2"
    merges = [tuple(line.split(" ")) for line in lines if line]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False))
    # the same pre-tokenizer regex as tiktoken's r50k pattern, and no prefix space: ids match tiktoken
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(EOT, special=True)])
    return tok.to_str(pretty=False).encode("utf-8")


# -----------------------------------------------------------------------------
# Model card


def model_card(model, tokenizer, checkpoint_config: dict) -> str:
    """README.md: Hub metadata, what the model is, how well it did, how to load it."""
    cfg = model.config
    total, non_embedding = model.num_params(), model.num_params(non_embedding=True)
    step, val_loss = checkpoint_config.get("step"), checkpoint_config.get("val_loss")
    loss = f"{val_loss:.4f} nats per {tokenizer.name} token" if isinstance(val_loss, (int, float)) else "not recorded"
    # anything else the trainer recorded at the top level of the checkpoint's config.json
    skip = {"format", "format_version", "model", "tokenizer", "step", "val_loss"}
    extra = [f"| {k} | {v} |" for k, v in checkpoint_config.items()
             if k not in skip and isinstance(v, (int, float, str, bool))]
    tag = hf_family(cfg)
    mlp = "4x MLP" if cfg.hidden_size == 4 * cfg.n_embd else f"MLP {cfg.hidden_size} wide"
    if tag == "gpt_neo":
        kinds = sorted(set("local" if cfg.is_local(i) else "global" for i in range(cfg.n_layer)))
        family = "GPT-Neo"
        architecture = (f"GPT-Neo (`GPTNeoForCausalLM`): learned positions, pre-LayerNorm, {' and '.join(kinds)} "
                        f"attention (local window {cfg.window_size}), unscaled attention scores, tanh-GELU, {mlp}")
        how = ("a renaming of the checkpoint's weights plus a split of the fused q/k/v matrix into GPT-Neo's "
               "q_proj/k_proj/v_proj")
    elif tag == "gpt2":
        family = "GPT-2"
        architecture = f"GPT-2 (`GPT2LMHeadModel`): learned positions, pre-LayerNorm, tanh-GELU, {mlp}"
        how = ("a renaming of the checkpoint's weights plus a transpose of the attention and MLP matrices "
               "(GPT-2's Conv1D layout)")
    else:
        family = "Qwen3" if tag == "qwen3" else "Llama"
        architecture = (f"{family} (`{family}ForCausalLM`): RoPE (theta {cfg.rope_theta:g}), pre-RMSNorm, "
                        + ("RMSNorm on each head's queries and keys, " if tag == "qwen3" else "")
                        + f"SwiGLU MLP {cfg.hidden_size} wide, no biases")
        how = ("a renaming of the checkpoint's weights plus a split of the fused q/k/v matrix into q_proj/k_proj/"
               "v_proj and of the fused SwiGLU input matrix into gate_proj/up_proj")
    output = "token embedding tied to the output layer, counted once" if cfg.tie_embeddings else \
        "separate output layer"
    imported = checkpoint_config.get("imported_from")
    origin = (f"Imported from `{imported.get('source')}` with `tinystories import`, then trained and exported with "
              f"tinystories {__version__}" if isinstance(imported, dict) else
              f"Trained and exported with tinystories {__version__}")
    tok_text = (
        "GPT-2's byte-level BPE (50,257 tokens, OpenAI's `vocab.json`/`merges.txt`)"
        if tokenizer.name == "gpt2"
        else f"a byte-level BPE of {tokenizer.vocab_size:,} tokens trained on TinyStories with Hugging Face `tokenizers`"
    )
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "license: mit",
        "language:",
        "- en",
        "tags:",
        f"- {tag}",
        "- tinystories",
        "- text-generation",
        "datasets:",
        "- roneneldan/TinyStories",
        "---",
        "",
        f"# TinyStories {family} ({_millions(total)} parameters)",
        "",
        f"A small {family}-style language model trained {'' if imported else 'from scratch '}on TinyStories "
        "(Eldan & Li 2023, "
        "[arXiv:2305.07759](https://arxiv.org/abs/2305.07759)), short stories in the vocabulary of a "
        "3-to-4-year-old. It writes simple English stories; it knows little else.",
        "",
        "## Model",
        "",
        "| | |",
        "| --- | --- |",
        f"| architecture | {architecture} |",
        f"| layers x heads x width | {cfg.n_layer} x {cfg.n_head} x {cfg.n_embd} |",
        f"| context | {cfg.block_size} tokens |",
        f"| vocabulary | {cfg.vocab_size:,} tokens |",
        f"| parameters | {total:,} ({output}) |",
        f"| non-embedding parameters | {non_embedding:,} |",
        f"| dropout | {cfg.dropout} |",
        "",
        f"Tokenizer: {tok_text}. `<|endoftext|>` (id {tokenizer.eot_id}) ends each story and serves as "
        "bos, eos and pad token.",
        "",
        "## Training",
        "",
        "| | |",
        "| --- | --- |",
        f"| optimizer steps | {step if step is not None else 'not recorded'} |",
        f"| validation loss | {loss} |",
        *extra,
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")',
        'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO")',
        'ids = tokenizer("Once upon a time", return_tensors="pt").input_ids',
        f"out = model.generate(ids)  # generation_config.json: sampling, temperature 0.8, top-p 0.95, "
        f"{min(GENERATION_DEFAULTS['max_new_tokens'], cfg.block_size // 2)} new tokens at most",
        "print(tokenizer.decode(out[0], skip_special_tokens=True))",
        "```",
        "",
        "## How it was made",
        "",
        f"{origin} "
        f"(`tinystories train`, then `tinystories export --checkpoint RUN --out DIR`). The export is {how}; "
        "logits match the original model to within 1e-5 in fp32.",
        "",
        "The TinyStories data is licensed CDLA-Sharing-1.0.",
        "",
    ]
    return "\n".join(lines)


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M"
