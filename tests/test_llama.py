"""Llama and Qwen3 interop: export to LlamaForCausalLM / Qwen3ForCausalLM, import back, refusals.

Parity is proven against randomly initialised transformers models (no download): 2 layers, 64
wide, 4 heads, a 512-token BPE, an MLP width (96) and a RoPE base (500) that are not the defaults,
so a config field that is dropped on the way shows up in the logits; every weight drawn at std 0.2
(norm gains around 1) so that attention is peaked and logits spread.
"""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never the network

from tinystories.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from tinystories.cli import main  # noqa: E402
from tinystories.config import ModelConfig  # noqa: E402
from tinystories.errors import UserError  # noqa: E402
from tinystories.export import export_hf, hf_family, tokenizer_files  # noqa: E402
from tinystories.generate import generate  # noqa: E402
from tinystories.hf_import import import_hf  # noqa: E402
from tinystories.model import GPT  # noqa: E402

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

TOLERANCE = 1e-5  # fp32, max abs logit difference (measured: 0, the same kernels in the same order)
WIDTH, HEADS, LAYERS, POSITIONS, HIDDEN, THETA = 64, 4, 2, 64, 96, 500.0
HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def scale_up(model, seed=0):
    """Every weight drawn at std 0.2, norm gains around 1 (ours: ln_*, q_norm, k_norm; HF: *norm*)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = 1.0 if ("norm" in name or ".ln_" in name) and name.endswith(".weight") else 0.0
            p.copy_(gain + 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def llama_layout(vocab_size, *, qk_norm=False, tie=True, **changes) -> ModelConfig:
    return ModelConfig(n_layer=LAYERS, n_head=HEADS, n_embd=WIDTH, block_size=POSITIONS, vocab_size=vocab_size,
                       dropout=0.0, bias=False, pos_embedding="rope", rope_theta=THETA, norm="rmsnorm", mlp="swiglu",
                       mlp_hidden=HIDDEN, qk_norm=qk_norm, tie_embeddings=tie, **changes)


def random_hf(kind, vocab_size, *, tie, seed=0):
    """A randomly initialised LlamaForCausalLM or Qwen3ForCausalLM of our test shape."""
    config_class = transformers.LlamaConfig if kind == "llama" else transformers.Qwen3Config
    config = config_class(
        vocab_size=vocab_size, hidden_size=WIDTH, intermediate_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, head_dim=WIDTH // HEADS,
        max_position_embeddings=POSITIONS, rms_norm_eps=1e-5, rope_theta=THETA, tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    return scale_up(transformers.AutoModelForCausalLM.from_config(config), seed)


def save_hf(model, folder, tok):
    """A transformers model folder as save_pretrained writes it, with our tokenizer files beside."""
    model.save_pretrained(folder)
    for name, data in tokenizer_files(tok, POSITIONS).items():
        (folder / name).write_bytes(data)
    return folder


def text_batch(tok, stories, T=POSITIONS):
    """(2, T) ids: real text, and random tokens; the whole context, so every RoPE angle is used."""
    real = tok.encode(" ".join(stories[:4]))[:T]
    noise = torch.randint(0, tok.vocab_size, (1, T), generator=torch.Generator().manual_seed(1))
    return torch.cat([torch.tensor([real]), noise])


def assert_same_logits(ours_model, hf_model, idx):
    with torch.no_grad():
        ours, theirs = ours_model(idx)[0], hf_model(idx).logits
    assert ours.std() > 1.0  # far from uniform, so agreement means something
    diff = (ours - theirs).abs().max().item()
    assert diff <= TOLERANCE, f"max abs logit difference {diff:.2e}"


def assert_same_greedy(ours_model, hf_model, tok, stories):
    """Greedy continuations: ours with and without the KV cache equal transformers' generate."""
    lengths = []
    for story in stories[:2]:
        prompt = tok.encode(story)[:10]
        with torch.no_grad():
            theirs = hf_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=30,
                                       eos_token_id=tok.eot_id, pad_token_id=tok.eot_id)[0, len(prompt):].tolist()
        for use_cache in (True, False):
            [new] = generate(ours_model, [prompt], 30, temperature=0, eot_id=tok.eot_id, use_cache=use_cache)
            assert new == theirs, f"use_cache={use_cache}"
        lengths.append(len(theirs))
    assert max(lengths) > 5  # a continuation long enough to compare


