"""The server and the tokenizers against hostile and broken input (issue 13), cause by cause:

- text that is not valid Unicode (lone surrogates), refused by both tokenizers' every encode
  method, by `generate --prompt` (one line, exit 2) and by the API (a 400);
- JSON nested deeper than the server reads, numbers out of torch's range or too small to compute
  with, values that cannot be echoed in UTF-8: 400s, never a 500;
- a declared body over the cap refused at once; idle, slow and surplus connections dropped while
  other clients are served: a real uvicorn server on 127.0.0.1 (in this process, with timeouts of
  about a second), real sockets, every wait bounded.

The application-level cases run in-process (Starlette's TestClient) with a tiny random model.
"""

import contextlib
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
import types

import pytest
import torch

from tinystories.checkpoint import save_checkpoint
from tinystories.config import ModelConfig
from tinystories.model import GPT
from tinystories.serve import (
    MAX_BODY_BYTES, MAX_JSON_DEPTH, ApiError, Engine, Limits, bind, create_app, json_depth, parse_completion_request,
    parse_json_body, uvicorn_config,
)
from tinystories.tokenizer import InvalidTextError, check_text, load_gpt2, train_bpe

from conftest import GPT2_DIR, REPO, TINYSTORIES_DIR, read_stories

CAP = 8
# Lone surrogates as Python holds them: U+DCFF is how Python decodes the byte 0xFF of a
# command-line argument that is not UTF-8; U+D800..U+DFFF also come from JSON "\udXXX" escapes.
BROKEN = ["Hi \udcff\udcfe there", "\ud800", "once upon a time\udfff", "é\udc80", "😀\udbff!"]
FINE = ["Once upon a time", "é, ü, ß", "a dragon 🐉 said hi", "\x00 and \ufffd"]


@pytest.fixture(scope="module")
def tokenizers():
    stories = read_stories(TINYSTORIES_DIR / "TinyStories-train.head.txt", limit=100)
    return {"gpt2": load_gpt2(GPT2_DIR), "bpe": train_bpe(stories, 300, show_progress=False)}


def tiny_model(vocab_size):
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=1, n_head=1, n_embd=8, block_size=16, vocab_size=vocab_size, dropout=0.0)).eval()


@pytest.fixture(scope="module")
def engine(tokenizers):
    tok = tokenizers["bpe"]
    engine = Engine(types.SimpleNamespace(model=tiny_model(tok.vocab_size), tokenizer=tok, path=TINYSTORIES_DIR),
                    "tiny", max_tokens_cap=CAP, concurrency=4)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def client(engine):
    from starlette.testclient import TestClient

    # raise_server_exceptions=False: a bug comes back as the 500 a client would get
    return TestClient(create_app(engine), raise_server_exceptions=False)


def post(client, raw: bytes):
    response = client.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    return response.status_code, json.loads(response.content)


def post_json(client, **fields):
    return post(client, json.dumps(fields).encode())  # ensure_ascii: lone surrogates go as \udXXX escapes


# -----------------------------------------------------------------------------
# 4. Text that is not valid Unicode: one rule, in the tokenizers' encode path


@pytest.mark.parametrize("name", ["gpt2", "bpe"])
@pytest.mark.parametrize("method", ["encode", "encode_batch", "encode_documents"])
def test_every_encode_method_of_both_tokenizers_refuses_a_lone_surrogate(tokenizers, name, method):
    tok = tokenizers[name]
    for text in BROKEN:
        with pytest.raises(InvalidTextError) as e:
            getattr(tok, method)(text if method == "encode" else ["fine", text])
        assert e.value.index == min(i for i, c in enumerate(text) if 0xD800 <= ord(c) <= 0xDFFF)
        assert f"is U+{ord(text[e.value.index]):04X}, a lone surrogate" in str(e.value)
    for text in FINE:  # valid text, ASCII or not, still encodes and comes back as it was
        ids = getattr(tok, method)(text if method == "encode" else [text])
        ids = ids if method == "encode" else list(ids[0]) if method == "encode_batch" else list(ids[:-1])
        assert tok.decode(ids) == text


