"""GPUs and Macs, simulated on the CPU: the dtype each device gets, memory, MFU, out-of-memory,
compile fallbacks, and resume across dtypes and process counts.

CUDA is simulated by patching torch.cuda's queries (a T4 reports compute capability 7.5 and, as on
a real T4, `is_bf16_supported()` True); memory by fake tensors (FakeTensorMode) with the fused
attention kernel CUDA runs; fp16 with its grad scaler runs on CPU tensors.
"""

import json
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import tinystories.train
from conftest import REPO, run_cli
from test_train import SMALL, assert_bitwise_equal, read_log, torchrun_train, weights
from tinystories.cli import main
from tinystories.config import PRESETS, ModelConfig, get_preset
from tinystories.decoding import decode_dtype_choice
from tinystories.device import choose_dtype, describe, pick_device
from tinystories.errors import UserError
from tinystories.mfu import flops_per_token, peak_flops, peak_tflops_of
from tinystories.model import GPT
from tinystories.scheduler import Scheduler

GiB = 2**30


def fake_gpu(monkeypatch, name: str, capability: tuple[int, int], count: int = 1, memory_gib: float = 16.0):
    """torch.cuda answering as a machine with `count` GPUs called `name` would."""
    current = {"index": 0}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["index"])
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: current.update(index=int(getattr(i, "index", i))))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # as a real T4 says
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: types.SimpleNamespace(total_memory=int(memory_gib * GiB), name=name))
    monkeypatch.setattr(torch.version, "hip", None)
    return current


# -----------------------------------------------------------------------------
# Which dtype each device gets


def test_a_t4_trains_in_fp16_with_the_scaler_and_an_a100_in_bf16(monkeypatch):
    fake_gpu(monkeypatch, "Tesla T4", (7, 5))
    dtype, why = choose_dtype(torch.device("cuda", 0), "auto")
    assert dtype == torch.float16 and "grad scaler" in why and "7.5" in why
    assert decode_dtype_choice(torch.device("cuda", 0), "auto")[0] == torch.float16
    line = describe(torch.device("cuda", 0), dtype, why)
    assert line.startswith("device cuda:0 (Tesla T4, compute capability 7.5), float16: ")
    # bf16 asked for on a T4 works (emulated) but says it is slow
    assert "emulated" in choose_dtype(torch.device("cuda", 0), "bf16")[1]

    fake_gpu(monkeypatch, "NVIDIA A100-SXM4-80GB", (8, 0))
    assert choose_dtype(torch.device("cuda", 0), "auto")[0] == torch.bfloat16
    assert decode_dtype_choice(torch.device("cuda", 0), "auto")[0] == torch.bfloat16


def test_macs_train_in_fp32_and_decode_in_fp16():
    mps = torch.device("mps")
    assert choose_dtype(mps, "auto")[0] == torch.float32
    assert choose_dtype(mps, "bf16")[0] == torch.bfloat16  # the opt-in
    assert decode_dtype_choice(mps, "auto")[0] == torch.float16
    assert decode_dtype_choice(mps, "fp16")[0] == torch.float16


def test_fp16_decoding_is_for_gpus_and_int8_for_cpus(monkeypatch):
    with pytest.raises(UserError, match="fp16 decodes on GPUs"):
        decode_dtype_choice(torch.device("cpu"), "fp16")
    fake_gpu(monkeypatch, "Tesla T4", (7, 5))
    with pytest.raises(UserError, match="int8 decodes on the CPU only"):
        decode_dtype_choice(torch.device("cuda", 0), "int8")


def test_cuda_n_becomes_the_current_device_and_a_missing_one_is_one_line(monkeypatch):
    current = fake_gpu(monkeypatch, "NVIDIA L4", (8, 9), count=2)
    assert pick_device("cuda:1") == torch.device("cuda", 1) and current["index"] == 1
    assert pick_device("cuda") == torch.device("cuda", 1)  # the current one
    with pytest.raises(UserError, match="has 2 CUDA GPU"):
        pick_device("cuda:2")