# -----------------------------------------------------------------------------
# transformers -> ours


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_imported_model_equals_transformers(tmp_path, kind, tie, bpe, stories):
    hf = random_hf(kind, bpe.vocab_size, tie=tie)
    import_hf(save_hf(hf, tmp_path / "hf", bpe), tmp_path / "ckpt")
    ckpt = load_checkpoint(tmp_path / "ckpt")
    model, cfg = ckpt.model, ckpt.model_config
    assert cfg == llama_layout(bpe.vocab_size, qk_norm=kind == "qwen3", tie=tie, norm_eps=1e-5)
    assert ckpt.config["imported_from"]["architecture"] == ("Qwen3" if kind == "qwen3" else "Llama")
    if not tie:  # the output layer is its own matrix, and the checkpoint kept it
        assert torch.equal(model.lm_head.weight, hf.lm_head.weight)
        assert not torch.equal(model.lm_head.weight, model.transformer.wte.weight)

    idx = text_batch(bpe, stories)
    assert_same_logits(model, hf, idx)
    assert_same_greedy(model, hf, bpe, stories)

    # the test can fail: the same weights under the default RoPE base are far off
    other = GPT(dataclasses.replace(cfg, rope_theta=10000.0)).eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (other(idx)[0] - hf(idx).logits).abs().max() > 0.1


def test_llama2c_style_folder_imports(tmp_path, bpe, stories):
    """A folder as karpathy/llama2.c's `export.py --hf` writes it: pytorch_model.bin with lm_head
    stored beside the (tied) embedding, config.json from an older LlamaConfig (rope_theta and
    rope_scaling null at the top level, pretraining_tp), plus the RoPE frequency buffers that
    transformers before 4.35 saved."""
    hf = random_hf("llama", bpe.vocab_size, tie=True)
    folder = save_hf(hf, tmp_path / "hf", bpe)
    (folder / "model.safetensors").unlink()
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    for i in range(LAYERS):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(WIDTH // HEADS // 2)
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "hidden_size": WIDTH, "initializer_range": 0.02, "intermediate_size": HIDDEN,
        "max_position_embeddings": POSITIONS, "num_attention_heads": HEADS, "num_hidden_layers": LAYERS,
        "num_key_value_heads": HEADS, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
        "rope_theta": THETA, "tie_word_embeddings": True, "torch_dtype": "float32",
        "transformers_version": "4.33.1", "use_cache": True, "vocab_size": bpe.vocab_size,
    }))
    import_hf(folder, tmp_path / "ckpt")
    model = load_checkpoint(tmp_path / "ckpt").model
    assert model.config.rope_theta == THETA and model.config.tie_embeddings is True
    assert_same_logits(model, hf, text_batch(bpe, stories))


# -----------------------------------------------------------------------------
# ours -> transformers


@pytest.fixture(scope="module", params=[("llama", True), ("llama", False), ("qwen3", True), ("qwen3", False)],
                ids=["llama-tied", "llama-untied", "qwen3-tied", "qwen3-untied"])
def exported(request, tmp_path_factory, bpe):
    """(kind, our model, the exported folder) for each family, tied and untied."""
    kind, tie = request.param
    root = tmp_path_factory.mktemp(f"export_{kind}_{tie}")
    model = scale_up(GPT(llama_layout(bpe.vocab_size, qk_norm=kind == "qwen3", tie=tie, norm_eps=1e-6)))
    save_checkpoint(root / "ckpt", model, bpe, step=5, val_loss=2.5)
    return kind, model, export_hf(root / "ckpt", root / "hf")


def test_transformers_loads_the_export_and_computes_ours(exported, bpe, stories):
    kind, model, hf_dir = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert type(hf).__name__ == HF_CLASSES[kind]
    tied = hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert tied == model.config.tie_embeddings  # re-tied on load, or its own matrix
    assert_same_logits(model, hf, text_batch(bpe, stories))
    assert_same_greedy(model, hf, bpe, stories)


def test_exported_config_and_files(exported, bpe):
    kind, model, hf_dir = exported
    cfg = model.config
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == [HF_CLASSES[kind]] and config["model_type"] == kind
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (WIDTH, HIDDEN, LAYERS)
    assert config["num_attention_heads"] == config["num_key_value_heads"] == HEADS
    assert config["head_dim"] == WIDTH // HEADS  # Qwen3 would otherwise take 128
    assert config["max_position_embeddings"] == POSITIONS and config["vocab_size"] == bpe.vocab_size
    assert config["rms_norm_eps"] == 1e-6 and config["rope_theta"] == THETA
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": THETA}
    assert config["tie_word_embeddings"] is cfg.tie_embeddings and config["hidden_act"] == "silu"
    assert config["attention_bias"] is False and config.get("mlp_bias", False) is False
    assert config["bos_token_id"] == config["eos_token_id"] == bpe.eot_id
    if kind == "qwen3":
        assert config["use_sliding_window"] is False and config["layer_types"] == ["full_attention"] * LAYERS
    loaded = transformers.AutoConfig.from_pretrained(hf_dir)  # what transformers makes of it
    assert loaded.rope_parameters["rope_theta"] == THETA and loaded.head_dim == WIDTH // HEADS
    assert getattr(loaded, "sliding_window", None) is None

    weights = load_file(hf_dir / "model.safetensors")
    assert ("lm_head.weight" in weights) is not cfg.tie_embeddings  # a tied one is re-tied by transformers
    assert weights["model.layers.0.mlp.gate_proj.weight"].shape == (HIDDEN, WIDTH)
    assert torch.equal(weights["model.layers.1.mlp.up_proj.weight"], model.transformer.h[1].mlp.c_fc.weight[HIDDEN:])
    assert torch.equal(weights["model.layers.1.self_attn.k_proj.weight"],
                       model.transformer.h[1].attn.c_attn.weight[WIDTH:2 * WIDTH])
    assert ("model.layers.0.self_attn.q_norm.weight" in weights) is (kind == "qwen3")

    card = (hf_dir / "README.md").read_text()
    assert f"`{HF_CLASSES[kind]}`" in card and "SwiGLU" in card and f"{model.num_params():,}" in card
    assert ("separate output layer" in card) is not cfg.tie_embeddings
    assert sorted(p.name for p in hf_dir.iterdir()) == [
        "README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json",
    ]


