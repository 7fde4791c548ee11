"""Tokenizers behind one small interface: GPT-2 through tiktoken, or a byte-level BPE we train.

    tok = load_gpt2("../shared/data/gpt2")          # offline, from encoder.json + vocab.bpe
    tok = load_gpt2()                               # $TINYSTORIES_GPT2_VOCAB, else tiktoken's download
    tok = train_bpe(stories, vocab_size=4096)       # Hugging Face `tokenizers`, trained on our text
    tok.encode("Once upon a time")  -> [7454, 2402, 257, 640]
    tok.save(folder); Tokenizer.load(folder)        # the files travel with data and checkpoints

`spec()` describes a tokenizer (name, vocab size, end-of-text id, sha256 of its files); two
tokenizers are the same exactly when their specs' `fingerprint` agree.

Text that is not valid Unicode is refused, never replaced: every encode method first calls
`check_text`, which raises `InvalidTextError` (a UserError: one line from the command line, a 400
from the server) when the text holds a lone surrogate. See `check_text` for why.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from tinystories.errors import UserError

EOT = "<|endoftext|>"

# The files OpenAI published with GPT-2 (the same hashes tiktoken checks).
GPT2_FILES = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
BPE_FILE = "tokenizer.json"
GPT2_VOCAB_ENV = "TINYSTORIES_GPT2_VOCAB"


class InvalidTextError(UserError):
    """Text with no UTF-8 form (a lone surrogate at `index`), which no tokenizer here encodes."""

    def __init__(self, message: str, index: int):
        super().__init__(message)
        self.index = index


def check_text(text: str) -> None:
    """Raise InvalidTextError if `text` holds a lone surrogate (U+D800..U+DFFF), else nothing.

    A Python str can hold what no UTF-8 text can: Python decodes command-line arguments that are
    not UTF-8 with "surrogateescape" (the byte 0xFF becomes U+DCFF), and JSON may escape half of a
    UTF-16 pair ("\\udc80"). Left alone, tiktoken silently replaced such a character with U+FFFD
    and HF tokenizers raised TypeError. The rule, the same for both tokenizers and every caller
    (generate, serve, quality, evaluate, prepare): refuse, saying where and what, because
    replacing would tell the model something other than what was given, and `prepare` already
    refuses invalid UTF-8 rather than replacing it.
    """
    if text.isascii():  # O(1) in CPython (the string knows), and nearly every story is ASCII
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        origin = "half of a UTF-16 pair without its other half"
        if 0xDC80 <= code <= 0xDCFF:  # surrogateescape's range: one byte of text that was not UTF-8
            origin += f", or Python's stand-in for the byte 0x{code - 0xDC00:02X} of text that is not UTF-8"
        raise InvalidTextError(f"the text is not valid Unicode: the character at index {e.start} is U+{code:04X}, "
                               f"a lone surrogate ({origin}); give UTF-8 text", e.start) from None


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Tokenizer:
    """What the rest of the package needs from a tokenizer. Build one with the functions below."""

    name: str  # "gpt2" or "bpe-N"
    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of text; InvalidTextError if it is not valid Unicode (see `check_text`). gpt2 encodes a literal "<|endoftext|>" in `text` as plain text; the
        trained BPE (HF tokenizers always matches its added tokens) as the end-of-text token.
        Prepared stories never contain it: the official files are split on it."""
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` for many texts, on all cores (each checked by `check_text` first)."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def encode_documents(self, texts: Sequence[str]):
        """`encode` of each text followed by `eot_id`, as one flat uint32 numpy array, on all cores.

        What token files hold: the same ids as the `encode_batch` lists, without a Python int per
        token. Subclasses make it faster; this is the plain definition.
        """
        import numpy as np

        ids = self.encode_batch(texts)
        flat = itertools.chain.from_iterable(itertools.chain(x, (self.eot_id,)) for x in ids)
        return np.fromiter(flat, dtype=np.uint32, count=sum(map(len, ids)) + len(ids))

    def files(self) -> dict[str, bytes]:
        """The files that define this tokenizer, by file name."""
        raise NotImplementedError

    def save(self, folder) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in self.files().items():
            (folder / name).write_bytes(data)

    def spec(self) -> dict:
        hashes = {name: hashlib.sha256(data).hexdigest() for name, data in sorted(self.files().items())}
        fingerprint = hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()
        return {
            "name": self.name,
            "vocab_size": self.vocab_size,
            "eot_id": self.eot_id,
            "files": hashes,
            "fingerprint": fingerprint,
        }

    @staticmethod
    def load(folder) -> "Tokenizer":
        """Load whichever tokenizer's files lie in `folder`."""
        folder = Path(folder)
        if (folder / BPE_FILE).is_file():
            return BPETokenizer.from_file(folder / BPE_FILE)
        if all((folder / name).is_file() for name in GPT2_FILES):
            return load_gpt2(folder)
        raise UserError(
            f"no tokenizer files in {folder} (expected {BPE_FILE}, or {' and '.join(GPT2_FILES)})"
        )


def _runs_with_eot(texts: Sequence[str], runs: int) -> list[str] | None:
    """`texts` in up to `runs` consecutive runs, each joined and ended by EOT; None if any text
    holds the EOT string itself (it must stay text, so those go the plain way).

    Why: tiktoken cuts the input at special tokens before anything else, so encoding
    "a<|endoftext|>b<|endoftext|>" with EOT allowed gives exactly encode(a) + [eot] + encode(b) +
    [eot], in a few native calls instead of one per text (tests/test_prepare.py checks it). Not
    for `tokenizers`: it is slower on long inputs than on many short ones.
    """
    if any(EOT in t for t in texts):
        return None
    if not texts:
        return []
    size = -(-len(texts) // max(1, runs))  # ceil
    return [EOT.join(texts[i : i + size]) + EOT for i in range(0, len(texts), size)]


def check_same_tokenizer(a: dict, b: dict, a_what: str, b_what: str) -> None:
    """Refuse to mix, e.g., a checkpoint with data made by another tokenizer."""
    if a.get("fingerprint") != b.get("fingerprint"):
        raise UserError(
            f"{a_what} uses tokenizer {a.get('name')} ({a.get('vocab_size')} tokens) but {b_what} uses "
            f"{b.get('name')} ({b.get('vocab_size')} tokens, different files); use data prepared "
            "with the same tokenizer"
        )


# -----------------------------------------------------------------------------
# GPT-2 through tiktoken


class GPT2Tokenizer(Tokenizer):
    def __init__(self, encoding, files: dict[str, bytes]):
        self._enc = encoding
        self._files = files
        self.name = "gpt2"
        self.vocab_size = encoding.n_vocab  # 50,257
        self.eot_id = encoding.eot_token  # 50,256

    def encode(self, text):
        check_text(text)
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts):
        texts = list(texts)
        for text in texts:
            check_text(text)
        return self._enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)

    def decode(self, ids):
        return self._enc.decode(list(ids))

    def encode_documents(self, texts):
        import numpy as np

        texts = list(texts)
        for text in texts:  # the plain way below checks in encode_batch
            check_text(text)
        threads = os.cpu_count() or 1
        runs = _runs_with_eot(texts, 2 * threads)  # 2 per thread: the threads finish together
        if runs is None:
            return super().encode_documents(texts)
        if not runs:
            return np.zeros(0, dtype=np.uint32)
        with ThreadPoolExecutor(threads) as pool:  # tiktoken releases the GIL while it encodes
            arrays = list(pool.map(lambda run: self._enc.encode_to_numpy(run, allowed_special={EOT}), runs))
        return np.concatenate(arrays)

    def files(self):
        return self._files


def load_gpt2(vocab_dir=None) -> GPT2Tokenizer:
    """The GPT-2 tokenizer: from `vocab_dir` (or $TINYSTORIES_GPT2_VOCAB) offline, else tiktoken's.

    A folder must hold OpenAI's `encoder.json` and `vocab.bpe`; their sha256 is checked.
    """
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    vocab_dir = vocab_dir or os.environ.get(GPT2_VOCAB_ENV)
    if vocab_dir is None:
        try:
            enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # tiktoken raises requests/urllib errors when offline
            raise UserError(
                f"could not download the GPT-2 vocabulary ({type(e).__name__}); point {GPT2_VOCAB_ENV} "
                "(or --gpt2-vocab) at a folder with encoder.json and vocab.bpe"
            ) from None
        # tiktoken keeps the original files in its cache; read them back for our own folder
        files = {name: _tiktoken_cached(name) for name in GPT2_FILES}
        return GPT2Tokenizer(enc, files)

    folder = Path(vocab_dir)
    files = {}
    for name, expected in GPT2_FILES.items():
        path = folder / name
        if not path.is_file():
            raise UserError(f"{path} not found: the GPT-2 vocabulary folder needs encoder.json and vocab.bpe")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != expected:
            raise UserError(f"{path} is not OpenAI's GPT-2 {name} (sha256 mismatch)")
        files[name] = data
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(folder / "vocab.bpe"),
        encoder_json_file=str(folder / "encoder.json"),
        vocab_bpe_hash=GPT2_FILES["vocab.bpe"],
        encoder_json_hash=GPT2_FILES["encoder.json"],
    )
    from tiktoken_ext.openai_public import r50k_pat_str

    enc = tiktoken.Encoding(
        name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={EOT: 50256},
        explicit_n_vocab=50257,
    )
    return GPT2Tokenizer(enc, files)


def _tiktoken_cached(name: str) -> bytes:
    """OpenAI's original file as tiktoken's download cache holds it (after get_encoding('gpt2'))."""
    from tiktoken.load import read_file_cached

    url = f"https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/{name}"
    return read_file_cached(url, GPT2_FILES[name])


# -----------------------------------------------------------------------------
# Byte-level BPE trained with Hugging Face `tokenizers`


class BPETokenizer(Tokenizer):
    def __init__(self, tok):
        self._tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.eot_id = tok.token_to_id(EOT)
        self.name = f"bpe-{self.vocab_size}"

    @classmethod
    def from_file(cls, path) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise UserError(f"{path} is not a valid tokenizers file ({e})") from None
        if tok.token_to_id(EOT) is None:
            raise UserError(f"{path} has no {EOT} token; it was not made by tinystories")
        return cls(tok)

    def encode(self, text):
        check_text(text)
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        texts = list(texts)
        for text in texts:
            check_text(text)
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids):
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def files(self):
        # sorted keys and no whitespace: the same tokenizer always gives the same bytes
        return {BPE_FILE: self._tok.to_str(pretty=False).encode("utf-8")}


def train_bpe(texts: Iterable[str] | Iterator[str], vocab_size: int, show_progress: bool = True) -> BPETokenizer:
    """Train a byte-level BPE of `vocab_size` tokens (end-of-text included) on `texts`.

    Byte-level (GPT-2's scheme): any text encodes, nothing is ever unknown. The 256 byte symbols
    and end-of-text are in the vocabulary first, so `vocab_size` must be above 257.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 258:
        raise UserError(f"a byte-level BPE needs more than 257 tokens, got {vocab_size}")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return BPETokenizer(tok)


def get_tokenizer(name: str, gpt2_vocab=None, texts: Iterable[str] | None = None) -> Tokenizer:
    """A tokenizer by name: "gpt2", or "bpe-N" trained on `texts`."""
    if name == "gpt2":
        return load_gpt2(gpt2_vocab)
    if name.startswith("bpe-") and name[4:].isdigit():
        if texts is None:
            raise UserError(f"tokenizer {name} must be trained: it needs the training text")
        return train_bpe(texts, int(name[4:]))
    raise UserError(f"unknown tokenizer {name!r}; use gpt2 or bpe-N (for example bpe-4096)")


def copy_tokenizer_files(src_folder, dst_folder) -> None:
    """Copy whichever tokenizer files lie in `src_folder`."""
    for name in (BPE_FILE, *GPT2_FILES):
        if (Path(src_folder) / name).is_file():
            shutil.copyfile(Path(src_folder) / name, Path(dst_folder) / name)
