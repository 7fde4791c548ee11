"""`tinystories evaluate`: the numbers against independent reference computations, the window
plan at its edges, --text against --data, and the command's errors.

A tiny model (2 layers, 32 wide, block_size 64) is trained for 60 steps on real TinyStories text
with a 512-token BPE, so its loss is far from uniform and a wrong context would show.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tinystories.checkpoint import save_checkpoint
from tinystories.cli import main
from tinystories.config import ModelConfig
from tinystories.evaluate import plan_windows, score_tokens, story_bounds, summarize, tokenize_stories
from tinystories.model import GPT
from tinystories.tokenizer import train_bpe

REPO = Path(__file__).resolve().parents[1]
TINYSTORIES = REPO.parent / "shared" / "data" / "tinystories"
BLOCK = 64


def official_stories(name, limit):
    text = (TINYSTORIES / name).read_text(encoding="utf-8")
    stories = [s.strip() for s in text.split("<|endoftext|>")]
    return [s for s in stories if s][:limit]


def write_data_dir(folder: Path, tokenizer, splits: dict[str, list[str]]) -> Path:
    """A DATA_DIR per the documented schema (what `tinystories prepare` writes)."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(folder)
    meta = {"format": "tinystories-data", "format_version": 1, "tokenizer": tokenizer.spec(), "dtype": "uint16",
            "splits": {}}
    for split, stories in splits.items():
        tokens = tokenize_stories(stories, tokenizer)
        tokens.astype(np.uint16).tofile(folder / f"{split}.bin")
        meta["splits"][split] = {"file": f"{split}.bin", "stories": len(stories), "tokens": len(tokens),
                                 "bytes": sum(len(s.encode("utf-8")) for s in stories)}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))
    return folder


def train_tiny(tokens: np.ndarray, vocab_size: int, steps: int = 60, block_size: int = BLOCK) -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size, vocab_size=vocab_size, dropout=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.from_numpy(tokens.astype(np.int64))
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(len(data) - block_size - 1, (16,), generator=g)
        batch = torch.stack([data[s : s + block_size + 1] for s in starts])  # (16, block_size + 1)
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def raw_official_head(name, n_stories) -> str:
    """The first n stories of an official-format file exactly as written (quirks included)."""
    text = (TINYSTORIES / name).read_text(encoding="utf-8")
    return "<|endoftext|>".join(text.split("<|endoftext|>")[:n_stories]) + "<|endoftext|>\n"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_thread):
    """DATA_DIR made by `tinystories prepare` (bpe-512), and a model trained on its train split.

    The test split is made from valid.txt: first sentences of real stories, which fit block_size,
    written with the official files' quirks (blank line or space after a separator, trailing
    spaces), plus two longer stories that need sliding windows.
    """
    from tinystories.data import load_data_tokenizer
    from tinystories.prepare import prepare

    root = tmp_path_factory.mktemp("evaluate")
    (root / "train.txt").write_text(raw_official_head("TinyStories-train.head.txt", 300), encoding="utf-8")
    firsts = [s.split(".")[0] + "." for s in official_stories("TinyStoriesV2-train.head.txt", 60)]
    long = [s[: s.find(".", 350) + 1] for s in official_stories("TinyStories-valid.head.txt", 3)[1:]]
    pieces = [("\n" if i % 3 == 0 else " " if i % 3 == 1 else "") + s + ("  " if i % 2 else "")
              for i, s in enumerate(firsts + long)]
    (root / "valid.txt").write_text("".join(f"{p}\n<|endoftext|>\n" for p in pieces), encoding="utf-8")
    data = root / "data"
    prepare(str(root / "train.txt"), data, tokenizer="bpe-512", test=str(root / "valid.txt"), progress=False)
    tokenizer = load_data_tokenizer(data)
    model = train_tiny(np.fromfile(data / "train.bin", dtype=np.uint16), tokenizer.vocab_size)
    ckpt = save_checkpoint(root / "ckpt", model, tokenizer, step=60)
    return {"root": root, "tokenizer": tokenizer, "data": data, "ckpt": ckpt, "model": model,
            "test": [p.strip() for p in pieces], "long": long, "valid_txt": root / "valid.txt"}


