"""`tinystories import`: a Hugging Face GPT-Neo, GPT-2, Llama or Qwen3 model becomes a tinystories checkpoint.

    tinystories import --from roneneldan/TinyStories-33M --out ckpt/ts-33m   # from the Hub
    tinystories import --from ~/models/TinyStories-33M --out ckpt/ts-33m     # a downloaded folder
    tinystories evaluate --checkpoint ckpt/ts-33m --data data/ts             # then anything a checkpoint does
    tinystories train --data data/ts --init-from ckpt/ts-33m --out runs/ft   # fine-tune it
    import_hf("~/models/TinyStories-33M", "ckpt/ts-33m")                     # the same, from Python

The paper's released models (roneneldan/TinyStories-1M ... -33M, -1Layer-21M, -2Layers-33M and
the Instruct variants) are GPT-Neo; GPT-2 folders (GPT2LMHeadModel, e.g. our own exports) import
too, and so do Llama (LlamaForCausalLM: our Llama exports; the llama2.c TinyStories models in HF
format have a config and weights we read, but a SentencePiece tokenizer we do not) and Qwen3
(Qwen3ForCausalLM) folders with one k/v head per query head. A repo id is fetched with
`huggingface_hub.snapshot_download` (an optional dependency; `HF_ENDPOINT` and `HF_HUB_OFFLINE`
apply); without the Hub, download the folder elsewhere and pass its path.

What is read, and how:
  config.json         GPTNeoConfig / GPT2Config / LlamaConfig / Qwen3Config fields -> ModelConfig.
                      GPT-Neo: `attention_types` ([[["global", "local"], 4]]) expands to one entry
                      per layer, window_size, max_position_embeddings -> block_size (2,048 for the
                      released models), no attention scaling, no q/k/v bias. Llama / Qwen3: RoPE
                      (rope_theta), RMSNorm (rms_norm_eps), SwiGLU (intermediate_size), no biases,
                      Qwen3 with qk_norm. LayerNorm eps, MLP width and untied output layers carry
                      over. Anything our model cannot compute exactly (another activation,
                      grouped-query attention, RoPE scaling, a head_dim other than hidden/heads,
                      biases in Llama/Qwen3, Qwen3's sliding window, ...) is refused with one line
                      rather than imported approximately.
  weights             model.safetensors (or shards listed in model.safetensors.index.json), else
                      pytorch_model.bin (or its shards) read with torch.load(weights_only=True):
                      tensors only, never unpickled code. Stored as fp32.
  tokenizer           GPT-2's vocabulary (what GPT-Neo and the TinyStories models use), given as
                      vocab.json + merges.txt or tokenizer.json, becomes our `gpt2` tokenizer: the
                      vocabulary and merges are rewritten in OpenAI's file format and must hash to
                      OpenAI's encoder.json / vocab.bpe (tokenizer.GPT2_FILES), so prepared gpt2
                      data and imported models share one fingerprint, and no download is needed.
                      Any other tokenizer.json that holds <|endoftext|> (e.g. our own bpe-N
                      exports) is kept as a `tokenizers` BPE. Anything else is refused.

Key map. GPT-Neo's separate q_proj / k_proj / v_proj (nn.Linear, (out, in)) are stacked into our
fused c_attn (q, k, v in that order, as our attention splits it); out_proj is c_proj; ln_1, ln_2,
mlp.c_fc, mlp.c_proj, wte, wpe, ln_f keep their names. GPT-2's Conv1D weights are transposed to
nn.Linear. Llama / Qwen3 use export.llama_key_map backwards: q/k/v_proj stacked into c_attn,
gate/up_proj into c_fc. Buffers of old transformers versions (attention masks, RoPE frequencies)
are skipped; a tied lm_head must equal the token embedding, an untied one must be there.

A folder may come from anyone, so nothing in it is trusted: hf_folder.py reads it (every file it
names inside it, every config.json value of the type it must have, every tensor floating point and
finite), and here the layer count, width and vocabulary size must match the tensors before any
model is built. Each refusal is one line naming what is wrong.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from tinystories.config import ModelConfig
from tinystories.errors import UserError
from tinystories.hf_folder import BUFFERS, config_value, is_int, read_config, read_hf_weights, short, tokenizer_from_hf
from tinystories.outputs import check_output_dir

# What a model folder may hold that we read; a Hub download fetches only these.
HUB_PATTERNS = [
    "config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors",
    "pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin",
    "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
]
# HF GPT-2's Conv1D layers store (in, out); ours are nn.Linear (out, in).
GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")  # both are 0.5x(1 + tanh(...)), = F.gelu(approximate="tanh")
# attention_types is expanded before the weights are read (which then must agree with it layer for
# layer), so a repeat count of 10**18 in config.json would fill the memory first. No model has come
# near this many layers; the bound only keeps the list from being absurd.
MAX_LAYERS = 2**20


def run(args) -> int:
    out = import_hf(args.source, args.out, tokenizer=args.tokenizer, revision=args.revision)
    from tinystories.checkpoint import load_checkpoint

    ckpt = load_checkpoint(out)  # proves the checkpoint loads with nothing but its path
    cfg, info = ckpt.model_config, ckpt.config["imported_from"]
    kinds = "/".join(sorted(set(cfg.attention_layers or ["global"])))
    print(f"imported {args.source} ({info['architecture']}: {cfg.n_layer} layers ({kinds} attention), "
          f"{cfg.n_head} heads, {cfg.n_embd} wide, {cfg.block_size} positions, "
          f"{ckpt.model.num_params():,} parameters; tokenizer {ckpt.tokenizer.name}) to {out}")
    return 0


def import_hf(source, out, *, tokenizer: str = "auto", revision: str | None = None) -> Path:
    """Write our checkpoint folder `out` for a transformers model folder or Hub repo; return `out`."""
    from tinystories.checkpoint import save_checkpoint
    from tinystories.model import GPT

    out = check_output_dir(out, "--out")  # before a download or any reading
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not empty; choose a new folder for the checkpoint")
    folder = locate(source, revision)
    hf = read_config(folder)
    architecture, model_cfg = model_config_from_hf(hf, where=folder / "config.json")
    version = config_value(hf, "transformers_version", None, "str", folder / "config.json", optional=True)
    tok = tokenizer_from_hf(folder, use_gpt2=tokenizer == "gpt2")
    if tok.vocab_size > model_cfg.vocab_size:
        raise UserError(f"{folder}: the tokenizer has {tok.vocab_size} tokens but the model only {model_cfg.vocab_size}")

    hf_weights, files = read_hf_weights(folder)
    ours = state_dict_from_hf(hf_weights, model_cfg, architecture, where=folder)
    model = GPT(model_cfg)
    model.load_state_dict(ours, strict=False)  # strict=False: a tied lm_head is wte, not in `ours`
    provenance = {
        "source": str(source), "revision": revision, "architecture": architecture,
        "transformers_version": version, "files": files,
    }
    return save_checkpoint(out, model, tok, step=0, val_loss=None, extra={"imported_from": provenance})


# -----------------------------------------------------------------------------
# Where the files are


def locate(source, revision: str | None = None) -> Path:
    """A local model folder as is; a Hub repo id ("owner/name") downloaded into the Hub cache."""
    path = Path(os.path.expanduser(str(source)))
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"--from {source} is a file; give the model's folder (with config.json)")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)) or str(source).startswith((".", "/")):
        raise UserError(f"--from {source} does not exist (give a model folder, or a Hub repo id such as "
                        "roneneldan/TinyStories-33M)")
    offline_help = ("download the folder on a machine that can reach the Hub (e.g. `hf download "
                    f"{source} --local-dir DIR`) and pass --from DIR")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(f"{source} looks like a Hub repo id, but huggingface_hub is not installed "
                        f"(pip install huggingface_hub); or {offline_help}") from None
    try:
        return Path(snapshot_download(str(source), revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated, HTTP errors: all one line for the user
        raise UserError(f"could not download {source} from the Hugging Face Hub ({type(e).__name__}); "
                        f"{offline_help}") from None


# -----------------------------------------------------------------------------
# config.json -> ModelConfig
#
# Every value is read through hf_folder.config_value (the type it must have, or one line), and the
# shapes it describes are compared with the weights before anything is built (state_dict_from_hf).


def expand_attention_types(attention_types) -> list[str]:
    """GPT-Neo's run-length form, [[["global", "local"], 2]], as one entry per layer."""
    form = f"attention_types {short(attention_types)} is not GPT-Neo's [[[kinds...], repeat], ...] form"
    pairs = attention_types if isinstance(attention_types, (list, tuple)) else [None]
    if not all(isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], (list, tuple))
               and all(isinstance(k, str) for k in p[0]) and is_int(p[1]) and p[1] >= 0 for p in pairs):
        raise UserError(form)
    n_layer = sum(len(kinds) * repeat for kinds, repeat in pairs)
    if n_layer > MAX_LAYERS:
        raise UserError(f"attention_types {short(attention_types)} makes {n_layer} layers; "
                        f"tinystories imports at most {MAX_LAYERS:,}")
    return [kind for kinds, repeat in pairs for _ in range(repeat) for kind in kinds]


