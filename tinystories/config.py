"""The model config, its named presets, and the glue that turns config dataclasses into flags.

Every config is a plain dataclass: fields with defaults, a `help` string in each field's metadata
(which becomes the `--help` text), validation in `__post_init__`, and a JSON round trip through
`to_dict` / `from_dict`. Presets are plain Python values. No exec, no globals.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from tinystories.errors import UserError


def _f(default: Any, help: str) -> Any:
    """A dataclass field with a default and a help text (shown by `--help`)."""
    return field(default=default, metadata={"help": help})


# Every integer a config holds ends up in torch (shapes, seeds, step counts), whose integers are 64-bit.
INT64_MAX = 2**63 - 1
SEED32_MAX = 2**32 - 1  # training seeds (see TrainConfig)


def type_problems(obj) -> list[str]:
    """What is wrong with the types of a config dataclass's fields, whatever fields it has.

    Generic on purpose, so that a field added later is checked too: a bool field must be true or
    false, an int field an integer (not a bool, not 2.0) that fits in 64 bits, a float field a
    finite number (nan and inf would reach the optimizer or the model unnoticed), a str field a
    string, a list[str] field a list of strings; None only where the type allows it. Values come
    from flags, TOML files and JSON written by hand, so any Python value can arrive here. Types
    this does not know are left to the class's own checks. Ranges are the class's to check,
    after these pass.
    """
    problems = []
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        kind, value = hints[f.name], getattr(obj, f.name)
        optional = False
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(kind) if a is not type(None)]
            optional = len(args) < len(typing.get_args(kind))
            if len(args) != 1:
                continue  # a union of several types: the class checks it itself
            kind = args[0]
        if value is None:
            if not optional:
                problems.append(f"{f.name} must be given, got none")
            continue
        if kind is bool:
            ok, want = isinstance(value, bool), "true or false"
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool) and -INT64_MAX - 1 <= value <= INT64_MAX
            want = "an integer" + ("" if not isinstance(value, int) or isinstance(value, bool) else " that fits in 64 bits")
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            want = "a finite number"
        elif kind is str:
            ok, want = isinstance(value, str), "a string"
        elif typing.get_origin(kind) is list and typing.get_args(kind) == (str,):
            ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
            want = 'a list of words such as ["global", "local"]'
        else:
            continue
        if not ok:
            problems.append(f"{f.name} must be {want}, got {value!r}")
    return problems


# -----------------------------------------------------------------------------
# Model


@dataclass
class ModelConfig:
    """Shape of a GPT-2-style model. GPT-2 names throughout, so HF export is a key map."""

    n_layer: int = _f(6, "number of transformer blocks")
    n_head: int = _f(6, "attention heads per block")
    n_embd: int = _f(384, "width of the residual stream")
    block_size: int = _f(512, "longest context the model sees (learned positions)")
    vocab_size: int = _f(50257, "vocabulary size; set from the prepared data when training")
    dropout: float = _f(0.1, "dropout on embeddings, attention weights and residual branches")
    bias: bool = _f(True, "biases in Linear layers and LayerNorms (GPT-2 has them)")
    # GPT-Neo (the paper's released models): see the TinyStories presets below.
    attention_layers: list[str] | None = _f(
        None, "attention of each block, comma-separated: global (causal) or local (causal, only the last "
              "window_size tokens), e.g. global,local,global,local; none given = all global (GPT-2)")
    window_size: int = _f(256, "tokens a local attention layer sees, itself included (GPT-Neo)")
    scale_attention: bool = _f(True, "divide attention scores by sqrt(head_dim); GPT-Neo does not")
    qkv_bias: bool | None = _f(None, "biases on the query/key/value projection (none given = follow bias; "
                                     "GPT-Neo has none)")
    # Newer block options (GPT-2 is the default of each); RoPE + rmsnorm + swiglu + no bias = Llama.
    pos_embedding: str = _f("learned", "positions: learned (GPT-2: a table of block_size vectors) or rope "
                                       "(rotary, Su et al. 2021: queries and keys rotated by position)")
    rope_theta: float = _f(10000.0, "RoPE base: the slowest rotation's wavelength is about 2*pi*rope_theta")
    norm: str = _f("layernorm", "normalisation: layernorm (GPT-2) or rmsnorm (Llama: no mean, no bias)")
    norm_eps: float = _f(1e-5, "epsilon of every LayerNorm/RMSNorm")
    mlp: str = _f("gelu", "MLP: gelu (GPT-2, tanh approximation), relu2 (ReLU squared, Primer) or swiglu "
                          "(Llama: SiLU-gated, three matrices)")
    mlp_hidden: int | None = _f(None, "MLP hidden width (none given = 4 x n_embd, or 8/3 x n_embd rounded up to "
                                      "a multiple of 64 for swiglu: about the same parameters)")
    qk_norm: bool = _f(False, "RMS-normalise each head's queries and keys before attention (Qwen3's q_norm/k_norm)")
    tie_embeddings: bool = _f(True, "the output layer is the token embedding (GPT-2); false = a separate matrix")
    zero_init_proj: bool = _f(False, "residual projections start at zero (each block starts as the identity) "
                                     "instead of GPT-2's 0.02/sqrt(2 n_layer)")

    def __post_init__(self) -> None:
        problems = type_problems(self)
        if problems:  # the range checks below compare values, which needs the right types
            raise UserError("invalid model config: " + "; ".join(problems))
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if self.vocab_size > 2**32:  # token files hold uint32 at most
            problems.append(f"vocab_size must be at most 2**32 = {2**32}, got {self.vocab_size}")
        if not problems and self.n_embd % self.n_head != 0:
            problems.append(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            problems.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.attention_layers, str) or not isinstance(self.attention_layers, (list, tuple, type(None))):
            problems.append(f"attention_layers must be a list such as [\"global\", \"local\"], got {self.attention_layers!r}")
        elif self.attention_layers is not None:
            self.attention_layers = list(self.attention_layers)  # a copy: presets must not share a list
            wrong = sorted({a for a in self.attention_layers if a not in ("global", "local")}, key=str)
            if wrong:
                problems.append(f"attention_layers may hold only global and local, got {', '.join(map(str, wrong))}")
            elif len(self.attention_layers) != self.n_layer:
                problems.append(
                    f"attention_layers names {len(self.attention_layers)} layers but n_layer is {self.n_layer}; "
                    "give one entry per layer"
                )
        if not isinstance(self.window_size, int) or isinstance(self.window_size, bool) or self.window_size < 1:
            problems.append(f"window_size must be a positive integer, got {self.window_size!r}")
        for name in ("bias", "scale_attention", "qk_norm", "tie_embeddings", "zero_init_proj") + (
                ("qkv_bias",) if self.qkv_bias is not None else ()):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name, choices in (("pos_embedding", ("learned", "rope")), ("norm", ("layernorm", "rmsnorm")),
                              ("mlp", ("gelu", "relu2", "swiglu"))):
            if getattr(self, name) not in choices:
                problems.append(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                problems.append(f"{name} must be a positive finite number, got {value!r}")
        if self.mlp_hidden is not None and (
                not isinstance(self.mlp_hidden, int) or isinstance(self.mlp_hidden, bool) or self.mlp_hidden < 1):
            problems.append(f"mlp_hidden must be a positive integer, got {self.mlp_hidden!r}")
        if self.pos_embedding == "rope" and not problems and self.head_dim % 2:
            problems.append(f"rope needs an even head_dim, got n_embd/n_head = {self.head_dim}")
        if problems:
            raise UserError("invalid model config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def hidden_size(self) -> int:
        """The MLP's hidden width: mlp_hidden, else 4 x n_embd (GPT-2), or for SwiGLU 8/3 x n_embd
        rounded up to a multiple of 64, so its three matrices hold about what GELU's two do."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp == "swiglu":
            return -(-8 * self.n_embd // 3 // 64) * 64
        return 4 * self.n_embd

    def is_local(self, layer: int) -> bool:
        """Whether block `layer` uses local (sliding-window) attention."""
        return self.attention_layers is not None and self.attention_layers[layer] == "local"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return from_dict(cls, d, what="model config")


# The brief's model (Eldan & Li 2023 train GPT-Neo; this is the GPT-2 layout of the same size):
# 30,142,848 parameters with tied embeddings at vocab 50,257, 10,647,552 outside the embeddings.
# `33m-tuned` is the same shape and tokenizer with the recipe measured best for `tiny` (the Llama
# block, Muon; bench/recipe.py, BENCHMARKS.md): 29,920,512 parameters at vocab 50,257.
# `tiny` is for the demo and the tests: 3 layers x 128 wide, one head of 128, the Llama block (RoPE,
# RMSNorm, SwiGLU, no biases); with a 4,096-token BPE it has 1,164,160 parameters and trains to
# stories on 2 CPU cores in minutes. At the demo's 5 minutes it beat 4 x 192, 4 x 256, 4 x 128
# and 6 x 128 at equal time (bench/recipe.py, BENCHMARKS.md): at this budget a smaller model that
# sees more tokens wins, and one head of 128 is the CPU attention kernel's fastest shape. Its
# recipe before 2026-12 (4 x 192, GPT-2 block, AdamW at 2e-3) is `bench/recipe.py`'s `base`.
LLAMA_BLOCK = dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False)
PRESETS: dict[str, ModelConfig] = {
    "33m": ModelConfig(n_layer=6, n_head=6, n_embd=384, block_size=512, dropout=0.1),
    "33m-tuned": ModelConfig(n_layer=6, n_head=6, n_embd=384, block_size=512, dropout=0.0, **LLAMA_BLOCK),
    "tiny": ModelConfig(n_layer=3, n_head=1, n_embd=128, block_size=256, vocab_size=4096, dropout=0.0, **LLAMA_BLOCK),
}


