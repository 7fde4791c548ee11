"""Checkpoints: exact round trip, loading from a bare path, safe trainer state, crash safety, and one
clear line (never a traceback) for a checkpoint that is missing, not ours, truncated or corrupted."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from conftest import read_stories
from tinystories import checkpoint as ckpt_module
from tinystories.checkpoint import (
    load_checkpoint,
    load_trainer_state,
    read_checkpoint_config,
    resolve_checkpoint,
    save_checkpoint,
)
from tinystories.cli import main
from tinystories.config import ModelConfig
from tinystories.errors import UserError
from tinystories.model import GPT
from tinystories.tokenizer import load_gpt2, train_bpe


@pytest.fixture(scope="module")
def bpe(v1_train_head):
    return train_bpe(read_stories(v1_train_head, 200), vocab_size=300, show_progress=False)


def small_model(vocab_size, seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=vocab_size, dropout=0.0)
    return GPT(ModelConfig(**{**cfg, **kw})).eval()


def filled_model(vocab_size, value: float) -> GPT:
    """Every weight equal to `value`: which save a checkpoint came from is visible in any tensor."""
    model = small_model(vocab_size, n_layer=1, n_embd=16, block_size=16)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    return model


def same_weights(a: GPT, b: GPT) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -----------------------------------------------------------------------------
# Round trip


def test_round_trip_is_exact(tmp_path, bpe):
    model = small_model(bpe.vocab_size)
    with torch.no_grad():  # not the init: a save that dropped a tensor would show
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    folder = save_checkpoint(tmp_path / "ckpt", model, bpe, step=42, val_loss=2.5, extra={"note": "x"})
    loaded = load_checkpoint(folder)

    assert same_weights(model, loaded.model)  # bitwise
    idx = torch.randint(0, bpe.vocab_size, (2, 32))
    with torch.no_grad():
        assert torch.equal(model(idx)[0], loaded.model(idx)[0])
    assert not loaded.model.training
    # the tied output layer is the token embedding again, one storage, not a copy
    m = loaded.model
    assert m.lm_head.weight is m.transformer.wte.weight
    assert m.lm_head.weight.data_ptr() == m.transformer.wte.weight.data_ptr()
    assert loaded.model_config == model.config
    assert loaded.tokenizer.spec() == bpe.spec()
    assert (loaded.config["step"], loaded.config["val_loss"], loaded.config["note"]) == (42, 2.5, "x")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_gpt2_tokenizer_travels_with_the_checkpoint(tmp_path, gpt2_dir):
    tok = load_gpt2(gpt2_dir)
    folder = save_checkpoint(tmp_path / "ckpt", small_model(tok.vocab_size, n_layer=1, n_embd=16), tok)
    loaded = load_checkpoint(folder)
    assert loaded.tokenizer.encode("Once upon a time") == [7454, 2402, 257, 640]
    assert {"encoder.json", "vocab.bpe"} <= {p.name for p in folder.iterdir()}


def test_weights_are_stored_once_and_uncompiled(tmp_path, bpe):
    from safetensors import safe_open

    model = small_model(bpe.vocab_size)
    save_checkpoint(tmp_path / "ckpt", model, bpe)
    with safe_open(tmp_path / "ckpt" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "transformer.wte.weight" in keys
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in keys)


# -----------------------------------------------------------------------------
# Loading needs only the path


def test_run_folder_means_best_else_last(tmp_path, bpe, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"train": {}, "model": {}}))  # the run's own config
    save_checkpoint(run / "checkpoints" / "last", filled_model(bpe.vocab_size, 1.0), bpe, step=10)
    save_checkpoint(run / "checkpoints" / "best", filled_model(bpe.vocab_size, 2.0), bpe, step=8)

    assert load_checkpoint(run).config["step"] == 8
    assert load_checkpoint(run / "checkpoints" / "last").config["step"] == 10
    monkeypatch.chdir(run / "checkpoints" / "last")
    assert load_checkpoint(".").config["step"] == 10  # "." has no name; it still resolves
    shutil.rmtree(run / "checkpoints" / "best")
    assert load_checkpoint(run).config["step"] == 10

    shutil.rmtree(run / "checkpoints" / "last")
    with pytest.raises(UserError, match="no checkpoint yet"):
        resolve_checkpoint(run)
    with pytest.raises(UserError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a tinystories checkpoint"):
        resolve_checkpoint(tmp_path / "empty")


# -----------------------------------------------------------------------------
# Trainer state: tensors and primitives only, read with weights_only=True


def test_trainer_state_loads_with_weights_only(tmp_path, bpe):
    model = small_model(bpe.vocab_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx = torch.randint(0, bpe.vocab_size, (2, 16))
    model(idx, idx)[1].backward()
    opt.step()
    state = {
        "optimizer": opt.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "step": 1,
        "best_val_loss": 3.25,
        "data_position": {"epoch": 0, "offset": 12345},
    }
    folder = save_checkpoint(tmp_path / "ckpt", model, bpe, step=1, trainer_state=state)

    raw = torch.load(folder / "trainer_state.pt", weights_only=True)  # what the design promises
    got = load_trainer_state(folder)
    for loaded in (raw, got):
        assert torch.equal(loaded["torch_rng"], state["torch_rng"])
        assert loaded["python_rng"] == state["python_rng"]
        assert loaded["data_position"] == state["data_position"] and loaded["best_val_loss"] == 3.25
        exp_avg = loaded["optimizer"]["state"][0]["exp_avg"]
        assert torch.equal(exp_avg, opt.state_dict()["state"][0]["exp_avg"])

    # a restored optimizer continues from the same moments
    opt2 = torch.optim.AdamW(small_model(bpe.vocab_size).parameters(), lr=1e-3)
    opt2.load_state_dict(got["optimizer"])
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]


class _Payload:
    """An object whose unpickling would run code: here, create a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_trainer_state_that_would_run_code_is_refused(tmp_path, bpe):
    folder = save_checkpoint(tmp_path / "ckpt", small_model(bpe.vocab_size), bpe)
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "x": _Payload(str(marker))}, folder / "trainer_state.pt")
    with pytest.raises(UserError, match="trainer_state.pt"):
        load_trainer_state(folder)
    assert not marker.exists()

    shutil.copyfile(folder / "config.json", folder / "trainer_state.pt")  # not even a torch file
    with pytest.raises(UserError, match="trainer_state.pt"):
        load_trainer_state(folder)
    (folder / "trainer_state.pt").unlink()
    with pytest.raises(UserError, match="cannot be resumed"):
        load_trainer_state(folder)


