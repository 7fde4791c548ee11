"""GPT-Neo (the paper's released TinyStories models): import, parity, export, presets, fine-tuning.

Parity is proven against randomly initialised transformers models (no download): each family
layout, a local window (8) much shorter than the text (48+ tokens) so that local attention
matters, weights drawn 10x larger than GPT-2's init so that logits are far from uniform.
"""

import dataclasses
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never the network

from conftest import run_cli  # noqa: E402
from tinystories.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from tinystories.cli import build_parser, main  # noqa: E402
from tinystories.config import PRESETS, ModelConfig  # noqa: E402
from tinystories.errors import UserError  # noqa: E402
from tinystories.export import attention_types, export_hf, tokenizer_files  # noqa: E402
from tinystories.generate import generate  # noqa: E402
from tinystories.hf_import import expand_attention_types, import_hf  # noqa: E402
from tinystories.model import GPT  # noqa: E402
from tinystories.tokenizer import load_gpt2, train_bpe  # noqa: E402

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

TOLERANCE = 1e-5  # fp32, max abs logit difference (measured: about 4e-6)
WINDOW = 8

# The released family's layer patterns (attention_types as in their config.json files).
LAYOUTS = {
    "8 layers (1M-28M)": [[["global", "local"], 4]],
    "4 layers (33M)": [[["global", "local"], 2]],
    "2 layers (2Layers-33M)": [[["global", "local"], 1]],
    "1 layer (1Layer-21M)": [[["global"], 1]],
    "1 local layer": [[["local"], 1]],  # the band mask alone decides every logit
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def scale_up(model, seed=0):
    """Every weight drawn at std 0.2 (LayerNorm gains around 1): peaked attention, spread logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = 1.0 if ("ln_" in name) and name.endswith(".weight") else 0.0
            p.copy_(gain + 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def random_neo(types, *, vocab_size=50257, width=32, heads=4, positions=64, scaled=True, seed=0):
    n_layer = len(expand_attention_types(types))
    cfg = transformers.GPTNeoConfig(
        vocab_size=vocab_size, max_position_embeddings=positions, hidden_size=width, num_layers=n_layer, num_heads=heads,
        attention_types=types, window_size=WINDOW, resid_dropout=0.0, embed_dropout=0.0, attention_dropout=0.0,
    )
    torch.manual_seed(seed)
    model = transformers.GPTNeoForCausalLM(cfg).eval()
    return scale_up(model, seed) if scaled else model


@pytest.fixture(scope="module")
def gpt2():
    return load_gpt2()  # conftest points TINYSTORIES_GPT2_VOCAB at the shared folder


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory, gpt2):
    """GPT-2's tokenizer as transformers itself saves it (tokenizer.json with pair merges)."""
    src, out = tmp_path_factory.mktemp("tok_src"), tmp_path_factory.mktemp("tok_hf")
    for name, data in tokenizer_files(gpt2, 64).items():
        (src / name).write_bytes(data)
    transformers.AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def save_hf(model, folder, tokenizer_dir):
    model.save_pretrained(folder)
    for p in tokenizer_dir.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    return folder


@pytest.fixture(scope="module")
def bpe_tokenizer_dir(tmp_path_factory, stories):
    """A 512-token BPE (tokenizer.json): parity runs many greedy steps, and a 50,257-token output
    layer would make each one slow on CPU for no extra coverage (gpt2 is checked elsewhere)."""
    bpe = train_bpe(stories, vocab_size=512, show_progress=False)
    out = tmp_path_factory.mktemp("tok_bpe")
    for name, data in tokenizer_files(bpe, 64).items():
        (out / name).write_bytes(data)
    return bpe, out


def text_batch(tok, stories, T=48):
    """(2, T) ids: a real story, and random tokens."""
    real = tok.encode(" ".join(stories[:3]))[:T]
    noise = torch.randint(0, tok.vocab_size, (1, T), generator=torch.Generator().manual_seed(1))
    return torch.cat([torch.tensor([real]), noise])


# -----------------------------------------------------------------------------
# Parity with transformers, for every layout of the family


@pytest.mark.parametrize("types", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_imported_model_equals_transformers(tmp_path, types, bpe_tokenizer_dir, stories):
    tok, tok_dir = bpe_tokenizer_dir
    hf = random_neo(types, vocab_size=tok.vocab_size)
    import_hf(save_hf(hf, tmp_path / "hf", tok_dir), tmp_path / "ckpt")
    ckpt = load_checkpoint(tmp_path / "ckpt")
    model, cfg = ckpt.model, ckpt.model_config
    assert cfg.attention_layers == expand_attention_types(types) and cfg.window_size == WINDOW
    assert cfg.scale_attention is False and cfg.qkv_bias is False and cfg.block_size == 64
    assert ckpt.tokenizer.spec() == tok.spec()

    idx = text_batch(tok, stories)  # 48 tokens: six windows long
    with torch.no_grad():
        ours, theirs = model(idx)[0], hf(idx).logits
    assert ours.std() > 1.0  # far from uniform, so agreement means something
    diff = (ours - theirs).abs().max().item()
    assert diff <= TOLERANCE, f"max abs logit difference {diff:.2e}"
    if "local" in cfg.attention_layers:  # the window matters: all-global attention would be far off
        everywhere = GPT(dataclasses.replace(cfg, attention_layers=None))
        everywhere.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert (everywhere(idx)[0] - theirs).abs().max() > 0.1

    # greedy continuation: ours with and without the KV cache, and transformers' generate
    for story in stories[:2]:
        prompt = tok.encode(story)[:12]
        with torch.no_grad():
            full = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=40, eos_token_id=tok.eot_id,
                               pad_token_id=tok.eot_id)[0, len(prompt):].tolist()
        assert len(full) > WINDOW
        for use_cache in (True, False):
            [new] = generate(model, [prompt], 40, temperature=0, eot_id=tok.eot_id, use_cache=use_cache)
            assert new == full, f"use_cache={use_cache}"


def test_local_window_boundary():
    """A local query sees exactly the last window_size keys, itself included (HF GPT-Neo's mask)."""
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=50, dropout=0.0,
                      attention_layers=["local"], window_size=4, scale_attention=False, qkv_bias=False)
    model = scale_up(GPT(cfg))
    idx = torch.randint(0, 50, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(idx)[0][0, 15]
        for j, seen in ((11, False), (12, True)):  # 15 - 4 = 11 is out of the window, 12 is its oldest key
            changed = idx.clone()
            changed[0, j] = (idx[0, j] + 1) % 50
            moved = (model(changed)[0][0, 15] - base).abs().max().item()
            assert (moved > 1e-3) == seen, (j, moved)


def test_batched_cached_generation_keeps_the_window(gpt2, stories):
    """Left-padded batch with a KV cache (key_mask, cache indices) equals the no-cache oracle per row."""
    cfg = ModelConfig(n_layer=4, n_head=4, n_embd=32, block_size=64, vocab_size=50257, dropout=0.0,
                      attention_layers=["global", "local"] * 2, window_size=WINDOW, scale_attention=False,
                      qkv_bias=False)
    model = scale_up(GPT(cfg))
    prompts = [gpt2.encode(s)[:n] for s, n in zip(stories, (3, 11, 20))]
    cached = generate(model, prompts, 30, temperature=0)
    assert cached == generate(model, prompts, 30, temperature=0, use_cache=False)
    assert all(len(row) == 30 for row in cached)


# -----------------------------------------------------------------------------
# Export back to GPT-Neo, and GPT-2 both ways


@pytest.mark.parametrize("types", [LAYOUTS["8 layers (1M-28M)"], LAYOUTS["1 layer (1Layer-21M)"]], ids=["8", "1"])
def test_neo_to_ours_to_neo_gives_identical_tensors(tmp_path, types, hf_tokenizer_dir, gpt2, stories):
    hf = random_neo(types)
    import_hf(save_hf(hf, tmp_path / "hf", hf_tokenizer_dir), tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", tmp_path / "back")
    before, after = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert before.keys() == after.keys() and len(before) == 4 + 13 * len(expand_attention_types(types))
    for k in before:
        assert torch.equal(before[k], after[k]), k

    config = json.loads((tmp_path / "back" / "config.json").read_text())
    for key in ("model_type", "hidden_size", "num_layers", "num_heads", "window_size", "max_position_embeddings",
                "attention_types", "vocab_size"):
        assert config[key] == hf.config.to_dict()[key], key
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(again).__name__ == "GPTNeoForCausalLM"
    idx = text_batch(gpt2, stories)
    with torch.no_grad():
        assert torch.equal(again(idx).logits, hf(idx).logits)
    card = (tmp_path / "back" / "README.md").read_text()
    assert "GPTNeoForCausalLM" in card and "Imported from" in card


def test_scaled_local_model_exports_as_neo_with_the_scale_folded_in(tmp_path, gpt2, stories):
    """Local layers with GPT-2's 1/sqrt(head_dim): GPT-Neo cannot scale, so q_proj carries it."""
    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=64, vocab_size=50257, dropout=0.0,
                      attention_layers=["global", "local"], window_size=WINDOW, qkv_bias=False)
    model = scale_up(GPT(cfg))
    save_checkpoint(tmp_path / "ckpt", model, gpt2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_hf(tmp_path / "ckpt", tmp_path / "hf")).eval()
    idx = text_batch(gpt2, stories)
    with torch.no_grad():
        assert (model(idx)[0] - hf(idx).logits).abs().max() <= TOLERANCE

    with_bias = GPT(dataclasses.replace(cfg, qkv_bias=True))
    save_checkpoint(tmp_path / "biased", with_bias, gpt2)
    with pytest.raises(UserError, match="no q/k/v biases"):
        export_hf(tmp_path / "biased", tmp_path / "hf2")


def test_gpt2_round_trip(tmp_path, hf_tokenizer_dir, gpt2, stories):
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    hf = scale_up(transformers.GPT2LMHeadModel(cfg))
    import_hf(save_hf(hf, tmp_path / "hf", hf_tokenizer_dir), tmp_path / "ckpt")
    model = load_checkpoint(tmp_path / "ckpt").model
    assert model.config.attention_layers is None and model.config.scale_attention is True
    idx = text_batch(gpt2, stories)
    with torch.no_grad():
        assert (model(idx)[0] - hf(idx).logits).abs().max() <= TOLERANCE

    export_hf(tmp_path / "ckpt", tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == "gpt2"
    before, after = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_our_bpe_export_imports_back(tmp_path, stories):
    """A model with our own trained BPE: export, import, and the same tokenizer and weights come back."""
    bpe = train_bpe(stories, vocab_size=300, show_progress=False)
    model = scale_up(GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=300)))
    save_checkpoint(tmp_path / "ckpt", model, bpe)
    import_hf(export_hf(tmp_path / "ckpt", tmp_path / "hf"), tmp_path / "back")
    back = load_checkpoint(tmp_path / "back")
    assert back.tokenizer.spec()["fingerprint"] == bpe.spec()["fingerprint"]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.model.state_dict().values()))


