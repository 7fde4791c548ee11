"""Reading a Hugging Face model folder that may come from anyone (what `tinystories import` reads).

    hf = read_config(folder)                                # config.json, a JSON object
    n = config_value(hf, "n_layer", 12, "count", where)     # a value of the type asked for, or one line
    weights, files = read_hf_weights(folder)                # tensors by HF name, {file: sha256}
    tok = tokenizer_from_hf(folder)                         # our Tokenizer

Nothing in the folder is trusted: every file it names (an index's shards; config.json, the weights
and the tokenizer files when they are symlinks) must resolve to a file inside it; every config.json
value read has its type checked; every tensor must be floating point and finite. Each refusal is
one line naming what is wrong. What the values and tensors mean is hf_import.py's business.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

from tinystories.config import INT64_MAX
from tinystories.errors import UserError
from tinystories.tokenizer import BPE_FILE, EOT, GPT2_FILES, sha256_file

# Buffers older transformers versions saved beside the weights: causal masks, not parameters.
BUFFERS = (".attn.attention.bias", ".attn.attention.masked_bias", ".attn.bias", ".attn.masked_bias",
           ".rotary_emb.inv_freq")  # RoPE frequencies (Llama before transformers 4.35), computed from rope_theta
# Weights are stored as fp32, which holds each of these exactly. Anything else is quantized (int8,
# float8 with its scales in other tensors) or not a weight, and would import as wrong numbers.
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


# -----------------------------------------------------------------------------
# Files inside the folder


def read_config(folder: Path) -> dict:
    file = present(folder, "config.json")
    if file is None:
        raise UserError(f"{folder} has no config.json; it is not a transformers model folder")
    config = read_json(file)
    if not isinstance(config, dict):
        raise UserError(f"{file} is not a transformers config (not a JSON object)")
    return config


def read_json(file: Path):
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    # ValueError: bad JSON or UTF-8, or an integer of more than 4,300 digits; RecursionError: nesting
    except (ValueError, RecursionError) as e:
        raise UserError(f"{file} is not valid JSON ({e})") from None
    except OSError as e:
        raise UserError(f"{file} cannot be read ({type(e).__name__})") from None


def present(folder: Path, name: str) -> Path | None:
    """folder / name if it is a file (None if not), refused if a symlink takes it outside the folder."""
    path = folder / name
    return inside(folder, name, str(path)) if is_file(path) else None


def is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long for the file system
        return False


def inside(folder: Path, name, what: str) -> Path:
    """folder / name, refused with one line unless it is a file name that stays inside `folder`.

    Files name other files (an index its shards), and a folder from someone else may name
    /etc/passwd, ../../secret or a symlink to either: reading it would copy another file of this
    machine into the checkpoint. So the path is resolved, symlinks included, and must end up inside
    the folder, or, for a Hub cache snapshot (what snapshot_download returns), inside the cache's
    own blobs/, which the snapshot's files link to. `what` names the entry for the message.
    """
    if not isinstance(name, str) or not name or "\x00" in name:
        raise UserError(f"{what} is not a file name")
    if os.path.isabs(name):
        raise UserError(f"{what} is an absolute path; every file a model folder names must be inside it")
    try:
        root, target = folder.resolve(), (folder / name).resolve()
    except (OSError, RuntimeError, ValueError) as e:  # RuntimeError: a symlink loop
        raise UserError(f"{what} cannot be followed ({type(e).__name__})") from None
    roots = [root]
    if root.parent.name == "snapshots" and (root.parent.parent / "blobs").is_dir():
        roots.append((root.parent.parent / "blobs").resolve())
    if target in roots:
        raise UserError(f"{what} names the folder itself, not a file in it")
    if not any(r in target.parents for r in roots):
        raise UserError(f"{what} leads outside {folder} (to {target}); every file a model folder names "
                        "must be inside it")
    return folder / name


def short(value, limit: int = 80) -> str:
    """repr(value) on one line of at most `limit` characters, for messages that quote a value."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# -----------------------------------------------------------------------------
