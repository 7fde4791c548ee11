"""`tinystories prepare`: TinyStories text in, token files out (DESIGN.md §2-3).

    tinystories prepare --source hf --dataset v2 --out data/v2-gpt2
    tinystories prepare --source ../shared/data/tinystories/TinyStories-train.head.txt --out D
    tinystories prepare --source stories.jsonl --tokenizer bpe-4096 --test valid.jsonl --out D

    from tinystories.prepare import prepare
    meta = prepare("stories.txt", "D", tokenizer="bpe-1024", max_stories=1000)

The stages, in the order they run (the banners below carry the same numbers):
  1. sources: `hf` (the official files, downloaded once into a cache, see download.py), a URL, or
     local files: official-format .txt (each story followed by a `<|endoftext|>` line), .json (a
     list of objects with a "story" or "text" field: the TinyStories_all_data shards), .jsonl (one
     such object per line), .parquet (a "story" or "text" column; needs pyarrow), or a folder of
     them (top level only; files whose name contains "valid" become the test split).
  2. checks, before any real work, so a bad input fails in seconds with one line: every file is
     hashed (sha256, recorded in meta.json) and must be non-empty; text files must be valid UTF-8
     with no NUL byte, and a .txt must hold at least one separator (a .txt without any is not the
     official format: we refuse rather than guess what a story is).
     Invalid UTF-8 is refused, with the byte offset, rather than replaced: the official files are
     valid UTF-8, so bad bytes mean a damaged or mis-converted file, and replacing them would
     quietly put U+FFFD into the training data.
  3. stories, streamed: files are read in 8 MB blocks cut at separators, so memory stays bounded
     whatever the file size. Each story is repaired (cp1252 mojibake such as `â€™` for `’`, found
     in the hub's parquet copy), stripped, dropped if empty, optionally deduplicated (exact text,
     by a 64-bit hash: ~60 bytes of memory per story; a training story that is also in the test
     split is dropped too), and counted.
  4. splits: test = the official validation file (or --test); val = a seeded --val-fraction of the
     training stories, chosen per story index so it works streaming (see ValSplit).
  5. tokenizer: gpt2, or bpe-N trained on the train split (val excluded) in a first streaming pass.
  6. tokens: 4 MB chunks of stories, `Tokenizer.encode_documents` on all cores (on a worker thread,
     while the main thread reads and cleans the next chunk), each story followed by the end-of-text
     id, appended to train.bin / val.bin / test.bin (uint16 when the vocabulary fits).
  7. DATA_DIR is built in a temporary sibling folder and renamed into place, meta.json included, so
     an interrupted prepare never leaves a folder that looks complete, and an old DATA_DIR is left
     untouched until the new one is whole. The same inputs and options give byte-identical files.
"""

from __future__ import annotations

import codecs
import collections
import glob
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from tinystories.download import cache_dir as default_cache_dir
from tinystories.download import HF_FILES, Downloaded, fetch_hf, fetch_url
from tinystories.errors import UserError
from tinystories.outputs import check_output_dir, writing
from tinystories.tokenizer import BPE_FILE, EOT, GPT2_FILES, Tokenizer, load_gpt2, train_bpe

# The same values as tinystories.data (which imports torch, so prepare does not import it;
# tests/test_prepare.py checks they agree).
DATA_FORMAT = "tinystories-data"
DATA_FORMAT_VERSION = 1
META = "meta.json"
SPLITS = ("train", "val", "test")
# Every file a prepare may write into DATA_DIR: with --force, these and only these are replaced.
OWN_FILES = {f"{s}.bin" for s in SPLITS} | {META, BPE_FILE, *GPT2_FILES}

FORMATS = {".txt": "txt", ".json": "json", ".jsonl": "jsonl", ".parquet": "parquet"}
READ_BLOCK = 8 << 20  # bytes read from a source file at a time
CHUNK_BYTES = 4 << 20  # story text tokenized at a time (with READ_BLOCK, bounds the memory used)
MIN_VAL_FRACTION = 1e-5  # val = one story in 100,000 at least (ValSplit's block size), else none
MAX_ITEM_BYTES = 64 << 20  # a "story" longer than this means the file is not what it claims to be
SEP = EOT
SEP_BYTES = SEP.encode()
BOM = "\ufeff"


# -----------------------------------------------------------------------------
# 1. Sources


@dataclass
class Source:
    """One input file, and what meta.json says about where it came from."""

    path: Path
    record: dict  # {"path": ...} or {"url": ..., "file": ...}
    expected_sha256: str | None = None  # for a cached download: its bytes must not have changed

    @property
    def kind(self) -> str:
        return FORMATS[self.path.suffix.lower()]

    @property
    def name(self) -> str:
        return self.path.name