def model_config_from_hf(hf: dict, where="config.json") -> tuple[str, ModelConfig]:
    """("GPT-Neo", "GPT-2", "Llama" or "Qwen3", our config) for a transformers config dict; refuse
    what we cannot compute."""
    model_type = config_value(hf, "model_type", None, "str", where, optional=True)
    if model_type == "gpt_neo":
        return "GPT-Neo", _neo_config(hf, where)
    if model_type == "gpt2":
        return "GPT-2", _gpt2_config(hf, where)
    if model_type in LLAMA_DEFAULTS:
        return ("Qwen3" if model_type == "qwen3" else "Llama"), _llama_config(hf, model_type, where)
    raise UserError(f"{where}: model_type {model_type!r} is not supported; tinystories imports gpt_neo "
                    "(the TinyStories models), gpt2, llama and qwen3")


def _require(where, checks: dict) -> None:
    """checks: {description of what we need: whether the config has it}."""
    failed = [what for what, ok in checks.items() if not ok]
    if failed:
        raise UserError(f"{where}: cannot import exactly: needs {'; '.join(failed)}")


def _neo_config(hf: dict, where) -> ModelConfig:
    # Missing keys take GPTNeoConfig's defaults, as transformers would.
    width = config_value(hf, "hidden_size", 2048, "count", where)
    n_layer = config_value(hf, "num_layers" if "num_layers" in hf else "num_hidden_layers", 24, "count", where)
    heads = config_value(hf, "num_heads" if "num_heads" in hf else "num_attention_heads", 16, "count", where)
    attention_types = config_value(hf, "attention_types", None, "list", where, optional=True)
    layers = expand_attention_types([[["global", "local"], 12]] if attention_types is None else attention_types)
    activation = config_value(hf, "activation_function", "gelu_new", "str", where)
    _require(where, {
        "activation_function gelu_new": activation in TANH_GELU,
        f"one attention type per layer ({n_layer})": len(layers) == n_layer,
        "attention_layers equal to attention_types expanded": hf.get("attention_layers", layers) == layers,
    })
    return ModelConfig(
        n_layer=n_layer, n_head=heads, n_embd=width,
        block_size=config_value(hf, "max_position_embeddings", 2048, "count", where),
        vocab_size=config_value(hf, "vocab_size", 50257, "count", where),
        dropout=float(config_value(hf, "resid_dropout", 0.0, "dropout", where)), bias=True, attention_layers=layers,
        window_size=config_value(hf, "window_size", 256, "count", where), scale_attention=False, qkv_bias=False,
        norm_eps=config_value(hf, "layer_norm_epsilon", 1e-5, "positive", where),
        mlp_hidden=_mlp_hidden(config_value(hf, "intermediate_size", None, "count", where, optional=True), width),
        tie_embeddings=config_value(hf, "tie_word_embeddings", True, "bool", where),
    )


