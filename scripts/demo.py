"""The README's first command (`make demo`): data -> trained model -> numbers -> a plot -> a story.

    python scripts/demo.py --out out/demo [--minutes 5]

1. prepare: the official files from the Hugging Face hub when it answers, otherwise the TinyStories
   slices in ../shared/data/tinystories (say which), with a 4,096-token BPE;
2. train the `tiny` preset for about --minutes on this machine (the step count is set from a short
   timing run, so a slow machine trains fewer steps rather than longer);
3. evaluate the best checkpoint on the test split (loss, perplexity, bits per byte);
4. plot the loss curves to loss.png;
5. write a story.

Every stage is the real `tinystories` command, run in this process through its `main` function,
and re-running the demo reuses prepared data (delete --out to start over).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import urllib.request
from pathlib import Path

from tinystories.cli import main as tinystories
from tinystories.errors import EXIT_STOPPED

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# Every training slice in ../shared (10,266 stories, V1 and V2): more text than the V2 sample alone,
# so 5 minutes of training repeat each story about twice instead of four times (BENCHMARKS.md).
SLICE_TRAIN = [SHARED / "tinystories" / name for name in
               ("TinyStoriesV2-train.sample.txt", "TinyStoriesV2-train.head.txt", "TinyStories-train.head.txt")]
SLICE_TEST = SHARED / "tinystories" / "TinyStoriesV2-valid.head.txt"


def banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 70 - len(text)), flush=True)


def hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout)
        return True
    except Exception:
        return False


def call(*args) -> None:
    print("$ tinystories " + " ".join(map(str, args)), flush=True)
    code = tinystories([str(a) for a in args])
    if code == EXIT_STOPPED:  # Ctrl-C or SIGTERM: train saved checkpoints/last and said how to resume
        sys.exit(f"demo: stopped during `tinystories {args[0]}` (exit {code}); `make demo` again starts over")
    if code != 0:
        sys.exit(f"demo: `tinystories {args[0]}` failed (exit {code}); see the message above")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/demo", help="where data, run, plot and results go")
    p.add_argument("--minutes", type=float, default=5.0, help="training time budget")
    p.add_argument("--source", choices=["auto", "hf", "shared"], default="auto",
                   help="auto: the hub when reachable, else the shared slice")
    args = p.parse_args()
    out = Path(args.out)
    data, run = out / "data", out / "run"
    started = time.time()

    banner("1/5 prepare the data")
    if (data / "meta.json").is_file():
        print(f"reusing prepared data in {data}")
    else:
        source = args.source
        if source == "auto":
            source = "hf" if hub_reachable() else "shared"
        if source == "hf":
            print("the Hugging Face hub answers: downloading the official TinyStories V2 files "
                  "(2.2 GB once, cached), using the first 40,000 training stories")
            call("prepare", "--source", "hf", "--dataset", "v2", "--tokenizer", "bpe-4096",
                 "--max-stories", 40000, "--out", data)
        else:
            missing = [str(f) for f in SLICE_TRAIN + [SLICE_TEST] if not f.is_file()]
            if missing:
                sys.exit(f"demo: the hub is not reachable and the shared slice is missing ({', '.join(missing)})")
            print(f"no route to the Hugging Face hub: using the TinyStories slices in {SLICE_TEST.parent} "
                  f"({', '.join(f.name for f in SLICE_TRAIN)} for training, {SLICE_TEST.name} as the test split)")
            slices = out / "train-slices"  # prepare reads a folder of files: links to the shared ones
            slices.mkdir(parents=True, exist_ok=True)
            for f in SLICE_TRAIN:
                if not (slices / f.name).exists():
                    (slices / f.name).symlink_to(f)
            call("prepare", "--source", slices, "--test", SLICE_TEST, "--tokenizer", "bpe-4096", "--out", data)

    banner(f"2/5 train the tiny preset (about {args.minutes:g} minutes)")
    if run.exists():
        shutil.rmtree(run)
    # Time a few steps first so the run fits the budget on this machine.
    probe = out / "probe"
    shutil.rmtree(probe, ignore_errors=True)
    # --compile-cpu: torch.compile on the CPU (BENCHMARKS.md: faster steps for the seconds it takes to
    # compile, which the probe pays; the run finds the compiled kernels in inductor's cache). Without
    # a C++ compiler both stay eager and say so.
    compile_cpu = ["--compile-cpu", "true"]
    call("train", "--data", data, "--preset", "tiny", "--out", probe, "--max-steps", 6, *compile_cpu,
         "--eval-tokens", 256, "--eval-interval", 1000, "--log-interval", 1000)
    log = [json.loads(line) for line in (probe / "log.jsonl").read_text().splitlines()]
    speeds = sorted(r["tokens_per_s"] for r in log[1:])  # the first step pays for warm-up
    tokens_per_s = speeds[len(speeds) // 2]
    shutil.rmtree(probe)
    # ~15 % of the budget goes to the periodic evaluations and checkpoints
    steps = max(50, int(0.85 * args.minutes * 60 * tokens_per_s / log[0]["tokens"]))
    print(f"about {tokens_per_s:,.0f} tokens/s here: training {steps} steps of {log[0]['tokens']:,} tokens")
    call("train", "--data", data, "--preset", "tiny", "--out", run, "--max-steps", steps, *compile_cpu,
         "--eval-interval", max(25, steps // 8), "--checkpoint-interval", max(25, steps // 8),
         "--log-interval", max(10, steps // 25))

    banner("3/5 evaluate the best checkpoint on the test split")
    results = out / "eval_test.json"
    call("evaluate", "--checkpoint", run, "--data", data, "--split", "test", "--json", results)

    banner("4/5 plot the loss curves")
    plot = out / "loss.png"
    call("plot", run, "--out", plot)

    banner("5/5 tell a story")
    call("generate", "--checkpoint", run, "--prompt", "Once upon a time, there was a little dog named Max.",
         "--max-new-tokens", 200, "--temperature", 0.7, "--seed", 7)

    numbers = json.loads(results.read_text())
    print(f"\ndone in {(time.time() - started) / 60:.1f} minutes. Everything is in {out}/:\n"
          f"  data/          prepared tokens and the BPE tokenizer (meta.json says what was done)\n"
          f"  run/           config.json, log.jsonl, checkpoints/best and checkpoints/last\n"
          f"  eval_test.json test loss {numbers['loss']:.3f}, perplexity {numbers['perplexity']:.2f}, "
          f"{numbers['bits_per_byte']:.3f} bits per byte\n"
          f"  loss.png       train and val loss against tokens seen\n"
          f"Next: tinystories generate --checkpoint {run} --prompt \"...\"   |   tinystories serve --checkpoint {run}")


if __name__ == "__main__":
    main()
