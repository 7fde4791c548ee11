"""`tinystories quality`: the story-quality report, the measures Eldan & Li (2023) judged stories by.

    tinystories quality --checkpoint runs/tiny --data data/ts --out reports/tiny
    tinystories quality --checkpoint runs/tiny --data data/ts --out reports/tiny \\
        --judge-url http://localhost:8000/v1 --judge-model NAME     # key from $OPENAI_API_KEY

The model completes a fixed set of story beginnings (tinystories/prompts/beginnings.txt, >= 50,
written for this project in the paper's style) with a fixed seed, each behind an end-of-text token
as a story starts in training. Per completion and over all of them:
    tokens, words        mean length of the completions (end-of-text not counted)
    eot_share            share of completions that ended with end-of-text within --max-new-tokens
    distinct_1/2/3       distinct word n-grams / all word n-grams over all completions (Li et al.
                         2016): low means the model says the same things again and again
    repetition_4         share of a completion's word 4-grams that repeat an earlier one in it,
                         averaged over completions: high means loops ("and they played and played")
    memorization         the longest span found verbatim in the training tokens and the share of
                         n-grams found there (see memorization.py); the paper's check that a small
                         model writes new stories instead of copying
    judge (optional)     the paper's rubric graded by a chat model (see judge.py; no judge model
                         was reachable where this was built)
Words are lowercased runs of letters, digits and apostrophes, and single punctuation marks, so the
text measures do not depend on the tokenizer.

Output: OUT/quality.json (every number, every completion, the settings that made them) and
OUT/quality.md (tables and sample completions).
"""

from __future__ import annotations

import json
import os
import re
import time
from importlib import resources
from pathlib import Path

from tinystories.errors import UserError

# -----------------------------------------------------------------------------
# The fixed beginnings


def read_prompts(path=None) -> list[str]:
    """The story beginnings: one per line, '#' lines are comments. Default: the packaged set."""
    if path is None:
        text = resources.files("tinystories").joinpath("prompts/beginnings.txt").read_text(encoding="utf-8")
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"prompt file {path} does not exist") from None
        except UnicodeDecodeError:
            raise UserError(f"prompt file {path} is not UTF-8 text") from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise UserError(f"prompt file {path} holds no story beginnings (one per line)")
    return prompts


# -----------------------------------------------------------------------------
# Text measures (pure)

_WORD = re.compile(r"[\w']+|[^\w\s]")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(seq: list, n: int) -> list[tuple]:
    return [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]


def distinct_n(texts_words: list[list[str]], n: int) -> float | None:
    """Distinct n-grams over all n-grams of all texts (corpus-level distinct-n)."""
    grams = [g for w in texts_words for g in ngrams(w, n)]
    return len(set(grams)) / len(grams) if grams else None


def repetition(text_words: list[str], n: int = 4) -> float | None:
    """Share of the n-grams of one text that repeat an earlier n-gram of it (None: too short)."""
    grams = ngrams(text_words, n)
    return (len(grams) - len(set(grams))) / len(grams) if grams else None


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def text_metrics(completions: list[dict]) -> dict:
    """Summary of the completion records made by `complete` (see the module docstring)."""
    ws = [words(c["completion"]) for c in completions]
    return {
        "completions": len(completions),
        "mean_tokens": _mean(c["tokens"] for c in completions),
        "mean_words": _mean(len(w) for w in ws),
        "eot_share": _mean(float(c["ended_with_eot"]) for c in completions),
        "distinct_1": distinct_n(ws, 1),
        "distinct_2": distinct_n(ws, 2),
        "distinct_3": distinct_n(ws, 3),
        "repetition_4": _mean(c["repetition_4"] for c in completions),
    }