# -----------------------------------------------------------------------------
# A save cut off at any point leaves a loadable checkpoint


class Crash(Exception):
    pass


def _crash(*args, **kwargs):
    raise Crash()


def _crash_at(point: str, monkeypatch):
    """Make the next save_checkpoint stop at `point`, as a kill there would (no cleanup runs)."""
    import safetensors.torch

    if point == "weights":  # while the temporary folder is being written
        monkeypatch.setattr(safetensors.torch, "save", _crash)
    elif point == "trainer_state":
        monkeypatch.setattr(torch, "save", _crash)
    elif point.startswith("rename"):  # rename1: NAME -> NAME.old; rename2: tmp -> NAME
        real, calls = os.rename, []

        def rename(src, dst):
            calls.append(src)
            if len(calls) == int(point[-1]):
                raise Crash()
            real(src, dst)

        monkeypatch.setattr(os, "rename", rename)
    elif point == "cleanup":  # halfway through deleting NAME.old: some of its files are gone
        real_rmtree = shutil.rmtree

        def rmtree(path, *a, **k):
            if str(path).endswith(".old"):
                os.remove(os.path.join(path, "model.safetensors"))
                raise Crash()
            real_rmtree(path, *a, **k)

        monkeypatch.setattr(shutil, "rmtree", rmtree)


@pytest.mark.parametrize("point", ["weights", "trainer_state", "rename1", "rename2", "cleanup"])
def test_save_cut_off_leaves_a_loadable_checkpoint(tmp_path, bpe, point, monkeypatch):
    vocab = bpe.vocab_size
    run = tmp_path / "run"
    last = run / "checkpoints" / "last"
    save_checkpoint(last, filled_model(vocab, 1.0), bpe, step=1, trainer_state={"step": 1})

    with monkeypatch.context() as m:
        _crash_at(point, m)
        with pytest.raises(Crash):
            save_checkpoint(last, filled_model(vocab, 2.0), bpe, step=2, trainer_state={"step": 2})

    # whichever save survived, it is whole: its weights, config and trainer state agree
    for path in (last, run):
        loaded = load_checkpoint(path)
        step = loaded.config["step"]
        assert step in (1, 2)
        assert same_weights(loaded.model, filled_model(vocab, float(step)))
        assert load_trainer_state(path)["step"] == step

    # the next save recovers and leaves nothing behind
    save_checkpoint(last, filled_model(vocab, 3.0), bpe, step=3, trainer_state={"step": 3})
    assert load_checkpoint(run).config["step"] == 3
    assert os.listdir(last.parent) == ["last"]


_SAVER = textwrap.dedent("""
    import sys, torch
    from tinystories.checkpoint import save_checkpoint
    from tinystories.config import ModelConfig
    from tinystories.model import GPT
    from tinystories.tokenizer import Tokenizer

    tok = Tokenizer.load(sys.argv[2])
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=tok.vocab_size))
    step = 0
    while True:
        step += 1
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(step))
        save_checkpoint(sys.argv[1], model, tok, step=step, trainer_state={"step": step})
        print(step, flush=True)
""")


