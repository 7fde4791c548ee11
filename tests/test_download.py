"""The `hf` source against a real HTTP server on 127.0.0.1 laid out like the hub.

The server answers `/datasets/roneneldan/TinyStories/resolve/main/<file>` as the hub does for a
Git LFS file: a redirect carrying X-Linked-Size and X-Linked-Etag (the sha256), to a storage URL
that serves the bytes with Range support. The official V1 names map to the shared head files.
Misbehaviours on demand: a connection cut halfway through the body, corrupted bytes.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import time
from pathlib import Path

import pytest

from tinystories import download as D
from tinystories.cli import main
from tinystories.errors import UserError
from tinystories.prepare import prepare

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FILES = {  # official name -> the shared file that stands in for it
    "TinyStories-train.txt": SHARED / "tinystories" / "TinyStories-train.head.txt",
    "TinyStories-valid.txt": SHARED / "tinystories" / "TinyStories-valid.head.txt",
}
RESOLVE = "/datasets/roneneldan/TinyStories/resolve/main/"


class Hub(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.files = {name: path.read_bytes() for name, path in FILES.items()}
        self.cut_once: set[str] = set()  # names whose next full download stops halfway
        self.corrupt: set[str] = set()  # names served with one byte flipped
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class HubHandler(http.server.BaseHTTPRequestHandler):
    server: Hub

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        self.server.requests.append((self.path, self.headers.get("Range")))
        if self.path.startswith(RESOLVE):
            name = self.path[len(RESOLVE):]
            if name not in self.server.files:
                return self.send_error(404)
            data = self.server.files[name]
            self.send_response(302)
            self.send_header("Location", f"/storage/{name}")
            self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("X-Linked-Etag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("ETag", '"0123456789abcdef0123456789abcdef01234567"')  # a git sha1, not the file's
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path.startswith("/storage/"):
            name = self.path[len("/storage/"):]
            data = self.server.files[name]
            if name in self.server.corrupt:
                data = data[:1000] + bytes([data[1000] ^ 1]) + data[1001:]
            start = 0
            if self.headers.get("Range"):
                start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
                if start >= len(data):
                    return self.send_error(416)
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if name in self.server.cut_once and start == 0:
                self.server.cut_once.discard(name)
                self.wfile.write(body[: len(body) // 2])  # then the connection closes (HTTP/1.0)
                return
            self.wfile.write(body)
        else:
            self.send_error(404)


@pytest.fixture(autouse=True)
def not_offline(monkeypatch):
    """test_export and test_neo set HF_HUB_OFFLINE for the whole session (at import, so that
    transformers never reaches for the network); the downloads tested here must not see it."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


