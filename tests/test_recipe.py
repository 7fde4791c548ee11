"""The training recipe's options: the WSD schedule at its edges, which tensor Muon trains, and that a
Muon run keeps every promise of the trainer (bitwise-exact resume after a stop or a kill, DDP equal
to one process, fp16 with the grad scaler, --init-from, the optimizer state loadable with
weights_only=True)."""

import json
import os
import signal

import pytest
import torch

from conftest import run_cli
from test_train import SMALL, _kill_after, assert_bitwise_equal, read_log, torchrun_train, weights
from tinystories.config import ModelConfig, TrainConfig
from tinystories.errors import UserError
from tinystories.model import GPT
from tinystories.train import lr_at, make_optimizers, muon_params

LLAMA = ["--pos-embedding", "rope", "--norm", "rmsnorm", "--mlp", "swiglu", "--bias", "false"]
MUON = ["--optimizer", "muon", "--learning-rate", "4e-3", "--muon-lr", "8e-3"]


# -----------------------------------------------------------------------------
# Pure pieces


def test_wsd_schedule_edges():
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_steps=100, schedule="wsd", decay_fraction=0.2)
    total = 1000  # warmup 0..99, stable 100..799, decay 800..1000
    assert lr_at(0, cfg, total) == pytest.approx(1e-5)  # warmup as for cosine
    assert lr_at(99, cfg, total) == pytest.approx(1e-3)
    assert lr_at(100, cfg, total) == lr_at(799, cfg, total) == pytest.approx(1e-3)  # stable at the peak
    assert lr_at(800, cfg, total) == pytest.approx(1e-3)  # the decay starts from the peak ...
    assert lr_at(900, cfg, total) == pytest.approx((1e-3 + 1e-4) / 2)  # ... linearly ...
    assert lr_at(1000, cfg, total) == pytest.approx(1e-4)  # ... to the floor at the end
    assert lr_at(5000, cfg, total) == pytest.approx(1e-4)
    lrs = [lr_at(s, cfg, total) for s in range(100, 1001)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_wsd_decay_never_starts_before_warmup_ends():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.0, warmup_steps=8, schedule="wsd", decay_fraction=1.0)
    assert [lr_at(s, cfg, 10) for s in range(7, 11)] == pytest.approx([1.0, 1.0, 0.5, 0.0])
    short = TrainConfig(learning_rate=1.0, min_lr=0.0, warmup_steps=0, schedule="wsd", decay_fraction=0.01)
    assert lr_at(0, short, 10) == 1.0 and lr_at(9, short, 10) == 1.0 and lr_at(10, short, 10) == 0.0


@pytest.mark.parametrize("bad, message", [
    (dict(optimizer="sgd"), "optimizer must be adamw or muon"),
    (dict(schedule="linear"), "schedule must be cosine or wsd"),
    (dict(decay_fraction=0.0), "decay_fraction must be in"),
    (dict(muon_lr=-1.0), "muon_lr must be positive"),
    (dict(muon_momentum=1.0), "muon_momentum must be in"),
])
def test_bad_recipe_settings_are_refused(bad, message):
    with pytest.raises(UserError, match=message):
        TrainConfig(**bad)


@pytest.mark.parametrize("tied", [True, False])
def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(tied):
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, qk_norm=True,
                            tie_embeddings=tied))
    opts = make_optimizers(model, TrainConfig(optimizer="muon", learning_rate=1e-3, muon_lr=2e-2), torch.device("cpu"))
    muon = [p for g in opts["muon"].param_groups for p in g["params"]]
    adamw = [p for g in opts["adamw"].param_groups for p in g["params"]]
    assert {id(p) for p in muon} == {id(p) for p in muon_params(model)}
    assert len(muon) == 2 * 4  # c_attn, attention c_proj, c_fc, MLP c_proj in each block
    assert not {id(p) for p in muon} & {id(p) for p in adamw}
    assert len(muon) + len(adamw) == len(list(model.parameters()))  # every tensor once
    names = {id(p): n for n, p in model.named_parameters()}
    assert "transformer.wte.weight" in {names[id(p)] for p in adamw}
    assert any("q_norm" in names[id(p)] for p in adamw)  # gains stay with AdamW
    assert not tied or "lm_head.weight" not in names.values()  # a tied head is the embedding
    assert [g["peak_lr"] for g in opts["muon"].param_groups] == [2e-2]
    assert {g["peak_lr"] for g in opts["adamw"].param_groups} == {1e-3}
    only = make_optimizers(model, TrainConfig(), torch.device("cpu"))
    assert list(only) == ["adamw"]


# -----------------------------------------------------------------------------
# The trainer's promises under Muon


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_muon_resume_is_bitwise_equal(tmp_path, small_data, sig):
    args = [*SMALL, *LLAMA, *MUON, "--max-steps", 16, "--checkpoint-interval", 4, "--dtype", "fp32",
            "--dropout", 0.1, "--schedule", "wsd", "--warmup-steps", 2]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    run_cli("train", "--data", small_data, "--out", straight, *args, check=True)
    code, out, err = _kill_after(["train", "--data", small_data, "--out", broken, *args], broken, 6, sig)
    assert "Traceback" not in err
    stopped_at = json.loads((broken / "checkpoints" / "last" / "config.json").read_text())["step"]
    assert 4 <= stopped_at < 16
    state = torch.load(broken / "checkpoints" / "last" / "trainer_state.pt", weights_only=True)
    assert state["muon"]["state"] and state["optimizer"]["state"]  # both optimizers' moments saved

    run_cli("train", "--data", small_data, "--out", broken, "--resume", check=True)
    assert_bitwise_equal(weights(straight), weights(broken))
    assert [r["loss"] for r in read_log(straight)] == [r["loss"] for r in read_log(broken)]
    assert [r["lr"] for r in read_log(straight)] == [r["lr"] for r in read_log(broken)]


