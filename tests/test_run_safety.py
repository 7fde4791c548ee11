"""One writer per run folder, resumes that say what they change, sizes checked before allocating,
a checkpoint read while it is saved, and errors folded onto one line."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import tinystories.checkpoint
from conftest import run_cli
from test_train import SMALL, read_log, torchrun_cmd, weights
from test_train_faults import _rank_pids, one_line_error
from tinystories.checkpoint import load_checkpoint, save_checkpoint
from tinystories.config import TrainConfig
from tinystories.model import GPT
from tinystories.runlock import LOCK_FILE, RunLock
from tinystories.errors import UserError


def start_long_run(run, data, *extra, torchrun=False):
    """A run that would go on for hours, once it has logged 2 steps (in a process group of its own)."""
    args = ["--data", data, "--out", run, *SMALL, "--max-steps", 100000, "--checkpoint-interval", 100000, *extra]
    cmd = torchrun_cmd(*args) if torchrun else [sys.executable, "-m", "tinystories", "train", *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "log.jsonl").exists() and len(read_log(run)) >= 2):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    return proc


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    state = open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0]
    return state == "Z"  # a zombie has exited; only its parent's wait is missing


# -----------------------------------------------------------------------------
# One writer per run folder


def test_the_lock_refuses_a_second_holder_and_is_released(tmp_path):
    first = RunLock(tmp_path / "run")
    with pytest.raises(UserError, match=f"in use by another training process \\(pid {os.getpid()}\\)"):
        RunLock(tmp_path / "run")
    first.release()
    RunLock(tmp_path / "run").release()


def test_a_folder_the_lock_made_for_a_run_that_never_started_is_removed(tmp_path, small_data):
    r = run_cli("train", "--data", small_data, "--out", tmp_path / "new", *SMALL, "--dropout", "2")
    one_line_error(r)
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_a_second_writer_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path, small_data):
    run = tmp_path / "run"
    proc = start_long_run(run, small_data, "--checkpoint-interval", 2)
    try:
        r = run_cli("train", "--data", small_data, "--out", run, "--resume")
        line = one_line_error(r)
        assert f"in use by another training process (pid {proc.pid})" in line and "kill -TERM" in line
        r = run_cli("train", "--data", small_data, "--out", run, *SMALL)  # nor a new run over it
        assert f"(pid {proc.pid})" in one_line_error(r)
    finally:
        proc.kill()
        proc.communicate()
    assert (run / LOCK_FILE).exists()  # the file stays; the kernel dropped the lock with its holder
    saved_at = json.loads((run / "checkpoints" / "last" / "config.json").read_text())["step"]
    run_cli("train", "--data", small_data, "--out", run, "--resume", "--max-steps", saved_at + 2, check=True)
    assert read_log(run)[-1]["step"] == saved_at + 2


@pytest.mark.slow
def test_ranks_stop_within_seconds_when_their_launcher_is_killed(tmp_path, small_data):
    run = tmp_path / "run"
    proc = start_long_run(run, small_data, "--grad-accum", 2, torchrun=True)
    ranks = _rank_pids(proc)
    assert sorted(ranks) == [0, 1], ranks
    r = run_cli("train", "--data", small_data, "--out", run, "--resume")  # rank 0 holds the lock
    assert f"(pid {ranks[0]})" in one_line_error(r)
    proc.kill()  # the launcher alone, as kill -9 PID does: its ranks are orphaned
    proc.communicate()
    deadline = time.time() + 30
    while time.time() < deadline and not all(gone(pid) for pid in ranks.values()):
        time.sleep(0.1)
    assert all(gone(pid) for pid in ranks.values()), "ranks went on training without their launcher"
    stopped_at = json.loads((run / "checkpoints" / "last" / "config.json").read_text())["step"]
    assert read_log(run)[-1]["step"] == stopped_at  # they stopped as on SIGTERM: the last step saved
    run_cli("train", "--data", small_data, "--out", run, "--resume", "--max-steps", stopped_at + 1, check=True)


# -----------------------------------------------------------------------------
# --resume with other training settings: refused, or applied and recorded


CHANGES = {  # a valid new value for every TrainConfig field (SMALL's run: tiny, Muon + AdamW)
    "optimizer": "adamw", "learning_rate": 3e-3, "muon_lr": 5e-3, "muon_momentum": 0.9, "schedule": "wsd",
    "decay_fraction": 0.5, "min_lr": 1e-4, "warmup_steps": 1, "weight_decay": 0.05, "beta1": 0.8, "beta2": 0.9,
    "grad_clip": 0.7, "batch_size": 2, "grad_accum": 2, "epochs": 2.0, "max_steps": 5, "eval_interval": 5,
    "eval_tokens": 256, "checkpoint_interval": 5, "log_interval": 1, "seed": 7, "device": "cpu", "dtype": "bf16",
    "compile": False, "compile_cpu": True, "peak_tflops": 10.0,
}
REFUSED = {"optimizer", "seed"}


def test_every_training_setting_has_a_resume_rule():
    assert set(CHANGES) == {f for f in TrainConfig().to_dict()}


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory, small_data):
    run = tmp_path_factory.mktemp("resume") / "run"
    run_cli("train", "--data", small_data, "--out", run, *SMALL, "--max-steps", 3, "--dtype", "fp32", check=True)
    return run


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_a_changed_setting_on_resume_is_refused_or_applied_and_recorded(field, three_steps, tmp_path, small_data,
                                                                         monkeypatch, capsys):
    import shutil

    import tinystories.train
    from tinystories.cli import main

    monkeypatch.setattr(tinystories.train, "_cpu_can_compile", lambda say: False)  # compile_cpu: no 20 s compile
    run = tmp_path / "run"
    shutil.copytree(three_steps, run)
    value = CHANGES[field]
    extra = [] if field == "max_steps" else ["--max-steps", "5"]
    flag = f"--{field.replace('_', '-')}"
    capsys.readouterr()
    code = main(["train", "--data", str(small_data), "--out", str(run), "--resume", flag, str(value).lower(), *extra])
    out, err = capsys.readouterr()
    if field in REFUSED:
        assert code == 2 and len(err.strip().splitlines()) == 1 and "which a resumed run keeps" in err
        return
    assert code == 0, err[-2000:]
    config = json.loads((run / "config.json").read_text())
    assert config["train"][field] == value
    assert config["resumed"][-1]["changed"][field][1] == value
    assert f"{field} " in out.split("note: resuming with changed settings: ")[1].splitlines()[0]
    state = torch.load(run / "checkpoints" / "last" / "trainer_state.pt", weights_only=True)
    muon, adamw = state["muon"]["param_groups"][0], state["optimizer"]["param_groups"][0]
    applied = {"muon_momentum": lambda: muon["momentum"], "beta1": lambda: adamw["betas"][0],
               "beta2": lambda: adamw["betas"][1], "weight_decay": lambda: adamw["weight_decay"],
               "learning_rate": lambda: adamw["peak_lr"], "muon_lr": lambda: muon["peak_lr"]}
    if field in applied:  # the optimizers run with the new value, not the saved one
        assert applied[field]() == value


# -----------------------------------------------------------------------------
# Sizes checked before anything is allocated


@pytest.mark.parametrize("flags", [["--mlp-hidden", "1000000000"], ["--n-embd", "1000000", "--n-head", "1"],
                                   ["--n-layer", "100000", "--n-embd", "4096", "--n-head", "32"]])
def test_a_model_too_large_for_memory_is_one_line_before_any_allocation(tmp_path, small_data, flags):
    r = run_cli("train", "--data", small_data, "--out", tmp_path / "run", *SMALL, *flags, timeout=120)
    line = one_line_error(r)
    assert "training it needs at least" in line and "choose smaller sizes" in line


@pytest.mark.parametrize("preset", ["33m", "tiny", "ts-33m", "ts-1layer-21m"])
def test_parameters_are_counted_without_building_the_model(preset):
    from tinystories.config import get_preset
    from tinystories.train import parameter_count

    config = get_preset(preset)
    with torch.device("meta"):
        assert parameter_count(config) == GPT(config).num_params()


def test_a_prompt_file_too_large_or_too_long_is_one_line(tmp_path, small_data):
    from tinystories.quality import MAX_PROMPTS, load_prompt_set

    many = tmp_path / "many.txt"
    many.write_text("Once upon a time\n" * (MAX_PROMPTS + 1))
    with pytest.raises(UserError, match="holds 10,001 beginnings"):
        load_prompt_set(str(many), tmp_path)
    many_yaml = tmp_path / "many.yaml"
    many_yaml.write_text("".join(f"- Story {i}\n" for i in range(MAX_PROMPTS + 1)))
    with pytest.raises(UserError, match="holds 10,001 beginnings"):
        load_prompt_set(str(many_yaml), tmp_path)
    huge = tmp_path / "huge.txt"
    huge.write_bytes(b"x" * (5 << 20))
    with pytest.raises(UserError, match="is 5.0 MiB"):
        load_prompt_set(str(huge), tmp_path)


# -----------------------------------------------------------------------------
# A checkpoint read while a training run saves it


def test_a_checkpoint_saved_while_it_is_read_loads_whole(tmp_path, bpe, monkeypatch):
    from tinystories.config import ModelConfig

    config = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=bpe.vocab_size)
    torch.manual_seed(0)
    old, new = GPT(config), GPT(config)
    folder = tmp_path / "last"
    save_checkpoint(folder, old, bpe, step=1)
    real = tinystories.checkpoint.Tokenizer.load
    saves = []

    def load_then_save(path):  # between config.json and the weights, as a training run's save can fall
        if not saves:
            saves.append(save_checkpoint(folder, new, bpe, step=2))
        return real(path)

    monkeypatch.setattr(tinystories.checkpoint.Tokenizer, "load", load_then_save)
    ckpt = load_checkpoint(folder)
    assert saves and ckpt.config["step"] == 2
    for a, b in zip(ckpt.model.state_dict().values(), new.state_dict().values()):
        assert torch.equal(a, b)


def test_real_damage_is_still_reported(tmp_path, bpe):
    from tinystories.config import ModelConfig

    folder = tmp_path / "last"
    save_checkpoint(folder, GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32,
                                            vocab_size=bpe.vocab_size)), bpe)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-3] ^= 1
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(UserError, match="truncated or corrupted"):
        load_checkpoint(folder)


# -----------------------------------------------------------------------------
# Every error on one line


def test_a_librarys_multi_line_message_is_folded_onto_one_line(tmp_path):
    forged = tmp_path / "forged.parquet"
    forged.write_bytes(b"PAR1" + b"\x00\xff" * 64 + b"PAR1")
    r = run_cli("prepare", "--source", forged, "--tokenizer", "bpe-512", "--out", tmp_path / "data")
    one_line_error(r)
    from tinystories.errors import one_line

    assert one_line("first line\n  second\tline\n") == "first line second line"
