"""`tinystories import` on hostile or broken Hugging Face folders: refused at the cause, in one line.

Three causes, each refused before anything is built from it:
  - paths: every file a model folder names (the shards of an index, and config.json, the weights
    and the tokenizer files themselves as symlinks) must stay inside the folder once resolved;
  - config.json: every value import reads has its type checked, and the layer count, width and
    vocabulary size must agree with the tensors' names and shapes;
  - tensors: floating point and finite only.
And `generate` on a model whose weights are not finite stops with one line, not a torch traceback.

The folders are tiny random transformers models (GPT2LMHeadModel, LlamaForCausalLM, GPTNeoForCausalLM)
saved with save_pretrained and our 512-token BPE beside them; no network.
"""

import json
import os
import shutil

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never the network

from tinystories.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from tinystories.cli import main  # noqa: E402
from tinystories.config import ModelConfig  # noqa: E402
from tinystories.errors import UserError  # noqa: E402
from tinystories.export import tokenizer_files  # noqa: E402
from tinystories.generate import generate  # noqa: E402
from tinystories.hf_import import import_hf  # noqa: E402
from tinystories.model import GPT  # noqa: E402

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

WIDTH, HEADS, LAYERS, POSITIONS = 32, 4, 2, 64


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def save_hf(model, folder, tok, **kwargs):
    """A transformers model folder as save_pretrained writes it, with our tokenizer files beside."""
    model.save_pretrained(folder, **kwargs)
    for name, data in tokenizer_files(tok, POSITIONS).items():
        (folder / name).write_bytes(data)
    return folder


def random_model(kind: str, vocab_size: int):
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=POSITIONS, n_embd=WIDTH, n_layer=LAYERS,
                                         n_head=HEADS)
    elif kind == "llama":
        config = transformers.LlamaConfig(
            vocab_size=vocab_size, hidden_size=WIDTH, intermediate_size=48, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, num_key_value_heads=HEADS, head_dim=WIDTH // HEADS,
            max_position_embeddings=POSITIONS, tie_word_embeddings=True)
    else:
        config = transformers.GPTNeoConfig(
            vocab_size=vocab_size, max_position_embeddings=POSITIONS, hidden_size=WIDTH, num_layers=LAYERS,
            num_heads=HEADS, attention_types=[[["global", "local"], 1]], window_size=8)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory, bpe):
    """kind -> a saved tiny model folder: gpt2, llama, gpt_neo, and gpt2 in shards (with an index)."""
    root = tmp_path_factory.mktemp("hf")
    made = {kind: save_hf(random_model(kind, bpe.vocab_size), root / kind, bpe)
            for kind in ("gpt2", "llama", "gpt_neo")}
    made["sharded"] = save_hf(random_model("gpt2", bpe.vocab_size), root / "sharded", bpe, max_shard_size=40_000)
    assert (made["sharded"] / "model.safetensors.index.json").is_file()
    return made


@pytest.fixture
def copy(folders, tmp_path):
    """A fresh copy of one of `folders` under tmp_path/"hf" (with tmp_path/"outside" beside it)."""
    def make(kind):
        folder = tmp_path / "hf"
        shutil.copytree(folders[kind], folder)
        (tmp_path / "outside").mkdir()
        return folder
    return make


def refused(folder, tmp_path, capfd, message: str) -> str:
    """`tinystories import` of `folder`: exit 2, one line on stderr holding `message`, nothing written."""
    capfd.readouterr()
    out = tmp_path / "ckpt"
    assert main(["import", "--from", str(folder), "--out", str(out)]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err
    assert not out.exists()
    return err


def edit_json(path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))  # NaN and Infinity as Python's json writes (and reads) them


def set_config(folder, **changes) -> None:
    edit_json(folder / "config.json", lambda c: c.update(changes))


# -----------------------------------------------------------------------------
# Paths: every file a folder names stays inside it


