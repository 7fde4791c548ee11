"""Generation: the samplers at their edges, the KV-cache path against the no-cache oracle, stopping,
streaming text, and the `tinystories generate` command.

Models are tiny and random, with weights scaled up so logits are far from flat: greedy decoding
then has clear winners (no near-ties for float noise to flip) and does not repeat one token.
"""

import subprocess
import sys

import pytest
import torch

from tinystories.cli import main
from tinystories.config import LLAMA_BLOCK, ModelConfig, get_preset
from tinystories.decoding import int8_supported
from tinystories.errors import UserError
from tinystories.generate import TextStream, generate, reach, sample_next, stream, window_start
from tinystories.model import GPT

from conftest import REPO, read_stories


def random_model(block_size=32, vocab_size=64, seed=0, scale=4.0, **options):
    torch.manual_seed(seed)
    config = ModelConfig(**{**dict(n_layer=2, n_head=2, n_embd=32, block_size=block_size, vocab_size=vocab_size,
                                   dropout=0.0), **options})
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model


def random_prompts(lengths, vocab_size=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lengths]


def greedy(model, prompts, max_new_tokens, **kwargs):
    return generate(model, prompts, max_new_tokens, temperature=0.0, **kwargs)


# -----------------------------------------------------------------------------
# Samplers


def test_temperature_zero_is_argmax():
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_next(logits, temperature=0.0), logits.argmax(-1))


@pytest.mark.parametrize("kwargs", [dict(top_k=1), dict(top_p=1e-6), dict(top_k=1, top_p=0.5)])
def test_top_k_1_and_tiny_top_p_are_greedy(kwargs):
    logits = torch.randn(64, 100, generator=torch.Generator().manual_seed(0)) * 3
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        assert torch.equal(sample_next(logits, temperature=1.0, generator=g, **kwargs), logits.argmax(-1))


def test_top_k_ties_do_not_leak():
    # ten tokens share the top logit; top_k=3 must keep exactly three of them, never more
    logits = torch.zeros(1, 50)
    logits[0, 10:20] = 5.0
    draws = sample_next(logits.expand(4000, 50), top_k=3, generator=torch.Generator().manual_seed(0))
    seen = set(draws.tolist())
    assert len(seen) == 3 and seen <= set(range(10, 20))


def test_top_k_2_only_returns_the_two_best_in_proportion():
    logits = torch.tensor([[0.0, 2.0, 1.0, 1.9, -1.0]])
    draws = sample_next(logits.expand(20000, 5), top_k=2, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=5)
    assert counts[[0, 2, 4]].sum() == 0
    p1 = torch.sigmoid(torch.tensor(2.0 - 1.9)).item()  # renormalised over the two kept tokens
    assert abs(counts[1].item() / 20000 - p1) < 0.02


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    draws = sample_next(probs.log().expand(5000, 4), top_p=0.75, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {1, 3}  # 0.5 + 0.3 >= 0.75; 0.5 alone is not


def test_top_p_always_keeps_the_most_likely_token():
    # even on a flat distribution (every token tied) a tiny top_p keeps one token, the lowest id
    flat = torch.zeros(500, 30)
    assert set(sample_next(flat, top_p=1e-9, generator=torch.Generator().manual_seed(0)).tolist()) == {0}
    peaked = torch.tensor([[0.0, 3.0, 1.0]]).expand(500, 3)
    assert set(sample_next(peaked, top_p=0.01, generator=torch.Generator().manual_seed(0)).tolist()) == {1}


def test_top_p_looks_past_the_first_candidates_and_breaks_ties_by_lowest_id():
    # 150 equally likely tokens at scattered ids, the rest nearly impossible: top_p=0.61 keeps 92
    # of them (91/150 < 0.61 <= 92/150), more than the sampler's first 64 candidates, and the tie
    # must go to the 92 lowest ids, whichever ones topk happened to return first
    V = 2000
    g = torch.Generator().manual_seed(0)
    likely = torch.randperm(V, generator=g)[:150]
    logits = torch.full((V,), -30.0)
    logits[likely] = 0.0
    draws = sample_next(logits.expand(3000, V), top_p=0.61, generator=g)
    assert set(draws.tolist()) == set(sorted(likely.tolist())[:92])


def test_tiny_temperature_is_greedy_not_nan():
    logits = torch.randn(16, 40, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_next(logits, temperature=1e-30), logits.argmax(-1))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=0), "top-k"),
        (dict(top_p=0.0), "top-p"),
        (dict(top_p=1.5), "top-p"),
    ],
)
def test_meaningless_sampler_settings_are_refused(kwargs, message):
    with pytest.raises(UserError, match=message):
        sample_next(torch.zeros(1, 5), **kwargs)