def _from_download(d: Downloaded) -> Source:
    return Source(d.path, {"url": d.url, "file": d.path.name}, expected_sha256=d.sha256)


def _local_sources(text: str, flag: str) -> list[Source]:
    path = Path(text).expanduser()
    if path.is_dir():
        return _folder_sources(path, flag)
    if not path.exists():
        raise UserError(f"{flag} {text}: no such file or folder")
    if path.suffix.lower() not in FORMATS:
        raise UserError(
            f"{flag} {text}: unsupported file type {path.suffix or '(no extension)'!r}; use .txt (official "
            "format), .json, .jsonl or .parquet, or a folder of them (unpack archives first)"
        )
    return [Source(path, {"path": str(path.resolve())})]


def _folder_sources(folder: Path, flag: str) -> list[Source]:
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in FORMATS)
    if not files:
        raise UserError(f"{flag} {folder}: the folder holds no .txt, .json, .jsonl or .parquet file")
    return [Source(p, {"path": str(p.resolve())}) for p in files]


def resolve_sources(source: str, *, dataset: str, test: str | None, cache: Path,
                    progress: bool | None = None) -> tuple[list[Source], list[Source]]:
    """(train sources, test sources) for --source and --test ("none" = no test split)."""
    no_test = test is not None and test.lower() == "none"
    test_sources = _local_sources(test, "--test") if test is not None and not no_test else None
    if source == "hf":
        splits = ("train",) if test is not None else ("train", "test")
        got = fetch_hf(dataset, cache, splits, progress=progress)
        train = [_from_download(got["train"])]
        if "test" in got:
            test_sources = [_from_download(got["test"])]
    elif source.startswith(("http://", "https://")):
        train = [_from_download(fetch_url(source, cache, progress=progress))]
    elif Path(source).expanduser().is_dir():
        files = _local_sources(source, "--source")
        valid = [s for s in files if "valid" in s.name.lower()]
        train = [s for s in files if s not in valid]
        if not train:
            raise UserError(f"--source {source}: every file in it is a validation file (its name has 'valid')")
        if test is None:  # the folder's own validation files are the test split, as with hf
            test_sources = valid
    else:
        train = _local_sources(source, "--source")
    test_sources = [] if no_test else test_sources or []
    both = {s.path.resolve() for s in train} & {s.path.resolve() for s in test_sources}
    if both:
        raise UserError(f"{sorted(both)[0]} is both a training source and the test split; give --test another file")
    return train, test_sources


# -----------------------------------------------------------------------------
# 2. Checks: every file hashed and validated before any real work


class _Progress:
    """A byte counter behind a tqdm bar (shown only on a terminal unless `show` says otherwise)."""

    def __init__(self, total: int, desc: str, show: bool | None):
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                         disable=None if show is None else not show, file=sys.stderr, leave=False)
        self._pending = 0

    def __call__(self, n: int) -> None:
        self._pending += n
        if self._pending >= 1 << 20:  # tqdm is too slow to be told about every line
            self._bar.update(self._pending)
            self._pending = 0

    def close(self) -> None:
        self._bar.update(self._pending)
        self._bar.close()


def check_source(src: Source, advance: Callable[[int], None]) -> dict:
    """Hash and validate one file; its record for meta.json. Raises UserError on a bad file."""
    path = src.path
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"{path} is empty (0 bytes)")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if src.kind == "parquet":
            _import_pyarrow(path)  # fail now, not after the other files are tokenized
            head = f.read(4)
            f.seek(-4, os.SEEK_END)
            if head != b"PAR1" or f.read(4) != b"PAR1":
                raise UserError(f"{path} is not a parquet file (no PAR1 marker)")
            f.seek(0)
            for block in iter(lambda: f.read(READ_BLOCK), b""):
                h.update(block)
                advance(len(block))
        else:
            _check_text(f, src, h, advance)
    sha = h.hexdigest()
    if src.expected_sha256 and sha != src.expected_sha256:
        raise UserError(f"the cached {path} no longer matches what was downloaded (sha256 {sha[:12]}..., "
                        f"expected {src.expected_sha256[:12]}...); delete it and run again")
    return {**src.record, "sha256": sha, "bytes": size}


