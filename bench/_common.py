"""What the benchmarks in bench/ share: the machine's description and interleaved timing in workers.

Each side of a comparison runs in its own worker process (`python bench/X.py --worker SIDE ...`),
so process-wide settings (threads, the allocator) belong to that side alone, as they would in a
user's own program. The parent asks the workers in turn for one timed repetition each, round after
round: on a shared machine load comes and goes, and interleaving exposes both sides to it alike.
Ratios are taken within a round, then the median over rounds is reported.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def stories(path: Path) -> list[str]:
    """The stories of an official-format .txt (each followed by an <|endoftext|> line), stripped, the
    empty ones dropped. A plain split, not tinystories.evaluate.text_stories: that one also repairs
    mojibake as prepare does, which would change the prompts of earlier benchmark runs."""
    text = Path(path).read_text(encoding="utf-8")
    return [s.strip() for s in text.split("<|endoftext|>") if s.strip()]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine() -> dict:
    """The facts a benchmark result needs beside it (imports torch, transformers if present)."""
    import torch

    from tinystories.device import cpu_supports_bf16

    try:
        import transformers

        hf = transformers.__version__
    except ImportError:
        hf = "not installed"
    return {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "bf16_matmul": cpu_supports_bf16(),
        "torch": torch.__version__,
        "transformers": hf,
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
    }


def print_machine(info: dict) -> None:
    print(f"machine: {info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), "
          f"native bf16 matmul: {'yes' if info['bf16_matmul'] else 'no'}; torch {info['torch']}, "
          f"transformers {info['transformers']}, python {info['python']}; {info['date']}", flush=True)


# -----------------------------------------------------------------------------
# Workers


class Worker:
    """A child process that sets up one side, then times one repetition per `go` line it reads.

    Protocol (stdin/stdout lines): the child prints `ready` once set up (or `error MESSAGE`), then
    answers every `go` with the repetition's seconds and any extra fields, space-separated.
    """

    def __init__(self, script: Path, side: str, args: list[str]):
        self.side = side
        self.proc = subprocess.Popen(
            [sys.executable, str(script), "--worker", side, *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
        )
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.close()
            raise RuntimeError(f"worker {side} did not start: {line or 'it exited'}")

    def go(self) -> list[str]:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline().split()
        if not line:
            raise RuntimeError(f"worker {self.side} died")
        return line

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def serve(setup) -> None:
    """The worker's side of the protocol: `setup()` returns a function doing one timed repetition."""
    try:
        once = setup()
    except Exception as e:  # report why, instead of a parent waiting forever
        print(f"error {type(e).__name__}: {e}".replace("\n", " "), flush=True)
        raise
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "go":
            print(" ".join(str(x) for x in once()), flush=True)


def interleave(workers: list[Worker], warmup: int, rounds: int, log) -> dict[str, list[list[str]]]:
    """Warm every worker up, then `rounds` rounds of one repetition each; replies per side."""
    for w in workers:
        for _ in range(warmup):
            w.go()
    results: dict[str, list[list[str]]] = {w.side: [] for w in workers}
    for r in range(rounds):
        order = workers if r % 2 == 0 else workers[::-1]  # neither side always goes first
        for w in order:
            results[w.side].append(w.go())
        log(r, {side: replies[-1] for side, replies in results.items()})
    return results


def median(xs) -> float:
    return statistics.median(xs)
