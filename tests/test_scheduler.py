"""The continuous-batching scheduler of `tinystories serve` (tinystories/scheduler.py), without HTTP.

- batch invariance, bit for bit: a request's logits at every step are the same alone and beside
  other requests of other prompt lengths and settings that join and leave around it (so it sits
  in another slot, beside long chunked prefills and windows that jump, and its attention runs
  over as many key blocks as the longest context beside it needs);
- a request writes what `generate` writes for it alone: greedy and sampled, prompts and stories
  longer than block_size (learned positions refill their window, rotary ones slide as a ring),
  GPT-Neo's local layers, chunked prefills;
- requests past the slots wait their turn; a cancelled one leaves and frees its slot;
- a long prompt is filled in chunks between decode steps, of a ring only what the next token
  depends on, and a request that arrives meanwhile takes its turn at the next round.

Tiny random models on the CPU; every wait is bounded.
"""

import queue
import threading

import pytest
import torch

from tinystories.config import LLAMA_BLOCK, ModelConfig
from tinystories.generate import generate, reach
from tinystories.model import GPT
from tinystories.scheduler import Job, Scheduler

VOCAB, EOT = 96, 0

SHAPES = {
    "gpt2": dict(),  # learned positions: the window jumps and refills
    "llama": LLAMA_BLOCK,  # rotary positions: the slot is a ring
    "neo": dict(attention_layers=["global", "local"], window_size=5, scale_attention=False),
}


def tiny_model(shape: str, block_size: int = 16):
    torch.manual_seed(0)
    config = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size, vocab_size=VOCAB, dropout=0.0,
                         **SHAPES[shape])
    return GPT(config).eval()


def prompt(n: int, salt: int = 0) -> list[int]:
    return [1 + (7 * i + 3 * salt) % (VOCAB - 1) for i in range(n)]  # no end-of-text inside


def run(scheduler, job_fields: dict, record: bool = False) -> tuple[Job, "queue.Queue"]:
    out: queue.Queue = queue.Queue()
    job = Job(deliver=out.put, record_logits=record, **job_fields)
    scheduler.submit(job)
    return job, out


def tokens_of(out: "queue.Queue", timeout: float = 60) -> tuple[list[int], str]:
    """Every token a job delivered, and its finish reason."""
    tokens = []
    while True:
        item = out.get(timeout=timeout)
        if isinstance(item, BaseException):
            raise item
        token, finish = item
        tokens.append(token)
        if finish is not None:
            return tokens, finish


def alone(model, fields: dict, eot_id: int | None = EOT) -> list[int]:
    """`generate` for the job alone, seeded as the scheduler seeds it."""
    (tokens,) = generate(model, [fields["prompt_ids"]], fields["max_tokens"],
                         temperature=fields.get("temperature", 1.0), top_k=fields.get("top_k"),
                         top_p=fields.get("top_p"), eot_id=eot_id,
                         generator=torch.Generator().manual_seed(fields.get("seed", 0)))
    return tokens


@pytest.fixture
def scheduler_for():
    made = []

    def make(model, **kwargs):
        # attention in blocks of 4 keys: a batch's longest context, and so the number of blocks its
        # step runs, changes as requests join and leave
        made.append(Scheduler(model, **{"slots": 4, "eot_id": EOT, "attention_block": 4, **kwargs}))
        return made[-1]

    yield make
    for s in made:
        s.close()


@pytest.mark.parametrize("shape", list(SHAPES))
def test_a_job_writes_what_generate_writes(shape, scheduler_for):
    model = tiny_model(shape)
    scheduler = scheduler_for(model, prefill_chunk=6)  # prompts of 1 to 5 chunks
    cases = [
        dict(prompt_ids=prompt(3), max_tokens=40, temperature=0.0),  # greedy, past block_size 16
        dict(prompt_ids=prompt(13, 1), max_tokens=30, temperature=1.0, seed=5),
        dict(prompt_ids=prompt(30, 2), max_tokens=20, temperature=0.9, top_k=20, seed=6),  # a prompt past block_size
        dict(prompt_ids=[EOT], max_tokens=25, temperature=1.0, top_p=0.8, seed=7),
        dict(prompt_ids=prompt(6, 3), max_tokens=1, temperature=1.0, seed=8),
    ]
    jobs = [run(scheduler, case) for case in cases]  # all at once: 5 jobs, 4 slots
    for case, (job, out) in zip(cases, jobs):
        tokens, finish = tokens_of(out)
        expected = alone(model, case)
        assert tokens == expected, f"{shape}: {case}"
        assert finish == ("stop" if expected[-1] == EOT else "length")
        assert len(tokens) <= case["max_tokens"]