def test_a_sharded_folder_imports(folders, tmp_path, bpe):
    import_hf(folders["sharded"], tmp_path / "ckpt")
    ckpt = load_checkpoint(tmp_path / "ckpt")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folders["sharded"])
    assert torch.equal(ckpt.model.transformer.wte.weight, hf.transformer.wte.weight)
    assert len(ckpt.config["imported_from"]["files"]) > 1  # every shard was read, and its hash recorded


def first_shard(folder) -> str:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return sorted(set(index["weight_map"].values()))[0]


def point_first_shard_at(folder, name) -> None:
    """The index names `name` in place of its first shard, for every tensor that shard held."""
    shard = first_shard(folder)
    edit_json(folder / "model.safetensors.index.json",
              lambda i: i["weight_map"].update({k: name for k, v in i["weight_map"].items() if v == shard}))


def test_an_absolute_shard_path_is_refused(copy, tmp_path, capfd):
    folder = copy("sharded")
    stolen = tmp_path / "outside" / "elsewhere.safetensors"  # a real weights file elsewhere on disk
    shutil.copy(folder / first_shard(folder), stolen)
    point_first_shard_at(folder, str(stolen))
    err = refused(folder, tmp_path, capfd, f"{str(stolen)!r}, is an absolute path")
    assert "model.safetensors.index.json" in err


@pytest.mark.parametrize("name", ["../outside/elsewhere.safetensors", "../../../../../../../../etc/passwd",
                                  "sub/../../outside/elsewhere.safetensors"])
def test_a_shard_path_leading_out_of_the_folder_is_refused(copy, tmp_path, capfd, name):
    folder = copy("sharded")
    shutil.copy(folder / first_shard(folder), tmp_path / "outside" / "elsewhere.safetensors")
    point_first_shard_at(folder, name)
    refused(folder, tmp_path, capfd, f"{name!r}, leads outside {folder}")


def test_a_shard_that_is_a_symlink_out_of_the_folder_is_refused(copy, tmp_path, capfd):
    folder = copy("sharded")
    shard = first_shard(folder)
    target = tmp_path / "outside" / shard
    shutil.move(folder / shard, target)
    (folder / shard).symlink_to(target)
    refused(folder, tmp_path, capfd, f"{shard!r}, leads outside {folder} (to {target})")


def test_a_single_weights_file_and_config_that_are_symlinks_out_of_the_folder_are_refused(copy, tmp_path, capfd):
    folder = copy("gpt2")
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        target = tmp_path / "outside" / name
        shutil.move(folder / name, target)
        (folder / name).symlink_to(target)
        refused(folder, tmp_path, capfd, f"{folder / name} leads outside {folder} (to {target})")
        (folder / name).unlink()
        shutil.move(target, folder / name)
    import_hf(folder, tmp_path / "ckpt")  # each put back: the folder imports


def test_a_hub_cache_snapshot_whose_files_link_into_its_blobs_imports(folders, tmp_path):
    """snapshot_download's layout: snapshots/<revision>/<name> -> ../../blobs/<hash>."""
    repo = tmp_path / "models--someone--tiny"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, p in enumerate(sorted(folders["sharded"].iterdir())):
        shutil.copy(p, blobs / f"blob{i}")
        (snapshot / p.name).symlink_to(f"../../blobs/blob{i}")
    import_hf(snapshot, tmp_path / "ckpt")
    assert load_checkpoint(tmp_path / "ckpt").model_config.n_layer == LAYERS


@pytest.mark.parametrize("name, message", [
    (5, "5, is not a file name"),
    (None, "None, is not a file name"),
    (["model-00001.safetensors"], "['model-00001.safetensors'], is not a file name"),
    ({"a": 1}, "{'a': 1}, is not a file name"),
    ("", "'', is not a file name"),
    ("model\x00.safetensors", "is not a file name"),
    ("config.json", "'config.json', is not a .safetensors file"),
])
def test_a_shard_name_that_is_not_a_file_name_is_refused(copy, tmp_path, capfd, name, message):
    folder = copy("sharded")
    point_first_shard_at(folder, name)
    refused(folder, tmp_path, capfd, message)