def run_cli(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -----------------------------------------------------------------------------
# Pure pieces


@pytest.mark.parametrize("length,block,stride", [(1, 8, 4), (8, 8, 4), (9, 8, 4), (17, 8, 4), (100, 8, 3),
                                                 (100, 8, 8), (100, 8, 1), (33, 16, 16), (12, 4, 2)])
def test_plan_windows_scores_every_target_once_with_enough_context(length, block, stride):
    windows = plan_windows(length, block, stride)
    scored = []
    for begin, score_from, end in windows:
        assert 0 <= begin <= score_from < end <= length and end - begin <= block
        scored += list(range(score_from, end))
        for t in range(score_from, end):  # context of target t in its window: t - begin tokens before it
            assert t - begin >= min(t, block - stride), (t, begin)
    assert scored == list(range(length))  # each exactly once, in order
    assert windows[-1][2] == length and (length <= block or windows[-1][2] - windows[-1][0] == block)


def test_plan_windows_refuses_a_stride_outside_the_block():
    with pytest.raises(ValueError):
        plan_windows(20, 8, 0)
    with pytest.raises(ValueError):
        plan_windows(20, 8, 9)


def test_story_bounds_cover_every_token_including_a_cut_off_tail():
    eot = 9
    tokens = np.array([1, 2, 9, 9, 3, 4, 5, 9, 6, 7], dtype=np.uint16)
    starts, ends = story_bounds(tokens, eot, chunk=3)  # chunk=3: an EOT on a chunk border still counts
    assert starts.tolist() == [0, 3, 4, 8] and ends.tolist() == [3, 4, 8, 10]
    starts, ends = story_bounds(np.zeros(0, dtype=np.uint16), eot)
    assert len(starts) == len(ends) == 0


def test_summarize_units():
    r = summarize(total_nats=1000.0, tokens=400, n_bytes=1600)
    assert r["loss"] == 2.5 and r["perplexity"] == pytest.approx(math.exp(2.5), rel=1e-12)
    assert r["bits_per_byte"] == pytest.approx(1000.0 / math.log(2) / 1600, rel=1e-12)


# -----------------------------------------------------------------------------
# The numbers against references


def reference_story_nats(model, tokens, eot, block_size, stride):
    """Per story, per scored target, one forward over exactly that target's context: no batching,
    no padding, no window arithmetic but the plan."""
    total, count = 0.0, 0
    with torch.no_grad():
        for s, e in zip(*story_bounds(tokens, eot)):
            story = [int(t) for t in tokens[s:e]]
            inputs = [eot] + story[:-1]
            for begin, score_from, end in plan_windows(len(story), block_size, stride):
                for t in range(score_from, end):
                    logits, _ = model(torch.tensor([inputs[begin : t + 1]]))
                    total += F.cross_entropy(logits[0, -1:], torch.tensor([story[t]]), reduction="sum").double().item()
                    count += 1
    return total, count


def test_loss_equals_a_naive_per_story_full_context_loop(setup, tmp_path, capsys):
    """Stories that fit block_size: one plain forward per whole story. The two longer ones: one
    forward per target over exactly the context the window plan gives it."""
    out = tmp_path / "test.json"
    code, stdout, _ = run_cli(["evaluate", "--checkpoint", str(setup["ckpt"]), "--data", str(setup["data"]),
                               "--split", "test", "--json", str(out), "--device", "cpu", "--batch-size", "7"], capsys)
    assert code == 0
    r = json.loads(out.read_text())
    for key in ("loss", "perplexity", "bits_per_byte", "tokens", "bytes", "stories", "tokenizer", "split"):
        assert key in r
    assert r["split"] == "test" and r["tokenizer"] == "bpe-512"
    assert abs(r["perplexity"] - math.exp(r["loss"])) < 1e-6

    tok, model = setup["tokenizer"], setup["model"]
    total, count, n_bytes, windowed = 0.0, 0, 0, 0
    with torch.no_grad():
        for story in setup["test"]:
            ids = tok.encode(story)
            n_bytes += len(story.encode("utf-8"))
            if len(ids) + 1 > BLOCK:
                t, c = reference_story_nats(model, tokenize_stories([story], tok), tok.eot_id, BLOCK, BLOCK // 2)
                total, count, windowed = total + t, count + c, windowed + 1
                continue
            x = torch.tensor([[tok.eot_id] + ids])  # (1, L): end-of-text, then the story
            y = torch.tensor(ids + [tok.eot_id])  # the story, then its end-of-text
            logits, _ = model(x)
            total += F.cross_entropy(logits[0], y, reduction="sum").double().item()
            count += len(y)
    assert windowed == len(setup["long"]) == 2
    assert r["tokens"] == count and r["bytes"] == n_bytes and r["stories"] == len(setup["test"])
    assert abs(r["loss"] - total / count) < 1e-5
    assert abs(r["bits_per_byte"] - total / math.log(2) / n_bytes) < 1e-5
    assert 0.5 < r["loss"] < math.log(512)  # trained: better than uniform
    assert "loss" in stdout and "bits/byte" in stdout and "test split" in stdout


@pytest.mark.parametrize("stride", [None, 64, 13])
def test_long_stories_sliding_windows_equal_a_per_target_reference(setup, stride):
    tok, model = setup["tokenizer"], setup["model"]
    tokens = tokenize_stories(setup["long"], tok)
    assert len(tokens) > 4 * BLOCK  # several windows per story
    total, count = score_tokens(model, tokens, tok.eot_id, stride=stride, batch_size=5, progress=False)
    ref_total, ref_count = reference_story_nats(model, tokens, tok.eot_id, BLOCK, stride or BLOCK // 2)
    assert count == ref_count == len(tokens)
    assert abs(total / count - ref_total / ref_count) < 1e-5


def test_results_do_not_depend_on_batch_size_or_story_order(setup):
    tok, model = setup["tokenizer"], setup["model"]
    stories = setup["long"] + setup["test"][:10]
    a = score_tokens(model, tokenize_stories(stories, tok), tok.eot_id, batch_size=1, progress=False)
    b = score_tokens(model, tokenize_stories(stories[::-1], tok), tok.eot_id, batch_size=16, progress=False)
    assert a[1] == b[1] and abs(a[0] - b[0]) / a[0] < 1e-6


def test_text_file_gives_the_numbers_of_the_split_made_from_it(setup, tmp_path, capsys):
    """valid.txt (quirks and all) made the test split; scoring the file itself must agree exactly
    (same tokens, same batches: bit for bit; other batch sizes agree to float32 rounding)."""
    code, _, _ = run_cli(["evaluate", "--checkpoint", str(setup["ckpt"]), "--data", str(setup["data"]),
                          "--split", "test", "--json", str(tmp_path / "a.json"), "--device", "cpu"], capsys)
    assert code == 0
    code, stdout, _ = run_cli(["evaluate", "--checkpoint", str(setup["ckpt"]), "--text", str(setup["valid_txt"]),
                               "--json", str(tmp_path / "b.json"), "--device", "cpu"], capsys)
    assert code == 0 and str(setup["valid_txt"]) in stdout
    a, b = json.loads((tmp_path / "a.json").read_text()), json.loads((tmp_path / "b.json").read_text())
    assert a["stories"] == b["stories"] == len(setup["test"])
    assert (a["tokens"], a["bytes"]) == (b["tokens"], b["bytes"])
    for key in ("loss", "perplexity", "bits_per_byte", "total_nats"):
        assert a[key] == b[key]
    assert b["text"] == str(setup["valid_txt"]) and b["split"] is None


# -----------------------------------------------------------------------------
# Errors: one line, exit code 2


def test_mixing_tokenizers_is_refused(setup, tmp_path, capsys):
    other = train_bpe(official_stories("TinyStoriesV2-train.head.txt", 100), 300, show_progress=False)
    data = write_data_dir(tmp_path / "other", other, {"val": setup["test"][:5]})
    code, _, err = run_cli(["evaluate", "--checkpoint", str(setup["ckpt"]), "--data", str(data), "--device", "cpu"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "tokenizer bpe-512" in err and "bpe-300" in err


@pytest.mark.parametrize("case", ["no checkpoint", "no data", "no split", "no text", "bad stride", "empty text"])
def test_user_errors_are_one_line(setup, tmp_path, capsys, case):
    ckpt, data = str(setup["ckpt"]), str(setup["data"])
    (tmp_path / "empty.txt").write_text("\n<|endoftext|>\n  \n<|endoftext|>\n")
    argv = {
        "no checkpoint": ["--checkpoint", str(tmp_path / "nope"), "--data", data],
        "no data": ["--checkpoint", ckpt, "--data", str(tmp_path / "nope")],
        "no split": ["--checkpoint", ckpt, "--data", str(write_data_dir(tmp_path / "d", setup["tokenizer"],
                                                                         {"val": setup["test"][:3]})), "--split", "test"],
        "no text": ["--checkpoint", ckpt, "--text", str(tmp_path / "nope.txt")],
        "bad stride": ["--checkpoint", ckpt, "--data", data, "--stride", "65"],
        "empty text": ["--checkpoint", ckpt, "--text", str(tmp_path / "empty.txt")],
    }[case]
    code, _, err = run_cli(["evaluate", *argv, "--device", "cpu"], capsys)
    assert code == 2, err
    assert err.startswith("tinystories evaluate: error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_command_line_process_prints_one_line_and_exits_nonzero(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tinystories", "evaluate", "--checkpoint", str(tmp_path / "nope"),
                           "--text", str(tmp_path / "x.txt")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr
