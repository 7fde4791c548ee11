"""The `tinystories` command: argument parsing and dispatch, nothing else.

Each subcommand is a plain function `run(args)` in its own module, imported only when that
subcommand runs, so `tinystories --help` never imports torch. A `UserError` (something the user
can fix) ends as one line on stderr and exit code 2; anything else is a bug and keeps its traceback.

    tinystories prepare  --source PATH|URL|hf --out DATA_DIR
    tinystories train    --data DATA_DIR --preset tiny --out RUN_DIR
    tinystories generate --checkpoint RUN_DIR --prompt "Once upon a time"
    tinystories evaluate --checkpoint RUN_DIR --data DATA_DIR --split test
    tinystories export   --checkpoint RUN_DIR --out HF_DIR
"""

from __future__ import annotations

import argparse
import importlib
import sys

from tinystories import __version__
from tinystories.config import PRESETS, ModelConfig, TrainConfig, add_dataclass_args
from tinystories.errors import UserError


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default, unless its help already states it (the config-dataclass flags)."""

    def _get_help_string(self, action):
        if "(default:" in (action.help or "") or action.default is None:
            return action.help
        return super()._get_help_string(action)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


# -----------------------------------------------------------------------------
# One function per subcommand: its flags, and the "module:function" that runs it.


def _add_prepare(sub) -> None:
    p = sub.add_parser(
        "prepare", formatter_class=_Formatter,
        help="download or read TinyStories text and tokenize it into DATA_DIR",
        description="Turn TinyStories text into token files (train.bin, val.bin, test.bin, meta.json).",
    )
    p.add_argument("--source", required=True,
                   help="hf (download the official files), a local .txt/.json/.jsonl/.parquet file or folder, or a URL")
    p.add_argument("--dataset", choices=["v1", "v2"], default="v2",
                   help="which official files --source hf downloads: v1 (GPT-3.5 and GPT-4) or v2 (GPT-4 only)")
    p.add_argument("--tokenizer", default="gpt2", help="gpt2, or bpe-N to train an N-token byte-level BPE")
    p.add_argument("--gpt2-vocab", default=None,
                   help="folder with GPT-2's encoder.json and vocab.bpe (default: $TINYSTORIES_GPT2_VOCAB, else download)")
    p.add_argument("--out", required=True, help="DATA_DIR to write")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of training stories held out as val")
    p.add_argument("--test", default=None,
                   help="file or folder for the test split (default: the source's official validation file, if any)")
    p.add_argument("--max-stories", type=_positive_int, default=None, help="use only the first N training stories")
    p.add_argument("--dedupe", action="store_true", help="drop exact duplicate stories")
    p.add_argument("--seed", type=int, default=1337, help="seed of the train/val split")
    p.add_argument("--cache-dir", default=None,
                   help="where downloads are kept (default: $TINYSTORIES_CACHE or ~/.cache/tinystories)")
    p.add_argument("--force", action="store_true", help="overwrite a DATA_DIR that already holds prepared data")
    p.set_defaults(run="tinystories.prepare:run")


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", formatter_class=_Formatter,
        help="train a GPT from scratch (or resume) on prepared data",
        description=(
            "Train a model. Settings come from, in order of precedence: flags, --config FILE (TOML with "
            "optional [model] and [train] tables), the preset, the defaults shown below.\n"
            f"Presets: {', '.join(PRESETS)}."
        ),
    )
    p.add_argument("--data", required=True, help="DATA_DIR made by `tinystories prepare`")
    p.add_argument("--out", required=True, help="RUN_DIR for config.json, log.jsonl and checkpoints/")
    p.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="model size and matching training settings (default: 33m; on --resume, the run's own)")
    p.add_argument("--config", default=None, help="TOML file with [model] and/or [train] tables")
    p.add_argument("--resume", action="store_true", help="continue RUN_DIR from checkpoints/last exactly")
    add_dataclass_args(p, TrainConfig, title="training (TrainConfig)")
    add_dataclass_args(p, ModelConfig, title="model (ModelConfig; vocab_size comes from the data)")
    p.set_defaults(run="tinystories.train:run")


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate", formatter_class=_Formatter, help="write stories with a trained model",
        description="Continue a prompt, printing the story as it is written.",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run folder (its best checkpoint)")
    p.add_argument("--prompt", default="Once upon a time", help="story beginning")
    p.add_argument("--max-new-tokens", type=_positive_int, default=200, help="tokens to add at most")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy; higher = more random")
    p.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=0.95, help="sample from the smallest set of tokens with this much probability")
    p.add_argument("--num-samples", type=_positive_int, default=1, help="stories to write (batched)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible stories (default: random)")
    p.add_argument("--device", default="auto", help="cuda, mps, cpu or auto")
    p.set_defaults(run="tinystories.generate:run")


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate", formatter_class=_Formatter, help="loss, perplexity and bits per byte of a model",
        description=(
            "Score a model on a prepared split or on a text file in the official format: token-weighted "
            "loss (nats/token), perplexity = exp(loss), and bits per byte (comparable across tokenizers).\n"
            "Every token is scored once; each story with its own beginning as context, stories longer "
            "than block_size through sliding windows that start every --stride tokens."
        ),
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run folder (its best checkpoint)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", help="DATA_DIR made by `tinystories prepare`")
    what.add_argument("--text", help="a .txt file of stories separated by <|endoftext|> lines, "
                                     "tokenized with the checkpoint's tokenizer")
    p.add_argument("--split", default="val", choices=["train", "val", "test"], help="which split of --data")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="windows per forward pass")
    p.add_argument("--stride", type=_positive_int, default=None,
                   help="step between the sliding windows over stories longer than block_size "
                        "(default: block_size // 2)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16", "auto"],
                   help="autocast dtype for the forward pass; fp32 gives reproducible numbers")
    p.add_argument("--device", default="auto", help="cuda, mps, cpu or auto")
    p.set_defaults(run="tinystories.evaluate:run")


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export", formatter_class=_Formatter, help="write a Hugging Face transformers model folder",
        description="Export to GPT2LMHeadModel format: loadable by transformers' Auto classes with no code of ours.",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run folder (its best checkpoint)")
    p.add_argument("--out", required=True, help="HF_DIR to write")
    p.set_defaults(run="tinystories.export:run")


SUBCOMMANDS = [_add_prepare, _add_train, _add_generate, _add_evaluate, _add_export]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinystories", formatter_class=_Formatter,
        description="Train, evaluate, sample and export small GPT models on TinyStories.",
    )
    parser.add_argument("--version", action="version", version=f"tinystories {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module_name, function_name = args.run.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        print(f"tinystories {args.command}: not implemented yet in this version", file=sys.stderr)
        return 3
    try:
        return getattr(module, function_name)(args) or 0
    except UserError as e:
        print(f"tinystories {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tinystories {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `tinystories generate ... | head`
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
