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