# -----------------------------------------------------------------------------
# No float64 on the device (MPS has none)


class Float64Spy(TorchDispatchMode):
    """Records every op whose output is a float64 tensor."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                self.seen.append(str(func))
        return out


def test_evaluation_during_training_and_evaluate_make_no_float64_tensor():
    from tinystories.evaluate import score_tokens
    from tinystories.train import estimate_loss

    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=64))
    tokens = torch.randint(0, 63, (1000,)).numpy()
    tokens[::50] = 63  # end-of-text
    with Float64Spy() as spy:
        loss = estimate_loss(model, tokens, 32, 4, 500, torch.device("cpu"), torch.autocast("cpu", enabled=False))
        total, count = score_tokens(model, tokens, 63, batch_size=4, progress=False)
    assert spy.seen == []
    assert 3.0 < loss < 5.0 and count > 900 and 3.0 < total / count < 5.0


# -----------------------------------------------------------------------------
# Memory of one 33m step at the brief's 32 x 512, with fake tensors


def fused_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
    """SDPA as CUDA runs it at training shapes (the memory-efficient kernel: what a T4 gets; an
    A100's flash kernel keeps the same tensors for backward): no T x T matrix is kept."""
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, attn_mask, True, dropout_p, is_causal, scale=scale)[0]


@pytest.mark.slow
def test_one_33m_step_at_the_briefs_micro_batch_fits_in_6_gib(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    monkeypatch.setattr(F, "scaled_dot_product_attention", fused_attention)
    monkeypatch.setitem(tinystories.loss.CHUNK_FLOATS, "cpu", tinystories.loss.CHUNK_FLOATS["cuda"])
    config = get_preset("33m")
    with FakeTensorMode():
        model = GPT(config).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randint(0, config.vocab_size, (32, 512))
        tracker = MemTracker()
        tracker.track_external(model, optimizer, x)
        with tracker:
            for _ in range(2):  # the second step has the optimizer's state and the gradients' memory
                with torch.autocast("cpu", dtype=torch.float16):  # the T4's dtype; bf16 is the same size
                    loss = model(x, x)[1]
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                tracker.reset_mod_stats()
        peak = max(snap["Total"] for snap in tracker.get_tracker_snapshot("peak").values())
    assert 2 * GiB < peak <= 6 * GiB, peak / GiB  # the plain loss path peaked at 12.6 GiB


# -----------------------------------------------------------------------------
# MFU: FLOPs per token and the peak table


@pytest.mark.parametrize("preset", list(PRESETS))
def test_flops_per_token_is_within_5_percent_of_flop_counter_mode(preset, monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    monkeypatch.setattr(F, "scaled_dot_product_attention", fused_attention)  # counted as CUDA counts it
    config = get_preset(preset)
    with FakeTensorMode():
        model = GPT(config)
        x = torch.randint(0, config.vocab_size, (1, config.block_size))
        with FlopCounterMode(display=False) as counter:
            model(x, x)[1].backward()
    measured = counter.get_total_flops() / config.block_size
    assert flops_per_token(model) == pytest.approx(measured, rel=0.05)


def test_the_output_layer_counts_tied_or_not():
    config = get_preset("33m")
    with torch.device("meta"):
        tied = flops_per_token(GPT(config))
        untied = flops_per_token(GPT(ModelConfig(**{**config.to_dict(), "tie_embeddings": False})))
    assert tied == untied and tied == pytest.approx(194e6, rel=0.01)


@pytest.mark.parametrize("card, dtype, tflops", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4),
    ("NVIDIA H100 PCIe", torch.bfloat16, 756.0),
    ("NVIDIA H100 NVL", torch.bfloat16, 835.0),
    ("NVIDIA H200", torch.bfloat16, 989.4),
    ("NVIDIA GH200 480GB", torch.bfloat16, 989.4),
    ("NVIDIA A100-SXM4-40GB", torch.bfloat16, 312.0),
    ("NVIDIA A100 80GB PCIe", torch.float32, 156.0),  # TF32
    ("NVIDIA L40S", torch.bfloat16, 362.1),
    ("NVIDIA L40", torch.bfloat16, 181.0),
    ("NVIDIA L4", torch.bfloat16, 121.0),
    ("NVIDIA A10G", torch.bfloat16, 125.0),
    ("NVIDIA A10", torch.float16, 125.0),
    ("Tesla T4", torch.float16, 65.0),
    ("Tesla T4", torch.bfloat16, None),  # no bf16 tensor cores
    ("Tesla V100-SXM2-16GB", torch.float16, 125.0),
    ("Tesla V100-PCIE-32GB", torch.float16, 112.0),
    ("Tesla P100-PCIE-16GB", torch.float16, 18.7),
    ("NVIDIA GeForce RTX 4090", torch.bfloat16, 165.2),
    ("NVIDIA GeForce RTX 3090", torch.bfloat16, 71.0),
    ("NVIDIA RTX A6000", torch.bfloat16, 154.8),
    ("NVIDIA GeForce GTX 1080", torch.float16, None),
])
def test_peak_table_lookups_on_real_card_names(card, dtype, tflops):
    assert peak_tflops_of(card, dtype) == tflops


