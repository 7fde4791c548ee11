"""The recipe ablation: train configurations side by side, at equal tokens or equal wall time, and
score each on the test split (loss and bits per byte).

    python bench/recipe.py --out out/recipe --steps 300 --only base,muon,muon+rope
    python bench/recipe.py --out out/recipe --steps 1097 --equal time --seeds 1337,1338,1339 --only base,new+4x128

Each run is the real `tinystories train` in its own process, then `tinystories evaluate` of its last
checkpoint on the test split (every token with its story's context). `--steps` is the baseline's
step count (1,097 is what 5 minutes give today's `tiny` on the 2-core build machine, the demo's
budget); a configuration gets the steps that give it

- `--equal tokens`: the baseline's tokens (steps scaled by tokens per step), or
- `--equal time`: the baseline's training time. Speeds come from training steps of every
  configuration taken in turns (A, B, C, A, B, C, ...) in one process, so that a load that comes
  and goes on a shared machine hits each alike (probe_speeds); steps = baseline steps x (its
  tokens/s / the baseline's) x (the baseline's tokens per step / its own). A configuration with
  --compile-cpu is first charged its compile time (measured in a fresh process of its own from an
  empty inductor cache) out of the baseline's training time. The training runs themselves may
  then run at any speed: their results do not depend on it.

`--eval quick` scores a run instead by the trainer's last estimate on the first 2**18 test tokens
(for a screen: the same tokens for every configuration). Results go to OUT/results.jsonl (one
line per run, appended, so an interrupted ablation keeps what it finished and a rerun skips it), a
markdown table on stdout (mean and spread over seeds), and OUT/curves.png (val loss against tokens)
through `tinystories plot`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, SHARED, machine, print_machine  # noqa: E402

# Today's `tiny` recipe, every setting spelled out so that changing the preset does not change it.
BASE = [
    "--preset", "tiny", "--n-layer", "4", "--n-head", "6", "--n-embd", "192", "--block-size", "256",
    "--dropout", "0", "--bias", "true", "--pos-embedding", "learned", "--norm", "layernorm", "--mlp", "gelu",
    "--qk-norm", "false", "--tie-embeddings", "true", "--zero-init-proj", "false",
    "--optimizer", "adamw", "--learning-rate", "2e-3", "--min-lr", "2e-4", "--warmup-steps", "30",
    "--schedule", "cosine", "--weight-decay", "0.1", "--batch-size", "16", "--grad-accum", "1",
]
MUON = ["--optimizer", "muon", "--learning-rate", "4e-3", "--min-lr", "4e-4", "--muon-lr", "4e-3"]
LLAMA = ["--pos-embedding", "rope", "--norm", "rmsnorm", "--mlp", "swiglu", "--bias", "false"]

# name -> (extra flags on top of BASE, data set). Later flags win over earlier ones.
CONFIGS: dict[str, tuple[list[str], str]] = {
    "base": ([], "v2"),
    "adamw-lr4e-3": (["--learning-rate", "4e-3", "--min-lr", "4e-4"], "v2"),
    "adamw-lr8e-3": (["--learning-rate", "8e-3", "--min-lr", "8e-4"], "v2"),
    "muon": (MUON, "v2"),
    "muon-lr1e-2": (MUON + ["--muon-lr", "1e-2"], "v2"),
    "muon-lr2e-2": (MUON + ["--muon-lr", "2e-2"], "v2"),
    "muon-lr2e-2-adam8e-3": (MUON + ["--muon-lr", "2e-2", "--learning-rate", "8e-3", "--min-lr", "8e-4"], "v2"),
    "muon+wsd": (MUON + ["--schedule", "wsd"], "v2"),
    "muon+rope": (MUON + ["--pos-embedding", "rope"], "v2"),
    "muon+rmsnorm": (MUON + ["--norm", "rmsnorm"], "v2"),
    "muon+swiglu": (MUON + ["--mlp", "swiglu"], "v2"),
    "muon+relu2": (MUON + ["--mlp", "relu2"], "v2"),
    "muon+qk_norm": (MUON + ["--qk-norm", "true"], "v2"),
    "muon+untied": (MUON + ["--tie-embeddings", "false"], "v2"),
    "muon+zero_init": (MUON + ["--zero-init-proj", "true"], "v2"),
    "muon+llama": (MUON + LLAMA, "v2"),
    "muon+all-slices": (MUON, "all"),
    "muon+6x192": (MUON + ["--n-layer", "6"], "v2"),
    "muon+2x256": (MUON + ["--n-layer", "2", "--n-embd", "256", "--n-head", "4"], "v2"),
    "muon+batch8": (MUON + ["--batch-size", "8"], "v2"),
    "muon+batch32": (MUON + ["--batch-size", "32"], "v2"),
    "muon+bpe-2048": (MUON, "v2-2048"),
    "muon+bpe-8192": (MUON, "v2-8192"),
    # round 1's new `tiny`: Muon at 1e-2 with AdamW at 4e-3, the Llama block, every training slice
    "new": (MUON + ["--muon-lr", "1e-2"] + LLAMA, "all"),
    # round 2 of the screen, around `new`: head size (the CPU's attention kernel is ~2x faster per
    # FLOP at head_dim 64 than at 32), tokens per step, schedule, width, learning rates
    "new+3heads": (MUON + ["--muon-lr", "1e-2"] + LLAMA + ["--n-head", "3"], "all"),
    "new+batch8": (MUON + ["--muon-lr", "1e-2"] + LLAMA + ["--batch-size", "8"], "all"),
    "new+3heads+batch8": (MUON + ["--muon-lr", "1e-2"] + LLAMA + ["--n-head", "3", "--batch-size", "8"], "all"),
    "new+3heads+wsd": (MUON + ["--muon-lr", "1e-2"] + LLAMA + ["--n-head", "3", "--schedule", "wsd"], "all"),
    "new+4x256": (MUON + ["--muon-lr", "1e-2"] + LLAMA + ["--n-embd", "256", "--n-head", "4"], "all"),
    # `tiny` since round 2 (config.py)
    "new+4x128": (MUON + ["--muon-lr", "1e-2"] + LLAMA + ["--n-embd", "128", "--n-head", "2"], "all"),
    "new+3heads+muon1.5e-2": (MUON + ["--muon-lr", "1.5e-2"] + LLAMA + ["--n-head", "3"], "all"),
    "new+3heads+adam8e-3": (MUON + ["--muon-lr", "1e-2", "--learning-rate", "8e-3", "--min-lr", "8e-4"] + LLAMA
                            + ["--n-head", "3"], "all"),
}
# round 3, around `tiny` as of round 2 (4 x 128): learning rates for the narrower model, tokens per
# step, depth, head count, the block options not yet tried alone, vocabulary size
TINY = MUON + ["--muon-lr", "1e-2"] + LLAMA + ["--n-embd", "128", "--n-head", "2"]
CONFIGS.update({
    "tiny": (TINY, "all"),
    "tiny+muon2e-2": (TINY + ["--muon-lr", "2e-2"], "all"),
    "tiny+muon3e-2": (TINY + ["--muon-lr", "3e-2"], "all"),
    "tiny+adam8e-3": (TINY + ["--learning-rate", "8e-3", "--min-lr", "8e-4"], "all"),
    "tiny+min-lr0": (TINY + ["--min-lr", "0"], "all"),
    "tiny+batch32": (TINY + ["--batch-size", "32"], "all"),
    "tiny+3x128": (TINY + ["--n-layer", "3"], "all"),
    "tiny+6x128": (TINY + ["--n-layer", "6"], "all"),
    "tiny+1head": (TINY + ["--n-head", "1"], "all"),
    "tiny+relu2": (TINY + ["--mlp", "relu2"], "all"),
    "tiny+qk_norm": (TINY + ["--qk-norm", "true"], "all"),
    "tiny+zero_init": (TINY + ["--zero-init-proj", "true"], "all"),
    "tiny+untied": (TINY + ["--tie-embeddings", "false"], "all"),
    "tiny+bpe-2048": (TINY, "all-2048"),
    "tiny+bpe-8192": (TINY, "all-8192"),
    "tiny+compile": (TINY + ["--compile-cpu", "true"], "all"),  # its compile time is charged to its budget
})
# round 4: AdamW's learning rate (the embeddings and output layer) was the lever at 128 wide
ADAM8 = ["--learning-rate", "8e-3", "--min-lr", "8e-4"]
ADAM16 = ["--learning-rate", "1.6e-2", "--min-lr", "1.6e-3"]
ADAM32 = ["--learning-rate", "3.2e-2", "--min-lr", "3.2e-3"]
NEW4 = TINY + ADAM16 + ["--n-layer", "3", "--n-head", "1", "--compile-cpu", "true"]  # `tiny` since round 5
CONFIGS.update({
    "tiny+adam1.6e-2": (TINY + ["--learning-rate", "1.6e-2", "--min-lr", "1.6e-3"], "all"),
    "tiny+adam8e-3+muon5e-3": (TINY + ADAM8 + ["--muon-lr", "5e-3"], "all"),
    "tiny+adam8e-3+1head": (TINY + ADAM8 + ["--n-head", "1"], "all"),
    "tiny+adam8e-3+3x128": (TINY + ADAM8 + ["--n-layer", "3"], "all"),
    "tiny+adam8e-3+3x128+1head": (TINY + ADAM8 + ["--n-layer", "3", "--n-head", "1"], "all"),
    "tiny+adam8e-3+compile": (TINY + ADAM8 + ["--compile-cpu", "true"], "all"),
    "tiny+adam8e-3+3x128+compile": (TINY + ADAM8 + ["--n-layer", "3", "--compile-cpu", "true"], "all"),
    "tiny+adam3.2e-2": (TINY + ["--learning-rate", "3.2e-2", "--min-lr", "3.2e-3"], "all"),
    "tiny+adam1.6e-2+3x128+1head": (TINY + ADAM16 + ["--n-layer", "3", "--n-head", "1"], "all"),
    "new4+compile": (NEW4, "all"),
    # round 5's choices, 3 x 128 with one head of 128: AdamW at 3.2e-2 eager and compiled (as the demo
    # trains), and at 1.6e-2 compiled (`tiny` since: the acceptance runs spread narrower at it)
    "new3": (TINY + ADAM32 + ["--n-layer", "3", "--n-head", "1"], "all"),
    "new3+compile": (TINY + ADAM32 + ["--n-layer", "3", "--n-head", "1", "--compile-cpu", "true"], "all"),
    "tiny+adam8e-3+3x128+1head+compile": (TINY + ADAM8 + ["--n-layer", "3", "--n-head", "1", "--compile-cpu", "true"],
                                          "all"),
})
# round 6, around `tiny` since round 5 (new4): settings that leave a step's cost alone, screened at
# equal tokens on seed 1339 (the worst of new4's three), then the best at equal time over three seeds
CONFIGS.update({
    "new4+wd0": (NEW4 + ["--weight-decay", "0"], "all"),
    "new4+wd0.3": (NEW4 + ["--weight-decay", "0.3"], "all"),
    "new4+adam1.2e-2": (NEW4 + ["--learning-rate", "1.2e-2", "--min-lr", "1.2e-3"], "all"),
    "new4+warmup100": (NEW4 + ["--warmup-steps", "100"], "all"),
    "new4+beta2-0.99": (NEW4 + ["--beta2", "0.99"], "all"),
    "new4+warmup200": (NEW4 + ["--warmup-steps", "200"], "all"),
    "new4+warmup100+beta2-0.99": (NEW4 + ["--warmup-steps", "100", "--beta2", "0.99"], "all"),
})

TRAIN_FILES = ["TinyStoriesV2-train.sample.txt"]
ALL_TRAIN_FILES = ["TinyStories-train.head.txt", "TinyStoriesV2-train.head.txt", "TinyStoriesV2-train.sample.txt"]
TEST_FILE = SHARED / "tinystories" / "TinyStoriesV2-valid.head.txt"  # the V2 validation slice
DATASETS = {"v2": (TRAIN_FILES, 4096), "all": (ALL_TRAIN_FILES, 4096),
            "v2-2048": (TRAIN_FILES, 2048), "v2-8192": (TRAIN_FILES, 8192),
            "all-2048": (ALL_TRAIN_FILES, 2048), "all-8192": (ALL_TRAIN_FILES, 8192)}


def tinystories(*args, log: Path | None = None) -> None:
    cmd = [sys.executable, "-m", "tinystories", *map(str, args)]
    with open(log, "a") if log else open("/dev/null", "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.PIPE, text=True, cwd=REPO)
    if r.returncode != 0:
        sys.exit(f"recipe: `tinystories {' '.join(map(str, args[:2]))} ...` failed:\n{r.stderr[-2000:]}")


def prepare(out: Path, name: str) -> Path:
    """The data set `name`: the training slices in ../shared, the V2 validation slice as test."""
    data = out / f"data-{name}"
    if (data / "meta.json").is_file():
        return data
    files, vocab = DATASETS[name]
    source = out / f"train-{name}"
    source.mkdir(parents=True, exist_ok=True)
    for f in files:
        link = source / f
        if not link.exists():
            link.symlink_to(SHARED / "tinystories" / f)
    tinystories("prepare", "--source", source, "--test", TEST_FILE, "--tokenizer", f"bpe-{vocab}", "--out", data)
    return data


def last_record(run: Path) -> dict:
    return json.loads((run / "log.jsonl").read_text().splitlines()[-1])


def probe_speeds(out: Path, names: list[str], data: dict[str, Path], rounds: int, clock: str) -> dict[str, float]:
    """Tokens/s of each configuration, median over rounds taken in turns.

    clock "interleaved": steps of every configuration in turns in one process (interleaved_speeds),
    which a shared machine's load does not skew. clock "wall": the trainer's own tokens/s in an
    8-step run of each, two torch threads, past warm-up (the first round of the screen): right on a
    quiet machine, as noisy as the load on a shared one (2x between rounds seen here).
    """
    if clock == "interleaved":
        return interleaved_speeds(names, data, rounds)
    if any(map(compiles, names)):
        sys.exit("recipe: --probe-clock wall leaves out compile time; probe --compile-cpu configurations interleaved")
    speeds: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names:
            flags, ds = CONFIGS[name]
            run = out / "probes" / f"{name}-{r}"
            subprocess.run(["rm", "-rf", str(run)])
            tinystories("train", "--data", data[ds], "--out", run, *BASE, *flags, "--max-steps", 8,
                        "--eval-interval", 1000, "--eval-tokens", 256, "--checkpoint-interval", 1000)
            log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
            speeds[name].append(statistics.median(rec["tokens_per_s"] for rec in log[2:]))  # past warm-up
            subprocess.run(["rm", "-rf", str(run)])
        print(f"probe round {r + 1}/{rounds}: " + ", ".join(f"{n} {speeds[n][-1]:,.0f}" for n in names), flush=True)
    return {n: statistics.median(v) for n, v in speeds.items()}


def interleaved_speeds(names: list[str], data: dict[str, Path], rounds: int) -> dict[str, float]:
    """Tokens/s of each configuration from training steps taken in one process, one step of each in
    turn (A, B, C, A, B, C, ...), two torch threads: a load that comes and goes over seconds hits
    neighbouring steps alike. Each round times one step per configuration; a configuration's speed
    is the baseline's median speed times the median over rounds of its speed ratio to the first
    name's in the same round. The step is the trainer's (`train._loop`): forward and loss under
    its autocast, backward, clipping, every optimizer, on real batches of its data; with
    --compile-cpu, through torch.compile, whose first step's extra seconds (the compile) go to
    COMPILE_S[name]: a compile's true cost only for the first compiled configuration of a fresh
    process (see compile_seconds)."""
    import torch

    from tinystories.allocator import keep_freed_memory
    from tinystories.cli import build_parser
    from tinystories.data import EpochWindows, open_split, read_meta
    from tinystories.device import pick_dtype
    from tinystories.model import GPT
    from tinystories.train import make_optimizers, resolve_configs

    keep_freed_memory()
    cpu = torch.device("cpu")
    sides = {}
    for name in names:
        flags, ds = CONFIGS[name]
        args = build_parser().parse_args(["train", "--data", str(data[ds]), "--out", "unused", *BASE, *flags])
        _, model_cfg, cfg = resolve_configs(args, read_meta(args.data), None)
        torch.manual_seed(cfg.seed)
        model = GPT(model_cfg)
        batches = EpochWindows(open_split(args.data, "train"), model_cfg.block_size, cfg.batch_size, cfg.seed)
        sides[name] = (model, make_optimizers(model, cfg, cpu), batches, cfg,
                       torch.autocast("cpu", dtype=pick_dtype(cpu, cfg.dtype)),
                       torch.compile(model) if cfg.compile_cpu else model)

    def step(name: str) -> float:
        model, optimizers, batches, cfg, autocast, forward = sides[name]
        t0 = time.perf_counter()
        for _ in range(cfg.grad_accum):
            x, y = batches.next_batch(cpu)
            with autocast:
                _, loss = forward(x, y)
            (loss / cfg.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        for optimizer in optimizers.values():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    first_step = {name: step(name) for name in names}  # a compiled configuration compiles here
    for _ in range(3):  # warm-up: allocator, kernels' first calls
        for name in names:
            step(name)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(step(name))
    first = names[0]
    base_speed = tokens_per_step(first) / statistics.median(times[first])
    ratios = {n: statistics.median(tokens_per_step(n) / t / (tokens_per_step(first) / t0)
                                   for t, t0 in zip(times[n], times[first])) for n in names}
    print("interleaved probe, tokens/s relative to " + first + ": "
          + ", ".join(f"{n} {ratios[n]:.3f}" for n in names), flush=True)
    for n in names:
        if sides[n][3].compile_cpu:
            COMPILE_S[n] = round(first_step[n] - statistics.median(times[n]), 1)
    return {n: round(base_speed * ratios[n], 1) for n in names}


COMPILE_S: dict[str, float] = {}  # configuration -> seconds its first compiled step took beyond a step


def compile_seconds(out: Path, name: str) -> float:
    """What compiling costs configuration `name` in a run of its own: its first step's extra seconds
    in a fresh process with an empty inductor cache, as on a machine's first run. (In one process a
    later configuration reuses what the first compiled: dynamo's frames of the same model code and
    inductor's loaded kernels, so only this is fair to each.)"""
    env = os.environ | {"TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="recipe-inductor-")}
    r = subprocess.run([sys.executable, __file__, "--out", str(out), "--compile-probe", name],
                       env=env, capture_output=True, text=True, cwd=REPO)
    if r.returncode != 0:
        sys.exit(f"recipe: the compile probe of {name} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.splitlines()[-1])[name]


def flag(name: str, option: str) -> str | None:
    """The value configuration `name` trains with for `option` (the last one given), None if unset."""
    flags = BASE + CONFIGS[name][0]
    return flags[len(flags) - flags[::-1].index(option)] if option in flags else None


def tokens_per_step(name: str) -> int:
    return int(flag(name, "--batch-size")) * int(flag(name, "--grad-accum")) * int(flag(name, "--block-size"))


def compiles(name: str) -> bool:
    return flag(name, "--compile-cpu") == "true"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/recipe", help="data, runs and results")
    p.add_argument("--only", default=",".join(CONFIGS), help=f"comma-separated configurations: {', '.join(CONFIGS)}")
    p.add_argument("--steps", type=int, default=1097, help="the baseline's optimizer steps")
    p.add_argument("--baseline", default="base", help="the configuration the budget is measured in")
    p.add_argument("--equal", choices=["tokens", "time"], default="tokens")
    p.add_argument("--seeds", default="1337", help="comma-separated seeds; each configuration runs once per seed")
    p.add_argument("--probe-rounds", type=int, default=None,
                   help="--equal time: rounds of probes (default 20 steps of each interleaved, 3 runs of each by wall)")
    p.add_argument("--probe-clock", choices=["interleaved", "wall"], default="interleaved",
                   help="--equal time: speeds from steps of every configuration in turns in one process, or from "
                        "each one's own short run (a quiet machine only); see probe_speeds")
    p.add_argument("--eval", choices=["full", "quick"], default="full",
                   help="full: `tinystories evaluate` of the whole test split; quick: the trainer's last test "
                        "loss on its first 2**18 tokens (bits per byte from the split's bytes per token)")
    p.add_argument("--table-only", action="store_true",
                   help="print the table of what results.jsonl holds, train nothing")
    p.add_argument("--baseline-from", default=None, metavar="TAG",
                   help="take the baseline's results from an earlier ablation TAG instead of training it again "
                        "(same configuration, seeds and steps give the same run: the trainer is deterministic)")
    p.add_argument("--tag", default="", help="name of this ablation in results.jsonl (default: from the settings)")
    p.add_argument("--compile-probe", default=None, help=argparse.SUPPRESS)  # compile_seconds' own process
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.compile_probe:  # print {name: compile seconds}: the first compile of this fresh process
        name = args.compile_probe
        interleaved_speeds([name], {CONFIGS[name][1]: prepare(out, CONFIGS[name][1])}, rounds=3)
        return print(json.dumps(COMPILE_S))
    names = [n.strip() for n in args.only.split(",")]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        sys.exit(f"recipe: unknown configuration(s) {unknown}; see --help")
    if args.baseline not in names:
        names.insert(0, args.baseline)
    to_run = [n for n in names if not (args.baseline_from and n == args.baseline)]
    seeds = [int(s) for s in args.seeds.split(",")]
    tag = args.tag or f"{args.equal}-{args.steps}"
    print(f"# recipe ablation {tag}", flush=True)
    print_machine(machine())

    data = {ds: prepare(out, ds) for ds in {CONFIGS[n][1] for n in names}}
    steps = {n: args.steps * tokens_per_step(args.baseline) // tokens_per_step(n) for n in names}
    speeds = None
    compile_s: dict[str, float] = {}
    if args.equal == "time":
        # one set of probes per ablation, so that runs split over several processes share their steps
        probes = out / f"probes-{tag}.json"
        saved = json.loads(probes.read_text()) if probes.exists() else {}
        saved = saved if "tokens_per_s" in saved else {"tokens_per_s": saved, "compile_s": {}}  # files before compile
        if set(saved["tokens_per_s"]) >= set(names):
            speeds, compile_s = saved["tokens_per_s"], saved["compile_s"]
        else:
            rounds = args.probe_rounds or (20 if args.probe_clock == "interleaved" else 3)
            speeds = probe_speeds(out, names, data, rounds, args.probe_clock)
            compile_s = {n: compile_seconds(out, n) for n in names if compiles(n)}
            print("compile seconds, each in a fresh process from an empty cache: "
                  + ", ".join(f"{n} {t:.1f}" for n, t in compile_s.items()), flush=True)
            probes.write_text(json.dumps({"tokens_per_s": speeds, "compile_s": compile_s}, indent=1) + "\n")
        # the baseline's training time, less what a configuration spends compiling, at its speed
        budget_s = args.steps * tokens_per_step(args.baseline) / speeds[args.baseline]
        steps = {n: round((budget_s - compile_s.get(n, 0.0)) * speeds[n] / tokens_per_step(n)) for n in names}
        print("probe speeds (tokens/s): " + ", ".join(f"{n} {speeds[n]:,.0f}" for n in names)
              + "".join(f"; {n} compiles for {t:.0f} s of its {budget_s:.0f}" for n, t in compile_s.items()),
              flush=True)

    eval_tokens = 1 << 16 if args.eval == "full" else 1 << 18
    results_file = out / "results.jsonl"
    if args.table_only:
        return table(results_file, tag, names)
    done = {(r["tag"], r["name"], r["seed"]) for r in map(json.loads, results_file.read_text().splitlines())} \
        if results_file.exists() else set()
    if args.baseline_from:  # every seed's run of the same steps, scored the same way, or nothing
        rows = map(json.loads, results_file.read_text().splitlines()) if results_file.exists() else []
        earlier = [r for r in rows
                   if r["tag"] == args.baseline_from and r["name"] == args.baseline and r["seed"] in seeds]
        if ({r["seed"] for r in earlier} != set(seeds) or {r["steps"] for r in earlier} != {steps[args.baseline]}
                or any(r.get("eval", args.eval) != args.eval for r in earlier)):  # rows before 2026-12-02 lack "eval"
            sys.exit(f"recipe: {args.baseline_from} lacks {args.baseline} runs of {steps[args.baseline]} steps, "
                     f"--eval {args.eval}, for every seed of {seeds}")
        with open(results_file, "a") as f:
            for r in earlier:
                if (tag, args.baseline, r["seed"]) not in done:
                    f.write(json.dumps(r | {"tag": tag, "reused_from": args.baseline_from}) + "\n")
    for i, seed in enumerate(seeds):
        order = to_run if (i + seeds[0]) % 2 == 0 else to_run[::-1]  # sides take turns going first
        for name in order:
            if (tag, name, seed) in done:
                continue
            flags, ds = CONFIGS[name]
            run = out / "runs" / tag / f"{name}-s{seed}"
            subprocess.run(["rm", "-rf", str(run)])
            run.parent.mkdir(parents=True, exist_ok=True)
            n = steps[name]
            started = time.time()
            tinystories("train", "--data", data[ds], "--out", run, *BASE, *flags, "--seed", seed, "--max-steps", n,
                        "--eval-interval", max(25, n // 8), "--checkpoint-interval", n, "--eval-tokens", eval_tokens,
                        "--log-interval", max(10, n // 10), log=run.parent / f"{name}-s{seed}.log")
            train_s = time.time() - started
            rec = last_record(run)
            if args.eval == "full":
                ev = run / "eval_test.json"
                tinystories("evaluate", "--checkpoint", run / "checkpoints" / "last", "--data", data[ds],
                            "--split", "test", "--json", ev, "--batch-size", 16)
                e = json.loads(ev.read_text())
            else:  # the trainer's last estimate on the test split's first eval_tokens tokens
                test = json.loads((data[ds] / "meta.json").read_text())["splits"]["test"]
                bits_per_byte = rec["test_loss"] / math.log(2) * test["tokens"] / test["bytes"]
                e = {"loss": rec["test_loss"], "bits_per_byte": bits_per_byte}
            row = {"tag": tag, "name": name, "seed": seed, "steps": n, "tokens": n * tokens_per_step(name),
                   "test_loss": e["loss"], "test_bpb": e["bits_per_byte"], "train_loss": rec["loss"],
                   "val_loss": rec.get("val_loss"), "train_s": round(train_s, 1),
                   "probe_tokens_per_s": speeds and speeds[name], "compile_s": compile_s.get(name), "data": ds,
                   "flags": flags, "eval": args.eval,
                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
            with open(results_file, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{name:<24} seed {seed}: {n} steps, test loss {e['loss']:.4f}, {e['bits_per_byte']:.4f} bits/byte "
                  f"(train {rec['loss']:.3f}; {train_s:.0f}s)", flush=True)

    table(results_file, tag, names)
    runs = [run for n in names if (run := out / "runs" / tag / f"{n}-s{seeds[0]}" / "log.jsonl").exists()]
    runs = [run.parent for run in runs]
    tinystories("plot", *runs, "--out", out / f"curves-{tag}.png")
    print(f"curves: {out / f'curves-{tag}.png'}")


def table(results_file: Path, tag: str, names: list[str]) -> None:
    rows = [r for r in map(json.loads, results_file.read_text().splitlines()) if r["tag"] == tag] \
        if results_file.exists() else []
    by = {n: [r for r in rows if r["name"] == n] for n in names}
    if not by[names[0]]:
        return print(f"no results for {names[0]} under tag {tag!r} yet")
    base = statistics.mean(r["test_bpb"] for r in by[names[0]])
    print(f"\n| configuration | steps | seeds | test loss | test bits/byte | vs {names[0]} | train loss |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n in names:
        rs = by[n]
        if not rs:
            continue
        bpb = [r["test_bpb"] for r in rs]
        spread = f" ± {statistics.stdev(bpb):.4f}" if len(bpb) > 1 else ""
        print(f"| {n} | {rs[0]['steps']} | {len(rs)} | {statistics.mean(r['test_loss'] for r in rs):.4f} | "
              f"{statistics.mean(bpb):.4f}{spread} | {statistics.mean(bpb) / base:.3f}x | "
              f"{statistics.mean(r['train_loss'] for r in rs):.3f} |")


if __name__ == "__main__":
    main()
