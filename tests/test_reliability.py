"""Mistakes a user can fix end with one line on stderr, exit 2, and nothing on disk changed (issue 13).

Several cases of each kind the tester found breaking that promise:
  1. output paths that cannot be written (--out / --json), checked before any work starts
  2. a hand-edited meta.json (vocab_size, eot_id, dtype, split files) and token ids past the vocabulary
  3. numbers handed to torch unchecked (nan, inf, out-of-range betas, seeds too large for torch)
  7. a write that fails while prepare writes (a file-size limit, a full tmpfs): the earlier data intact
  8. PyTorch's warning before our line when a pickle is refused
and the notes: bpe-N that ends up smaller says so, --num-samples has a cap.
"""

import contextlib
import io
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, TINYSTORIES_DIR, read_stories
from tinystories.cli import main
from tinystories.config import ModelConfig, TrainConfig, type_problems
from tinystories.errors import UserError

# -----------------------------------------------------------------------------
# Helpers


def run(argv) -> tuple[int, str, str]:
    """main(argv) in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def snapshot(*folders) -> dict:
    seen = {}
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            seen.update({os.path.join(root, d): None for d in dirs})
            seen.update({os.path.join(root, f): Path(root, f).read_bytes() for f in files})
    return seen


def refused(argv, *watched, match: str = "") -> str:
    """Assert `argv` ends with exit 2, one line on stderr (holding `match`), `watched` unchanged."""
    before = snapshot(*watched)
    code, _, err = run(argv)
    assert code == 2, (argv, code, err)
    assert err.count("\n") == 1 and "error" in err and "Traceback" not in err, err
    assert match in err, err
    assert snapshot(*watched) == before, f"{argv} changed files on disk"
    return err


@pytest.fixture(scope="module")
def stories_txt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rel-text") / "stories.txt"
    stories = read_stories(TINYSTORIES_DIR / "TinyStories-train.head.txt", limit=300)
    path.write_text("".join(s + "\n<|endoftext|>\n" for s in stories), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory, stories_txt) -> Path:
    """300 real stories with a 300-token BPE."""
    from tinystories.prepare import prepare

    out = tmp_path_factory.mktemp("rel-data") / "data"
    with contextlib.redirect_stdout(io.StringIO()):
        prepare(stories_txt, out, tokenizer="bpe-300", test="none", progress=False)
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, data) -> Path:
    import torch

    from tinystories.checkpoint import save_checkpoint
    from tinystories.model import GPT
    from tinystories.tokenizer import Tokenizer

    tok = Tokenizer.load(data)
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=64, vocab_size=tok.vocab_size, dropout=0.0))
    return save_checkpoint(tmp_path_factory.mktemp("rel-ckpt") / "ckpt", model, tok, step=1, val_loss=5.0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("rel-run") / "run"
    folder.mkdir()
    records = [{"step": s, "tokens": 1000 * s, "loss": 5 - 0.1 * s, "lr": 1e-3} for s in range(1, 6)]
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    """A small tmpfs at `path` (root only); skips the test where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.decode().strip() or 'not root'})")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.fixture
def scene(tmp_path) -> Path:
    (tmp_path / "file.txt").write_text("a file\n")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "x.txt").write_text("x\n")
    return tmp_path


# -----------------------------------------------------------------------------
# 1. Output paths that cannot be written: refused before any work, in every subcommand that writes


def test_output_folders_that_cannot_be_written(scene, data, ckpt, stories_txt, monkeypatch):
    """--out of prepare, train, export, quality, import: a file, a folder under a file."""
    import tinystories.checkpoint

    def no_work(*args, **kwargs):
        raise AssertionError("the output path must be checked before any work")

    monkeypatch.setattr(tinystories.checkpoint, "load_checkpoint", no_work)  # export, quality, generate
    file, under_file = scene / "file.txt", scene / "file.txt" / "sub"
    commands = {
        "prepare": ["prepare", "--source", stories_txt, "--tokenizer", "bpe-300"],
        "train": ["train", "--data", data, "--preset", "tiny"],
        "export": ["export", "--checkpoint", ckpt],
        "quality": ["quality", "--checkpoint", ckpt],
        "import": ["import", "--from", scene / "folder"],
    }
    for name, argv in commands.items():
        err = refused([*argv, "--out", file], scene, data, ckpt, match=f"--out {file} is a file")
        assert err.startswith(f"tinystories {name}: error:")
        refused([*argv, "--out", under_file], scene, data, ckpt, match=f"{file} is a file, not a folder")
        refused([*argv, "--out", scene / "file.txt" / "a" / "b"], scene, data, ckpt, match="is a file, not a folder")