def _tinystories_neo(n_layer: int, n_embd: int) -> ModelConfig:
    """One of the paper's released GPT-Neo models (roneneldan/TinyStories-*), shaped for training.

    From the released config.json files: 16 heads, global and local attention alternating from a
    global first layer (a single layer is global), local window 256, q/k/v without bias, no
    1/sqrt(head_dim) scaling (GPT-Neo's), gelu_new, LayerNorm eps 1e-5, tied embeddings, no
    dropout. The released models have 2,048 learned positions; the paper trains with context 512
    (section 3, "window size 256 and context length 512"), which is block_size here. Imported
    models (`tinystories import`) keep all 2,048.
    """
    return ModelConfig(
        n_layer=n_layer, n_head=16, n_embd=n_embd, block_size=512, vocab_size=50257, dropout=0.0, bias=True,
        attention_layers=(["global", "local"] * n_layer)[:n_layer], window_size=256, scale_attention=False,
        qkv_bias=False,
    )


# The paper's family, named after the released models (TinyStories-1M ... -2Layers-33M). The names
# are only roughly the parameter count (about the count outside the embeddings plus a 10K-token
# embedding: the paper kept the top 10K tokens). At vocab 50,257 and block_size 512 they have:
# ts-1m 3,647,680 (398,464 non-embedding), ts-3m 8,081,792 (1,583,360), ts-8m 19,309,312
# (6,312,448), ts-28m 51,201,536 (25,207,808), ts-33m 67,334,400 (28,343,808), ts-1layer-21m
# 64,582,656 (12,595,200), ts-2layers-33m 77,175,808 (25,188,352); tests/test_neo.py checks them.
PRESETS.update({
    "ts-1m": _tinystories_neo(8, 64),
    "ts-3m": _tinystories_neo(8, 128),
    "ts-8m": _tinystories_neo(8, 256),
    "ts-28m": _tinystories_neo(8, 512),
    "ts-33m": _tinystories_neo(4, 768),
    "ts-1layer-21m": _tinystories_neo(1, 1024),
    "ts-2layers-33m": _tinystories_neo(2, 1024),
})


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])


