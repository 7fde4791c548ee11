"""Benchmark: `tinystories serve` under N concurrent streaming clients: total tokens/s and the time
to the first token, against another checkout of the project (the server as it was) in the same run.
Or (--long-prompt) a short request's time to its first token beside a maximal prompt.

    .venv/bin/python bench/serve.py [--streams 16] [--max-tokens 100] [--rounds 3]
    git archive 661744a | tar -x -C /tmp/serve-before            # the server before batching
    .venv/bin/python bench/serve.py --baseline /tmp/serve-before   # both, round after round
    .venv/bin/python bench/serve.py --long-prompt [--rounds 5] [--delay 0.5] [--max-prompt-tokens N]
    .venv/bin/python bench/serve.py --long-prompt --quick          # tiny sizes: checks the script only

Each side is the real command (`python -m tinystories serve --port 0`, real uvicorn on 127.0.0.1)
run from its checkout (the benchmark checks that the server imports that checkout's package).
Both servers run from the start; the rounds alternate between them, in alternating order, so
both see the load of a shared machine alike. One round: --streams clients start at once, each a
streamed completion of --max-tokens tokens with its own story opening (the first words of real
validation stories from ../shared) and seed, include_usage on. Reported per side: total
completion tokens / the round's wall time (median over rounds), and the time from a request to
its first text chunk, p50 and p95 over every request of every round; then ours / baseline.

--long-prompt: one round sends a short streamed request (a story opening, --max-tokens tokens)
alone, and the same request --delay seconds after a maximal prompt: the longest the server takes
(its /health max_prompt_tokens, at most 100,000 characters of real stories; a server that reports
no such cap gets 99,999 characters), which asks for as many tokens as the server allows and so is
still decoding beside the short one. The two orders alternate from round to round. Reported per
side: the short request's time to its first text chunk alone and beside the long prompt (medians
over rounds), their ratio (median of per-round ratios; the aim: at most 2x), the long prompt's
own time to its first chunk, and whether the short request wrote the same text both times (its
seed is fixed: it should). --max-prompt-tokens raises our server's cap, so that the maximal
prompt is the 100,000-character one.

The model: the `tiny` preset's shape with random weights (seed 0) and a 4,096-token BPE trained on
2,000 real stories, unless --checkpoint names one. A random model almost never writes
end-of-text, so every stream does --max-tokens tokens and both sides do the same work. Bounded in
time: every request has a timeout, every server is stopped at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, SHARED, load_average, machine, median, print_machine, stories  # noqa: E402

STORIES = SHARED / "tinystories" / "TinyStories-valid.head.txt"
MAX_PROMPT_CHARS = 100_000  # the server's cap on a prompt's characters (tinystories/serve.py)


def make_checkpoint(out: Path, quick: bool = False) -> Path:
    """The `tiny` preset's shape, random weights, and a 4,096-token BPE of 2,000 real stories
    (quick: 2 layers of 32, block_size 64, a 512-token BPE of 300 stories)."""
    import torch

    from tinystories.checkpoint import save_checkpoint
    from tinystories.config import get_preset
    from tinystories.model import GPT
    from tinystories.tokenizer import train_bpe

    tokenizer = train_bpe(stories(STORIES)[: 300 if quick else 2000], 512 if quick else 4096, show_progress=False)
    torch.manual_seed(0)
    config = dataclasses.replace(get_preset("tiny"), vocab_size=tokenizer.vocab_size)
    if quick:
        config = dataclasses.replace(config, n_layer=2, n_head=2, n_embd=32, block_size=64)
    return save_checkpoint(out / "bench-tiny", GPT(config), tokenizer)


def openings(n: int) -> list[str]:
    """The first 3 to 10 words of n real stories: prompts of different lengths."""
    texts = stories(STORIES)
    return [" ".join(texts[i].split()[: 3 + i % 8]) for i in range(n)]


class Server:
    """`tinystories serve` run from `repo`, in a subprocess with its output in a log file."""

    def __init__(self, name: str, repo: Path, checkpoint: Path, log: Path, cap: int, concurrency: int | None,
                 dtype: str | None = None, extra: tuple[str, ...] = ()):
        self.name, self.log = name, log
        where = subprocess.run([sys.executable, "-c", "import tinystories; print(tinystories.__file__)"],
                               cwd=repo, capture_output=True, text=True, check=True).stdout.strip()
        if not Path(where).resolve().is_relative_to(Path(repo).resolve()):
            raise SystemExit(f"{name}: python run in {repo} imports tinystories from {where}, not from {repo}")
        flags = (["--concurrency", str(concurrency)] if concurrency else []) + (["--dtype", dtype] if dtype else [])
        with open(log, "w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tinystories", "serve", "--checkpoint", str(checkpoint), "--port", "0",
                 "--device", "cpu", "--max-tokens-cap", str(cap), *flags, *extra],
                cwd=repo, stdout=out, stderr=subprocess.STDOUT)
        try:
            self.port = self._wait_for_port()
        except BaseException:  # no server left running behind a failed start
            self.stop()
            raise

    def _wait_for_port(self, timeout: float = 300) -> int:
        deadline = time.monotonic() + timeout
        port = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"{self.name}: the server exited:\n{self.log.read_text()}")
            text = self.log.read_text()
            if port is None and "http://127.0.0.1:" in text:
                port = int(text.split("http://127.0.0.1:", 1)[1].split("/", 1)[0])
            if port is not None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                try:
                    conn.request("GET", "/health")
                    if conn.getresponse().status == 200:
                        return port
                except OSError:
                    pass
                finally:
                    conn.close()
            time.sleep(0.2)
        raise SystemExit(f"{self.name}: no server within {timeout:g} s:\n{self.log.read_text()}")

    def health(self) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("GET", "/health")
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def stream_one(port: int, prompt: str, max_tokens: int, seed: int, timeout: float) -> tuple[float, int, str]:
    """(seconds to the first text chunk, completion tokens, text) of one streamed completion."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0, "seed": seed, "stream": True,
                       "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
        first, tokens, text = None, 0, []
        for line in response:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                text.append(chunk["choices"][0]["text"])
                if first is None:
                    first = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
        return (first if first is not None else time.perf_counter() - t0), tokens, "".join(text)
    finally:
        conn.close()


