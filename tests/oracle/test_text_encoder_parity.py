"""Our TextEncoder is CLIP's text model: transformers' `CLIPTextModel` with random weights, converted with
`minildm.convert_text`, gives the same per-token vectors on the same ids. SD 1 reads the last layer through the
final norm (quick_gelu), SD 2 the penultimate layer through the final norm (gelu). SD 2's single files hold the same
weights in OpenCLIP's layout, q/k/v fused: written here from the transformers weights, they load to the same model.

Every weight is random, LayerNorm scales and all biases included, so a norm or bias that is skipped or misplaced
cannot hide behind weight 1 / bias 0.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from minildm.convert_text import (  # noqa: E402
    text_encoder_config_from_transformers,
    text_encoder_from_compvis,
    text_encoder_from_transformers,
)
from minildm.text import TextEncoder, TextEncoderConfig  # noqa: E402

pytestmark = pytest.mark.oracle

SMALL = dict(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)
STYLES = {  # name -> (CLIPTextConfig options, our output_layer)
    "sd1": (dict(SMALL, hidden_act="quick_gelu"), -1),
    "sd2": (dict(SMALL, hidden_act="gelu", layer_norm_eps=1e-6), -2),
}
RTOL = 1e-4
_cache: dict = {}


def clip_model(style: str):
    """A transformers CLIPTextModel with random weights, built once per style; and its config as a dict."""
    if style not in _cache:
        options, _ = STYLES[style]
        torch.manual_seed(0)
        config = transformers.CLIPTextConfig(**options)
        model = transformers.CLIPTextModel(config).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.1)
                elif "norm" in name:                               # LayerNorm scales: around 1, never exactly
                    p.copy_(1 + 0.2 * torch.randn_like(p))
        _cache[style] = model, config.to_diff_dict()
    return _cache[style]


def reference(style: str, ids: torch.Tensor) -> torch.Tensor:
    """What SD reads: the last hidden state (SD 1), or final_layer_norm(hidden_states[-2]) (SD 2)."""
    model, _ = clip_model(style)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        if STYLES[style][1] == -1:
            return out.last_hidden_state
        return model.final_layer_norm(out.hidden_states[-2])


def ids_for(style: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, SMALL["vocab_size"], (2, SMALL["max_position_embeddings"]), generator=g)


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def transformers_state_dict(style: str, prefix: bool, position_ids: bool) -> dict:
    model, _ = clip_model(style)
    sd = {k: v.clone() for k, v in model.state_dict().items() if k != "embeddings.position_ids"}
    if position_ids:
        sd["embeddings.position_ids"] = torch.arange(SMALL["max_position_embeddings"])[None]
    if prefix:                                      # the layout of files saved by transformers 4 and of SD folders
        sd = {f"text_model.{k}": v for k, v in sd.items()}
    return sd


def openclip_state_dict(style: str) -> dict:
    """The transformers weights in OpenCLIP's key layout (SD 2's FrozenOpenCLIPEmbedder), q/k/v fused in one
    in_proj, inside a whole single file: the test's own inverse of OPENCLIP_TEXT_RULES and split_fused_qkv."""
    sd = transformers_state_dict(style, prefix=False, position_ids=False)
    out = {"token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
           "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
           "ln_final.weight": sd.pop("final_layer_norm.weight"), "ln_final.bias": sd.pop("final_layer_norm.bias"),
           "text_projection": torch.randn(SMALL["hidden_size"], 32), "logit_scale": torch.tensor(4.6)}
    for i in range(SMALL["num_hidden_layers"]):
        ours, theirs = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{theirs}attn.in_proj_{kind}"] = torch.cat([sd.pop(f"{ours}self_attn.{n}_proj.{kind}") for n in "qkv"])
            for old, new in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                             ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[f"{theirs}{new}.{kind}"] = sd.pop(f"{ours}{old}.{kind}")
    assert not sd, f"keys the inverse table forgot: {sorted(sd)}"
    whole = {f"cond_stage_model.model.{k}": v for k, v in out.items()}
    whole["model.diffusion_model.conv_in.weight"] = torch.zeros(1)        # the rest of a single file: not ours
    whole["first_stage_model.decoder.conv_out.bias"] = torch.zeros(1)
    return whole


def our_config(style: str) -> TextEncoderConfig:
    return text_encoder_config_from_transformers(clip_model(style)[1], output_layer=STYLES[style][1])


@pytest.mark.parametrize("prefix", [True, False], ids=["text_model_prefix", "no_prefix"])
@pytest.mark.parametrize("position_ids", [True, False], ids=["position_ids", "no_position_ids"])
@pytest.mark.parametrize("style", STYLES)
def test_converted_clip_text_model_gives_what_sd_reads_within_1e_4(style, prefix, position_ids):
    _, config = clip_model(style)
    ours = text_encoder_from_transformers(config, transformers_state_dict(style, prefix, position_ids),
                                          output_layer=STYLES[style][1]).eval()
    assert ours.config.activation == STYLES[style][0]["hidden_act"]
    ids = ids_for(style)
    with torch.no_grad():
        error = relative_error(ours(ids), reference(style, ids))
    assert error <= RTOL, f"{style}: relative error {error:.2e}"