def test_auto_tokenizer_loads_the_export(exported, bpe, stories):
    _, _, hf_dir = exported
    theirs = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert theirs.eos_token_id == theirs.bos_token_id == theirs.pad_token_id == bpe.eot_id
    assert theirs(stories[:20])["input_ids"] == bpe.encode_batch(stories[:20])
    assert theirs.decode(bpe.encode(stories[3])) == stories[3]


# -----------------------------------------------------------------------------
# Round trips


def test_export_then_import_gives_identical_weights_and_config(tmp_path, exported):
    kind, model, hf_dir = exported
    import_hf(hf_dir, tmp_path / "back")
    back = load_checkpoint(tmp_path / "back").model
    assert back.config == model.config
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k


def test_transformers_to_ours_to_transformers_gives_identical_tensors(tmp_path, bpe):
    hf = random_hf("qwen3", bpe.vocab_size, tie=False)
    import_hf(save_hf(hf, tmp_path / "hf", bpe), tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", tmp_path / "back")
    before, after = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert before.keys() == after.keys() and len(before) == 3 + 11 * LAYERS
    for k in before:
        assert torch.equal(before[k], after[k]), k


@pytest.mark.parametrize("family", ["gpt2", "gpt_neo"])
def test_gpt2_and_neo_keep_untied_output_eps_and_mlp_width(tmp_path, family, bpe, stories):
    """Options GPT-2 / GPT-Neo can hold (a separate lm_head, another LayerNorm eps, another MLP width)
    are written into their config, computed by transformers, and read back."""
    neo = dict(attention_layers=["global", "local"], window_size=8, scale_attention=False, qkv_bias=False)
    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=POSITIONS, vocab_size=bpe.vocab_size, dropout=0.0,
                      tie_embeddings=False, norm_eps=1e-6, mlp_hidden=80, **(neo if family == "gpt_neo" else {}))
    model = scale_up(GPT(cfg))
    save_checkpoint(tmp_path / "ckpt", model, bpe)
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_hf(tmp_path / "ckpt", tmp_path / "hf")).eval()
    assert hf.config.model_type == family and hf.config.tie_word_embeddings is False
    assert hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr()
    assert_same_logits(model, hf, text_batch(bpe, stories))

    import_hf(tmp_path / "hf", tmp_path / "back")
    back = load_checkpoint(tmp_path / "back").model
    assert back.config == cfg
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))


# -----------------------------------------------------------------------------
# Refusals: one line, exit 2, nothing written

UNHOLDABLE = {  # ModelConfig changes from the Llama layout -> what the refusal must name
    "rope with gelu": (dict(mlp="gelu", mlp_hidden=None), "mlp=gelu"),
    "rope with layernorm": (dict(norm="layernorm"), "norm=layernorm"),
    "rope, layernorm, relu2": (dict(norm="layernorm", mlp="relu2", mlp_hidden=None), "norm=layernorm, mlp=relu2"),
    "biases with rope": (dict(bias=True), "bias=true"),
    "q/k/v biases with rope": (dict(qkv_bias=True), "qkv_bias=true"),
    "local layers": (dict(attention_layers=["global", "local"]), "local attention layers"),
    "unscaled attention": (dict(scale_attention=False), "scale_attention=false"),
    "learned positions with rmsnorm": (dict(pos_embedding="learned", mlp="gelu", mlp_hidden=None, bias=True),
                                       "norm=rmsnorm"),
    "gpt-2 with relu2": (dict(pos_embedding="learned", norm="layernorm", mlp="relu2", mlp_hidden=None), "mlp=relu2"),
    "gpt-2 with qk_norm": (dict(pos_embedding="learned", norm="layernorm", mlp="gelu", mlp_hidden=None, qk_norm=True),
                           "qk_norm=true"),
}