def _check_text(f, src: Source, h, advance) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset, separators, tail = 0, 0, b""
    for block in iter(lambda: f.read(READ_BLOCK), b""):
        h.update(block)
        nul = block.find(b"\x00")
        if nul >= 0:
            raise UserError(f"{src.path} is not a text file (binary data: a NUL byte at byte {offset + nul:,})")
        pending = len(decoder.getstate()[0])  # bytes of a character cut by the previous block
        try:
            decoder.decode(block)
        except UnicodeDecodeError as e:
            raise UserError(f"{src.path} is not valid UTF-8 (bad byte at offset {offset - pending + e.start:,}); "
                            "TinyStories files are UTF-8: re-encode the file (e.g. with iconv)") from None
        if src.kind == "txt":  # a separator may straddle two blocks: count in the joined edge too
            separators += (tail + block).count(SEP_BYTES)
            tail = block[-(len(SEP_BYTES) - 1):]
        offset += len(block)
        advance(len(block))
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise UserError(f"{src.path} is not valid UTF-8 (it ends in the middle of a character)") from None
    if src.kind == "txt" and separators == 0:
        raise UserError(
            f"{src.path} has no {SEP} separator, so it is not in the official format (each story followed "
            f"by a line {SEP}); add those lines, or give one story per line as .jsonl ({{\"text\": ...}})"
        )


# -----------------------------------------------------------------------------
# 3. Stories: read (streaming), repaired, stripped, deduplicated, counted


def raw_stories(src: Source, advance: Callable[[int], None]) -> Iterator[str]:
    """The stories of one file as written, in order (not yet cleaned)."""
    return {"txt": _txt_stories, "json": _json_stories, "jsonl": _jsonl_stories,
            "parquet": _parquet_stories}[src.kind](src.path, advance)


def _unframe(piece: str) -> str:
    """A story without the newlines the official layout puts around each separator line."""
    if piece.startswith("\n"):
        piece = piece[1:]
    if piece.endswith("\n"):
        piece = piece[:-1]
    return piece


def _txt_stories(path: Path, advance) -> Iterator[str]:
    carry = b""  # the start of a story whose separator is in a later block
    first = True
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(READ_BLOCK), b""):
            advance(len(block))
            buf = carry + block
            cut = buf.rfind(SEP_BYTES)
            if cut < 0:
                carry = buf
                if len(carry) > MAX_ITEM_BYTES:
                    raise UserError(f"{path}: no {SEP} separator in {MAX_ITEM_BYTES >> 20} MB; not the official format")
                continue
            # cutting at an ASCII separator never splits a UTF-8 character
            text, carry = buf[:cut].decode("utf-8"), buf[cut + len(SEP_BYTES):]
            if first:
                text, first = text.removeprefix(BOM), False
            for piece in text.split(SEP):
                yield _unframe(piece)
    tail = carry.decode("utf-8")
    if tail.strip():  # a last story with no separator after it
        yield _unframe(tail.removeprefix(BOM) if first else tail)


