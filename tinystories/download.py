"""Downloads for `tinystories prepare`: the official TinyStories files, resumable, verified, cached.
(`tinystories quality --prompts paper` fetches the paper's evaluation prompts the same way.)

    files = fetch_hf("v2")                  # {"train": Downloaded, "test": Downloaded}
    d = fetch_hf_file("Evaluation prompts.yaml", cache_dir())   # any other file of the dataset repo
    d = download(url, cache_dir() / "url" / "x" / "stories.txt")
    d.path, d.sha256, d.bytes, d.url

Where files come from: `{HF_ENDPOINT or https://huggingface.co}/datasets/roneneldan/TinyStories/
resolve/main/<file>` (the hub's URL layout; `HF_ENDPOINT` points it at a mirror). Where they land:
`--cache-dir`, else $TINYSTORIES_CACHE, else ~/.cache/tinystories. A file is only ever in the cache
complete and verified, with a `<file>.json` sidecar (url, size, sha256), so a second run reads it
without touching the network (`HF_HUB_OFFLINE=1` forbids the network outright).

How a download goes:
- bytes stream into `<file>.part`; a broken connection is retried with an HTTP `Range` request from
  where the `.part` ends (here, up to `retries` times, and by the next run if those fail too);
- the hub answers a `resolve` URL with a redirect carrying `X-Linked-Size` and `X-Linked-Etag`, the
  size and sha256 of the file (Git LFS). Those are checked; a server that sends no sha256 in its
  ETag gets the size check only. A mismatch deletes the `.part` and stops with an error;
- only then is `.part` renamed to its final name.

Why urllib and not `huggingface_hub`: the stdlib does everything needed here in ~200 readable lines
(one GET with Range, the redirect headers, a streaming sha256), adds no dependency to the core
package (huggingface_hub comes only with the optional `transformers` extra), and the cache stays a
plain folder of the official files that a user can fill by hand on an offline machine.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tinystories.errors import UserError, one_line

HF_REPO = "roneneldan/TinyStories"
HF_DEFAULT_ENDPOINT = "https://huggingface.co"
# The official files of each dataset version: "train", and the validation file that becomes "test".
HF_FILES = {
    "v1": {"train": "TinyStories-train.txt", "test": "TinyStories-valid.txt"},
    "v2": {"train": "TinyStoriesV2-GPT4-train.txt", "test": "TinyStoriesV2-GPT4-valid.txt"},
}
CACHE_ENV = "TINYSTORIES_CACHE"
BLOCK = 1 << 20  # bytes read from the socket at a time


@dataclass(frozen=True)
class Downloaded:
    path: Path  # the complete, verified file in the cache
    url: str  # where its bytes came from
    sha256: str
    bytes: int
    verified_sha256: bool  # True when the server told us the sha256 and it matched


def cache_dir(explicit=None) -> Path:
    """--cache-dir, else $TINYSTORIES_CACHE, else ~/.cache/tinystories."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path.home() / ".cache" / "tinystories"


def hf_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or HF_DEFAULT_ENDPOINT).rstrip("/")


def hf_url(filename: str) -> str:
    return f"{hf_endpoint()}/datasets/{HF_REPO}/resolve/main/{urllib.parse.quote(filename)}"