def _gpt2_config(hf: dict, where) -> ModelConfig:
    width = config_value(hf, "n_embd", 768, "count", where)
    _require(where, {
        "activation_function gelu_new": config_value(hf, "activation_function", "gelu_new", "str", where) in TANH_GELU,
        "scale_attn_weights true": config_value(hf, "scale_attn_weights", True, "bool", where) is True,
        "scale_attn_by_inverse_layer_idx false":
            config_value(hf, "scale_attn_by_inverse_layer_idx", False, "bool", where) is False,
    })
    return ModelConfig(
        n_layer=config_value(hf, "n_layer", 12, "count", where), n_head=config_value(hf, "n_head", 12, "count", where),
        n_embd=width, block_size=config_value(hf, "n_positions", 1024, "count", where),
        vocab_size=config_value(hf, "vocab_size", 50257, "count", where),
        dropout=float(config_value(hf, "resid_pdrop", 0.1, "dropout", where)), bias=True,
        norm_eps=config_value(hf, "layer_norm_epsilon", 1e-5, "positive", where),
        mlp_hidden=_mlp_hidden(config_value(hf, "n_inner", None, "count", where, optional=True), width),
        tie_embeddings=config_value(hf, "tie_word_embeddings", True, "bool", where),
    )


def _mlp_hidden(inner, width: int) -> int | None:
    """Our mlp_hidden for GPT-2's n_inner / GPT-Neo's intermediate_size: None is the usual 4 x width."""
    return None if inner in (None, 4 * width) else inner