def test_the_message_names_the_byte_that_was_not_utf8():
    with pytest.raises(InvalidTextError, match=r"index 3 is U\+DCFF.*stand-in for the byte 0xFF of text that is not UTF-8"):
        check_text(b"Hi \xff there".decode("utf-8", "surrogateescape"))
    with pytest.raises(InvalidTextError) as e:
        check_text("ab\ud800")
    assert "byte" not in str(e.value) and "half of a UTF-16 pair" in str(e.value)
    check_text("Hi \u00ff there \U0001F600")  # ÿ and an emoji are fine


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "bpe"])
def test_generate_with_a_prompt_that_is_not_utf8_is_one_line_and_exit_2(tokenizers, name, tmp_path):
    tok = tokenizers[name]
    checkpoint = save_checkpoint(tmp_path / name, tiny_model(tok.vocab_size), tok)
    # bytes on the command line, as the shell passes "$(printf 'Hi \xff\xfe there')"
    result = subprocess.run([sys.executable, "-m", "tinystories", "generate", "--checkpoint", str(checkpoint),
                             "--prompt", b"Hi \xff\xfe there", "--max-new-tokens", "2"],
                            capture_output=True, timeout=120, cwd=REPO)
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2, stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
    assert stderr.startswith("tinystories generate: error: the text is not valid Unicode: the character at index 3 "
                             "is U+DCFF"), stderr
    assert result.stdout == b""  # refused before a word of the story was printed


@pytest.mark.parametrize("raw", [
    rb'{"prompt": "Hi \udc80 there"}', rb'{"prompt": "\ud800"}', rb'{"prompt": ["once\udfff"]}',
    rb'{"prompt": "\udbff\udbff", "stream": true}', rb'{"prompt": "\ude00\ud83d"}',  # a pair in the wrong order
])
def test_the_api_refuses_a_prompt_that_is_not_valid_unicode_with_a_400(client, raw):
    status, body = post(client, raw)
    assert status == 400 and body["error"]["param"] == "prompt", body
    assert body["error"]["message"].startswith("prompt: the text is not valid Unicode: the character at index")


def test_the_api_takes_a_surrogate_pair_which_is_valid_unicode(client):
    status, body = post(client, rb'{"prompt": "a dragon \ud83d\udc09", "max_tokens": 2}')  # U+1F409
    assert status == 200 and body["usage"]["prompt_tokens"] > 2


@pytest.mark.parametrize("fields", [{"prompt": "a", "\udc80": 1}, {"prompt": "a", "seed": "\udc80"},
                                    {"prompt": "a", "stop": ["\ud800"]}, {"prompt": "a", "top_k": "x" * 10_000}])
def test_an_error_quoting_what_was_sent_is_ascii_json_and_short(client, fields):
    """A lone surrogate quoted in an error message has no UTF-8 form (this was a 500); the error
    goes back as ASCII JSON, escapes and all, and a long value is cut."""
    response = client.post("/v1/completions", content=json.dumps(fields).encode())
    assert response.status_code == 400
    assert response.content.isascii() and len(response.content) < 1000
    assert json.loads(response.content)["error"]["message"]


# -----------------------------------------------------------------------------
# 5. JSON nested deeper than a request needs


@pytest.mark.parametrize("raw", [
    b"[" * 100_000 + b"]" * 100_000,  # the case: 200 KB, under the 1 MiB cap
    b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    b'{"prompt": "a", "stop": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"prompt": "a", "stop": ' + b"[" * 990 + b"]" * 990 + b"}",  # just under the recursion limit: parsed
    b'{"prompt": ' + b"[" * MAX_JSON_DEPTH + b'"a"' + b"]" * MAX_JSON_DEPTH + b"}",  # 33 deep in all
    b"[" * 100_000,  # never closed
])
def test_deeply_nested_json_is_a_400(client, raw):
    status, body = post(client, raw)
    assert status == 400, body
    assert "nests JSON arrays or objects more than 32 deep" in body["error"]["message"]


