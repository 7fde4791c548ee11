"""Grading completions with a judge model behind an OpenAI-compatible chat endpoint (optional).

    judge = JudgeClient("http://localhost:8000/v1", "some-model", api_key=os.environ.get("OPENAI_API_KEY"))
    judge.grade(beginning, completion)
    -> {"grammar": 8, "creativity": 6, "consistency": 7, "plot": 7, "age_group": "B", "comment": "...",
        "attempts": 1, "error": None}

The rubric is the paper's (Eldan & Li 2023, section 3, "GPT-Eval"), in our own words: the judge
reads the beginning and the student's part, separated by ***, comments on it, grades grammar,
creativity, consistency with the beginning and plot from 1 to 10, and guesses the writer's age
group, A (3 or under) to F (13-16). We ask for one JSON object.

No judge model was reachable where tinystories was built (no network but package registries), so
this client has been run only against the scripted local HTTP server of tests/test_quality.py,
which answers with good, malformed, throttled (429) and failing (500) replies. Grades from a real
model have not been seen here.

Robustness:
  - at most `rate` requests per second (spaced evenly; a shared limit across all completions);
  - 408, 409, 429, 5xx, timeouts and dropped connections are retried with exponential backoff
    (honouring a Retry-After in seconds, up to max_backoff); a reply that cannot be read as grades (prose, bad JSON, a grade out of range) is
    asked again; after `retries` retries the completion is recorded as ungraded, with the reason;
  - 400/401/403/404 (a wrong URL, key or model name) and an endpoint that cannot be reached at all
    stop the run with one line, since every other request would fail the same way.
"""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.error
import urllib.request

from tinystories.errors import UserError

CATEGORIES = ("grammar", "creativity", "consistency", "plot")
AGE_GROUPS = {"A": "3 or under", "B": "4-5", "C": "6-7", "D": "8-9", "E": "10-12", "F": "13-16"}

SYSTEM_PROMPT = "You are a teacher who grades short stories written by students. You answer in JSON."

USER_PROMPT = """\
In this exercise a student was given the beginning of a story and asked to finish it. The exercise \
tests the student's language skills and creativity. The symbol *** separates the given beginning \
from the part the student wrote:

{beginning}***{completion}

Assess only the part after ***. Is it grammatical? Does it fit the beginning: the same characters, \
places and facts? Pay special attention to whether the student finishes the sentence that *** cuts \
in the middle. Does the plot make sense?

Then grade the student's part from 1 (worst) to 10 (best) for grammar, creativity, consistency with \
the beginning, and plot, and guess the student's age from the writing, choosing one group: \
A: 3 or under, B: 4-5, C: 6-7, D: 8-9, E: 10-12, F: 13-16.

Reply with one JSON object and nothing else, in this form:
{{"comment": "<your assessment in one or two sentences>", "grammar": <1-10>, "creativity": <1-10>, \
"consistency": <1-10>, "plot": <1-10>, "age_group": "<A-F>"}}
"""


# -----------------------------------------------------------------------------
# Reading a reply