@pytest.mark.parametrize("index", [[], {"weight_map": []}, {"weight_map": {}}, {"metadata": {}}, "x"])
def test_an_index_without_a_weight_map_is_refused(copy, tmp_path, capfd, index):
    folder = copy("sharded")
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(folder, tmp_path, capfd, "is not a valid weight index")


def test_the_pytorch_bin_index_is_held_to_the_same_rule(copy, tmp_path, capfd):
    folder = copy("gpt2")
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, tmp_path / "outside" / "pytorch_model-00001-of-00001.bin")
    weight_map = {k: str(tmp_path / "outside" / "pytorch_model-00001-of-00001.bin") for k in state}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    refused(folder, tmp_path, capfd, "is an absolute path")
    weight_map = {k: "../outside/pytorch_model-00001-of-00001.bin" for k in state}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    refused(folder, tmp_path, capfd, "leads outside")
    shutil.move(tmp_path / "outside" / "pytorch_model-00001-of-00001.bin", folder)
    weight_map = {k: "pytorch_model-00001-of-00001.bin" for k in state}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    import_hf(folder, tmp_path / "ckpt")  # inside the folder: imported


# -----------------------------------------------------------------------------
# config.json against the weights: compared before anything is built


@pytest.mark.parametrize("kind, changes, message", [
    ("gpt2", dict(n_layer=100_000), "config.json says n_layer 100000 but the weights hold 2"),
    ("gpt2", dict(n_layer=1), "config.json says n_layer 1 but the weights hold 2"),
    ("llama", dict(num_hidden_layers=100_000), "config.json says num_hidden_layers 100000 but the weights hold 2"),
    ("llama", dict(num_hidden_layers=1), "config.json says num_hidden_layers 1 but the weights hold 2"),
    ("gpt_neo", dict(num_layers=4, attention_types=[[["global", "local"], 2]],
                     attention_layers=["global", "local"] * 2),
     "config.json says num_layers 4 but the weights hold 2"),
    ("gpt2", dict(n_embd=64), "n_embd 64, but the token embedding transformer.wte.weight is 512 x 32"),
    ("llama", dict(hidden_size=64, head_dim=16), "hidden_size 64, but the token embedding model.embed_tokens.weight "
                                                 "is 512 x 32"),
    ("gpt2", dict(vocab_size=1000), "vocab_size 1000 and n_embd 32, but the token embedding"),
    ("gpt2", dict(n_inner=96), "transformer.h.0.mlp.c_fc.bias is 128, config.json makes it 96"),
    ("llama", dict(intermediate_size=64), "wrong shape ['transformer.h.0.mlp.c_fc.weight'"),
    ("gpt2", dict(n_positions=128), "transformer.wpe.weight is 64 x 32, config.json makes it 128 x 32"),
])
def test_a_config_that_disagrees_with_the_weights_is_refused(copy, tmp_path, capfd, kind, changes, message):
    folder = copy(kind)
    set_config(folder, **changes)
    refused(folder, tmp_path, capfd, message)


def test_many_layers_in_config_are_refused_before_any_model_is_built(copy, tmp_path, monkeypatch):
    """The hostile report: num_hidden_layers 100,000 beside 3 layers of weights ran 90 s in 2 GB."""
    import tinystories.model

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built from a config that disagrees with the weights")

    folder = copy("gpt2")
    set_config(folder, n_layer=100_000)
    monkeypatch.setattr(tinystories.model.GPT, "__init__", no_model)
    with pytest.raises(UserError, match="n_layer 100000 but the weights hold 2"):
        import_hf(folder, tmp_path / "ckpt")


# -----------------------------------------------------------------------------
# config.json: every value read has its type checked


