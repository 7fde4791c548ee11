"""A web page and OpenAI-style completions and chat APIs for a trained model: `tinystories serve`.

    tinystories serve --checkpoint out/run              # then open http://127.0.0.1:8000/
    curl -s 127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": "Once upon a time", "max_tokens": 100, "temperature": 0.8, "seed": 1}'
    curl -s 127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "Once upon a time"}], "max_tokens": 100}'

Routes (Starlette on uvicorn):
    GET  /                      a page: type a story beginning, pick the sampling settings, watch it written
    POST /v1/completions        OpenAI's completions format; "stream": true sends server-sent events
                                `data: {chunk}` and ends with `data: [DONE]`
    POST /v1/chat/completions   OpenAI's chat format, for chat front-ends; streamed the same way, in
                                `chat.completion.chunk`s (the first names the role, the text comes in
                                `delta`s, the last delta is empty and carries finish_reason)
    GET  /v1/models             the one model served, with a description saying what chat does with it
    GET  /health                status, model id, the max_tokens and prompt caps, the model's shape (the
                                page reads it), and how many requests are in the batch and waiting for a slot

Request fields: prompt (a non-empty string, or a list holding one, of at most the server's
--max-prompt-tokens tokens: by default the model's block_size), max_tokens (1 to the server's
--max-tokens-cap; default 256 or the cap if lower), temperature (0 to 2, default 1; 0 is greedy;
a positive one at least 2**-126, float32's smallest normal number), top_p ((0, 1], default 1; at
least 2**-126), top_k (>= 1 or null; not in OpenAI's API but common in open servers), seed (an
integer from -2**63 to 2**64 - 1, torch's range: the same seed and settings give the same text),
stream, stream_options {include_usage}, model (any value is accepted; the response names the model
that answered), n = 1, user. OpenAI fields this server cannot honour (stop, echo, logprobs,
best_of > 1, suffix, penalties, logit_bias) are refused when set to anything but their neutral
value, and unknown fields are refused, so a client never silently gets something other than what
it asked for. Every refusal is a 4xx in
OpenAI's error shape: {"error": {"message", "type", "param", "code"}}.

Chat: the model writes stories; it has no notion of a conversation. It continues the last message,
which must be the user's (else a 400), as the beginning of a story, and the assistant's reply is
the rest of the story (as a completion of that text would be: same seed, same words). System,
developer and earlier user and assistant messages are checked (role, content a string or a list
of text parts) but not shown to the model: a front-end that always sends a system prompt, or the
whole conversation, still works and gets what the last message alone would get. Refusing them
would break such front-ends; feeding them to a model that has only seen stories would write
nonsense. Roles tool and function, images, tools and structured output are refused. The chat
request takes the same fields as a completion's (messages instead of prompt; max_completion_tokens
is the chat format's name for max_tokens, either may be sent) and the same checks, in shared code
(`parse_sampling`), and the same error shape.

Choices made here:
- max_tokens above the cap is refused with a 400 that names the cap (not clamped): a client that asked
  for 2,000 tokens should learn it cannot have them rather than get a shorter story it cannot explain.
- So is a prompt of more tokens than --max-prompt-tokens (default: the model's block_size, all it
  sees at once), with OpenAI's code "context_length_exceeded": cut without a word, its beginning
  would be lost. Whatever the cap, a prompt costs a bounded prefill: the scheduler fills at most
  block_size tokens of it (n_layer * (block_size - 1) + 1 for a RoPE model, the most its next token
  depends on), in chunks between the decode steps of the others.
- completion_tokens counts every sampled token, the end-of-text included; the text leaves it out.
  finish_reason is "stop" when the model ended the story, "length" when max_tokens ran out.
- The model is loaded once, before the server listens. Requests are decoded together by a
  scheduler (tinystories/scheduler.py, its own module: this one is HTTP only): one worker thread
  owns a KV cache of --concurrency slots; a request takes a free slot (or waits for one, first
  come first served), is prefilled into it in chunks between decode steps, then decodes one token
  per step in one forward pass with every other running request, each sampling with its own
  generator and settings, and leaves at end-of-text, at max_tokens or when its client goes away.
  The decode step runs at one of a few shapes (1, 2, 4, ... --concurrency rows, the fewest that
  hold the requests decoding) that the scheduler proves at start to give a row the logits of the
  full shape bit for bit, so a request's text never depends on what else runs (the same seed and
  settings give the same text alone or under load; tests/test_scheduler.py), and it is what
  `generate` writes for the request alone, with the same --dtype, up to the last bit of a logit
  (identical in the tests). Not so at --dtype int8: an int8 matmul quantizes all its rows with one
  input scale, so a row's logits, and so its text, can depend on the other requests in the step.
  The event loop only moves text, so the page and /health stay responsive while the model works.
  Measured with bench/serve.py on 2 very busy CPU cores (BENCHMARKS.md), the `tiny` shape: 5.1x
  to 5.2x the tokens/s of the thread-pool server this replaced at 16 concurrent 100-token
  streams, the median time to the first token shorter; a lone stream 0.8x (1.05x with one OpenMP
  thread for both).
- A client that goes away leaves the batch before the next step.
- Limits against mistakes: a request body of at most 1 MiB (a larger declared Content-Length is
  refused with a 413 before any of it is read), JSON nested at most 32 deep, a prompt of at most
  100,000 characters and --max-prompt-tokens tokens (a story longer than block_size tokens slides
  as `stream`'s does: see the scheduler), and a prompt that is not valid Unicode (a lone
  surrogate, which JSON can escape: "\\udc80") refused, the tokenizer's rule (tokenizer.check_text).
- Limits against slow or idle clients (`Limits`; the numbers are its defaults): the request line
  and headers must arrive within 10 s of the connection opening (or of the previous response), the
  body within 30 s of the headers (1 MiB in 30 s is 35 KB/s, far below any real link), else a 408
  and the connection is closed; an idle keep-alive connection is closed after 5 s (uvicorn's
  default); at most 100 connections are open at once, and a request on one more gets a 503 with
  Retry-After (OpenAI's shape) and the connection is closed. So a client that trickles bytes holds
  a slot for at most 42 s (10 + 30 + the 2 s below), and cannot starve the others unless it holds
  all 100 slots at once (a per-client limit is a reverse proxy's job). A connection answered before its request body was
  read (a 413, a 408, a GET sent with a body) reads and drops what comes for 2 s more, so that a
  client that writes its whole body before reading still gets the answer, then closes.
"""