# -----------------------------------------------------------------------------
# KV cache against the oracle


@pytest.mark.parametrize("length", [1, 2, 5, 13, 24])
def test_cache_gives_the_greedy_tokens_of_the_oracle_unbatched(length):
    model = random_model()
    prompts = random_prompts([length])
    max_new = 32 - length  # up to a full block, no window jump
    cached = greedy(model, prompts, max_new)
    assert cached == greedy(model, prompts, max_new, use_cache=False)
    assert len(cached[0]) == max_new and len(set(cached[0])) > 3  # not one token over and over


def test_cache_gives_the_greedy_tokens_of_the_oracle_batched():
    model = random_model()
    lengths = [7, 1, 12, 3, 12]
    prompts = random_prompts(lengths)
    batched = greedy(model, prompts, 18)
    assert batched == greedy(model, prompts, 18, use_cache=False)
    # left padding changes nothing: each row writes what it writes alone
    assert batched == [greedy(model, [p], 18)[0] for p in prompts]


def test_oracle_is_a_plain_full_forward():
    # the no-cache path, written out by hand: argmax of the last logits of the whole context
    model = random_model()
    context = random_prompts([6])[0]
    expected = []
    with torch.no_grad():
        for _ in range(10):
            logits, _ = model(torch.tensor([context + expected]))
            expected.append(int(logits[0, -1].argmax()))
    assert greedy(model, [context], 10, use_cache=False) == [expected]


def test_only_last_logits_equal_the_full_forwards_last_position():
    model = random_model()
    x = torch.tensor(random_prompts([20, 20, 20]))  # (3, 20)
    with torch.no_grad():
        full, _ = model(x)
        last, _ = model(x, only_last=True)
    assert last.shape == (3, 1, 64)
    assert torch.allclose(last, full[:, -1:], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="only_last"):
        model(x, x, only_last=True)


@pytest.mark.parametrize("chunked", [False, True])
def test_prefill_logits_are_each_rows_full_forward_at_its_last_token(chunked, monkeypatch):
    import tinystories.generate
    from tinystories.generate import _CachedDecoder

    if chunked:  # a budget that cuts the prompts into chunks of 2 tokens
        monkeypatch.setattr(tinystories.generate, "_PREFILL_ACTIVATIONS_BUDGET", 3 * 2 * (4 * 32 + 2 * 32))
    model = random_model()
    prompts = random_prompts([9, 1, 5])  # a left-padded batch
    with torch.inference_mode():
        got = _CachedDecoder(model, len(prompts), 32).prefill(prompts)
        for row, prompt in enumerate(prompts):
            expected, _ = model(torch.tensor([prompt]))
            # a padded batch (and, in chunks, attention over its keys in another order) sums in
            # another order than one prompt alone: equal within fp32 rounding, at any thread count
            assert torch.allclose(got[row], expected[0, -1], atol=1e-5, rtol=1e-5)


def test_window_start_rule():
    assert window_start(16, 0, block_size=16, window_keep=8) == 0
    assert window_start(17, 0, block_size=16, window_keep=8) == 9
    assert window_start(24, 9, block_size=16, window_keep=8) == 9  # 15 visible: no jump
    assert window_start(26, 9, block_size=16, window_keep=8) == 18
    assert window_start(17, 0, block_size=16, window_keep=16) == 1  # keep = block: crop every step


