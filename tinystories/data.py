"""Reading prepared data: meta.json, the memory-mapped token files, and the training batches.

A DATA_DIR (written by `tinystories prepare`, see prepare.py) holds
    train.bin, val.bin[, test.bin]   flat token arrays (uint16, or uint32 for vocabularies > 65,536),
                                     stories joined with the end-of-text token
    meta.json                        format, tokenizer spec, dtype, sources, per-split counts
    tokenizer files                  so the data describes its own tokenizer

Training batches come from `EpochWindows`: every epoch cuts the token stream into windows of
block_size + 1 tokens at a random offset and visits them in a random order. Its whole position is
two integers (epoch, index), so a resumed run draws exactly the batches the first run would have.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from tinystories.errors import UserError
from tinystories.tokenizer import Tokenizer

DATA_FORMAT = "tinystories-data"
DATA_FORMAT_VERSION = 1
META = "meta.json"


def read_meta(data_dir) -> dict:
    """meta.json of a prepared DATA_DIR, checked to be complete."""
    data_dir = Path(data_dir)
    path = data_dir / META
    if not path.is_file():
        if not data_dir.exists():
            raise UserError(f"data folder {data_dir} does not exist; run `tinystories prepare --out {data_dir}` first")
        raise UserError(f"{data_dir} holds no prepared data ({META} missing); run `tinystories prepare` first")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is corrupted ({e}); run `tinystories prepare` again") from None
    if not isinstance(meta, dict) or meta.get("format") != DATA_FORMAT:
        raise UserError(f"{path} was not written by `tinystories prepare`")
    version = meta.get("format_version", 0)
    if not _is_int(version):
        raise UserError(f"{path} is corrupted (format_version is {version!r}); run `tinystories prepare` again")
    if version > DATA_FORMAT_VERSION:
        raise UserError(f"{data_dir} was prepared by a newer tinystories; upgrade tinystories")
    problem = _meta_problem(meta)
    if problem:
        raise UserError(f"{path} is corrupted ({problem}); run `tinystories prepare` again")
    return meta


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# The largest vocabulary each token dtype holds (ids 0 .. vocab_size - 1).
_DTYPE_VOCAB = {"uint16": 1 << 16, "uint32": 1 << 32}


def _meta_problem(meta: dict) -> str | None:
    """What is wrong with the parts of meta.json that readers index and size things by, if anything.

    meta.json is plain text anyone can edit: a vocab_size of 100 made training fail with an
    IndexError at its first step, one of 2e9 tried to allocate a 1.5 TB embedding. So its shape is
    checked here, and its numbers against the tokenizer files (load_data_tokenizer) and the token
    files (open_split).
    """
    tok = meta.get("tokenizer")
    if not isinstance(tok, dict) or not isinstance(tok.get("fingerprint"), str) or not isinstance(tok.get("name"), str):
        return "its tokenizer entry is missing"
    vocab, eot = tok.get("vocab_size"), tok.get("eot_id")
    if not _is_int(vocab) or vocab < 1:
        return f"tokenizer vocab_size is {vocab!r}"
    if not _is_int(eot) or not 0 <= eot < vocab:
        return f"tokenizer eot_id is {eot!r}, not an id below vocab_size {vocab}"
    if meta.get("dtype") not in _DTYPE_VOCAB:
        return f"dtype is {meta.get('dtype')!r}, not uint16 or uint32"
    if vocab > _DTYPE_VOCAB[meta["dtype"]]:
        return f"vocab_size {vocab} does not fit its {meta['dtype']} token files"
    splits = meta.get("splits")
    if not isinstance(splits, dict):
        return "its splits entry is missing"
    for name, info in splits.items():
        if not isinstance(info, dict) or not _is_int(info.get("tokens")) or info["tokens"] < 0:
            return f"split {name!r} has no token count"
        file = info.get("file")
        if not isinstance(file, str) or Path(file).name != file or file in ("", ".", ".."):
            return f"split {name!r} names {file!r}, not a file in the data folder"
    return None


def load_data_tokenizer(data_dir) -> Tokenizer:
    """The data's tokenizer, checked to be the one meta.json names (files, vocab size, end-of-text id)."""
    meta = read_meta(data_dir)
    tok = Tokenizer.load(data_dir)
    spec = tok.spec()
    if spec["fingerprint"] != meta["tokenizer"]["fingerprint"]:
        raise UserError(f"{data_dir}: the tokenizer files do not match meta.json; run `tinystories prepare` again")
    # The fingerprint covers the files only; the numbers beside it are what training sizes the model by.
    for key in ("vocab_size", "eot_id"):
        if meta["tokenizer"][key] != spec[key]:
            raise UserError(f"{Path(data_dir) / META} says {key} {meta['tokenizer'][key]}, but its tokenizer "
                            f"{spec['name']} has {spec[key]}; run `tinystories prepare` again")
    return tok


