"""Does a model copy its training data? The longest verbatim span and the n-gram overlap.

Eldan & Li (2023) check that their small models write new stories rather than recall training
ones (their memorization analysis). For each completion this module finds
    longest_span   the longest run of consecutive completion tokens that occurs verbatim somewhere
                   in the training tokens (exact, verified against the tokens; 0 when no run of
                   n tokens occurs: shorter spans are below what the index resolves)
    overlap        the share of the completion's n-grams (n tokens) that occur in the training
                   tokens: 1.0 for a copied story, near 0 for text the model made up

    index = NgramIndex.open_or_build("data/ts/train.bin.ngram8.npy", train_tokens, n=8)
    index.match(completion_tokens) -> {"longest_span": 37, "overlap": 0.61, ...}

The index. Every position p of the training tokens becomes one uint64 key: the top bits are a hash
of the n-gram tokens[p : p + n], the low `pos_bits` bits are p itself. Sorting the keys groups
equal n-grams, so the occurrences of an n-gram are one `searchsorted` range away, and the
positions come with them. A shared hash prefix is only a candidate: every occurrence is checked
against the tokens before it counts, so hash collisions can cost time but never change a result.

Scaling (N training tokens; the full TinyStories V2 train set is ~2 GB of text, ~470M GPT-2 tokens):
    disk / memory  8 bytes per token (~3.8 GB for N = 470M), a .npy memory-mapped for lookups,
                   so a query touches ~log2(N) pages, not the whole file
    build          two hashing passes and a sort: O(N log N). The keys are scattered into 2^b
                   buckets by their top bits and each bucket is sorted on its own, so the build
                   needs RAM for one bucket (<= 64M keys = 512 MB), not for the whole index.
                   Measured on a shared 2-core machine, 200M tokens (real GPT-2 tokens of
                   TinyStories, tiled): built in 53 s with 0.47 GB of peak allocations into a 1.6 GB file;
                   50M tokens: 8.5 s. Linear scaling puts the full 470M at ~2 minutes, 3.8 GB.
    query          a completion of m tokens costs O(m) range lookups plus the verification of the
                   candidates of the rarest n-gram in each window tried (two pointers, see `match`);
                   measured 14 ms per 200-token completion over 3.5M tokens, 160 ms over the tiled
                   200M (where every n-gram occurs >= 57 times, the worst case for verification)
The index is built once next to train.bin and reused while train.bin is unchanged (size and
modification time are recorded in a JSON sidecar).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from tinystories.errors import UserError

INDEX_FORMAT = "tinystories-ngram-index"
HASH_SCHEME = "poly31-splitmix64-v1"  # change when the hash changes: old indexes are then rebuilt
MAX_BUCKET = 1 << 26  # keys sorted at once while building (512 MB)
_P = np.uint64(0x100000001B3)  # FNV's 64-bit prime as the polynomial base: odd, spreads low bits


# -----------------------------------------------------------------------------
# Hashing n-grams


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer (Steele et al. 2014): every input bit moves every output bit, so the
    top bits that go into a key are as good as the bottom ones. uint64 arithmetic wraps mod 2^64."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def ngram_hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """64-bit hash of every n-gram tokens[i : i + n], for i in [0, len(tokens) - n]."""
    count = len(tokens) - n + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    t = np.asarray(tokens).astype(np.uint64) + np.uint64(1)  # + 1: a zero token still changes the hash
    h = np.zeros(count, dtype=np.uint64)
    for k in range(n):
        h = h * _P + t[k : k + count]
    return _mix(h)


# -----------------------------------------------------------------------------
# The index


class NgramIndex:
    """Sorted (hash prefix | position) keys of every n-gram of a token array. See the module docstring."""

    def __init__(self, keys: np.ndarray, tokens: np.ndarray, n: int, pos_bits: int, hash_bits: int | None = None):
        self.keys, self.tokens, self.n, self.pos_bits = keys, tokens, n, pos_bits
        self.hash_bits = hash_bits if hash_bits is not None else 64 - pos_bits
        self.pos_mask = np.uint64((1 << pos_bits) - 1)

    # --- building ------------------------------------------------------------

    @staticmethod
    def pos_bits_for(n_tokens: int) -> int:
        return max(1, math.ceil(math.log2(max(2, n_tokens))))

    @classmethod
    def build(cls, tokens: np.ndarray, n: int = 8, path=None, *, chunk: int = 1 << 22, max_bucket: int = MAX_BUCKET,
              hash_bits: int | None = None, progress: bool = False) -> "NgramIndex":
        """Index every n-gram of `tokens`; written to `path` (.npy) when given, else kept in memory.

        hash_bits < 64 - pos_bits keeps fewer hash bits (only tests do this, to force collisions).
        """
        from tqdm import tqdm

        if n < 1:
            raise UserError(f"the n-gram length must be at least 1, got {n}")
        count = max(0, len(tokens) - n + 1)
        pos_bits = cls.pos_bits_for(len(tokens))
        hash_bits = min(64 - pos_bits, hash_bits or 64)
        drop = np.uint64(64 - hash_bits)  # keep the top hash_bits bits of the hash

        def keys_of(start: int, stop: int) -> np.ndarray:
            h = ngram_hashes(tokens[start : stop + n - 1], n)
            positions = np.arange(start, stop, dtype=np.uint64)
            return ((h >> drop) << np.uint64(pos_bits)) | positions

        if path is None:
            keys = np.empty(count, dtype=np.uint64)
        else:
            keys = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint64, shape=(count,))
        # buckets by the top bucket_bits of the key, so each can be sorted on its own (see docstring)
        bucket_bits = max(0, math.ceil(math.log2(max(1, count / max_bucket))))
        bucket_bits = min(bucket_bits, hash_bits)
        shift = np.uint64(64 - bucket_bits) if bucket_bits else None
        chunks = range(0, count, chunk)
        bar = tqdm(total=2 * count if bucket_bits else count, unit="tok", unit_scale=True,
                   desc="n-gram index", disable=None if progress else True)
        with bar:
            if not bucket_bits:
                for start in chunks:
                    stop = min(start + chunk, count)
                    keys[start:stop] = keys_of(start, stop)
                    bar.update(stop - start)
                keys.sort()
            else:
                sizes = np.zeros(1 << bucket_bits, dtype=np.int64)
                for start in chunks:  # pass 1: how many keys fall in each bucket
                    stop = min(start + chunk, count)
                    sizes += np.bincount((keys_of(start, stop) >> shift).astype(np.int64), minlength=len(sizes))
                    bar.update(stop - start)
                fill = np.concatenate([[0], np.cumsum(sizes)[:-1]])
                for start in chunks:  # pass 2: scatter each key into its bucket's region
                    stop = min(start + chunk, count)
                    k = keys_of(start, stop)
                    b = (k >> shift).astype(np.int64)
                    order = np.argsort(b, kind="stable")
                    k, b = k[order], b[order]
                    edges = np.searchsorted(b, np.arange(len(sizes) + 1))
                    for j in np.flatnonzero(np.diff(edges)):
                        m = edges[j + 1] - edges[j]
                        keys[fill[j] : fill[j] + m] = k[edges[j] : edges[j + 1]]
                        fill[j] += m
                    bar.update(stop - start)
                offsets = np.concatenate([[0], np.cumsum(sizes)])
                for j in range(len(sizes)):  # buckets hold disjoint key ranges: sorted each = sorted all
                    keys[offsets[j] : offsets[j + 1]] = np.sort(keys[offsets[j] : offsets[j + 1]])
        if path is not None:
            keys.flush()
        return cls(keys, tokens, n, pos_bits, hash_bits)

    @classmethod
    def open_or_build(cls, path, tokens: np.ndarray, n: int = 8, source=None, progress: bool = True) -> "NgramIndex":
        """The index at `path` if it was built from these tokens with this n, else build it there.

        `source` (the token file) is recorded by size and modification time so a re-prepared
        train.bin is noticed. The build writes a temporary file and renames it into place.
        """
        path = Path(path)
        if len(tokens) < n:
            raise UserError(f"the training split has {len(tokens)} tokens, fewer than the n-gram length {n}")
        sidecar = path.with_suffix(".json")
        want = {
            "format": INDEX_FORMAT, "hash": HASH_SCHEME, "n": n, "tokens": int(len(tokens)),
            "pos_bits": cls.pos_bits_for(len(tokens)),
        }
        if source is not None:
            st = Path(source).stat()
            want.update(source=str(Path(source).name), source_bytes=st.st_size, source_mtime_ns=st.st_mtime_ns)
        if path.is_file() and sidecar.is_file():
            try:
                have = json.loads(sidecar.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                have = None
            if isinstance(have, dict) and {k: have.get(k) for k in want} == want:
                try:
                    keys = np.load(path, mmap_mode="r")
                except (ValueError, OSError):  # damaged: build it again below
                    keys = None
                if keys is not None and keys.dtype == np.uint64 and len(keys) == len(tokens) - n + 1:
                    return cls(keys, tokens, n, want["pos_bits"])
        tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npy")
        try:
            t0 = time.perf_counter()
            path.parent.mkdir(parents=True, exist_ok=True)
            index = cls.build(tokens, n, tmp, progress=progress)
            del index
            sidecar.unlink(missing_ok=True)  # no moment where an old sidecar vouches for a new index
            tmp.replace(path)
        except BaseException as e:  # interrupted or failed: leave no half-written index behind
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise UserError(f"could not write the n-gram index {path} ({e.strerror or e}); pass --index PATH "
                                "somewhere writable") from None
            raise
        sidecar.write_text(json.dumps({**want, "build_seconds": round(time.perf_counter() - t0, 2)}, indent=2) + "\n")
        return cls(np.load(path, mmap_mode="r"), tokens, n, want["pos_bits"])

    # --- queries -------------------------------------------------------------

    def ranges(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[lo, hi) of the keys sharing each hash's prefix: the candidate occurrences."""
        drop, pb = np.uint64(64 - self.hash_bits), np.uint64(self.pos_bits)
        first = (hashes >> drop) << pb
        lo = np.searchsorted(self.keys, first, side="left")
        hi = np.searchsorted(self.keys, first | self.pos_mask, side="right")
        return lo, hi

    def find(self, query: np.ndarray, lo: int, hi: int, offset: int) -> int | None:
        """A position where `query` occurs in the tokens, or None.

        Candidates are the positions in keys[lo:hi] (occurrences, or hash look-alikes, of the
        n-gram at `offset` in the query), moved back by `offset`; each is checked token by token.
        """
        L = len(query)
        span = np.arange(L)
        # Candidates are checked in batches growing 16, 64, 256, ...: a frequent n-gram that does
        # occur is confirmed after a few random reads of the token file, while a query that does
        # not occur still gets vectorized checks (at most ~4M gathered tokens at a time).
        cap = max(1024, (1 << 22) // L)
        c, size = lo, 16
        while c < hi:
            stop = min(c + size, hi)
            starts = (np.asarray(self.keys[c:stop]) & self.pos_mask).astype(np.int64) - offset
            starts = starts[(starts >= 0) & (starts + L <= len(self.tokens))]
            if len(starts):
                same = (np.asarray(self.tokens[starts[:, None] + span]) == query).all(axis=1)  # (candidates,)
                if same.any():
                    return int(starts[np.argmax(same)])
            c, size = stop, min(4 * size, cap)
        return None

    def match(self, completion) -> dict:
        """Longest verbatim span and n-gram overlap of `completion` (token ids) with the tokens."""
        c = np.asarray(completion, dtype=np.int64)
        n, m = self.n, len(c)
        count = m - n + 1
        if count <= 0:
            return {"tokens": m, "ngrams": 0, "ngrams_found": 0, "overlap": None,
                    "longest_span": 0, "longest_span_start": None, "train_position": None}
        lo, hi = self.ranges(ngram_hashes(c, n))
        candidates = hi - lo  # per n-gram: an upper bound on its occurrences

        def occurs(i: int, j: int) -> int | None:
            """Where c[i:j] (j - i >= n) occurs, checked through its rarest n-gram."""
            r = i + int(np.argmin(candidates[i : j - n + 1]))
            return self.find(c[i:j], int(lo[r]), int(hi[r]), r - i)

        found = np.array([candidates[i] > 0 and occurs(i, i + n) is not None for i in range(count)])
        # Two pointers: c[i:j] occurs => every piece of it occurs, so as i moves right, j never
        # has to move left. O(m) occurrence checks find the longest span exactly.
        best, best_i, best_pos, j = 0, None, None, 0
        for i in range(count):
            if not found[i]:
                continue
            j = max(j, i + n)
            pos = occurs(i, j)
            while j < m:
                nxt = occurs(i, j + 1)
                if nxt is None:
                    break
                j, pos = j + 1, nxt
            if j - i > best:
                best, best_i, best_pos = j - i, i, pos
        return {
            "tokens": m,
            "ngrams": count,
            "ngrams_found": int(found.sum()),
            "overlap": float(found.mean()),
            "longest_span": best,
            "longest_span_start": best_i,
            "train_position": best_pos,
        }