def memorization_summary(completions: list[dict], n: int) -> dict:
    m = [c["memorization"] for c in completions]
    spans = [x["longest_span"] for x in m]
    return {
        "n": n,
        "mean_overlap": _mean(x["overlap"] for x in m),
        "max_overlap": max((x["overlap"] for x in m if x["overlap"] is not None), default=None),
        "mean_longest_span": _mean(spans),
        "max_longest_span": max(spans, default=0),
        "mean_longest_span_share": _mean(x["longest_span"] / x["tokens"] if x["tokens"] else None for x in m),
        "copied": sum(x["tokens"] > 0 and x["longest_span"] == x["tokens"] for x in m),
    }


# -----------------------------------------------------------------------------
# Completions


def complete(model, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float, top_k, top_p,
             seed: int, batch_size: int, device) -> list[dict]:
    """One completion per beginning, reproducible from `seed` (and the batch size)."""
    import torch
    from tqdm import tqdm

    from tinystories.generate import generate

    eot = tokenizer.eot_id
    generator = torch.Generator(device=device).manual_seed(seed)
    records = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="completions", unit="batch", disable=None):
        batch = prompts[i : i + batch_size]
        ids = [[eot] + tokenizer.encode(p) for p in batch]  # a story starts after end-of-text
        with torch.inference_mode():  # no autograd graph: it would keep every step's activations alive
            new = generate(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           eot_id=eot, generator=generator)
        for j, (prompt, tokens) in enumerate(zip(batch, new)):
            ended = bool(tokens) and tokens[-1] == eot
            body = tokens[:-1] if ended else tokens
            text = tokenizer.decode(body)
            records.append({
                "id": i + j,
                "prompt": prompt,
                "completion": text,
                "completion_ids": body,
                "tokens": len(body),
                "ended_with_eot": ended,
                "words": len(words(text)),
                "repetition_4": repetition(words(text), 4),
            })
    return records


# -----------------------------------------------------------------------------
# The report