from __future__ import annotations

import asyncio
import errno
import json
import math
import secrets
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import AsyncIterator, Callable

from tinystories.errors import UserError, one_line

DEFAULT_MAX_TOKENS = 256
MAX_PROMPT_CHARS = 100_000  # encoding is cheap, but not free: a few hundred KiB of prompt is a mistake
MAX_BODY_BYTES = 1 << 20  # a request body is read into memory; anything near this size is a mistake
MAX_TEMPERATURE = 2.0  # OpenAI's range; above it sampling is close to uniform noise anyway
# The smallest positive temperature and top_p: float32's smallest normal number (1.2e-38). The
# sampler works in float32, where a smaller value may round to 0: a temperature of 1e-300 then
# divides the logits by zero (NaN probabilities), a top_p of 1e-300 keeps no token at all, and
# either crashed the request. Such values are greedy in all but name anyway.
MIN_POSITIVE = 2.0**-126
# torch.Generator.manual_seed's range; negatives map to 2**64 + seed, as torch maps them.
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1
# A completions request nests 2 deep at most ({"stream_options": {...}}). JSON nested thousands
# deep makes json.loads (and anything that walks the value) hit Python's recursion limit.
MAX_JSON_DEPTH = 32
# What /v1/models says of the model (a chat front-end shows it): this is no chat assistant.
MODEL_CARD = ("A TinyStories story model, not a chat assistant. /v1/completions continues the prompt; "
              "/v1/chat/completions continues the last user message as the beginning of a story (system, "
              "developer and earlier messages are not shown to the model), and the reply is the rest of the story.")


@dataclass(frozen=True)
class Limits:
    """How long a client may take to send a request, and how many connections may be open.

    Defaults are the server's; tests pass small ones. See the module docstring for why these.
    """

    header_timeout: float = 10.0  # s from the connection (or the previous response) to the end of the headers
    body_timeout: float = 30.0  # s from the end of the headers to the end of the body
    keep_alive: int = 5  # s an idle keep-alive connection stays open (uvicorn's default)
    max_connections: int = 100  # open at once; a request on one more gets a 503
    linger: float = 2.0  # s a connection answered before its body was read drops what comes, then closes


# -----------------------------------------------------------------------------
# Requests: validation into a plain value (pure functions, no server needed)


