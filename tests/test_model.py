"""The model and its config: parameter counts, causality, initial loss, tying, validation."""

import json
import math
import subprocess
import sys
import time

import pytest
import torch

from tinystories.config import PRESETS, ModelConfig, get_preset
from tinystories.errors import UserError
from tinystories.model import GPT


def small_config(**kw):
    base = dict(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=97, dropout=0.0)
    return ModelConfig(**{**base, **kw})


def test_33m_parameter_counts():
    model = GPT(get_preset("33m"))
    assert model.num_params() == 30_142_848
    assert model.num_params(non_embedding=True) == 10_647_552


def test_tiny_parameter_count_matches_docs():
    assert GPT(get_preset("tiny")).num_params() == 1_164_160  # README's preset table, config.py


def test_tied_weights_share_storage():
    model = GPT(small_config())
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_initial_loss_is_about_ln_vocab():
    torch.manual_seed(0)
    config = small_config(vocab_size=2048)
    model = GPT(config).eval()
    x = torch.randint(0, config.vocab_size, (8, config.block_size))
    y = torch.randint(0, config.vocab_size, (8, config.block_size))
    _, loss = model(x, y)
    assert abs(loss.item() - math.log(config.vocab_size)) < 0.1


def test_residual_projections_are_scaled_at_init():
    torch.manual_seed(0)
    config = small_config(n_layer=8, n_embd=256)
    model = GPT(config)
    std_proj = model.transformer.h[0].attn.c_proj.weight.std().item()
    std_fc = model.transformer.h[0].mlp.c_fc.weight.std().item()
    assert abs(std_fc - 0.02) < 0.002
    assert abs(std_proj - 0.02 / math.sqrt(2 * config.n_layer)) < 0.001


def test_causality():
    """Changing token t+1 leaves the logits at positions <= t unchanged."""
    torch.manual_seed(0)
    model = GPT(small_config()).eval()
    x = torch.randint(0, 97, (2, 20))
    logits, _ = model(x)
    for t in (0, 7, 18):
        x2 = x.clone()
        x2[:, t + 1] = (x2[:, t + 1] + 1) % 97
        logits2, _ = model(x2)
        assert torch.equal(logits[:, : t + 1], logits2[:, : t + 1])
        assert not torch.allclose(logits[:, t + 1], logits2[:, t + 1])


def test_kv_cache_matches_full_forward():
    torch.manual_seed(0)
    model = GPT(small_config()).eval()
    x = torch.randint(0, 97, (3, 24))
    full, _ = model(x)
    cache = model.new_kv_cache(batch_size=3)
    pre, _ = model(x[:, :10], kv_cache=cache)
    steps = [model(x[:, t : t + 1], kv_cache=cache)[0] for t in range(10, 24)]
    torch.testing.assert_close(torch.cat([pre, *steps], dim=1), full, atol=1e-5, rtol=1e-5)


def test_loss_ignores_minus_one_targets():
    torch.manual_seed(0)
    model = GPT(small_config()).eval()
    x = torch.randint(0, 97, (1, 16))
    y = x.roll(-1, dims=1)
    _, loss_all = model(x[:, :8], y[:, :8])
    y_masked = y.clone()
    y_masked[:, 8:] = -1
    _, loss_masked = model(x, y_masked)
    torch.testing.assert_close(loss_all, loss_masked)


def test_too_long_input_is_refused():
    model = GPT(small_config())
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(n_embd=100, n_head=6), "divisible"),
        (dict(n_layer=0), "n_layer"),
        (dict(vocab_size=-5), "vocab_size"),
        (dict(dropout=1.5), "dropout"),
    ],
)
def test_impossible_configs_are_rejected(bad, message):
    with pytest.raises(UserError, match=message):
        small_config(**bad)


def test_config_json_round_trip():
    for config in PRESETS.values():
        assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(UserError, match="unknown"):
        ModelConfig.from_dict({"n_layers": 3})


def test_unknown_preset():
    with pytest.raises(UserError, match="tiny"):
        get_preset("huge")


def test_help_is_fast_and_does_not_import_torch():
    code = "import sys, tinystories.cli as c; c.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tinystories", "--help"], capture_output=True, check=True)
    assert time.perf_counter() - start < 1.0