# Defaults of transformers' LlamaConfig and Qwen3Config, for keys a config.json leaves out.
LLAMA_DEFAULTS = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, head_dim=None, max_position_embeddings=2048,
                  rms_norm_eps=1e-6, tie_word_embeddings=False),
    "qwen3": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, head_dim=128, max_position_embeddings=32768,
                  rms_norm_eps=1e-6, tie_word_embeddings=False),
}


def _llama_config(hf: dict, model_type: str, where) -> ModelConfig:
    """Llama / Qwen3 -> RoPE, RMSNorm, SwiGLU, no biases (Qwen3 adds qk_norm); exact or refused.

    The llama2.c TinyStories models (karpathy/llama2.c export.py --hf) write LlamaConfig with
    num_key_value_heads, rms_norm_eps 1e-5, tie_word_embeddings and max_position_embeddings set,
    and the rest at their defaults (rope_theta 10000, no rope_scaling, pretraining_tp 1, which only
    splits the same matmuls).
    """
    defaults = LLAMA_DEFAULTS[model_type]

    def get(key, kind, optional=False):
        return config_value(hf, key, defaults[key], kind, where, optional=optional)

    width, heads = get("hidden_size", "count"), get("num_attention_heads", "count")
    kv_heads = get("num_key_value_heads", "count", optional=True)
    kv_heads = heads if kv_heads is None else kv_heads
    head_dim = get("head_dim", "count", optional=True)
    if head_dim is None:  # LlamaConfig: hidden_size / num_attention_heads
        head_dim = width // heads
    # transformers 5 keeps RoPE settings in rope_parameters, earlier versions in rope_theta + rope_scaling
    ropes = {key: config_value(hf, key, None, "object", where, optional=True)
             for key in ("rope_parameters", "rope_scaling")}
    plain_rope = all(set(r) <= {"rope_type", "type", "rope_theta"}
                     and r.get("rope_type", r.get("type", "default")) == "default" for r in ropes.values() if r)
    # Every RoPE base config.json gives is checked, and they must agree: which one a transformers
    # version reads differs, so importing one of two would be a guess.
    thetas = {f"{key}.rope_theta": config_value(r, "rope_theta", None, "positive", f"{where}: {key}")
              for key, r in ropes.items() if r and "rope_theta" in r}
    if "rope_theta" in hf:
        thetas["rope_theta"] = config_value(hf, "rope_theta", None, "positive", where)
    if len(set(thetas.values())) > 1:
        raise UserError(f"{where}: the RoPE bases disagree ({', '.join(f'{k} {v}' for k, v in thetas.items())})")
    theta = next(iter(thetas.values()), 10000.0)
    checks = {
        "hidden_act silu": config_value(hf, "hidden_act", "silu", "str", where) == "silu",
        f"num_key_value_heads equal to num_attention_heads ({heads}; grouped-query attention is not supported)":
            kv_heads == heads,
        f"head_dim equal to hidden_size / num_attention_heads ({width} / {heads})": head_dim * heads == width,
        "plain RoPE (rope_type default, no rope_scaling or partial_rotary_factor)":
            plain_rope
            and config_value(hf, "partial_rotary_factor", None, "positive", where, optional=True) in (None, 1.0),
        "attention_bias false": config_value(hf, "attention_bias", False, "bool", where) is False,
    }
    if model_type == "llama":
        checks["mlp_bias false"] = config_value(hf, "mlp_bias", False, "bool", where) is False
    else:  # Qwen3's sliding window is off unless use_sliding_window (then its upper layers use it)
        checks["use_sliding_window false"] = config_value(hf, "use_sliding_window", False, "bool", where) is False
        layer_types = config_value(hf, "layer_types", None, "list", where, optional=True) or []
        checks["every layer full_attention"] = all(t == "full_attention" for t in layer_types)
    _require(where, checks)
    cfg = ModelConfig(
        n_layer=get("num_hidden_layers", "count"), n_head=heads, n_embd=width,
        block_size=get("max_position_embeddings", "count"), vocab_size=get("vocab_size", "count"),
        dropout=float(config_value(hf, "attention_dropout", 0.0, "dropout", where, optional=True) or 0.0), bias=False,
        pos_embedding="rope", rope_theta=float(theta), norm="rmsnorm", norm_eps=get("rms_norm_eps", "positive"),
        mlp="swiglu", mlp_hidden=get("intermediate_size", "count"), qk_norm=model_type == "qwen3",
        tie_embeddings=get("tie_word_embeddings", "bool"),
    )
    if cfg.mlp_hidden == dataclasses.replace(cfg, mlp_hidden=None).hidden_size:
        cfg.mlp_hidden = None  # our default width for this n_embd: export and import give the same config
    return cfg


