"""`tinystories serve` against a real uvicorn server on 127.0.0.1: the OpenAI-style API, streamed
and not, its refusals, 20 concurrent streams, seeds; plus the request validation on its own.

The server is the real command (`python -m tinystories serve --port 0`) in a subprocess, started
once per module with a tiny random model and a BPE trained on a few hundred real stories. Its
answers are checked against `generate` run in this process with the same seed: the server must
write exactly what the library writes, alone or with 19 other streams running beside it.
"""

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tinystories.checkpoint import load_checkpoint, save_checkpoint
from tinystories.config import ModelConfig
from tinystories.decoding import decode_dtype
from tinystories.generate import generate
from tinystories.model import GPT
from tinystories.serve import ApiError, parse_completion_request
from tinystories.tokenizer import train_bpe

from conftest import REPO, TINYSTORIES_DIR, read_stories

CAP = 64  # the server's --max-tokens-cap in these tests
PROMPT = "Once upon a time, there was a little dog named"


# -----------------------------------------------------------------------------
# The server, shared by the tests of a module (test_page.py imports these fixtures)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random 2-layer GPT and a 512-token BPE trained on 300 real stories, saved as a checkpoint."""
    stories = read_stories(TINYSTORIES_DIR / "TinyStories-train.head.txt", limit=300)
    tokenizer = train_bpe(stories, 512, show_progress=False)
    torch.manual_seed(0)
    config = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=tokenizer.vocab_size, dropout=0.0)
    return save_checkpoint(tmp_path_factory.mktemp("serve") / "tiny-random", GPT(config), tokenizer)


class Server:
    def __init__(self, process, port, log):
        self.process, self.port, self.log = process, port, log

    def request(self, method, path, body=None, timeout=60):
        """(status, headers, body bytes) of one request on a fresh connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def complete(self, **fields):
        status, headers, body = self.request("POST", "/v1/completions", fields)
        return status, headers, json.loads(body)


@contextlib.contextmanager
def running_server(checkpoint, log, *flags, env=None):
    """`tinystories serve --port 0 FLAGS` in a subprocess, stopped on exit."""
    with open(log, "w") as out:  # a file, not a pipe: a pipe nobody reads would fill up and block the server
        process = subprocess.Popen(
            [sys.executable, "-m", "tinystories", "serve", "--checkpoint", str(checkpoint), "--port", "0",
             "--device", "cpu", *map(str, flags)],
            stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=None if env is None else {**os.environ, **env},
        )
    try:
        port = _wait_for_port(process, log)
        server = Server(process, port, log)
        _wait_until_healthy(server, process, log)
        yield server
    finally:
        stop(process)


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    """The server the module's tests share."""
    with running_server(tiny_checkpoint, tmp_path_factory.mktemp("serve-log") / "server.log",
                        "--max-tokens-cap", CAP) as server:
        yield server