@pytest.mark.parametrize("changes, named", UNHOLDABLE.values(), ids=UNHOLDABLE.keys())
def test_export_refuses_a_layout_no_class_holds(tmp_path, changes, named, bpe, capfd):
    cfg = dataclasses.replace(llama_layout(bpe.vocab_size), **changes)
    with pytest.raises(UserError, match="no Hugging Face class"):
        hf_family(cfg)
    save_checkpoint(tmp_path / "ckpt", GPT(cfg), bpe)
    out = tmp_path / "new" / "hf"
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(out)]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and f"holds this layout ({named})" in err and "Traceback" not in err, err
    assert "Llama needs pos_embedding=rope, norm=rmsnorm, mlp=swiglu, bias=false" in err
    assert not (tmp_path / "new").exists()  # not even the parent folder


def test_export_refusal_from_the_real_command(tmp_path, bpe):
    cfg = dataclasses.replace(llama_layout(bpe.vocab_size), mlp="relu2", mlp_hidden=None)
    save_checkpoint(tmp_path / "ckpt", GPT(cfg), bpe)
    r = subprocess.run([sys.executable, "-m", "tinystories", "export", "--checkpoint", str(tmp_path / "ckpt"),
                        "--out", str(tmp_path / "hf")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "(mlp=relu2)" in r.stderr, r.stderr
    assert not (tmp_path / "hf").exists()


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory, bpe):
    return save_hf(random_hf("llama", bpe.vocab_size, tie=False), tmp_path_factory.mktemp("llama") / "hf", bpe)


@pytest.fixture(scope="module")
def qwen3_folder(tmp_path_factory, bpe):
    return save_hf(random_hf("qwen3", bpe.vocab_size, tie=True), tmp_path_factory.mktemp("qwen3") / "hf", bpe)


IMPORT_REFUSALS = {  # config.json changes -> what the refusal must say
    "grouped-query attention": ("llama", dict(num_key_value_heads=2), "grouped-query attention is not supported"),
    "rope scaling (transformers 4)": ("llama", dict(rope_scaling={"type": "linear", "factor": 2.0}), "plain RoPE"),
    "rope scaling (transformers 5)": ("llama", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4,
                                                                     "factor": 2.0}), "plain RoPE"),
    "head_dim": ("llama", dict(head_dim=32), "head_dim equal to hidden_size / num_attention_heads (64 / 4)"),
    "attention bias": ("llama", dict(attention_bias=True), "attention_bias false"),
    "mlp bias": ("llama", dict(mlp_bias=True), "mlp_bias false"),
    "activation": ("llama", dict(hidden_act="gelu"), "hidden_act silu"),
    "untied without lm_head": ("qwen3", dict(tie_word_embeddings=False), "missing ['lm_head.weight']"),
    "qwen3 sliding window": ("qwen3", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
                             "use_sliding_window false"),
    "qwen3 default head_dim": ("qwen3", dict(head_dim=None), "head_dim equal to hidden_size / num_attention_heads"),
}


@pytest.mark.parametrize("kind, changes, message", IMPORT_REFUSALS.values(), ids=IMPORT_REFUSALS.keys())
def test_import_refuses_what_we_cannot_hold(tmp_path, kind, changes, message, request, capfd):
    source = request.getfixturevalue(f"{kind}_folder")
    folder = tmp_path / "hf"
    folder.mkdir()
    for p in source.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    config = json.loads((source / "config.json").read_text())
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not None}  # None: the key left out (the class default)
    (folder / "config.json").write_text(json.dumps(config))
    capfd.readouterr()
    assert main(["import", "--from", str(folder), "--out", str(tmp_path / "ckpt")]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "ckpt").exists()


# -----------------------------------------------------------------------------
# Fine-tuning an imported model


def test_init_from_takes_an_imported_llama_at_a_shorter_context(tmp_path, bpe, stories):
    """train --init-from's weights (train.initial_weights) for a RoPE model: nothing to crop, and the
    shorter model computes what the checkpoint does on the positions both have."""
    from tinystories.train import initial_weights

    hf = random_hf("llama", bpe.vocab_size, tie=False)
    import_hf(save_hf(hf, tmp_path / "hf", bpe), tmp_path / "ckpt")
    ckpt = load_checkpoint(tmp_path / "ckpt")
    short = GPT(dataclasses.replace(ckpt.model_config, block_size=32)).eval()
    short.load_state_dict(initial_weights(tmp_path / "ckpt", 32))
    idx = text_batch(bpe, stories, T=32)
    with torch.no_grad():
        assert torch.equal(short(idx)[0], ckpt.model(idx)[0])
