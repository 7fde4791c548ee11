"""Hugging Face export: transformers loads it with no code of ours and computes what our model does.

A small random model (weights scaled up so that its logits are far from uniform) is saved as our
checkpoint, exported, and loaded with `AutoModelForCausalLM` / `AutoTokenizer` (offline).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never the network

from tinystories.checkpoint import save_checkpoint  # noqa: E402
from tinystories.cli import build_parser, main  # noqa: E402
from tinystories.config import ModelConfig  # noqa: E402
from tinystories.errors import UserError  # noqa: E402
from tinystories.export import GENERATION_DEFAULTS, export_hf, hf_state_dict  # noqa: E402
from tinystories.model import GPT  # noqa: E402
from tinystories.tokenizer import load_gpt2  # noqa: E402

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-5  # fp32, max abs logit difference (measured: about 3e-6)


def random_model(vocab_size, *, n_layer=2, n_head=4, n_embd=64, block_size=64, bias=True, seed=0) -> GPT:
    """A model whose every weight is drawn at std 0.2 (LayerNorm gains around 1), 10x GPT-2's init,
    so that attention is peaked and logits spread: a wrong transpose or GELU cannot hide."""
    cfg = ModelConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                      vocab_size=vocab_size, dropout=0.1, bias=bias)
    model = GPT(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = 1.0 if ".ln_" in name and name.endswith(".weight") else 0.0
            p.copy_(gain + 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def greedy_full_context(model: GPT, prompt: list[int], max_new_tokens: int, eot_id: int) -> list[int]:
    """The plainest greedy decoder: re-run the whole context, take the argmax, stop at end-of-text."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits, _ = model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
            if ids[-1] == eot_id:
                break
    return ids


@pytest.fixture(scope="module")
def bpe_export(tmp_path_factory, bpe):
    """(our model, its tokenizer, the exported folder) for a 512-token BPE model."""
    root = tmp_path_factory.mktemp("bpe_export")
    model = random_model(bpe.vocab_size)
    save_checkpoint(root / "ckpt", model, bpe, step=7, val_loss=1.2345)
    return model, bpe, export_hf(root / "ckpt", root / "hf")


# -----------------------------------------------------------------------------
# The model


@pytest.mark.parametrize("bias", [True, False])
def test_transformers_logits_equal_ours(tmp_path, bpe, stories, bias):
    model = random_model(bpe.vocab_size, bias=bias)
    save_checkpoint(tmp_path / "ckpt", model, bpe, step=1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_hf(tmp_path / "ckpt", tmp_path / "hf")).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # re-tied on load

    real = bpe.encode(stories[0])[:64]
    idx = torch.cat([torch.tensor([real]), torch.randint(0, bpe.vocab_size, (1, 64))])  # (2, 64): full block
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    assert ours.std() > 1.0  # far from uniform, so agreement means something
    diff = (ours - theirs).abs().max().item()
    assert diff <= TOLERANCE, f"max abs logit difference {diff:.2e}"


def test_greedy_continuation_equals_ours(bpe_export, stories):
    model, bpe, hf_dir = bpe_export
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    new_tokens = []
    for story in stories[:4]:
        prompt = bpe.encode(story)[:12]
        ours = greedy_full_context(model, prompt, max_new_tokens=40, eot_id=bpe.eot_id)
        with torch.no_grad():
            theirs = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=40)[0].tolist()
        assert theirs == ours
        new_tokens.append(len(ours) - len(prompt))
    # both ways of ending were compared: running to max_new_tokens, and stopping at end-of-text
    assert max(new_tokens) == 40 and min(new_tokens) < 40, new_tokens