def test_peak_tflops_flag_overrides_and_cpus_have_no_peak():
    assert peak_flops(torch.device("cpu"), torch.bfloat16) is None
    assert peak_flops(torch.device("cpu"), torch.bfloat16, 100.0) == 100e12


# -----------------------------------------------------------------------------
# Training: one-line errors, fallbacks, fp16, resume across dtypes and process counts


def train_in_process(capsys, *args) -> tuple[int, str, str]:
    code = main(["train", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_out_of_memory_in_a_step_is_one_line_with_the_flags_that_keep_tokens_per_step(
        tmp_path, small_data, monkeypatch, capsys):
    def no_memory(r, accum):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.53 GiB. GPU 0 has a total capacity "
                                     "of 14.75 GiB of which 1.2 GiB is free.\nOf the allocated memory ...")

    monkeypatch.setattr(tinystories.train, "_forward_backward", no_memory)
    code, out, err = train_in_process(capsys, "--data", small_data, "--out", tmp_path / "run", *SMALL,
                                      "--max-steps", 2, "--grad-accum", 3)
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "out of memory on cpu with micro-batches of 4 x 64 tokens" in err
    assert "keep the 768 tokens per step with smaller micro-batches: --batch-size 2 --grad-accum 6" in err


def test_an_evaluation_that_fails_keeps_its_step_to_resume_from(tmp_path, small_data, monkeypatch, capsys):
    """As on a Mac before (a float64 sum at the first evaluation): whatever breaks the evaluation,
    the step before it is saved, although the checkpoint of that step would come after it."""
    real = tinystories.train.estimate_loss

    def failing(*a, **kw):
        raise TypeError("Cannot convert a MPS Tensor to float64 dtype")

    monkeypatch.setattr(tinystories.train, "estimate_loss", failing)
    run = tmp_path / "run"
    with pytest.raises(TypeError):
        main(["train", "--data", str(small_data), "--out", str(run), *map(str, SMALL), "--max-steps", "8"])
    assert json.loads((run / "checkpoints" / "last" / "config.json").read_text())["step"] == 4  # eval-interval 4
    monkeypatch.setattr(tinystories.train, "estimate_loss", real)
    code, out, err = train_in_process(capsys, "--data", small_data, "--out", run, "--resume")
    assert code == 0, err
    assert [r["step"] for r in read_log(run)] == [1, 2, 3, 4, 5, 6, 7, 8]


def test_the_start_of_train_says_device_dtype_and_why(tmp_path, small_data, capsys):
    code, out, err = train_in_process(capsys, "--data", small_data, "--out", tmp_path / "run", *SMALL,
                                      "--max-steps", 1, "--dtype", "fp32")
    assert code == 0
    assert "tinystories train: device cpu (CPU" in out and "float32: as asked (--dtype fp32)" in out


def test_muon_on_a_torch_without_it_is_one_line(tmp_path, small_data, monkeypatch, capsys):
    monkeypatch.delattr(torch.optim, "Muon")
    code, out, err = train_in_process(capsys, "--data", small_data, "--out", tmp_path / "run", *SMALL,
                                      "--max-steps", 1, "--optimizer", "muon")
    assert code == 2 and "needs torch 2.9 or newer" in err and len(err.strip().splitlines()) == 1


def test_cuda_compile_is_checked_up_front(monkeypatch, capsys):
    fake_gpu(monkeypatch, "Tesla P100-PCIE-16GB", (6, 0))
    assert not tinystories.train._cuda_can_compile(torch.device("cuda", 0), True)
    assert "compute capability 7.0 or more (this one is 6.0)" in capsys.readouterr().out
    fake_gpu(monkeypatch, "NVIDIA A100-SXM4-40GB", (8, 0))
    has_triton = tinystories.train.importlib.util.find_spec("triton") is not None
    assert tinystories.train._cuda_can_compile(torch.device("cuda", 0), True) == has_triton
    assert ("Triton is not installed" in capsys.readouterr().out) != has_triton


def test_a_compile_that_fails_at_the_first_step_is_retried_eagerly(tmp_path, small_data, monkeypatch, capsys):
    """The eager retry redoes the step from the same batches and random state: the run ends with the
    weights of a run that never compiled."""
    args = [*SMALL, "--max-steps", 3, "--dtype", "fp32", "--dropout", "0.1"]
    code, *_ = train_in_process(capsys, "--data", small_data, "--out", tmp_path / "eager", *args)
    assert code == 0

    class Broken(torch.nn.Module):
        def forward(self, *a, **kw):
            torch.rand(5)  # draws from the RNG, as a real step would before failing
            raise RuntimeError("triton: could not compile kernel\nsecond line")

    monkeypatch.setattr(tinystories.train, "_cpu_can_compile", lambda say: True)
    monkeypatch.setattr(torch, "compile", lambda model: Broken())
    code, out, err = train_in_process(capsys, "--data", small_data, "--out", tmp_path / "retried", *args,
                                      "--compile-cpu", "true")
    assert code == 0, err
    assert "note: torch.compile failed at the first step (triton: could not compile kernel second line); " \
           "training eagerly" in out
    assert_bitwise_equal(weights(tmp_path / "eager"), weights(tmp_path / "retried"))


def strict_json_lines(path):
    def refuse(name):
        raise AssertionError(f"{name} in log.jsonl is not JSON")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_fp16_skipped_steps_are_logged_as_such(tmp_path, small_data, monkeypatch, capsys):
    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *a, **kw: real(*a, **{**kw, "init_scale": 2.0**60}))
    code, out, err = train_in_process(capsys, "--data", small_data, "--out", tmp_path / "run", *SMALL,
                                      "--max-steps", 2, "--dtype", "fp16")
    assert code == 0, err
    records = strict_json_lines(tmp_path / "run" / "log.jsonl")
    assert [r.get("skipped") for r in records] == [True, True]
    assert [r["grad_norm"] for r in records] == [None, None]
    assert records[0]["loss_scale"] == 2.0**60 and records[1]["loss_scale"] == 2.0**59
    assert "fp16 overflow at loss scale" in out