def test_output_files_that_cannot_be_written(scene, ckpt, data, run_dir, monkeypatch):
    """evaluate --json and plot --out: a folder, a name ending in a slash, a path under a file,
    all refused before the evaluation runs (which took the whole evaluation before)."""
    import tinystories.evaluate

    monkeypatch.setattr(tinystories.evaluate, "evaluate", lambda *a, **k: pytest.fail("evaluated first"))
    evaluate = ["evaluate", "--checkpoint", ckpt, "--data", data, "--device", "cpu", "--json"]
    refused([*evaluate, scene / "folder"], scene, match="is a folder; give a file name")
    refused([*evaluate, f"{scene / 'new'}/"], scene, match="names a folder")
    refused([*evaluate, scene / "file.txt" / "r.json"], scene, match="file.txt is a file, not a folder")

    (scene / "loss.png").mkdir()
    refused(["plot", run_dir, "--out", scene / "loss.png"], scene, run_dir, match="is a folder")
    refused(["plot", run_dir, "--out", scene / "file.txt" / "x.png"], scene, run_dir, match="is a file, not a folder")
    refused(["plot", run_dir, "--out", scene / "file.txt" / "a" / "x.png"], scene, run_dir, match="not a folder")
    # quality's report files, where a folder is in the way
    (scene / "q" / "quality.json").mkdir(parents=True)
    refused(["quality", "--checkpoint", ckpt, "--out", scene / "q"], scene, match="quality.json is a folder")


def test_read_only_outputs_are_refused(tmp_path, data, ckpt, stories_txt, run_dir):
    """A read-only mount: refused even for root (os.access answers what the write would get)."""
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        cases = [
            ["prepare", "--source", stories_txt, "--tokenizer", "bpe-300", "--out", ro / "d"],
            ["train", "--data", data, "--preset", "tiny", "--out", ro / "run"],
            ["export", "--checkpoint", ckpt, "--out", ro / "hf"],
            ["evaluate", "--checkpoint", ckpt, "--data", data, "--json", ro / "r.json"],
            ["plot", run_dir, "--out", ro / "loss.png"],
            ["quality", "--checkpoint", ckpt, "--out", ro / "q"],
            ["import", "--from", tmp_path, "--out", ro / "c"],
        ]
        for argv in cases:
            refused(argv, data, ckpt, run_dir, match="read-only file system")