def one_round(port: int, prompts: list[str], max_tokens: int, seed: int, timeout: float) -> tuple[float, list[float]]:
    """(total tokens/s, each request's time to first token) of len(prompts) concurrent streams."""
    results: list = [None] * len(prompts)

    def client(i):
        try:
            results[i] = stream_one(port, prompts[i], max_tokens, seed + i, timeout)
        except Exception as e:  # reported below
            results[i] = e

    # daemon threads: a client still waiting after its timeout does not keep the script from exiting
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(len(prompts))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 5)
    wall = time.perf_counter() - start
    failed = [r for r in results if not isinstance(r, tuple)]
    if failed:
        raise SystemExit(f"{len(failed)} of {len(prompts)} streams failed: {failed[0]!r}")
    return sum(tokens for _, tokens, _ in results) / wall, [first for first, _, _ in results]


def maximal_prompt(tokenizer, max_tokens: int | None, max_chars: int) -> str:
    """Real validation stories one after another, cut to at most max_tokens tokens (None: no cap)
    and max_chars characters: the longest prompt a server with those caps takes."""
    texts = stories(STORIES)
    text = ""
    while len(text) < max_chars:
        text += "\n\n".join(texts) + "\n\n"
    text = text[:max_chars]
    if max_tokens is None:
        return text
    ids = tokenizer.encode(text)[:max_tokens]
    while len(tokenizer.encode(text := tokenizer.decode(ids))) > max_tokens:  # a cut can merge differently
        ids = ids[:-1]
    return text


