"""`tinystories prepare` on real TinyStories text: token counts, round trips, every source format,
cleaning, splits, byte-identical reruns, and each bad input ending in one line and exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tinystories import prepare as P
from tinystories.cli import main
from tinystories.errors import UserError
from tinystories.tokenizer import EOT, Tokenizer, load_gpt2, train_bpe

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
GPT2_DIR = SHARED / "gpt2"
V1_TRAIN = SHARED / "tinystories" / "TinyStories-train.head.txt"
V1_VALID = SHARED / "tinystories" / "TinyStories-valid.head.txt"


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch, tmp_path):
    monkeypatch.setenv("TINYSTORIES_GPT2_VOCAB", str(GPT2_DIR))
    monkeypatch.setenv("TINYSTORIES_CACHE", str(tmp_path / "cache"))  # never the user's cache


@pytest.fixture(scope="module")
def gpt2():
    return load_gpt2(GPT2_DIR)


def official_stories(path: Path) -> list[str]:
    """The stories of an official-format file, as PROVENANCE.md says to read them."""
    return [s.strip() for s in path.read_text(encoding="utf-8").split(EOT)[:-1]]


def write_txt(path: Path, stories: list[str]) -> Path:
    path.write_text("".join(f"{s}\n{EOT}\n" for s in stories), encoding="utf-8")
    return path


def read_split(data_dir: Path, split: str) -> np.ndarray:
    meta = json.loads((data_dir / "meta.json").read_text())
    return np.fromfile(data_dir / f"{split}.bin", dtype=meta["dtype"])


def decode_split(tok: Tokenizer, tokens: np.ndarray) -> list[str]:
    """Stories back from a token file: cut at end-of-text, decode each piece."""
    assert len(tokens) == 0 or tokens[-1] == tok.eot_id  # every story, the last too, ends with EOT
    cuts = np.flatnonzero(tokens == tok.eot_id)
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [tok.decode(tokens[a:b].tolist()) for a, b in zip(starts, cuts)]


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main(["prepare", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def expected_split(stories: list[str], fraction=0.05, seed=1337):
    val = P.ValSplit(fraction, seed)
    train = [s for i, s in enumerate(stories) if not val.is_val(i)]
    held = [s for i, s in enumerate(stories) if val.is_val(i)]
    return train, held


def garble(text: str) -> str:
    """What the hub's parquet copy did: UTF-8 bytes read as Windows-1252 (the five bytes cp1252
    leaves undefined read as the control characters of the same number, as browsers and pandas do)."""
    return "".join(bytes([b]).decode("cp1252", errors="ignore") or chr(b) for b in text.encode("utf-8"))


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# -----------------------------------------------------------------------------
# The acceptance test of the issue


def test_v1_head_gpt2_counts_and_round_trip(tmp_path, gpt2):
    out = tmp_path / "D"
    # the real command line, in a fresh interpreter: exit code, no traceback, files in place
    proc = subprocess.run(
        [sys.executable, "-m", "tinystories", "prepare", "--source", str(V1_TRAIN), "--tokenizer", "gpt2",
         "--out", str(out)],
        capture_output=True, text=True, env={**os.environ}, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "train:" in proc.stdout and "2,316 read" in proc.stdout

    stories = official_stories(V1_TRAIN)
    assert len(stories) == 2316
    train_tokens, val_tokens = read_split(out, "train"), read_split(out, "val")
    expected_tokens = sum(len(gpt2.encode(s)) + 1 for s in stories)
    assert len(train_tokens) + len(val_tokens) == expected_tokens

    want_train, want_val = expected_split(stories)
    assert decode_split(gpt2, train_tokens) == want_train  # exactly, in file order
    assert decode_split(gpt2, val_tokens) == want_val
    assert len(want_val) == 116  # 5 %: one in each block of 20 (115 blocks) + one in the last 16

    meta = json.loads((out / "meta.json").read_text())
    assert meta["format"] == "tinystories-data" and meta["dtype"] == "uint16"
    assert meta["splits"]["train"] == {"file": "train.bin", "stories": len(want_train), "tokens": len(train_tokens),
                                       "bytes": sum(len(s.encode()) for s in want_train)}
    assert meta["splits"]["val"]["bytes"] == sum(len(s.encode()) for s in want_val)
    assert "test" not in meta["splits"] and not (out / "test.bin").exists()
    assert meta["sources"] == [{"split": "train", "path": str(V1_TRAIN.resolve()), "bytes": 2096346,
                                "sha256": "ba02237f5747a07d420cb7329f721fdc51b6f5c35a81788b9c4bb871e15ff30a"}]
    # the V1 file's quirks: stories starting with a blank line or a space, lines ending in spaces
    assert meta["cleaning"]["train"]["stripped"] > 1000
    assert meta["cleaning"]["train"]["read"] == meta["cleaning"]["train"]["kept"] == 2316
    assert meta["tokenizer"]["name"] == "gpt2" and meta["tokenizer"]["eot_id"] == 50256


@pytest.mark.parametrize("name", ["gpt2", "bpe-400"])
def test_tokens_are_exactly_encode_plus_eot(tmp_path, name):
    """The fast path (stories joined at end-of-text, encoded in a few native calls) must give the
    very ids of encoding each story alone; a story holding the end-of-text string as text takes
    the plain path."""
    stories = official_stories(V1_TRAIN)[:300] + ["'s starts with a contraction", "ends in digits 42",
                                                  "It said <|endoftext|> out loud."]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps({"story": s}) + "\n" for s in stories))
    out = tmp_path / "D"
    P.prepare(tmp_path / "s.jsonl", out, tokenizer=name, val_fraction=0)
    tok = Tokenizer.load(out)
    want = [t for s in stories for t in tok.encode(s) + [tok.eot_id]]
    assert read_split(out, "train").tolist() == want
    assert tok.encode_documents(stories[:-1]).tolist() == want[: -len(tok.encode(stories[-1])) - 1]


def test_the_reading_side_accepts_the_output(tmp_path):
    from tinystories import data

    assert (P.DATA_FORMAT, P.DATA_FORMAT_VERSION, P.META) == (data.DATA_FORMAT, data.DATA_FORMAT_VERSION, data.META)
    out = tmp_path / "D"
    P.prepare(V1_TRAIN, out, test=str(V1_VALID), max_stories=300)
    meta = data.read_meta(out)
    tok = data.load_data_tokenizer(out)
    for split in ("train", "val", "test"):
        tokens = data.open_split(out, split)
        assert len(tokens) == meta["splits"][split]["tokens"] > 0
    assert tok.spec() == meta["tokenizer"]


# -----------------------------------------------------------------------------
# Splits


def test_test_split_from_a_source_folder(tmp_path, gpt2):
    folder = tmp_path / "official"
    folder.mkdir()
    (folder / "TinyStories-train.txt").symlink_to(V1_TRAIN)
    (folder / "TinyStories-valid.txt").symlink_to(V1_VALID)
    (folder / "README.md").write_text("not a source")  # other files are ignored
    out = tmp_path / "D"
    meta = P.prepare(folder, out, max_stories=200)
    valid = official_stories(V1_VALID)
    assert valid[0].startswith("Spot. Spot saw the shiny car")  # the cut first story, stripped
    assert decode_split(gpt2, read_split(out, "test")) == valid
    assert meta["splits"]["train"]["stories"] + meta["splits"]["val"]["stories"] == 200
    assert [r["split"] for r in meta["sources"]] == ["train", "test"]
    # --test none drops it; an explicit --test replaces it
    meta = P.prepare(folder, tmp_path / "E", max_stories=50, test="none")
    assert "test" not in meta["splits"]


def test_val_split_is_exact_seeded_and_prefix_stable():
    v = P.ValSplit(0.05, seed=1)
    picks = [i for i in range(4000) if v.is_val(i)]
    assert len(picks) == 200  # exactly 5 % at a block boundary
    assert [i // 20 for i in picks] == list(range(200))  # one in each block of 20: spread out
    assert picks == [i for i in range(4000) if P.ValSplit(0.05, seed=1).is_val(i)]  # deterministic
    assert picks != [i for i in range(4000) if P.ValSplit(0.05, seed=2).is_val(i)]  # seeded
    odd = P.ValSplit(0.3, seed=1)
    assert sum(odd.is_val(i) for i in range(1000)) == 300
    assert not any(P.ValSplit(0.0, seed=1).is_val(i) for i in range(1000))


def test_max_stories_takes_the_first_stories(tmp_path, gpt2):
    out = tmp_path / "D"
    meta = P.prepare(V1_TRAIN, out, max_stories=120)
    want_train, want_val = expected_split(official_stories(V1_TRAIN)[:120])
    assert decode_split(gpt2, read_split(out, "train")) == want_train
    assert decode_split(gpt2, read_split(out, "val")) == want_val
    assert meta["cleaning"]["train"]["read"] == 120  # stopped reading there


# -----------------------------------------------------------------------------
# Source formats: the same stories give the same tokens whatever the container


def test_txt_json_jsonl_parquet_give_identical_tokens(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    stories = official_stories(V1_TRAIN)[:400]
    src = tmp_path / "src"
    src.mkdir()
    write_txt(src / "s.txt", stories)
    # the TinyStories_all_data shards: a JSON list of objects with "story" and other fields
    (src / "s.json").write_text(json.dumps(
        [{"story": s, "instruction": {"words": ["dog"]}, "summary": "x", "source": "GPT-4"} for s in stories]))
    (src / "s.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in stories))
    pq.write_table(pa.table({"text": stories}), src / "s.parquet", row_group_size=64)

    outputs = {}
    for name in ("s.txt", "s.json", "s.jsonl", "s.parquet"):
        meta = P.prepare(src / name, tmp_path / name.replace(".", "_"))
        outputs[name] = {k: v for k, v in folder_files(tmp_path / name.replace(".", "_")).items() if k != "meta.json"}
        assert meta["splits"]["train"]["stories"] + meta["splits"]["val"]["stories"] == 400
    assert outputs["s.txt"] == outputs["s.json"] == outputs["s.jsonl"] == outputs["s.parquet"]


def test_json_and_txt_items_spanning_read_blocks(tmp_path, monkeypatch, gpt2):
    stories = official_stories(V1_TRAIN)[:60]
    write_txt(tmp_path / "s.txt", stories)
    (tmp_path / "s.json").write_text(json.dumps([{"story": s} for s in stories], indent=1))
    monkeypatch.setattr(P, "READ_BLOCK", 997)  # separators and JSON items cut by every block edge
    advance = lambda n: None  # noqa: E731
    assert list(P.raw_stories(P.Source(tmp_path / "s.txt", {}), advance)) == stories
    assert list(P.raw_stories(P.Source(tmp_path / "s.json", {}), advance)) == stories
    # the separator count of the check stage also sees separators that straddle two blocks
    P.check_source(P.Source(tmp_path / "s.txt", {}), advance)


def test_parquet_mojibake_is_repaired_and_counted(tmp_path, gpt2):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    stories = [s for s in official_stories(V1_TRAIN) if not s.isascii()][:40]
    stories += official_stories(V1_TRAIN)[:40]
    stories = [s for s in dict.fromkeys(stories)]  # unique, in order
    assert any("’" in s or "“" in s for s in stories)
    garbled = [garble(s) for s in stories]
    assert any("â€" in g for g in garbled)
    pq.write_table(pa.table({"text": garbled}), tmp_path / "copy.parquet")
    out = tmp_path / "D"
    meta = P.prepare(tmp_path / "copy.parquet", out, val_fraction=0)
    assert decode_split(gpt2, read_split(out, "train")) == stories
    assert meta["cleaning"]["train"]["mojibake_repaired"] == sum(not s.isascii() for s in stories)


@pytest.mark.parametrize("text, fixed", [
    ("It\u00e2\u20ac\u2122s", "It’s"),  # â€™
    ("\u00e2\u20ac\u0153Hi!\u00e2\u20ac\x9d", "“Hi!”"),  # â€œ ... â€ + the undefined byte 0x9D
    ("caf\u00c3\u00a9", "café"),
    ("twice: \u00c3\u00a2\u00e2\u201a\u00ac\u00e2\u201e\u00a2", "twice: ’"),
    ("real ’ “quotes” and é stay", "real ’ “quotes” and é stay"),
    ("CAFÉ’S", "CAFÉ’S"),  # a capital before a real apostrophe is not mojibake
    ("mixed ’ and \u00e2\u20ac\u2122", "mixed ’ and ’"),
])
def test_repair_mojibake(text, fixed):
    assert P.repair_mojibake(text) == fixed


def test_parquet_needs_pyarrow_and_says_so(tmp_path):
    path = tmp_path / "copy.parquet"
    path.write_bytes(b"PAR1" + b"\0" * 16 + b"PAR1")
    code = (
        "import sys; sys.modules['pyarrow'] = None\n"  # as if pyarrow were not installed
        "from tinystories.cli import main\n"
        f"sys.exit(main(['prepare', '--source', {str(path)!r}, '--out', {str(tmp_path / 'D')!r}]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "pip install pyarrow" in proc.stderr
    assert not (tmp_path / "D").exists()


# -----------------------------------------------------------------------------
# Cleaning


def test_cleaning_counts_and_dedupe(tmp_path, gpt2):
    real = official_stories(V1_TRAIN)[:30]
    test_stories = official_stories(V1_VALID)[:10]
    pieces = [
        "\ufeff" + real[0],  # a byte-order mark before the first story
        "  " + real[1] + "  \n",  # irregular whitespace
        "",  # two separators in a row
        " \n\t ",  # only whitespace
        real[2],
        real[2],  # an exact duplicate
        "  " + real[2],  # a duplicate once stripped
        test_stories[3],  # also in the test split
        *real[3:],
    ]
    (tmp_path / "train.txt").write_text("".join(f"{p}\n{EOT}\n" for p in pieces), encoding="utf-8")
    write_txt(tmp_path / "test.txt", test_stories)

    out = tmp_path / "D"
    meta = P.prepare(tmp_path / "train.txt", out, test=str(tmp_path / "test.txt"), dedupe=True, val_fraction=0)
    c = meta["cleaning"]["train"]
    assert c == {"read": len(pieces), "stripped": 3, "mojibake_repaired": 0, "dropped_empty": 2,
                 "duplicates": 2, "dropped_in_test": 1, "kept": 30}
    assert decode_split(gpt2, read_split(out, "train")) == real
    assert meta["cleaning"]["test"]["kept"] == 10

    # without --dedupe every non-empty story stays
    meta = P.prepare(tmp_path / "train.txt", tmp_path / "E", test=str(tmp_path / "test.txt"), val_fraction=0)
    assert meta["cleaning"]["train"]["kept"] == 33 and meta["cleaning"]["train"]["duplicates"] == 0


# -----------------------------------------------------------------------------
# Reruns, BPE, overwriting


def test_rerun_is_byte_identical_gpt2(tmp_path):
    P.prepare(V1_TRAIN, tmp_path / "A", test=str(V1_VALID), max_stories=500)
    P.prepare(V1_TRAIN, tmp_path / "B", test=str(V1_VALID), max_stories=500)
    P.prepare(V1_TRAIN, tmp_path / "A", test=str(V1_VALID), max_stories=500, force=True)  # over itself
    assert folder_files(tmp_path / "A") == folder_files(tmp_path / "B")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left


def test_bpe_trains_on_the_train_split_only_and_is_reproducible(tmp_path):
    out = tmp_path / "D"
    meta = P.prepare(V1_TRAIN, out, tokenizer="bpe-1024", max_stories=800)
    assert (out / "tokenizer.json").is_file() and not (out / "encoder.json").exists()
    tok = Tokenizer.load(out)
    assert meta["tokenizer"] == tok.spec() and tok.vocab_size == 1024 and meta["tokenizer"]["name"] == "bpe-1024"
    want_train, want_val = expected_split(official_stories(V1_TRAIN)[:800])
    assert decode_split(tok, read_split(out, "train")) == want_train
    assert decode_split(tok, read_split(out, "val")) == want_val
    # the same tokenizer as one trained on exactly the training stories (val excluded)
    assert train_bpe(iter(want_train), 1024, show_progress=False).spec() == meta["tokenizer"]
    P.prepare(V1_TRAIN, tmp_path / "E", tokenizer="bpe-1024", max_stories=800)
    assert folder_files(out) == folder_files(tmp_path / "E")


def test_force_replaces_our_files_and_keeps_others(tmp_path):
    out = tmp_path / "D"
    P.prepare(V1_TRAIN, out, tokenizer="bpe-300", test=str(V1_VALID), max_stories=100)
    (out / "notes.txt").write_text("mine")
    P.prepare(V1_TRAIN, out, max_stories=100, force=True)  # gpt2, no test split this time
    names = {p.name for p in out.iterdir()}
    assert names == {"notes.txt", "meta.json", "train.bin", "val.bin", "encoder.json", "vocab.bpe"}
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "meta.json").read_text())["tokenizer"]["name"] == "gpt2"


def test_failed_prepare_leaves_old_data_intact(tmp_path, capsys):
    out = tmp_path / "D"
    P.prepare(V1_TRAIN, out, max_stories=50)
    before = folder_files(out)
    bad = tmp_path / "late.jsonl"  # valid UTF-8, so it passes the checks; broken JSON on line 3
    bad.write_text('{"text": "One story."}\n{"text": "Two."}\n{"text": oops}\n')
    code, _, err = cli(capsys, "--source", bad, "--out", out, "--force")
    assert code == 2 and err.count("\n") == 1 and "line 3" in err
    assert folder_files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["D", "late.jsonl"]


# -----------------------------------------------------------------------------
# Bad inputs: one line on stderr, exit 2, nothing that looks complete


def _bad_inputs(tmp: Path) -> dict[str, tuple[list, str]]:
    """name -> (extra command-line arguments, a word the error line must contain)."""
    (tmp / "empty.txt").write_bytes(b"")
    (tmp / "garbage.txt").write_bytes(np.random.default_rng(0).bytes(100_000))
    good = (f"Once upon a time.\n{EOT}\n" * 50).encode()
    (tmp / "latin1.txt").write_bytes(good + "The café was nice.\n".encode("latin-1") + f"{EOT}\n".encode())
    (tmp / "noseps.txt").write_text("Once upon a time there was a dog.\nIt was happy.\n" * 20)
    (tmp / "blank.txt").write_text(f"\n{EOT}\n  \n{EOT}\n")
    (tmp / "stories.tar.gz").write_bytes(b"\x1f\x8b\x08\x00" + b"\x00" * 100)
    (tmp / "list.json").write_text('{"story": "not in a list"}')
    (tmp / "fields.jsonl").write_text('{"title": "no story here"}\n')
    (tmp / "taken").mkdir()
    (tmp / "taken" / "thesis.tex").write_text("something else")
    ok = ["--source", V1_TRAIN]
    return {
        "missing file": (["--source", tmp / "nope.txt"], "no such file"),
        "empty file": (["--source", tmp / "empty.txt"], "empty"),
        "binary garbage": (["--source", tmp / "garbage.txt"], "not a text file"),
        "invalid utf-8": (["--source", tmp / "latin1.txt"], "UTF-8"),
        "no separators": (["--source", tmp / "noseps.txt"], "separator"),
        "only empty stories": (["--source", tmp / "blank.txt"], "no stories"),
        "archive": (["--source", tmp / "stories.tar.gz"], "unsupported file type"),
        "json not a list": (["--source", tmp / "list.json"], "not a JSON list"),
        "jsonl without story": (["--source", tmp / "fields.jsonl"], "'story' or 'text'"),
        "unknown tokenizer": ([*ok, "--tokenizer", "sentencepiece"], "unknown tokenizer"),
        "tiny bpe": ([*ok, "--tokenizer", "bpe-100"], "more than 257"),
        "bad val fraction": ([*ok, "--val-fraction", "1.5"], "val-fraction"),
        "missing test file": ([*ok, "--test", tmp / "nope-valid.txt"], "no such file"),
        "test file is the train file": ([*ok, "--test", V1_TRAIN], "both a training source and the test split"),
        "output folder holds something else": ([*ok, "--out", tmp / "taken"], "not empty"),
    }


BAD_INPUTS = [
    "missing file", "empty file", "binary garbage", "invalid utf-8", "no separators", "only empty stories",
    "archive", "json not a list", "jsonl without story", "unknown tokenizer", "tiny bpe", "bad val fraction",
    "missing test file", "test file is the train file", "output folder holds something else",
]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case):
    cases = _bad_inputs(tmp_path)
    assert list(cases) == BAD_INPUTS
    args, word = cases[case]
    if "--out" not in args:
        args = [*args, "--out", tmp_path / "D"]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = cli(capsys, *args)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("tinystories prepare: error:"), err
    assert word in err, err
    assert not (tmp_path / "D").exists()
    assert not (tmp_path / "taken" / "meta.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary folder left behind


def test_invalid_utf8_error_gives_the_byte_offset(tmp_path, capsys):
    good = (f"Once upon a time.\n{EOT}\n" * 50).encode()
    (tmp_path / "bad.txt").write_bytes(good + b"caf\xe9\n" + f"{EOT}\n".encode())
    code, _, err = cli(capsys, "--source", tmp_path / "bad.txt", "--out", tmp_path / "D")
    assert code == 2 and f"offset {len(good) + 3:,}" in err


def test_existing_prepared_data_needs_force(tmp_path, capsys):
    out = tmp_path / "D"
    P.prepare(V1_TRAIN, out, max_stories=20)
    before = folder_files(out)
    code, _, err = cli(capsys, "--source", V1_TRAIN, "--out", out, "--max-stories", "30")
    assert code == 2 and "--force" in err and err.count("\n") == 1
    assert folder_files(out) == before
    code, _, _ = cli(capsys, "--source", V1_TRAIN, "--out", out, "--max-stories", "30", "--force")
    assert code == 0 and json.loads((out / "meta.json").read_text())["options"]["max_stories"] == 30


def test_temp_folder_of_a_killed_prepare_is_cleaned_up(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".D.prepare-{int(dead.stdout)}"  # what `kill -9` mid-prepare leaves
    stale.mkdir()
    (stale / "train.bin").write_bytes(b"\0" * 10)
    alive = tmp_path / f".D.prepare-{os.getppid()}"  # a prepare still running: not ours to touch
    alive.mkdir()
    P.prepare(V1_TRAIN, tmp_path / "D", max_stories=20)
    assert not stale.exists() and alive.exists()
    assert (tmp_path / "D" / "meta.json").is_file()


def test_prepare_killed_while_writing_tokens_leaves_nothing_that_looks_complete(tmp_path):
    """kill -9 in the middle of writing the token files: no DATA_DIR, and the next run completes."""
    import signal
    import time

    out = tmp_path / "D"
    args = ["--source", str(V1_TRAIN.parent), "--tokenizer", "bpe-1024", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "tinystories", "prepare", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, writing = time.time() + 300, False
    while time.time() < deadline and proc.poll() is None and not writing:
        writing = any(p.stat().st_size > 0 for p in tmp_path.glob(".D.prepare-*/*.bin"))
        time.sleep(0.005)
    if not writing:
        proc.kill()
        pytest.fail("prepare ended (or hung) before it wrote any tokens: nothing was interrupted")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not out.exists()  # the half-written files are only in the temporary folder
    assert list(tmp_path.glob(".D.prepare-*"))

    r = subprocess.run([sys.executable, "-m", "tinystories", "prepare", *args], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert (out / "meta.json").is_file() and not list(tmp_path.glob(".D.prepare-*"))  # the dead run's folder is gone


def test_epoch_windows_restore_their_position_exactly_across_epochs():
    from tinystories.data import EpochWindows

    tokens = np.arange(1000, dtype=np.uint16)
    a = EpochWindows(tokens, 16, 5, seed=3)
    per_epoch = a.windows_per_epoch()
    for _ in range(per_epoch // 5 + 2):  # into the second epoch, so the epoch counter is saved too
        a.next_batch()
    state = a.state_dict()
    assert state["epoch"] == 1
    b = EpochWindows(tokens, 16, 5, seed=3)
    b.load_state_dict(state)
    for _ in range(per_epoch):  # on through the next epoch boundary
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert torch.equal(xa[:, 1:], ya[:, :-1])  # targets are the inputs shifted by one
    with pytest.raises(UserError, match="--seed 3"):
        EpochWindows(tokens, 16, 5, seed=4).load_state_dict(state)
    # every window of an epoch is used once: the epoch's starts are distinct and block-aligned after an offset
    starts = EpochWindows(tokens, 16, 5, seed=3)._epoch_order()
    assert len(set(starts.tolist())) == per_epoch and len({s % 16 for s in starts.tolist()}) == 1