@pytest.mark.slow  # three interpreters importing torch: ~4 s on an idle machine, more when shared
def test_save_killed_at_random_moments(tmp_path, bpe):
    """Real SIGKILLs (no Python cleanup at all) at random moments of a stream of saves."""
    bpe.save(tmp_path / "tok")
    rng = random.Random(1234)
    procs = []
    for i in range(3):  # concurrently: one interpreter start-up's worth of wall time
        folder = tmp_path / f"run{i}" / "checkpoints" / "last"
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(folder), str(tmp_path / "tok")],
                                stdout=subprocess.PIPE, text=True)
        procs.append((folder, proc))
    for folder, proc in procs:
        proc.stdout.readline()  # at least one save finished
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()

        loaded = load_checkpoint(folder)
        step = loaded.config["step"]
        assert same_weights(loaded.model, filled_model(bpe.vocab_size, float(step)))
        assert load_trainer_state(folder)["step"] == step
        save_checkpoint(folder, loaded.model, bpe, step=step + 1)  # and saving goes on from there
        assert os.listdir(folder.parent) == ["last"]


# -----------------------------------------------------------------------------
# Checkpoints that are missing, not ours, truncated or corrupted: one line, no traceback


def _damage(folder, how: str) -> None:
    weights, config = folder / "model.safetensors", folder / "config.json"
    if how == "config not ours":
        config.write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "n_layer": 2}))
    elif how == "config a list":
        config.write_text("[1, 2, 3]")
    elif how == "config truncated":
        config.write_bytes(config.read_bytes()[:40])
    elif how == "config binary":
        config.write_bytes(bytes(range(256)))
    elif how == "config without model":
        c = json.loads(config.read_text())
        del c["model"]
        config.write_text(json.dumps(c))
    elif how == "config impossible model":
        c = json.loads(config.read_text())
        c["model"]["n_head"] = 5
        config.write_text(json.dumps(c))
    elif how == "config newer format":
        c = json.loads(config.read_text())
        c["format_version"] = 99
        config.write_text(json.dumps(c))
    elif how == "weights random bytes":
        weights.write_bytes(os.urandom(4096))
    elif how == "weights one byte flipped":  # still a valid safetensors file: only the hash tells
        data = bytearray(weights.read_bytes())
        data[-5] ^= 0x40
        weights.write_bytes(bytes(data))
    elif how == "weights truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "weights missing":
        weights.unlink()
    elif how == "weights of another model":
        from safetensors.torch import save_file

        save_file({"transformer.wte.weight": torch.zeros(3, 3)}, weights)
    elif how == "tokenizer corrupted":
        (folder / "tokenizer.json").write_text("{not json")
    elif how == "tokenizer swapped":
        c = json.loads(config.read_text())
        c["tokenizer"]["fingerprint"] = "0" * 64
        config.write_text(json.dumps(c))
    elif how == "empty folder":
        for p in folder.iterdir():
            p.unlink()
    else:
        raise AssertionError(how)


DAMAGES = [
    "config not ours", "config a list", "config truncated", "config binary", "config without model",
    "config impossible model", "config newer format", "weights random bytes", "weights one byte flipped", "weights truncated",
    "weights missing", "weights of another model", "tokenizer corrupted", "tokenizer swapped", "empty folder",
]


@pytest.mark.parametrize("how", DAMAGES)
def test_bad_checkpoint_is_one_clear_line(tmp_path, bpe, how, capfd):
    folder = save_checkpoint(tmp_path / "ckpt", small_model(bpe.vocab_size), bpe)
    _damage(folder, how)
    with pytest.raises(UserError):
        load_checkpoint(folder)

    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(folder), "--out", str(out)]) == 2
    err = capfd.readouterr().err
    assert err.startswith("tinystories export: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert not out.exists()  # nothing written on the way to the error


def test_bad_checkpoint_in_a_real_process(tmp_path, bpe):
    """The installed command end to end, on a truncated weights file: exit 2, one stderr line."""
    folder = save_checkpoint(tmp_path / "ckpt", small_model(bpe.vocab_size), bpe)
    _damage(folder, "weights truncated")
    r = subprocess.run([sys.executable, "-m", "tinystories", "export", "--checkpoint", str(folder),
                        "--out", str(tmp_path / "hf")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "truncated or corrupted" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_config_is_read_without_loading_weights(tmp_path, bpe):
    folder = save_checkpoint(tmp_path / "ckpt", small_model(bpe.vocab_size), bpe, step=5, val_loss=1.5)
    (folder / "model.safetensors").unlink()
    config = read_checkpoint_config(folder)
    assert (config["step"], config["val_loss"], config["format"]) == (5, 1.5, ckpt_module.FORMAT)
