"""`tinystories quality`: the story-quality report, the measures Eldan & Li (2023) judged stories by.

    tinystories quality --checkpoint runs/tiny --data data/ts --out reports/tiny
    tinystories quality --checkpoint runs/tiny --out reports/paper --prompts paper   # the paper's 44
    tinystories quality --checkpoint runs/tiny --data data/ts --out reports/tiny \\
        --judge-url http://localhost:8000/v1 --judge-model NAME     # key from $OPENAI_API_KEY

The model completes a fixed set of story beginnings with a fixed seed, each behind an end-of-text
token as a story starts in training. `--prompts` picks the set:
    packaged     tinystories/prompts/beginnings.txt (the default): 60 written for this project in the
                 paper's style, one completion each
    paper        the paper's own 44 beginnings, `Evaluation prompts.yaml` of the dataset repo
                 roneneldan/TinyStories on the hub, downloaded once into the cache as `prepare --source
                 hf` does ($HF_ENDPOINT for a mirror; unreachable or $HF_HUB_OFFLINE: one line, exit 2)
    FILE.yaml    a local copy of that file (a YAML list of strings), e.g. the reconstruction in
                 ../shared/data/tinystories/; it counts as the paper's set
    FILE         any other file: one beginning per line, '#' lines are comments
With the paper's set, the settings not given on the command line follow the paper's protocol (see
PAPER_PROTOCOL); quality.json records the set, its sha256, the protocol and what overrode it.
Per completion and over all of them:
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

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from tinystories.errors import UserError

# -----------------------------------------------------------------------------
# The fixed beginnings, and the settings that go with them

PACKAGED_PROMPTS = "tinystories/prompts/beginnings.txt"
PAPER_PROMPTS_FILE = "Evaluation prompts.yaml"  # in the hub's dataset repo roneneldan/TinyStories

# Eldan & Li (2023), section 3 ("GPT-Eval"): each story beginning is completed 10 times by the model
# at temperature 1, GPT-4 grades every completion, and the grades are averaged. That is the
# paper's text as recalled (its PDF could not be read where this was written); the third-party
# transcription that the shared copy of the prompts comes from (Verace-Pvt-Ltd/Verace-V1,
# verace_v1/eval/tinystories_gpt4_eval.py) states the same two numbers. Assumed, as the paper names
# none of them: no top-k or top-p (top-p 1 keeps every token, so plain sampling at temperature 1),
# and this command's default length of 300 new tokens (longer than most TinyStories stories). A
# reply by Eldan quoted on the web, "we used temp=0, beams=5", is about generation in some other
# context not known here; it is not followed. The paper's text is recalled as speaking of 50
# prompts; the hub file holds 44.
PAPER_PROTOCOL = {"completions_per_prompt": 10, "temperature": 1.0, "top_p": 1.0}
# Any other set: one completion each, at the sampling defaults of `tinystories generate`.
DEFAULT_PROTOCOL = {"completions_per_prompt": 1, "temperature": 0.8, "top_p": 0.95}


@dataclass(frozen=True)
class PromptSet:
    name: str  # "packaged", "paper" (the hub file or a local copy of it) or "file"
    source: str  # where it was read: the package path, the URL downloaded, or the file
    sha256: str  # of the file's bytes, to compare a local copy with the hub's
    prompts: list[str]

    @property
    def protocol(self) -> dict:
        return PAPER_PROTOCOL if self.name == "paper" else DEFAULT_PROTOCOL


def load_prompt_set(spec: str | None, cache: Path) -> PromptSet:
    """`--prompts`: "packaged" (or None), "paper" (the hub's file, cached), FILE.yaml or FILE."""
    if spec in (None, "packaged"):
        data = resources.files("tinystories").joinpath("prompts/beginnings.txt").read_bytes()
        prompts = _parse_lines(data.decode("utf-8"), PACKAGED_PROMPTS)
        return PromptSet("packaged", PACKAGED_PROMPTS, _sha256(data), prompts)
    if spec == "paper":
        from tinystories.download import HF_REPO, fetch_hf_file

        hint = (f"fetch '{PAPER_PROMPTS_FILE}' from https://huggingface.co/datasets/{HF_REPO} elsewhere and pass "
                "its path to --prompts (or set HF_ENDPOINT to a reachable mirror)")
        got = fetch_hf_file(PAPER_PROMPTS_FILE, cache, offline_hint=hint)
        return PromptSet("paper", got.url, got.sha256, read_paper_prompts(got.path))
    path = Path(spec)
    if path.suffix.lower() in (".yaml", ".yml"):
        return PromptSet("paper", str(path), _sha256(_read_bytes(path)), read_paper_prompts(path))
    return PromptSet("file", str(path), _sha256(_read_bytes(path)), read_prompts(path))


def read_prompts(path=None) -> list[str]:
    """The story beginnings: one per line, '#' lines are comments. Default: the packaged set."""
    if path is None:
        text = resources.files("tinystories").joinpath("prompts/beginnings.txt").read_text(encoding="utf-8")
    else:
        text = _read_text(path)
    return _parse_lines(text, path)


def read_paper_prompts(path) -> list[str]:
    """The beginnings of a file shaped like the hub's `Evaluation prompts.yaml`: a YAML list of strings.

    Kept exactly as written (not stripped): the paper's models completed these very strings, one of
    which ends in a space, and their spelling ("vey busy") is the paper's too.
    """
    import yaml

    try:
        data = yaml.safe_load(_read_text(path))
    except yaml.YAMLError as e:
        mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None) or str(e)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"prompt file {path} is not valid YAML{where}: {' '.join(problem.split())}") from None
    expected = "expected a YAML list of story beginnings (strings), the shape of the paper's file"
    if data is None or data == []:
        raise UserError(f"prompt file {path} holds no story beginnings; {expected}")
    if not isinstance(data, list):
        raise UserError(f"prompt file {path} holds a YAML {_yaml_kind(data)}; {expected}")
    for i, prompt in enumerate(data, 1):
        if not isinstance(prompt, str):
            raise UserError(f"prompt file {path}: item {i} is a YAML {_yaml_kind(prompt)}; {expected}")
        if not prompt.strip():
            raise UserError(f"prompt file {path}: item {i} is empty; {expected}")
    _check_count(data, path)
    return data


