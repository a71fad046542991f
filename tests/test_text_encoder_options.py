"""TextEncoderConfig's CLIP options (activation, intermediate_size, layer_norm_eps, output_layer): what each changes,
bad values as one-line errors, and configs saved before them loading as they did. Parity with transformers' CLIP is
in tests/oracle/test_text_encoder_parity.py."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from minildm import checkpoint
from minildm.text import QuickGELU, TextEncoder, TextEncoderConfig

SMALL = dict(vocab_size=30, max_length=8, dim=32, depth=3, heads=2)


def ids() -> torch.Tensor:
    return torch.randint(0, SMALL["vocab_size"], (2, SMALL["max_length"]), generator=torch.Generator().manual_seed(0))


def test_quick_gelu_is_x_times_sigmoid_of_1_702_x():
    x = torch.linspace(-4, 4, 101)
    assert torch.equal(QuickGELU()(x), x * torch.sigmoid(1.702 * x))
    assert not torch.allclose(QuickGELU()(x), torch.nn.functional.gelu(x), atol=1e-3)


def test_intermediate_size_sets_the_mlp_width_and_none_keeps_mlp_ratio():
    wide = TextEncoder(TextEncoderConfig(**SMALL, intermediate_size=40))
    plain = TextEncoder(TextEncoderConfig(**SMALL))
    assert wide.blocks[0].mlp[0].out_features == 40
    assert plain.blocks[0].mlp[0].out_features == 4 * SMALL["dim"]


def test_layer_norm_eps_reaches_every_norm():
    encoder = TextEncoder(TextEncoderConfig(**SMALL, layer_norm_eps=1e-6))
    norms = [m for m in encoder.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * SMALL["depth"] + 1 and all(m.eps == 1e-6 for m in norms)


def test_penultimate_output_ignores_the_last_block_and_differs_from_the_last():
    torch.manual_seed(0)
    last = TextEncoder(TextEncoderConfig(**SMALL)).eval()
    penultimate = TextEncoder(TextEncoderConfig(**SMALL, output_layer=-2)).eval()
    penultimate.load_state_dict(last.state_dict())             # same weights: output_layer adds no parameters
    with torch.no_grad():
        before = penultimate(ids())
        for p in penultimate.blocks[-1].parameters():
            p.add_(1.0)
        assert torch.equal(penultimate(ids()), before)
        assert not torch.allclose(last(ids()), before, atol=1e-3)


@pytest.mark.parametrize("change, message", [
    ({"activation": "relu"}, r"activation 'relu' is not one of \('gelu', 'quick_gelu'\)"),
    ({"intermediate_size": 0}, r"intermediate_size must be a positive width or None"),
    ({"output_layer": 0}, r"output_layer 0 names no block of 3: use -1"),
    ({"output_layer": -4}, r"output_layer -4 names no block of 3"),
])
def test_bad_clip_options_are_one_line_errors(change, message):
    with pytest.raises(ValueError, match=message) as err:
        TextEncoderConfig(**SMALL, **change)
    assert "\n" not in str(err.value)


def test_a_config_saved_before_the_clip_options_loads_with_their_old_behaviour(monkeypatch):
    monkeypatch.setattr(checkpoint, "WARNED", set())           # each warning is said once per session
    full = dataclasses.asdict(TextEncoderConfig(**SMALL))
    old = {k: v for k, v in full.items() if k not in ("activation", "intermediate_size", "layer_norm_eps",
                                                      "output_layer")}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = TextEncoderConfig.from_dict(old, "old/config.json")
    assert config == TextEncoderConfig(**SMALL)
    assert sorted(str(w.message).split("'")[1] for w in caught if "added later" in str(w.message)) == [
        "activation", "intermediate_size", "layer_norm_eps", "output_layer"]


def test_the_full_size_configs_are_clip_vit_l_and_openclip_vit_h():
    with torch.device("meta"):
        sd1 = TextEncoder(TextEncoderConfig.sd_v1())
        sd2 = TextEncoder(TextEncoderConfig.sd_v2())
    assert sum(p.numel() for p in sd1.parameters()) == 123_060_480
    assert (sd2.config.dim, sd2.config.depth, sd2.config.output_layer, sd2.config.activation) == (1024, 24, -2, "gelu")
