"""Property-based tests of the completions API's request validation (hypothesis, issue 13).

For thousands of generated request bodies (2,600 over the two tests), the API answers 200
with a completion, or a 4xx in OpenAI's error shape; never a 500, never a body that is not JSON.
The application runs in this process (Starlette's TestClient, no sockets) with a tiny random model
and a 4-token cap, so one request costs a few milliseconds. Each test is bounded by max_examples;
the whole file takes well under a minute on the 2-core build machine.

Only `Engine` and `create_app` are used, so the same file runs against older versions of serve.py
(how issue 13's note shows these tests failing before the fixes).
"""

import json
import types

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tinystories.config import ModelConfig
from tinystories.model import GPT
from tinystories.serve import Engine, create_app
from tinystories.tokenizer import train_bpe

from conftest import TINYSTORIES_DIR, read_stories

CAP = 4  # --max-tokens-cap: every accepted request is cheap
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                database=None)  # no .hypothesis folder in the repository; failures print their example


@pytest.fixture(scope="module")
def client():
    from starlette.testclient import TestClient

    stories = read_stories(TINYSTORIES_DIR / "TinyStories-train.head.txt", limit=100)
    tokenizer = train_bpe(stories, 300, show_progress=False)
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=1, n_embd=8, block_size=16, vocab_size=tokenizer.vocab_size,
                            dropout=0.0)).eval()
    checkpoint = types.SimpleNamespace(model=model, tokenizer=tokenizer, path=TINYSTORIES_DIR)
    engine = Engine(checkpoint, "tiny", max_tokens_cap=CAP, concurrency=2)
    # raise_server_exceptions=False: a bug must come back as the 500 a real client would get
    with TestClient(create_app(engine), raise_server_exceptions=False) as client:
        yield client


def post(client, raw: bytes):
    return client.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})


def check_answer(response, raw: bytes) -> None:
    """200 with a completion (or an event stream ending in [DONE]), or a 4xx in OpenAI's error shape."""
    status = response.status_code
    event(f"HTTP {status}")  # pytest --hypothesis-show-statistics shows the mix
    assert status == 200 or 400 <= status < 500, f"HTTP {status} for {raw[:300]!r}: {response.text[:300]}"
    if status == 200 and response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.endswith("data: [DONE]\n\n")
        return
    body = json.loads(response.content)
    if status == 200:
        assert body["object"] == "text_completion" and len(body["choices"]) == 1
        assert 1 <= body["usage"]["completion_tokens"] <= CAP
        return
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, body
    assert isinstance(error["message"], str) and error["message"] and error["type"] == "invalid_request_error"


# -----------------------------------------------------------------------------
# What clients may send

# Any character, lone surrogates included: JSON can carry them as "\udc80" escapes. Drawn from
# every character a surrogate is rare, so one text in three is made to hold one.
some_text = st.text(st.characters(exclude_categories=()), max_size=20)
broken_text = st.tuples(some_text, st.characters(categories=["Cs"]), some_text).map("".join)
any_text = st.one_of(some_text, some_text, broken_text)
prompt_text = st.one_of(any_text, st.sampled_from(["Once upon a time", "<|endoftext|>", "é😀", "\x00"]))
numbers = st.one_of(
    st.integers(-5, 10), st.integers(), st.integers(min_value=2**63 - 2, max_value=2**64 + 2),
    st.integers(min_value=-(2**63) - 2, max_value=-(2**63) + 2),
    st.floats(allow_nan=True, allow_infinity=True),  # json.dumps writes NaN/Infinity, which json.loads reads
    st.sampled_from([0, 1, 2, 0.5, 1e-300, 5e-324, 1e-7, 1e300, -0.0, 2**64, 10**30]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, any_text)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(any_text, inner, max_size=4)),
                           max_leaves=12)
# What each field may hold; the server accepts these (and the neutral values of what it cannot honour)
plausible = {
    "model": st.one_of(st.none(), any_text),
    "prompt": st.one_of(prompt_text, st.lists(prompt_text, min_size=1, max_size=1)),
    "max_tokens": st.integers(1, CAP),
    "temperature": st.one_of(st.just(0), st.floats(2.0**-126, 2)),  # float32's smallest normal number and up
    "top_p": st.one_of(st.none(), st.floats(2.0**-126, 1)),
    "top_k": st.one_of(st.none(), st.integers(1, 10**30)),
    "seed": st.one_of(st.none(), st.integers(-(2**63), 2**64 - 1)),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "user": any_text,
    "stop": st.sampled_from([None, [], ""]),
    "echo": st.sampled_from([None, False]),
    "logprobs": st.sampled_from([None, 0]),
    "best_of": st.sampled_from([None, 1]),
    "suffix": st.sampled_from([None, ""]),
    "frequency_penalty": st.sampled_from([None, 0, 0.0]),
    "presence_penalty": st.sampled_from([None, 0]),
    "logit_bias": st.sampled_from([None, {}]),
    "n": st.sampled_from([None, 1]),
}


@st.composite
def requests(draw):
    """A dict of completions fields, each plausible three times in four and anything at all
    otherwise (a number out of range, a string, a list...), sometimes with an unknown field."""
    names = draw(st.lists(st.sampled_from(sorted(plausible)), unique=True, max_size=7))
    body = {}
    for name in names:
        wild = draw(st.integers(0, 3)) == 0
        body[name] = draw(st.one_of(numbers, json_values) if wild else plausible[name])
    if draw(st.integers(0, 4)) > 0:
        body.setdefault("prompt", draw(prompt_text))
    if draw(st.integers(0, 9)) == 0:
        body[draw(any_text)] = draw(json_values)
    return body


def nested(depth_strategy):
    """Arrays and objects nested `depth` deep around a value: where the decoder's recursion ends."""
    def build(args):
        depth, kind, where = args
        opened, closed = ("[", "]") if kind == "array" else ('{"a":', "}")
        inner = opened * depth + "1" + closed * depth
        return {"body": inner, "stop": '{"prompt": "a", "stop": ' + inner + "}",
                "prompt": '{"prompt": ' + inner + "}"}[where]
    return st.tuples(depth_strategy, st.sampled_from(["array", "object"]),
                     st.sampled_from(["body", "stop", "prompt"])).map(build)


# -----------------------------------------------------------------------------
# The properties


@settings(max_examples=1500, **SETTINGS)
@given(requests())
def test_generated_requests_get_a_completion_or_a_4xx(client, body):
    raw = json.dumps(body).encode()  # ensure_ascii: lone surrogates travel as \\udcXX escapes
    check_answer(post(client, raw), raw)


@settings(max_examples=1100, **SETTINGS)
@given(st.one_of(json_values.map(lambda v: json.dumps(v).encode()),
                 nested(st.integers(1, 5000)).map(str.encode),
                 nested(st.sampled_from([33, 999, 1000, 100_000])).map(str.encode),
                 st.integers(4290, 4310).map(lambda n: b'{"prompt": "a", "seed": ' + b"7" * n + b"}"),
                 st.binary(max_size=64),
                 st.tuples(st.binary(max_size=8), st.binary(max_size=8)).map(
                     lambda ab: ab[0] + b'{"prompt": "Once", "max_tokens": 2}' + ab[1])))
def test_any_body_gets_a_completion_or_a_4xx(client, raw):
    """Any JSON value, arrays and objects nested up to 100,000 deep, numbers of ~4,300 digits
    (Python's limit for int()), bytes that are not JSON."""
    check_answer(post(client, raw), raw)
