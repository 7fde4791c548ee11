"""Training: the schedule, parameter groups, the loop learning, exact resume, signals, DDP, safety."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from tinystories.checkpoint import read_checkpoint_config
from tinystories.config import TRAIN_PRESETS, ModelConfig, TrainConfig, get_preset
from tinystories.errors import EXIT_STOPPED
from tinystories.model import GPT
from tinystories.train import lr_at, param_groups, steps_for

# A model small enough that a few dozen steps take a second or two.
SMALL = ["--preset", "tiny", "--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--block-size", "64",
         "--batch-size", "4", "--eval-interval", "4", "--eval-tokens", "512", "--log-interval", "4"]


def read_log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def weights(run, which="last"):
    return load_file(run / "checkpoints" / which / "model.safetensors")


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -----------------------------------------------------------------------------
# Pure pieces


def test_33m_defaults_are_the_briefs_recipe():
    c = TrainConfig(**TRAIN_PRESETS["33m"])
    assert (c.learning_rate, c.weight_decay, c.beta1, c.beta2) == (1e-4, 0.1, 0.9, 0.95)
    assert (c.batch_size, c.grad_accum, c.grad_clip, c.warmup_steps) == (32, 32, 0.5, 1000)
    assert c.max_steps is None and c.dtype == "auto"  # steps from the data; bf16 where supported
    assert get_preset("33m").dropout == 0.1


def test_schedule_edges():
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_steps=100)
    total = 1000
    assert lr_at(0, cfg, total) == pytest.approx(1e-5)  # step 0 already learns
    assert lr_at(99, cfg, total) == pytest.approx(1e-3)  # end of warmup: the peak
    assert lr_at(100, cfg, total) == pytest.approx(1e-3)  # start of the cosine
    assert lr_at(550, cfg, total) == pytest.approx((1e-3 + 1e-4) / 2)  # halfway down
    assert lr_at(1000, cfg, total) == pytest.approx(1e-4)  # end of decay: the floor
    assert lr_at(5000, cfg, total) == pytest.approx(1e-4)  # and it stays there
    lrs = [lr_at(s, cfg, total) for s in range(100, 1000)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_schedule_without_warmup():
    cfg = TrainConfig(learning_rate=1e-3, min_lr=0.0, warmup_steps=0)
    assert lr_at(0, cfg, 10) == pytest.approx(1e-3)


def test_weight_decay_only_on_matrices():
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == model.num_params()  # the tied matrix once, nothing lost


def test_steps_from_epochs():
    cfg = TrainConfig(batch_size=4, grad_accum=2, epochs=2.0)
    assert steps_for(cfg, train_tokens=10_000, block_size=100) == 25  # 2 * 10,000 / 800 rounded up
    assert steps_for(TrainConfig(max_steps=7), 10_000, 100) == 7


# -----------------------------------------------------------------------------
# The loop


def test_the_loop_learns_overfits_a_few_hundred_tokens(tmp_path, v1_train_head):
    data = tmp_path / "data"
    run_cli("prepare", "--source", v1_train_head, "--tokenizer", "bpe-512", "--max-stories", 3,
            "--val-fraction", "0", "--out", data, check=True)
    run = tmp_path / "run"
    r = run_cli("train", "--data", data, "--out", run, *SMALL, "--max-steps", 150, "--learning-rate", 3e-3,
                "--min-lr", 3e-3, "--warmup-steps", 10, "--weight-decay", 0, check=True)
    losses = [rec["loss"] for rec in read_log(run)]
    assert losses[0] > 5.0
    assert min(losses[-10:]) < 0.5, r.stdout[-2000:]


def test_run_folder_contents(tmp_path, small_data):
    run = tmp_path / "run"
    run_cli("train", "--data", small_data, "--out", run, *SMALL, "--max-steps", 8, check=True)
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["vocab_size"] == 512  # from the data
    assert config["train"]["max_steps"] == 8 and config["preset"] == "tiny"
    assert {"command_line", "git_commit", "versions", "total_steps", "data"} <= set(config)
    log = read_log(run)
    assert [r["step"] for r in log] == list(range(1, 9))
    assert {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(log[0])
    assert "val_loss" in log[3] and "val_loss" in log[7] and "val_loss" not in log[4]
    assert log[-1]["tokens"] == 8 * 4 * 64
    best = json.loads((run / "checkpoints" / "best" / "config.json").read_text())
    assert best["val_loss"] == min(r["val_loss"] for r in log if "val_loss" in r)
    for which in ("best", "last"):  # both load with nothing but the path
        r = run_cli("generate", "--checkpoint", run / "checkpoints" / which, "--max-new-tokens", 5, "--seed", 1)
        assert r.returncode == 0, r.stderr


def _kill_after(cmd, run, step, sig):
    """Start a training subprocess and send `sig` once log.jsonl reaches `step`."""
    proc = subprocess.Popen([sys.executable, "-m", "tinystories", *map(str, cmd)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        log = run / "log.jsonl"
        if log.exists() and any(json.loads(l)["step"] >= step for l in log.read_text().splitlines() if l.strip()):
            proc.send_signal(sig)
            break
        time.sleep(0.02)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_exact_resume_is_bitwise_equal(tmp_path, small_data, sig):
    args = [*SMALL, "--max-steps", 16, "--checkpoint-interval", 4, "--dtype", "fp32", "--dropout", 0.1]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    run_cli("train", "--data", small_data, "--out", straight, *args, check=True)

    code, out, err = _kill_after(["train", "--data", small_data, "--out", broken, *args], broken, 6, sig)
    if sig != signal.SIGKILL:
        assert code == EXIT_STOPPED and "--resume" in out, err  # finishes the step, saves, says how to resume
    else:
        assert code == -signal.SIGKILL
    stopped_at = json.loads((broken / "checkpoints" / "last" / "config.json").read_text())["step"]
    assert 4 <= stopped_at < 16

    run_cli("train", "--data", small_data, "--out", broken, "--resume", check=True)  # settings from the run
    assert_bitwise_equal(weights(straight), weights(broken))
    assert [r["loss"] for r in read_log(straight)] == [r["loss"] for r in read_log(broken)]
    assert [r.get("val_loss") for r in read_log(straight)] == [r.get("val_loss") for r in read_log(broken)]


def test_a_second_ctrl_c_quits_at_once_and_leaves_a_resumable_run(tmp_path, small_data):
    run = tmp_path / "run"
    # steps of a few hundred ms, so the second signal lands while the first is still being honoured
    args = ["train", "--data", small_data, "--out", run, *SMALL, "--n-layer", 4, "--n-embd", 256, "--n-head", 4,
            "--batch-size", 16, "--max-steps", 100000, "--checkpoint-interval", 2]
    proc = subprocess.Popen([sys.executable, "-m", "tinystories", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "checkpoints" / "last").is_dir():
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    # Signals of one kind that arrive together are handled once: wait until the first was seen.
    seen = ""
    while "send it again" not in seen and time.time() < deadline:
        seen = proc.stderr.readline()
    proc.send_signal(signal.SIGINT)
    err = proc.stderr.read()
    proc.wait(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    # (the interrupt may land between the two renames of a save: loading then falls back to last.old)
    stopped_at = read_checkpoint_config(run / "checkpoints" / "last")["step"]
    r = run_cli("train", "--data", small_data, "--out", run, "--resume", "--max-steps", stopped_at + 1)
    assert r.returncode == 0, r.stderr
    assert read_log(run)[-1]["step"] == stopped_at + 1


def test_test_split_is_evaluated_beside_val(tmp_path, v1_train_head):
    data = tmp_path / "data"
    run_cli("prepare", "--source", v1_train_head, "--test", v1_train_head.with_name("TinyStories-valid.head.txt"),
            "--tokenizer", "bpe-512", "--max-stories", 300, "--out", data, check=True)
    run = tmp_path / "run"
    run_cli("train", "--data", data, "--out", run, *SMALL, "--max-steps", 4, check=True)
    last = read_log(run)[-1]
    assert 0 < last["test_loss"] < 10 and 0 < last["val_loss"] < 10 and last["test_loss"] != last["val_loss"]


def test_resume_refuses_other_model_or_tokenizer(tmp_path, small_data, v1_train_head):
    run = tmp_path / "run"
    run_cli("train", "--data", small_data, "--out", run, *SMALL, "--max-steps", 4, check=True)
    r = run_cli("train", "--data", small_data, "--out", run, "--resume", "--max-steps", 8, "--n-embd", 128)
    assert r.returncode == 2 and "n_embd" in r.stderr and len(r.stderr.strip().splitlines()) == 1

    other = tmp_path / "other"
    run_cli("prepare", "--source", v1_train_head, "--tokenizer", "bpe-600", "--max-stories", 300,
            "--out", other, check=True)
    r = run_cli("train", "--data", other, "--out", run, "--resume", "--max-steps", 8)
    assert r.returncode == 2 and "tokenizer" in r.stderr and len(r.stderr.strip().splitlines()) == 1

    r = run_cli("train", "--data", small_data, "--out", run, *SMALL, "--max-steps", 4)  # no --resume
    assert r.returncode == 2 and "--resume" in r.stderr


def test_resume_continues_to_a_larger_max_steps(tmp_path, small_data):
    run = tmp_path / "run"
    run_cli("train", "--data", small_data, "--out", run, *SMALL, "--max-steps", 4, check=True)
    run_cli("train", "--data", small_data, "--out", run, "--resume", "--max-steps", 6, check=True)
    assert [r["step"] for r in read_log(run)] == [1, 2, 3, 4, 5, 6]
    r = run_cli("train", "--data", small_data, "--out", run, "--resume", "--max-steps", 6)
    assert r.returncode == 2 and "already at step 6" in r.stderr


def test_non_finite_loss_stops_and_keeps_the_good_checkpoint(tmp_path, small_data):
    run = tmp_path / "run"
    r = run_cli("train", "--data", small_data, "--out", run, *SMALL, "--max-steps", 50, "--checkpoint-interval", 1,
                "--learning-rate", 1e9, "--min-lr", 1e9, "--warmup-steps", 0, "--grad-clip", 0, "--dtype", "fp32")
    assert r.returncode == 2, r.stdout + r.stderr
    assert ("became" in r.stderr) and "checkpoints/last" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    last = weights(run)
    assert all(torch.isfinite(t).all() for t in last.values())


def test_bad_settings_are_one_line_errors(tmp_path, small_data):
    for extra, needle in [(["--batch-size", "0"], "batch_size"), (["--dtype", "fp8"], "dtype"),
                          (["--n-embd", "100", "--n-head", "3"], "divisible")]:
        r = run_cli("train", "--data", small_data, "--out", tmp_path / "x", *SMALL, *extra)
        assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("train", "--data", tmp_path / "nowhere", "--out", tmp_path / "y", "--preset", "tiny")
    assert r.returncode == 2 and "prepare" in r.stderr


def test_toml_config_file(tmp_path, small_data):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text('[model]\nn_layer = 1\nn_embd = 32\nn_head = 2\nblock_size = 32\n[train]\nmax_steps = 3\nbatch_size = 2\n')
    run = tmp_path / "run"
    run_cli("train", "--data", small_data, "--out", run, "--preset", "tiny", "--config", cfg, "--batch-size", 3, check=True)
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["n_layer"] == 1 and config["train"]["max_steps"] == 3
    assert config["train"]["batch_size"] == 3  # the flag beats the file


def torchrun_cmd(*args, log_dir=None):
    """`torchrun --nproc_per_node=2 -m tinystories train ARGS` on Gloo. --standalone: the agent binds
    its rendezvous store on a free port itself (a port picked here could be taken before it binds).
    log_dir: each rank's stdout and stderr go to their own files there (see rank_logs)."""
    logs = ["--log-dir", str(log_dir), "--redirects", "3"] if log_dir is not None else []
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *logs,
            "-m", "tinystories", "train", *map(str, args)]