@pytest.mark.parametrize("shape", list(SHAPES))
def test_logits_do_not_depend_on_what_else_runs(shape, scheduler_for):
    """The same request alone, then among others joining and leaving: the same logits, bit for bit."""
    model = tiny_model(shape)
    target = dict(prompt_ids=prompt(9, 4), max_tokens=45, temperature=1.0, top_p=0.9, seed=42)

    scheduler = scheduler_for(model, slots=4, prefill_chunk=4)
    job, out = run(scheduler, target, record=True)
    lone_tokens, _ = tokens_of(out)
    lone_logits = job.logits

    scheduler = scheduler_for(model, slots=4, prefill_chunk=4)
    # others first, so the target gets another slot and joins a running batch
    first = [run(scheduler, dict(prompt_ids=prompt(20, 5), max_tokens=60, temperature=0.0)),
             run(scheduler, dict(prompt_ids=prompt(2, 6), max_tokens=8, temperature=1.5, top_k=3, seed=1))]
    first[0][1].get(timeout=60)  # the batch is running
    slots: list[int] = []  # the target's slot at each token (it moves down as others leave)
    out = queue.Queue()
    job = Job(deliver=lambda item: (slots.append(job.slot), out.put(item)), record_logits=True, **target)
    scheduler.submit(job)
    # more while it runs: a long prompt filled in chunks beside it, and one that leaves early
    late = run(scheduler, dict(prompt_ids=prompt(40, 7), max_tokens=30, temperature=0.7, seed=2))
    quitter, quitter_out = run(scheduler, dict(prompt_ids=prompt(5, 8), max_tokens=60, seed=3))
    quitter_out.get(timeout=60)
    quitter.cancel()
    tokens, _ = tokens_of(out)
    for _, other in [*first, late]:
        tokens_of(other)

    assert slots[0] != 0, "the target should not have had the first slot both times"
    assert tokens == lone_tokens
    assert len(job.logits) == len(lone_logits) == len(tokens)
    for step, (got, expected) in enumerate(zip(job.logits, lone_logits)):
        assert torch.equal(got, expected), f"{shape}: step {step} differs by {(got - expected).abs().max():.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_step_shape_gives_a_row_the_logits_of_the_full_shape(dtype, scheduler_for):
    """The shapes the probe kept, checked on other rows: a row's logits bit for bit those of the
    step over all slots, at every context length up to block_size."""
    model = tiny_model("llama", block_size=32)
    scheduler = scheduler_for(model, slots=8, dtype=dtype)
    assert scheduler.step_shapes[-1] == 8 and scheduler.step_shapes == sorted(scheduler.step_shapes)
    gen = torch.Generator().manual_seed(1)
    idx, lengths = torch.randint(0, VOCAB, (8,), generator=gen), torch.randint(0, 32, (8,), generator=gen)
    none = torch.zeros(0, dtype=torch.long)
    with torch.inference_mode():
        for t in (scheduler.cache.k, scheduler.cache.v):
            t.copy_(torch.randn(t.shape, generator=gen))
        full = scheduler._step(idx, lengths, none, 32)
        for n in scheduler.step_shapes:
            assert torch.equal(scheduler._step(idx[:n], lengths[:n], none, 32), full[:n]), f"{dtype}: shape {n}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_job_that_changes_slot_and_step_shape_keeps_its_logits(dtype, scheduler_for):
    """Alone, a job decodes at the smallest step shape; behind five others that leave one by one
    it starts at the full shape in slot 5 and moves down as they go. The same logits either way."""
    model = tiny_model("llama")
    target = dict(prompt_ids=prompt(7, 4), max_tokens=40, temperature=1.0, seed=9)
    scheduler = scheduler_for(model, slots=8, dtype=dtype)
    assert len(scheduler.step_shapes) > 1, "nothing to check: only the full shape is invariant here"
    job, out = run(scheduler, target, record=True)
    lone_tokens, _ = tokens_of(out)
    lone_logits = job.logits

    scheduler = scheduler_for(model, slots=8, dtype=dtype)
    others = [run(scheduler, dict(prompt_ids=prompt(3 + i, i), max_tokens=4 + 6 * i, seed=i)) for i in range(5)]
    slots: list[int] = []
    out: queue.Queue = queue.Queue()
    job = Job(deliver=lambda item: (slots.append(job.slot), out.put(item)), record_logits=True, **target)
    scheduler.submit(job)
    tokens, _ = tokens_of(out)
    for _, other in others:
        tokens_of(other)

    assert slots[0] == 5 and slots[-1] == 0, f"the job should have moved from slot 5 to slot 0: {slots}"
    assert tokens == lone_tokens
    for step, (got, expected) in enumerate(zip(job.logits, lone_logits, strict=True)):
        assert torch.equal(got, expected), f"{dtype}: step {step} differs by {(got - expected).abs().max():.3g}"