def test_json_depth_counts_without_recursion():
    assert [json_depth(v) for v in (1, [], {}, [1, [2]], {"a": {"b": []}}, [[], [[[]]]])] == [0, 1, 1, 2, 3, 4]
    deep = []
    for _ in range(100_000):  # far past the recursion limit
        deep = [deep]
    assert json_depth(deep) == 100_001
    assert parse_json_body(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH) is not None
    with pytest.raises(ApiError, match="more than 32 deep"):
        parse_json_body(b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1))


# -----------------------------------------------------------------------------
# Numbers: in torch's range, computable in float32, and short enough to read


@pytest.mark.parametrize("fields, param", [
    (dict(seed=2**64), "seed"), (dict(seed=-(2**63) - 1), "seed"), (dict(seed=10**30), "seed"),
    (dict(seed=-(10**30)), "seed"), (dict(seed=1.5), "seed"), (dict(seed=True), "seed"),
    (dict(temperature=1e-300), "temperature"), (dict(temperature=5e-324), "temperature"),
    (dict(temperature=1e-39), "temperature"), (dict(top_p=1e-300), "top_p"), (dict(top_p=5e-324), "top_p"),
    (dict(max_tokens=10**30), "max_tokens"), (dict(top_k=-(10**30)), "top_k"),
])
def test_numbers_out_of_range_are_a_400(client, fields, param):
    with pytest.raises(ApiError) as e:
        parse_completion_request({"prompt": "a", **fields}, CAP)
    assert e.value.status == 400 and e.value.param == param
    status, body = post_json(client, prompt="a", **fields)  # and through the app: a 400, not a 500
    assert status == 400 and body["error"]["param"] == param


@pytest.mark.parametrize("fields", [
    dict(seed=2**64 - 1), dict(seed=-(2**63)), dict(seed=0), dict(temperature=2.0**-126), dict(top_p=2.0**-126),
    dict(top_k=10**30), dict(temperature=2, top_p=1, top_k=1),
])
def test_numbers_at_the_edges_of_the_ranges_work(client, fields):
    status, body = post_json(client, prompt="Once", max_tokens=3, **fields)
    assert status == 200 and body["usage"]["completion_tokens"] >= 1, body


def test_a_negative_seed_is_the_one_torch_maps_it_to(client):
    assert parse_completion_request({"prompt": "a", "seed": -1}, CAP).seed == 2**64 - 1
    texts = [post_json(client, prompt="Once", max_tokens=CAP, seed=s)[1]["choices"][0]["text"] for s in (-1, 2**64 - 1)]
    assert texts[0] == texts[1]


@pytest.mark.parametrize("raw", [
    b'{"prompt": "a", "seed": ' + b"7" * 4301 + b"}", b'{"prompt": "a", "max_tokens": -' + b"1" * 5000 + b"}",
    b"[" + b"9" * 100_000 + b"]",
])
def test_a_number_too_long_for_python_to_read_is_a_400(client, raw):
    status, body = post(client, raw)
    assert status == 400 and "holds a number with more than 4,300 digits" in body["error"]["message"]


def test_infinity_and_nan_are_a_400(client):
    for raw in (b'{"prompt": "a", "temperature": 1e400}', b'{"prompt": "a", "top_p": NaN}',
                b'{"prompt": "a", "temperature": -Infinity}'):
        status, body = post(client, raw)
        assert status == 400 and body["error"]["param"] in ("temperature", "top_p")


# -----------------------------------------------------------------------------
# Connections: a real server on 127.0.0.1, with timeouts short enough to wait for

LIMITS = Limits(header_timeout=1.5, body_timeout=1.5, keep_alive=1, max_connections=6, linger=0.5)


@pytest.fixture(scope="module")
def live(engine):
    """uvicorn serving the app on a free port of 127.0.0.1 with LIMITS, as `tinystories serve` runs it."""
    import uvicorn

    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(create_app(engine, LIMITS), "127.0.0.1", port, LIMITS))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield port
    server.should_exit = True
    thread.join(timeout=15)
    sock.close()


def connect(port) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)  # no read here waits longer


