"""The story-quality report: text measures, the memorization index, the judge client against a
real HTTP server on 127.0.0.1, and `tinystories quality` end to end."""

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from tinystories.cli import main
from tinystories.errors import UserError
from tinystories.judge import JudgeClient, parse_grades, summarize_grades
from tinystories.memorization import NgramIndex, ngram_hashes
from tinystories.quality import (DEFAULT_PROTOCOL, PAPER_PROMPTS_FILE, PAPER_PROTOCOL, distinct_n, load_prompt_set,
                                 read_prompts, repetition, words)

REPO = Path(__file__).resolve().parents[1]
TINYSTORIES = REPO.parent / "shared" / "data" / "tinystories"
PAPER_PROMPTS = TINYSTORIES / PAPER_PROMPTS_FILE  # the reconstruction of the hub file (see its PROVENANCE.md)
os.environ.setdefault("TINYSTORIES_GPT2_VOCAB", str(REPO.parent / "shared" / "data" / "gpt2"))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def official_stories(name, limit=None):
    text = (TINYSTORIES / name).read_text(encoding="utf-8")
    stories = [s.strip() for s in text.split("<|endoftext|>")]
    return [s for s in stories if s][:limit]


# -----------------------------------------------------------------------------
# Text measures and the fixed beginnings


def test_words_distinct_and_repetition_at_their_edges():
    assert words("Tom's dog ran. It RAN!") == ["tom's", "dog", "ran", ".", "it", "ran", "!"]
    assert distinct_n([["a", "b"], ["a", "c"]], 1) == 3 / 4
    assert distinct_n([["a", "b"], ["a", "b"]], 2) == 1 / 2
    assert distinct_n([["a"]], 2) is None  # no bigram at all
    assert repetition(["a", "b", "c", "d"] * 3, 4) == 5 / 9  # 9 four-grams, 4 distinct
    assert repetition(list("abcdefg"), 4) == 0.0
    assert repetition(list("abc"), 4) is None


def test_the_packaged_beginnings_are_at_least_50_distinct_and_not_from_the_dataset():
    prompts = read_prompts()
    assert len(prompts) >= 50 and len(set(prompts)) == len(prompts)
    assert all(10 < len(p) < 200 for p in prompts)
    corpus = "".join((TINYSTORIES / f).read_text(encoding="utf-8") for f in os.listdir(TINYSTORIES) if f.endswith(".txt"))
    copied = [p for p in prompts if p in corpus]
    assert copied == []


