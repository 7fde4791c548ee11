"""Checkpoint folders: save atomically, load with nothing but a path, never unpickle.

A checkpoint folder holds
    model.safetensors   weights of the uncompiled model (the tied output layer stored once)
    config.json         format, model config, sha256 of the weights file, tokenizer spec, step,
                        val loss, anything extra
    tokenizer files     tokenizer.json (trained BPE) or encoder.json + vocab.bpe (GPT-2)
    trainer_state.pt    optional: optimizer, scaler, RNG states, data position (tensors and
                        primitives only, so `torch.load(weights_only=True)` reads it)

Writes go to a temporary sibling folder that is renamed into place. Replacing an existing
checkpoint renames the old one to `NAME.old` first and deletes it last, so at every instant either
`NAME` or `NAME.old` is complete; loading falls back to `NAME.old` when `NAME` is missing.

    save_checkpoint("run/checkpoints/last", model, tokenizer, step=100, val_loss=2.1)
    ckpt = load_checkpoint("run")   # a run folder means its best checkpoint
    ckpt.model, ckpt.tokenizer, ckpt.config
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from tinystories.config import ModelConfig
from tinystories.errors import UserError
from tinystories.model import GPT
from tinystories.tokenizer import Tokenizer

FORMAT = "tinystories-checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAINER_STATE = "trainer_state.pt"
TIED = "lm_head.weight"  # with tie_embeddings, the same tensor as transformer.wte.weight: stored once


@dataclass
class Checkpoint:
    path: Path
    model: GPT
    tokenizer: Tokenizer
    config: dict  # the whole config.json

    @property
    def model_config(self) -> ModelConfig:
        return self.model.config


def save_checkpoint(folder, model: GPT, tokenizer: Tokenizer, *, step: int = 0, val_loss: float | None = None,
                    trainer_state: dict | None = None, extra: dict | None = None) -> Path:
    """Write a complete checkpoint folder atomically (see the module docstring)."""
    from safetensors.torch import save

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    for stale in folder.parent.glob(f".{glob.escape(folder.name)}.tmp-*"):  # left by a save that was killed
        shutil.rmtree(stale)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")

    model = getattr(model, "_orig_mod", model)  # never save a torch.compile wrapper's key names
    model = getattr(model, "module", model)  # nor DDP's
    # an untied output layer (tie_embeddings=False) is a matrix of its own and must be stored
    tied = model.config.tie_embeddings
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items() if not (tied and k == TIED)}
    data = save(weights, metadata={"format": FORMAT})
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model.config.to_dict(),
        "weights_sha256": hashlib.sha256(data).hexdigest(),
        "tokenizer": tokenizer.spec(),
        "step": step,
        "val_loss": val_loss,
        **(extra or {}),
    }
    files = {WEIGHTS: data, **tokenizer.files(), CONFIG: (json.dumps(config, indent=2) + "\n").encode()}
    if trainer_state is not None:
        # Serialized in memory and written below like every other file: torch.save to a path reports
        # a failed write (full disk) as an opaque RuntimeError, a plain write as an OSError.
        buffer = io.BytesIO()
        torch.save(trainer_state, buffer)
        files[TRAINER_STATE] = buffer.getbuffer()
    name = None
    try:
        tmp.mkdir()
        for name, content in files.items():
            (tmp / name).write_bytes(content)
        name = None
        _fsync_folder(tmp)
    except OSError as e:  # a full disk, a file size limit, a folder we may not write: nothing was replaced yet
        shutil.rmtree(tmp, ignore_errors=True)
        complete = any((f / CONFIG).is_file() for f in (folder, folder.with_name(folder.name + ".old")))
        previous = "the previous checkpoint there is intact" if complete else "there was no earlier checkpoint there"
        raise UserError(f"could not write checkpoint {folder} ({name or Path(e.filename or tmp).name}: "
                        f"{e.strerror or e}); {previous}") from None

    old = folder.with_name(folder.name + ".old")
    if old.exists():
        if folder.exists():
            shutil.rmtree(old)
        else:  # an earlier save stopped mid-swap: `old` is the only complete copy
            old.rename(folder)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    if old.exists():
        shutil.rmtree(old)
    return folder


def _fsync_folder(folder: Path) -> None:
    """Flush file contents to disk before the rename makes them visible as a checkpoint."""
    for p in folder.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def resolve_checkpoint(path) -> Path:
    """A checkpoint folder, or a run folder meaning its best (else last) checkpoint."""
    path = Path(path)
    # absolute: "." has no name, so it has no ".old" sibling to look for
    here = Path(os.path.abspath(path))
    run_folder = (here / "checkpoints").is_dir()
    # A run folder has a config.json of its own (the run's), so look for checkpoints/ first.
    candidates = [here / "checkpoints" / "best", here / "checkpoints" / "last"] if run_folder else [here]
    for c in candidates:
        for folder in (c, c.with_name(c.name + ".old")):  # .old: a save was cut off mid-swap
            if (folder / CONFIG).is_file():
                return folder
    if run_folder:
        raise UserError(f"run folder {path} has no checkpoint yet (checkpoints/best and checkpoints/last are missing)")
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    raise UserError(f"{path} is not a tinystories checkpoint or run folder (no {CONFIG} found)")


def read_checkpoint_config(path) -> dict:
    folder = resolve_checkpoint(path)
    try:
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{folder / CONFIG} is corrupted ({e})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise UserError(f"{folder} is not a tinystories checkpoint ({CONFIG} has no format={FORMAT!r})")
    version = config.get("format_version")
    if not isinstance(version, int):
        raise UserError(f"{folder / CONFIG} is corrupted (format_version is {version!r})")
    if version > FORMAT_VERSION:
        raise UserError(
            f"{folder} has checkpoint format {version}, newer than this tinystories "
            f"understands ({FORMAT_VERSION}); upgrade tinystories"
        )
    # load_checkpoint indexes these; a hand-edited or damaged file must not end in a KeyError
    if not isinstance(config.get("model"), dict) or not isinstance(config.get("tokenizer"), dict) \
            or not isinstance(config["tokenizer"].get("fingerprint"), str):
        raise UserError(f"{folder / CONFIG} is corrupted (its model or tokenizer entry is missing)")
    return config


def load_checkpoint(path, device="cpu") -> Checkpoint:
    """Load model (eval mode, on `device`) and tokenizer from a checkpoint or run folder.

    A training run may save the same checkpoint meanwhile (`checkpoints/last` is replaced every
    checkpoint_interval steps): then config.json and the weights read here can come from two saves
    and disagree. A save swaps whole folders, so the folder read is no longer the folder at that
    path; when loading fails and that happened, it is loaded once more from the new folder.
    """
    folder = resolve_checkpoint(path)
    identity = _identity(folder)
    try:
        return _load(folder, device)
    except (UserError, OSError):  # OSError: a file deleted with the old folder between two reads
        if _identity(folder) == identity:
            raise  # the folder is still the one read: the damage is real
        return _load(resolve_checkpoint(path), device)


def _identity(folder: Path) -> tuple[int, int] | None:
    """What tells one folder from another that took its name (device and inode), None if gone."""
    try:
        st = os.stat(folder)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _load(folder: Path, device) -> Checkpoint:
    from safetensors import SafetensorError
    from safetensors.torch import load

    config = read_checkpoint_config(folder)
    model_config = ModelConfig.from_dict(config["model"])
    tokenizer = Tokenizer.load(folder)
    if tokenizer.spec()["fingerprint"] != config["tokenizer"]["fingerprint"]:
        raise UserError(f"{folder}: the tokenizer files do not match the ones the model was trained with")

    try:
        data = (folder / WEIGHTS).read_bytes()  # read once: hashed, then parsed
        # A flipped bit inside a tensor would load without complaint: check the recorded hash
        # (absent in checkpoints written by other tools, e.g. by hand).
        recorded = config.get("weights_sha256")
        if recorded is not None and hashlib.sha256(data).hexdigest() != recorded:
            raise UserError(f"{folder / WEIGHTS} is truncated or corrupted (its sha256 differs from the one in {CONFIG})")
        weights = load(data)
    except FileNotFoundError:
        raise UserError(f"{folder / WEIGHTS} is missing; the checkpoint is incomplete") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{folder / WEIGHTS} is truncated or corrupted ({e})") from None
    with torch.device("meta"):  # shapes only: a config.json that is not ours must not allocate anything
        expected = {k: v.shape for k, v in GPT(model_config).state_dict().items()
                    if not (model_config.tie_embeddings and k == TIED)}
    got = {k: v.shape for k, v in weights.items()}
    if expected != got:
        missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
        raise UserError(
            f"{folder / WEIGHTS} does not fit its config.json (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}, wrong shape {wrong[:3]})"
        )
    model = GPT(model_config)
    model.load_state_dict(weights, strict=False)  # strict=False: the tied lm_head is not in the file
    model.to(device).eval()
    return Checkpoint(folder, model, tokenizer, config)


def torch_load_safely(file):
    """torch.load(weights_only=True): tensors and plain values only, a pickle holding code is refused.

    Refusing a foreign pickle is our error to report (one line); PyTorch's own warnings about it
    (e.g. "Detected pickle protocol 4 in the checkpoint") would print two more lines before ours.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.load(file, map_location="cpu", weights_only=True)


def load_trainer_state(path) -> dict:
    """The trainer state saved beside a checkpoint, read without unpickling arbitrary objects."""
    file = resolve_checkpoint(path) / TRAINER_STATE
    if not file.is_file():
        raise UserError(f"{file} is missing: this checkpoint cannot be resumed")
    try:
        return torch_load_safely(file)
    except Exception as e:  # torch raises pickle/zip/runtime errors for damaged files
        raise UserError(f"{file} is truncated, corrupted or not ours ({type(e).__name__})") from None