def read_response(sock) -> types.SimpleNamespace:
    """One response read off a raw socket: .status, .headers, .body, .at (time.perf_counter() when
    it had all come), .closed (whether the server then closed the connection, waiting at most the
    socket's timeout for the end)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before a response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "the connection closed in the middle of a response"
        body += chunk
    at = time.perf_counter()
    try:
        closed = sock.recv(1) == b""
    except ConnectionResetError:
        closed = True
    except TimeoutError:
        closed = False
    return types.SimpleNamespace(status=int(lines[0].split()[1]), headers=headers, body=body, at=at, closed=closed)


def request_bytes(method, path, body=b"", headers=()) -> bytes:
    head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *headers]
    if body:
        head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def quick_request(port, path="/health", body=None, timeout=5) -> tuple[int, float]:
    """(status, seconds) of one ordinary request on a fresh connection (http.client)."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET" if body is None else "POST", path, body=body)
        response = conn.getresponse()
        response.read()
        return response.status, time.perf_counter() - t0
    finally:
        conn.close()


@pytest.mark.parametrize("declared", [5_000_000_000, MAX_BODY_BYTES + 1, 10**19])  # h11 reads up to 20 digits
def test_a_declared_body_over_the_cap_is_refused_at_once_and_not_read(live, declared):
    with connect(live) as sock:
        t0 = time.perf_counter()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {declared}\r\n\r\n".encode() + b'{"prompt": "Once')
        r = read_response(sock)
        closed_after = time.perf_counter() - t0
    # 413, not the 408 the body's deadline would give: answered without waiting for the body
    assert r.status == 413 and json.loads(r.body)["error"]["message"].startswith("the request body is larger than")
    assert r.at - t0 < LIMITS.body_timeout / 2, f"{r.at - t0:.2f} s"
    assert r.closed, "the connection stays open to drain a body nobody will read"
    assert closed_after < LIMITS.linger + 1, f"closed after {closed_after:.2f} s"


def test_a_client_that_sends_its_whole_oversized_body_before_reading_still_gets_the_413(live):
    """http.client writes the whole body first: closing at once would break its writes."""
    for size in (MAX_BODY_BYTES + 1, 3 * MAX_BODY_BYTES):
        status, seconds = quick_request(live, "/v1/completions", b" " * size)
        assert status == 413 and seconds < LIMITS.linger, f"{size:,} bytes: {status} after {seconds:.2f} s"


@pytest.mark.parametrize("head", [b"Content-Length: " + b"9" * 30, b"Content-Length: -5", b"Content-Length: 5, 6",
                                  b"X-Ok: 1\r\nno colon"])
def test_a_request_that_is_not_valid_http_gets_a_400_in_openai_shape(live, head):
    with connect(live) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n\r\n{}")
        r = read_response(sock)
    assert r.status == 400 and r.headers["content-type"] == "application/json" and r.closed
    assert json.loads(r.body)["error"]["message"].startswith("the request is not valid HTTP/1.1")


def test_a_get_with_a_huge_declared_body_is_answered_and_the_connection_closed(live):
    with connect(live) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000000\r\n\r\nabc")
        r = read_response(sock)
    assert r.status == 200 and json.loads(r.body)["status"] == "ok" and r.closed


@pytest.mark.parametrize("sent", [b"", b"POST /v1/compl", b"GET /health HTTP/1.1\r\nHost: x\r\n"])
def test_a_connection_that_does_not_finish_its_headers_is_dropped_after_the_header_timeout(live, sent):
    with connect(live) as sock:
        t0 = time.perf_counter()
        sock.sendall(sent)
        r = read_response(sock)
    assert r.status == 408 and "did not arrive within 1.5 s" in json.loads(r.body)["error"]["message"] and r.closed
    assert LIMITS.header_timeout - 0.1 < r.at - t0 < LIMITS.header_timeout + 1, f"{r.at - t0:.2f} s"