class NotATensor:
    """Stands for what a malicious pickle would build: torch.load(weights_only=True) refuses it."""


def test_pytorch_model_bin_is_read_without_unpickling_code(tmp_path, hf_tokenizer_dir):
    hf = random_neo(LAYOUTS["2 layers (2Layers-33M)"])
    folder = save_hf(hf, tmp_path / "hf", hf_tokenizer_dir)
    (folder / "model.safetensors").unlink()
    torch.save(hf.state_dict(), folder / "pytorch_model.bin")  # the format of the 2023 uploads
    import_hf(folder, tmp_path / "ckpt")
    ours = load_checkpoint(tmp_path / "ckpt").model.state_dict()
    assert torch.equal(ours["transformer.h.1.attn.c_attn.weight"][:32], hf.transformer.h[1].attn.attention.q_proj.weight)

    torch.save({"x": NotATensor()}, folder / "pytorch_model.bin")
    with pytest.raises(UserError, match="holds more than tensors"):
        import_hf(folder, tmp_path / "ckpt2")
    assert not (tmp_path / "ckpt2").exists()


# -----------------------------------------------------------------------------
# Refusals: one line, nothing written


def test_import_refusals(tmp_path, hf_tokenizer_dir, capfd, monkeypatch):
    hf_dir = save_hf(random_neo(LAYOUTS["1 layer (1Layer-21M)"], scaled=False), tmp_path / "hf", hf_tokenizer_dir)
    other_tok = tmp_path / "other_tok"
    other_tok.mkdir()
    (other_tok / "config.json").write_text((hf_dir / "config.json").read_text())
    (other_tok / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes())
    (other_tok / "vocab.json").write_text(json.dumps({"a": 0, "<|endoftext|>": 1}))
    (other_tok / "merges.txt").write_text("#version: 0.2\n")
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tok / name).write_bytes((hf_dir / name).read_bytes())
    mistral = tmp_path / "mistral"  # llama and qwen3 import now (tests/test_llama.py); mistral does not
    mistral.mkdir()
    (mistral / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    relu = tmp_path / "relu"
    relu.mkdir()
    (relu / "config.json").write_text(json.dumps({**json.loads((hf_dir / "config.json").read_text()),
                                                  "activation_function": "relu"}))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    capfd.readouterr()  # save_pretrained's progress bar

    cases = [
        (tmp_path / "missing", "does not exist"),
        ("roneneldan/TinyStories-1M", "could not download roneneldan/TinyStories-1M"),  # HF_HUB_OFFLINE=1
        (other_tok, "not GPT-2's"),
        (no_tok, "--tokenizer gpt2"),
        (mistral, "model_type 'mistral' is not supported"),
        (relu, "activation_function gelu_new"),
    ]
    for source, message in cases:
        assert main(["import", "--from", str(source), "--out", str(tmp_path / "ckpt")]) == 2
        err = capfd.readouterr().err
        assert err.count("\n") == 1 and message in err and "Traceback" not in err, err
    assert main(["import", "--from", str(hf_dir), "--out", str(tmp_path / "full")]) == 2
    assert "not empty" in capfd.readouterr().err and (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "ckpt").exists()

    # a folder without tokenizer files imports with --tokenizer gpt2
    assert main(["import", "--from", str(no_tok), "--out", str(tmp_path / "ckpt"), "--tokenizer", "gpt2"]) == 0
    assert "tokenizer gpt2" in capfd.readouterr().out


# -----------------------------------------------------------------------------
# Config, presets, flags


def test_presets_are_the_released_family():
    expected = {  # (n_layer, n_embd, total parameters at vocab 50,257 and block_size 512, non-embedding)
        "ts-1m": (8, 64, 3_647_680, 398_464),
        "ts-3m": (8, 128, 8_081_792, 1_583_360),
        "ts-8m": (8, 256, 19_309_312, 6_312_448),
        "ts-28m": (8, 512, 51_201_536, 25_207_808),
        "ts-33m": (4, 768, 67_334_400, 28_343_808),
        "ts-1layer-21m": (1, 1024, 64_582_656, 12_595_200),
        "ts-2layers-33m": (2, 1024, 77_175_808, 25_188_352),
    }
    for name, (n_layer, n_embd, total, non_embedding) in expected.items():
        cfg = PRESETS[name]
        assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.block_size, cfg.window_size) == (n_layer, n_embd, 16, 512, 256)
        assert cfg.scale_attention is False and cfg.qkv_bias is False
        assert cfg.attention_layers[0] == "global" and all(a != b for a, b in zip(cfg.attention_layers, cfg.attention_layers[1:]))
        with torch.device("meta"):
            model = GPT(cfg)
        assert (model.num_params(), model.num_params(non_embedding=True)) == (total, non_embedding), name
    # the released models' own config.json writes the pattern this way
    assert attention_types(PRESETS["ts-1m"].attention_layers) == [[["global", "local"], 4]]
    assert attention_types(PRESETS["ts-1layer-21m"].attention_layers) == [[["global"], 1]]