def test_a_prompt_file_of_comments_only_is_refused(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# nothing\n\n")
    with pytest.raises(UserError, match="no story beginnings"):
        read_prompts(f)


def test_the_papers_prompt_file_parses_to_its_44_beginnings_kept_verbatim(tmp_path):
    ps = load_prompt_set(str(PAPER_PROMPTS), tmp_path / "cache")
    assert ps.name == "paper" and ps.source == str(PAPER_PROMPTS) and ps.protocol == PAPER_PROTOCOL
    assert ps.sha256 == "7d2b2e67ef96d99215fae332f6802858796a1ef200d116edcec5bd5ba7d599e2"  # PROVENANCE.md's
    assert len(ps.prompts) == 44 and len(set(ps.prompts)) == 44 and all(isinstance(p, str) for p in ps.prompts)
    # the first beginning and the paper's Figure 8 one (index 42), compared by hash: the prompts stay in ../shared
    digest = lambda text: hashlib.sha256(text.encode()).hexdigest()
    assert digest(ps.prompts[0]) == "71da3ce1e3872c86b0fae67cb9ac9b9617a23622783501b6ade3cfbc696d1d69"
    assert digest(ps.prompts[42]) == "091bf73a6918f82ee5af1791a2f502f3881f951c399a11c0eba18fae8c0545bb"
    # not stripped or re-spelt: the paper's models completed these exact strings
    assert sum(p.endswith(" ") for p in ps.prompts) == 1 and any("vey busy" in p for p in ps.prompts)
    assert sum("\n\n" in p for p in ps.prompts) > 10  # paragraphs survive the YAML block scalars


def test_the_other_prompt_sets_keep_the_default_protocol(tmp_path):
    packaged = load_prompt_set("packaged", tmp_path)
    assert packaged.name == "packaged" and packaged.prompts == read_prompts() and packaged.protocol == DEFAULT_PROTOCOL
    f = tmp_path / "mine.txt"
    f.write_text("# mine\nTom found a key.\nSue had a red hat.\n")
    mine = load_prompt_set(str(f), tmp_path)
    assert (mine.name, mine.protocol) == ("file", DEFAULT_PROTOCOL)
    assert mine.prompts == ["Tom found a key.", "Sue had a red hat."]


# -----------------------------------------------------------------------------
# Memorization


def brute_force(train, completion, n):
    """Longest span of `completion` found in `train` (>= n tokens, else 0) and n-gram overlap, by hand."""
    T, c = [int(t) for t in train], [int(t) for t in completion]

    def occurs(s):
        return any(T[p : p + len(s)] == s for p in range(len(T) - len(s) + 1))

    found = [occurs(c[i : i + n]) for i in range(len(c) - n + 1)]
    best = max((j - i for i in range(len(c)) for j in range(i + n, len(c) + 1) if occurs(c[i:j])), default=0)
    return best, (sum(found) / len(found) if found else None)


@pytest.mark.parametrize("hash_bits,max_bucket", [(None, 1 << 26), (3, 1 << 26), (1, 7), (None, 16)])
def test_index_matches_brute_force_even_with_hash_collisions_and_buckets(hash_bits, max_bucket):
    """hash_bits=1 or 3: nearly every n-gram collides, so only the token check keeps results exact;
    small max_bucket: the bucketed build must sort exactly like the in-memory one."""
    rng = np.random.default_rng(hash_bits or 0)
    for _ in range(12):
        vocab, size, n = int(rng.integers(2, 6)), int(rng.integers(30, 250)), int(rng.integers(1, 5))
        train = rng.integers(0, vocab, size).astype(np.uint16)
        index = NgramIndex.build(train, n, hash_bits=hash_bits, max_bucket=max_bucket)
        assert np.all(index.keys[1:] >= index.keys[:-1]) and len(index.keys) == size - n + 1
        for q in range(4):
            if q % 2:  # a piece of the training tokens with random tokens around it
                s = int(rng.integers(0, size - 12))
                piece = train[s : s + int(rng.integers(1, 12))]
                c = np.concatenate([rng.integers(0, vocab, 3), piece, rng.integers(0, vocab, 4)])
            else:
                c = rng.integers(0, vocab, int(rng.integers(0, 20)))
            r = index.match(c)
            best, overlap = brute_force(train, c, n)
            assert r["longest_span"] == best
            assert (r["overlap"] is None and overlap is None) or abs(r["overlap"] - overlap) < 1e-12
            if best:
                p, i = r["train_position"], r["longest_span_start"]
                assert train[p : p + best].tolist() == c[i : i + best].tolist()


def test_bucketed_build_on_disk_equals_the_in_memory_build(tmp_path):
    train = np.random.default_rng(1).integers(0, 50, 5000).astype(np.uint16)
    a = NgramIndex.build(train, 4)
    NgramIndex.build(train, 4, tmp_path / "i.npy", max_bucket=300, chunk=777)  # 32 buckets, odd chunks
    assert np.array_equal(a.keys, np.load(tmp_path / "i.npy"))


@pytest.fixture(scope="module")
def gpt2_train():
    """GPT-2 tokens of 400 real training stories, each followed by end-of-text."""
    from tinystories.evaluate import tokenize_stories
    from tinystories.tokenizer import load_gpt2

    tok = load_gpt2()
    stories = official_stories("TinyStoriesV2-train.sample.txt", 400)
    return tok, stories, tokenize_stories(stories, tok).astype(np.uint16)


def test_a_copied_story_scores_full_overlap_and_a_fresh_sentence_scores_low(gpt2_train, tmp_path):
    tok, stories, train = gpt2_train
    index = NgramIndex.open_or_build(tmp_path / "train.ngram8.npy", train, n=8, progress=False)
    copied = tok.encode(stories[123])
    r = index.match(copied)
    assert r["overlap"] == 1.0 and r["longest_span"] == len(copied) and r["longest_span_start"] == 0
    assert train[r["train_position"] : r["train_position"] + len(copied)].tolist() == copied

    middle = tok.encode(stories[7])[20:90]  # copied from inside a story
    assert index.match(middle)["longest_span"] == len(middle)

    fresh = tok.encode("The quiet engineer painted seventeen violet lighthouses on the frozen moon "
                       "while a kettle hummed old songs about copper bridges and patient whales.")
    r = index.match(fresh)
    assert r["overlap"] < 0.1 and r["longest_span"] < 10

    # stitched from two stories: every n-gram is found, but no span longer than either half
    a, b = tok.encode(stories[1])[:40], tok.encode(stories[2])[:40]
    r = index.match(a + b)
    assert r["longest_span"] < 50 and r["overlap"] > 0.85


def test_the_index_is_reused_until_the_training_file_changes(gpt2_train, tmp_path):
    _, _, train = gpt2_train
    source = tmp_path / "train.bin"
    train.tofile(source)
    path = tmp_path / "train.bin.ngram8.npy"
    NgramIndex.open_or_build(path, np.memmap(source, dtype=np.uint16, mode="r"), n=8, source=source, progress=False)
    built = path.stat().st_mtime_ns
    NgramIndex.open_or_build(path, np.memmap(source, dtype=np.uint16, mode="r"), n=8, source=source, progress=False)
    assert path.stat().st_mtime_ns == built  # reused
    train[:1000].tofile(source)  # a re-prepared, different train.bin
    index = NgramIndex.open_or_build(path, np.memmap(source, dtype=np.uint16, mode="r"), n=8, source=source, progress=False)
    assert len(index.keys) == 1000 - 8 + 1
    assert json.loads(path.with_suffix(".json").read_text())["tokens"] == 1000


def test_ngram_hashes_are_those_of_each_window():
    t = np.array([5, 1, 2, 5, 1, 2, 5], dtype=np.uint16)
    h = ngram_hashes(t, 3)
    assert len(h) == 5 and h[0] == h[3] and len({int(x) for x in h[:3]}) == 3
    assert np.array_equal(ngram_hashes(t[1:4], 3), h[1:2])


# -----------------------------------------------------------------------------
# The judge, against a real HTTP server on 127.0.0.1

GOOD = {"comment": "Fine.", "grammar": 8, "creativity": "6/10", "consistency": 7, "plot": 7.0, "age_group": "B: 4-5"}


def chat_reply(content: str) -> bytes:
    return json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}).encode()