def _story_field(item, path: Path, where: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for key in ("story", "text"):
            if key in item:
                value = item[key]
                if value is None:
                    return ""
                if not isinstance(value, str):
                    raise UserError(f"{path}, {where}: the {key!r} field is a {type(value).__name__}, not text")
                return value
        fields = ", ".join(map(str, item)) or "nothing"
        raise UserError(f"{path}, {where}: no 'story' or 'text' field (it has: {fields})")
    raise UserError(f"{path}, {where}: expected an object with a 'story' or 'text' field, "
                    f"found a {type(item).__name__}")


def _jsonl_stories(path: Path, advance) -> Iterator[str]:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            advance(len(line))
            if lineno == 1:
                line = line.removeprefix(BOM.encode())
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError as e:
                raise UserError(f"{path}, line {lineno}: not valid JSON ({getattr(e, 'msg', e)}); a .jsonl file "
                                "holds one JSON object per line") from None
            yield _story_field(item, path, f"line {lineno}")


def _json_stories(path: Path, advance) -> Iterator[str]:
    """Items of a top-level JSON list, parsed one at a time from 8 MB blocks (bounded memory)."""
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")("strict")
    with open(path, "rb") as f:
        buf, pos, eof = "", 0, False

        def more() -> None:
            nonlocal buf, pos, eof
            block = f.read(READ_BLOCK)
            advance(len(block))
            eof = not block
            buf = buf[pos:] + utf8.decode(block, final=eof)
            pos = 0
            if len(buf) > MAX_ITEM_BYTES:
                raise UserError(f"{path}: one JSON item longer than {MAX_ITEM_BYTES >> 20} MB; not a list of stories")

        def next_char() -> str:  # the next non-space character, consumed; "" at the end
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n" + BOM:
                    pos += 1
                if pos < len(buf):
                    pos += 1
                    return buf[pos - 1]
                if eof:
                    return ""
                more()

        def bad(what: str) -> UserError:
            return UserError(f"{path}: {what}; a .json source must be a list of objects with a 'story' or "
                             "'text' field (use .jsonl for one object per line)")

        if next_char() != "[":
            raise bad("not a JSON list")
        index = 0
        while True:
            c = next_char()
            if c == "]":
                return
            if index > 0:
                if c != ",":
                    raise bad(f"invalid JSON after item {index}")
                c = next_char()
            if not c:
                raise bad("the file ends inside the list")
            pos -= 1  # give back the item's first character
            while True:
                try:
                    item, end = decoder.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as e:
                    if eof:  # the item cannot be completed by more text
                        raise bad(f"invalid JSON in item {index} ({e.msg})") from None
                    more()  # the item may continue in the next block
            pos = end
            yield _story_field(item, path, f"item {index}")
            index += 1


def _import_pyarrow(path: Path):
    """pyarrow is optional: only parquet sources need it."""
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise UserError(f"reading {path.name} needs pyarrow, which is not installed: pip install pyarrow") from None
    return pyarrow


def _parquet_stories(path: Path, advance) -> Iterator[str]:
    pyarrow = _import_pyarrow(path)
    pq = pyarrow.parquet
    try:
        pf = pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise UserError(f"{path} is not a readable parquet file ({e})") from None
    schema = pf.schema_arrow
    column = next((c for c in ("story", "text") if c in schema.names), None)
    if column is None:
        raise UserError(f"{path}: no 'story' or 'text' column (it has: {', '.join(schema.names)})")
    kind = schema.field(column).type
    if not (pyarrow.types.is_string(kind) or pyarrow.types.is_large_string(kind)):
        raise UserError(f"{path}: the {column!r} column holds {kind}, not text")
    rows, size = max(pf.metadata.num_rows, 1), path.stat().st_size
    for batch in pf.iter_batches(batch_size=8192, columns=[column]):
        advance(size * batch.num_rows // rows)  # parquet is compressed: progress by rows
        for value in batch.column(0).to_pylist():
            yield value or ""


# cp1252 mojibake: UTF-8 bytes that were decoded as Windows-1252 ("’" = E2 80 99 -> "â€™").
# Every byte gets a character; the five bytes cp1252 leaves undefined map to the control character
# of the same number, as lenient decoders (pandas, browsers) do. A repair undoes exactly that.
_CP1252 = {bytes([b]).decode("cp1252", errors="ignore") or chr(b): b for b in range(256)}
_CONT = "".join(re.escape(ch) for ch, b in _CP1252.items() if 0x80 <= b <= 0xBF)  # continuation bytes
_LEAD = lambda lo, hi: "".join(re.escape(ch) for ch, b in _CP1252.items() if lo <= b <= hi)  # noqa: E731
# A UTF-8 sequence spelled in cp1252 characters: a lead byte and its continuation bytes. Two-byte
# sequences only for the leads Â and Ã (U+0080-U+00FF: "Ã©" for "é", "Â " for a no-break space):
# the other two-byte leads are ordinary capitals ("É", "Ü") that may well precede a real "’" or "”",
# and English stories need nothing they would repair.
_MOJIBAKE = re.compile(
    f"[{_LEAD(0xC2, 0xC3)}][{_CONT}]|[{_LEAD(0xE0, 0xEF)}][{_CONT}]{{2}}|[{_LEAD(0xF0, 0xF4)}][{_CONT}]{{3}}"
)


def _unmojibake(m: re.Match) -> str:
    try:
        return bytes(_CP1252[ch] for ch in m.group()).decode("utf-8")
    except UnicodeDecodeError:  # looked like a sequence but is not valid UTF-8: leave it
        return m.group()


def repair_mojibake(text: str) -> str:
    """`text` with cp1252-mojibake sequences turned back into the characters they spell.

    Only sequences that decode as valid UTF-8 are touched, so correct text (a real "’" or "é")
    stays as it is; twice-garbled text ("Ã¢â‚¬â„¢") is undone in two rounds.
    """
    for _ in range(3):
        fixed = _MOJIBAKE.sub(_unmojibake, text)
        if fixed == text:
            break
        text = fixed
    return text


def new_counts() -> dict:
    return {"read": 0, "stripped": 0, "mojibake_repaired": 0, "dropped_empty": 0,
            "duplicates": 0, "dropped_in_test": 0, "kept": 0}


def _story_key(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=8).digest()  # 64 bits: collisions ~1e-7 at 3M stories


def clean_stories(sources: list[Source], counts: dict, advance, seen: set | None = None,
                  forbidden: set | frozenset = frozenset()) -> Iterator[tuple[str, int]]:
    """(story, its UTF-8 bytes) for each kept story, updating `counts`.

    `seen` (a set) turns on deduplication and collects the keys of kept stories; a story whose key
    is in `forbidden` (the test split's) is dropped as `dropped_in_test`.
    """
    for src in sources:
        for index, raw in enumerate(raw_stories(src, advance)):
            counts["read"] += 1
            text = raw
            if not text.isascii():  # O(1); the mojibake regex is as slow as tokenizing
                text = repair_mojibake(text)
                if text != raw:
                    counts["mojibake_repaired"] += 1
            story = text.strip()
            if len(story) != len(text):
                counts["stripped"] += 1
            if not story:
                counts["dropped_empty"] += 1
                continue
            if story.isascii() and seen is None:
                nbytes = len(story)  # O(1) for ASCII: most stories skip the encode
            else:
                try:
                    data = story.encode("utf-8")
                except UnicodeEncodeError:  # a lone surrogate, possible through a JSON \ud800 escape
                    raise UserError(f"{src.path}: story {index} is not valid Unicode text (a lone surrogate)") from None
                nbytes = len(data)
                if seen is not None:
                    key = _story_key(data)
                    if key in forbidden:
                        counts["dropped_in_test"] += 1
                        continue
                    if key in seen:
                        counts["duplicates"] += 1
                        continue
                    seen.add(key)
            counts["kept"] += 1
            yield story, nbytes


# -----------------------------------------------------------------------------
# 4. Splits


class ValSplit:
    """Which training stories (by index) are held out as val: exact, seeded, streaming.

    Stories are taken in blocks of B = ceil(1/fraction); block b holds out
    floor(fraction*B*(b+1)) - floor(fraction*B*b) >= 1 of them: those whose hash of
    (seed, index) is smallest. So val is exactly the fraction (at block ends), spread over the
    whole file, decided without knowing how many stories follow, and the same for a prefix
    (--max-stories) as for the full file.
    """

    def __init__(self, fraction: float, seed: int):
        self.fraction = Fraction(str(fraction))  # exact: 0.05 is 1/20, not 0.05000000000000000277
        self.block = math.ceil(1 / self.fraction) if self.fraction else 0
        self.seed = seed
        self._cached = (-1, frozenset())

    def _held_out(self, b: int) -> frozenset:
        B, f = self.block, self.fraction
        k = math.floor(f * B * (b + 1)) - math.floor(f * B * b)
        key = lambda p: hashlib.blake2b(f"{self.seed}:{b * B + p}".encode(), digest_size=8).digest()  # noqa: E731
        return frozenset(sorted(range(B), key=key)[:k])

    def is_val(self, index: int) -> bool:
        if not self.block:
            return False
        b, p = divmod(index, self.block)
        if self._cached[0] != b:
            self._cached = (b, self._held_out(b))
        return p in self._cached[1]


def train_stream(sources, counts, advance, *, val: ValSplit, max_stories: int | None, dedupe: bool,
                 forbidden=frozenset()) -> Iterator[tuple[bool, str, int]]:
    """(is_val, story, bytes) for the first `max_stories` cleaned training stories."""
    stories = clean_stories(sources, counts, advance, seen=set() if dedupe else None, forbidden=forbidden)
    for index, (story, nbytes) in enumerate(itertools.islice(stories, max_stories)):
        yield val.is_val(index), story, nbytes


# -----------------------------------------------------------------------------
# 6. Tokens


def encode_stories(tok: Tokenizer, stories: list[str], dtype) -> np.ndarray:
    """The tokens of `stories`, each followed by end-of-text, as one flat array (all cores)."""
    return tok.encode_documents(stories).astype(dtype, copy=False)  # ids < vocab_size: fits dtype


@dataclass
class _SplitFile:
    """One .bin file being appended to, with the counts meta.json records for it.

    `shown` is the path a failed write names (the file's place in DATA_DIR, not the temporary
    folder it is written in), `note` what the message adds (that earlier data is intact).
    """

    path: Path
    dtype: np.dtype
    shown: Path | None = None
    note: str = ""
    stories: int = 0
    tokens: int = 0
    bytes: int = 0
    _f: object = field(default=None, repr=False)

    def __post_init__(self):
        with self._writing():
            self._f = open(self.path, "wb")

    def _writing(self):
        return writing(self.shown or self.path, note=self.note)

    def add(self, tokens: np.ndarray, stories: int, nbytes: int) -> None:
        # a full disk (ENOSPC) or a file-size limit (EFBIG) surface here; through the file object,
        # not ndarray.tofile, whose error says only "N requested and M written", not why
        with self._writing():
            self._f.write(np.ascontiguousarray(tokens).data)
        self.stories += stories
        self.tokens += len(tokens)
        self.bytes += nbytes

    def close(self) -> dict:
        with self._writing():
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
        return {"file": self.path.name, "stories": self.stories, "tokens": self.tokens, "bytes": self.bytes}

    def discard(self) -> None:
        """Close without caring: the temporary folder is about to be removed."""
        try:
            self._f.close()
        except OSError:  # its buffered bytes could not be written either; they are not wanted
            pass


def _chunks(items: Iterable, size_of: Callable, limit: int = CHUNK_BYTES) -> Iterator[list]:
    """Lists of consecutive items holding about `limit` bytes of text each."""
    chunk, size = [], 0
    for item in items:
        chunk.append(item)
        size += size_of(item)
        if size >= limit:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _tokenized(chunks: Iterable[list], encode: Callable[[list], object], depth: int = 2) -> Iterator[tuple]:
    """(chunk, encode(chunk)) in order, with up to `depth` chunks encoded ahead on a worker thread.

    Why: reading and cleaning stories is Python on the main thread, while tokenizing is native
    code that releases the GIL; overlapping them keeps every core busy. `depth` bounds memory.
    """
    pool = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
    try:
        pending = collections.deque()
        for chunk in chunks:
            pending.append((chunk, pool.submit(encode, chunk)))
            if len(pending) > depth:
                chunk, job = pending.popleft()
                yield chunk, job.result()
        while pending:
            chunk, job = pending.popleft()
            yield chunk, job.result()
    finally:  # on an error, do not tokenize what is still queued
        pool.shutdown(wait=True, cancel_futures=True)


# -----------------------------------------------------------------------------
# 7. The whole job, and DATA_DIR on disk


_BPE = re.compile(r"bpe-(\d+)")


def _check_tokenizer_name(name: str) -> int | None:
    """The vocabulary size of bpe-N, None for gpt2; UserError for anything else."""
    if name == "gpt2":
        return None
    m = _BPE.fullmatch(name)
    if not m:
        raise UserError(f"unknown tokenizer {name!r}; use gpt2 or bpe-N (for example bpe-4096)")
    n = int(m.group(1))
    if not 258 <= n < 2**32:
        raise UserError(f"{name}: a byte-level BPE needs more than 257 tokens (256 bytes + end-of-text)")
    return n


def _is_prepared(folder: Path) -> bool:
    try:
        return json.loads((folder / META).read_text()).get("format") == DATA_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_out(out: Path, force: bool) -> None:
    """Refuse to write where something else lives, before any work is done."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder")
    check_output_dir(out, "--out", sibling=True)  # built as a temporary sibling, renamed into place
    if out.is_dir():
        names = sorted(p.name for p in out.iterdir())
        if names and not force:
            if _is_prepared(out):
                raise UserError(f"{out} already holds prepared data; add --force to replace it")
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            raise UserError(f"{out} is not empty (it holds {shown}); choose a new or empty folder, or add "
                            "--force to write the data files beside what is there")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def _remove_dead_temps(out: Path) -> None:
    """Temporary folders of earlier prepares into `out` that were killed outright (kill -9, power
    loss); a prepare still running (its process alive) keeps its own."""
    for tmp in out.parent.glob(f".{glob.escape(out.name)}.prepare-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        if pid.isdigit() and (int(pid) == os.getpid() or not _pid_alive(int(pid))):
            shutil.rmtree(tmp, ignore_errors=True)


def _install(tmp: Path, out: Path) -> None:
    """Move the finished DATA_DIR from `tmp` to `out`; meta.json arrives last."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.replace(tmp, out)  # one rename: the folder appears complete or not at all
        _fsync_folder(out.parent)
        return
    # --force into an existing folder: from here on it does not look complete until meta.json is back
    (out / META).unlink(missing_ok=True)
    for name in OWN_FILES - {META}:  # stale files of an earlier prepare (e.g. its test.bin)
        if not (tmp / name).exists():
            (out / name).unlink(missing_ok=True)
    for p in sorted(tmp.iterdir()):
        if p.name != META:
            os.replace(p, out / p.name)
    os.replace(tmp / META, out / META)
    tmp.rmdir()
    _fsync_folder(out)


def _fsync_folder(folder: Path) -> None:
    """Make the renames durable (a power cut must not undo them after we said "wrote")."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems do not fsync folders
        pass
    finally:
        os.close(fd)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def prepare(source: str, out, *, dataset: str = "v2", tokenizer: str = "gpt2", gpt2_vocab=None,
            val_fraction: float = 0.05, test: str | None = None, max_stories: int | None = None,
            dedupe: bool = False, seed: int = 1337, cache_dir=None, force: bool = False,
            progress: bool | None = None, timings: dict | None = None) -> dict:
    """Prepare DATA_DIR `out` from `source`; returns its meta.json as a dict.

    `test`: a file or folder for the test split, "none" for no test split, None for the source's
    official validation file if it has one. `progress`: tqdm bars (None: only on a terminal).
    `timings`, if given, receives the seconds each stage took (kept out of meta.json, which must be
    byte-identical across runs).
    """
    t_start = time.perf_counter()
    timings = {} if timings is None else timings
    source = str(source)
    bpe_size = _check_tokenizer_name(tokenizer)
    if dataset not in HF_FILES:
        raise UserError(f"unknown dataset {dataset!r}; use {' or '.join(HF_FILES)}")
    # ValSplit sorts blocks of 1/val_fraction stories: 1e-50 would mean a block of 1e50 (an
    # OverflowError), so a fraction is 0 (no val split) or large enough to need a sane block.
    if not (val_fraction == 0 or MIN_VAL_FRACTION <= val_fraction < 1):
        raise UserError(f"--val-fraction must be 0 or at least {MIN_VAL_FRACTION:g} and below 1, got {val_fraction}")
    if max_stories is not None and max_stories < 1:
        raise UserError(f"--max-stories must be positive, got {max_stories}")
    out = Path(out).expanduser()
    _check_out(out, force)

    train_src, test_src = resolve_sources(source, dataset=dataset, test=test, cache=default_cache_dir(cache_dir),
                                          progress=progress)
    # Checks first: a bad file fails now, in one line, not after an hour of tokenizing.
    bar = _Progress(sum(s.path.stat().st_size for s in train_src + test_src), "checking", progress)
    sources = [{"split": "train", **check_source(s, bar)} for s in train_src]
    sources += [{"split": "test", **check_source(s, bar)} for s in test_src]
    bar.close()
    timings["check"] = time.perf_counter() - t_start
    tok = load_gpt2(gpt2_vocab) if bpe_size is None else None  # fails fast without the vocabulary

    # A write that fails (a full disk, a file-size limit) names the file it was writing and says
    # that earlier data is untouched: everything is written in `tmp` until _install.
    kept = (f"the prepared data already in {out} is unchanged" if _is_prepared(out)
            else f"nothing was written to {out}")
    with writing(out, note=kept):
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_temps(out)
        tmp = out.parent / f".{out.name}.prepare-{os.getpid()}"
        tmp.mkdir()
    open_files: list[_SplitFile] = []
    notes = []
    try:
        val = ValSplit(val_fraction, seed)
        train_bytes = sum(r["bytes"] for r in sources if r["split"] == "train")
        test_bytes = sum(r["bytes"] for r in sources if r["split"] == "test")
        if tok is None:  # bpe-N: a first pass over the train split (val excluded) trains it
            t = time.perf_counter()
            forbidden = set()
            if dedupe and test_src:  # the same training stories as the tokenizing pass below
                bar = _Progress(test_bytes, "reading test", progress)
                for _ in clean_stories(test_src, new_counts(), bar, seen=forbidden):
                    pass
                bar.close()
            bar = _Progress(train_bytes, f"training {tokenizer}", progress)
            texts = (story for is_val, story, _ in train_stream(
                train_src, new_counts(), bar, val=val, max_stories=max_stories, dedupe=dedupe,
                forbidden=forbidden) if not is_val)
            tok = train_bpe(texts, bpe_size, show_progress=False)
            bar.close()
            timings["train_tokenizer"] = time.perf_counter() - t
            if tok.vocab_size < bpe_size:  # BPE stops when no pair is left to merge: small text, small vocabulary
                notes.append(f"{tokenizer}: the training text holds only enough for {tok.vocab_size:,} tokens, "
                             f"so the vocabulary has {tok.vocab_size:,}, not {bpe_size:,}")
                print(f"tinystories prepare: note: {notes[-1]}", file=sys.stderr, flush=True)
        for name, data in tok.files().items():  # Tokenizer.save, one file at a time to name the one that fails
            with writing(out / name, note=kept):
                (tmp / name).write_bytes(data)
        dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)

        t = time.perf_counter()
        counts = {"train": new_counts()}
        splits = {}
        forbidden = set()
        if test_src:  # first, so that --dedupe can drop training stories that are in the test split
            counts["test"] = new_counts()
            out_test = _SplitFile(tmp / "test.bin", dtype, out / "test.bin", kept)
            open_files.append(out_test)
            bar = _Progress(test_bytes, "tokenizing test", progress)
            seen = set() if dedupe else None
            chunks = _chunks(clean_stories(test_src, counts["test"], bar, seen=seen), lambda x: x[1])
            for chunk, tokens in _tokenized(chunks, lambda c: encode_stories(tok, [s for s, _ in c], dtype)):
                out_test.add(tokens, len(chunk), sum(n for _, n in chunk))
            bar.close()
            splits["test"] = out_test.close()
            forbidden = seen or set()
            if not splits["test"]["stories"]:
                raise UserError(f"the test split ({', '.join(s.name for s in test_src)}) holds no stories")

        out_train = _SplitFile(tmp / "train.bin", dtype, out / "train.bin", kept)
        open_files.append(out_train)
        out_val = _SplitFile(tmp / "val.bin", dtype, out / "val.bin", kept)
        open_files.append(out_val)
        bar = _Progress(train_bytes, "tokenizing train", progress)
        stream = train_stream(train_src, counts["train"], bar, val=val, max_stories=max_stories, dedupe=dedupe,
                              forbidden=forbidden)

        def encode(chunk):  # (train tokens, val tokens) of one chunk
            return tuple(encode_stories(tok, [s for v, s, _ in chunk if v == want], dtype) for want in (False, True))

        for chunk, (train_tokens, val_tokens) in _tokenized(_chunks(stream, lambda x: x[2]), encode):
            n_val = sum(v for v, _, _ in chunk)
            val_bytes = sum(n for v, _, n in chunk if v)
            out_train.add(train_tokens, len(chunk) - n_val, sum(n for _, _, n in chunk) - val_bytes)
            out_val.add(val_tokens, n_val, val_bytes)
        bar.close()
        splits = {"train": out_train.close(), "val": out_val.close(), **splits}
        timings["tokenize"] = time.perf_counter() - t
        if not splits["train"]["stories"]:
            raise UserError(f"{', '.join(s.name for s in train_src)}: no stories left to train on "
                            f"({counts['train']['read']:,} read, {counts['train']['dropped_empty']:,} empty)")

        meta = {
            "format": DATA_FORMAT,
            "format_version": DATA_FORMAT_VERSION,
            "tokenizer": tok.spec(),
            "dtype": dtype.name,
            "splits": splits,
            "sources": sources,
            "cleaning": counts,
            "options": {"source": source, "dataset": dataset, "tokenizer": tokenizer, "val_fraction": val_fraction,
                        "test": test, "max_stories": max_stories, "dedupe": dedupe, "seed": seed},
        }
        if notes:  # only when there is something to say, so meta.json stays as it was otherwise
            meta["notes"] = notes
        with writing(out / META, note=kept), open(tmp / META, "w", encoding="utf-8") as f:
            f.write(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        # renames only, which a full disk does not stop; if one fails the folder lacks meta.json,
        # so nothing takes it for complete data
        with writing(out, note="run `tinystories prepare` again"):
            _install(tmp, out)
    except BaseException:
        for f in open_files:
            f.discard()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    timings["total"] = time.perf_counter() - t_start
    _print_summary(out, meta, timings)
    return meta


def _print_summary(out: Path, meta: dict, timings: dict) -> None:
    for r in meta["sources"]:
        where = r.get("path") or r.get("url")
        print(f"source ({r['split']}): {where}  {_mb(r['bytes'])}  sha256 {r['sha256'][:16]}")
    for split, c in meta["cleaning"].items():
        print(f"cleaning ({split}): {c['read']:,} read, {c['kept']:,} kept; {c['stripped']:,} stripped, "
              f"{c['mojibake_repaired']:,} mojibake repaired, {c['dropped_empty']:,} empty dropped, "
              f"{c['duplicates']:,} duplicates, {c['dropped_in_test']:,} also in test dropped")
    spec = meta["tokenizer"]
    print(f"tokenizer {spec['name']} ({spec['vocab_size']:,} tokens, end-of-text {spec['eot_id']}), {meta['dtype']}")
    for split, s in meta["splits"].items():
        print(f"{split:>5}: {s['stories']:>10,} stories {s['tokens']:>13,} tokens {_mb(s['bytes']):>11}")
    if meta["options"]["val_fraction"] > 0 and meta["splits"]["val"]["stories"] == 0:
        print("warning: the val split is empty (too few training stories for --val-fraction)", file=sys.stderr)
    text = sum(s["bytes"] for s in meta["splits"].values())
    speed = text / timings["tokenize"] / 1e6 if timings.get("tokenize") else 0.0
    print(f"wrote {out} in {timings['total']:.1f} s (tokenized {_mb(text)} of text at {speed:.1f} MB/s)")


def run(args) -> int:
    prepare(args.source, args.out, dataset=args.dataset, tokenizer=args.tokenizer, gpt2_vocab=args.gpt2_vocab,
            val_fraction=args.val_fraction, test=args.test, max_stories=args.max_stories, dedupe=args.dedupe,
            seed=args.seed, cache_dir=args.cache_dir, force=args.force)
    return 0