def _wait_for_port(process, log, timeout=180) -> int:
    """The port from the server's first line: `... at http://127.0.0.1:PORT/ ...`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text()
        if "http://127.0.0.1:" in text:
            return int(text.split("http://127.0.0.1:", 1)[1].split("/", 1)[0])
        if process.poll() is not None:
            pytest.fail(f"tinystories serve exited with {process.returncode}:\n{text}")
        time.sleep(0.1)
    pytest.fail(f"tinystories serve printed no address within {timeout} s:\n{log.read_text()}")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM (the server's own shutdown), then SIGKILL if it has not gone within 20 s."""
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _wait_until_healthy(server, process, log, timeout=60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if server.request("GET", "/health", timeout=5)[0] == 200:
                return
        except OSError:
            pass
        if process.poll() is not None:
            pytest.fail(f"tinystories serve exited with {process.returncode}:\n{log.read_text()}")
        time.sleep(0.1)
    pytest.fail(f"tinystories serve did not answer /health within {timeout} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def local(tiny_checkpoint):
    """The same checkpoint loaded in this process: the oracle for what the server should write."""
    return load_checkpoint(tiny_checkpoint)


def local_text(local, prompt, max_tokens, seed, temperature=1.0, top_p=None, top_k=None) -> tuple[str, str, int]:
    """(text, finish_reason, completion_tokens) that `generate` gives with the server's seeding."""
    tok = local.tokenizer
    threads = torch.get_num_threads()
    # One thread: a 2-layer model's steps are too small to split, and on a busy 2-core machine
    # OpenMP's spinning threads make each step ~40x slower (measured: 0.03 s vs 1.3 s for 48 tokens).
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            (tokens,) = generate(local.model, [tok.encode(prompt)], max_tokens, temperature=temperature,
                                 top_p=top_p, top_k=top_k, eot_id=tok.eot_id,
                                 generator=torch.Generator().manual_seed(seed),
                                 dtype=decode_dtype(torch.device("cpu"), "auto"))  # the server's (--dtype auto)
    finally:
        torch.set_num_threads(threads)
    ended = bool(tokens) and tokens[-1] == tok.eot_id
    return tok.decode(tokens[:-1] if ended else tokens), "stop" if ended else "length", len(tokens)


# -----------------------------------------------------------------------------
# Reading server-sent events strictly


def read_sse(response) -> list:
    """Every event of a `text/event-stream` body, checked to be `data: ...` + blank line; JSON decoded.

    Returns the decoded chunks, with the final "[DONE]" kept as the string itself. Fails on
    anything after [DONE], a missing [DONE], or an event that is not one `data:` line.
    """
    raw = response.read().decode("utf-8")
    assert raw.endswith("\n\n"), f"the stream does not end with a complete event: {raw[-200:]!r}"
    events = raw[:-2].split("\n\n")
    out = []
    for event in events:
        assert event.startswith("data: ") and "\n" not in event, f"malformed event {event[:200]!r}"
        payload = event[len("data: "):]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    assert out and out[-1] == "[DONE]", "the stream does not end with data: [DONE]"
    assert "[DONE]" not in out[:-1], "[DONE] before the end of the stream"
    return out


def stream_completion(port, timeout=120, **fields):
    """(status, content type, events) of a streamed completion over http.client."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/completions", body=json.dumps({**fields, "stream": True}),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type"), read_sse(response)
    finally:
        conn.close()


def check_stream(events, max_tokens) -> tuple[str, str, dict | None]:
    """Check the chunks' OpenAI shape; (joined text, finish_reason, usage or None)."""
    chunks = events[:-1]
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("cmpl-")
    assert all(c["object"] == "text_completion" for c in chunks)
    text_chunks = [c for c in chunks if c["choices"]]
    finishes = [c["choices"][0]["finish_reason"] for c in text_chunks]
    assert all(f is None for f in finishes[:-1]) and finishes[-1] in ("stop", "length"), finishes
    assert all(c["choices"][0]["index"] == 0 for c in text_chunks)
    usage_chunks = [c for c in chunks if not c["choices"]]
    usage = usage_chunks[0]["usage"] if usage_chunks else None
    if usage is not None:
        assert chunks[-1] is usage_chunks[0], "the usage chunk must come last"
        assert 1 <= usage["completion_tokens"] <= max_tokens
    return "".join(c["choices"][0]["text"] for c in text_chunks), finishes[-1], usage


# -----------------------------------------------------------------------------
# The API


def test_health_models_and_page(server, tiny_checkpoint):
    status, _, body = server.request("GET", "/health")
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok"
    assert health["model"] == "tiny-random" and health["max_tokens_cap"] == CAP and health["tokenizer"] == "bpe-512"
    assert health["concurrency"] == 16 and health["running"] >= 0 and health["waiting"] >= 0
    assert health["max_prompt_tokens"] == health["block_size"] == 64  # the default cap: the model's block_size

    status, _, body = server.request("GET", "/v1/models")
    assert status == 200 and [m["id"] for m in json.loads(body)["data"]] == ["tiny-random"]

    status, headers, body = server.request("GET", "/")
    page = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "/v1/completions" in page and 'id="go"' in page
    # offline machines: the page must not pull scripts, styles or fonts from anywhere else
    assert "src=\"http" not in page and "href=\"http" not in page and "@import" not in page


def test_plain_completion_is_what_generate_writes(server, local):
    status, _, body = server.complete(model="anything", prompt=PROMPT, max_tokens=40, temperature=0.9, seed=7)
    assert status == 200
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert isinstance(body["created"], int) and body["model"] == "tiny-random"
    (choice,) = body["choices"]
    text, finish, n_tokens = local_text(local, PROMPT, 40, seed=7, temperature=0.9)
    assert (choice["text"], choice["finish_reason"], choice["index"]) == (text, finish, 0)
    prompt_tokens = len(local.tokenizer.encode(PROMPT))
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": n_tokens,
                             "total_tokens": prompt_tokens + n_tokens}
    assert finish == "stop" or n_tokens == 40


def test_greedy_with_top_k_and_top_p(server, local):
    _, _, body = server.complete(prompt="The cat", max_tokens=30, temperature=0, top_k=5, top_p=0.5)
    assert body["choices"][0]["text"] == local_text(local, "The cat", 30, seed=0, temperature=0.0, top_k=5,
                                                    top_p=0.5)[0]


def test_streamed_completion_is_well_formed_and_equals_the_plain_one(server):
    fields = dict(prompt=PROMPT, max_tokens=CAP, temperature=1.0, seed=3)
    status, content_type, events = stream_completion(server.port, **fields, stream_options={"include_usage": True})
    assert status == 200 and content_type.startswith("text/event-stream")
    text, finish, usage = check_stream(events, CAP)
    assert len(events) > 3, "a story streamed in one piece is not a stream"

    _, _, plain = server.complete(**fields)
    assert text == plain["choices"][0]["text"] and finish == plain["choices"][0]["finish_reason"]
    assert usage == plain["usage"]


def test_seed_gives_the_same_story_and_no_seed_does_not(server):
    def text(**extra):
        return server.complete(prompt=PROMPT, max_tokens=32, **extra)[2]["choices"][0]["text"]

    assert text(seed=11) == text(seed=11)
    assert text(seed=11) != text(seed=12)
    assert text() != text()  # without a seed each request draws a fresh one


@pytest.mark.parametrize("fields, param", [
    (dict(temperature=-3), "temperature"),
    (dict(temperature="hot"), "temperature"),
    (dict(temperature=10**400), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(prompt=""), "prompt"),
    (dict(prompt=[1, 2, 3]), "prompt"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=CAP + 1), "max_tokens"),
    (dict(seed="x"), "seed"),
    (dict(stream="yes"), "stream"),
    (dict(stop=["\n"]), "stop"),
    (dict(n=2), "n"),
    (dict(max_token=10), "max_token"),  # a typo must not pass silently
])
def test_bad_requests_get_a_400_that_says_what_is_wrong(server, fields, param):
    status, headers, body = server.complete(**{"prompt": PROMPT, **fields})
    assert status == 400 and headers["content-type"] == "application/json"
    error = body["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert param in error["message"]


def test_temperature_minus_3_message(server):
    status, _, body = server.complete(prompt=PROMPT, temperature=-3)
    assert status == 400
    assert body["error"]["message"] == "temperature must be a number from 0 to 2 (0 means greedy), got -3"


def test_max_tokens_over_the_cap_names_the_cap(server):
    _, _, body = server.complete(prompt=PROMPT, max_tokens=10_000)
    assert f"({CAP}, its --max-tokens-cap)" in body["error"]["message"]


def test_a_prompt_over_the_token_cap_is_refused_in_one_line(server, local):
    """The default cap is the model's block_size (64 here): one token more is a 400 that says so in
    one line, in OpenAI's shape with its code for it, completions and chat alike; 64 tokens pass."""
    ids = local.tokenizer.encode(" ".join(read_stories(TINYSTORIES_DIR / "TinyStories-valid.head.txt", limit=3)))
    fits, over = local.tokenizer.decode(ids[:64]), local.tokenizer.decode(ids[:65])
    assert len(local.tokenizer.encode(fits)) == 64 and len(local.tokenizer.encode(over)) == 65
    status, _, body = server.complete(prompt=fits, max_tokens=2)
    assert status == 200 and body["usage"]["prompt_tokens"] == 64
    status, headers, body = server.complete(prompt=over, max_tokens=2)
    error = body["error"]
    assert status == 400 and headers["content-type"] == "application/json"
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "prompt", "context_length_exceeded")
    assert "\n" not in error["message"]
    assert error["message"].startswith("prompt has 65 tokens; the most this server takes is 64 (its --max-prompt-tokens")
    status, _, body = server.request("POST", "/v1/chat/completions",
                                     {"messages": [{"role": "user", "content": over}], "max_tokens": 2})
    error = json.loads(body)["error"]
    assert status == 400 and error["param"] == "messages" and error["code"] == "context_length_exceeded"