def open_split(data_dir, split: str) -> np.memmap:
    """The tokens of one split, memory-mapped (read-only)."""
    meta = read_meta(data_dir)
    if split not in meta["splits"]:
        raise UserError(f"{data_dir} has no {split!r} split (it has: {', '.join(meta['splits'])})")
    info = meta["splits"][split]
    path = Path(data_dir) / info["file"]
    dtype = np.dtype(meta["dtype"])
    if not path.is_file():
        raise UserError(f"{path} is missing; run `tinystories prepare` again")
    if path.stat().st_size != info["tokens"] * dtype.itemsize:
        raise UserError(f"{path} has the wrong size for {info['tokens']} tokens; run `tinystories prepare` again")
    if info["tokens"] == 0:
        return np.zeros(0, dtype=dtype)
    tokens = np.memmap(path, dtype=dtype, mode="r")
    # An id at or past vocab_size would index past the embedding (an IndexError mid-training, or
    # garbage on CUDA). One pass over the memmap: about a second per GB, far less than any use of it.
    largest = int(tokens.max())
    vocab = meta["tokenizer"]["vocab_size"]
    if largest >= vocab:
        raise UserError(f"{path} holds token id {largest}, but meta.json's vocab_size is {vocab}; "
                        "the data is damaged or mixed up with another prepare: run `tinystories prepare` again")
    return tokens


class EpochWindows:
    """Batches of (x, y) windows over a token array, epoch by epoch, reproducible from a seed.

    Each epoch e draws from a generator seeded by (seed, e): an offset in [0, block_size) and a
    permutation of the non-overlapping windows after it. Windows are handed out in order as
    micro-batches; with DDP, rank r takes micro-batches r, r + world_size, ... of the same global
    stream, so N ranks with accumulation A see what one process with accumulation N*A sees.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        if len(tokens) < 2 * block_size:
            raise UserError(
                f"the split has {len(tokens)} tokens, fewer than 2 x block_size = {2 * block_size} "
                "(one window at any offset); prepare more data or use a smaller --block-size"
            )
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.index = 0, 0  # position in the global stream of windows
        self._order = None

    def windows_per_epoch(self) -> int:
        return (len(self.tokens) - 1 - (self.block_size - 1)) // self.block_size  # for the largest offset

    def _epoch_order(self):
        if self._order is None or self._order[0] != self.epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            offset = int(torch.randint(self.block_size, (1,), generator=g))
            starts = offset + self.block_size * torch.randperm(self.windows_per_epoch(), generator=g)
            self._order = (self.epoch, starts.numpy())
        return self._order[1]

    def _next_window_starts(self, n: int) -> np.ndarray:
        out = []
        while n > 0:
            starts = self._epoch_order()
            take = starts[self.index : self.index + n]
            out.append(take)
            n -= len(take)
            self.index += len(take)
            if self.index == len(starts):
                self.epoch, self.index = self.epoch + 1, 0
        return np.concatenate(out)

    def next_batch(self, device="cpu"):
        """The next micro-batch of this rank: x, y of shape (batch_size, block_size), int64."""
        B, T = self.batch_size, self.block_size
        for r in range(self.world_size):  # skip the other ranks' micro-batches
            starts = self._next_window_starts(B)
            if r == self.rank:
                mine = starts
        rows = np.stack([self.tokens[s : s + T + 1] for s in mine]).astype(np.int64)  # (B, T+1)
        batch = torch.from_numpy(rows)
        if torch.device(device).type == "cuda":
            batch = batch.pin_memory().to(device, non_blocking=True)
        else:
            batch = batch.to(device)
        return batch[:, :-1], batch[:, 1:]  # inputs, and the same tokens shifted by one as targets

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise UserError(f"resume with --seed {state['seed']} (the run was started with it), not {self.seed}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