@pytest.mark.parametrize("window_keep", [None, 1, 5, 16])
def test_sliding_window_past_block_size_matches_the_oracle(window_keep):
    model = random_model(block_size=16)
    prompts = random_prompts([3, 10, 15, 40])  # the last is longer than block_size from the start
    cached = greedy(model, prompts, 45, window_keep=window_keep)
    assert cached == greedy(model, prompts, 45, use_cache=False, window_keep=window_keep)
    assert cached == [greedy(model, [p], 45, window_keep=window_keep)[0] for p in prompts]


def test_window_keep_block_size_is_nanogpt_crop():
    # nanoGPT's rule, written out by hand: every step, look at the last block_size tokens only
    model = random_model(block_size=16)
    context = random_prompts([12])[0]
    expected = []
    with torch.no_grad():
        for _ in range(30):
            logits, _ = model(torch.tensor([(context + expected)[-16:]]))
            expected.append(int(logits[0, -1].argmax()))
    assert greedy(model, [context], 30, window_keep=16) == [expected]


# -----------------------------------------------------------------------------
# Prompts longer than a RoPE model's block_size: a bounded prefill, the oracle's tokens


@pytest.mark.parametrize("chunk", [1, 3, 7, 16])
def test_chunks_written_past_the_rings_end_give_the_windowed_forwards_logits(chunk):
    """A RoPE cache of block_size keys takes chunks of up to block_size tokens past its end (each
    query sees the last block_size tokens, itself included): the logits of a forward over the
    whole sequence in which every layer sees the last block_size tokens."""
    model = random_model(block_size=16, **LLAMA_BLOCK)
    idx = torch.tensor(random_prompts([90, 90]))  # (2, 90): the ring turns over 5 times
    with torch.no_grad():
        expected, _ = model(idx, window=16)
        cache = model.new_kv_cache(2, 16)
        got = torch.cat([model(idx[:, i : i + chunk], kv_cache=cache)[0] for i in range(0, 90, chunk)], dim=1)
        assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()
        with pytest.raises(ValueError, match="at most that many"):
            model(idx[:, :17], kv_cache=cache)  # more than the cache holds at once


def test_a_long_rope_prompt_gives_the_oracles_greedy_tokens():
    """The cache is filled from the last `reach` tokens of each prompt (what the next token depends
    on through the layers); the oracle runs over all 2,000. Rows of 3, 40 and 2,000 tokens in one
    batch (padding longer than the cache, written past its end) write what each writes alone."""
    model = random_model(block_size=16, **LLAMA_BLOCK)
    assert reach(model.config) == 31  # two layers, each 15 tokens back, and the token itself
    prompts = random_prompts([3, 40, 2000])
    cached = greedy(model, prompts, 30)
    assert cached == greedy(model, prompts, 30, use_cache=False)
    assert cached == [greedy(model, [p], 30)[0] for p in prompts]
    assert len(set(cached[2])) > 3  # not one token over and over
    # the reach is exact: of 32 tokens, the first changes nothing after the last, the second does
    seq = torch.tensor([prompts[2][-32:]])
    changed = [seq.clone(), seq.clone()]
    changed[0][0, 0], changed[1][0, 1] = (seq[0, 0] + 1) % 64, (seq[0, 1] + 1) % 64
    with torch.no_grad():
        last = [model(x, window=16)[0][0, -1] for x in (seq, *changed)]
    assert torch.equal(last[0], last[1]) and not torch.allclose(last[0], last[2])


def test_a_30000_token_prompt_costs_a_few_forward_passes(monkeypatch):
    """The `tiny` preset's shape (3 layers, block_size 256): a 30,000-token prompt is filled in 3
    forward passes of its last 766 tokens, against one of 256 for a 256-token prompt; a step
    counter, not a clock. Its tokens are the oracle's over more than its reach."""
    torch.manual_seed(0)
    model = GPT(get_preset("tiny")).eval()
    calls: list[int] = []  # the tokens of each forward pass of the model or its decoding copy
    forward = GPT.forward
    monkeypatch.setattr(GPT, "forward", lambda self, idx, *a, **kw: calls.append(idx.shape[1]) or forward(self, idx, *a, **kw))
    prompt = random_prompts([30_000], vocab_size=4096)[0]

    greedy(model, [prompt[-256:]], 8)
    short_calls = [n for n in calls if n > 1]  # decode steps are one token each (or no forward at all)
    calls.clear()
    tokens = greedy(model, [prompt], 8)
    prefill = [n for n in calls if n > 1]
    assert short_calls == [256]
    assert prefill == [256, 256, 254] and sum(prefill) == reach(model.config) == 766
    assert len(calls) <= len(prefill) + 8  # and one-token decode steps, never one per prompt token
    assert tokens == greedy(model, [prompt[-2000:]], 8, use_cache=False)  # 2,000 tokens: past the reach