def _fmt(x, digits=3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def _quote(text: str) -> str:
    return "\n".join("> " + line for line in text.splitlines() or [""])


def markdown_report(report: dict, samples: int) -> str:
    s, t = report["settings"], report["summary"]
    lines = [
        f"# Story quality: {report['checkpoint']}",
        "",
        f"Step {report['step']}, tokenizer {report['tokenizer']}. {t['completions']} completions of the "
        f"beginnings in `{s['prompts']}`, seed {s['seed']}, temperature {s['temperature']}, top-k {s['top_k']}, "
        f"top-p {s['top_p']}, at most {s['max_new_tokens']} new tokens, batches of {s['batch_size']}.",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| mean length (tokens) | {_fmt(t['mean_tokens'], 1)} |",
        f"| mean length (words) | {_fmt(t['mean_words'], 1)} |",
        f"| share ending with end-of-text | {_fmt(t['eot_share'])} |",
        f"| distinct-1 / 2 / 3 | {_fmt(t['distinct_1'])} / {_fmt(t['distinct_2'])} / {_fmt(t['distinct_3'])} |",
        f"| repetition (repeated word 4-grams) | {_fmt(t['repetition_4'])} |",
    ]
    m = report["memorization"]
    lines.append("")
    if m is None:
        lines.append("Memorization: not checked (no --data given).")
    else:
        lines += [
            f"Memorization against the {m['train_tokens']:,} training tokens of `{m['data']}` "
            f"({m['n']}-gram index):",
            "",
            "| measure | value |",
            "| --- | --- |",
            f"| mean / max share of {m['n']}-grams found in training data "
            f"| {_fmt(m['mean_overlap'])} / {_fmt(m['max_overlap'])} |",
            f"| mean / max longest verbatim span (tokens) "
            f"| {_fmt(m['mean_longest_span'], 1)} / {_fmt(m['max_longest_span'])} |",
            f"| mean longest span / completion length | {_fmt(m['mean_longest_span_share'])} |",
            f"| completions found whole in training data | {m['copied']} |",
        ]
    j = report["judge"]
    lines.append("")
    if j is None:
        lines.append("Judge: not run (no --judge-url given).")
    else:
        lines += [
            f"Judge: `{j['settings']['model']}` at {j['settings']['url']}. No judge model was reachable where "
            "tinystories was built; the client was tested only against a scripted local server.",
            "",
        ]
        if j.get("error"):
            lines.append(f"The judge run stopped: {j['error']}")
        else:
            g = j["summary"]
            ages = ", ".join(f"{k}: {v}" for k, v in g["age_groups"].items() if v)
            lines += [
                "| grammar | creativity | consistency | plot | age groups | graded | ungraded |",
                "| --- | --- | --- | --- | --- | --- | --- |",
                f"| {_fmt(g['mean_grammar'], 2)} | {_fmt(g['mean_creativity'], 2)} | {_fmt(g['mean_consistency'], 2)} "
                f"| {_fmt(g['mean_plot'], 2)} | {ages or 'n/a'} | {g['graded']} | {g['ungraded']} |",
            ]
    lines += ["", "## Sample completions", "", "The beginning is in bold; the model wrote the rest.", ""]
    for c in report["completions"][:samples]:
        lines += [f"### {c['id'] + 1}", "", _quote(f"**{c['prompt']}**{c['completion']}" +
                                                   ("" if c["ended_with_eot"] else " [cut at max tokens]")), ""]
        if c.get("memorization"):
            mm, n = c["memorization"], report["memorization"]["n"]
            overlap = (f"{_fmt(mm['overlap'])} of its {n}-grams found there" if mm["overlap"] is not None
                       else f"too short for {n}-grams")
            lines += [f"Longest verbatim span in training data: {mm['longest_span']} tokens; {overlap}.", ""]
        if c.get("judge") and c["judge"].get("error") is None:
            g = c["judge"]
            lines += [f"Judge: grammar {g['grammar']}, creativity {g['creativity']}, consistency "
                      f"{g['consistency']}, plot {g['plot']}, age group {g['age_group']}. {g.get('comment') or ''}", ""]
    if m is not None and report["completions"]:
        top = max(report["completions"], key=lambda c: c["memorization"]["longest_span"])
        if top["memorization"]["longest_span"]:
            lines += ["## Longest verbatim span", "",
                      f"Completion {top['id'] + 1}, {top['memorization']['longest_span']} tokens found in the "
                      f"training data at token {top['memorization']['train_position']:,}:", "",
                      _quote(top["memorization"]["span_text"]), ""]
    return "\n".join(lines).rstrip() + "\n"


def run(args) -> int:
    from tinystories.checkpoint import load_checkpoint, read_checkpoint_config
    from tinystories.device import pick_device
    from tinystories.generate import check_sampling
    from tinystories.outputs import check_output_dir, check_output_file, write_file

    check_sampling(args.temperature, args.top_k, args.top_p)
    judge = None
    if args.judge_url:  # settings checked before any slow work
        from tinystories.judge import JudgeClient

        if not args.judge_model:
            raise UserError("--judge-url needs --judge-model (the model name the endpoint serves)")
        judge = JudgeClient(args.judge_url, args.judge_model, os.environ.get(args.judge_key_env) or None,
                            rate=args.judge_rate, retries=args.judge_retries)
    prompts = read_prompts(args.prompts)
    out = check_output_dir(args.out, "--out")  # before the generation, not after it
    for name in ("quality.json", "quality.md"):
        check_output_file(out / name, "--out")
    index = None
    if args.data is not None:  # check the data before spending time on generation
        from tinystories.data import open_split, read_meta
        from tinystories.memorization import NgramIndex
        from tinystories.tokenizer import check_same_tokenizer

        meta = read_meta(args.data)
        check_same_tokenizer(read_checkpoint_config(args.checkpoint)["tokenizer"], meta["tokenizer"],
                             f"checkpoint {args.checkpoint}", f"data {args.data}")
        train = open_split(args.data, "train")
        train_file = Path(args.data) / meta["splits"]["train"]["file"]
        index_path = Path(args.index) if args.index else train_file.with_name(f"{train_file.name}.ngram{args.ngram}.npy")
        t0 = time.perf_counter()
        index = NgramIndex.open_or_build(index_path, train, n=args.ngram, source=train_file)
        index_seconds = time.perf_counter() - t0

    device = pick_device(args.device)
    ckpt = load_checkpoint(args.checkpoint, device)
    t0 = time.perf_counter()
    completions = complete(ckpt.model, ckpt.tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                           batch_size=args.batch_size, device=device)
    generate_seconds = time.perf_counter() - t0

    memorization = None
    if index is not None:
        t0 = time.perf_counter()
        for c in completions:
            c["memorization"] = index.match(c["completion_ids"])
            span, start = c["memorization"]["longest_span"], c["memorization"]["longest_span_start"]
            c["memorization"]["span_text"] = ckpt.tokenizer.decode(c["completion_ids"][start : start + span]) if span else ""
        memorization = {
            **memorization_summary(completions, args.ngram),
            "data": str(args.data),
            "train_tokens": int(len(train)),
            "index": str(index_path),
            "index_seconds": round(index_seconds, 2),
            "match_seconds": round(time.perf_counter() - t0, 2),
        }

    report = {
        "format": "tinystories-quality",
        "checkpoint": str(ckpt.path),
        "step": ckpt.config.get("step"),
        "tokenizer": ckpt.tokenizer.name,
        "settings": {
            "prompts": args.prompts or "tinystories/prompts/beginnings.txt",
            "n_prompts": len(prompts),
            "seed": args.seed,
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            "top_k": args.top_k,
            "top_p": args.top_p,
            "batch_size": args.batch_size,
            "device": str(device),
            "prompt_prefix": "end-of-text token",
            "ngram": args.ngram if index is not None else None,
            "model": ckpt.config.get("model"),
            "tokenizer_spec": ckpt.config.get("tokenizer"),
        },
        "summary": text_metrics(completions),
        "memorization": memorization,
        "judge": None,
        "generate_seconds": round(generate_seconds, 2),
        "completions": completions,
    }

    judge_error = None
    if judge is not None:
        judge_error = _run_judge(judge, args, report)
    write_file(out / "quality.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    write_file(out / "quality.md", markdown_report(report, args.samples))

    t = report["summary"]
    print(f"{report['checkpoint']} (step {report['step']}): {t['completions']} completions, "
          f"mean {_fmt(t['mean_tokens'], 1)} tokens, {_fmt(t['eot_share'])} ended with end-of-text")
    print(f"  distinct-1/2/3 {_fmt(t['distinct_1'])}/{_fmt(t['distinct_2'])}/{_fmt(t['distinct_3'])}, "
          f"repetition {_fmt(t['repetition_4'])}")
    if memorization:
        print(f"  memorization: {_fmt(memorization['mean_overlap'])} of {args.ngram}-grams found in training data, "
              f"longest verbatim span {memorization['max_longest_span']} tokens")
    if report["judge"] and not judge_error:
        g = report["judge"]["summary"]
        print(f"  judge: grammar {_fmt(g['mean_grammar'], 2)}, creativity {_fmt(g['mean_creativity'], 2)}, "
              f"consistency {_fmt(g['mean_consistency'], 2)}, plot {_fmt(g['mean_plot'], 2)} "
              f"({g['graded']} graded, {g['ungraded']} not)")
    print(f"  wrote {out / 'quality.json'} and {out / 'quality.md'}")
    if judge_error:
        raise UserError(judge_error + f" (the report without grades is in {out})")
    return 0


def _run_judge(judge, args, report: dict) -> str | None:
    """Grade every completion into `report`; the error message if the judge run had to stop."""
    from tqdm import tqdm

    from tinystories.judge import summarize_grades

    report["judge"] = {"settings": {**judge.settings(), "api_key_env": args.judge_key_env}}
    try:
        for c in tqdm(report["completions"], desc="judge", unit="story", disable=None):
            c["judge"] = judge.grade(c["prompt"], c["completion"])
    except UserError as e:
        report["judge"]["error"] = str(e)
        return str(e)
    report["judge"]["summary"] = summarize_grades([c["judge"] for c in report["completions"]])
    report["judge"]["requests"] = judge.requests
    return None