@pytest.mark.parametrize("first, then", [("fp32", "fp16"), ("fp16", "fp32"), ("bf16", "fp16")])
def test_a_run_resumes_under_another_dtype(tmp_path, small_data, capsys, first, then):
    run = tmp_path / "run"
    code, out, err = train_in_process(capsys, "--data", small_data, "--out", run, *SMALL, "--max-steps", 2,
                                      "--dtype", first)
    assert code == 0, err
    code, out, err = train_in_process(capsys, "--data", small_data, "--out", run, "--resume", "--max-steps", 4,
                                      "--dtype", then)
    assert code == 0, err
    records = strict_json_lines(run / "log.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["loss"] < 7 for r in records)
    assert ("loss_scale" in records[-1]) == (then == "fp16")


@pytest.mark.slow
@pytest.mark.parametrize("first, then", [(1, 2), (2, 1)])
def test_a_run_resumes_with_another_number_of_processes(tmp_path, small_data, first, then):
    """The data position is global, so 1 -> 2 and 2 -> 1 processes continue the same run: the
    weights match an uninterrupted single process (no dropout: nothing else is random)."""
    args = [*SMALL, "--grad-accum", 2, "--dtype", "fp32", "--dropout", "0"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_cli("train", "--data", small_data, "--out", whole, *args, "--max-steps", 4, check=True)

    def train(processes, *extra):
        if processes == 1:
            run_cli("train", "--data", small_data, "--out", split, *extra, check=True)
        else:
            torchrun_train("--data", small_data, "--out", split, *extra)

    train(first, *args, "--max-steps", 2)
    train(then, "--resume", "--max-steps", 4)
    a, b = weights(whole), weights(split)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    assert [r["step"] for r in read_log(split)] == [1, 2, 3, 4]


def test_a_rank_the_saved_run_did_not_have_gets_a_fresh_dropout_stream():
    saved = {"per_rank": [{"torch": torch.get_rng_state()}]}
    tinystories.train._set_rng_state(saved, torch.device("cpu"), 1, fresh_seed=7, step=10)
    a = torch.rand(3)
    tinystories.train._set_rng_state(saved, torch.device("cpu"), 1, fresh_seed=7, step=10)
    assert torch.equal(a, torch.rand(3))  # seeded, so a resume is reproducible


# -----------------------------------------------------------------------------
# serve's attention on a 16-bit cache (GPUs) is computed in fp32, as SDPA does for generate


def test_serves_attention_over_a_16_bit_cache_is_fp32_inside():
    g = torch.Generator().manual_seed(0)
    SH, L, D = 8, 300, 32
    q, k, v = (torch.randn(SH, n, D, generator=g).to(torch.bfloat16) for n in (1, L, L))
    mask = torch.zeros(SH, 1, L)
    mask[:, :, 250:] = float("-inf")  # keys past the row's context
    got = Scheduler._attend(types.SimpleNamespace(attention_block=64), q, k, v, mask, n_keys=L)
    reference = F.scaled_dot_product_attention(q.float(), k[:, :250].float(), v[:, :250].float(), scale=1.0)
    assert got.dtype == torch.bfloat16
    # within bf16's rounding of the fp32 result (half an ulp: 2**-9 relative)
    assert torch.allclose(got.float(), reference, rtol=2**-8, atol=1e-6)


def test_generate_says_device_and_dtype(tmp_path, small_data):
    run = tmp_path / "run"
    run_cli("train", "--data", small_data, "--out", run, *SMALL, "--max-steps", 1, check=True)
    r = run_cli("generate", "--checkpoint", run, "--max-new-tokens", 5, "--seed", 1, "--dtype", "fp32", check=True)
    assert "tinystories generate: device cpu (CPU" in r.stderr and "float32: as asked (--dtype fp32)" in r.stderr


@pytest.mark.slow
def test_the_gpu_benchmark_runs_end_to_end_on_the_cpu(tmp_path):
    """bench/gpu.py is run on a GPU when one is lent; here its every case runs at tiny sizes."""
    out = tmp_path / "gpu.md"
    r = subprocess.run([sys.executable, "bench/gpu.py", "--quick", "--device", "cpu", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    text = out.read_text()
    for row in ("| 33m ", "| 33m-tuned ", "| 33m float16 eager", "| batch 1 |", "| batch 16 |"):
        assert row in text, text
    assert json.loads(out.with_suffix(".json").read_text())["train"][0]["tokens_per_s"] > 0