# -----------------------------------------------------------------------------
# Dataclass <-> JSON and dataclass <-> argparse


def from_dict(cls, d: dict, what: str = "config"):
    """Build dataclass `cls` from a dict, refusing unknown keys (they are usually typos)."""
    if not isinstance(d, dict):
        raise UserError(f"{what} must be a JSON object, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise UserError(f"unknown {what} field(s): {', '.join(unknown)}")
    return cls(**d)


def load_json(path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None


def _parse_bool(text: str) -> bool:
    t = text.lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_list(text: str) -> list[str]:
    """A list flag: comma-separated words ("global,local" -> ["global", "local"])."""
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"expected comma-separated words, got {text!r}")
    return items


def add_dataclass_args(parser: argparse.ArgumentParser, cls, defaults=None, title: str | None = None):
    """Add one `--field-name` flag per field of dataclass `cls`.

    Flags default to None (= "not given") so that command-line values can override a config file
    and a preset; the help text shows the default that applies when nothing is given.
    """
    group = parser.add_argument_group(title or cls.__name__)
    defaults = defaults or cls()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # `int | None` -> int
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if typing.get_origin(kind) is list:
            parse, metavar = _parse_list, "A,B,..."
        else:
            parse, metavar = (_parse_bool if kind is bool else kind), kind.__name__.upper()
        group.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=parse,
            default=None,
            metavar=metavar,
            help=f"{f.metadata.get('help', '')} (default: {getattr(defaults, f.name)})".replace("%", "%%"),
        )
    return group