def test_model_mode_is_given_back():
    model = random_model().train()
    greedy(model, random_prompts([4]), 3)
    assert model.training


# -----------------------------------------------------------------------------
# Stopping and seeds


def test_rows_stop_at_end_of_text():
    model = random_model()
    prompts = random_prompts([5, 9, 2])
    free = greedy(model, prompts, 12)
    eot = free[0][3]  # row 0 writes this token at step 3; use it as end-of-text
    steps = list(stream(model, prompts, 12, temperature=0.0, eot_id=eot))
    row0 = [s[0] for s in steps]
    end = free[0].index(eot)
    assert row0[: end + 1] == free[0][: end + 1] and all(t is None for t in row0[end + 1 :])
    stories = greedy(model, prompts, 12, eot_id=eot)
    for story, unstopped in zip(stories, free):
        cut = unstopped.index(eot) + 1 if eot in unstopped else len(unstopped)
        assert story == unstopped[:cut]
    assert stories[0][-1] == eot


def test_stream_stops_when_every_row_ended():
    model = random_model()
    prompts = random_prompts([4, 4])
    first = greedy(model, prompts, 1)
    steps = list(stream(model, prompts, 50, temperature=0.0, eot_id=first[0][0]))
    if first[1][0] == first[0][0]:
        assert len(steps) == 1
    else:  # row 1 goes on until it too writes that token, or the budget ends
        assert steps[0][0] == first[0][0] and all(s[0] is None for s in steps[1:])
        assert len(steps) == 50 or steps[-1][1] == first[0][0]


def test_max_new_tokens():
    model = random_model()
    assert [len(s) for s in greedy(model, random_prompts([3, 6]), 7)] == [7, 7]
    assert greedy(model, random_prompts([3]), 0) == [[]]


def test_same_seed_same_story_other_seed_other_story():
    model = random_model(scale=2.0)
    prompts = random_prompts([4, 7])

    def sample(seed, **kwargs):
        g = torch.Generator().manual_seed(seed)
        return generate(model, prompts, 25, temperature=1.0, top_p=0.95, generator=g, **kwargs)

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    assert sample(1) == sample(1, use_cache=False)  # same draws, same logits up to float noise


def test_bad_prompts_are_refused():
    model = random_model()
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1, 2], []], 3)
    with pytest.raises(ValueError, match="vocab_size"):
        generate(model, [[64]], 3)


# -----------------------------------------------------------------------------
# Text as it is written


@pytest.mark.parametrize("which", ["gpt2", "bpe"])
def test_text_stream_never_prints_half_a_character(which, gpt2_dir, checkpoint_dir):
    from tinystories.tokenizer import Tokenizer, load_gpt2

    tok = load_gpt2(gpt2_dir) if which == "gpt2" else Tokenizer.load(checkpoint_dir)
    text = "A café — “hi” 😀 and 日本語!"
    ids = tok.encode(text)
    assert "\ufffd" in "".join(tok.decode([i]) for i in ids)  # some tokens are half a character
    stream_ = TextStream(tok)
    pieces = [stream_.push(i) for i in ids] + [stream_.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


# -----------------------------------------------------------------------------
# The command


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory, v1_train_head):
    from tinystories.checkpoint import save_checkpoint
    from tinystories.tokenizer import train_bpe

    tok = train_bpe(read_stories(v1_train_head, limit=300), 512, show_progress=False)
    model = random_model(block_size=64, vocab_size=tok.vocab_size, scale=3.0)
    return save_checkpoint(tmp_path_factory.mktemp("gen") / "ckpt", model, tok)