def test_muon_learns_faster_than_adamw_at_the_same_steps(tmp_path, small_data):
    """Not a benchmark (bench/recipe.py is): a sanity check that Muon really steps the matrices."""
    args = [*SMALL, "--max-steps", 30, "--warmup-steps", 3, "--learning-rate", "4e-3", "--eval-interval", 30]
    for name, extra in (("adamw", ["--optimizer", "adamw"]), ("muon", ["--optimizer", "muon", "--muon-lr", "4e-3"])):
        run_cli("train", "--data", small_data, "--out", tmp_path / name, *args, *extra, check=True)
    adamw, muon = read_log(tmp_path / "adamw")[-1]["val_loss"], read_log(tmp_path / "muon")[-1]["val_loss"]
    assert muon < adamw, (muon, adamw)


def test_muon_with_fp16_and_the_grad_scaler(tmp_path, small_data):
    """On a GPU where there is one; else the same scaler on CPU tensors (slow there, but the same code)."""
    run = tmp_path / "run"
    r = run_cli("train", "--data", small_data, "--out", run, *SMALL, *MUON, "--max-steps", 12, "--dtype", "fp16",
                "--warmup-steps", 2, "--device", "cuda" if torch.cuda.is_available() else "cpu", check=True)
    assert "float16" in json.loads((run / "config.json").read_text())["dtype"], r.stdout
    losses = [rec["loss"] for rec in read_log(run)]
    assert losses[-1] < losses[0]
    state = torch.load(run / "checkpoints" / "last" / "trainer_state.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0


def test_muon_init_from_a_checkpoint(tmp_path, small_data):
    base = tmp_path / "base"
    run_cli("train", "--data", small_data, "--out", base, *SMALL, *LLAMA, "--max-steps", 40, "--learning-rate", "5e-3",
            "--warmup-steps", 4, check=True)
    tuned = tmp_path / "tuned"
    run_cli("train", "--data", small_data, "--out", tuned, "--init-from", base, "--preset", "tiny",
            "--batch-size", 4, "--block-size", 32, *MUON, "--max-steps", 3, "--eval-interval", 3, check=True)
    assert read_log(tuned)[0]["loss"] < read_log(base)[0]["loss"] - 0.5  # started from the trained weights


@pytest.mark.slow
def test_muon_ddp_two_processes_match_one_process(tmp_path, small_data):
    args = [*SMALL, *LLAMA, *MUON, "--max-steps", 3, "--grad-accum", 2, "--dtype", "fp32", "--eval-interval", 3]
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli("train", "--data", small_data, "--out", one, *args, check=True)
    torchrun_train("--data", small_data, "--out", two, *args)
    a, b = weights(one), weights(two)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    assert [x["loss"] for x in read_log(one)] == pytest.approx([x["loss"] for x in read_log(two)], abs=1e-5)


# -----------------------------------------------------------------------------
# The path GPU users get: torch.compile of the training model (eager on the CPU in `train`)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["gpt2", "llama+qk_norm"])
def test_compiled_training_matches_eager_with_no_graph_break(layout):
    """What `train` runs on CUDA (torch.compile of the model; the optimizers stay eager), here with
    inductor on the CPU: fullgraph=True fails on any graph break in forward or backward."""
    options = {} if layout == "gpt2" else dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False,
                                                qk_norm=True, tie_embeddings=False)
    config = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64, dropout=0.0, **options)
    data = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(optimizer="muon", learning_rate=3e-3, muon_lr=1e-2)
    losses = {}
    for mode in ("eager", "compiled"):
        torch.manual_seed(0)
        model = GPT(config)
        optimizers = make_optimizers(model, cfg, torch.device("cpu"))
        step = torch.compile(model, fullgraph=True) if mode == "compiled" else model
        losses[mode] = []
        for _ in range(3):
            _, loss = step(data[:, :-1], data[:, 1:])
            loss.backward()
            for opt in optimizers.values():
                opt.step()
                opt.zero_grad(set_to_none=True)
            losses[mode].append(loss.item())
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4, abs=1e-4)
    assert losses["eager"][-1] < losses["eager"][0]


@pytest.mark.slow
def test_train_compile_cpu_trains_as_eager_does(tmp_path, small_data):
    """`train --compile-cpu true` (what the demo runs): compiled steps on the CPU, the same losses as
    eager within rounding (inductor fuses ops, so not bit for bit)."""
    args = [*SMALL, *LLAMA, *MUON, "--max-steps", 4, "--warmup-steps", 2, "--dtype", "fp32"]
    runs = {}
    for mode in ("eager", "compiled"):
        runs[mode] = run_cli("train", "--data", small_data, "--out", tmp_path / mode, *args,
                             "--compile-cpu", "true" if mode == "compiled" else "false", check=True)
    assert "compiling the model for this CPU" in runs["compiled"].stdout
    assert "compiling" not in runs["eager"].stdout
    eager, compiled = read_log(tmp_path / "eager"), read_log(tmp_path / "compiled")
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], rel=1e-4, abs=1e-4)


def test_train_compile_cpu_without_a_compiler_trains_eagerly_with_a_note(tmp_path, small_data):
    run = tmp_path / "run"
    env = os.environ | {"CXX": str(tmp_path / "no-such-compiler")}
    r = run_cli("train", "--data", small_data, "--out", run, *SMALL, "--max-steps", 2, "--compile-cpu", "true",
                env=env, check=True)
    assert "--compile-cpu needs a C++ compiler" in r.stdout and "training eagerly" in r.stdout
    assert "compiling the model" not in r.stdout
    assert len(read_log(run)) == 2