class ApiError(Exception):
    """A request the server refuses; becomes {"error": {...}} with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class CompletionRequest:
    """A checked request, completions or chat: what to continue and how to sample."""

    prompt: str  # the story beginning (chat: the last user message)
    max_tokens: int
    temperature: float
    top_p: float | None  # None: keep every token
    top_k: int | None  # None: no top-k cut
    seed: int | None  # None: a fresh random seed
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the token counts


# Fields OpenAI defines that this server cannot honour, with the values that mean "not used".
NEUTRAL = {
    "stop": (None, [], ""),
    "echo": (False, None),
    "logprobs": (None, 0),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0),
    "logit_bias": (None, {}),
    "n": (None, 1),
}
# Every request shares these (parse_sampling reads them); each format adds its own.
SAMPLING = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stream", "stream_options", "user"}
KNOWN = {"prompt", *SAMPLING, *NEUTRAL}

# The chat format's own fields of that kind (tools, structured output, logprobs: a story model has none).
CHAT_NEUTRAL = {
    "stop": (None, [], ""),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0),
    "logit_bias": (None, {}),
    "n": (None, 1),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None,),
    "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]),
    "store": (None, False),
    "metadata": (None, {}),
}
CHAT_KNOWN = {"messages", "max_completion_tokens", *SAMPLING, *CHAT_NEUTRAL}
# Roles of the messages a chat request may hold, and the fields of a message.
CHAT_ROLES = ("system", "developer", "user", "assistant")
MESSAGE_FIELDS = {"role", "content", "name"}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    # ints are always finite (and math.isfinite overflows on a 400-digit one)
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


def _show(value, limit: int = 60) -> str:
    """A client's value for an error message: repr (ASCII-safe for lone surrogates, which the UTF-8
    response could not carry), cut to `limit` characters (a value can be up to 1 MiB long)."""
    return _cut(repr(value), limit)


def _cut(key: str, limit: int = 60) -> str:
    """A client's JSON key for an error message and its `param`, cut to `limit` characters (a key is
    any string, up to 1 MiB long)."""
    return key if len(key) <= limit else key[: limit - 3] + "..."


def json_depth(value) -> int:
    """How deep arrays and objects nest in a decoded JSON value (a scalar is 0), without recursion."""
    depth, level = 0, [value]
    while containers := [v for v in level if isinstance(v, (list, dict))]:
        depth += 1
        level = [x for c in containers for x in (c.values() if isinstance(c, dict) else c)]
    return depth


def parse_json_body(raw: bytes):
    """The decoded request body, or ApiError(400) saying why it is not acceptable JSON."""
    try:
        body = json.loads(raw)
    except RecursionError:  # the C decoder counts its depth against Python's recursion limit
        raise ApiError(400, f"the request body nests JSON arrays or objects more than {MAX_JSON_DEPTH} deep") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not valid JSON (it is not UTF-8, UTF-16 or UTF-32 text)") from None
    except ValueError:  # int() refuses more than sys.get_int_max_str_digits() digits
        raise ApiError(400, f"the request body holds a number with more than {sys.get_int_max_str_digits():,} "
                            "digits") from None
    if json_depth(body) > MAX_JSON_DEPTH:
        raise ApiError(400, f"the request body nests JSON arrays or objects more than {MAX_JSON_DEPTH} deep")
    return body


def check_fields(body, known: set[str], neutral: dict) -> None:
    """Refuse a body that is not an object, an unknown field, or a field we cannot honour set to
    anything but its neutral value: a client never silently gets less than it asked for."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - known)
    if unknown:
        name = _cut(unknown[0])
        raise ApiError(400, f"unrecognized request argument: {name} (supported: {', '.join(sorted(known))})", name)
    for name, values in neutral.items():
        if name in body and body[name] not in values:
            raise ApiError(400, f"{name}={_show(body[name])} is not supported by this server (leave it out)", name)


def check_prompt(prompt: str, param: str) -> str:
    """A story beginning: non-empty, at most MAX_PROMPT_CHARS characters."""
    if not prompt:
        raise ApiError(400, f"{param} must be a non-empty string: the beginning of a story", param)
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ApiError(400, f"{param} has {len(prompt):,} characters; the most this server takes is "
                            f"{MAX_PROMPT_CHARS:,}", param)
    return prompt