def test_neo_config_round_trip_validation_and_flags():
    cfg = PRESETS["ts-33m"]
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert ModelConfig.from_dict({"n_layer": 2}).attention_layers is None  # old checkpoints: GPT-2 as before
    bad = [
        (dict(n_layer=3, attention_layers=["global", "local"]), "names 2 layers but n_layer is 3"),
        (dict(n_layer=1, attention_layers=["sliding"]), "only global and local"),
        (dict(attention_layers="global,local"), "must be a list"),
        (dict(window_size=0), "window_size must be a positive integer"),
        (dict(scale_attention="no"), "scale_attention must be true or false"),
    ]
    for kw, message in bad:
        with pytest.raises(UserError, match=message):
            ModelConfig(**kw)
    args = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--attention-layers", "global,local",
                                      "--window-size", "128", "--scale-attention", "false", "--qkv-bias", "false"])
    assert (args.attention_layers, args.window_size, args.scale_attention, args.qkv_bias) == (["global", "local"], 128, False, False)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--data", "d", "--out", "o", "--attention-layers", "global,,local"])


# -----------------------------------------------------------------------------
# The commands on an imported model: evaluate, generate, train --init-from


@pytest.fixture(scope="module")
def gpt2_data(tmp_path_factory, v1_train_head):
    out = tmp_path_factory.mktemp("gpt2_data") / "d"
    run_cli("prepare", "--source", v1_train_head, "--tokenizer", "gpt2", "--max-stories", 300, "--out", out, check=True)
    return out