def long_prompt_round(port: int, short: str, long: str, args, seed: int, alone_first: bool) -> dict:
    """One round of --long-prompt: the short request alone and --delay s after the long prompt."""
    def long_request(result: list) -> None:
        try:
            result.append(stream_one(port, long, args.long_max_tokens, seed + 1, args.timeout))
        except Exception as e:  # reported below
            result.append(e)

    def beside() -> tuple[tuple, tuple]:
        result: list = []
        thread = threading.Thread(target=long_request, args=(result,), daemon=True)
        thread.start()
        time.sleep(args.delay)
        short_result = stream_one(port, short, args.max_tokens, seed, args.timeout)
        thread.join(args.timeout + 5)
        if not result or isinstance(result[0], Exception):
            raise SystemExit(f"the long prompt failed: {result[0] if result else 'no answer in time'!r}")
        return short_result, result[0]

    if alone_first:
        alone = stream_one(port, short, args.max_tokens, seed, args.timeout)
        near, long_result = beside()
    else:
        near, long_result = beside()
        alone = stream_one(port, short, args.max_tokens, seed, args.timeout)
    return {"alone": alone[0], "beside": near[0], "long_first": long_result[0], "same_text": alone[2] == near[2]}


def run_long_prompt(args, checkpoint: Path, tmp: Path) -> None:
    """--long-prompt: the short request's time to first token alone and beside a maximal prompt."""
    from tinystories.checkpoint import load_checkpoint

    tokenizer = load_checkpoint(checkpoint).tokenizer
    sides = [("ours", REPO)] + ([("baseline", args.baseline.resolve())] if args.baseline else [])
    cap = max(args.max_tokens, args.long_max_tokens)
    extra = ("--max-prompt-tokens", str(args.max_prompt_tokens)) if args.max_prompt_tokens else ()
    servers, prompts = [], {}
    results: dict[str, list[dict]] = {}
    try:
        for name, repo in sides:
            server = Server(name, repo, checkpoint, tmp / f"{name}.log", cap, args.concurrency,
                            args.dtype if name == "ours" else None, extra if name == "ours" else ())
            servers.append(server)
            # the longest prompt this server takes (a server before the prompt cap: the character cap)
            prompts[name] = maximal_prompt(tokenizer, server.health().get("max_prompt_tokens"), MAX_PROMPT_CHARS - 1)
            print(f"{name}: the maximal prompt has {len(tokenizer.encode(prompts[name])):,} tokens, "
                  f"{len(prompts[name]):,} characters", flush=True)
            results[name] = []
        short = openings(1)[0]
        for server in servers:  # warm up: the first request of a process pays for lazy setup
            one_round(server.port, [short], 8, seed=0, timeout=args.timeout)
        for r in range(args.rounds):
            for server in servers if r % 2 == 0 else servers[::-1]:
                result = long_prompt_round(server.port, short, prompts[server.name], args, seed=1000 * r,
                                           alone_first=r % 2 == 0)
                results[server.name].append(result)
                print(f"round {r + 1} {server.name:8s} first token alone {result['alone'] * 1000:.0f} ms, beside the "
                      f"long prompt {result['beside'] * 1000:.0f} ms ({result['beside'] / result['alone']:.2f}x); the "
                      f"long prompt's {result['long_first'] * 1000:.0f} ms (load {load_average()})", flush=True)
    finally:
        for server in servers:
            server.stop()

    print(f"\na short request ({args.max_tokens} tokens) alone and {args.delay:g} s after a maximal prompt, "
          f"{args.rounds} rounds per side:")
    for name, rounds in results.items():
        ratio = median([x["beside"] / x["alone"] for x in rounds])
        print(f"  {name:8s} time to first token alone {median([x['alone'] for x in rounds]) * 1000:.0f} ms, beside "
              f"{median([x['beside'] for x in rounds]) * 1000:.0f} ms: {ratio:.2f}x (median of per-round ratios; aim: "
              f"at most 2x); the long prompt's own {median([x['long_first'] for x in rounds]) * 1000:.0f} ms; "
              f"the same text alone and beside: {'yes' if all(x['same_text'] for x in rounds) else 'NO'}")