def test_cli_same_seed_same_stdout(checkpoint_dir):
    cmd = [sys.executable, "-m", "tinystories", "generate", "--checkpoint", str(checkpoint_dir),
           "--prompt", "Once upon a time", "--max-new-tokens", "20", "--seed", "1"]
    runs = [subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr
    assert runs[0].stdout == runs[1].stdout
    assert runs[0].stdout.startswith("Once upon a time") and len(runs[0].stdout) > len("Once upon a time\n")


def test_cli_prints_the_story_as_it_is_written(checkpoint_dir, monkeypatch):
    import io

    class Terminal(io.StringIO):
        """Remembers what had been printed at each flush, as a terminal would show it."""

        def __init__(self):
            super().__init__()
            self.shown = []

        def flush(self):
            self.shown.append(self.getvalue())

    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    args = ["generate", "--checkpoint", str(checkpoint_dir), "--prompt", "Once", "--max-new-tokens", "30",
            "--temperature", "0", "--seed", "1"]
    assert main(args) == 0
    shown = [s for i, s in enumerate(terminal.shown) if i == 0 or s != terminal.shown[i - 1]]
    assert len(shown) >= 4, shown  # the prompt, then piece after piece, not the story at the end
    assert shown[0] == "Once" and all(b.startswith(a) for a, b in zip(shown, shown[1:]))


def test_cli_num_samples_and_empty_prompt(checkpoint_dir, capsys):
    args = ["generate", "--checkpoint", str(checkpoint_dir), "--max-new-tokens", "10", "--seed", "3"]
    assert main(args + ["--prompt", "The cat", "--num-samples", "3"]) == 0
    out = capsys.readouterr().out
    headers = [line for line in out.splitlines() if line.startswith("=== sample")]
    assert headers == ["=== sample 1/3 ===", "=== sample 2/3 ===", "=== sample 3/3 ==="]
    assert out.count("\nThe cat") == 3
    assert main(args + ["--prompt", ""]) == 0
    assert capsys.readouterr().out.strip()  # a story from scratch, not nothing


@pytest.mark.skipif(not int8_supported(), reason="no fbgemm kernels in this PyTorch build")
def test_cli_int8_writes_a_story_and_the_same_one_again(checkpoint_dir, capsys):
    args = ["generate", "--checkpoint", str(checkpoint_dir), "--max-new-tokens", "20", "--seed", "5",
            "--prompt", "The cat"]
    assert main(args + ["--dtype", "int8"]) == 0
    first = capsys.readouterr().out
    assert main(args + ["--dtype", "int8"]) == 0
    assert capsys.readouterr().out == first and first.startswith("The cat") and len(first) > len("The cat\n")


def test_cli_int8_elsewhere_than_the_cpu_is_one_line(checkpoint_dir, capsys, monkeypatch):
    # a GPU machine: the CUDA device exists, int8 is refused before the checkpoint is loaded
    monkeypatch.setattr("tinystories.device.pick_device", lambda name: torch.device("cuda"))
    code = main(["generate", "--checkpoint", str(checkpoint_dir), "--dtype", "int8", "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "CPU only" in err and "bf16" in err


@pytest.mark.parametrize(
    "flags",
    [["--temperature", "-1"], ["--top-p", "0"], ["--top-p", "1.5"], ["--top-k", "0"]],
)
def test_cli_bad_values_give_one_line(checkpoint_dir, capsys, flags):
    code = main(["generate", "--checkpoint", str(checkpoint_dir), *flags])
    err = capsys.readouterr().err
    assert code != 0 and len(err.strip().splitlines()) == 1 and "error" in err


def test_cli_unknown_dtype_gives_one_line(checkpoint_dir, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["generate", "--checkpoint", str(checkpoint_dir), "--dtype", "int4"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and len(err.strip().splitlines()) == 1 and "int8" in err


def test_cli_missing_checkpoint_gives_one_line(tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
