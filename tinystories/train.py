"""`tinystories train`: train a GPT on prepared data, with exact resume, mixed precision and DDP.

    tinystories train --data data/ts --preset tiny --out runs/tiny
    tinystories train --data data/ts --out runs/tiny --resume            # continue exactly
    torchrun --nproc_per_node=2 -m tinystories train --data ... --out ...  # DDP (NCCL on GPUs, Gloo on CPU)

Reading order: the pure pieces (learning-rate schedule, parameter groups, config resolution), then
evaluation, then the loop. The run folder gets config.json, log.jsonl (one JSON object per
optimizer step) and checkpoints/{last,best}; only rank 0 writes, and it holds the folder's lock
while it trains (tinystories/runlock.py), so no second run writes there meanwhile.

Exact resume: checkpoints/last holds the optimizer, grad scaler, every RNG state, the data position,
the step and the best val loss, so "train N steps" and "train k, stop, resume to N" give bitwise
equal weights on CPU in fp32 (tests/test_train.py proves it).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import tomllib
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from tinystories import __version__
from tinystories.allocator import keep_freed_memory
from tinystories.checkpoint import (
    load_checkpoint, load_trainer_state, read_checkpoint_config, resolve_checkpoint, save_checkpoint,
)
from tinystories.config import (
    TRAIN_PRESETS, ModelConfig, TrainConfig, from_dict, get_preset, load_json, overrides_from_args,
)
from tinystories.data import EpochWindows, load_data_tokenizer, open_split, read_meta
from tinystories.device import choose_dtype, cuda_capability, describe, memory_of, pick_device
from tinystories.errors import EXIT_STOPPED, UserError, one_line
from tinystories.mfu import flops_per_token, peak_flops
from tinystories.model import GPT
from tinystories.outputs import check_output_dir
from tinystories.runlock import RunLock, watch_launcher
from tinystories.tokenizer import check_same_tokenizer

# -----------------------------------------------------------------------------
# Pure pieces


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then the schedule to min_lr.

    Warmup starts at learning_rate / warmup_steps, not 0, so the first step already learns.
    cosine: from the peak at the end of warmup to min_lr at `total_steps`.
    wsd (warmup-stable-decay; Hu et al. 2024, MiniCPM; Hägele et al. 2024): the peak until the last
    `decay_fraction` of all steps (never before warmup ends), then linear to min_lr at `total_steps`.
    """
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "wsd":
        decay_start = max(cfg.warmup_steps, total_steps - max(1, round(cfg.decay_fraction * total_steps)))
        if step < decay_start:
            return cfg.learning_rate
        progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
        return cfg.learning_rate + progress * (cfg.min_lr - cfg.learning_rate)
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (Linear and Embedding weights); never biases or LayerNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]  # a tied tensor appears once
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def muon_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What Muon trains: the 2-D matrices inside the blocks (attention and MLP projections).

    Muon orthogonalises each update (Newton-Schulz), which suits matrices that map one hidden
    space to another; embeddings and the output layer are lookups and a classifier, and gains and
    biases are vectors, so those stay with AdamW (Jordan et al. 2024; modded-nanogpt; nanochat).
    """
    return [p for p in model.transformer.h.parameters() if p.requires_grad and p.dim() == 2]


def make_optimizers(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> dict[str, torch.optim.Optimizer]:
    """The run's optimizers by name: {"adamw"} alone, or {"adamw", "muon"} with disjoint parameters.

    Each param group carries its peak learning rate as "peak_lr"; the schedule scales it every step.
    """
    in_muon = {id(p) for p in muon_params(model)} if cfg.optimizer == "muon" else set()
    rest = [g | {"params": [p for p in g["params"] if id(p) not in in_muon]} for g in param_groups(model, cfg.weight_decay)]
    optimizers = {"adamw": torch.optim.AdamW(
        [g | {"peak_lr": cfg.learning_rate} for g in rest if g["params"]], lr=cfg.learning_rate,
        betas=(cfg.beta1, cfg.beta2),
        fused=device.type in ("cuda", "cpu"),  # one kernel for all tensors; on CPU ~6x faster than the loop
    )}
    if in_muon:
        muon_lr = cfg.muon_lr or cfg.learning_rate
        optimizers["muon"] = torch.optim.Muon(
            [{"params": muon_params(model), "peak_lr": muon_lr}], lr=muon_lr, weight_decay=cfg.weight_decay,
            momentum=cfg.muon_momentum, nesterov=True,
            adjust_lr_fn="match_rms_adamw",  # updates with AdamW's RMS (0.2 sqrt(max(A, B))): one lr scale
        )
    return optimizers


def steps_for(cfg: TrainConfig, train_tokens: int, block_size: int) -> int:
    """Optimizer steps: max_steps if given, else enough to see `epochs` x the training tokens."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    tokens_per_step = cfg.batch_size * cfg.grad_accum * block_size
    return max(1, math.ceil(cfg.epochs * train_tokens / tokens_per_step))