@pytest.mark.parametrize("kind, changes, message", [
    ("llama", dict(model_type=["llama"]), "model_type must be a string or null, got ['llama']"),
    ("gpt2", dict(model_type=2), "model_type must be a string or null, got 2"),
    ("gpt2", dict(n_layer="2"), "n_layer must be a positive integer, got '2'"),
    ("gpt2", dict(n_layer=2.0), "n_layer must be a positive integer, got 2.0"),
    ("gpt2", dict(n_layer=True), "n_layer must be a positive integer, got True"),
    ("gpt2", dict(n_head=-4), "n_head must be a positive integer, got -4"),
    ("gpt2", dict(n_head=0), "n_head must be a positive integer, got 0"),
    ("gpt2", dict(vocab_size=None), "vocab_size must be a positive integer, got None"),
    ("gpt2", dict(n_embd=2**64), "n_embd must be a positive integer, got 18446744073709551616"),
    ("gpt2", dict(n_inner=-1), "n_inner must be a positive integer or null, got -1"),
    ("gpt2", dict(resid_pdrop="abc"), "resid_pdrop must be a number in [0, 1), got 'abc'"),
    ("gpt2", dict(layer_norm_epsilon=0), "layer_norm_epsilon must be a positive finite number, got 0"),
    ("gpt2", dict(tie_word_embeddings="yes"), "tie_word_embeddings must be true or false, got 'yes'"),
    ("gpt2", dict(scale_attn_weights=1), "scale_attn_weights must be true or false, got 1"),
    ("gpt2", dict(activation_function=["gelu_new"]), "activation_function must be a string, got ['gelu_new']"),
    ("gpt2", dict(transformers_version=4.4), "transformers_version must be a string or null, got 4.4"),
    ("llama", dict(rope_theta=0), "rope_theta must be a positive finite number, got 0"),
    ("llama", dict(rope_theta=-10000.0), "rope_theta must be a positive finite number, got -10000.0"),
    ("llama", dict(rope_theta=float("nan")), "rope_theta must be a positive finite number, got nan"),
    ("llama", dict(rope_theta=float("inf")), "rope_theta must be a positive finite number, got inf"),
    ("llama", dict(rope_theta="10000"), "rope_theta must be a positive finite number, got '10000'"),
    ("llama", dict(rope_parameters={"rope_type": "default", "rope_theta": 0}),
     "rope_parameters: rope_theta must be a positive finite number, got 0"),
    ("llama", dict(rope_theta=500.0), "the RoPE bases disagree (rope_parameters.rope_theta 10000.0, rope_theta 500.0)"),
    ("llama", dict(rope_scaling=[1]), "rope_scaling must be an object or null, got [1]"),
    ("llama", dict(num_key_value_heads="4"), "num_key_value_heads must be a positive integer or null, got '4'"),
    ("llama", dict(head_dim=False), "head_dim must be a positive integer or null, got False"),
    ("llama", dict(rms_norm_eps=float("-inf")), "rms_norm_eps must be a positive finite number, got -inf"),
    ("llama", dict(attention_dropout=1.5), "attention_dropout must be a number in [0, 1) or null, got 1.5"),
    ("llama", dict(attention_bias="false"), "attention_bias must be true or false, got 'false'"),
    ("gpt_neo", dict(attention_types="global"), "attention_types must be a list or null, got 'global'"),
    ("gpt_neo", dict(attention_types=[[["global"], 10**18]]), "makes 1000000000000000000 layers"),
    ("gpt_neo", dict(attention_types=[[["global"], True]]), "is not GPT-Neo's [[[kinds...], repeat], ...] form"),
    ("gpt_neo", dict(window_size=0), "window_size must be a positive integer, got 0"),
])
def test_a_config_value_of_the_wrong_type_is_refused(copy, tmp_path, capfd, kind, changes, message):
    folder = copy(kind)
    set_config(folder, **changes)
    refused(folder, tmp_path, capfd, message)


@pytest.mark.parametrize("text, message", [
    ("[" * 100_000, "is not valid JSON"),  # nested deeper than the JSON reader recurses
    ('{"model_type": "gpt2", "n_layer": 1' + "0" * 5000 + "}", "is not valid JSON"),  # past int()'s digit limit
])
def test_a_config_json_that_cannot_be_read_is_refused(copy, tmp_path, capfd, text, message):
    folder = copy("gpt2")
    (folder / "config.json").write_text(text)
    refused(folder, tmp_path, capfd, message)