class ScriptedJudge(BaseHTTPRequestHandler):
    """Answers POST /v1/chat/completions from server.script (status, headers, body), then good replies."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.log.append({"t": time.monotonic(), "path": self.path, "auth": self.headers.get("Authorization"),
                                "body": body})
        status, headers, payload = self.server.script.pop(0) if self.server.script else (200, {}, chat_reply(json.dumps(GOOD)))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):  # keep pytest's output clean
        pass


@pytest.fixture
def judge_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedJudge)
    server.script, server.log = [], []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_judge_reads_a_good_reply_and_sends_the_rubric(judge_server):
    server, url = judge_server
    judge = JudgeClient(url, "judge-model", api_key="sk-test", rate=None, backoff=0.01)
    g = judge.grade("Tom had a kite. One day", " the wind took it away and Tom cried.")
    assert (g["grammar"], g["creativity"], g["consistency"], g["plot"], g["age_group"]) == (8, 6, 7, 7, "B")
    assert g["error"] is None and g["attempts"] == 1
    req = server.log[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    assert req["body"]["model"] == "judge-model" and req["body"]["temperature"] == 0
    prompt = req["body"]["messages"][-1]["content"]
    assert "Tom had a kite. One day*** the wind took it away" in prompt
    for word in ("grammar", "creativity", "consistency", "plot", "A: 3 or under", "F: 13-16"):
        assert word in prompt


def test_judge_retries_throttling_server_errors_and_malformed_replies(judge_server):
    server, url = judge_server
    server.script = [
        (429, {"Retry-After": "0"}, b'{"error": "slow down"}'),
        (500, {}, b"oops"),
        (200, {"Content-Type": "text/html"}, b"<html>not json</html>"),
        (200, {}, chat_reply("What a lovely story! I liked it a lot.")),
        (200, {}, chat_reply('```json\n{"grammar": 11, "creativity": 5, "consistency": 5, "plot": 5, "age_group": "C"}\n```')),
    ]
    judge = JudgeClient(url, "m", rate=None, retries=5, backoff=0.01)
    g = judge.grade("Once", " upon a time.")
    assert g["error"] is None and g["attempts"] == 6 and g["grammar"] == 8
    assert len(server.log) == 6 and judge.requests == 6


def test_judge_waits_as_long_as_retry_after_says(judge_server):
    server, url = judge_server
    server.script = [(429, {"Retry-After": "0.3"}, b"{}")]
    judge = JudgeClient(url, "m", rate=None, backoff=0.001)
    assert judge.grade("a", "b")["error"] is None
    assert server.log[1]["t"] - server.log[0]["t"] >= 0.29


def test_judge_records_a_completion_it_cannot_grade_and_goes_on(judge_server):
    server, url = judge_server
    server.script = [(200, {}, chat_reply("no grades here"))] * 3
    judge = JudgeClient(url, "m", rate=None, retries=2, backoff=0.01)
    bad = judge.grade("a", "b")
    assert bad["error"] and "malformed" in bad["error"] and bad["grammar"] is None and bad["attempts"] == 3
    good = judge.grade("a", "b")
    assert good["error"] is None
    s = summarize_grades([bad, good])
    assert s["graded"] == 1 and s["ungraded"] == 1 and s["mean_grammar"] == 8 and s["age_groups"]["B"] == 1


def test_judge_keeps_to_its_rate_limit(judge_server):
    server, url = judge_server
    judge = JudgeClient(url, "m", rate=10.0)
    for _ in range(5):
        judge.grade("a", "b")
    times = [r["t"] - server.log[0]["t"] for r in server.log]
    # request k may start 0.1 * k s after the first at the earliest (less the server's own jitter)
    assert len(times) == 5 and all(t >= 0.1 * k - 0.01 for k, t in enumerate(times))


def test_judge_stops_at_once_on_a_refused_key(judge_server):
    server, url = judge_server
    server.script = [(401, {}, b'{"error": "bad key"}')]
    judge = JudgeClient(url, "m", rate=None, backoff=0.01)
    with pytest.raises(UserError, match="HTTP 401"):
        judge.grade("a", "b")
    assert len(server.log) == 1


def test_judge_that_cannot_be_reached_is_a_user_error():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = JudgeClient(f"http://127.0.0.1:{port}/v1", "m", rate=None, retries=1, backoff=0.01, timeout=2)
    with pytest.raises(UserError, match="cannot be reached"):
        judge.grade("a", "b")


@pytest.mark.parametrize("reply,expected", [
    ('{"grammar": 9, "creativity": 4, "consistency": 8, "plot": 6, "age_group": "c"}', (9, 4, 8, 6, "C")),
    ('Sure! Here it is:\n```\n{"Grammar": "7/10", "Creativity": 5, "Consistency": 6, "Plot": 6, "Age Group": "D"}\n```', (7, 5, 6, 6, "D")),
    ("Grammar: 6/10\nCreativity: 3\nConsistency: 5\nPlot: 4\nAge group: A (3 or under)", (6, 3, 5, 4, "A")),
])
def test_parse_grades_reads_what_judges_write(reply, expected):
    g = parse_grades(reply)
    assert (g["grammar"], g["creativity"], g["consistency"], g["plot"], g["age_group"]) == expected


@pytest.mark.parametrize("reply", ["", "I liked it.",
                                   '{"grammar": 0, "creativity": 5, "consistency": 5, "plot": 5, "age_group": "B"}',
                                   '{"grammar": 5, "creativity": 5, "consistency": 5, "plot": 5, "age_group": "G"}',
                                   '{"grammar": true, "creativity": 5, "consistency": 5, "plot": 5, "age_group": "B"}'])
def test_parse_grades_refuses_what_is_not_grades(reply):
    with pytest.raises(ValueError):
        parse_grades(reply)


# -----------------------------------------------------------------------------
# `tinystories quality` end to end


@pytest.fixture(scope="module")
def run_setup(tmp_path_factory):
    """DATA_DIR (bpe-512, via `tinystories prepare`) and an untrained model with its tokenizer."""
    from tinystories.checkpoint import save_checkpoint
    from tinystories.config import ModelConfig
    from tinystories.data import load_data_tokenizer
    from tinystories.model import GPT
    from tinystories.prepare import prepare

    root = tmp_path_factory.mktemp("quality")
    source = root / "train.txt"
    source.write_text("".join(f"{s}\n<|endoftext|>\n" for s in official_stories("TinyStories-train.head.txt", 200)))
    prepare(str(source), root / "data", tokenizer="bpe-512", progress=False)
    tok = load_data_tokenizer(root / "data")
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=128, vocab_size=tok.vocab_size, dropout=0.0))
    return {"root": root, "data": root / "data", "ckpt": save_checkpoint(root / "ckpt", model, tok, step=0), "tok": tok}


def test_quality_command_writes_json_and_markdown_with_every_measure(run_setup, judge_server, tmp_path, capsys, monkeypatch):
    server, url = judge_server
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-local")
    argv = ["quality", "--checkpoint", str(run_setup["ckpt"]), "--data", str(run_setup["data"]), "--out", str(tmp_path / "a"),
            "--max-new-tokens", "24", "--device", "cpu", "--judge-url", url, "--judge-model", "m",
            "--judge-key-env", "TEST_JUDGE_KEY", "--judge-rate", "1000"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "distinct-1/2/3" in out and "memorization" in out and "judge: grammar 8.00" in out
    report = json.loads((tmp_path / "a" / "quality.json").read_text())
    n = len(read_prompts())
    assert report["summary"]["completions"] == n == len(report["completions"])
    for key in ("mean_tokens", "mean_words", "eot_share", "distinct_1", "distinct_2", "distinct_3", "repetition_4"):
        assert report["summary"][key] is not None
    for key in ("seed", "temperature", "top_p", "max_new_tokens", "batch_size", "n_prompts"):
        assert key in report["settings"]
    s = report["settings"]
    assert (s["prompt_set"], s["protocol"], s["protocol_overrides"]) == ("packaged", "default", [])
    assert (s["completions_per_prompt"], s["temperature"], s["top_p"]) == (1, 0.8, 0.95)
    assert 0 < report["summary"]["mean_tokens"] <= 24
    m = report["memorization"]
    assert m["n"] == 8 and m["train_tokens"] > 0 and 0 <= m["mean_overlap"] <= 1
    assert all("longest_span" in c["memorization"] for c in report["completions"])
    assert report["judge"]["summary"]["graded"] == n and report["judge"]["summary"]["mean_grammar"] == 8
    assert len(server.log) == n and server.log[0]["auth"] == "Bearer sk-local"
    md = (tmp_path / "a" / "quality.md").read_text()
    assert "## Sample completions" in md and f"**{read_prompts()[0]}**" in md
    assert "No judge model was reachable" in md and "distinct-1 / 2 / 3" in md
    assert (Path(run_setup["data"]) / "train.bin.ngram8.npy").is_file()  # built once, kept beside train.bin

    # the same seed writes the same stories (and the index is reused)
    assert main(argv[:argv.index("--judge-url")] + ["--out", str(tmp_path / "b")]) == 0
    again = json.loads((tmp_path / "b" / "quality.json").read_text())
    assert [c["completion"] for c in again["completions"]] == [c["completion"] for c in report["completions"]]
    assert again["judge"] is None and again["summary"] == report["summary"]


def test_quality_refuses_data_of_another_tokenizer(run_setup, tmp_path, capsys):
    from tinystories.prepare import prepare

    source = tmp_path / "other.txt"
    source.write_text("".join(f"{s}\n<|endoftext|>\n" for s in official_stories("TinyStoriesV2-train.head.txt", 50)))
    prepare(str(source), tmp_path / "other", tokenizer="bpe-300", progress=False)
    capsys.readouterr()
    code = main(["quality", "--checkpoint", str(run_setup["ckpt"]), "--data", str(tmp_path / "other"),
                 "--out", str(tmp_path / "q"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "tokenizer" in err
    assert not (tmp_path / "q").exists()


def test_an_unreachable_judge_ends_in_one_line_but_keeps_the_report(run_setup, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-m", "tinystories", "quality", "--checkpoint", str(run_setup["ckpt"]), "--out", str(tmp_path),
         "--max-new-tokens", "4", "--device", "cpu", "--judge-url", f"http://127.0.0.1:{port}", "--judge-model", "m",
         "--judge-retries", "0"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("tinystories quality: error: the judge at")
    assert "Traceback" not in proc.stderr
    report = json.loads((tmp_path / "quality.json").read_text())
    assert report["memorization"] is None and "cannot be reached" in report["judge"]["error"]


def test_an_index_that_cannot_be_written_is_a_user_error(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(UserError, match="--index PATH"):
        NgramIndex.open_or_build(tmp_path / "a_file" / "idx.npy", np.arange(100, dtype=np.uint16), n=4, progress=False)


# -----------------------------------------------------------------------------
# The paper's 44 beginnings: a local copy, the hub's (a real server on 127.0.0.1), bad files


def quality_argv(run_setup, out, *extra):
    return ["quality", "--checkpoint", str(run_setup["ckpt"]), "--out", str(out), "--max-new-tokens", "4",
            "--device", "cpu", *map(str, extra)]


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_quality_decodes_with_the_weights_asked_for(run_setup, tmp_path, capsys, dtype):
    from tinystories.decoding import int8_supported

    if dtype == "int8" and not int8_supported():
        pytest.skip("no fbgemm kernels in this PyTorch build")
    assert main(quality_argv(run_setup, tmp_path / "a", "--dtype", dtype, "--seed", 3)) == 0
    report = json.loads((tmp_path / "a" / "quality.json").read_text())
    assert report["settings"]["decode_dtype"] == dtype
    assert report["summary"]["completions"] == len(report["completions"]) > 0


def test_quality_with_the_papers_prompts_follows_the_papers_protocol(run_setup, tmp_path, capsys):
    assert main(quality_argv(run_setup, tmp_path / "a", "--prompts", PAPER_PROMPTS)) == 0
    assert "completions of the paper prompts (44 beginnings)" in capsys.readouterr().out
    report = json.loads((tmp_path / "a" / "quality.json").read_text())
    s = report["settings"]
    assert (s["prompt_set"], s["prompts"], s["n_prompts"], s["protocol"]) == ("paper", str(PAPER_PROMPTS), 44, "paper")
    assert (s["completions_per_prompt"], s["temperature"], s["top_p"], s["protocol_overrides"]) == (10, 1.0, 1.0, [])
    assert s["prompts_sha256"] == load_prompt_set(str(PAPER_PROMPTS), tmp_path).sha256
    cs = report["completions"]
    assert report["summary"]["completions"] == len(cs) == 440
    beginnings = load_prompt_set(str(PAPER_PROMPTS), tmp_path).prompts
    for pid in range(44):  # ten samples of each beginning, side by side, under its own text
        mine = cs[10 * pid : 10 * pid + 10]
        assert [(c["prompt_id"], c["sample"]) for c in mine] == [(pid, k) for k in range(10)]
        assert all(c["prompt"] == beginnings[pid] for c in mine)
    assert len({c["completion"] for c in cs[:10]}) > 1  # sampled anew each time, not one story copied ten times
    md = (tmp_path / "a" / "quality.md").read_text()
    assert "of the 44 beginnings of the paper set" in md and "10 of each" in md
    assert "### 2\n" in md and f"**{beginnings[1]}**" in md  # samples shown are of different beginnings

    # a setting given on the command line wins, and the report says it left the protocol
    assert main(quality_argv(run_setup, tmp_path / "b", "--prompts", PAPER_PROMPTS, "--temperature", "0.5",
                             "--completions-per-prompt", "1", "--top-p", "1")) == 0
    s = json.loads((tmp_path / "b" / "quality.json").read_text())["settings"]
    assert (s["temperature"], s["completions_per_prompt"]) == (0.5, 1)
    assert s["protocol_overrides"] == ["completions_per_prompt", "temperature"]  # --top-p 1 is the protocol's


@pytest.mark.parametrize("text,message", [
    ("- Once upon a time\n- [a list that never closes\n", "is not valid YAML at line 3"),
    ("prompts:\n  - Once upon a time\n", "holds a YAML mapping"),
    ("- Once upon a time\n- 42\n", "item 2 is a YAML number"),
    ("- Once upon a time\n- - nested\n", "item 2 is a YAML list"),
    ("- Once upon a time\n- ''\n", "item 2 is empty"),
    ("[]\n", "holds no story beginnings"),
    ("", "holds no story beginnings"),
])
def test_a_bad_prompt_yaml_is_one_line_and_exit_2(run_setup, tmp_path, capsys, text, message):
    f = tmp_path / "prompts.yaml"
    f.write_text(text)
    code = main(quality_argv(run_setup, tmp_path / "q", "--prompts", f))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert err.startswith(f"tinystories quality: error: prompt file {f}")
    assert not (tmp_path / "q").exists()


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """test_download's hub on 127.0.0.1, serving the paper's file too; a fresh, empty cache."""
    from urllib.parse import quote

    from test_download import Hub

    server = Hub()
    # its handler looks up the raw URL path, where the file's name is percent-encoded
    server.files[quote(PAPER_PROMPTS_FILE)] = PAPER_PROMPTS.read_bytes()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # test_export sets it for the whole session
    monkeypatch.setenv("TINYSTORIES_CACHE", str(tmp_path / "cache"))
    yield server
    server.shutdown()
    server.server_close()


def test_prompts_paper_downloads_the_hub_file_once_into_the_cache(run_setup, hub, tmp_path, monkeypatch):
    flags = ("--prompts", "paper", "--completions-per-prompt", "1")
    assert main(quality_argv(run_setup, tmp_path / "a", *flags)) == 0
    resolve = "/datasets/roneneldan/TinyStories/resolve/main/Evaluation%20prompts.yaml"
    url = hub.endpoint + resolve
    s = json.loads((tmp_path / "a" / "quality.json").read_text())["settings"]
    assert (s["prompt_set"], s["prompts"], s["n_prompts"], s["protocol"]) == ("paper", url, 44, "paper")
    assert s["prompts_sha256"] == "7d2b2e67ef96d99215fae332f6802858796a1ef200d116edcec5bd5ba7d599e2"
    assert (s["temperature"], s["protocol_overrides"]) == (1.0, ["completions_per_prompt"])
    cached = tmp_path / "cache" / "hf" / "datasets" / "roneneldan" / "TinyStories" / PAPER_PROMPTS_FILE
    assert cached.read_bytes() == PAPER_PROMPTS.read_bytes()
    assert [path for path, _ in hub.requests] == [resolve, "/storage/Evaluation%20prompts.yaml"]  # hub-style redirect

    # the second run reads the cache, even where the network is forbidden
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(quality_argv(run_setup, tmp_path / "b", *flags)) == 0
    assert len(hub.requests) == 2
    assert json.loads((tmp_path / "b" / "quality.json").read_text())["settings"]["prompts"] == url


def test_prompts_paper_offline_or_unreachable_fails_fast_in_one_line(run_setup, tmp_path, capsys, monkeypatch):
    import socket

    monkeypatch.setenv("TINYSTORIES_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(quality_argv(run_setup, tmp_path / "q", "--prompts", "paper")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "HF_HUB_OFFLINE is set" in err and "pass its path to --prompts" in err

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    t0 = time.monotonic()
    assert main(quality_argv(run_setup, tmp_path / "q", "--prompts", "paper")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot reach 127.0.0.1" in err and "pass its path to --prompts" in err
    assert time.monotonic() - t0 < 10  # no retries when nothing answers
    assert not (tmp_path / "q").exists()
