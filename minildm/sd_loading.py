"""Chapter 09: loading Stable Diffusion as users have it, into minildm's own modules.

Two layouts exist in the wild, and both become a `LatentDiffusion`:

- a diffusers folder: `model_index.json` and one folder per part (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`,
  `scheduler/`), each with its config. The configs say everything; the converters in convert.py and
  convert_text.py rename the keys by rules, and the scheduler's class picks our sampler.
- a CompVis single file (`v1-5-pruned.safetensors`, `v2-1_768-ema-pruned.ckpt`): one state dict holding all three
  networks under `model.diffusion_model.`, `first_stage_model.` and `cond_stage_model.`, and no config at all. The
  U-Net's shape is read off its tensors, SD 1 vs SD 2 off the text encoder's prefix, and what no tensor says (the
  VAE's size, whether the model predicts eps or v) is SD's, or an explicit option.

Every file is read through checkpoint.load_state_dict: safetensors directly, a `.ckpt` only through
`torch.load(weights_only=True)`, so a pickle payload never runs. A key that no rule explains is an error naming it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from minildm.checkpoint import load_state_dict
from minildm.clip_tokenizer import END, MAX_LENGTH, CLIPTokenizer
from minildm.convert import (
    COMPVIS_UNET_PREFIX,
    COMPVIS_VAE_PREFIX,
    unet_config_from_compvis,
    unet_from_compvis,
    unet_from_diffusers,
    vae_from_compvis,
    vae_from_diffusers,
)
from minildm.convert_text import COMPVIS_PREFIXES, text_encoder_from_compvis, text_encoder_from_transformers
from minildm.schedule import NoiseSchedule
from minildm.text import TextEncoder

MODEL_INDEX = "model_index.json"
PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors",      # diffusers, transformers
                "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors",   # the "fp16" variant alone
                "diffusion_pytorch_model.bin", "pytorch_model.bin")                # older folders (weights_only)
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")

# diffusers scheduler class -> our sampler (samplers.SAMPLERS). SD's own folders ship PNDMScheduler (= PLMS with
# skip_prk_steps) for SD 1 and DDIMScheduler for SD 2.
SCHEDULER_SAMPLERS = {"PNDMScheduler": "plms", "DDIMScheduler": "ddim", "DDPMScheduler": "ddpm",
                      "EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler_a",
                      "HeunDiscreteScheduler": "heun", "DPMSolverMultistepScheduler": "dpmpp_2m"}

# What a single file cannot say: SD's own schedule, the same for SD 1 and SD 2 (their v1/v2-inference.yaml)
SD_SCHEDULE = dict(num_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                   steps_offset=1, set_alpha_to_one=False)


def read_part_config(folder: Path, part: str, name: str = "config.json") -> dict:
    path = folder / part / name
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: the diffusers folder has no {part}/{name}; a Stable Diffusion folder "
                                f"holds {', '.join(p + '/' for p in PARTS)}: copy the missing part from where the "
                                f"model came from")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}); restore the file from where the model came from") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(config).__name__}")
    return config


def read_part_weights(folder: Path, part: str, progress: bool = False) -> dict[str, torch.Tensor]:
    for name in WEIGHT_NAMES:
        if (folder / part / name).is_file():
            return load_state_dict(folder / part / name, f"{part} weights file", progress)
    raise FileNotFoundError(f"{folder}: {part}/ holds no weights ({' or '.join(WEIGHT_NAMES[:2])}); copy them from "
                            f"where the model came from")


def sampler_for_scheduler(config: dict, path: Path) -> str:
    name = config.get("_class_name")
    if name not in SCHEDULER_SAMPLERS:
        raise ValueError(f"{path}: scheduler class {name!r} has no minildm sampler; supported: "
                         f"{', '.join(SCHEDULER_SAMPLERS)} (pass sampler_name= to generate to choose another)")
    return SCHEDULER_SAMPLERS[name]


def load_diffusers_folder(path: str | os.PathLike, device: str | torch.device | None = None,
                          dtype: torch.dtype | None = None, guidance_scale: float = 7.5, steps: int = 50,
                          progress: bool = False):
    """A diffusers Stable Diffusion folder -> `LatentDiffusion`. The text encoder's output is its last hidden state
    (SD 1; SD 2's diffusers folders store the text encoder with its 24th block already dropped, so the last of the
    23 is SD 2's penultimate); the scheduler's class picks the sampler and its config the NoiseSchedule.
    `progress`: a bar over each part's weights file as it is read (checkpoint.load_state_dict)."""
    from minildm.pipeline import LatentDiffusion  # pipeline imports us for from_pretrained

    folder = Path(path)
    if not (folder / MODEL_INDEX).is_file():
        raise FileNotFoundError(f"{folder}: not a diffusers folder (no {MODEL_INDEX}); give a folder saved by "
                                f"diffusers' save_pretrained, or a single .safetensors/.ckpt file")
    index = read_part_config(folder, ".", MODEL_INDEX)
    if "text_encoder_2" in index or "unet" not in index:
        raise ValueError(f"{folder / MODEL_INDEX}: a {index.get('_class_name', 'pipeline')!r} folder, not Stable "
                         f"Diffusion 1.x/2.x (it has {'text_encoder_2, as SDXL' if 'unet' in index else 'no unet'}); "
                         f"minildm loads SD 1 and SD 2 folders")
    missing = [part for part in PARTS if not (folder / part).is_dir()]
    if missing:
        raise FileNotFoundError(f"{folder}: the diffusers folder lacks {', '.join(p + '/' for p in missing)}; a "
                                f"Stable Diffusion folder holds {', '.join(p + '/' for p in PARTS)}: copy the "
                                f"missing part from where the model came from")
    scheduler_config = read_part_config(folder, "scheduler", "scheduler_config.json")
    sampler_name = sampler_for_scheduler(scheduler_config, folder / "scheduler" / "scheduler_config.json")
    schedule = NoiseSchedule.from_diffusers_config(scheduler_config)
    unet = on_meta(unet_from_diffusers, read_part_config(folder, "unet"), read_part_weights(folder, "unet", progress))
    vae = on_meta(vae_from_diffusers, read_part_config(folder, "vae"), read_part_weights(folder, "vae", progress))
    text_encoder = on_meta(text_encoder_from_transformers, read_part_config(folder, "text_encoder"),
                           read_part_weights(folder, "text_encoder", progress))
    tokenizer = clip_tokenizer_from_folder(folder / "tokenizer")
    return assemble(LatentDiffusion, vae, unet, text_encoder, tokenizer, schedule, device, dtype, guidance_scale,
                    sampler_name, steps)


def on_meta(build, *args, **kwargs):
    """Build a model on the meta device (shapes only, no memory, no random init) and let the converter assign the
    file's tensors to it (checkpoint.load_strict does when the model is on meta), so a load holds each weight once,
    not twice. The one tensor a file does not hold, the text encoder's causal mask, is made afterwards."""
    with torch.device("meta"):
        model = build(*args, **kwargs)
    for module in model.modules():
        if isinstance(module, TextEncoder):
            length = module.config.max_length
            module.causal_mask = torch.ones(length, length, dtype=torch.bool).tril()        # (L, L)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{type(model).__name__}: {left[0]} was not loaded (still on the meta device)")
    return model


def clip_tokenizer_from_folder(folder: Path) -> CLIPTokenizer:
    """A `tokenizer/` folder: vocab.json + merges.txt (as SD's folders on the Hub have them), or, when neither is
    there, the single tokenizer.json that transformers 5 writes (its "model" holds the same vocab and merges)."""
    halves = (folder / "vocab.json").exists() or (folder / "merges.txt").exists()
    if halves or not (folder / "tokenizer.json").is_file():
        return CLIPTokenizer.from_folder(folder)                    # names whichever of the two is missing
    path = folder / "tokenizer.json"
    try:
        model = json.loads(path.read_text(encoding="utf-8"))["model"]
        vocab = model["vocab"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a BPE tokenizer.json ({type(err).__name__}: {err}); put CLIP's vocab.json and "
                         f"merges.txt in {folder} instead") from err
    config = {}
    if (folder / "tokenizer_config.json").is_file():
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    pad = config.get("pad_token", END)
    pad = pad.get("content", END) if isinstance(pad, dict) else pad
    length = config.get("model_max_length", MAX_LENGTH)
    length = length if isinstance(length, int) and 2 <= length <= 10_000 else MAX_LENGTH
    return CLIPTokenizer(vocab, merges, pad_token=pad, max_length=length)


def assemble(cls, vae, unet, text_encoder, tokenizer, schedule, device, dtype, guidance_scale, sampler_name, steps):
    from minildm.device import default_dtype, get_device

    device = get_device(device)
    dtype = default_dtype(device) if dtype is None else dtype
    return cls(vae, unet, text_encoder, tokenizer, schedule, device, guidance_scale, sampler_name, steps, dtype=dtype)


def sd_variant(state_dict: dict[str, torch.Tensor], path: Path) -> str:
    """"sd1" (OpenAI CLIP under cond_stage_model.transformer.) or "sd2" (OpenCLIP under cond_stage_model.model.)."""
    found = [v for v, prefix in COMPVIS_PREFIXES.items() if any(k.startswith(prefix) for k in state_dict)]
    parts = {"U-Net": COMPVIS_UNET_PREFIX, "VAE": COMPVIS_VAE_PREFIX}
    absent = [name for name, prefix in parts.items() if not any(k.startswith(prefix) for k in state_dict)]
    if len(found) != 1 or absent:
        some = ", ".join(sorted(state_dict)[:3]) or "no keys at all"
        raise ValueError(f"{path}: not a Stable Diffusion 1/2 checkpoint: it needs keys under {COMPVIS_UNET_PREFIX}, "
                         f"{COMPVIS_VAE_PREFIX} and {COMPVIS_PREFIXES['sd1']} (SD 1) or {COMPVIS_PREFIXES['sd2']} "
                         f"(SD 2), found e.g. {some}")
    return found[0]


def load_single_file(path: str | os.PathLike, device: str | torch.device | None = None,
                     dtype: torch.dtype | None = None, prediction_type: str = "epsilon", ema: bool = False,
                     vae_config=None, text_encoder_config=None, heads: int | tuple[int, ...] | None = None,
                     norm_num_groups: int = 32, sampler_name: str = "ddim", guidance_scale: float = 7.5,
                     steps: int = 50, progress: bool = False):
    """A CompVis single file (.safetensors, or .ckpt read with weights_only=True) -> `LatentDiffusion`.

    SD 1 vs SD 2 comes from the text encoder's keys. The file does not say whether the model predicts eps or v:
    the default is "epsilon" (SD 1.x, SD 2.x base at 512); SD 2.x 768 models are v-prediction: pass
    prediction_type="v_prediction". The VAE and text encoder are SD's full-size ones unless `vae_config` /
    `text_encoder_config` say otherwise; the U-Net is read off the tensors (`heads`, `norm_num_groups` as in
    convert.unet_config_from_compvis). The tokenizer is CLIP's shipped vocabulary, padded as each SD pads.
    `progress`: a bar over the file's bytes as it is read (a 4 GB file takes a while; checkpoint.load_state_dict).
    """
    from minildm.pipeline import LatentDiffusion

    path = Path(path)
    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise ValueError(f"{path}: a single-file checkpoint ends in {' or '.join(SINGLE_FILE_SUFFIXES)}, got "
                         f"{path.suffix or 'no suffix'!r}")
    state_dict = load_state_dict(path, "Stable Diffusion checkpoint", progress)
    variant = sd_variant(state_dict, path)
    unet = on_meta(unet_from_compvis, unet_config_from_compvis(state_dict, heads, norm_num_groups), state_dict, ema)
    vae = on_meta(vae_from_compvis, state_dict, vae_config)
    text_encoder = on_meta(text_encoder_from_compvis, state_dict, variant, text_encoder_config)
    tokenizer = CLIPTokenizer.shipped(pad_token="!" if variant == "sd2" else END)
    schedule = NoiseSchedule(**SD_SCHEDULE, prediction_type=prediction_type)
    return assemble(LatentDiffusion, vae, unet, text_encoder, tokenizer, schedule, device, dtype, guidance_scale,
                    sampler_name, steps)


__all__ = ["SCHEDULER_SAMPLERS", "load_diffusers_folder", "load_single_file", "sd_variant"]