def resolve_configs(args, data_meta: dict, saved: dict | None, init: dict | None = None) -> tuple[str, ModelConfig, TrainConfig]:
    """Preset (or the resumed run's config), then --config FILE, then flags; vocab from the data.

    init: config.json of the --init-from checkpoint. Its model config replaces the preset's (the
    preset then gives only training settings), and what the settings change must fit its weights.
    """
    if saved is not None:
        preset = saved["preset"]
        if args.preset not in (None, preset):
            raise UserError(f"this run was trained with --preset {preset}; resume without --preset or with that one")
        model = dict(saved["model"])
        train = dict(saved["train"])
    else:
        preset = args.preset or "33m"
        if init is not None:
            model = dict(init["model"])
        else:
            model = get_preset(preset).to_dict()
            model.pop("vocab_size")  # comes from the data unless set explicitly
        train = {**TrainConfig().to_dict(), **TRAIN_PRESETS[preset]}
    if args.config:
        try:
            with open(args.config, "rb") as f:
                file_cfg = tomllib.load(f)
        except FileNotFoundError:
            raise UserError(f"config file {args.config} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"{args.config} is not valid TOML ({e})") from None
        unknown = sorted(set(file_cfg) - {"model", "train"})
        if unknown:
            raise UserError(f"{args.config}: unknown table(s) {unknown}; use [model] and [train]")
        model.update(file_cfg.get("model", {}))
        train.update(file_cfg.get("train", {}))
    model.update(overrides_from_args(args, ModelConfig))
    train.update(overrides_from_args(args, TrainConfig))

    data_vocab = data_meta["tokenizer"]["vocab_size"]
    model.setdefault("vocab_size", data_vocab)
    if model["vocab_size"] < data_vocab:
        raise UserError(f"vocab_size {model['vocab_size']} is smaller than the data's tokenizer ({data_vocab} tokens)")
    model_cfg = from_dict(ModelConfig, model, what="model config")
    train_cfg = from_dict(TrainConfig, train, what="training config")
    if saved is not None:
        before = ModelConfig.from_dict(saved["model"]).to_dict()  # with fields added since at their defaults
        changed = sorted(k for k, v in model_cfg.to_dict().items() if before[k] != v)
        if changed:
            raise UserError(f"cannot resume with another model config (changed: {', '.join(changed)}); use a new --out")
    if init is not None:
        check_init_fits(model_cfg, ModelConfig.from_dict(init["model"]))
    return preset, model_cfg, train_cfg


# Bytes a trained parameter holds at least: fp32 weight, gradient, and AdamW's two moments.
TRAINING_BYTES_PER_PARAMETER = 16


def check_fits(model_cfg: ModelConfig, device: torch.device, copies: int = 1) -> None:
    """Refuse, before allocating anything, a model whose weights, gradients and optimizer state
    alone exceed the device's memory (activations come on top); `copies`: processes sharing it."""
    n_params = parameter_count(model_cfg)
    need, have = n_params * TRAINING_BYTES_PER_PARAMETER * copies, memory_of(device)
    if have is not None and need > have:
        size = f"{n_params / 1e9:,.1f}B" if n_params >= 1e9 else f"{n_params / 1e6:,.0f}M"
        where = "this machine has available" if device.type == "cpu" else f"{device} has"
        raise UserError(f"the model has {size} parameters: training it needs at least {need / 2**30:,.1f} GiB for "
                        f"weights, gradients and optimizer state, more than the {have / 2**30:,.1f} GiB {where}; "
                        "choose smaller sizes (--n-layer, --n-embd, --mlp-hidden, --vocab-size)")


def parameter_count(model_cfg: ModelConfig) -> int:
    """GPT(model_cfg).num_params() without building it: one block on the meta device, times n_layer
    (every block has the same parameters), so that 100,000 layers are counted as fast as one."""
    layers = model_cfg.attention_layers
    one = dataclasses.replace(model_cfg, n_layer=1, attention_layers=None if layers is None else layers[:1])
    with torch.device("meta"):
        model = GPT(one)
        per_block = sum(p.numel() for p in model.transformer.h[0].parameters())
        return model.num_params() + (model_cfg.n_layer - 1) * per_block


# Training settings a resumed run keeps: the optimizer state belongs to its optimizer, and the data
# order and dropout streams to the seed. Every other setting may change, and the change is recorded.
FIXED_ON_RESUME = ("optimizer", "seed")


def resume_changes(saved_train: dict, cfg: TrainConfig, run: Path) -> dict:
    """{field: [before, now]} of the training settings this resume changes; one line if it may not."""
    before = {**TrainConfig().to_dict(), **saved_train}  # with fields added since at their defaults
    changed = {k: [before[k], v] for k, v in cfg.to_dict().items() if before[k] != v}
    for name in FIXED_ON_RESUME:
        if name in changed:
            old = changed[name][0]
            raise UserError(f"this run was trained with --{name.replace('_', '-')} {old}, which a resumed run keeps "
                            f"(its {'optimizer state' if name == 'optimizer' else 'data order'} depends on it): "
                            f"drop --{name.replace('_', '-')}, or start a new run from these weights with "
                            f"--init-from {run / 'checkpoints' / 'last'} and another --out")
    return changed


def check_init_fits(model_cfg: ModelConfig, ckpt_cfg: ModelConfig) -> None:
    """--init-from: the new run's model must take the checkpoint's weights as they are, except that
    dropout may change and block_size may shrink (the learned positions are cropped, nanoGPT's
    crop_block_size: the released TinyStories models have 2,048 positions, the paper trained at 512)."""
    new, old = model_cfg.to_dict(), ckpt_cfg.to_dict()
    changed = sorted(k for k in new if k not in ("dropout", "block_size") and new[k] != old[k])
    if changed:
        raise UserError(
            "--init-from: the checkpoint's model has " + ", ".join(f"{k}={old[k]}" for k in changed)
            + "; drop the settings that change it (only dropout and a smaller block_size may differ)"
        )
    if new["block_size"] > old["block_size"]:
        raise UserError(f"--init-from: block_size {new['block_size']} is larger than the checkpoint's "
                        f"{old['block_size']} learned positions; use at most {old['block_size']}")


def initial_weights(path, block_size: int) -> dict:
    """The --init-from checkpoint's weights, learned positions cropped to `block_size`."""
    weights = load_checkpoint(path).model.state_dict()
    if "transformer.wpe.weight" in weights:  # RoPE (pos_embedding=rope) has no position table to crop
        weights["transformer.wpe.weight"] = weights["transformer.wpe.weight"][:block_size]
    return weights


# -----------------------------------------------------------------------------
# Evaluation during training


@torch.no_grad()
def estimate_loss(model, tokens: np.ndarray, block_size: int, batch_size: int, max_tokens: int,
                  device, autocast, rank: int = 0, world_size: int = 1) -> float:
    """Token-weighted mean loss over the first `max_tokens` targets of `tokens` (whole windows).

    Non-overlapping windows from the start of the split: the same tokens at every evaluation, so
    numbers are comparable across steps. (`tinystories evaluate` gives every token full context;
    here early positions of each window see less, so this reads slightly high.) Under DDP the
    windows are shared out among ranks and the sums all-reduced. Nothing in float64 touches the
    device (MPS has none): each batch's mean comes back as a Python float, summed on the host.
    """
    T = min(block_size, len(tokens) - 1)
    n_windows = max(1, min(max_tokens, len(tokens) - 1) // T)
    starts = [i * T for i in range(n_windows)][rank::world_size]
    loss_sum, n_tokens = 0.0, 0  # Python floats are float64
    was_training = model.training
    model.eval()
    for i in range(0, len(starts), batch_size):
        rows = np.stack([tokens[s : s + T + 1] for s in starts[i : i + batch_size]]).astype(np.int64)
        batch = torch.from_numpy(rows).to(device)  # (B, T + 1)
        with autocast:
            _, loss = model(batch[:, :-1], batch[:, 1:])
        n = batch[:, 1:].numel()
        loss_sum += loss.item() * n
        n_tokens += n
    model.train(was_training)
    if world_size > 1:  # each rank's sums, in fp32 (a relative 6e-8: far below the 6 decimals logged)
        total = torch.tensor([loss_sum, n_tokens], dtype=torch.float32, device=device)
        dist.all_reduce(total)
        loss_sum, n_tokens = total.tolist()
    return loss_sum / n_tokens


# -----------------------------------------------------------------------------
# Run bookkeeping: signals, the run's config.json, the trainer state


class StopRequest:
    """SIGINT/SIGTERM: the first finishes the current step and saves `last`; the second quits at once."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self, ddp: bool) -> None:
        """The run has ended (finished, stopped or failed): give the signals back to the caller (the
        demo goes on in this process). Under torchrun, ignore them instead: the agent sends SIGTERM
        to every rank as soon as one exits non-zero, and that must not kill a rank that is leaving
        with its own status. SIG_IGN rather than a Python handler, because Python puts back the
        default action (death) while the interpreter shuts down."""
        for sig, previous in self.previous.items():
            signal.signal(sig, signal.SIG_IGN if ddp else previous if previous is not None else signal.SIG_DFL)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt  # checkpoints are written atomically, so stopping anywhere is safe
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: finishing this step and saving checkpoints/last "
              "(send it again to quit at once)", file=sys.stderr, flush=True)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict:
    import tiktoken
    import tokenizers

    return {"tinystories": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "tiktoken": tiktoken.__version__, "tokenizers": tokenizers.__version__}


def _rng_state(device: torch.device, world_size: int) -> dict:
    """Every RNG the run draws from (dropout on each rank; data order is in EpochWindows)."""
    state = _local_rng_state(device)
    if world_size > 1:  # each rank has its own dropout stream; rank 0 saves them all
        gathered = [None] * world_size
        dist.all_gather_object(gathered, state)
        return {"per_rank": gathered}
    return {"per_rank": [state]}


def _set_rng_state(state: dict, device: torch.device, rank: int, fresh_seed: int, step: int) -> None:
    """This rank's saved RNG states. The data position is global (EpochWindows), so a run may resume
    with another number of processes: a rank the run did not have starts its dropout stream from
    `fresh_seed` mixed with the resumed step (only dropout draws from it)."""
    if rank >= len(state["per_rank"]):
        torch.manual_seed(fresh_seed * 1_000_003 + step)  # within 64 bits: seeds are 32-bit
        return
    _set_local_rng_state(device, state["per_rank"][rank])


def _truncate_log(path: Path, last_step: int) -> None:
    """Drop log records after the checkpoint we resume from: those steps are about to be redone."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in keep))


def _logged_steps(out: Path) -> int:
    """How many step records log.jsonl holds (0 when there is none)."""
    log = out / "log.jsonl"
    if not log.is_file():
        return 0
    return sum(1 for line in log.read_text(errors="replace").splitlines() if line.strip())


def _has_checkpoint(out: Path) -> bool:
    return any((out / "checkpoints" / name).exists() for name in ("last", "last.old", "best", "best.old"))


def _read_run_config(out: Path) -> dict:
    """The run's config.json, for --resume: a damaged one ends in one line, not a traceback."""
    path = out / "config.json"
    way_out = (f"restore it, or start a new run from the weights with --init-from {out / 'checkpoints' / 'last'} "
               "and another --out")
    try:
        saved = load_json(path)
    except UserError as e:
        raise UserError(f"{e}; {way_out}") from None
    # resolve_configs and run() index these; a truncated or hand-edited file must not end in a KeyError
    if not (isinstance(saved, dict) and isinstance(saved.get("preset"), str) and isinstance(saved.get("model"), dict)
            and isinstance(saved.get("train"), dict) and isinstance(saved.get("data"), dict)
            and isinstance(saved["data"].get("tokenizer"), dict)):
        raise UserError(f"{path} is damaged (the run's preset, model, train or data settings are missing); {way_out}")
    return saved


# -----------------------------------------------------------------------------
# The command


def run(args) -> int:
    """`tinystories train`. Under torchrun, every way out (finished, stopped, UserError, a bug) tears
    the process group down, and the ranks leave without the interpreter's shutdown."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _run_and_tear_down(args)
    try:
        code = _run_and_tear_down(args)
    except UserError as e:
        print(f"tinystories train: error: {one_line(e)}", file=sys.stderr)  # as the command line prints it
        code = 2
    # destroy_process_group does not stop Gloo's worker threads while a DDP model has used the group
    # (they run until the process ends), and a worker still releasing the tensors of the last
    # collective then needs the GIL during interpreter shutdown: Python ends that thread, which
    # aborts the rank with "terminate called without an active exception" (1 run in 65 on 2 busy
    # cores). Everything is written, flushed and torn down by now, so end here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run_and_tear_down(args) -> int:
    try:
        return _run(args)
    except RuntimeError as e:
        # Gloo's error in a collective when another rank's process has gone (it failed, or was
        # stopped at once): that rank's own message says why; this one says only that it follows.
        if dist.is_available() and dist.is_initialized() and (isinstance(e, dist.DistError) or "by peer" in str(e)):
            raise UserError(f"rank {dist.get_rank()}: lost contact with another process of this run (it failed "
                            "or was stopped; see its message); stopping too") from None
        raise
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _run(args) -> int:
    """One writer per run folder: the training process (rank 0 under torchrun) holds its lock,
    and under torchrun every rank stops when the launcher is gone (tinystories/runlock.py)."""
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    out = check_output_dir(args.out, "--out")  # before any work: a path that cannot be written fails now
    lock = RunLock(out) if int(os.environ.get("RANK", "0")) == 0 else None
    if ddp:
        watch_launcher()
    try:
        return _train(args, out, ddp)
    finally:
        if lock is not None:
            lock.release()


def _train(args, out: Path, ddp: bool) -> int:
    saved = None
    # A folder left by a crash before the first step (config.json, maybe an empty checkpoints/ or
    # log.jsonl) holds nothing to keep or resume: a new run reuses it.
    unused = not _has_checkpoint(out) and _logged_steps(out) == 0
    if args.resume:
        if not (out / "checkpoints" / "last").exists() and not (out / "checkpoints" / "last.old").exists():
            if unused:
                raise UserError(f"{out} has no checkpoints/last to resume from; drop --resume to start a new run")
            raise UserError(f"{out} has no checkpoints/last to resume from: its run stopped before the first "
                            f"checkpoint ({_logged_steps(out)} steps logged); delete {out} to start again there, "
                            "or choose another --out")
        saved = _read_run_config(out)
    elif ((out / "config.json").exists() or (out / "checkpoints").exists()) and not unused:
        if not (out / "checkpoints" / "last").exists() and not (out / "checkpoints" / "last.old").exists():
            raise UserError(f"{out} holds a run that stopped before its first checkpoint ({_logged_steps(out)} steps "
                            f"logged, nothing to resume); delete {out} to start again there, or choose another --out")
        raise UserError(f"{out} already holds a run; add --resume to continue it, or choose another --out")

    meta = read_meta(args.data)
    tokenizer = load_data_tokenizer(args.data)
    if saved is not None:
        check_same_tokenizer(saved["data"]["tokenizer"], meta["tokenizer"], "the run", f"the data in {args.data}")
    init_from, init = getattr(args, "init_from", None), None
    if init_from is not None:  # a new run that starts from a checkpoint's weights (fine-tuning)
        if saved is not None:
            raise UserError("drop --init-from when resuming: a run continues from its own checkpoints/last")
        init = read_checkpoint_config(init_from)
        check_same_tokenizer(init["tokenizer"], meta["tokenizer"], f"--init-from {init_from}", f"the data in {args.data}")
    preset, model_cfg, cfg = resolve_configs(args, meta, saved, init)
    changes = resume_changes(saved["train"], cfg, out) if saved is not None else {}

    # --- processes and devices ------------------------------------------------------------
    if ddp:
        use_cuda = torch.cuda.is_available() and cfg.device != "cpu"
        if use_cuda:
            # this rank's GPU first, then NCCL bound to it (device_id): no rank touches GPU 0 by mistake
            device = pick_device(f"cuda:{int(os.environ['LOCAL_RANK'])}")
            dist.init_process_group("nccl", device_id=device)
        else:
            device = torch.device("cpu")
            dist.init_process_group("gloo")
        rank, world_size = dist.get_rank(), dist.get_world_size()
        if cfg.grad_accum % world_size:
            raise UserError(f"grad_accum ({cfg.grad_accum}) must be divisible by the number of processes ({world_size})")
    else:
        rank, world_size, device = 0, 1, pick_device(cfg.device)
    master = rank == 0
    dtype, dtype_why = choose_dtype(device, cfg.dtype)
    if master:
        print(f"tinystories train: {describe(device, dtype, dtype_why)}", flush=True)
    if cfg.optimizer == "muon" and not hasattr(torch.optim, "Muon"):
        raise UserError(f"the Muon optimizer needs torch 2.9 or newer (this is torch {torch.__version__}): "
                        "pip install 'torch>=2.9', or train with --optimizer adamw")
    if cfg.optimizer == "muon" and device.type == "mps" and not torch.backends.mps.is_macos_or_newer(14, 0):
        raise UserError("the Muon optimizer orthogonalises its updates in bf16, which Apple GPUs have from macOS 14 "
                        "on; update macOS, or train with --optimizer adamw")
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    if device.type == "cpu":
        keep_freed_memory()  # reuse freed activations instead of mapping them afresh every step
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for what autocast leaves in fp32
        torch.backends.cudnn.allow_tf32 = True

    # --- data, model, optimizer ----------------------------------------------------------
    train_tokens = open_split(args.data, "train")
    eval_splits = {s: open_split(args.data, s) for s in ("val", "test") if s in meta["splits"] and meta["splits"][s]["tokens"] > 1}
    batches = EpochWindows(train_tokens, model_cfg.block_size, cfg.batch_size, cfg.seed, rank, world_size)
    total_steps = steps_for(cfg, len(train_tokens), model_cfg.block_size)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * model_cfg.block_size

    check_fits(model_cfg, device, world_size if device.type == "cpu" else 1)  # CPU ranks share one memory
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = GPT(model_cfg).to(device)
    if init is not None:
        model.load_state_dict(initial_weights(init_from, model_cfg.block_size))
    torch.manual_seed(cfg.seed + 1 + rank)  # each rank its own dropout stream
    optimizers = make_optimizers(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start_step, best_val_loss = 0, float("inf")

    if saved is not None:
        last = out / "checkpoints" / "last"
        state = load_trainer_state(last)
        model.load_state_dict(load_checkpoint(last, device).model.state_dict())
        for name, optimizer in optimizers.items():  # "optimizer" is AdamW's (the key before Muon came)
            # this run's settings (betas, weight decay, momentum, peak lr, fused or not on this
            # device), not the saved ones, which load_state_dict would bring back
            settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
            optimizer.load_state_dict(state["optimizer" if name == "adamw" else name])
            for group, mine in zip(optimizer.param_groups, settings):
                group.update(mine)
        if scaler.is_enabled() and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        elif scaler.is_enabled() and master:  # saved without loss scaling (bf16, fp32): start the scale afresh
            print("note: the run was saved without fp16 loss scaling; the grad scaler starts afresh", flush=True)
        batches.load_state_dict(state["data"])
        _set_rng_state(state["rng"], device, rank, cfg.seed + 1 + rank, state["step"])
        start_step, best_val_loss = state["step"], state["best_val_loss"]
        if start_step >= total_steps:
            raise UserError(f"the run is already at step {start_step} of {total_steps}; raise --max-steps to go on")

    run_config = {
        "preset": preset, "model": model_cfg.to_dict(), "train": cfg.to_dict(), "total_steps": total_steps,
        "init_from": str(resolve_checkpoint(init_from)) if init is not None else None,
        "data": {"dir": str(Path(args.data).resolve()), "tokenizer": meta["tokenizer"], "train_tokens": len(train_tokens)},
        "device": str(device), "dtype": str(dtype).removeprefix("torch."), "world_size": world_size,
        "command_line": sys.argv, "git_commit": _git_commit(), "versions": _versions(),
    }
    if master:
        out.mkdir(parents=True, exist_ok=True)
        if saved is None:
            (out / "config.json").write_text(json.dumps(run_config, indent=2) + "\n")
        else:
            saved.setdefault("resumed", []).append({"step": start_step, "command_line": sys.argv, "changed": changes,
                                                    "device": str(device), "dtype": run_config["dtype"],
                                                    "world_size": world_size})
            saved["train"], saved["total_steps"] = cfg.to_dict(), total_steps  # what the run trains with now
            (out / "config.json").write_text(json.dumps(saved, indent=2) + "\n")
            if changes:
                print("note: resuming with changed settings: "
                      + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changes.items()), flush=True)
        _truncate_log(out / "log.jsonl", start_step)

    raw_model = model  # checkpoints and evaluation use the plain module
    compiled = cfg.compile and ((device.type == "cuda" and _cuda_can_compile(device, master))
                                or (device.type == "cpu" and cfg.compile_cpu and _cpu_can_compile(master)))
    model = wrap_model(raw_model, compiled, ddp, device)

    stop = StopRequest()
    stop.install()
    if master:
        n_params = raw_model.num_params()
        origin = f" from the weights of {run_config['init_from']}" if init is not None else ""
        print(f"training {preset}{origin}: {n_params / 1e6:.2f}M parameters ({raw_model.num_params(True) / 1e6:.2f}M non-embedding), "
              f"tokenizer {tokenizer.name}, {len(train_tokens):,} train tokens; steps {start_step} -> {total_steps} "
              f"of {tokens_per_step:,} tokens; {device} {run_config['dtype']}, {world_size} process(es)", flush=True)
        if compiled and device.type == "cpu":
            print("compiling the model for this CPU (--compile-cpu): the first step takes tens of seconds", flush=True)
        if cfg.warmup_steps >= total_steps:
            print(f"note: warmup_steps ({cfg.warmup_steps}) >= total steps ({total_steps}): the lr never reaches its peak", flush=True)
    try:
        result = _loop(Loop(
            model=model, raw_model=raw_model, optimizers=optimizers, scaler=scaler, batches=batches,
            eval_splits=eval_splits, tokenizer=tokenizer, cfg=cfg, autocast=autocast, device=device, out=out,
            data_dir=args.data, total_steps=total_steps, tokens_per_step=tokens_per_step, stop=stop, rank=rank,
            world_size=world_size, step=start_step, best_val_loss=best_val_loss, dtype=dtype, compiled=compiled,
        ))
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        resumable = (out / "checkpoints" / "last").exists()
        raise UserError(out_of_memory_message(device, cfg, model_cfg.block_size, resumable)) from None
    finally:
        stop.uninstall(ddp)
    if ddp:
        dist.barrier()  # leave together: no rank exits while another still writes or logs
    return result


def wrap_model(raw_model: GPT, compiled: bool, ddp: bool, device: torch.device) -> torch.nn.Module:
    """What the training steps run: the model, compiled and/or wrapped in DDP."""
    model = torch.compile(raw_model) if compiled else raw_model
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def _cuda_can_compile(device: torch.device, say: bool) -> bool:
    """True where torch.compile can build kernels for this GPU: Triton installed (it is not on
    Windows) and compute capability 7.0 or more (Triton's floor: a P100 is 6.0); else a note."""
    problem = None
    if cuda_capability(device) < (7, 0):
        problem = "Triton needs a GPU of compute capability 7.0 or more (this one is {}.{})".format(*cuda_capability(device))
    elif importlib.util.find_spec("triton") is None:
        problem = "Triton is not installed (pip install triton; there is none for Windows)"
    if problem and say:
        print(f"note: not compiling the model (torch.compile): {problem}; training eagerly", flush=True)
    return problem is None


def _cpu_can_compile(say: bool) -> bool:
    """True where inductor finds the C++ compiler it builds CPU kernels with; else a note (if `say`)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
        return True
    except Exception as e:  # InvalidCxxCompiler, or a private API that moved
        if say:
            print(f"note: --compile-cpu needs a C++ compiler (g++ or clang++; $CXX) that torch.compile can find "
                  f"({type(e).__name__}); training eagerly", flush=True)
        return False


@dataclass
class Loop:
    """What the training loop works with, set up once by `run`; `step` and `best_val_loss` move on."""

    model: torch.nn.Module  # what the steps run: compiled and/or DDP-wrapped
    raw_model: GPT  # the plain module: checkpoints, evaluation, clipping
    optimizers: dict[str, torch.optim.Optimizer]
    scaler: torch.amp.GradScaler
    batches: EpochWindows
    eval_splits: dict[str, np.ndarray]
    tokenizer: object
    cfg: TrainConfig
    autocast: object
    device: torch.device
    out: Path
    data_dir: str
    total_steps: int
    tokens_per_step: int
    stop: StopRequest
    rank: int
    world_size: int
    step: int  # optimizer steps done
    best_val_loss: float
    dtype: torch.dtype = torch.float32  # the autocast dtype (for the MFU peak)
    compiled: bool = False  # model is torch.compile'd (a failure at its first step falls back to eager)

    def trainer_state(self) -> dict:
        """Everything `--resume` needs besides the weights; tensors and plain values only."""
        return {"optimizer": self.optimizers["adamw"].state_dict(),
                **{name: opt.state_dict() for name, opt in self.optimizers.items() if name != "adamw"},
                "scaler": self.scaler.state_dict(), "data": self.batches.state_dict(),
                "rng": _rng_state(self.device, self.world_size), "step": self.step, "best_val_loss": self.best_val_loss}


def _loop(r: Loop) -> int:
    from tqdm import tqdm

    cfg, raw_model, optimizers, scaler, device, out = r.cfg, r.raw_model, r.optimizers, r.scaler, r.device, r.out
    master = r.rank == 0
    accum = cfg.grad_accum // r.world_size
    peak = peak_flops(device, r.dtype, cfg.peak_tflops)
    flops_token = flops_per_token(raw_model)
    log_file = open(out / "log.jsonl", "a") if master else None
    bar = tqdm(total=r.total_steps, initial=r.step, unit="step", disable=not master or None, dynamic_ncols=True)
    started = time.perf_counter()

    def save_on_rank_0(folder: Path, **kw) -> None:
        """Only rank 0 writes. Under DDP every rank learns whether it could (a full disk), so that all
        stop together with one line each instead of waiting for rank 0 in the next step's all-reduce."""
        failure = None
        if master:
            try:
                save_checkpoint(folder, raw_model, r.tokenizer, **kw)
            except UserError as e:  # the previous checkpoint in `folder` is intact
                failure = e
        if r.world_size > 1:
            failed = torch.tensor(float(failure is not None), device=device)
            dist.all_reduce(failed, op=dist.ReduceOp.MAX)
            if failed.item() and failure is None:
                failure = UserError(f"rank {r.rank}: stopping with rank 0, which could not write {folder} (see its message)")
        if failure is not None:
            raise failure

    def save_last(val_loss: float | None) -> None:
        if not all(torch.isfinite(p).all() for p in raw_model.parameters()):
            raise UserError(f"weights became non-finite at step {r.step}; checkpoints/last was left as it was")
        state = r.trainer_state()  # every rank takes part (its RNG state is gathered)
        save_on_rank_0(out / "checkpoints" / "last", step=r.step, val_loss=val_loss, trainer_state=state)

    val_loss = None
    while r.step < r.total_steps:
        step, t0 = r.step, time.perf_counter()
        lr = lr_at(step, cfg, r.total_steps)
        for optimizer in optimizers.values():
            for group in optimizer.param_groups:  # each group at its own peak, all on one schedule
                group["lr"] = group["peak_lr"] * lr / cfg.learning_rate
        loss_sum = _first_compiled_step(r, accum) if r.compiled else _forward_backward(r, accum)
        grad_norm = unscale_and_clip(optimizers, scaler, raw_model, cfg.grad_clip)
        if r.world_size > 1:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        loss_value = loss_sum.item() / accum
        if not math.isfinite(loss_value) or (not scaler.is_enabled() and not torch.isfinite(grad_norm)):
            raise UserError(
                f"loss became {loss_value} at step {step + 1} (grad norm {grad_norm.item():.3g}); the last good "
                f"checkpoint is {out / 'checkpoints' / 'last'}. Lower --learning-rate or try --dtype fp32, then --resume"
            )
        skipped, scale = step_optimizers(optimizers, scaler, grad_norm)
        r.step = done = step + 1

        _synchronize(device)  # GPUs run ahead of Python: time the step's work, not its launch
        dt = time.perf_counter() - t0
        record = {"step": done, "tokens": done * r.tokens_per_step, "loss": round(loss_value, 6), "lr": lr,
                  "grad_norm": None if skipped else round(grad_norm.item(), 6),
                  "tokens_per_s": round(r.tokens_per_step / dt, 1)}
        if scale is not None:
            record["loss_scale"] = scale
        if skipped:
            record["skipped"] = True  # the weights did not move; the scale was halved
            if master:
                bar.write(f"step {done:>6}/{r.total_steps} | fp16 overflow at loss scale {scale:g}: step skipped, "
                          "scale halved (a few of these early on are normal)")
        if peak is not None:
            record["mfu"] = round(flops_token * r.tokens_per_step / dt / (peak * r.world_size), 4)
        if done % cfg.eval_interval == 0 or done == r.total_steps:
            try:
                for split, tokens in r.eval_splits.items():
                    loss = estimate_loss(raw_model, tokens, raw_model.config.block_size, cfg.batch_size,
                                         cfg.eval_tokens, device, r.autocast, r.rank, r.world_size)
                    record[f"{split}_loss"] = round(loss, 6)
            except Exception:
                # The step itself is done: keep it, so that the run resumes here once the cause is
                # fixed (the evaluation comes before the checkpoint of the same step).
                if r.world_size == 1:
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                    try:
                        save_last(val_loss)
                    except Exception:  # noqa: BLE001 - the evaluation's error is the one to report
                        pass
                raise
            val_loss = record.get("val_loss")
            if val_loss is not None and val_loss < r.best_val_loss:
                r.best_val_loss = val_loss
                save_on_rank_0(out / "checkpoints" / "best", step=done, val_loss=val_loss)
        if master:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
            if done % cfg.log_interval == 0 or "val_loss" in record or done == r.total_steps:
                extra = "".join(f" | {k} {record[k]:.4f}" for k in ("val_loss", "test_loss") if k in record)
                mfu = f" | mfu {record['mfu']:.1%}" if "mfu" in record else ""
                bar.write(f"step {done:>6}/{r.total_steps} | loss {loss_value:.4f} | lr {lr:.2e} | "
                          f"{record['tokens_per_s']:>8,.0f} tok/s{mfu}{extra}")

        stopping = torch.tensor(float(r.stop.requested), device=device)
        if r.world_size > 1:
            dist.all_reduce(stopping, op=dist.ReduceOp.MAX)  # all ranks stop at the same step
        if done % cfg.checkpoint_interval == 0 or done == r.total_steps or stopping.item():
            save_last(val_loss)
        if stopping.item() and done < r.total_steps:  # a stop request at the last step changes nothing
            bar.close()
            if master:
                print(f"stopped at step {done}/{r.total_steps}; checkpoints/last saved. Resume with:\n"
                      f"  tinystories train --data {r.data_dir} --out {out} --resume", flush=True)
            return EXIT_STOPPED  # not 0: a script must be able to tell a stopped run from a finished one

    bar.close()
    if master:
        log_file.close()
        elapsed = time.perf_counter() - started
        best = f"{r.best_val_loss:.4f}" if math.isfinite(r.best_val_loss) else "n/a"
        print(f"done: {r.total_steps} steps, {r.total_steps * r.tokens_per_step:,} tokens, {elapsed:.0f}s this session; "
              f"final train loss {loss_value:.4f}, best val loss {best} ({r.tokenizer.name} tokens)\n"
              f"checkpoints: {out / 'checkpoints' / 'best'} (best val loss), {out / 'checkpoints' / 'last'}", flush=True)
    return 0


def unscale_and_clip(optimizers: dict, scaler: torch.amp.GradScaler, model: torch.nn.Module,
                     grad_clip: float) -> torch.Tensor:
    """The gradients unscaled (fp16) and clipped to `grad_clip` (0: not clipped); their norm before."""
    for optimizer in optimizers.values():
        scaler.unscale_(optimizer)
    return torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))


def step_optimizers(optimizers: dict, scaler: torch.amp.GradScaler,
                    grad_norm: torch.Tensor) -> tuple[bool, float | None]:
    """Every optimizer's step, then the gradients cleared: (skipped, the loss scale used or None).
    fp16: an overflow anywhere (a non-finite norm) skips every optimizer's step, and the scaler
    lowers its scale (found in unscale_)."""
    skipped = not torch.isfinite(grad_norm)
    if not skipped:
        for optimizer in optimizers.values():
            scaler.step(optimizer)
    scale = scaler.get_scale() if scaler.is_enabled() else None
    scaler.update()
    for optimizer in optimizers.values():
        optimizer.zero_grad(set_to_none=True)
    return skipped, scale


def _forward_backward(r: Loop, accum: int) -> torch.Tensor:
    """One optimizer step's micro-batches, forward and backward: the summed loss (on the device)."""
    loss_sum = torch.zeros((), device=r.device)
    for micro in range(accum):
        x, y = r.batches.next_batch(r.device)
        # under DDP, all-reduce gradients only on the last micro-batch of the step
        sync = r.model.no_sync() if r.world_size > 1 and micro < accum - 1 else nullcontext()
        with sync:
            with r.autocast:
                loss = r.model(x, y)[1]  # the logits are not kept past the loss (which saves what it needs)
            r.scaler.scale(loss / accum).backward()
        loss_sum += loss.detach()
    return loss_sum


def _first_compiled_step(r: Loop, accum: int) -> torch.Tensor:
    """The first step of a compiled model, where torch.compile builds its kernels: if that fails
    (a Triton or compiler problem the up-front checks did not see), the step is done again eagerly
    from the same batches and random state, with a note, and the run goes on eagerly."""
    r.compiled = False  # whatever happens, the steps after this one need no check
    data, rng = r.batches.state_dict(), _local_rng_state(r.device)
    try:
        return _forward_backward(r, accum)
    except (UserError, torch.OutOfMemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - any compiler failure; the eager retry shows a real bug again
        if r.rank == 0:
            print(f"note: torch.compile failed at the first step ({_short(e)}); training eagerly", flush=True)
        for optimizer in r.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        r.batches.load_state_dict(data)
        _set_local_rng_state(r.device, rng)
        r.model = wrap_model(r.raw_model, False, r.world_size > 1, r.device)
        return _forward_backward(r, accum)


def _local_rng_state(device: torch.device) -> dict:
    """This process's RNG states: the CPU's, and the device's where it has its own."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def _set_local_rng_state(device: torch.device, state: dict) -> None:
    """Put back what _local_rng_state took; a state saved on another kind of device restores the CPU's."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    if device.type == "mps" and "mps" in state:
        torch.mps.set_rng_state(state["mps"])


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _short(e: BaseException, limit: int = 300) -> str:
    text = one_line(e) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or MPS's and the CPU allocator's RuntimeError for the same."""
    if isinstance(e, torch.OutOfMemoryError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def out_of_memory_message(device: torch.device, cfg: TrainConfig, block_size: int, resumable: bool) -> str:
    """One line for an out-of-memory error: what ran out, and the flags that halve the micro-batch
    while keeping the tokens per optimizer step (and so the recipe) as they are."""
    B, A = cfg.batch_size, cfg.grad_accum
    size = ""
    if device.type == "cuda":
        size = f" ({torch.cuda.get_device_properties(device).total_memory / 2**30:.1f} GiB)"
    smaller = next((b for b in range(B // 2, 0, -1) if B % b == 0), None)
    if smaller is None:
        remedy = ("the micro-batch is already one sequence: use a smaller --block-size or model, or free the "
                  "device of other programs")
    else:
        remedy = (f"keep the {B * A * block_size:,} tokens per step with smaller micro-batches: "
                  f"--batch-size {smaller} --grad-accum {A * B // smaller}")
    resume = "; then continue with --resume and those flags" if resumable else ""
    return f"out of memory on {device}{size} with micro-batches of {B} x {block_size} tokens; {remedy}{resume}"