def parse_sampling(body: dict, prompt: str, max_tokens_cap: int,
                   max_tokens_name: str = "max_tokens") -> CompletionRequest:
    """The fields every request shares, checked (max_tokens read from `max_tokens_name`)."""
    max_tokens = body.get(max_tokens_name)
    if max_tokens is None:
        max_tokens = min(DEFAULT_MAX_TOKENS, max_tokens_cap)
    if not _is_int(max_tokens) or max_tokens < 1:
        raise ApiError(400, f"{max_tokens_name} must be an integer >= 1, got {_show(max_tokens)}", max_tokens_name)
    if max_tokens > max_tokens_cap:
        raise ApiError(400, f"{max_tokens_name} is {max_tokens}, more than this server allows ({max_tokens_cap}, "
                            "its --max-tokens-cap); ask for fewer", max_tokens_name)

    temperature = body.get("temperature")
    temperature = 1.0 if temperature is None else temperature
    if not _is_number(temperature) or not 0 <= temperature <= MAX_TEMPERATURE:
        raise ApiError(400, f"temperature must be a number from 0 to {MAX_TEMPERATURE:g} (0 means greedy), "
                            f"got {_show(temperature)}", "temperature")
    if 0 < temperature < MIN_POSITIVE:
        raise ApiError(400, f"temperature {temperature!r} is too small to compute with (the least is "
                            f"{MIN_POSITIVE:.3g}); use 0 for greedy", "temperature")

    top_p = body.get("top_p")
    if top_p is not None and (not _is_number(top_p) or not 0 < top_p <= 1):
        raise ApiError(400, f"top_p must be a number in (0, 1] (1 keeps every token), got {_show(top_p)}", "top_p")
    if top_p is not None and top_p < MIN_POSITIVE:
        raise ApiError(400, f"top_p {top_p!r} is too small to compute with (the least is {MIN_POSITIVE:.3g}; "
                            "any top_p that small keeps only the most likely token)", "top_p")

    top_k = body.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ApiError(400, f"top_k must be an integer >= 1, or null for no top-k cut, got {_show(top_k)}",
                       "top_k")

    seed = body.get("seed")
    if seed is not None and not (_is_int(seed) and SEED_MIN <= seed <= SEED_MAX):
        raise ApiError(400, f"seed must be an integer from -2**63 to 2**64 - 1 (torch's range), got {_show(seed)}",
                       "seed")

    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false, got {_show(stream)}", "stream")
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and set(options) <= {"include_usage"}
                                    and isinstance(options.get("include_usage", False), bool)):
        raise ApiError(400, 'stream_options may only be {"include_usage": true|false}', "stream_options")

    return CompletionRequest(
        prompt=prompt, max_tokens=max_tokens, temperature=float(temperature),
        top_p=None if top_p is None or top_p == 1 else float(top_p), top_k=top_k,
        # torch's own mapping of a negative seed (manual_seed(-1) == manual_seed(2**64 - 1))
        seed=None if seed is None else seed % (1 << 64),
        stream=bool(stream), include_usage=bool((options or {}).get("include_usage", False)),
    )


def parse_completion_request(body, max_tokens_cap: int) -> CompletionRequest:
    """Check a decoded /v1/completions body; raise ApiError(400, ...) saying what is wrong."""
    check_fields(body, KNOWN, NEUTRAL)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # OpenAI clients may send a batch of one
    if isinstance(prompt, list):
        raise ApiError(400, "prompt must be one string (batches and token arrays are not supported)", "prompt")
    if not isinstance(prompt, str):
        prompt = ""  # refused below, with the same message as an empty one
    return parse_sampling(body, check_prompt(prompt, "prompt"), max_tokens_cap)


def message_text(message, index: int) -> str:
    """The text of messages[index], checked: a string, or a list of {"type": "text", "text": ...} parts."""
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise ApiError(400, f"{param} must be an object with a role and a content", param)
    unknown = sorted(set(message) - MESSAGE_FIELDS)
    if unknown:
        name = _cut(unknown[0])
        raise ApiError(400, f"{param} has a field this server does not take: {name} (a message may hold "
                            f"{', '.join(sorted(MESSAGE_FIELDS))})", f"{param}.{name}")
    role = message.get("role")
    if role not in CHAT_ROLES:
        raise ApiError(400, f"{param}.role must be one of {', '.join(CHAT_ROLES)}, got {_show(role)} "
                            "(a story model has no tools)", f"{param}.role")
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and set(p) == {"type", "text"}
                                         and isinstance(p["text"], str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"{param}.content must be a string or a list of text parts "
                        '([{"type": "text", "text": "..."}]; a story model reads only text)', f"{param}.content")


def parse_chat_request(body, max_tokens_cap: int) -> CompletionRequest:
    """Check a decoded /v1/chat/completions body; the prompt is the last message, the user's.

    A story model has no notion of turns: it continues the last user message as the beginning of
    a story. System, developer and earlier messages are checked like the last but not shown to the
    model (so a front-end that always sends a system prompt still works, and gets what it would
    get without one). max_completion_tokens is the chat format's newer name for max_tokens.
    """
    check_fields(body, CHAT_KNOWN, CHAT_NEUTRAL)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects, the last the user's "
                            "story beginning", "messages")
    texts = [message_text(m, i) for i, m in enumerate(messages)]
    if messages[-1]["role"] != "user":
        raise ApiError(400, f"the last of the messages must be the user's (the story beginning to continue), "
                            f"not {_show(messages[-1]['role'])}", f"messages[{len(messages) - 1}].role")
    prompt = check_prompt(texts[-1], f"messages[{len(messages) - 1}].content")

    name = "max_tokens"
    if body.get("max_completion_tokens") is not None:
        name = "max_completion_tokens"
        if body.get("max_tokens") is not None and body["max_tokens"] != body["max_completion_tokens"]:
            raise ApiError(400, "max_tokens and max_completion_tokens are two names for one limit; send one",
                           "max_tokens")
    return parse_sampling(body, prompt, max_tokens_cap, name)