def torchrun_train(*args):
    r = subprocess.run(torchrun_cmd(*args), capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})  # one thread per rank
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path, small_data):
    """torchrun with 2 Gloo ranks x accumulation 1 == one process x accumulation 2 (same global batch),
    and so after both are resumed (the 2-rank run under torchrun again)."""
    args = [*SMALL, "--max-steps", 3, "--grad-accum", 2, "--dtype", "fp32", "--eval-interval", 3]
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli("train", "--data", small_data, "--out", one, *args, check=True)
    torchrun_train("--data", small_data, "--out", two, *args)
    a, b = weights(one), weights(two)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    la, lb = read_log(one), read_log(two)
    assert [x["loss"] for x in la] == pytest.approx([x["loss"] for x in lb], abs=1e-5)
    assert la[-1]["val_loss"] == pytest.approx(lb[-1]["val_loss"], abs=1e-5)

    run_cli("train", "--data", small_data, "--out", one, "--resume", "--max-steps", 5, check=True)
    torchrun_train("--data", small_data, "--out", two, "--resume", "--max-steps", 5)
    a, b = weights(one), weights(two)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    la, lb = read_log(one), read_log(two)
    assert [x["step"] for x in lb] == [1, 2, 3, 4, 5]
    assert [x["loss"] for x in la] == pytest.approx([x["loss"] for x in lb], abs=1e-5)