# -----------------------------------------------------------------------------
# Weights


def state_dict_from_hf(hf_weights: dict, cfg: ModelConfig, architecture: str, where) -> dict:
    """Our parameter names and layout (fp32, contiguous; lm_head only when untied) for HF's tensors."""
    import torch

    from tinystories.model import GPT

    hf = {k: v for k, v in hf_weights.items() if not k.endswith(BUFFERS)}
    _check_config_against_weights(hf, cfg, architecture, where)
    if architecture in ("Llama", "Qwen3"):
        ours = _from_llama(hf, cfg, where)
    else:
        ours = _from_gpt(hf, cfg, architecture, where)
    if cfg.tie_embeddings:  # transformers ties lm_head to the embedding; a file that says otherwise is suspect
        lm_head = ours.pop("lm_head.weight", None)
        wte = ours.get("transformer.wte.weight")
        if lm_head is not None and wte is not None and not torch.equal(lm_head, wte):
            raise UserError(f"{where}: lm_head.weight differs from the token embedding, but config.json says "
                            "tie_word_embeddings true")
    for name in list(ours):
        ours[name] = ours[name].to(torch.float32).contiguous()

    try:
        with torch.device("meta"):  # shapes only
            expected = {k: v.shape for k, v in GPT(cfg).state_dict().items()
                        if not (cfg.tie_embeddings and k == "lm_head.weight")}
    except RuntimeError as e:  # a size no tensor can have (over 2**63 elements), so no weights fit it
        if "overflow" not in str(e):
            raise
        raise UserError(f"{where}: the weights do not fit config.json (it makes a tensor too large for any "
                        f"weights: {e})") from None
    got = {k: v.shape for k, v in ours.items()}
    if expected != got:
        missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
        shapes = "".join(f"; {k} is {_dims(got[k])}, config.json makes it {_dims(expected[k])}" for k in wrong[:1])
        raise UserError(f"{where}: the weights do not fit config.json (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}, wrong shape {wrong[:3]}{shapes})")
    return ours


# The config.json keys that say how many layers and how wide, by architecture, for messages.
LAYOUT_KEYS = {"GPT-2": ("n_layer", "n_embd"), "GPT-Neo": ("num_layers", "hidden_size"),
               "Llama": ("num_hidden_layers", "hidden_size"), "Qwen3": ("num_hidden_layers", "hidden_size")}