@pytest.fixture(scope="module")
def imported(tmp_path_factory, hf_tokenizer_dir):
    """An imported GPT-Neo (scaled-up random weights: a loss far above ln 50,257), 128 positions, window 8."""
    root = tmp_path_factory.mktemp("imported")
    hf = random_neo(LAYOUTS["4 layers (33M)"], positions=128)
    assert main(["import", "--from", str(save_hf(hf, root / "hf", hf_tokenizer_dir)), "--out", str(root / "ckpt")]) == 0
    return root / "ckpt"


def test_evaluate_and_generate_on_an_imported_checkpoint(tmp_path, imported, gpt2_data, capfd):
    assert main(["evaluate", "--checkpoint", str(imported), "--data", str(gpt2_data), "--json", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["loss"] > 11.0 and result["tokens"] > 1000  # random weights, read as they are: above ln 50,257
    capfd.readouterr()

    assert main(["generate", "--checkpoint", str(imported), "--prompt", "Once upon a time", "--max-new-tokens", "20",
                 "--temperature", "0", "--seed", "1"]) == 0
    out = capfd.readouterr().out
    assert out.startswith("Once upon a time") and len(out) > len("Once upon a time")


@pytest.mark.slow  # about 15-30 s on 2 CPU cores: a 50,257-token output layer, 30 steps, two evaluations
def test_init_from_fine_tunes_an_imported_model(tmp_path, imported, gpt2_data, capfd):
    from tinystories.data import EpochWindows, open_split

    run = tmp_path / "run"
    r = run_cli("train", "--data", gpt2_data, "--init-from", imported, "--out", run, "--preset", "tiny",
                "--block-size", 32, "--max-steps", 30, "--batch-size", 4, "--grad-accum", 1, "--learning-rate", 3e-3,
                "--min-lr", 3e-4, "--warmup-steps", 5, "--eval-interval", 30, "--eval-tokens", 1024, "--seed", 7,
                "--checkpoint-interval", 30, "--dtype", "fp32", "--device", "cpu", check=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"})  # see one_thread
    config = json.loads((run / "config.json").read_text())
    assert config["init_from"] == str(imported.resolve()) and "from the weights of" in r.stdout
    tuned = load_checkpoint(run)
    assert tuned.model_config.block_size == 32  # positions cropped from 128
    assert tuned.model_config.attention_layers == ["global", "local"] * 2  # the checkpoint's model, not tiny's

    # step 1's loss is the imported model's loss on the first batch: training started from its weights
    x, y = EpochWindows(open_split(gpt2_data, "train"), 32, 4, 7, 0, 1).next_batch("cpu")
    with torch.no_grad():
        _, start_loss = load_checkpoint(imported).model(x, y)
    first_step = json.loads((run / "log.jsonl").read_text().splitlines()[0])["loss"]
    assert first_step == pytest.approx(start_loss.item(), abs=1e-5)

    losses = {}
    for name, ckpt in (("before", imported), ("after", run)):
        assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(gpt2_data), "--json", str(tmp_path / "e.json")]) == 0
        losses[name] = json.loads((tmp_path / "e.json").read_text())["loss"]
    capfd.readouterr()
    assert losses["after"] < losses["before"] - 1.0, losses  # measured: 11.54 -> 9.64 nats per gpt2 token


def test_init_from_refusals(tmp_path, imported, gpt2_data, small_data, capfd):
    base = ["train", "--data", str(gpt2_data), "--init-from", str(imported), "--max-steps", "1"]
    cases = [
        (["--out", str(tmp_path / "a"), "--n-embd", "64"], "n_embd=32"),
        (["--out", str(tmp_path / "b"), "--attention-layers", "global,global,global,global"], "attention_layers="),
        (["--out", str(tmp_path / "c"), "--block-size", "256"], "larger than the checkpoint's 128"),
        (["--out", str(tmp_path / "d"), "--resume"], "no checkpoints/last"),
    ]
    for flags, message in cases:
        assert main([*base, *flags]) == 2
        err = capfd.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    other = ["train", "--data", str(small_data), "--init-from", str(imported), "--out", str(tmp_path / "e")]
    assert main(other) == 2
    assert "uses tokenizer gpt2" in capfd.readouterr().err  # bpe-512 data, gpt2 checkpoint
    assert not any((tmp_path / x).exists() for x in "abcde")
