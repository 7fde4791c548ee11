"""`tinystories serve` driven by the official `openai` Python package, as a front-end would drive it:
models, completions and chat completions, plain and streamed, usage, and the error of a bad request.

The client validates every response against its own models (`_strict_response_validation`), so a
field of the wrong type or a missing one fails here, not in someone's chat front-end. The server is
test_serve.py's (the real command on 127.0.0.1), and its stories are checked against `generate`
run in this process with the same seed. The chat format's own validation is tested without a
server at the end.
"""

import pytest

from tinystories.serve import ApiError, parse_chat_request, parse_completion_request

from test_serve import CAP, PROMPT, local, local_text, server, tiny_checkpoint  # noqa: F401  (shared fixtures)

openai = pytest.importorskip("openai")


def make_client(server, strict: bool = True):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="not-needed", max_retries=0,
                         timeout=120, _strict_response_validation=strict)


@pytest.fixture(scope="module")
def client(server):
    client = make_client(server)
    yield client
    client.close()


@pytest.fixture(scope="module")
def lenient_client(server):
    """For streamed completions only: the package types their chunks as whole completions, whose
    finish_reason may not be null, while OpenAI's own server sends null until the last chunk."""
    client = make_client(server, strict=False)
    yield client
    client.close()


def test_models(client):
    (model,) = client.models.list().data
    assert model.id == "tiny-random" and model.owned_by == "tinystories"
    assert "last user message" in model.description  # the card says what chat does with a story model