def test_a_write_that_still_fails_names_the_path(tmp_path, ckpt, data, run_dir, monkeypatch):
    """Past the checks (a full disk, here simulated): one line naming the file, the earlier file intact."""
    import pathlib

    old = tmp_path / "r.json"
    old.write_text('{"earlier": true}\n')
    real = pathlib.Path.write_bytes

    def disk_full(self, data):
        if self.name.startswith(".r.json.tmp") or self.name.startswith(".loss.png"):
            raise OSError(28, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", disk_full)
    refused(["evaluate", "--checkpoint", ckpt, "--data", data, "--device", "cpu", "--json", old], tmp_path,
            match=f"could not write {old} (No space left on device)")
    assert old.read_text() == '{"earlier": true}\n' and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


# -----------------------------------------------------------------------------
# 2. meta.json is not trusted


def edited(data: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "edited"
    shutil.copytree(data, copy)
    meta = json.loads((copy / "meta.json").read_text())
    edit(meta, copy)
    (copy / "meta.json").write_text(json.dumps(meta))
    return copy


META_EDITS = {
    "vocab_size 100": (lambda m, d: m["tokenizer"].update(vocab_size=100), "says vocab_size 100"),
    "vocab_size 2e9": (lambda m, d: m["tokenizer"].update(vocab_size=2_000_000_000), "does not fit"),
    "vocab_size 2e9 uint32": (lambda m, d: m.update(dtype="uint32") or m["tokenizer"].update(vocab_size=2_000_000_000),
                              "says vocab_size 2000000000"),
    "vocab_size 301": (lambda m, d: m["tokenizer"].update(vocab_size=301), "says vocab_size 301"),
    "vocab_size float": (lambda m, d: m["tokenizer"].update(vocab_size=300.0), "vocab_size is 300.0"),
    "vocab_size text": (lambda m, d: m["tokenizer"].update(vocab_size="300"), "vocab_size is '300'"),
    "eot_id past vocab": (lambda m, d: m["tokenizer"].update(eot_id=300), "eot_id is 300"),
    "dtype": (lambda m, d: m.update(dtype="float64"), "dtype is 'float64'"),
    "split file outside": (lambda m, d: m["splits"]["train"].update(file="../train.bin"), "not a file in the data folder"),
    "split tokens": (lambda m, d: m["splits"]["train"].update(tokens=-5), "no token count"),
    "no tokenizer": (lambda m, d: m.pop("tokenizer"), "tokenizer entry is missing"),
    "format_version": (lambda m, d: m.update(format_version="1"), "format_version"),
    # the numbers are right but a token file holds an id past the vocabulary (damaged, or mixed up)
    "token past vocab": (lambda m, d: (d / "train.bin").write_bytes(
        np.full(m["splits"]["train"]["tokens"], 299, np.uint16).tobytes()[:-2] + np.uint16(300).tobytes()),
        "holds token id 300"),
}


@pytest.mark.parametrize("case", list(META_EDITS))
def test_edited_meta_json_is_refused_before_any_work(case, data, tmp_path):
    edit, message = META_EDITS[case]
    copy = edited(data, tmp_path, edit)
    out = tmp_path / "run"
    refused(["train", "--data", copy, "--preset", "tiny", "--n-layer", "1", "--n-embd", "16", "--n-head", "2",
             "--block-size", "16", "--max-steps", "1", "--out", out], tmp_path, match=message)
    assert not out.exists()  # no half-made run folder


def test_edited_meta_json_is_refused_by_evaluate(data, ckpt, tmp_path):
    copy = edited(data, tmp_path, lambda m, d: (d / "val.bin").write_bytes(
        np.full(m["splits"]["val"]["tokens"], 7000, np.uint16).tobytes()))
    refused(["evaluate", "--checkpoint", ckpt, "--data", copy, "--device", "cpu"], tmp_path, match="holds token id 7000")


# -----------------------------------------------------------------------------
# 3. Numbers that would reach torch unchecked


TRAIN_VALUES = [
    (["--learning-rate", "nan"], "learning_rate must be a finite number"),
    (["--learning-rate", "inf"], "learning_rate must be a finite number"),
    (["--min-lr=-inf"], "min_lr must be a finite number"),
    (["--beta1", "1.0"], "beta1 must be in [0, 1)"),
    (["--beta2", "1.5"], "beta2 must be in [0, 1)"),
    (["--beta2", "-0.1"], "beta2 must be in [0, 1)"),
    (["--weight-decay", "nan"], "weight_decay must be a finite number"),
    (["--grad-clip", "inf"], "grad_clip must be a finite number"),
    (["--epochs", "inf"], "epochs must be a finite number"),
    (["--dropout", "nan"], "dropout must be a finite number"),
    (["--seed", "99999999999999999999999"], "seed must be an integer that fits in 64 bits"),
    (["--seed", "4294967296"], "seed must be in [0, 4294967295]"),
    (["--seed", "-1"], "seed must be in [0, 4294967295]"),
    (["--max-steps", "9223372036854775808"], "max_steps must be an integer that fits in 64 bits"),
    (["--n-embd", str(2**70)], "n_embd must be an integer that fits in 64 bits"),
    (["--vocab-size", str(2**33)], "vocab_size must be at most"),
    (["--device", "cuda:x"], "device must be auto, cuda, cuda:N"),
]


@pytest.mark.parametrize("flags, message", TRAIN_VALUES, ids=[" ".join(f) for f, _ in TRAIN_VALUES])
def test_train_numbers_are_checked(flags, message, data, tmp_path):
    out = tmp_path / "run"
    refused(["train", "--data", data, "--preset", "tiny", "--out", out, *flags], tmp_path, data, match=message)
    assert not out.exists()


TOML_VALUES = [
    ("[train]\nlearning_rate = nan\n", "learning_rate must be a finite number"),
    ("[train]\nbatch_size = \"16\"\n", "batch_size must be an integer, got '16'"),
    ("[train]\nbatch_size = 16.0\n", "batch_size must be an integer, got 16.0"),
    ("[train]\ncompile = 1\n", "compile must be true or false"),
    ("[train]\ndevice = 3\n", "device must be a string"),
    ("[model]\nn_layer = true\n", "n_layer must be an integer, got True"),
    ("[model]\nattention_layers = [\"global\", 1]\n", "attention_layers must be a list of words"),
    ("[model]\ndropout = inf\n", "dropout must be a finite number"),
]


@pytest.mark.parametrize("toml, message", TOML_VALUES)
def test_config_file_values_are_checked(toml, message, data, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(toml)
    refused(["train", "--data", data, "--preset", "tiny", "--config", config, "--out", tmp_path / "run"], tmp_path,
            match=message)


def test_a_field_added_later_is_checked_too():
    """The generic checks cover any field of the types the configs use, so new fields are safe."""
    import dataclasses

    @dataclasses.dataclass
    class Newer(TrainConfig):  # names no real field will take
        later_float: float = 0.95
        later_int: int = 5
        later_bool: bool = False
        later_str: str = "cosine"

    newer = Newer()
    assert type_problems(newer) == []
    newer.later_float, newer.later_int, newer.later_bool, newer.later_str = float("nan"), 2**64, "yes", None
    assert type_problems(newer) == [
        "later_float must be a finite number, got nan", "later_int must be an integer that fits in 64 bits, "
        f"got {2**64}", "later_bool must be true or false, got 'yes'", "later_str must be given, got none"]
    with pytest.raises(UserError, match="later_float must be a finite number"):
        Newer(later_float=float("inf"))


GENERATE_VALUES = [
    (["--seed=99999999999999999999999"], "--seed: must be an integer from 0 to 2**63 - 1"),
    (["--seed", "-1"], "--seed: must be an integer from 0 to 2**63 - 1"),
    (["--seed", "9223372036854775808"], "--seed: must be an integer from 0 to 2**63 - 1"),
    (["--seed", "1.5"], "--seed: expected an integer"),
    (["--num-samples", "65"], "--num-samples: must be at most 64"),
    (["--num-samples", "0"], "--num-samples: must be a positive integer"),
    (["--max-new-tokens", "100001"], "--max-new-tokens: must be at most 100,000"),
    (["--temperature", "nan"], "temperature must be a number >= 0"),
    (["--temperature", "inf"], "temperature must be a number >= 0"),
    (["--temperature", "-1"], "temperature must be a number >= 0"),
    (["--top-p", "0"], "top-p must be in (0, 1]"),
    (["--top-p", "nan"], "top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "top-p must be in (0, 1]"),
    (["--top-k", "0"], "top-k must be an integer >= 1"),
    (["--top-k", "9" * 5000], "--top-k: expected an integer"),
    (["--device", "cuda:x"], "unknown device 'cuda:x'"),
]


@pytest.mark.parametrize("flags, message", GENERATE_VALUES, ids=[" ".join(f)[:40] for f, _ in GENERATE_VALUES])
def test_generate_flags_are_checked(flags, message, ckpt):
    refused(["generate", "--checkpoint", ckpt, *flags], ckpt, match=message)


@pytest.mark.parametrize("flags", [["--temperature", "1e-320"], ["--top-p", "1e-320"], ["--seed", str(2**63 - 1)],
                                   ["--num-samples", "64"], ["--top-k", str(2**70)]])
def test_generate_takes_the_edges_of_its_ranges(flags, ckpt):
    code, out, err = run(["generate", "--checkpoint", ckpt, "--max-new-tokens", "3", "--seed", "1", *flags])
    assert code == 0 and "Traceback" not in err, err


def test_quality_and_prepare_seeds_are_checked(ckpt, stories_txt, tmp_path):
    refused(["quality", "--checkpoint", ckpt, "--out", tmp_path / "q", "--seed", str(2**64)], tmp_path, match="--seed")
    refused(["prepare", "--source", stories_txt, "--out", tmp_path / "d", "--seed", "-5"], tmp_path, match="--seed")


# -----------------------------------------------------------------------------
# 7. A write that fails while prepare writes: one line, earlier data intact, a non-zero exit


def _file_size_limit(limit: int):
    def apply():  # in the child, before exec: writes past `limit` bytes fail with EFBIG, not a kill
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def _prepare_cli(source, out, limit=None, *extra):
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-m", "tinystories", "prepare", "--source", str(source), "--tokenizer",
                           "bpe-300", "--test", "none", "--out", str(out), *extra],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
                          preexec_fn=_file_size_limit(limit) if limit else None)


def test_prepare_that_cannot_write_leaves_the_earlier_data(tmp_path, stories_txt, data):
    """`ulimit -f` stands in for a full disk: the tokenizer, then train.bin cannot be written."""
    out = tmp_path / "data"
    shutil.copytree(data, out)  # earlier prepared data, to be replaced with --force
    before = snapshot(tmp_path)
    tokenizer_size = (data / "tokenizer.json").stat().st_size
    train_size = (data / "train.bin").stat().st_size
    assert tokenizer_size < train_size // 2
    for limit, fails in [(tokenizer_size // 2, "tokenizer.json"), ((tokenizer_size + train_size) // 2, "train.bin")]:
        r = _prepare_cli(stories_txt, out, limit, "--force")
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
        assert f"could not write {out / fails} (File too large)" in r.stderr, r.stderr
        assert f"the prepared data already in {out} is unchanged" in r.stderr
        assert snapshot(tmp_path) == before  # no temporary folder left, the earlier files as they were


def test_prepare_on_a_full_disk(tmp_path, stories_txt):
    """A real full file system (a 64 KB tmpfs): one line, nothing left behind."""
    with tmpfs(tmp_path / "small", "64k") as small:
        r = _prepare_cli(stories_txt, small / "data")
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert "No space left on device" in r.stderr and f"nothing was written to {small / 'data'}" in r.stderr
        assert list(small.iterdir()) == []


# -----------------------------------------------------------------------------
# 8. A refused pickle: our line only, no PyTorch warning before it


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _pickle4(path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump({"state": _Payload()}, f, protocol=4)  # the protocol PyTorch warns about


def test_refused_pickles_give_no_pytorch_warning(tmp_path, ckpt):
    import torch

    from tinystories.checkpoint import load_trainer_state
    from tinystories.hf_folder import _load_weights_file

    folder = tmp_path / "ckpt"
    shutil.copytree(ckpt, folder)
    _pickle4(folder / "trainer_state.pt")
    _pickle4(tmp_path / "pytorch_model.bin")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UserError, match="trainer_state.pt is truncated, corrupted or not ours"):
            load_trainer_state(folder)
        with pytest.raises(UserError, match="holds more than tensors"):
            _load_weights_file(tmp_path / "pytorch_model.bin", torch)
    assert [str(w.message) for w in caught] == []


def test_import_of_a_pickle_payload_prints_one_line(tmp_path, ckpt):
    """The whole command, in a process of its own so that warnings reach stderr as a user sees them."""
    hf = tmp_path / "hf"
    assert run(["export", "--checkpoint", ckpt, "--out", hf])[0] == 0
    (hf / "model.safetensors").unlink()
    _pickle4(hf / "pytorch_model.bin")
    r = subprocess.run([sys.executable, "-m", "tinystories", "import", "--from", str(hf), "--out", str(tmp_path / "c")],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "holds more than tensors" in r.stderr and "Warning" not in r.stderr and "pwned" not in r.stdout
    assert not (tmp_path / "c").exists()


# -----------------------------------------------------------------------------
# Notes: a bpe-N smaller than asked says so


def test_a_bpe_smaller_than_asked_is_noted(tmp_path, stories_txt):
    from tinystories.prepare import prepare

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        meta = prepare(stories_txt, tmp_path / "d", tokenizer="bpe-10000000", test="none", progress=False)
    vocab = meta["tokenizer"]["vocab_size"]
    assert vocab < 10_000_000
    assert f"note: bpe-10000000: the training text holds only enough for {vocab:,} tokens" in err.getvalue()
    assert meta["notes"] == [f"bpe-10000000: the training text holds only enough for {vocab:,} tokens, so the "
                             f"vocabulary has {vocab:,}, not 10,000,000"]
    assert json.loads((tmp_path / "d" / "meta.json").read_text())["notes"] == meta["notes"]