def _check_config_against_weights(hf: dict, cfg: ModelConfig, architecture: str, where) -> None:
    """config.json's layer count, width and vocabulary size against the tensors' names and shapes.

    First, and from names and shapes only: building the model (even its shapes, on the meta device)
    takes time and memory in proportion to config.json's numbers, so a num_hidden_layers of 100,000
    beside 3 layers of weights must be refused before anything is built from it.
    """
    layers_key, width_key = LAYOUT_KEYS[architecture]
    llama = architecture in ("Llama", "Qwen3")
    # at most 9 digits: a longer index is no layer of ours (the shape check names it) and stays cheap
    pattern = re.compile(r"(?:model\.)?layers\.(\d{1,9})\." if llama else r"(?:transformer\.)?h\.(\d{1,9})\.")
    found = {int(m.group(1)) for name in hf if (m := pattern.match(name))}
    if len(found) != cfg.n_layer or found != set(range(cfg.n_layer)):
        held = f"{len(found)}" if found == set(range(len(found))) else f"layers {short(sorted(found))}"
        raise UserError(f"{where}: config.json says {layers_key} {cfg.n_layer} but the weights hold {held}")
    names = ("model.embed_tokens.weight", "embed_tokens.weight") if llama else ("transformer.wte.weight", "wte.weight")
    for name in names:
        if name in hf and tuple(hf[name].shape) != (cfg.vocab_size, cfg.n_embd):
            raise UserError(f"{where}: config.json says vocab_size {cfg.vocab_size} and {width_key} {cfg.n_embd}, "
                            f"but the token embedding {name} is {_dims(hf[name].shape)}")


def _dims(shape) -> str:
    return " x ".join(map(str, shape)) or "a scalar"


def _stack(parts: list, names: list[str], where):
    """torch.cat of q, k, v (or gate, up) along their rows, refused unless they can be stacked."""
    import torch

    if len(parts) == 1:
        return parts[0]  # nothing to stack (o_proj, the norms): the shape check judges it
    if any(p.dim() == 0 for p in parts) or len({p.shape[1:] for p in parts}) > 1:
        raise UserError(f"{where}: the weights do not fit config.json ({', '.join(names)} differ in width)")
    return torch.cat(parts, dim=0)  # (rows of each, in) -> (all rows, in)


def _from_gpt(hf: dict, cfg: ModelConfig, architecture: str, where) -> dict:
    """GPT-2 / GPT-Neo names -> ours (see the module docstring's key map)."""
    if not any(k.startswith("transformer.") for k in hf):  # saved from the base model: no "transformer." prefix
        hf = {(k if k == "lm_head.weight" else "transformer." + k): v for k, v in hf.items()}
    ours = {}
    for name, tensor in hf.items():
        ours[_our_name(name, architecture)] = tensor
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}.attn"
        if architecture == "GPT-Neo":  # separate q, k, v (out, in) -> one (3C, C), in our split order
            names = [f"{p}.{x}_proj.weight" for x in "qkv"]
            if all(n in ours for n in names):
                ours[f"{p}.c_attn.weight"] = _stack([ours.pop(n) for n in names], names, where)
    for name in list(ours):
        if architecture == "GPT-2" and name.endswith(GPT2_CONV1D) and ours[name].dim() == 2:
            ours[name] = ours[name].t()  # Conv1D (in, out) -> nn.Linear (out, in)
    return ours


def _from_llama(hf: dict, cfg: ModelConfig, where) -> dict:
    """Llama / Qwen3 names -> ours: export.llama_key_map read backwards (q, k, v and gate, up stacked)."""
    from tinystories.export import llama_key_map

    if not any(k.startswith("model.") for k in hf):  # saved from LlamaModel itself: no "model." prefix
        hf = {(k if k == "lm_head.weight" else "model." + k): v for k, v in hf.items()}
    ours = {}
    for name, hf_names in llama_key_map(cfg):
        if not all(n in hf for n in hf_names):
            continue  # the shape check names what is missing
        ours[name] = _stack([hf.pop(n) for n in hf_names], hf_names, where)
    ours.update(hf)  # anything left is not ours: the shape check names it (lm_head of a tied model aside)
    return ours


def _our_name(hf_name: str, architecture: str) -> str:
    if architecture == "GPT-Neo":  # transformer.h.0.attn.attention.q_proj.weight -> transformer.h.0.attn.q_proj.weight
        hf_name = hf_name.replace(".attn.attention.", ".attn.").replace(".attn.out_proj.", ".attn.c_proj.")
    return hf_name