# -----------------------------------------------------------------------------
# Tensors: floating point and finite


def damage(folder, name: str, change) -> None:
    state = load_file(folder / "model.safetensors")
    state[name] = change(state[name])
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def with_value(value):
    def change(t):
        t = t.clone()
        t.view(-1)[3] = value
        return t
    return change


@pytest.mark.parametrize("kind, name, change, message", [
    ("gpt2", "transformer.h.1.mlp.c_fc.weight", with_value(float("nan")), "holds NaN or inf values"),
    ("gpt2", "transformer.wte.weight", with_value(float("inf")), "holds NaN or inf values"),
    ("llama", "model.norm.weight", with_value(float("-inf")), "holds NaN or inf values"),
    ("llama", "model.layers.0.self_attn.q_proj.weight", lambda t: t.to(torch.bfloat16) * float("nan"),
     "holds NaN or inf values"),
    ("gpt2", "transformer.h.0.attn.c_attn.weight", lambda t: (t * 100).to(torch.int8), "is int8; tinystories imports"),
    ("llama", "model.embed_tokens.weight", lambda t: t.to(torch.float8_e4m3fn), "is float8_e4m3fn"),
    ("gpt2", "transformer.ln_f.bias", lambda t: t > 0, "is bool"),
])
def test_a_tensor_that_is_not_finite_floating_point_is_refused(copy, tmp_path, capfd, kind, name, change, message):
    folder = copy(kind)
    damage(folder, name, change)
    refused(folder, tmp_path, capfd, f"tensor {name!r} {message}")


def test_half_precision_weights_import(copy, tmp_path):
    folder = copy("llama")
    state = load_file(folder / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    import_hf(folder, tmp_path / "ckpt")
    model = load_checkpoint(tmp_path / "ckpt").model
    assert torch.equal(model.transformer.wte.weight, state["model.embed_tokens.weight"].to(torch.bfloat16).float())


def test_a_pytorch_bin_with_other_keys_than_names_is_refused(copy, tmp_path, capfd):
    folder = copy("gpt2")
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save({i: v for i, v in enumerate(state.values())}, folder / "pytorch_model.bin")
    refused(folder, tmp_path, capfd, "is not a state dict of tensors")


def test_neo_q_k_v_that_cannot_be_stacked_are_refused(copy, tmp_path, capfd):
    folder = copy("gpt_neo")
    damage(folder, "transformer.h.0.attn.attention.k_proj.weight", lambda t: t[:, :16].contiguous())
    refused(folder, tmp_path, capfd, "differ in width")


# -----------------------------------------------------------------------------
# Generating from a model with damaged weights


@pytest.fixture(scope="module")
def nan_ckpt(tmp_path_factory, bpe):
    """A checkpoint whose weights hold a NaN: what a diverged run, or a damaged import before these
    checks, would leave."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=bpe.vocab_size, dropout=0.0))
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    return save_checkpoint(tmp_path_factory.mktemp("nan") / "ckpt", model, bpe, step=1, val_loss=None)


@pytest.mark.parametrize("extra", [[], ["--temperature", "0"], ["--top-k", "5"], ["--top-p", "0.9"],
                                   ["--num-samples", "2"]])
def test_generate_on_non_finite_weights_is_one_line(nan_ckpt, capfd, extra):
    capfd.readouterr()
    code = main(["generate", "--checkpoint", str(nan_ckpt), "--prompt", "Once upon a time", "--seed", "1",
                 "--max-new-tokens", "5", *extra])
    err = capfd.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error" in line]
    assert errors == ["tinystories generate: error: the model's logits are not finite (NaN or inf) at step 1: "
                      "its weights are damaged"], err


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_api_on_non_finite_weights_raises_user_error(nan_ckpt, use_cache):
    ckpt = load_checkpoint(nan_ckpt)
    with pytest.raises(UserError, match="not finite .* at step 1"):
        generate(ckpt.model, [[ckpt.tokenizer.eot_id]], 5, temperature=0, use_cache=use_cache)