def parse_grades(text: str) -> dict:
    """Grades from the judge's reply; ValueError when they are missing or out of range.

    Accepts the JSON object we ask for, also inside a ``` fence or surrounded by prose, with
    grades as numbers or strings like "8/10"; failing JSON, lines like "Grammar: 8" and
    "Age group: B".
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty reply")
    found: dict = {}
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        try:
            obj = json.loads(text[start : end + 1])
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            found = {str(k).lower().replace(" ", "_"): v for k, v in obj.items()}
    if not found:  # prose: "Grammar: 8/10", "Age group: B"
        for key in CATEGORIES:
            m = re.search(rf"\b{key}\b\W{{0,5}}(\d+(?:\.\d+)?)", text, re.IGNORECASE)
            if m:
                found[key] = m.group(1)
        m = re.search(r"\bage[ _]?group\b\W{0,5}([A-F])\b", text, re.IGNORECASE)
        if m:
            found["age_group"] = m.group(1)

    grades: dict = {}
    for key in CATEGORIES:
        value = found.get(key)
        if isinstance(value, str):
            m = re.match(r"\s*(\d+(?:\.\d+)?)", value)
            value = float(m.group(1)) if m else None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"no {key} grade")
        if not 1 <= value <= 10:
            raise ValueError(f"{key} grade {value} is not in 1-10")
        grades[key] = int(value) if float(value).is_integer() else float(value)
    age = found.get("age_group", found.get("age"))
    letter = re.match(r"\s*([A-Fa-f])\b", age) if isinstance(age, str) else None
    if not letter:
        raise ValueError(f"no age group A-F (got {age!r})")
    grades["age_group"] = letter.group(1).upper()
    comment = found.get("comment")
    grades["comment"] = comment if isinstance(comment, str) else None
    return grades


# -----------------------------------------------------------------------------
# The client


class _Retry(Exception):
    """A failed attempt worth repeating (after `wait` seconds, if the server said so)."""

    def __init__(self, reason: str, wait: float | None = None):
        super().__init__(reason)
        self.wait = wait


class JudgeClient:
    """Grades (beginning, completion) pairs through POST {url}/chat/completions."""

    def __init__(self, url: str, model: str, api_key: str | None = None, *, rate: float | None = 1.0,
                 retries: int = 4, backoff: float = 1.0, max_backoff: float = 60.0, timeout: float = 120.0,
                 max_tokens: int = 300):
        if not url.startswith(("http://", "https://")):
            raise UserError(f"--judge-url must start with http:// or https://, got {url!r}")
        if rate is not None and rate < 0 or retries < 0:
            raise UserError(f"--judge-rate must be >= 0 (0 = no limit) and --judge-retries >= 0, got {rate} and {retries}")
        url = url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model, self.api_key = model, api_key
        self.rate, self.retries, self.backoff, self.max_backoff = rate, retries, backoff, max_backoff
        self.timeout, self.max_tokens = timeout, max_tokens
        self.requests = 0  # sent, retries included
        self._next_slot = 0.0  # monotonic time before which no request may start

    def settings(self) -> dict:
        return {"url": self.url, "model": self.model, "rate_per_second": self.rate, "retries": self.retries,
                "temperature": 0, "max_tokens": self.max_tokens, "api_key_given": self.api_key is not None}

    def _wait_for_slot(self) -> None:
        if not self.rate:
            return
        now = time.monotonic()
        if now < self._next_slot:
            time.sleep(self._next_slot - now)
        self._next_slot = max(now, self._next_slot) + 1.0 / self.rate

    def _post(self, messages: list[dict]) -> str:
        """The reply text of one chat request; _Retry for what may pass, UserError for what will not."""
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0,
                           "max_tokens": self.max_tokens}).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        self._wait_for_slot()
        self.requests += 1
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            detail = e.read(300).decode("utf-8", "replace").strip().replace("\n", " ")
            if e.code in (408, 409, 429) or e.code >= 500:  # timeout, conflict, throttled, server trouble
                retry_after = (e.headers.get("Retry-After") or "").strip() if e.headers else ""
                wait = float(retry_after) if retry_after.replace(".", "", 1).isdigit() else None  # seconds, not a date
                raise _Retry(f"HTTP {e.code}", None if wait is None else min(wait, self.max_backoff)) from None
            what = {401: "the API key was refused", 403: "access denied", 404: "no such endpoint or model"}
            raise UserError(f"the judge at {self.url} answered HTTP {e.code} ({what.get(e.code, detail[:120])}); "
                            "check --judge-url, --judge-model and the API key") from None
        except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as e:
            reason = getattr(e, "reason", e)
            raise _Retry(f"no answer ({reason})") from None
        try:
            return json.loads(raw)["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError):
            raise _Retry("the reply is not an OpenAI-style chat completion") from None

    def grade(self, beginning: str, completion: str) -> dict:
        """Grades of one completion, or {"error": reason} fields set after `retries` retries."""
        messages = [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": USER_PROMPT.format(beginning=beginning, completion=completion)}]
        reasons = []
        unreachable = True  # every attempt so far failed to get any HTTP answer
        wait = 0.0  # before a retry: what the server asked for, else exponential backoff
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(wait)
            try:
                reply = self._post(messages)
                unreachable = False
                grades = parse_grades(reply)
                return {**grades, "attempts": attempt + 1, "error": None}
            except _Retry as e:
                unreachable = unreachable and str(e).startswith("no answer")
                reasons.append(str(e))
                wait = e.wait if e.wait is not None else min(self.max_backoff, self.backoff * 2**attempt)
            except ValueError as e:  # a reply, but not grades: ask again
                reasons.append(f"malformed reply ({e})")
                wait = 0.0
        if unreachable:
            raise UserError(f"the judge at {self.url} cannot be reached ({reasons[-1]}); check --judge-url")
        return {**{k: None for k in (*CATEGORIES, "age_group", "comment")}, "attempts": self.retries + 1,
                "error": "; ".join(reasons[-3:])}


def summarize_grades(results: list[dict]) -> dict:
    """Mean grade per category over the graded completions, and the age groups counted."""
    graded = [r for r in results if r and r.get("error") is None]
    out = {"graded": len(graded), "ungraded": len(results) - len(graded)}
    for key in CATEGORIES:
        out[f"mean_{key}"] = sum(r[key] for r in graded) / len(graded) if graded else None
    out["age_groups"] = {g: sum(r["age_group"] == g for r in graded) for g in AGE_GROUPS}
    return out
