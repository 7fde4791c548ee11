"""Shared test fixtures: where the shared TinyStories text and GPT-2 vocabulary live.

The data is read from ../shared/data beside the repository (never copied into it).
"""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
GPT2_DIR = SHARED_DATA / "gpt2"
TINYSTORIES_DIR = SHARED_DATA / "tinystories"

# Every test (and every subprocess a test starts) loads GPT-2 offline from the shared folder.
os.environ.setdefault("TINYSTORIES_GPT2_VOCAB", str(GPT2_DIR))
# One intra-op thread per process: the test models are tiny, and on a 2-core machine shared with
# subprocesses (servers, torchrun ranks) OpenMP threads that spin-wait made steps up to 40x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module of tiny models (`pytestmark =
    pytest.mark.usefixtures("one_thread")`): one thread is fastest for them, and on a busy 2-core
    machine two were up to 40x slower (threads waiting on each other at every small op)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not TINYSTORIES_DIR.is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA}: clone the project beside ../shared")
    return SHARED_DATA


@pytest.fixture(scope="session")
def gpt2_dir(shared_data) -> Path:
    return GPT2_DIR


@pytest.fixture(scope="session")
def v1_train_head(shared_data) -> Path:
    return TINYSTORIES_DIR / "TinyStories-train.head.txt"


def read_stories(path, limit=None):
    """Stories of an official-format file, stripped, empties dropped (the PROVENANCE recipe)."""
    text = Path(path).read_text(encoding="utf-8")
    stories = [s.strip() for s in text.split("<|endoftext|>")]
    stories = [s for s in stories if s]
    return stories[:limit] if limit else stories


def run_cli(*args, check=False, timeout=600, **kw):
    """Run `python -m tinystories ARGS` in a subprocess; returns the CompletedProcess."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "tinystories", *map(str, args)],
                            capture_output=True, text=True, timeout=timeout, **kw)
    if check and result.returncode != 0:
        raise AssertionError(f"tinystories {' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def stories(v1_train_head) -> list[str]:
    """300 real stories: enough to train a small BPE on."""
    return read_stories(v1_train_head, 300)


@pytest.fixture(scope="session")
def bpe(stories):
    """A 512-token BPE of those stories: a small output layer keeps model tests fast."""
    from tinystories.tokenizer import train_bpe

    return train_bpe(stories, vocab_size=512, show_progress=False)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory, v1_train_head) -> Path:
    """A DATA_DIR of 600 real stories with a 512-token BPE (made by the real `prepare`)."""
    out = tmp_path_factory.mktemp("data") / "small"
    run_cli("prepare", "--source", v1_train_head, "--tokenizer", "bpe-512", "--max-stories", 600,
            "--out", out, check=True)
    return out
