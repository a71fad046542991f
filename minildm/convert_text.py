"""Other people's CLIP text encoder weights -> our `TextEncoder`, by renaming rules, as convert.py does for the VAE and
the U-Net (never a 1,000-line key table).

Three layouts hold the text encoder Stable Diffusion reads:

- transformers' `CLIPTextModel` (a diffusers folder's `text_encoder/`, SD 1 and 2):
  `text_model.encoder.layers.3.self_attn.q_proj.weight` (the `text_model.` prefix is absent in some files)
- CompVis SD 1 single files: the same names behind `cond_stage_model.transformer.`
- CompVis SD 2 single files, OpenCLIP's names behind `cond_stage_model.model.`:
  `transformer.resblocks.3.attn.in_proj_weight`, which holds q, k and v stacked in one (3D, D) matrix

All three are the same computation as our `TextEncoder`: causal attention with biases on q, k, v and out, pre-norm
blocks, token + position embeddings (positions 0..L-1), a final LayerNorm. What differs between SD 1 and SD 2 is in
the config: the activation (quick_gelu / gelu) and the block whose output SD reads (the last / the penultimate).
Plain dicts in, our module out: nothing here imports transformers.
"""

from __future__ import annotations

import re

from torch import Tensor

from minildm.convert import Rule, load_renamed, rename_keys
from minildm.text import TextEncoder, TextEncoderConfig

# transformers CLIPTextModel -> ours. Keys no rule touches (token_embedding.weight after the first two rules) are
# already spelled the same.
TRANSFORMERS_TEXT_RULES: list[Rule] = [
    (r"^text_model\.", ""),                                          # CLIPTextModel wraps CLIPTextTransformer
    (r"^embeddings\.(token|position)_embedding\.", r"\1_embedding."),
    (r"^encoder\.layers\.(\d+)\.", r"blocks.\1."),
    (r"\.self_attn\.(q|k|v)_proj\.", r".attn.to_\1."),
    (r"\.self_attn\.out_proj\.", ".attn.to_out."),
    (r"\.layer_norm(1|2)\.", r".norm\1."),
    (r"\.mlp\.fc1\.", ".mlp.0."),                                    # our mlp is Sequential(Linear, act, Linear)
    (r"\.mlp\.fc2\.", ".mlp.2."),
    (r"^final_layer_norm\.", "final_norm."),
]
# OpenCLIP (SD 2's FrozenOpenCLIPEmbedder) -> ours; the fused in_proj is split afterwards (split_fused_qkv).
OPENCLIP_TEXT_RULES: list[Rule] = [
    (r"^positional_embedding$", "position_embedding.weight"),       # a bare Parameter there, an Embedding here
    (r"^transformer\.resblocks\.(\d+)\.", r"blocks.\1."),
    (r"\.ln_(1|2)\.", r".norm\1."),
    (r"\.attn\.out_proj\.", ".attn.to_out."),
    (r"\.mlp\.c_fc\.", ".mlp.0."),
    (r"\.mlp\.c_proj\.", ".mlp.2."),
    (r"^ln_final\.", "final_norm."),
]
# Keys a file may hold that our encoder does not need: transformers' position_ids buffer (always 0..L-1: we make
# it in forward), and OpenCLIP's projection into the image-text space and its temperature, which only CLIP's
# contrastive training reads (SD reads the per-token vectors, before any projection).
UNUSED_TRANSFORMERS_KEYS = ("embeddings.position_ids", "text_model.embeddings.position_ids")
UNUSED_OPENCLIP_KEYS = ("text_projection", "logit_scale")

COMPVIS_PREFIXES = {"sd1": "cond_stage_model.transformer.", "sd2": "cond_stage_model.model."}
VARIANT_CONFIGS = {"sd1": TextEncoderConfig.sd_v1, "sd2": TextEncoderConfig.sd_v2}

# CLIPTextConfig keys that do not change what the model computes at inference: bookkeeping, dropout (off in eval),
# the token ids used by the pooled output and the projection size of CLIPTextModelWithProjection, neither of which
# SD reads.
IGNORED_TRANSFORMERS_KEYS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
    "attention_dropout", "dropout", "initializer_range", "initializer_factor", "projection_dim", "pad_token_id",
    "bos_token_id", "eos_token_id", "chunk_size_feed_forward", "id2label", "label2id", "is_encoder_decoder",
    "output_attentions", "output_hidden_states", "problem_type", "return_dict", "use_return_dict",
}
TRANSFORMERS_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,   # CLIPTextConfig's
                         "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77,
                         "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}