def test_completion_plain_and_streamed(client, lenient_client, local):
    text, finish, n_tokens = local_text(local, PROMPT, 40, seed=5, temperature=0.8, top_k=50)
    prompt_tokens = len(local.tokenizer.encode(PROMPT))

    done = client.completions.create(model="tiny-random", prompt=PROMPT, max_tokens=40, temperature=0.8, seed=5,
                                     extra_body={"top_k": 50})
    assert done.object == "text_completion" and done.model == "tiny-random"
    (choice,) = done.choices
    assert (choice.text, choice.finish_reason) == (text, finish)
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens) == \
        (prompt_tokens, n_tokens, prompt_tokens + n_tokens)

    chunks = list(lenient_client.completions.create(model="tiny-random", prompt=PROMPT, max_tokens=40,
                                                    temperature=0.8, seed=5, extra_body={"top_k": 50}, stream=True,
                                                    stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    with_text = [c for c in chunks if c.choices]
    assert all(c.choices[0].finish_reason is None for c in with_text[:-1])
    assert len(with_text) > 3, "a story streamed in one piece is not a stream"
    assert "".join(c.choices[0].text for c in with_text) == text
    assert with_text[-1].choices[0].finish_reason == finish
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n_tokens


def test_chat_plain_continues_the_last_user_message(client, local):
    text, finish, n_tokens = local_text(local, PROMPT, 48, seed=9, temperature=0.7)
    messages = [
        {"role": "system", "content": "You write stories for children."},  # not shown to the model
        {"role": "user", "content": "An earlier beginning"},
        {"role": "assistant", "content": " and an earlier story."},
        {"role": "user", "content": PROMPT},
    ]
    done = client.chat.completions.create(model="tiny-random", messages=messages, max_completion_tokens=48,
                                          temperature=0.7, seed=9)
    assert done.object == "chat.completion" and done.id.startswith("chatcmpl-")
    (choice,) = done.choices
    assert choice.message.role == "assistant" and choice.message.content == text
    assert choice.finish_reason == finish
    prompt_tokens = len(local.tokenizer.encode(PROMPT))
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (prompt_tokens, n_tokens)

    # the same story whether the beginning comes alone, as text parts, or with max_tokens
    alone = client.chat.completions.create(model="m", messages=[{"role": "user", "content": [
        {"type": "text", "text": PROMPT[:10]}, {"type": "text", "text": PROMPT[10:]}]}], max_tokens=48,
        temperature=0.7, seed=9)
    assert alone.choices[0].message.content == text


def test_chat_streamed(client, local):
    text, finish, n_tokens = local_text(local, "The cat", CAP, seed=4)
    chunks = list(client.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": "The cat"}],
                                                 max_tokens=CAP, seed=4, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks) and len({c.id for c in chunks}) == 1
    first, *middle, last, usage = chunks
    assert first.choices[0].delta.role == "assistant" and not first.choices[0].delta.content
    assert all(c.choices[0].finish_reason is None and c.choices[0].delta.content for c in middle)
    assert len(middle) > 3, "a story streamed in one piece is not a stream"
    assert "".join(c.choices[0].delta.content for c in middle) == text
    assert last.choices[0].finish_reason == finish and last.choices[0].delta.content is None
    assert usage.choices == [] and usage.usage.completion_tokens == n_tokens

    # without include_usage: no usage chunk, the same text
    again = list(client.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": "The cat"}],
                                                max_tokens=CAP, seed=4, stream=True))
    assert again[-1].choices[0].finish_reason == finish
    assert "".join(c.choices[0].delta.content or "" for c in again) == text


@pytest.mark.parametrize("call, param", [
    (lambda c: c.completions.create(model="m", prompt=PROMPT, temperature=-3), "temperature"),
    (lambda c: c.completions.create(model="m", prompt=PROMPT, max_tokens=CAP + 1), "max_tokens"),
    (lambda c: c.chat.completions.create(model="m", messages=[{"role": "user", "content": PROMPT}], n=2), "n"),
    (lambda c: c.chat.completions.create(model="m", messages=[{"role": "user", "content": PROMPT}],
                                         max_completion_tokens=CAP + 1), "max_completion_tokens"),
    (lambda c: c.chat.completions.create(model="m", messages=[{"role": "assistant", "content": "Hi"}]),
     "messages[0].role"),
    (lambda c: c.chat.completions.create(model="m", messages=[{"role": "user", "content": PROMPT}],
                                         tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
])
def test_a_bad_request_is_a_bad_request_error_in_openai_shape(client, call, param):
    with pytest.raises(openai.BadRequestError) as e:
        call(client)
    error = e.value
    assert error.status_code == 400 and error.type == "invalid_request_error" and error.param == param
    assert error.code is None and param.split("[")[0] in error.body["message"]


def test_an_unknown_route_is_a_not_found_error(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model="m", input="a story")
    assert e.value.status_code == 404 and e.value.type == "not_found_error"


# -----------------------------------------------------------------------------
# The chat format's validation without a server


def chat(*messages, **fields):
    return parse_chat_request({"messages": list(messages), **fields}, max_tokens_cap=100)


def user(content):
    return {"role": "user", "content": content}


def test_chat_takes_the_last_user_message_and_shares_the_completion_fields():
    req = chat({"role": "system", "content": "Be nice."}, user("Tom had"), {"role": "assistant", "content": "x"},
               user("Once"), temperature=0.5, top_p=0.9, top_k=3, seed=-1, stream=True,
               stream_options={"include_usage": True}, max_completion_tokens=7, user="me", model="gpt-4o",
               n=1, tools=[], response_format={"type": "text"})
    same = parse_completion_request({"prompt": "Once", "temperature": 0.5, "top_p": 0.9, "top_k": 3, "seed": -1,
                                     "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 7},
                                    max_tokens_cap=100)
    assert req == same
    assert chat(user([{"type": "text", "text": "On"}, {"type": "text", "text": "ce"}])).prompt == "Once"
    assert chat(user("a"), max_tokens=5, max_completion_tokens=5).max_tokens == 5
    assert chat(user("a")).max_tokens == 100  # the default, 256, capped


@pytest.mark.parametrize("body, param", [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "Once"}, "messages"),
    ({"messages": ["Once"]}, "messages[0]"),
    ({"messages": [user("a"), {"role": "assistant", "content": "b"}]}, "messages[1].role"),
    ({"messages": [{"role": "system", "content": "Be nice."}]}, "messages[0].role"),
    ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "x"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "tool", "content": "42"}]}, "messages[0].role"),
    ({"messages": [{"content": "a"}]}, "messages[0].role"),
    ({"messages": [user("")]}, "messages[0].content"),
    ({"messages": [user(None)]}, "messages[0].content"),
    ({"messages": [user([{"type": "image_url", "image_url": {"url": "x"}}])]}, "messages[0].content"),
    ({"messages": [user("a" * 100_001)]}, "messages[0].content"),
    ({"messages": [{"role": "system", "content": 5}, user("a")]}, "messages[0].content"),
    ({"messages": [user("a")], "max_tokens": 5, "max_completion_tokens": 6}, "max_tokens"),
    ({"messages": [user("a")], "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": [user("a")], "temperature": 3}, "temperature"),
    ({"messages": [user("a")], "logprobs": True}, "logprobs"),
    ({"messages": [user("a")], "prompt": "a"}, "prompt"),
    ({"messages": [user("a")], "functions": []}, "functions"),
])
def test_chat_refusals_name_the_field(body, param):
    with pytest.raises(ApiError) as e:
        parse_chat_request(body, max_tokens_cap=100)
    assert e.value.status == 400 and e.value.param == param, e.value.message