# config.json values, typed
#
# A config.json written by hand or by someone hostile can hold any JSON value under any key. Every
# value import reads goes through `config_value`, which refuses the wrong type by its own name (not
# as a TypeError somewhere in torch, nor silently replaced by a default).


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# kind -> (what the message asks for, the check); counts fit torch's 64-bit integers
KINDS = {
    "count": ("a positive integer", lambda v: is_int(v) and 1 <= v <= INT64_MAX),
    "positive": ("a positive finite number", lambda v: _is_number(v) and v > 0),
    "dropout": ("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "object": ("an object", lambda v: isinstance(v, dict)),
    "list": ("a list", lambda v: isinstance(v, list)),
}


def config_value(hf: dict, key: str, default, kind: str, where, *, optional: bool = False):
    """hf[key], or `default` where config.json leaves it out, refused with one line unless it is of
    `kind` (see KINDS); null passes only where transformers accepts it (`optional`)."""
    value = hf.get(key, default)
    if value is None and optional:
        return None
    want, ok = KINDS[kind]
    if not ok(value):
        raise UserError(f"{where}: {key} must be {want}{' or null' if optional else ''}, got {short(value)}")
    return value


# -----------------------------------------------------------------------------
# Weights


def read_hf_weights(folder: Path) -> tuple[dict, dict]:
    """(tensors by HF name, {file name: sha256}) from safetensors if present, else pytorch_model.bin.

    Every tensor but the skipped buffers must be floating point (FLOAT_DTYPES) and finite: NaN or
    inf in a weight is a damaged file, and would only show up later as a model that writes nothing.
    """
    import torch

    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (index_file := present(folder, index)) is not None:
            names = _shard_names(folder, index_file, suffix=Path(single).suffix)
        elif present(folder, single) is not None:
            names = [single]
        else:
            continue
        weights, files = {}, {}
        for name in names:
            path = folder / name
            if not is_file(path):
                raise UserError(f"{path} is missing (listed in {index}); the download is incomplete")
            for key, tensor in _load_weights_file(path, torch).items():
                _check_tensor(path, key, tensor, torch)
                weights[key] = tensor
            files[name] = sha256_file(path)
        return weights, files
    raise UserError(f"{folder} has no weights (model.safetensors or pytorch_model.bin)")


def _shard_names(folder: Path, index_file: Path, suffix: str) -> list[str]:
    """The files an index's weight_map lists, each one a `suffix` file inside `folder` (see inside)."""
    index = read_json(index_file)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise UserError(f"{index_file} is not a valid weight index (no weight_map of tensor names to files)")
    for tensor, name in weight_map.items():
        what = f"{index_file}: the file of {short(tensor, 200)}, {short(name, 300)},"
        inside(folder, name, what)
        if not name.endswith(suffix):
            raise UserError(f"{what} is not a {suffix} file")
    return sorted(set(weight_map.values()))


def _load_weights_file(path: Path, torch) -> dict:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{path} is truncated or corrupted ({e})") from None
    from tinystories.checkpoint import torch_load_safely

    try:  # weights_only: tensors and containers only; a pickle holding code is refused, not run
        state = torch_load_safely(path)
    except Exception as e:  # torch raises pickle/zip/runtime errors for damaged or unsafe files
        raise UserError(f"{path} is truncated, corrupted or holds more than tensors ({type(e).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise UserError(f"{path} is not a state dict of tensors")
    return state


def _check_tensor(path: Path, name: str, tensor, torch) -> None:
    if name.endswith(BUFFERS):  # masks (bool in some versions) and RoPE frequencies: skipped on import
        return
    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype not in FLOAT_DTYPES:
        raise UserError(f"{path}: tensor {short(name)} is {dtype}; tinystories imports {', '.join(FLOAT_DTYPES)} "
                        "weights only (quantized models are not supported)")
    if not bool(torch.isfinite(tensor).all()):
        raise UserError(f"{path}: tensor {short(name)} holds NaN or inf values; the weights are damaged")


# -----------------------------------------------------------------------------
# Tokenizer


def tokenizer_from_hf(folder: Path, use_gpt2: bool = False):
    """Our Tokenizer for the model folder's tokenizer files (see the module docstring)."""
    from tinystories.tokenizer import BPETokenizer, load_gpt2

    vocab, merges = _read_vocab_and_merges(folder)
    if vocab is not None:
        gpt2 = _as_openai_gpt2_files(vocab, merges)
        if gpt2 is not None:
            with tempfile.TemporaryDirectory() as tmp:
                for name, data in gpt2.items():
                    (Path(tmp) / name).write_bytes(data)
                return load_gpt2(tmp)  # checks the hashes again, builds the tiktoken encoding
        if (bpe_file := present(folder, BPE_FILE)) is not None:
            return BPETokenizer.from_file(bpe_file)  # refuses a file without <|endoftext|>
        raise UserError(f"{folder}: the tokenizer (vocab.json + merges.txt) is not GPT-2's and there is no "
                        f"{BPE_FILE}; tinystories supports GPT-2's vocabulary or a tokenizers {BPE_FILE}")
    if use_gpt2:
        return load_gpt2()
    raise UserError(f"{folder} has no tokenizer files (vocab.json + merges.txt, or {BPE_FILE}); add them, or pass "
                    "--tokenizer gpt2 if the model uses GPT-2's vocabulary (the TinyStories models do)")


def _read_vocab_and_merges(folder: Path) -> tuple[dict | None, list[str] | None]:
    """A BPE's vocabulary and merges ("a b" strings) from vocab.json + merges.txt or tokenizer.json."""
    vocab_file, merges_file, bpe_file = (present(folder, name) for name in ("vocab.json", "merges.txt", BPE_FILE))
    try:
        if vocab_file is not None and merges_file is not None:
            vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
            lines = merges_file.read_text(encoding="utf-8").splitlines()
            return vocab, [line for line in lines if line and not line.startswith("#version")]
        if bpe_file is not None:
            tok = json.loads(bpe_file.read_text(encoding="utf-8"))
            model = tok.get("model") or {}
            if model.get("type") != "BPE":
                raise UserError(f"{bpe_file} is not a BPE tokenizer ({short(model.get('type'))}); not supported")
            vocab = dict(model.get("vocab") or {})
            for added in tok.get("added_tokens") or []:  # <|endoftext|> may live only here
                vocab.setdefault(added["content"], added["id"])
            # tokenizers wrote merges as "a b" strings, newer versions as ["a", "b"] pairs
            merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
            return vocab, merges
    # ValueError: bad JSON or UTF-8; the others: JSON of another shape than a tokenizer's
    except (ValueError, RecursionError, KeyError, TypeError, AttributeError, OSError) as e:
        raise UserError(f"{folder}: the tokenizer files are damaged ({type(e).__name__}: {e})") from None
    return None, None


def _as_openai_gpt2_files(vocab: dict, merges: list[str]) -> dict[str, bytes] | None:
    """OpenAI's encoder.json and vocab.bpe bytes, if `vocab` and `merges` are exactly GPT-2's; else None.

    OpenAI wrote encoder.json with json.dumps in id order and vocab.bpe as a "#version: 0.2" line plus
    one merge per line, so rewriting the vocabulary that way reproduces their files bit for bit;
    their sha256 then proves it is the same tokenizer.
    """
    if not isinstance(vocab, dict) or vocab.get(EOT) != 50256 or not all(is_int(i) for i in vocab.values()):
        return None
    files = {
        "encoder.json": json.dumps(dict(sorted(vocab.items(), key=lambda kv: kv[1]))).encode("utf-8"),
        "vocab.bpe": ("#version: 0.2\n" + "".join(m + "\n" for m in merges)).encode("utf-8"),
    }
    ok = all(hashlib.sha256(files[name]).hexdigest() == digest for name, digest in GPT2_FILES.items())
    return files if ok else None