@pytest.fixture
def hub(monkeypatch):
    server = Hub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("TINYSTORIES_GPT2_VOCAB", str(SHARED / "gpt2"))
    monkeypatch.setenv("TINYSTORIES_CACHE", str(tmp_path / "cache"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def storage_requests(hub: Hub) -> list[str | None]:
    return [rng for path, rng in hub.requests if path.startswith("/storage/")]


# -----------------------------------------------------------------------------


def test_hf_download_then_offline_from_cache(hub, tmp_path, capsys):
    args = ["prepare", "--source", "hf", "--dataset", "v1", "--max-stories", "300", "--out"]
    assert main([*args, str(tmp_path / "A")]) == 0
    cached = tmp_path / "cache" / "hf" / "datasets" / "roneneldan" / "TinyStories"
    for name, shared in FILES.items():
        assert (cached / name).read_bytes() == shared.read_bytes()
        info = json.loads((cached / f"{name}.json").read_text())
        assert info["sha256"] == sha256(shared) and info["verified_sha256"] is True
    meta = json.loads((tmp_path / "A" / "meta.json").read_text())
    assert [(s["split"], s["url"], s["sha256"]) for s in meta["sources"]] == [
        ("train", f"{hub.endpoint}{RESOLVE}TinyStories-train.txt", sha256(FILES["TinyStories-train.txt"])),
        ("test", f"{hub.endpoint}{RESOLVE}TinyStories-valid.txt", sha256(FILES["TinyStories-valid.txt"])),
    ]
    assert meta["splits"]["test"]["stories"] == 1000  # the validation file is the test split
    assert len(storage_requests(hub)) == 2

    hub.shutdown()  # no server any more: the second run must not need the network
    hub.server_close()
    capsys.readouterr()
    assert main([*args, str(tmp_path / "B")]) == 0
    assert capsys.readouterr().err == ""
    for name in ("meta.json", "train.bin", "val.bin", "test.bin"):
        assert (tmp_path / "A" / name).read_bytes() == (tmp_path / "B" / name).read_bytes()


def test_download_cut_halfway_resumes_with_range(hub, tmp_path):
    name = "TinyStories-valid.txt"
    size = len(hub.files[name])
    hub.cut_once.add(name)
    dest = tmp_path / "cache" / name
    # retries=0: the first try ends with the error, keeping the half it got
    with pytest.raises(UserError, match="run the same command again to resume"):
        D.download(D.hf_url(name), dest, retries=0)
    part = dest.with_name(name + ".part")
    assert part.stat().st_size == size // 2 and not dest.exists()
    # the next try asks only for the rest, and the joined file verifies
    got = D.download(D.hf_url(name), dest, retries=0)
    assert storage_requests(hub) == [None, f"bytes={size // 2}-"]
    assert got.bytes == size and got.verified_sha256 and got.sha256 == sha256(FILES[name])
    assert dest.read_bytes() == FILES[name].read_bytes() and not part.exists()


def test_download_cut_halfway_is_retried_within_one_run(hub, tmp_path, capsys):
    name = "TinyStories-train.txt"
    hub.cut_once.add(name)
    got = D.download(D.hf_url(name), tmp_path / name, retries=2, backoff_s=0)
    assert got.sha256 == sha256(FILES[name])
    assert storage_requests(hub) == [None, f"bytes={len(hub.files[name]) // 2}-"]
    assert "resuming" in capsys.readouterr().err


def test_corrupted_download_is_detected_and_deleted(hub, tmp_path, capsys):
    hub.corrupt.add("TinyStories-valid.txt")
    with pytest.raises(UserError, match="corrupted: its sha256"):
        D.download(D.hf_url("TinyStories-valid.txt"), tmp_path / "v.txt")
    assert list(tmp_path.iterdir()) == []  # neither the file nor its .part stays

    # the same through the command line: one line, exit 2, no data folder
    code = main(["prepare", "--source", "hf", "--dataset", "v1", "--out", str(tmp_path / "D")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "corrupted" in err
    assert not (tmp_path / "D").exists()


def test_resume_of_a_corrupted_part_is_detected(hub, tmp_path):
    name = "TinyStories-valid.txt"
    dest = tmp_path / name
    part = dest.with_name(name + ".part")
    data = FILES[name].read_bytes()
    part.write_bytes(b"X" + data[1:1000])  # a .part whose first byte went bad
    with pytest.raises(UserError, match="corrupted"):
        D.download(D.hf_url(name), dest)
    assert storage_requests(hub) == ["bytes=1000-"] and not part.exists() and not dest.exists()


def test_offline_without_cache_fails_fast_with_advice(hub, tmp_path, capsys):
    endpoint = hub.endpoint
    hub.shutdown()
    hub.server_close()  # nothing listens on that port any more: connection refused
    t = time.perf_counter()
    code = main(["prepare", "--source", "hf", "--dataset", "v2", "--out", str(tmp_path / "D")])
    err = capsys.readouterr().err
    assert code == 2 and time.perf_counter() - t < 10
    assert err.count("\n") == 1 and "cannot reach" in err and "--source FOLDER" in err
    assert "TinyStoriesV2-GPT4-train.txt" in err and endpoint.removeprefix("http://") in err
    assert not (tmp_path / "D").exists()


def test_hf_hub_offline_forbids_the_network(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
        D.fetch_hf("v1", tmp_path)
    assert hub.requests == []


def test_missing_file_on_the_server(hub, tmp_path):
    with pytest.raises(UserError, match="HTTP 404"):
        D.fetch_hf("v2", tmp_path)  # our hub only has the V1 names


def test_plain_url_source_without_sha256(tmp_path):
    """Any web server works as --source URL; with no sha256 in its headers, the size is checked."""
    folder = FILES["TinyStories-train.txt"].parent

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(folder), **kw)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/TinyStories-valid.head.txt"
        meta = prepare(url, tmp_path / "D", max_stories=100)
        got = D.fetch_url(url, D.cache_dir())  # now cached
    finally:
        server.shutdown()
        server.server_close()
    assert got.verified_sha256 is False and got.sha256 == sha256(folder / "TinyStories-valid.head.txt")
    assert meta["sources"][0]["url"] == url and meta["sources"][0]["sha256"] == got.sha256
    assert meta["splits"]["train"]["stories"] + meta["splits"]["val"]["stories"] == 100


def test_damaged_cache_entry_is_downloaded_again(hub, tmp_path, capsys):
    name = "TinyStories-valid.txt"
    dest = tmp_path / name
    D.download(D.hf_url(name), dest)
    dest.write_bytes(dest.read_bytes()[:-10])  # truncated behind our back
    got = D.download(D.hf_url(name), dest)
    assert dest.read_bytes() == FILES[name].read_bytes() and got.bytes == dest.stat().st_size
    assert "damaged" in capsys.readouterr().err
    assert len(storage_requests(hub)) == 2


def test_cached_file_changed_in_place_is_refused_by_prepare(hub, tmp_path, capsys):
    args = ["prepare", "--source", "hf", "--dataset", "v1", "--max-stories", "50", "--test", "none", "--out"]
    assert main([*args, str(tmp_path / "A")]) == 0
    cached = tmp_path / "cache" / "hf" / "datasets" / "roneneldan" / "TinyStories" / "TinyStories-train.txt"
    data = bytearray(cached.read_bytes())
    data[500] ^= 1  # same size, different bytes
    cached.write_bytes(bytes(data))
    capsys.readouterr()
    assert main([*args, str(tmp_path / "B")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no longer matches" in err and not (tmp_path / "B").exists()


def test_prepare_resumes_a_cut_download_by_itself(hub, tmp_path, capsys):
    name = "TinyStories-train.txt"
    hub.cut_once.add(name)
    code = main(["prepare", "--source", "hf", "--dataset", "v1", "--test", "none", "--max-stories", "50",
                 "--out", str(tmp_path / "D")])
    assert code == 0, capsys.readouterr().err
    half = len(hub.files[name]) // 2
    assert storage_requests(hub) == [None, f"bytes={half}-"]  # the second request asked for the rest only
    meta = json.loads((tmp_path / "D" / "meta.json").read_text())
    assert meta["sources"][0]["sha256"] == sha256(FILES[name])