def test_jobs_past_the_slots_wait_and_a_cancelled_one_frees_its_slot(scheduler_for):
    model = tiny_model("gpt2", block_size=32)
    scheduler = scheduler_for(model, slots=1, eot_id=-1)  # no token ends a story: the first job runs until cancelled
    long_job, long_out = run(scheduler, dict(prompt_ids=prompt(4), max_tokens=100_000, temperature=1.0))
    long_out.get(timeout=60)
    waiting, waiting_out = run(scheduler, dict(prompt_ids=prompt(4, 1), max_tokens=5, temperature=0.0))
    assert scheduler.load() == (1, 1)
    with pytest.raises(queue.Empty):
        waiting_out.get(timeout=0.5)  # the only slot is taken
    long_job.cancel()
    tokens, _ = tokens_of(waiting_out)
    assert tokens == alone(model, dict(prompt_ids=prompt(4, 1), max_tokens=5, temperature=0.0), eot_id=None)
    assert scheduler.load() == (0, 0)


def test_a_closed_scheduler_refuses_new_jobs_and_its_thread_ends(scheduler_for):
    scheduler = scheduler_for(tiny_model("gpt2"), slots=1, eot_id=-1)
    _, running = run(scheduler, dict(prompt_ids=prompt(3), max_tokens=100_000))
    _, waiting = run(scheduler, dict(prompt_ids=prompt(3), max_tokens=5))
    running.get(timeout=60)
    scheduler.close()
    assert not scheduler.thread.is_alive()
    for out in (running, waiting):  # both hear that it stopped, rather than wait forever
        with pytest.raises(RuntimeError, match="stopping"):
            tokens_of(out, timeout=10)
    with pytest.raises(RuntimeError):
        scheduler.submit(Job(prompt(3), 4, deliver=print))
    with pytest.raises(ValueError):
        Scheduler(tiny_model("gpt2"), slots=0, eot_id=EOT)


def test_the_worker_thread_is_the_only_one(scheduler_for):
    """One thread owns the cache: jobs from many threads at once all finish."""
    model = tiny_model("llama")
    scheduler = scheduler_for(model, slots=3)
    results = {}

    def client(i):
        _, out = run(scheduler, dict(prompt_ids=prompt(1 + i, i), max_tokens=12, temperature=1.0, seed=i))
        results[i] = tokens_of(out)[0]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == list(range(8))
    for i, tokens in results.items():
        assert tokens == alone(model, dict(prompt_ids=prompt(1 + i, i), max_tokens=12, temperature=1.0, seed=i))
    assert sum(t.name == "tinystories-scheduler" for t in threading.enumerate()) == 1


def test_a_long_prompt_is_filled_in_chunks_between_decode_steps(scheduler_for):
    """While a 60-token prompt is filled 4 tokens a round (15 rounds), the running request still
    gets a token every round: prefill does not stall the batch."""
    model = tiny_model("gpt2", block_size=64)
    scheduler = scheduler_for(model, slots=2, prefill_chunk=4, eot_id=-1)
    log: list = []  # who got a token, in the order the worker delivered them
    running = start_running_job(scheduler, log)
    done: queue.Queue = queue.Queue()
    long_fields = dict(prompt_ids=prompt(60, 1), max_tokens=3, temperature=0.0)
    mark = len(log)
    scheduler.submit(Job(deliver=lambda item: (log.append("long"), done.put(item)), **long_fields))
    tokens = tokens_of(done)[0]
    running.cancel()
    between = log[mark : log.index("long")].count("running")
    assert between >= 13, f"the running request got {between} tokens while the prompt was filled in 15 chunks"
    assert tokens == alone(model, long_fields, eot_id=None)


def start_running_job(scheduler, log: list) -> Job:
    """A request that decodes for ever, once it has its first token; each token logs "running"."""
    started = threading.Event()
    running = Job(prompt(3), 10_000, deliver=lambda item: (log.append("running"), started.set()))
    scheduler.submit(running)
    assert started.wait(60)
    return running