def test_state_dict_uses_conv1d_layout():
    model = random_model(100, n_layer=1, n_embd=32, n_head=2, block_size=16)
    hf = hf_state_dict(model)
    assert "lm_head.weight" not in hf  # tied: transformers re-ties it, as its own save_pretrained does
    assert hf["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # (in, out)
    assert torch.equal(hf["transformer.h.0.mlp.c_fc.weight"], model.transformer.h[0].mlp.c_fc.weight.t())
    assert torch.equal(hf["transformer.wte.weight"], model.transformer.wte.weight)


# -----------------------------------------------------------------------------
# Tokenizers


@pytest.fixture(scope="module")
def gpt2_export(tmp_path_factory, gpt2_dir):
    root = tmp_path_factory.mktemp("gpt2_export")
    tok = load_gpt2(gpt2_dir)
    model = random_model(tok.vocab_size, n_layer=1, n_head=2, n_embd=16, block_size=32)
    save_checkpoint(root / "ckpt", model, tok, step=3)
    return model, tok, export_hf(root / "ckpt", root / "hf")


@pytest.mark.parametrize("kind", ["gpt2", "bpe"])
def test_auto_tokenizer_encodes_like_ours(kind, request, stories):
    _, ours, hf_dir = request.getfixturevalue(f"{kind}_export")
    theirs = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert theirs.eos_token_id == theirs.bos_token_id == theirs.pad_token_id == ours.eot_id
    paragraph = stories[5]
    ids = theirs(paragraph)["input_ids"]
    assert ids == ours.encode(paragraph) and len(ids) > 100
    assert theirs.decode(ids) == paragraph
    batch = stories[:50]  # curly quotes, numbers, odd spacing: the pre-tokenizers must agree everywhere
    assert theirs(batch)["input_ids"] == ours.encode_batch(batch)
    if kind == "gpt2":
        assert theirs("Once upon a time")["input_ids"] == [7454, 2402, 257, 640]
        # the tokenizer.json we build for tools that read only that file agrees with tiktoken too
        from tokenizers import Tokenizer

        fast = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
        assert [e.ids for e in fast.encode_batch(batch)] == ours.encode_batch(batch)


# -----------------------------------------------------------------------------
# Generation config and model card


def test_generation_config_matches_our_generate_defaults(bpe_export):
    model, bpe, hf_dir = bpe_export
    gen = transformers.GenerationConfig.from_pretrained(hf_dir)
    cli = build_parser().parse_args(["generate", "--checkpoint", "x"])
    assert gen.do_sample is True
    assert gen.temperature == cli.temperature == GENERATION_DEFAULTS["temperature"]
    assert gen.top_p == cli.top_p
    assert gen.max_new_tokens == min(cli.max_new_tokens, model.config.block_size // 2)  # 32: never past the context
    assert cli.top_k is None and gen.top_k == 0  # 0 turns off transformers' default top-k of 50
    assert gen.eos_token_id == gen.pad_token_id == bpe.eot_id

    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    torch.manual_seed(0)
    prompt = bpe.encode("Once upon a time")
    out = hf.generate(torch.tensor([prompt]))  # the defaults as written: samples, stays inside block_size
    assert 1 <= out.shape[1] - len(prompt) <= 32


def test_model_card_and_config(bpe_export):
    model, bpe, hf_dir = bpe_export
    card = (hf_dir / "README.md").read_text()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert "library_name: transformers" in front and "roneneldan/TinyStories" in front and "license:" in front
    assert f"{model.num_params():,}" in body and f"{model.num_params(non_embedding=True):,}" in body
    assert "| optimizer steps | 7 |" in body and "1.2345 nats per bpe-512 token" in body
    assert "AutoModelForCausalLM.from_pretrained" in body

    config = json.loads((hf_dir / "config.json").read_text())
    assert config["activation_function"] == "gelu_new" and config["layer_norm_epsilon"] == 1e-5
    assert config["n_positions"] == config["n_ctx"] == 64 and config["tie_word_embeddings"] is True
    assert config["tinystories"]["step"] == 7
    assert sorted(p.name for p in hf_dir.iterdir()) == [
        "README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json",
    ]


# -----------------------------------------------------------------------------
# --out rules and the command line


@pytest.fixture()
def small_ckpt(tmp_path, bpe):
    model = random_model(bpe.vocab_size, n_layer=1, n_head=2, n_embd=16, block_size=16)
    return save_checkpoint(tmp_path / "ckpt", model, bpe, step=1)


def test_out_may_be_empty_or_an_earlier_export(tmp_path, small_ckpt, bpe):
    out = tmp_path / "hf"
    out.mkdir()
    export_hf(small_ckpt, out)  # an empty folder is fine
    model = random_model(bpe.vocab_size, n_layer=1, n_head=2, n_embd=16, block_size=16, seed=1)
    save_checkpoint(small_ckpt, model, bpe, step=2)
    export_hf(small_ckpt, out)  # our own earlier export is replaced
    assert json.loads((out / "config.json").read_text())["tinystories"]["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf"]  # no temporary folders left


def test_out_with_other_files_is_refused_and_untouched(tmp_path, small_ckpt):
    out = tmp_path / "hf"
    export_hf(small_ckpt, out)
    (out / ".git").mkdir()  # e.g. a clone of a Hub repository: ours to keep, not to delete
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(UserError, match="not a tinystories export"):
        export_hf(small_ckpt, out)
    assert sorted(p.name for p in out.iterdir()) == before

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a tinystories export"):
        export_hf(small_ckpt, notes)
    assert (notes / "todo.txt").read_text() == "keep me"

    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        export_hf(small_ckpt, tmp_path / "file")


def test_failed_export_keeps_the_earlier_one(tmp_path, small_ckpt, monkeypatch):
    out = tmp_path / "hf"
    export_hf(small_ckpt, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("tinystories.export.model_card", disk_full)  # fails after the weights are written
    # one line naming the folder and why (tinystories.outputs.writing), the earlier export untouched
    with pytest.raises(UserError, match=r"\(No space left on device\); the earlier export there is unchanged"):
        export_hf(small_ckpt, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf"]


def test_cli_export(tmp_path, small_ckpt, capfd):
    assert main(["export", "--checkpoint", str(small_ckpt), "--out", str(tmp_path / "hf")]) == 0
    assert "exported" in capfd.readouterr().out
    assert (tmp_path / "hf" / "model.safetensors").is_file()

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.txt").write_text("a")
    cases = [
        (["--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "x")], "does not exist"),
        (["--checkpoint", str(small_ckpt), "--out", str(tmp_path / "other")], "not a tinystories export"),
    ]
    for flags, message in cases:
        assert main(["export", *flags]) == 2
        err = capfd.readouterr().err
        assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_cli_process_missing_checkpoint_is_one_line(tmp_path):
    """The real command, in its own process: one line on stderr, exit 2, nothing written."""
    r = subprocess.run(
        [sys.executable, "-m", "tinystories", "export", "--checkpoint", str(tmp_path / "nope"),
         "--out", str(tmp_path / "hf")],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "hf").exists()