def overrides_from_args(args: argparse.Namespace, cls) -> dict:
    """The fields of `cls` that were given on the command line."""
    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cls)
        if getattr(args, f.name, None) is not None
    }


# -----------------------------------------------------------------------------
# Training


@dataclass
class TrainConfig:
    """How to train. The defaults are the brief's recipe for the `33m` model."""

    optimizer: str = _f("adamw", "adamw (every weight), or muon: Muon (Jordan et al. 2024, torch.optim.Muon) on "
                                 "the blocks' matrices and AdamW on embeddings, output layer, gains and biases")
    learning_rate: float = _f(1e-4, "peak AdamW learning rate")
    muon_lr: float | None = _f(None, "peak Muon learning rate (none given = learning_rate; updates are scaled "
                                     "to AdamW's RMS, so the two share a scale)")
    muon_momentum: float = _f(0.95, "Muon momentum (Nesterov)")
    schedule: str = _f("cosine", "learning-rate schedule after warmup: cosine (to min_lr) or wsd "
                                 "(warmup-stable-decay: the peak until the last decay_fraction of steps, then linear to min_lr)")
    decay_fraction: float = _f(0.2, "wsd: the share of all steps spent decaying at the end")
    min_lr: float = _f(1e-5, "floor the decay ends at (10% of the peak, Chinchilla-style)")
    warmup_steps: int = _f(1000, "steps of linear warmup from learning_rate/warmup_steps to the peak")
    weight_decay: float = _f(0.1, "AdamW weight decay, applied to matrices only (not biases, norms)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    grad_clip: float = _f(0.5, "clip the global gradient norm to this (0 = off)")
    batch_size: int = _f(32, "sequences per micro-batch")
    grad_accum: int = _f(32, "micro-batches per optimizer step (divided among DDP ranks)")
    epochs: float = _f(1.0, "passes over the training tokens; sets the step count unless max_steps is given")
    max_steps: int | None = _f(None, "optimizer steps to train (overrides epochs)")
    eval_interval: int = _f(250, "evaluate on val (and test) every N steps, and at the end")
    eval_tokens: int = _f(1 << 20, "val tokens scored per evaluation (a fixed, token-weighted budget)")
    checkpoint_interval: int = _f(250, "save checkpoints/last every N steps, and at the end")
    log_interval: int = _f(10, "print a console line every N steps (log.jsonl gets every step)")
    seed: int = _f(1337, "seed for initialisation, batches and dropout")
    device: str = _f("auto", "cuda, mps or cpu; auto picks the first available in that order")
    dtype: str = _f("auto", "bf16, fp16 (with a grad scaler) or fp32; auto = bf16 where the hardware has it "
                            "(CUDA compute capability 8.0+, CPUs with AVX-512 BF16 or AMX), fp16 on older GPUs "
                            "(T4, V100, P100), fp32 on Apple GPUs and other CPUs")
    compile: bool = _f(True, "torch.compile the model on CUDA (checked first: compute capability 7.0+ and Triton; "
                             "else eager with a note, and a compile that fails at the first step is retried eagerly)")
    compile_cpu: bool = _f(False, "torch.compile the model on the CPU as well (inductor: needs a C++ compiler, "
                                  "else training stays eager with a note; the first step compiles for tens of "
                                  "seconds, then steps run faster: measured in BENCHMARKS.md). The demo turns it on")
    peak_tflops: float | None = _f(None, "the accelerator's peak TFLOP/s at the run's dtype, for the MFU figure "
                                         "(default: from a table of GPUs by name and dtype; none for an unknown card)")

    def __post_init__(self) -> None:
        problems = type_problems(self)  # finite numbers, integers that fit in 64 bits, ...
        if problems:  # the range checks below compare values, which needs the right types
            raise UserError("invalid training config: " + "; ".join(problems))
        for name in ("batch_size", "grad_accum", "eval_interval", "checkpoint_interval", "log_interval", "eval_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        if self.learning_rate <= 0 or self.min_lr < 0 or self.min_lr > self.learning_rate:
            problems.append("need 0 <= min_lr <= learning_rate and learning_rate > 0")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            problems.append("warmup_steps, weight_decay and grad_clip must not be negative")
        for name in ("beta1", "beta2"):  # AdamW's moving averages: 1 would never forget, above 1 diverges
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append("max_steps must be at least 1")
        if self.epochs <= 0:
            problems.append("epochs must be positive")
        if self.optimizer not in ("adamw", "muon"):
            problems.append(f"optimizer must be adamw or muon, got {self.optimizer!r}")
        if self.muon_lr is not None and not self.muon_lr > 0:
            problems.append(f"muon_lr must be positive, got {self.muon_lr!r}")
        if not 0 <= self.muon_momentum < 1:
            problems.append(f"muon_momentum must be in [0, 1), got {self.muon_momentum!r}")
        if self.schedule not in ("cosine", "wsd"):
            problems.append(f"schedule must be cosine or wsd, got {self.schedule!r}")
        if not 0 < self.decay_fraction <= 1:
            problems.append(f"decay_fraction must be in (0, 1], got {self.decay_fraction!r}")
        # The data order is seeded with seed * 1_000_003 + epoch (data.EpochWindows), which must stay
        # inside torch's 64-bit seeds; 32 bits leave room for any number of epochs.
        if not 0 <= self.seed <= SEED32_MAX:
            problems.append(f"seed must be in [0, {SEED32_MAX}], got {self.seed}")
        if self.device not in ("auto", "cuda", "mps", "cpu") and not re.fullmatch(r"cuda:\d+", self.device):
            problems.append(f"device must be auto, cuda, cuda:N, mps or cpu, got {self.device!r}")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            problems.append(f"peak_tflops must be positive, got {self.peak_tflops!r}")
        if self.dtype not in ("auto", "bf16", "fp16", "fp32"):
            problems.append(f"dtype must be auto, bf16, fp16 or fp32, got {self.dtype!r}")
        if problems:
            raise UserError("invalid training config: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Training settings that go with each preset (the rest are TrainConfig's defaults).
# `tiny` on 2 CPU cores: Muon at 1e-2 on the blocks' matrices (5e-3 as good, 2e-2 and 3e-2 worse in
# bench/recipe.py) and AdamW at 1.6e-2 on the rest, the tied embedding above all (at 128 wide 8e-3,
# 1.6e-2 and 3.2e-2 each beat the one before in a one-seed screen, but 3.2e-2 spread 5x wider over
# three seeds), a 100-step warmup and AdamW's beta2 at 0.99 (against 30 steps and 0.95, over three
# seeds: the mean 2.6 % lower, the spread 0.006 bits per byte instead of 0.014; the warmup alone
# 1.9 %), 16 x 256 tokens per step (8 x 256 and 32 x 256 lost).
# `33m-tuned`: the brief's batch (32 x 32 x 512 tokens), Muon and AdamW with the learning rates tiny
# had at 192 wide (1e-2, 4e-3) scaled for width as Muon's RMS matching suggests (~ 1/sqrt(n_embd)),
# kept since: round 5's higher AdamW rate for 128 wide is not measured at 384. A 200-step warmup
# instead of 1,000 (which is about one epoch of TinyStories at this batch), no dropout. Measured
# against `33m` at a small batch on the CPU (BENCHMARKS.md); its GPU-scale values are unmeasured.
TRAIN_PRESETS: dict[str, dict] = {
    "33m": {},
    "33m-tuned": dict(optimizer="muon", learning_rate=2e-3, min_lr=2e-4, muon_lr=7e-3, warmup_steps=200),
    "tiny": dict(
        optimizer="muon", learning_rate=1.6e-2, min_lr=1.6e-3, muon_lr=1e-2, warmup_steps=100, beta2=0.99,
        batch_size=16, grad_accum=1, max_steps=None, epochs=1.0, eval_interval=100, eval_tokens=1 << 16,
        checkpoint_interval=100, log_interval=10,
    ),
    # The paper's family trains with the brief's recipe, as `33m` does.
    **{name: {} for name in PRESETS if name.startswith("ts-")},
}