# -----------------------------------------------------------------------------
# Generation: the scheduler's tokens as text pieces, in the event loop


@dataclass
class Piece:
    """New text of a completion; the last piece also says why it ended and how many tokens it took."""

    text: str
    finish_reason: str | None = None  # "stop" | "length" on the last piece
    completion_tokens: int = 0


class Engine:
    """The model, loaded once, and the scheduler that decodes the requests together
    (tinystories/scheduler.py: one worker thread, one batch, --concurrency slots)."""

    def __init__(self, checkpoint, model_id: str, max_tokens_cap: int, concurrency: int,
                 dtype: torch.dtype | None = None, max_prompt_tokens: int | None = None):
        from tinystories.scheduler import Scheduler

        self.model = checkpoint.model
        self.tokenizer = checkpoint.tokenizer
        self.model_id = model_id
        self.max_tokens_cap = max_tokens_cap
        # None: the model's block_size, every token of which the model sees at once
        self.max_prompt_tokens = max_prompt_tokens or self.model.config.block_size
        self.concurrency = concurrency
        self.created = int(Path(checkpoint.path).stat().st_mtime)
        self.device = str(next(self.model.parameters()).device)
        self.model.eval()
        # the weights' dtype, resolved by the caller as `tinystories generate` does (decode_dtype); None: the model's
        self.dtype = dtype
        self.scheduler = Scheduler(self.model, slots=concurrency, eot_id=self.tokenizer.eot_id, dtype=self.dtype)

    def encode_prompt(self, prompt: str, param: str = "prompt") -> list[int]:
        """The prompt's token ids (end-of-text for an empty one); ApiError(400) for text that is not
        valid Unicode, refused by the tokenizer as it is for every caller, and for more tokens than
        max_prompt_tokens. Called in a worker thread (see `answer`): encode_batch, unlike the BPE's
        encode, lets go of the GIL while it works, so that a 100,000-character prompt (tens of ms)
        does not hold up the event loop and the others' streams. The same ids as encode."""
        from tinystories.tokenizer import InvalidTextError

        try:
            ids = self.tokenizer.encode_batch([prompt])[0] or [self.tokenizer.eot_id]
        except InvalidTextError as e:
            raise ApiError(400, f"{param}: {e}", param) from None
        if len(ids) > self.max_prompt_tokens:
            raise ApiError(400, f"{param} has {len(ids):,} tokens; the most this server takes is "
                                f"{self.max_prompt_tokens:,} (its --max-prompt-tokens; the model sees "
                                f"{self.model.config.block_size:,} tokens at once): send a shorter one, such as "
                                "the end of it", param, code="context_length_exceeded")
        return ids

    async def pieces(self, request: CompletionRequest, prompt_ids: list[int]) -> AsyncIterator[Piece]:
        """The request's text as soon as it is whole: its tokens come from the scheduler's thread
        through a queue, and become text here, in the event loop."""
        from tinystories.generate import TextStream
        from tinystories.scheduler import Job

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def deliver(item) -> None:  # called in the scheduler's thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is closed: the server stopped, nobody is listening
                job.cancel()

        # No seed: a fresh one. The generator is on the CPU whatever the model's device, so a seed
        # means the same story everywhere (sample_next draws where the generator lives).
        seed = request.seed if request.seed is not None else secrets.randbits(63)
        job = Job(prompt_ids, request.max_tokens, deliver, temperature=request.temperature, top_k=request.top_k,
                  top_p=request.top_p, seed=seed)
        self.scheduler.submit(job)
        text, n_tokens, finish = TextStream(self.tokenizer), 0, None
        try:
            while finish is None:
                # Every token already here goes out in one piece: when the event loop falls behind
                # (a busy machine), it catches up with fewer, longer chunks instead of lagging.
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                piece = []
                for item in items:
                    if isinstance(item, BaseException):  # a bug in the worker: reported, not lost
                        raise item
                    token, finish = item
                    n_tokens += 1  # completion_tokens counts the end-of-text; the text leaves it out
                    piece.append("" if token == self.tokenizer.eot_id else text.push(token))
                if finish is not None:
                    yield Piece("".join(piece) + text.flush(), finish, n_tokens)
                elif any(piece):
                    yield Piece("".join(piece))
        finally:
            job.cancel()  # the client left, or we are done: either way the job leaves the batch

    def close(self) -> None:
        self.scheduler.close()