def fed_chunks(scheduler) -> list[tuple[Job, int]]:
    """Record (job, tokens) of every prefill chunk the scheduler runs, in order."""
    chunks: list[tuple[Job, int]] = []
    fill_chunk = scheduler._fill_chunk

    def recorded(job):
        n = fill_chunk(job)
        chunks.append((job, n))
        return n

    scheduler._fill_chunk = recorded
    return chunks


def test_a_long_rope_prompt_fills_its_reach_in_chunks_between_decode_steps(scheduler_for):
    """A 2,000-token prompt on a ring (block_size 16, two layers): only its last 31 tokens, what
    the next token depends on, are filled, 4 a round over 8 rounds, while the running request
    gets a token every round; its tokens are `generate`'s and the no-cache oracle's over all 2,000."""
    model = tiny_model("llama")
    scheduler = scheduler_for(model, slots=2, prefill_chunk=4, eot_id=-1)
    chunks = fed_chunks(scheduler)
    log: list = []
    running = start_running_job(scheduler, log)
    done: queue.Queue = queue.Queue()
    long_fields = dict(prompt_ids=prompt(2000, 1), max_tokens=12, temperature=0.0)
    mark = len(log)
    long_job = Job(deliver=lambda item: (log.append("long"), done.put(item)), **long_fields)
    scheduler.submit(long_job)
    tokens = tokens_of(done)[0]
    running.cancel()
    fed = [n for job, n in chunks if job is long_job]
    assert sum(fed) == reach(model.config) == 31 and max(fed) <= 4 and len(fed) == 8
    between = log[mark : log.index("long")].count("running")
    assert between >= 6, f"the running request got {between} tokens while the prompt was filled in 8 chunks"
    assert tokens == alone(model, long_fields, eot_id=None)
    assert [tokens] == generate(model, [long_fields["prompt_ids"]], 12, temperature=0.0, use_cache=False)


def test_a_request_that_arrives_while_a_long_prompt_fills_is_served_at_the_next_round(scheduler_for):
    """Into an idle scheduler: a prompt of 8 chunks, then (while its first chunk is filled) a short
    request. The short one takes its slot and its first token at the next round, before the long
    prompt is filled: with nothing decoding, a prefill still goes one chunk a round."""
    model = tiny_model("gpt2", block_size=64)
    scheduler = scheduler_for(model, slots=2, prefill_chunk=4, eot_id=-1)
    chunks = fed_chunks(scheduler)
    log: list = []
    done: queue.Queue = queue.Queue()
    short = Job(prompt(3, 2), 2, deliver=lambda item: (log.append("short"), done.put(item)))
    fill_chunk = scheduler._fill_chunk

    def fill_then_submit(job):  # the short request arrives while the long prompt's first chunk fills
        n = fill_chunk(job)
        if len(chunks) == 1:
            scheduler.submit(short)
        return n

    scheduler._fill_chunk = fill_then_submit
    long_job = Job(prompt(32, 1), 2, deliver=lambda item: (log.append("long"), done.put(item)))
    scheduler.submit(long_job)
    for _ in range(4):
        done.get(timeout=60)
    assert log.index("short") < log.index("long")
    order = [("long" if job is long_job else "short", n) for job, n in chunks]
    assert order[:3] == [("long", 4), ("short", 3), ("long", 4)], order  # one chunk a round, the new one first


@pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines, reason="no fbgemm kernels")
def test_int8_weights_write_stories_in_the_batch(scheduler_for):
    # serve --dtype int8. Not bit for bit batch-invariant: an int8 matmul takes one input scale
    # over the whole batch (tinystories/decoding.py, Int8Linear), so only completion is checked.
    from tinystories.decoding import Int8Linear

    scheduler = scheduler_for(tiny_model("gpt2"), dtype=torch.int8)
    assert isinstance(scheduler.model.lm_head, Int8Linear)
    # no shape is batch-invariant under int8, so the probe is skipped and every shape is used:
    # a lone request steps at 1 row, not at all 4 slots
    assert scheduler.step_shapes == [1, 2, 4]
    jobs = [run(scheduler, dict(prompt_ids=prompt(5, salt), max_tokens=20, temperature=0.0)) for salt in range(3)]
    for job, out in jobs:
        tokens, finish = tokens_of(out)
        assert len(tokens) == 20 or tokens[-1] == EOT
        assert all(0 <= t < VOCAB for t in tokens)