def test_a_slowloris_client_is_dropped_while_other_requests_are_served(live):
    """One header byte every 0.1 s would take 5 s; the server drops it at 1.5 s, and answers
    ordinary requests meanwhile, each in well under a second."""
    request = request_bytes("GET", "/health", headers=[f"X-Pad: {'p' * 30}"])
    outcome = {}

    def slowloris():
        with connect(live) as sock:
            t0 = time.perf_counter()
            try:
                for byte in request:  # ~50 bytes: at most ~5 s, then it would be done
                    sock.sendall(bytes([byte]))
                    time.sleep(0.1)
                outcome["finished"] = True
            except (BrokenPipeError, ConnectionResetError):
                pass
            outcome["dropped_after"] = time.perf_counter() - t0

    thread = threading.Thread(target=slowloris)
    thread.start()
    served = []
    while thread.is_alive() and len(served) < 50:  # bounded: 50 requests, or until the slow client is gone
        served.append(quick_request(live, "/health"))
        served.append(quick_request(live, "/v1/completions", json.dumps({"prompt": "Once", "max_tokens": 2})))
        time.sleep(0.1)
    thread.join(timeout=10)
    assert "finished" not in outcome, "the slow client sent its whole request without being dropped"
    assert outcome["dropped_after"] < LIMITS.header_timeout + 1.5, outcome
    assert len(served) >= 6 and all(status == 200 for status, _ in served), served
    assert max(seconds for _, seconds in served) < 1.0, served
    print(f"\nslowloris dropped after {outcome['dropped_after']:.2f} s; meanwhile {len(served)} requests, "
          f"slowest {max(s for _, s in served) * 1000:.0f} ms")


@pytest.mark.parametrize("trickle", [False, True])
def test_a_body_that_does_not_arrive_in_time_gets_a_408(live, trickle):
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 2}).encode()
    with connect(live) as sock:
        sock.sendall(request_bytes("POST", "/v1/completions", body)[: -len(body)] + body[:5])
        t0 = time.perf_counter()
        if trickle:  # a byte every 0.1 s for 1.2 s, then silence
            for byte in body[5:17]:
                time.sleep(0.1)
                sock.sendall(bytes([byte]))
        r = read_response(sock)
        seconds = r.at - t0
    error = json.loads(r.body)["error"]
    assert r.status == 408 and error["message"].startswith("the request body did not arrive within 1.5 s"), error
    assert r.closed
    # 1.5 s after the headers, also when bytes kept coming: a deadline for the whole body, not a
    # timeout between reads (that would answer 1.5 s after the last byte: 2.7 s)
    assert LIMITS.body_timeout - 0.1 < seconds < LIMITS.body_timeout + 0.9, f"{seconds:.2f} s"


def test_a_client_a_little_slow_but_within_the_limits_is_served_and_kept_alive(live):
    body = json.dumps({"prompt": "Once", "max_tokens": 2}).encode()
    whole = request_bytes("POST", "/v1/completions", body)
    with connect(live) as sock:
        for i in range(0, len(whole), 40):  # in pieces over ~0.6 s
            sock.sendall(whole[i : i + 40])
            time.sleep(0.1)
        sock.settimeout(0.5)  # read_response waits this long for an EOF that must not come
        r = read_response(sock)
        assert r.status == 200 and json.loads(r.body)["object"] == "text_completion" and not r.closed
        sock.sendall(request_bytes("GET", "/health"))  # a second request on the same connection
        r = read_response(sock)
        assert r.status == 200 and json.loads(r.body)["status"] == "ok"


def test_connections_over_the_limit_get_a_503_and_the_others_are_kept(live):
    idle = [connect(live) for _ in range(LIMITS.max_connections)]
    try:
        time.sleep(0.2)  # accepted by the server (they will be dropped at the header timeout)
        with connect(live) as sock:
            sock.sendall(request_bytes("GET", "/health"))
            r = read_response(sock)
        assert r.status == 503 and r.headers["retry-after"] == "1" and r.closed
        error = json.loads(r.body)["error"]
        assert error["type"] == "server_error" and "6 connections open, its limit" in error["message"]
        idle[0].sendall(request_bytes("GET", "/health"))  # one of those held is still served
        idle[0].settimeout(5)
        assert idle[0].recv(65536).startswith(b"HTTP/1.1 200")
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.2)
    assert quick_request(live)[0] == 200  # slots free again