def text_encoder_config_from_transformers(config: dict, output_layer: int = -1) -> TextEncoderConfig:
    """Read a transformers `CLIPTextConfig` dict (a `text_encoder/config.json`), refusing options that would change
    the math we implement. A missing key takes transformers' default, so we build the model transformers would.

    `output_layer`: -1 reads the last block (SD 1, and diffusers' SD 2 folders, whose text encoder was saved with
    the unused 24th block already dropped), -2 the penultimate block (a full OpenCLIP model, as SD 2 reads it).
    """
    config = {k: v for k, v in config.items() if not k.startswith("_")}     # _name_or_path, _commit_hash, ...
    unknown = sorted(set(config) - set(TRANSFORMERS_DEFAULTS) - IGNORED_TRANSFORMERS_KEYS)
    if unknown:
        raise ValueError(f"unknown CLIPTextConfig keys {unknown}: they may change what the model computes, which we "
                         f"do not implement; drop them from the dict only if you know they are at a no-op value")
    get = {**TRANSFORMERS_DEFAULTS, **config}.get
    if get("hidden_act") not in ("quick_gelu", "gelu"):
        raise ValueError(f"hidden_act {get('hidden_act')!r} is not supported: CLIP text encoders use 'quick_gelu' "
                         f"(OpenAI, SD 1) or 'gelu' (OpenCLIP, SD 2)")
    return TextEncoderConfig(
        vocab_size=get("vocab_size"), max_length=get("max_position_embeddings"), dim=get("hidden_size"),
        depth=get("num_hidden_layers"), heads=get("num_attention_heads"), activation=get("hidden_act"),
        intermediate_size=get("intermediate_size"), layer_norm_eps=get("layer_norm_eps"), output_layer=output_layer)


def drop_keys(state_dict: dict[str, Tensor], unused: tuple[str, ...]) -> dict[str, Tensor]:
    return {k: v for k, v in state_dict.items() if k not in unused}


def split_fused_qkv(state_dict: dict[str, Tensor], origin: dict[str, str]) -> dict[str, Tensor]:
    """OpenCLIP's `attn.in_proj_weight` (3D, D) is q, k and v stacked in that order (torch's nn.MultiheadAttention):
    three row blocks become our to_q, to_k, to_v; `in_proj_bias` (3D,) likewise. `origin` is updated for messages."""
    out: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        stem, fused, kind = key.rpartition(".attn.in_proj_")
        if not fused:
            out[key] = tensor
            continue
        if tensor.shape[0] % 3:
            raise ValueError(f"{origin.get(key, key)}: shape {tuple(tensor.shape)} does not stack three equal q, k, v "
                             f"blocks; the file is not an OpenCLIP text model")
        for name, part in zip("qkv", tensor.chunk(3, dim=0)):                   # 3 x (D, D) or 3 x (D,)
            out[f"{stem}.attn.to_{name}.{kind}"] = part
            origin[f"{stem}.attn.to_{name}.{kind}"] = origin.get(key, key)
        origin.pop(key, None)
    return out


def text_encoder_from_transformers(config: dict, state_dict: dict[str, Tensor],
                                   output_layer: int = -1) -> TextEncoder:
    """Build our text encoder from a transformers `CLIPTextModel` config dict and state dict (SD's `text_encoder/`).

    With or without the `text_model.` prefix and the `position_ids` buffer; e.g.
    `text_model.encoder.layers.3.self_attn.out_proj.weight` -> `blocks.3.attn.to_out.weight`.
    """
    model = TextEncoder(text_encoder_config_from_transformers(config, output_layer))
    renamed, origin = rename_keys(drop_keys(state_dict, UNUSED_TRANSFORMERS_KEYS), TRANSFORMERS_TEXT_RULES)
    return load_renamed(model, renamed, origin, "transformers CLIPTextModel state dict")


def text_encoder_from_compvis(state_dict: dict[str, Tensor], variant: str,
                              config: TextEncoderConfig | None = None) -> TextEncoder:
    """Build our text encoder from an SD single file's `cond_stage_model.` keys: variant "sd1" (OpenAI CLIP in
    transformers' layout) or "sd2" (OpenCLIP's layout, its q, k, v fused). `config` defaults to the variant's
    full-size encoder (`TextEncoderConfig.sd_v1()` / `sd_v2()`).

    Pass the whole checkpoint or only the text encoder's keys: if any key starts with the variant's prefix, only
    those keys are the text encoder (the rest are the U-Net and the VAE) and the prefix is dropped.
    """
    if variant not in COMPVIS_PREFIXES:
        raise ValueError(f"variant {variant!r} is not one of {sorted(COMPVIS_PREFIXES)}: 'sd1' for keys under "
                         f"{COMPVIS_PREFIXES['sd1']!r}, 'sd2' for keys under {COMPVIS_PREFIXES['sd2']!r}")
    prefix = COMPVIS_PREFIXES[variant]
    if any(k.startswith(prefix) for k in state_dict):     # a whole checkpoint: keep ours, drop the prefix by a rule
        state_dict = {k: v for k, v in state_dict.items() if k.startswith(prefix)}   # so messages name file keys
    strip_prefix: Rule = ("^" + re.escape(prefix), "")
    model = TextEncoder(config or VARIANT_CONFIGS[variant]())
    if variant == "sd1":
        unused = tuple(k for name in UNUSED_TRANSFORMERS_KEYS for k in (name, prefix + name))
        renamed, origin = rename_keys(drop_keys(state_dict, unused), [strip_prefix, *TRANSFORMERS_TEXT_RULES])
    else:
        unused = tuple(k for name in UNUSED_OPENCLIP_KEYS for k in (name, prefix + name))
        renamed, origin = rename_keys(drop_keys(state_dict, unused), [strip_prefix, *OPENCLIP_TEXT_RULES])
        renamed = split_fused_qkv(renamed, origin)
    return load_renamed(model, renamed, origin, f"CompVis {variant.upper()} text encoder state dict")


__all__ = ["OPENCLIP_TEXT_RULES", "TRANSFORMERS_TEXT_RULES", "split_fused_qkv", "text_encoder_config_from_transformers",
           "text_encoder_from_compvis", "text_encoder_from_transformers"]
