"""Benchmark: `prepare`'s tokenize+write throughput against plain single-threaded tiktoken.

    .venv/bin/python bench/prepare.py [--copies 2] [--repeats 3]

The text: every story of the five files in ../shared/data/tinystories (~14.6 MB), `--copies` times,
as one official-format .txt. In the same run, alternating, it times
  baseline  `encode_ordinary(story)` for each story, one thread: tokenizing only, nothing written;
  prepare   `tinystories.prepare.prepare` on the file (gpt2, no test split): its streaming stage
            (read, clean, tokenize on all cores, write train.bin/val.bin), and the whole call
            (also hashing/validating the file and loading the vocabulary).
--memory instead runs the `tinystories prepare` command (a fresh process each time) on inputs of
--memory-copies sizes (the same stories repeated) and prints each one's peak resident memory: flat
memory over a growing input is what "streaming, memory bounded whatever the input size" means.

Throughput is MB of story text (UTF-8) per second; the median of the repeats is reported, with
the cores each side kept busy (CPU time / wall time). The machine may be shared: with other work
running, the kernel's per-session fair share caps both sides alike, so the ratio tends to 1 however
many threads prepare uses; its load average is printed with the result.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tinystories.prepare import prepare  # noqa: E402
from tinystories.tokenizer import EOT, load_gpt2  # noqa: E402

SHARED = REPO.parent / "shared" / "data"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cores_available(seconds: float = 1.0) -> float:
    """Cores this process can use right now: two threads hashing (hashlib drops the GIL)."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    data = b"x" * (16 << 20)

    def spin(_):
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            hashlib.sha256(data).digest()

    t, c = time.perf_counter(), cpu_seconds()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(spin, range(2)))
    return (cpu_seconds() - c) / (time.perf_counter() - t)


def shared_stories() -> list[str]:
    stories = []
    for path in sorted((SHARED / "tinystories").glob("*.txt")):
        stories += [s.strip() for s in path.read_text(encoding="utf-8").split(EOT)[:-1]]
    return [s for s in stories if s]


def peak_memory(copies: list[int], tokenizer: str) -> None:
    """Peak RSS of `tinystories prepare` on the shared stories repeated `copies` times."""
    import subprocess

    text = "".join(f"{s}\n{EOT}\n" for s in shared_stories())
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; Python {platform.python_version()}; "
          f"tinystories prepare --tokenizer {tokenizer} --test none, one fresh process per size", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        for n in copies:
            src = Path(tmp) / f"stories-x{n}.txt"
            with open(src, "w", encoding="utf-8") as f:
                for _ in range(n):
                    f.write(text)
            cmd = [sys.executable, "-m", "tinystories", "prepare", "--source", str(src), "--tokenizer", tokenizer,
                   "--gpt2-vocab", str(SHARED / "gpt2"), "--test", "none", "--out", str(Path(tmp) / "out"), "--force"]
            log = Path(tmp) / "prepare.log"  # a file, not a pipe: nobody reads a pipe while we wait
            t = time.perf_counter()
            with open(log, "w") as err:
                proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=REPO)
                _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak, not the largest of all children
            seconds = time.perf_counter() - t
            if status != 0:
                raise SystemExit(f"prepare failed on x{n}:\n{log.read_text()}")
            size = src.stat().st_size / 1e6
            print(f"input {size:8.1f} MB   peak RSS {usage.ru_maxrss / 1024:7.1f} MB   {seconds:6.1f} s", file=sys.stderr)
            src.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=2, help="times the shared stories are repeated in the input")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each side (median reported)")
    ap.add_argument("--memory", action="store_true", help="measure peak memory over growing inputs instead")
    ap.add_argument("--memory-copies", default="1,4,16", help="input sizes for --memory, in copies of the stories")
    ap.add_argument("--tokenizer", default="gpt2", help="tokenizer for --memory (gpt2 or bpe-N)")
    args = ap.parse_args()
    if args.memory:
        peak_memory([int(n) for n in args.memory_copies.split(",")], args.tokenizer)
        return

    stories = shared_stories() * args.copies
    text_mb = sum(len(s.encode("utf-8")) for s in stories) / 1e6
    tok = load_gpt2(SHARED / "gpt2")
    enc = tok._enc  # the tiktoken Encoding itself: the baseline is plain tiktoken

    baseline, stage, whole, cores = [], [], [], {"baseline": [], "prepare": []}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "stories.txt"
        src.write_text("".join(f"{s}\n{EOT}\n" for s in stories), encoding="utf-8")
        for _ in range(args.repeats):
            t, c = time.perf_counter(), cpu_seconds()
            n_tokens = sum(len(enc.encode_ordinary(s)) for s in stories)
            baseline.append(text_mb / (time.perf_counter() - t))
            cores["baseline"].append((cpu_seconds() - c) / (time.perf_counter() - t))

            timings, c = {}, cpu_seconds()
            meta = prepare(src, Path(tmp) / "out", gpt2_vocab=SHARED / "gpt2", test="none", force=True,
                           timings=timings, progress=False)
            stage.append(text_mb / timings["tokenize"])
            whole.append(text_mb / timings["total"])
            cores["prepare"].append((cpu_seconds() - c) / timings["total"])
            written = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
            assert written == n_tokens + len(stories), "prepare wrote other tokens than tiktoken gives"

    b, s, w = (statistics.median(x) for x in (baseline, stage, whole))
    free = cores_available()
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; "
          f"Python {platform.python_version()}; "
          f"cores this process could use just after: {free:.2f} of 2", file=sys.stderr)
    print(f"text: {len(stories):,} stories, {text_mb:.1f} MB, {n_tokens:,} GPT-2 tokens; median of {args.repeats}",
          file=sys.stderr)
    busy = {k: statistics.median(v) for k, v in cores.items()}
    print(f"baseline  tiktoken encode_ordinary, 1 thread   {b:6.2f} MB/s          "
          f"{busy['baseline']:.2f} cores busy", file=sys.stderr)
    print(f"prepare   tokenize+write (streaming stage)     {s:6.2f} MB/s   {s / b:.2f}x", file=sys.stderr)
    print(f"prepare   whole call (+ checks, vocab load)    {w:6.2f} MB/s   {w / b:.2f}x   "
          f"{busy['prepare']:.2f} cores busy", file=sys.stderr)


if __name__ == "__main__":
    main()