def test_sd2_reads_the_penultimate_layer_not_the_last():
    """The SD 2 comparison above must be able to fail: the last layer's output is a different context."""
    _, config = clip_model("sd2")
    last = text_encoder_from_transformers(config, transformers_state_dict("sd2", True, True), output_layer=-1)
    ids = ids_for("sd2")
    with torch.no_grad():
        assert relative_error(last(ids), reference("sd2", ids)) > 0.05


def test_openclip_layout_loads_the_same_model_as_transformers_layout():
    from_openclip = text_encoder_from_compvis(openclip_state_dict("sd2"), "sd2", config=our_config("sd2")).eval()
    from_transformers = text_encoder_from_transformers(clip_model("sd2")[1], transformers_state_dict("sd2", 1, 0),
                                                       output_layer=-2)
    a, b = from_openclip.state_dict(), from_transformers.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = ids_for("sd2")
    with torch.no_grad():
        error = relative_error(from_openclip(ids), reference("sd2", ids))
    assert error <= RTOL, f"OpenCLIP layout: relative error {error:.2e}"


def test_sd1_single_file_keys_load_under_the_cond_stage_model_prefix():
    sd = transformers_state_dict("sd1", prefix=True, position_ids=True)
    whole = {f"cond_stage_model.transformer.{k}": v for k, v in sd.items()}
    whole["model.diffusion_model.out.2.bias"] = torch.zeros(4)
    ours = text_encoder_from_compvis(whole, "sd1", config=our_config("sd1")).eval()
    ids = ids_for("sd1")
    with torch.no_grad():
        assert relative_error(ours(ids), reference("sd1", ids)) <= RTOL


@pytest.mark.parametrize("layout", ["transformers", "openclip"])
def test_a_key_no_rule_explains_is_a_one_line_error_naming_it(layout):
    if layout == "transformers":
        sd = transformers_state_dict("sd1", prefix=True, position_ids=False)
        sd["text_model.encoder.layers.0.self_attn.rotary.weight"] = torch.zeros(3)
        load = lambda: text_encoder_from_transformers(clip_model("sd1")[1], sd)  # noqa: E731
    else:
        sd = openclip_state_dict("sd2")
        sd["cond_stage_model.model.transformer.resblocks.0.attn.rotary"] = torch.zeros(3)
        load = lambda: text_encoder_from_compvis(sd, "sd2", config=our_config("sd2"))  # noqa: E731
    with pytest.raises(ValueError, match="unexpected keys.*rotary") as err:
        load()
    assert "\n" not in str(err.value)
    assert [k for k in sd if "rotary" in k][0] in str(err.value)         # the key as the file spells it


@pytest.mark.parametrize("change, message", [
    ({"hidden_act": "relu"}, r"hidden_act 'relu' is not supported"),
    ({"rope_theta": 10000.0}, r"unknown CLIPTextConfig keys \['rope_theta'\]"),
])
def test_config_options_that_change_the_math_are_refused(change, message):
    with pytest.raises(ValueError, match=message) as err:
        text_encoder_config_from_transformers({**clip_model("sd1")[1], **change})
    assert "\n" not in str(err.value)


def test_an_unknown_variant_is_a_one_line_error():
    with pytest.raises(ValueError, match=re.escape("variant 'sdxl' is not one of ['sd1', 'sd2']")):
        text_encoder_from_compvis({}, "sdxl")


@pytest.mark.parametrize("variant, options, count", [
    ("sd1", dict(hidden_act="quick_gelu"), 123_060_480),             # CLIP ViT-L/14, SD 1's text encoder
    ("sd2", dict(hidden_act="gelu", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                 num_attention_heads=16), None),                       # OpenCLIP ViT-H/14's text model, all 24 blocks
])
def test_full_size_configs_have_clips_parameter_counts(variant, options, count):
    full = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    config = transformers.CLIPTextConfig(**{**full, **options})
    with torch.device("meta"):
        theirs = sum(p.numel() for p in transformers.CLIPTextModel(config).parameters())
        ours = TextEncoder(TextEncoderConfig.sd_v1() if variant == "sd1" else TextEncoderConfig.sd_v2())
        from_config = TextEncoder(text_encoder_config_from_transformers(config.to_diff_dict()))
    assert sum(p.numel() for p in ours.parameters()) == theirs == sum(p.numel() for p in from_config.parameters())
    if count is not None:
        assert theirs == count