def percentile(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else xs[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="a checkpoint to serve (default: the tiny shape, random)")
    ap.add_argument("--baseline", type=Path, default=None, help="another checkout to compare with (its server)")
    ap.add_argument("--streams", type=int, default=16, help="concurrent streaming clients per round")
    ap.add_argument("--max-tokens", type=int, default=100, help="tokens each stream asks for")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per side, alternating between the sides")
    ap.add_argument("--concurrency", type=int, default=None, help="the servers' --concurrency (default: theirs)")
    ap.add_argument("--dtype", default=None, choices=["auto", "bf16", "int8", "fp32"],
                    help="our server's --dtype (default: its own, auto); the baseline's server before batching "
                         "has no such flag and decodes in the checkpoint's fp32")
    ap.add_argument("--timeout", type=float, default=300, help="seconds a request may take")
    ap.add_argument("--long-prompt", action="store_true",
                    help="measure a short request's time to first token alone and beside a maximal prompt instead")
    ap.add_argument("--delay", type=float, default=0.5, help="--long-prompt: seconds between the long and the short one")
    ap.add_argument("--long-max-tokens", type=int, default=512, help="--long-prompt: tokens the long prompt asks for")
    ap.add_argument("--max-prompt-tokens", type=int, default=None,
                    help="--long-prompt: our server's --max-prompt-tokens (default: its own, the model's block_size)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, measures nothing")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.streams, args.max_tokens, args.long_max_tokens, args.delay = 1, 2, 4, 16, 0.2

    info = machine()
    print_machine(info)
    print(f"load average before: {load_average()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        tmp = Path(tmp)
        checkpoint = Path(args.checkpoint) if args.checkpoint else make_checkpoint(tmp, args.quick)
        if args.long_prompt:
            run_long_prompt(args, checkpoint, tmp)
            print(f"load average after: {load_average()}")
            return 0
        sides = [("ours", REPO)] + ([("baseline", args.baseline.resolve())] if args.baseline else [])
        servers = []
        try:
            for name, repo in sides:
                servers.append(Server(name, repo, checkpoint, tmp / f"{name}.log", args.max_tokens, args.concurrency,
                                      args.dtype if name == "ours" else None))
            prompts = openings(args.streams)
            for server in servers:  # warm up: the first request of a process pays for lazy setup
                one_round(server.port, prompts[:2], 8, seed=0, timeout=args.timeout)
            rates: dict[str, list[float]] = {s.name: [] for s in servers}
            firsts: dict[str, list[float]] = {s.name: [] for s in servers}
            for r in range(args.rounds):
                for server in servers if r % 2 == 0 else servers[::-1]:
                    rate, first = one_round(server.port, prompts, args.max_tokens, seed=1000 * r, timeout=args.timeout)
                    rates[server.name].append(rate)
                    firsts[server.name].extend(first)
                    print(f"round {r + 1} {server.name:8s} {rate:7.0f} tokens/s, first token p50 "
                          f"{median(first) * 1000:.0f} ms (load {load_average()})", flush=True)
        finally:
            for server in servers:
                server.stop()

    print(f"\n{args.streams} concurrent streams of {args.max_tokens} tokens, {args.rounds} rounds per side:")
    for name in rates:
        print(f"  {name:8s} {median(rates[name]):7.0f} tokens/s (median of rounds); time to first token "
              f"p50 {median(firsts[name]) * 1000:.0f} ms, p95 {percentile(firsts[name], 95) * 1000:.0f} ms")
    if "baseline" in rates:
        ratios = [a / b for a, b in zip(rates["ours"], rates["baseline"])]
        print(f"  ours / baseline: {median(ratios):.2f}x tokens/s (median of per-round ratios), time to first "
              f"token p50 {median(firsts['ours']) / median(firsts['baseline']):.2f}x")
    print(f"load average after: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
