"""Tokenizers: GPT-2 offline from the shared vocabulary, trained BPE, save/load, fingerprints."""

import pytest

from conftest import read_stories
from tinystories.errors import UserError
from tinystories.tokenizer import Tokenizer, check_same_tokenizer, get_tokenizer, load_gpt2, train_bpe


def test_gpt2_offline_encodes_once_upon_a_time(gpt2_dir):
    tok = load_gpt2(gpt2_dir)
    assert tok.encode("Once upon a time") == [7454, 2402, 257, 640]
    assert (tok.vocab_size, tok.eot_id, tok.name) == (50257, 50256, "gpt2")


def test_gpt2_from_environment_variable(monkeypatch, gpt2_dir):
    monkeypatch.setenv("TINYSTORIES_GPT2_VOCAB", str(gpt2_dir))
    assert get_tokenizer("gpt2").encode("Once upon a time") == [7454, 2402, 257, 640]


def test_gpt2_folder_with_wrong_files_is_refused(tmp_path):
    (tmp_path / "encoder.json").write_text("{}")
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\n")
    with pytest.raises(UserError, match="sha256"):
        load_gpt2(tmp_path)


def test_gpt2_round_trip_and_save_load(tmp_path, gpt2_dir, v1_train_head):
    tok = load_gpt2(gpt2_dir)
    story = read_stories(v1_train_head, 3)[2]
    assert tok.decode(tok.encode(story)) == story
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.encode(story) == tok.encode(story)
    assert again.spec() == tok.spec()


def test_bpe_train_save_load(tmp_path, v1_train_head):
    stories = read_stories(v1_train_head, 300)
    tok = train_bpe(stories, vocab_size=512, show_progress=False)
    assert tok.vocab_size == 512 and tok.name == "bpe-512"
    assert tok.decode([tok.eot_id]) == "<|endoftext|>"
    for story in stories[:20]:
        assert tok.decode(tok.encode(story)) == story
    # byte-level: text it never saw still round-trips
    assert tok.decode(tok.encode("Zoë's café — 你好")) == "Zoë's café — 你好"
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.encode_batch(stories[:5]) == [tok.encode(s) for s in stories[:5]]
    # the same text and size train the same tokenizer, byte for byte
    assert train_bpe(stories, vocab_size=512, show_progress=False).files() == tok.files()


def test_mixing_tokenizers_is_refused(gpt2_dir, v1_train_head):
    gpt2 = load_gpt2(gpt2_dir).spec()
    bpe = train_bpe(read_stories(v1_train_head, 100), vocab_size=300, show_progress=False).spec()
    check_same_tokenizer(gpt2, dict(gpt2), "checkpoint", "data")
    with pytest.raises(UserError, match="bpe-300"):
        check_same_tokenizer(gpt2, bpe, "the checkpoint", "the data")


def test_unknown_tokenizer_name():
    with pytest.raises(UserError, match="unknown tokenizer"):
        get_tokenizer("sentencepiece")


def test_empty_folder_has_no_tokenizer(tmp_path):
    with pytest.raises(UserError, match="no tokenizer files"):
        Tokenizer.load(tmp_path)