def offline_mode() -> bool:
    """The hub's own switch for "never touch the network"."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def fetch_hf(dataset: str, cache: Path, splits=("train", "test"), *, retries: int = 3,
             progress: bool | None = None) -> dict[str, Downloaded]:
    """The official files of `dataset` ("v1" or "v2"), from the cache or downloaded into it."""
    names = HF_FILES[dataset]
    hint = (
        f"if this machine is offline, fetch {' and '.join(names[s] for s in splits)} from "
        f"https://huggingface.co/datasets/{HF_REPO} elsewhere and run `tinystories prepare --source FOLDER` "
        "on the folder holding them (or set HF_ENDPOINT to a reachable mirror)"
    )
    return {
        split: fetch_hf_file(names[split], cache, retries=retries, progress=progress, offline_hint=hint)
        for split in splits
    }


def fetch_hf_file(filename: str, cache: Path, *, retries: int = 3, progress: bool | None = None,
                  offline_hint: str = "") -> Downloaded:
    """One file of the dataset repo (e.g. `Evaluation prompts.yaml`), from the cache or downloaded into it."""
    folder = cache / "hf" / "datasets" / HF_REPO
    return download(hf_url(filename), folder / filename, retries=retries, progress=progress,
                    offline_hint=offline_hint)


def fetch_url(url: str, cache: Path, *, retries: int = 3, progress: bool | None = None) -> Downloaded:
    """Any http(s) URL, cached under a folder named by the URL's hash (keeping the file name)."""
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    hint = "download the file yourself and pass its path to --source"
    return download(url, cache / "url" / key / name, retries=retries, progress=progress, offline_hint=hint)


# -----------------------------------------------------------------------------
# One file


