"""The `tinystories` command: argument parsing and dispatch, nothing else.

Each subcommand is a plain function `run(args)` in its own module, imported only when that
subcommand runs, so `tinystories --help` never imports torch. A `UserError` (something the user
can fix) ends as one line on stderr and exit code 2; anything else is a bug and keeps its traceback.

    tinystories prepare  --source PATH|URL|hf --out DATA_DIR
    tinystories train    --data DATA_DIR --preset tiny --out RUN_DIR
    tinystories generate --checkpoint RUN_DIR --prompt "Once upon a time"
    tinystories evaluate --checkpoint RUN_DIR --data DATA_DIR --split test
    tinystories export   --checkpoint RUN_DIR --out HF_DIR
    tinystories export   --checkpoint RUN_DIR --format gguf --out model.gguf
    tinystories import   --from roneneldan/TinyStories-33M --out CKPT
"""

from __future__ import annotations

import argparse
import importlib
import sys

from tinystories import __version__
from tinystories.config import PRESETS, ModelConfig, TrainConfig, add_dataclass_args
from tinystories.errors import EXIT_STOPPED, UserError, one_line


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line ends with one line (no usage block), like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default, unless its help already states it (the config-dataclass flags)."""

    def _get_help_string(self, action):
        if "(default:" in (action.help or "") or action.default is None:
            return action.help
        return super()._get_help_string(action)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:  # also a number too long to convert (Python refuses over 4,300 digits)
        raise argparse.ArgumentTypeError(f"expected an integer, got {text[:40]!r}") from None


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _int_up_to(limit: int, why: str):
    """A positive integer at most `limit`; `why` says where the limit comes from."""
    def parse(text: str) -> int:
        value = _positive_int(text)
        if value > limit:
            raise argparse.ArgumentTypeError(f"must be at most {limit:,} ({why}), got {value:,}")
        return value
    return parse


# Sampling seeds go to torch.Generator.manual_seed; 0 .. 2**63 - 1 fits every 64-bit integer
# (torch's, numpy's, JSON readers') and is the range the random default is drawn from.
SEED_MAX = 2**63 - 1
# Stories written in one batch by `generate`: each holds its own KV cache. 64 is far more than a
# terminal shows, and still a few hundred MB for the 33m model.
MAX_SAMPLES = 64
# A TinyStories story is a few hundred tokens; beyond this a number is a typo, not a story.
MAX_NEW_TOKENS = 100_000


def _seed(text: str) -> int:
    value = _int(text)
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 2**63 - 1 = {SEED_MAX}, got {text}")
    return value


# -----------------------------------------------------------------------------
# One function per subcommand: its flags, and the "module:function" that runs it.


def _add_sampling(p) -> None:
    """The sampling flags, with the same defaults wherever stories are written."""
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy; higher = more random")
    p.add_argument("--top-k", type=_int, default=None, help="sample only from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=0.95, help="sample from the smallest set of tokens with this much probability")


def _add_decode_dtype(p, default: str) -> None:
    """--dtype of the commands that write stories: the weights the cached decoder multiplies with."""
    p.add_argument("--dtype", default=default, choices=["auto", "bf16", "fp16", "int8", "fp32"],
                   help="the weights' dtype while writing (not autocast): auto = bf16 where the CPU or GPU "
                        "multiplies bf16 natively, fp16 on older CUDA GPUs (T4, V100) and Apple GPUs, else the "
                        "model's own; fp16 (GPUs only); int8 (x86 CPUs) = int8 weights with one "
                        "scale per output channel, faster still at a small cost in loss (BENCHMARKS.md); "
                        "fp32 = exactly the model")


def _add_prepare(sub) -> None:
    p = sub.add_parser(
        "prepare", formatter_class=_Formatter,
        help="download or read TinyStories text and tokenize it into DATA_DIR",
        description=(
            "Turn TinyStories text into token files (train.bin, val.bin, test.bin, meta.json).\n\n"
            "Inputs are checked before any work: text must be valid UTF-8 (bad bytes are refused with their\n"
            "offset, never replaced), and a .txt must contain <|endoftext|> separators (one without any is not\n"
            "the official format, and prepare will not guess where stories end). Every story is stripped,\n"
            "empty ones are dropped and mojibake such as 'â€™' is repaired; meta.json counts each of these."
        ),
    )
    p.add_argument("--source", required=True,
                   help="hf (download the official files), a URL, or a local file: .txt in the official format "
                        "(stories separated by <|endoftext|> lines), .json/.jsonl (a 'story' or 'text' field), "
                        ".parquet; or a folder of them")
    p.add_argument("--dataset", choices=["v1", "v2"], default="v2",
                   help="which official files --source hf downloads: v1 (GPT-3.5 and GPT-4) or v2 (GPT-4 only)")
    p.add_argument("--tokenizer", default="gpt2", help="gpt2, or bpe-N to train an N-token byte-level BPE")
    p.add_argument("--gpt2-vocab", default=None,
                   help="folder with GPT-2's encoder.json and vocab.bpe (default: $TINYSTORIES_GPT2_VOCAB, else download)")
    p.add_argument("--out", required=True, help="DATA_DIR to write")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of training stories held out as val")
    p.add_argument("--test", default=None,
                   help="file or folder for the test split, or 'none' (default: the source's official validation "
                        "file: hf's, or the files of a --source folder whose name contains 'valid')")
    p.add_argument("--max-stories", type=_positive_int, default=None,
                   help="use only the first N training stories (after cleaning; val is taken from them)")
    p.add_argument("--dedupe", action="store_true",
                   help="drop exact duplicate stories, and training stories that are also in the test split")
    p.add_argument("--seed", type=_seed, default=1337, help="seed of the train/val split")
    p.add_argument("--cache-dir", default=None,
                   help="where downloads are kept (default: $TINYSTORIES_CACHE or ~/.cache/tinystories)")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty DATA_DIR: earlier prepared data there is replaced, other files are kept")
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
        epilog=(
            "exit status:\n"
            "  0    the run finished\n"
            "  2    a mistake to fix, said in one line on stderr (nothing on disk is damaged)\n"
            f"  {EXIT_STOPPED}   stopped by Ctrl-C or SIGTERM after saving checkpoints/last: continue with --resume\n"
            "  130  a second Ctrl-C quit at once (checkpoints/last is the one saved before)\n"
            "Under torchrun each process exits with these; torchrun itself exits 1 unless all finished."
        ),
    )
    p.add_argument("--data", required=True, help="DATA_DIR made by `tinystories prepare`")
    p.add_argument("--out", required=True, help="RUN_DIR for config.json, log.jsonl and checkpoints/")
    p.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="model size and matching training settings (default: 33m; on --resume, the run's own)")
    p.add_argument("--config", default=None, help="TOML file with [model] and/or [train] tables")
    p.add_argument("--resume", action="store_true", help="continue RUN_DIR from checkpoints/last exactly")
    p.add_argument("--init-from", default=None, metavar="CKPT",
                   help="start a new run from this checkpoint's weights (fine-tuning; e.g. one made by `tinystories "
                        "import`): the model config is the checkpoint's, --preset then picks only training settings; "
                        "the data must use the same tokenizer; only dropout and a smaller block_size may be changed")
    add_dataclass_args(p, TrainConfig, title="training (TrainConfig)")
    add_dataclass_args(p, ModelConfig, title="model (ModelConfig; vocab_size comes from the data)")
    p.set_defaults(run="tinystories.train:run")


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate", formatter_class=_Formatter, help="write stories with a trained model",
        description="Continue a prompt, printing the story as it is written.",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run folder (its best checkpoint)")
    p.add_argument("--prompt", default="Once upon a time", help='story beginning ("" starts a story from scratch)')
    p.add_argument("--max-new-tokens", type=_int_up_to(MAX_NEW_TOKENS, "a story is a few hundred tokens"), default=200,
                   help="tokens to add at most")
    _add_sampling(p)
    p.add_argument("--num-samples", type=_int_up_to(MAX_SAMPLES, "each sample holds its own KV cache"), default=1,
                   help=f"stories to write in one batch (at most {MAX_SAMPLES}); the first is printed as it is written, "
                        "the others when all are done")
    p.add_argument("--seed", type=_seed, default=None, help="seed for reproducible stories, 0 to 2**63 - 1 (default: random)")
    _add_decode_dtype(p, "auto")
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
                   help="autocast dtype of the forward pass (the weights stay as loaded); fp32 gives reproducible "
                        "numbers")
    p.add_argument("--device", default="auto", help="cuda, mps, cpu or auto")
    p.set_defaults(run="tinystories.evaluate:run")


def _add_quality(sub) -> None:
    p = sub.add_parser(
        "quality", formatter_class=_Formatter, help="story-quality report: completions, diversity, memorization, judge",
        description=(
            "Complete a fixed set of story beginnings with a fixed seed and measure the stories: length, share "
            "ending with end-of-text, distinct-1/2/3, repetition, and (with --data) memorization: the longest "
            "span found verbatim in the training data and the share of n-grams found there. Optionally grade "
            "them with the paper's rubric through an OpenAI-compatible chat endpoint (no judge model was "
            "reachable where tinystories was built). Writes OUT/quality.json and OUT/quality.md."
        ),
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run folder (its best checkpoint)")
    p.add_argument("--out", required=True, help="folder for quality.json and quality.md")
    p.add_argument("--data", default=None,
                   help="DATA_DIR the model trained on: its train split is searched for copied text (default: no check)")
    # The paper's protocol sets the defaults of the sampling flags when its prompts are used, so
    # quality has its own copies of them (default None: "the prompt set's protocol decides").
    from tinystories.quality import DEFAULT_PROTOCOL as default, PAPER_PROTOCOL as paper

    p.add_argument("--prompts", default="packaged", metavar="packaged|paper|FILE",
                   help="story beginnings to complete: packaged (the 60 written for this project); paper (the "
                        "paper's 44, 'Evaluation prompts.yaml' of the hub's roneneldan/TinyStories, downloaded once "
                        "into --cache-dir; HF_ENDPOINT picks a mirror; offline it stops with an error); FILE.yaml (a "
                        "local copy of that file, a YAML list of strings; counts as the paper's set); any other FILE "
                        "(one beginning per line)")
    p.add_argument("--cache-dir", default=None,
                   help="where downloads are kept (default: $TINYSTORIES_CACHE or ~/.cache/tinystories)")
    p.add_argument("--completions-per-prompt", type=_positive_int, default=None,
                   help=f"completions of each beginning (default: {paper['completions_per_prompt']} with the paper's "
                        f"prompts, as its GPT-4 grading; else {default['completions_per_prompt']})")
    p.add_argument("--max-new-tokens", type=_int_up_to(MAX_NEW_TOKENS, "a story is a few hundred tokens"), default=300,
                   help="tokens to add per beginning at most")
    p.add_argument("--temperature", type=float, default=None,
                   help=f"0 = greedy; higher = more random (default: {paper['temperature']} with the paper's prompts, "
                        f"else {default['temperature']})")
    p.add_argument("--top-k", type=_int, default=None, help="sample only from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None,
                   help=f"sample from the smallest set of tokens with this much probability; 1 = all (default: "
                        f"{paper['top_p']} with the paper's prompts, else {default['top_p']})")
    p.add_argument("--seed", type=_seed, default=1337, help="seed of the sampling (same seed and batch size, same stories)")
    p.add_argument("--batch-size", type=_positive_int, default=20, help="completions written at once")
    p.add_argument("--ngram", type=_positive_int, default=8, help="n-gram length (tokens) of the memorization index")
    p.add_argument("--index", default=None,
                   help="where the n-gram index of the training tokens is kept (default: beside train.bin in DATA_DIR)")
    p.add_argument("--samples", type=int, default=8, help="completions shown in quality.md")
    p.add_argument("--judge-url", default=None, help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1")
    p.add_argument("--judge-model", default=None, help="model name to ask for at --judge-url")
    p.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--judge-rate", type=float, default=1.0, help="judge requests per second at most")
    p.add_argument("--judge-retries", type=int, default=4,
                   help="retries per completion after a 429, 5xx, timeout or malformed reply")
    _add_decode_dtype(p, "fp32")
    p.add_argument("--device", default="auto", help="cuda, mps, cpu or auto")
    p.set_defaults(run="tinystories.quality:run")


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export", formatter_class=_Formatter, help="write a Hugging Face model folder, or a GGUF file for llama.cpp",
        description=(
            "--format hf (default): a Hugging Face transformers folder, as GPT2LMHeadModel, GPTNeoForCausalLM, "
            "LlamaForCausalLM or Qwen3ForCausalLM, whichever holds the model's layout (config.json, "
            "model.safetensors, generation_config.json, tokenizer files, README.md model card): loadable by "
            "transformers' Auto classes with no code of ours. --format gguf: one GGUF file with the tokenizer "
            "inside, for llama.cpp (and Ollama, LM Studio), as its gpt2, llama or qwen3 architecture; GPT-Neo "
            "has none there. Needs the gguf package (pip install 'tinystories[gguf]'). A layout the format "
            "cannot hold is refused before anything is written."
        ),
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run folder (its best checkpoint)")
    p.add_argument("--out", required=True,
                   help="hf: HF_DIR, a new or empty folder, or an earlier export to replace (a folder holding any "
                        "other file is refused); gguf: FILE.gguf, a new file or an earlier GGUF export to replace")
    p.add_argument("--format", choices=["hf", "gguf"], default="hf",
                   help="hf: a Hugging Face transformers folder; gguf: one llama.cpp GGUF file")
    p.add_argument("--outtype", choices=["f32", "f16", "bf16", "q8_0"], default=None,
                   help="gguf only: type of the weight matrices (norms, biases and GPT-2's position table stay "
                        "f32, as in llama.cpp's converter; q8_0 is 8-bit blocks of 32) (default: f16)")
    p.set_defaults(run="tinystories.export:run")


def _add_plot(sub) -> None:
    p = sub.add_parser(
        "plot", formatter_class=_Formatter, help="draw loss curves of one or more runs into a PNG",
        description=(
            "Train loss (each step and smoothed), val/test loss and the learning rate against tokens "
            "seen, from each RUN_DIR's log.jsonl; several runs are overlaid. Needs matplotlib "
            "(pip install 'tinystories[plot]')."
        ),
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders made by `tinystories train`")
    p.add_argument("--out", default=None, help="PNG file to write (default: RUN_DIR/loss.png of the first run)")
    p.set_defaults(run="tinystories.plot:run")


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve", formatter_class=_Formatter, help="a web page and OpenAI-style completions and chat APIs",
        description=(
            "Serve a model over HTTP: a page at / to write stories in the browser, POST /v1/completions "
            "(OpenAI completions format, streaming as server-sent events), POST /v1/chat/completions (OpenAI "
            "chat format, for chat front-ends: the story model continues the last user message as the "
            "beginning of a story; system, developer and earlier messages are not shown to it), "
            "GET /v1/models and GET /health. "
            "Needs starlette and uvicorn (pip install 'tinystories[serve]')."
        ),
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run folder (its best checkpoint)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0 picks a free one and prints it)")
    p.add_argument("--max-tokens-cap", type=_positive_int, default=512,
                   help="largest max_tokens a request may ask for; larger requests get a 400 error")
    p.add_argument("--max-prompt-tokens", type=_positive_int, default=None,
                   help="most prompt tokens a request may send (default: the model's block_size, all it sees at "
                        "once); longer prompts get a 400 error (context_length_exceeded). A larger cap lets longer "
                        "prompts in, of which the model reads the end: each costs at most block_size tokens of "
                        "prefill (n_layer * block_size for a RoPE model), in chunks between the others' decode steps")
    p.add_argument("--concurrency", type=_positive_int, default=16,
                   help="requests decoded together in one batch (the KV cache's slots); more wait their turn. "
                        "A decode step computes 1, 2, 4, ... rows, the fewest that hold the requests decoding, "
                        "at shapes proven to give a row the same logits (so a request's text never depends on the "
                        "others; except at --dtype int8, whose rows share one input scale)")
    p.add_argument("--model-name", default=None,
                   help="the model id the API reports (default: the run or checkpoint folder name)")
    _add_decode_dtype(p, "auto")  # as `generate`; int8 gives up batch invariance (its rows share an input scale)
    p.add_argument("--device", default="auto", help="cuda, mps, cpu or auto")
    p.set_defaults(run="tinystories.serve:run")


def _add_import(sub) -> None:
    p = sub.add_parser(
        "import", formatter_class=_Formatter,
        help="turn a Hugging Face GPT-Neo, GPT-2, Llama or Qwen3 model (e.g. the paper's TinyStories-33M) into a "
             "checkpoint",
        description=(
            "Read a transformers model folder (config.json, model.safetensors or pytorch_model.bin, tokenizer "
            "files) of a GPTNeoForCausalLM (the paper's released TinyStories models), GPT2LMHeadModel, "
            "LlamaForCausalLM or Qwen3ForCausalLM, and "
            "write a checkpoint that evaluate, generate, serve, export and train --init-from use like any other. "
            "GPT-2's vocabulary becomes the gpt2 tokenizer (the same as `prepare --tokenizer gpt2`)."
        ),
    )
    p.add_argument("--from", dest="source", required=True, metavar="HF_DIR_OR_REPO",
                   help="a model folder, or a Hub repo id such as roneneldan/TinyStories-33M (downloaded with "
                        "huggingface_hub; HF_ENDPOINT and HF_HUB_OFFLINE apply)")
    p.add_argument("--out", required=True, help="checkpoint folder to write (new or empty)")
    p.add_argument("--revision", default=None, help="branch, tag or commit of a Hub repo (default: main)")
    p.add_argument("--tokenizer", choices=["auto", "gpt2"], default="auto",
                   help="auto: the folder's tokenizer files; gpt2: GPT-2's ($TINYSTORIES_GPT2_VOCAB) when the "
                        "folder has none")
    p.set_defaults(run="tinystories.hf_import:run")


SUBCOMMANDS = [_add_prepare, _add_train, _add_generate, _add_evaluate, _add_quality, _add_export, _add_plot, _add_serve,
               _add_import]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
        print(f"tinystories {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tinystories {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `tinystories generate ... | head`
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