# -----------------------------------------------------------------------------
# Responses in OpenAI's shapes


def completion_body(cid: str, created: int, model_id: str, text: str, finish_reason: str | None,
                    usage: dict | None = None) -> dict:
    body = {
        "id": cid, "object": "text_completion", "created": created, "model": model_id,
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}],
    }
    if usage is not None:
        body["usage"] = usage
    return body


def chat_body(cid: str, created: int, model_id: str, text: str, finish_reason: str, usage: dict) -> dict:
    return {
        "id": cid, "object": "chat.completion", "created": created, "model": model_id,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                     "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage,
    }


def chat_chunk(cid: str, created: int, model_id: str, delta: dict, finish_reason: str | None) -> dict:
    return {
        "id": cid, "object": "chat.completion.chunk", "created": created, "model": model_id,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


@dataclass(frozen=True)
class Shape:
    """How one API writes a completion: whole, and as the chunks of a stream."""

    id_prefix: str
    chunk_object: str  # the "object" of a streamed chunk
    prompt_param: str  # the field an encoding error names
    whole: Callable  # (cid, created, model_id, text, finish_reason, usage) -> the response body
    opening: Callable  # (cid, created, model_id) -> chunks sent before any text
    chunks: Callable  # (cid, created, model_id, text, finish_reason or None) -> chunks for one piece


COMPLETION = Shape(
    "cmpl", "text_completion", "prompt", whole=completion_body, opening=lambda *ids: [],
    chunks=lambda cid, created, model_id, text, finish: [completion_body(cid, created, model_id, text, finish)],
)
# Chat streams as OpenAI's does: a first chunk naming the role, the text in deltas, then an empty
# delta carrying finish_reason.
CHAT = Shape(
    "chatcmpl", "chat.completion.chunk", "messages", whole=chat_body,
    opening=lambda cid, created, model_id: [chat_chunk(cid, created, model_id, {"role": "assistant", "content": ""},
                                                       None)],
    chunks=lambda cid, created, model_id, text, finish: (
        ([chat_chunk(cid, created, model_id, {"content": text}, None)] if text else [])
        + ([chat_chunk(cid, created, model_id, {}, finish)] if finish is not None else [])),
)


def usage_of(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data) -> bytes:
    """One server-sent event carrying `data` (JSON, or the literal [DONE])."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n".encode("utf-8")


# -----------------------------------------------------------------------------
# The application


async def read_body(request, limits: Limits) -> bytes:
    """The request body, at most MAX_BODY_BYTES, arriving within `limits.body_timeout` seconds.

    A declared Content-Length over the cap is refused before a byte of the body is read: waiting
    for 5 GB only to refuse it would hold the connection for as long as the client likes.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:  # h11 checked its form
        raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES:,} bytes "
                            f"(Content-Length: {_show(int(declared))})")
    raw = bytearray()
    try:
        async with asyncio.timeout(limits.body_timeout):
            async for chunk in request.stream():
                raw += chunk
                if len(raw) > MAX_BODY_BYTES:  # a chunked body declares no length
                    raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES:,} bytes")
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {limits.body_timeout:g} s "
                            f"({len(raw):,} bytes came)") from None
    return bytes(raw)


def page_html() -> str:
    return resources.files("tinystories").joinpath("static/index.html").read_text(encoding="utf-8")