def test_not_json_and_unknown_routes_get_openai_shaped_errors(server):
    status, _, body = server.request("POST", "/v1/completions", b'{"prompt": ')
    assert status == 400 and "not valid JSON" in json.loads(body)["error"]["message"]
    status, _, body = server.request("POST", "/v1/completions", b" " * (1 << 20) + b'{"prompt": "a"}')
    assert status == 413 and "larger than" in json.loads(body)["error"]["message"]
    status, _, body = server.request("GET", "/v1/nothing")
    assert status == 404 and json.loads(body)["error"]["type"] == "not_found_error"
    status, _, body = server.request("GET", "/v1/completions")
    assert status == 405 and "error" in json.loads(body)


def test_twenty_concurrent_streams_are_each_what_a_lone_request_writes(server, local):
    """One batch of 16 slots (4 streams wait for one): every stream equals `generate` alone with its
    seed, whatever ran beside it."""
    n = 20
    # different prompt lengths and seeds, so a cache shared or mixed up between requests would show
    prompts = [" ".join(PROMPT.split()[: 2 + i % 8]) for i in range(n)]
    results: list = [None] * n

    def one(i):
        try:
            results[i] = stream_completion(server.port, prompt=prompts[i], max_tokens=48, seed=100 + i,
                                           stream_options={"include_usage": True})
        except Exception as e:  # reported below, with the others
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    # the model works in the scheduler's thread, so the server answers while 20 streams are being written
    t0 = time.perf_counter()
    assert server.request("GET", "/health", timeout=30)[0] == 200
    health_s = time.perf_counter() - t0
    for t in threads:
        t.join(timeout=300)
    wall = time.perf_counter() - start

    tokens = 0
    for i, result in enumerate(results):
        assert not isinstance(result, Exception), f"stream {i} failed: {result!r}"
        status, content_type, events = result
        assert status == 200 and content_type.startswith("text/event-stream")
        text, finish, usage = check_stream(events, 48)
        assert (text, finish, usage["completion_tokens"]) == local_text(local, prompts[i], 48, seed=100 + i), \
            f"stream {i} differs from the same request made alone"
        tokens += usage["completion_tokens"]
    print(f"\n20 concurrent streams: {tokens} tokens in {wall:.2f} s ({tokens / wall:.0f} tokens/s); "
          f"/health answered in {health_s * 1000:.0f} ms meanwhile")