def download(url: str, dest: Path, *, retries: int = 3, backoff_s: float = 1.0, timeout_s: float = 30.0,
             progress: bool | None = None, offline_hint: str = "") -> Downloaded:
    """`dest`, complete and verified: from the cache when it is there, else downloaded from `url`.

    Raises UserError when the server cannot be reached (at once, no retries: offline should fail
    fast), when the file is not there, when the bytes fail verification, or when the connection
    keeps breaking (the `.part` stays, so running again resumes).
    """
    dest = Path(dest)
    cached = _cached(dest)
    if cached is not None:
        return cached
    if offline_mode():
        raise UserError(f"{dest.name} is not in the cache {dest.parent} and HF_HUB_OFFLINE is set; {offline_hint}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            expected_size, expected_sha, sha = _fetch_into(url, part, timeout_s, progress, offline_hint)
            break
        except _Interrupted as e:
            have = part.stat().st_size if part.exists() else 0
            if attempt == retries:
                raise UserError(
                    f"the download of {url} broke off after {have:,} bytes ({e}); run the same command "
                    "again to resume it"
                ) from None
            print(f"connection lost after {have:,} bytes ({one_line(e)}); resuming", file=sys.stderr)
            time.sleep(backoff_s * (attempt + 1))

    size = part.stat().st_size
    problem = None
    if expected_size is not None and size != expected_size:
        problem = f"it has {size:,} bytes where the server announced {expected_size:,}"
    elif expected_sha is not None and sha != expected_sha:
        problem = f"its sha256 is {sha}, the server's is {expected_sha}"
    if problem:
        part.unlink()
        raise UserError(f"the download of {url} is corrupted: {problem}; it was deleted, run again to "
                        "download it afresh")

    info = {"url": url, "bytes": size, "sha256": sha, "verified_sha256": expected_sha is not None}
    # Sidecar first, then the rename: the file under its final name always has its sidecar.
    _write_json_atomic(_sidecar(dest), info)
    os.replace(part, dest)
    return Downloaded(dest, url, sha, size, expected_sha is not None)


def _sidecar(dest: Path) -> Path:
    return dest.with_name(dest.name + ".json")


def _cached(dest: Path) -> Downloaded | None:
    """The cached file, if it is there whole; a damaged entry is removed so it downloads again."""
    sidecar = _sidecar(dest)
    if not (dest.is_file() and sidecar.is_file()):
        return None
    try:
        info = json.loads(sidecar.read_text())
        if dest.stat().st_size == info["bytes"]:
            return Downloaded(dest, info["url"], info["sha256"], info["bytes"], info["verified_sha256"])
    except (ValueError, KeyError, TypeError):
        pass
    print(f"the cached {dest} is damaged; downloading it again", file=sys.stderr)
    dest.unlink()
    sidecar.unlink()
    return None


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


class _Interrupted(Exception):
    """The connection broke in the middle of the body: worth resuming."""


class _RecordRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects as usual, keeping the headers of each redirect response.

    The hub puts a file's real size and sha256 (X-Linked-Size, X-Linked-Etag) on the redirect from
    `resolve/main/...` to its storage; the storage's own answer may not carry them.
    """

    def __init__(self):
        self.headers = []

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.headers.append(headers)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_SHA256 = re.compile(r'^(?:W/)?"?([0-9a-f]{64})"?$')


def _sha_from_etag(value: str | None) -> str | None:
    """An ETag that is a sha256 (the hub's for LFS files), else None (e.g. a git blob sha1)."""
    m = _SHA256.match((value or "").strip().lower())
    return m.group(1) if m else None


def _fetch_into(url: str, part: Path, timeout_s: float, progress: bool | None, offline_hint: str):
    """Append the rest of `url` to `part`. Returns (expected size, expected sha256, actual sha256)."""
    from tqdm import tqdm

    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "tinystories-prepare", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    redirects = _RecordRedirects()
    opener = urllib.request.build_opener(redirects)
    try:
        resp = opener.open(urllib.request.Request(url, headers=headers), timeout=timeout_s)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # our .part is not a prefix of what the server has: start over
            part.unlink()
            return _fetch_into(url, part, timeout_s, progress, offline_hint)
        what = {404: "not found", 401: "access denied", 403: "access denied"}.get(e.code, e.reason)
        raise UserError(f"could not download {url}: HTTP {e.code} ({what}); {offline_hint}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise UserError(f"cannot reach {urllib.parse.urlparse(url).netloc} ({reason}); {offline_hint}") from None

    with resp:
        linked = {}
        for h in redirects.headers:  # the hub's LFS facts, from whichever redirect carried them
            for key in ("X-Linked-Size", "X-Linked-Etag"):
                if h.get(key):
                    linked[key] = h[key]
        if resp.status == 206:
            m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != offset:
                raise UserError(f"{url}: the server answered a resume request with a wrong range; "
                                f"delete {part} and run again")
            total = int(m.group(2)) if m.group(2) != "*" else None
        else:  # 200: the whole file (a server that ignores Range, or no .part yet)
            offset = 0
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        expected_size = int(linked["X-Linked-Size"]) if "X-Linked-Size" in linked else total
        expected_sha = _sha_from_etag(linked.get("X-Linked-Etag")) or _sha_from_etag(resp.headers.get("ETag"))

        if expected_size is not None:
            free = shutil.disk_usage(part.parent).free
            if expected_size - offset > free:
                raise UserError(f"{part.parent} has {free / 1e9:.1f} GB free; {part.name} needs "
                                f"{(expected_size - offset) / 1e9:.1f} GB more")
        h = hashlib.sha256()
        if offset:  # the hash covers the whole file: read back what we already have
            with open(part, "rb") as f:
                for block in iter(lambda: f.read(BLOCK), b""):
                    h.update(block)
        disable = None if progress is None else not progress  # None: a bar only on a terminal
        with open(part, "ab" if offset else "wb") as f, tqdm(
            total=expected_size, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
            desc=part.name[: -len(".part")], disable=disable, file=sys.stderr,
        ) as bar:
            while True:
                try:
                    block = resp.read(BLOCK)
                except (http.client.IncompleteRead, ConnectionError, socket.timeout, TimeoutError) as e:
                    # keep what did arrive: http.client hands over the partial block in `e.partial`
                    partial = getattr(e, "partial", b"")
                    f.write(partial)
                    h.update(partial)
                    raise _Interrupted(type(e).__name__) from None
                if not block:
                    break
                f.write(block)
                h.update(block)
                bar.update(len(block))
        got = part.stat().st_size
        if expected_size is not None and got < expected_size:
            raise _Interrupted("the server closed the connection early")
        return expected_size, expected_sha, h.hexdigest()