def create_app(engine: Engine, limits: Limits = Limits()):
    """The Starlette application serving `engine`'s model (`limits.body_timeout` is the app's to keep)."""
    import contextlib

    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.routing import Route

    page = page_html()  # read once; a missing file should fail at startup, not on the first visit

    async def index(request: Request):
        return HTMLResponse(page)

    async def health(request: Request):
        config = engine.model.config
        return JSONResponse({
            "status": "ok", "model": engine.model_id, "max_tokens_cap": engine.max_tokens_cap,
            "max_prompt_tokens": engine.max_prompt_tokens,
            "default_max_tokens": min(DEFAULT_MAX_TOKENS, engine.max_tokens_cap),
            "tokenizer": engine.tokenizer.name, "block_size": config.block_size,
            "vocab_size": config.vocab_size, "device": engine.device, "concurrency": engine.concurrency,
            # requests in the batch's slots now, and waiting for one
            **dict(zip(("running", "waiting"), engine.scheduler.load())),
        })

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [
            {"id": engine.model_id, "object": "model", "created": engine.created, "owned_by": "tinystories",
             "description": MODEL_CARD},
        ]})

    async def answer(request: Request, parse, shape: "Shape"):
        """One completion in `shape`'s format: the whole of it, or streamed as server-sent events."""
        req = parse(parse_json_body(await read_body(request, limits)), engine.max_tokens_cap)
        prompt_ids = await run_in_threadpool(engine.encode_prompt, req.prompt, shape.prompt_param)
        cid, created, model_id = f"{shape.id_prefix}-{uuid.uuid4().hex}", int(time.time()), engine.model_id

        if not req.stream:
            text, last = [], None
            async for piece in engine.pieces(req, prompt_ids):
                text.append(piece.text)
                last = piece
            return JSONResponse(shape.whole(cid, created, model_id, "".join(text), last.finish_reason,
                                            usage_of(len(prompt_ids), last.completion_tokens)))

        async def events() -> AsyncIterator[bytes]:
            try:
                for chunk in shape.opening(cid, created, model_id):
                    yield sse(chunk)
                async for piece in engine.pieces(req, prompt_ids):
                    for chunk in shape.chunks(cid, created, model_id, piece.text, piece.finish_reason):
                        yield sse(chunk)
                    if piece.finish_reason is not None and req.include_usage:  # OpenAI's shape: only the counts
                        usage = usage_of(len(prompt_ids), piece.completion_tokens)
                        yield sse({"id": cid, "object": shape.chunk_object, "created": created, "model": model_id,
                                   "choices": [], "usage": usage})
            except Exception as e:  # the status line is long gone: report in the stream, as OpenAI does
                print(f"tinystories serve: generation failed: {type(e).__name__}: {one_line(e)}", file=sys.stderr)
                yield sse(ApiError(500, f"generation failed: {type(e).__name__}", type="server_error").body())
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def completions(request: Request):
        return await answer(request, parse_completion_request, COMPLETION)

    async def chat_completions(request: Request):
        return await answer(request, parse_chat_request, CHAT)

    class ErrorResponse(JSONResponse):
        """JSON in ASCII: an error may quote what the client sent, and a lone surrogate in it (valid
        in JSON as "\\udc80") has no UTF-8 form; escaped, it goes back as it came."""

        def render(self, content) -> bytes:
            return json.dumps(content, allow_nan=False, separators=(",", ":")).encode("ascii")

    async def api_error(request: Request, exc: ApiError):
        return ErrorResponse(exc.body(), status_code=exc.status)

    async def http_error(request: Request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return ErrorResponse(ApiError(exc.status_code, message, type=kind).body(), status_code=exc.status_code,
                             headers=getattr(exc, "headers", None))

    async def server_error(request: Request, exc: Exception):
        # a bug: uvicorn still logs the traceback; the client gets OpenAI's shape, not plain text
        body = ApiError(500, f"internal error: {type(exc).__name__}", type="server_error").body()
        return ErrorResponse(body, status_code=500)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()

    routes = [
        Route("/", index, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: server_error})


# -----------------------------------------------------------------------------
# The connection: uvicorn's h11 protocol with a deadline on the headers and a connection limit


def _error_bytes(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP/1.1 response in OpenAI's error shape that closes the connection, for answers
    given outside the application (no request was parsed, so h11 cannot write them)."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = json.dumps(ApiError(status, message, type=kind).body()).encode("ascii")
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode("ascii") + body


def protocol_class(limits: Limits):
    """uvicorn's H11Protocol, plus what it lacks against slow and idle clients (uvicorn 0.54):

    - a deadline for the request line and headers. uvicorn has none: a connection that sends
      nothing, or one header byte every few seconds (slowloris), is held forever; its keep-alive
      timer only runs between requests and every byte received cancels it.
    - a limit on open connections answered in OpenAI's shape (uvicorn's limit_concurrency answers
      a plain-text 503).
    - closing a connection whose response went out before its body was read (after `linger`
      seconds), where uvicorn would read and drop the rest for as long as the client sends it.
    - its answer to a request that is not valid HTTP/1.1 (a bad Content-Length, a header line
      with no colon) in OpenAI's error shape rather than plain text.
    The body's own deadline is kept by the application (`read_body`), which can answer a 408.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    async def too_many_connections(scope, receive, send) -> None:
        body = json.dumps(ApiError(503, f"the server has {limits.max_connections} connections open, its limit; "
                                        "try again shortly", type="server_error").body()).encode("ascii")
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"retry-after", b"1"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    class GuardedH11Protocol(H11Protocol):
        _head_timer = None  # asyncio.TimerHandle while this connection waits for a request's headers
        _lingering = False  # True once a response went out before its request's body was read

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:  # this one included
                self.logger.warning("%d connections open, the limit: refusing a request", len(self.connections) - 1)
                self.app = too_many_connections  # this connection's request gets the 503, then it closes
            self._wait_for_head()

        def connection_lost(self, exc) -> None:
            self._stop_waiting_for_head()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:  # the headers are in (or the connection is over)
                self._stop_waiting_for_head()

        def data_received(self, data: bytes) -> None:
            if self._lingering:  # the rest of a body already answered: dropped unparsed
                return
            super().data_received(data)

        def on_response_complete(self) -> None:
            if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
                # Answered before its body was read (a 413, a 408, a GET sent with a body). uvicorn
                # would read the rest for as long as the client sends it; closing at once would make
                # the writes of a client that sends its whole body before reading (http.client,
                # requests) fail, and it would never see the answer. So: drop what comes for
                # `limits.linger` seconds, then close.
                self._lingering = True
                self.loop.call_later(limits.linger, self.transport.close)  # a no-op if already closed
            else:
                self._wait_for_head()  # the next request's; handle_events stops it if one is already in
            super().on_response_complete()

        def send_400_response(self, msg: str) -> None:
            self.transport.write(_error_bytes(400, "Bad Request", "the request is not valid HTTP/1.1 (a malformed "
                                              "request line or header, or a bad Content-Length)"))
            self.transport.close()

        def _wait_for_head(self) -> None:
            self._stop_waiting_for_head()
            self._head_timer = self.loop.call_later(limits.header_timeout, self._head_too_slow)

        def _stop_waiting_for_head(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_too_slow(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.write(_error_bytes(408, "Request Timeout", f"the request line and headers did not "
                                                  f"arrive within {limits.header_timeout:g} s"))
                self.transport.close()

    return GuardedH11Protocol


def uvicorn_config(app, host: str, port: int, limits: Limits = Limits()):
    """The uvicorn settings `tinystories serve` runs with (tests run the same in-process)."""
    import uvicorn

    # Streams still open at Ctrl-C get 5 s to finish; then they are cut and their workers stop.
    # h11's default cap on a request head still incomplete (16 KiB) stays: past it, a 400.
    return uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5,
                          http=protocol_class(limits), timeout_keep_alive=limits.keep_alive)


# -----------------------------------------------------------------------------
# The command


def model_id_for(checkpoint_path: Path) -> str:
    """The run folder's name for run/checkpoints/best, else the checkpoint folder's own name."""
    path = Path(checkpoint_path).resolve()
    if path.parent.name == "checkpoints":
        return path.parent.parent.name
    return path.name


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), or a UserError saying why not."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    except socket.gaierror as e:
        raise UserError(f"--host {host} is not an address of this machine ({e.strerror})") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is already in use; pick another with --port "
                            "(--port 0 picks a free one)") from None
        if e.errno == errno.EACCES:
            raise UserError(f"no permission to listen on port {port}; use a port above 1023") from None
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror})") from None
    sock.set_inheritable(True)
    return sock


def run(args) -> int:
    """`tinystories serve`: load the model once, then serve the page and the API until Ctrl-C."""
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError("tinystories serve needs starlette and uvicorn: pip install 'tinystories[serve]'") from None
    from tinystories.checkpoint import load_checkpoint
    from tinystories.decoding import decode_dtype_choice
    from tinystories.device import describe, pick_device

    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    # Take the port before loading the model: a busy port should fail in a second, not after a load.
    sock = bind(args.host, args.port)
    port = sock.getsockname()[1]
    try:
        device = pick_device(args.device)
        dtype, why = decode_dtype_choice(device, args.dtype)  # before the load: --dtype int8 on a GPU fails at once
        ckpt = load_checkpoint(args.checkpoint, device)
        engine = Engine(ckpt, args.model_name or model_id_for(ckpt.path), args.max_tokens_cap, args.concurrency,
                        dtype, args.max_prompt_tokens)
    except BaseException:
        sock.close()
        raise
    app = create_app(engine)
    print(f"tinystories serve: {describe(device, dtype, why)}", flush=True)
    shown_host = f"[{args.host}]" if ":" in args.host else args.host
    n_params = sum(p.numel() for p in engine.model.parameters())
    address = (f"tinystories serve: {engine.model_id} ({n_params / 1e6:.2f}M parameters, {engine.tokenizer.name}) "
               f"on {engine.device}, at http://{shown_host}:{port}/ (API: POST /v1/completions, "
               "/v1/chat/completions; Ctrl-C stops)")

    class Server(uvicorn.Server):
        """Prints the address once the socket listens: `bind` does not, and a client (a script, a
        test) that connects as soon as it reads the address would be refused until uvicorn's
        startup has run."""

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                print(address, flush=True)

    Server(uvicorn_config(app, args.host, port)).run(sockets=[sock])
    return 0