def test_a_client_that_leaves_mid_stream_does_not_hurt_the_server(server):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    body = json.dumps({"prompt": PROMPT, "max_tokens": CAP, "stream": True}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    sock.close()  # gone after the first bytes
    status, _, events = stream_completion(server.port, prompt=PROMPT, max_tokens=8, seed=1)
    assert status == 200 and events[-1] == "[DONE]"


@pytest.mark.slow
def test_a_client_that_leaves_frees_its_worker(tiny_checkpoint, tmp_path):
    """With one slot, a request queued behind a long stream waits; once that client leaves, it does not."""
    def small_request_seconds(server):
        t0 = time.perf_counter()
        assert server.complete(prompt="Hi", max_tokens=4)[0] == 200
        return time.perf_counter() - t0

    def open_long_stream(server):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
        body = json.dumps({"prompt": PROMPT, "max_tokens": 2000, "temperature": 0, "stream": True}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        return sock

    # One OpenMP thread: on a busy machine two threads spinning at every step of this tiny model
    # make the stream ~10x slower (seen: 21 s instead of ~1 s), which would only slow the test.
    with running_server(tiny_checkpoint, tmp_path / "server.log", "--concurrency", 1, "--max-tokens-cap", 2000,
                        env={"OMP_NUM_THREADS": "1"}) as server:
        small_request_seconds(server)  # warm up
        sock = open_long_stream(server)
        behind = small_request_seconds(server)  # waits for the 2,000 tokens
        sock.close()
        sock = open_long_stream(server)
        sock.close()
        time.sleep(0.2)  # the server notices the disconnect; the worker stops at its next token
        after = small_request_seconds(server)
    print(f"\nsmall request: {behind:.2f} s behind a running stream, {after:.2f} s after its client left")
    assert after < behind / 3, f"{after:.2f} s after the client left vs {behind:.2f} s behind a running stream"


# -----------------------------------------------------------------------------
# The command's own errors


def test_a_busy_port_is_a_one_line_error(tiny_checkpoint):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "tinystories", "serve", "--checkpoint", str(tiny_checkpoint),
                                 "--port", str(port)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"tinystories serve: error: port {port} on 127.0.0.1 is already in use; "
                                     "pick another with --port (--port 0 picks a free one)")


def test_the_address_is_printed_once_the_server_listens(tiny_checkpoint):
    """A client that connects as soon as it reads the address line is never refused: the line comes
    after uvicorn's startup (after the device line), when the socket listens."""
    for _ in range(3):
        process = subprocess.Popen([sys.executable, "-m", "tinystories", "serve", "--checkpoint", str(tiny_checkpoint),
                                    "--port", "0", "--device", "cpu"],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
        deadline = threading.Timer(120, process.kill)  # no address by then: stdout ends, and the test fails
        deadline.start()
        try:
            lines = []
            for line in process.stdout:  # the server's stdout: the device line, then the address
                lines.append(line)
                if "http://127.0.0.1:" in line:
                    break
            assert lines and "http://127.0.0.1:" in lines[-1], f"no address line: {lines}"
            port = int(lines[-1].split("http://127.0.0.1:", 1)[1].split("/", 1)[0])
            socket.create_connection(("127.0.0.1", port), timeout=10).close()  # refused would raise
            assert any(line.startswith("tinystories serve: device ") for line in lines[:-1]), lines
        finally:
            deadline.cancel()
            stop(process)
            process.stdout.close()


@pytest.mark.slow
def test_the_long_prompt_benchmark_runs_end_to_end(tmp_path):
    """bench/serve.py --long-prompt (a short request's time to first token alone and beside a
    maximal prompt) at tiny sizes: the script works; what it measures is BENCHMARKS.md's."""
    r = subprocess.run([sys.executable, "bench/serve.py", "--long-prompt", "--quick"], cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "ours: the maximal prompt has 64 tokens" in r.stdout  # the cap of the quick model's block_size
    assert "round 1 ours" in r.stdout and "the same text alone and beside: yes" in r.stdout, r.stdout


def test_an_unusable_dtype_fails_before_the_model_is_loaded(tmp_path, monkeypatch, capfd):
    # --dtype int8 where it cannot run (as on a GPU) is refused at once, not after a full load: the
    # checkpoint named here does not exist, and the error is the dtype's, not the checkpoint's
    import tinystories.decoding
    from tinystories.cli import main

    monkeypatch.setattr(tinystories.decoding, "int8_supported", lambda: False)
    assert main(["serve", "--checkpoint", str(tmp_path / "none"), "--port", "0", "--device", "cpu",
                 "--dtype", "int8"]) == 2
    err = capfd.readouterr().err
    assert "--dtype int8 needs PyTorch's fbgemm kernels" in err and "does not exist" not in err


# -----------------------------------------------------------------------------
# Validation without a server


def test_request_defaults():
    req = parse_completion_request({"prompt": ["Once"]}, max_tokens_cap=100)
    assert (req.prompt, req.max_tokens, req.temperature, req.top_p, req.top_k, req.seed, req.stream) == \
        ("Once", 100, 1.0, None, None, None, False)
    assert parse_completion_request({"prompt": "a"}, max_tokens_cap=1000).max_tokens == 256
    # neutral values of fields we do not implement are accepted, as OpenAI clients often send them
    req = parse_completion_request({"prompt": "a", "top_p": 1, "seed": -1, "n": 1, "stop": None, "echo": False,
                                    "frequency_penalty": 0, "user": "me", "model": "gpt-3.5-turbo-instruct"}, 100)
    assert req.top_p is None and req.seed == 2**64 - 1


@pytest.mark.parametrize("body", [None, [], "prompt", {"prompt": "a", "temperature": float("nan")},
                                  {"prompt": "a", "temperature": True}, {"prompt": "a", "max_tokens": 2.0},
                                  {"prompt": "a", "stream_options": {"include_usage": 1}},
                                  {"prompt": "a" * 100_001}])
def test_request_refusals(body):
    with pytest.raises(ApiError) as e:
        parse_completion_request(body, max_tokens_cap=100)
    assert e.value.status == 400 and e.value.message