def _yaml_kind(value) -> str:
    kinds = {dict: "mapping", list: "list", str: "string", type(None): "null", bool: "boolean", int: "number",
             float: "number"}
    return kinds.get(type(value), type(value).__name__)  # e.g. a date, which YAML reads from 2023-05-12


def _parse_lines(text: str, path) -> list[str]:
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise UserError(f"prompt file {path} holds no story beginnings (one per line)")
    _check_count(prompts, path)
    return prompts


def _check_count(prompts: list, path) -> None:
    if len(prompts) > MAX_PROMPTS:
        raise UserError(f"prompt file {path} holds {len(prompts):,} beginnings; a prompt set is at most "
                        f"{MAX_PROMPTS:,} (each is completed, and scored, one by one)")


# A prompt set is dozens of beginnings (the paper's has 44), each completed several times: a file
# past these limits is a mistake (the wrong file), and would take days to complete.
MAX_PROMPT_FILE_BYTES = 4 << 20
MAX_PROMPTS = 10_000


def _read_bytes(path) -> bytes:
    try:
        size = Path(path).stat().st_size
        if size > MAX_PROMPT_FILE_BYTES and Path(path).is_file():
            raise UserError(f"prompt file {path} is {size / 2**20:.1f} MiB; a prompt set is at most "
                            f"{MAX_PROMPT_FILE_BYTES >> 20} MiB and {MAX_PROMPTS:,} beginnings (is it the right file?)")
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"prompt file {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"prompt file {path} is a folder, not a file") from None


def _read_text(path) -> str:
    try:
        return _read_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"prompt file {path} is not UTF-8 text") from None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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
             seed: int, batch_size: int, device, completions_per_prompt: int = 1, dtype=None) -> list[dict]:
    """`completions_per_prompt` completions of each beginning (its copies side by side), reproducible
    from `seed` (and the batch size). dtype: the decoding weights (see `tinystories.generate.stream`)."""
    import torch
    from tqdm import tqdm

    from tinystories.generate import generate

    eot = tokenizer.eot_id
    generator = torch.Generator(device=device).manual_seed(seed)
    jobs = [(prompt_id, sample, prompt) for prompt_id, prompt in enumerate(prompts)
            for sample in range(completions_per_prompt)]
    records = []
    for i in tqdm(range(0, len(jobs), batch_size), desc="completions", unit="batch", disable=None):
        batch = jobs[i : i + batch_size]
        ids = [[eot] + tokenizer.encode(prompt) for _, _, prompt in batch]  # a story starts after end-of-text
        with torch.inference_mode():  # no autograd graph: it would keep every step's activations alive
            new = generate(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           eot_id=eot, generator=generator, dtype=dtype)
        for j, ((prompt_id, sample, prompt), tokens) in enumerate(zip(batch, new)):
            ended = bool(tokens) and tokens[-1] == eot
            body = tokens[:-1] if ended else tokens
            text = tokenizer.decode(body)
            records.append({
                "id": i + j,
                "prompt_id": prompt_id,
                "sample": sample,
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
        f"Step {report['step']}, tokenizer {report['tokenizer']}. {t['completions']} completions "
        f"({s['completions_per_prompt']} of each) of the {s['n_prompts']} beginnings of the {s['prompt_set']} "
        f"set (`{s['prompts']}`), seed {s['seed']}, temperature {s['temperature']}, top-k {s['top_k']}, "
        f"top-p {s['top_p']}, at most {s['max_new_tokens']} new tokens, batches of {s['batch_size']}. Settings "
        f"not given followed the {s['protocol']} protocol"
        + (f"; given otherwise: {', '.join(s['protocol_overrides'])}." if s["protocol_overrides"] else "."),
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
    firsts = [c for c in report["completions"] if c.get("sample", 0) == 0]  # one per beginning, not 10 of one
    for c in firsts[:samples]:
        lines += [f"### {c.get('prompt_id', c['id']) + 1}", "", _quote(f"**{c['prompt']}**{c['completion']}" +
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
    from tinystories.decoding import decode_dtype
    from tinystories.device import pick_device
    from tinystories.generate import check_sampling
    from tinystories.outputs import check_output_dir, check_output_file, write_file

    from tinystories.download import cache_dir

    prompt_set = load_prompt_set(args.prompts, cache_dir(args.cache_dir))
    # Settings left unset on the command line (None) take the prompt set's protocol.
    protocol = prompt_set.protocol
    given = {k: getattr(args, k) for k in protocol if getattr(args, k) is not None}
    sampling = {**protocol, **given}
    overrides = sorted(k for k, v in given.items() if v != protocol[k])
    check_sampling(sampling["temperature"], args.top_k, sampling["top_p"])
    judge = None
    if args.judge_url:  # settings checked before any slow work
        from tinystories.judge import JudgeClient

        if not args.judge_model:
            raise UserError("--judge-url needs --judge-model (the model name the endpoint serves)")
        judge = JudgeClient(args.judge_url, args.judge_model, os.environ.get(args.judge_key_env) or None,
                            rate=args.judge_rate, retries=args.judge_retries)
    device = pick_device(args.device)
    dtype_name = args.dtype
    dtype = decode_dtype(device, dtype_name)
    prompts = prompt_set.prompts
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

    ckpt = load_checkpoint(args.checkpoint, device)
    t0 = time.perf_counter()
    completions = complete(ckpt.model, ckpt.tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                           temperature=sampling["temperature"], top_k=args.top_k, top_p=sampling["top_p"],
                           seed=args.seed, batch_size=args.batch_size, device=device,
                           completions_per_prompt=sampling["completions_per_prompt"], dtype=dtype)
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
            "prompt_set": prompt_set.name,
            "prompts": prompt_set.source,
            "prompts_sha256": prompt_set.sha256,
            "n_prompts": len(prompts),
            "completions_per_prompt": sampling["completions_per_prompt"],
            "protocol": "paper" if prompt_set.name == "paper" else "default",
            "protocol_overrides": overrides,  # settings given on the command line that differ from the protocol
            "seed": args.seed,
            "max_new_tokens": args.max_new_tokens,
            "temperature": sampling["temperature"],
            "top_k": args.top_k,
            "top_p": sampling["top_p"],
            "batch_size": args.batch_size,
            "device": str(device),
            "decode_dtype": dtype_name,
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
    print(f"{report['checkpoint']} (step {report['step']}): {t['completions']} completions of the "
          f"{prompt_set.name} prompts ({len(prompts)} beginnings), "
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
