"""Stable Diffusion as users have it loads into minildm and makes diffusers' images from the same noise.

No SD weights can be downloaded here, so the test assembles diffusers' own `StableDiffusionPipeline` offline: SD
1.5's layout at a reduced width (U-Net, VAE, CLIP text model with random weights), the real CLIP tokenizer written
from the vocabulary minildm ships, SD's DDIM or PNDM scheduler config. `save_pretrained` writes a diffusers folder,
which `LatentDiffusion.from_pretrained` loads; the same weights are also written as a CompVis single file (with the
test-local inverse tables of tests/oracle/test_unet_compvis.py and test_vae_parity.py). Then both pipelines start
from the same explicit latents and must agree on the prompt embeddings, the final latents and the images.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402

from minildm.autoencoder import AutoencoderConfig  # noqa: E402
from minildm.clip_tokenizer import CLIPTokenizer  # noqa: E402
from minildm.pipeline import LatentDiffusion  # noqa: E402
from minildm.text import TextEncoderConfig  # noqa: E402

pytestmark = [pytest.mark.oracle, pytest.mark.usefixtures("one_thread")]    # one_thread: tests/conftest.py

RTOL = 1e-4                                    # of max |diffusers' value|
SD_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
SD_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
UNET = dict(block_out_channels=(32, 64, 64, 64), down_block_types=SD_DOWN, up_block_types=SD_UP, layers_per_block=2,
            attention_head_dim=8, norm_num_groups=8, cross_attention_dim=32)           # SD 1.5's, narrower
VAE = dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
TEXT = dict(vocab_size=49408, max_position_embeddings=77, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, hidden_act="quick_gelu")
SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                steps_offset=1, set_alpha_to_one=False)                                 # SD's scheduler_config.json
PROMPTS = ["a photograph of an astronaut riding a horse, 4k", "a cat, sitting!"]
NEGATIVE = ["blurry, low quality", ""]
HEIGHT, WIDTH, STEPS = 64, 96, 4               # non-square; latents (2, 4, 16, 24) with this 3-level VAE (f = 4)


@contextmanager
def offline():
    """HF_HUB_OFFLINE=1 only while diffusers/transformers build and save, so nothing is fetched."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Norm scales around 1 and shifts around 0, so a norm loaded into the wrong place cannot hide."""
    for module in model.modules():
        if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            torch.nn.init.normal_(module.weight, 1.0, 0.5)
            torch.nn.init.normal_(module.bias, 0.0, 0.5)
    return model.eval()


# SD 2's differences, at the same reduced width: Linear projections, heads of a fixed width (diffusers' misnamed
# attention_head_dim is the number of heads per level), OpenCLIP's gelu text encoder (a diffusers SD 2 folder stores
# it with the unused last block dropped, so its last hidden state is what the U-Net reads), the tokenizer padding
# with "!" (id 0), and v-prediction (SD 2's 768 models)
VARIANTS = {
    "sd1": dict(unet=UNET, text=TEXT, pad="<|endoftext|>", schedule={}),
    "sd2": dict(unet={**UNET, "use_linear_projection": True, "attention_head_dim": (2, 4, 4, 4)},
                text={**TEXT, "hidden_act": "gelu"}, pad="!", schedule={"prediction_type": "v_prediction"}),
}


def scheduler(kind: str, options: dict):
    if kind == "pndm":
        return diffusers.PNDMScheduler(**SCHEDULE, **options, skip_prk_steps=True)
    return diffusers.DDIMScheduler(**SCHEDULE, **options, clip_sample=False)


def build(root, variant: str):
    """diffusers' StableDiffusionPipeline at a reduced width, saved as a DDIM and as a PNDM folder."""
    spec = VARIANTS[variant]
    with offline():
        torch.manual_seed(0)
        unet = randomise(diffusers.UNet2DConditionModel(**spec["unet"]))
        vae = randomise(diffusers.AutoencoderKL(**VAE))
        text_encoder = randomise(transformers.CLIPTextModel(transformers.CLIPTextConfig(**spec["text"])))
        CLIPTokenizer.shipped(pad_token=spec["pad"]).save(root / "tokenizer")
        tokenizer = transformers.CLIPTokenizer.from_pretrained(root / "tokenizer")
        pipes = {}
        for kind in ("ddim", "pndm"):
            pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                                     unet=unet, scheduler=scheduler(kind, spec["schedule"]),
                                                     safety_checker=None, feature_extractor=None,
                                                     requires_safety_checker=False)
            pipe.set_progress_bar_config(disable=True)
            pipe.save_pretrained(root / kind)
            pipes[kind] = pipe
    # transformers 5 writes the tokenizer as one tokenizer.json (kept in ddim/); the Hub's SD folders hold
    # vocab.json + merges.txt: make pndm/ that way, so both readings are tested
    (root / "pndm" / "tokenizer" / "tokenizer.json").unlink()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(root / "tokenizer" / name, root / "pndm" / "tokenizer" / name)
    return root, pipes


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return build(tmp_path_factory.mktemp("sd1"), "sd1")


@pytest.fixture(scope="module")
def reference_sd2(tmp_path_factory):
    return build(tmp_path_factory.mktemp("sd2"), "sd2")


def latents() -> torch.Tensor:
    return torch.randn(len(PROMPTS), 4, HEIGHT // 4, WIDTH // 4, generator=torch.Generator().manual_seed(3))


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    assert ours.shape == theirs.shape, f"ours {tuple(ours.shape)} vs diffusers {tuple(theirs.shape)}"
    return (ours.float() - theirs.float()).abs().max().item() / max(theirs.abs().max().item(), 1e-12)


def diffusers_run(pipe, output_type: str) -> torch.Tensor:
    with torch.no_grad():
        out = pipe(PROMPTS, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
                   guidance_scale=7.5, latents=latents(), output_type=output_type)
    return out.images


def ours_run(pipe: LatentDiffusion, output_type: str, sampler_name: str | None = None) -> torch.Tensor:
    return pipe.text_to_image(PROMPTS, height=HEIGHT, width=WIDTH, negative_prompt=NEGATIVE, steps=STEPS,
                              guidance_scale=7.5, latents=latents(), output_type=output_type,
                              sampler_name=sampler_name)


def assert_same_generation(ours: LatentDiffusion, pipe, what: str, sampler_name: str | None = None) -> None:
    z_ours, z_theirs = ours_run(ours, "latents", sampler_name), diffusers_run(pipe, "latent")
    err = relative_error(z_ours, z_theirs)
    assert err <= RTOL, f"{what}: final latents differ from diffusers' by {err:.2e} (relative)"
    x_ours, x_theirs = (ours_run(ours, "images", sampler_name) + 1) / 2, diffusers_run(pipe, "pt")   # [-1,1] -> [0,1]
    err = relative_error(x_ours, x_theirs)
    assert err <= RTOL, f"{what}: images differ from diffusers' by {err:.2e} (relative)"


# ----------------------------------------------------------------------------------------- the diffusers folder

def test_diffusers_folder_gives_diffusers_prompt_embeddings_for_prompt_and_negative(reference):
    root, pipes = reference
    ours = LatentDiffusion.from_pretrained(root / "ddim", device="cpu")
    with torch.no_grad():
        cond, uncond = pipes["ddim"].encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=NEGATIVE)
        empty = pipes["ddim"].encode_prompt(PROMPTS, "cpu", 1, True)[1]          # no negative prompt: "" padded
        for prompts, theirs in ((PROMPTS, cond), (NEGATIVE, uncond), (["", ""], empty)):
            err = relative_error(ours.text_encoder.encode_prompts(ours.tokenizer, prompts), theirs)
            assert err <= RTOL, f"embeddings of {prompts} differ from diffusers' by {err:.2e}"


@pytest.mark.parametrize("kind, sampler_name", [("ddim", "ddim"), ("pndm", "plms")])
def test_diffusers_folder_makes_diffusers_images_from_the_same_latents(reference, kind, sampler_name):
    root, pipes = reference
    ours = LatentDiffusion.from_pretrained(root / kind, device="cpu")
    assert ours.sampler_name == sampler_name, f"{kind} should pick our {sampler_name}, got {ours.sampler_name}"
    assert_same_generation(ours, pipes[kind], f"{kind} folder")


# DDIM only (SD 2's own folders ship DDIMScheduler): with a v model diffusers' PNDM combines the raw v outputs and
# our PLMS the eps each implies, as CompVis' PLMS does (see PLMS's docstring and tests/oracle/test_sampler_parity.py)
@pytest.mark.parametrize("kind", ["ddim"])
def test_sd2_style_folder_v_prediction_and_bang_padding_makes_diffusers_images(reference_sd2, kind):
    root, pipes = reference_sd2
    ours = LatentDiffusion.from_pretrained(root / kind, device="cpu")
    assert (ours.schedule.prediction_type, ours.tokenizer.pad_id) == ("v_prediction", 0)
    with torch.no_grad():
        cond, uncond = pipes[kind].encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=NEGATIVE)
    for prompts, theirs in ((PROMPTS, cond), (NEGATIVE, uncond)):
        err = relative_error(ours.text_encoder.encode_prompts(ours.tokenizer, prompts), theirs)
        assert err <= RTOL, f"SD 2 embeddings of {prompts} differ from diffusers' by {err:.2e}"
    assert_same_generation(ours, pipes[kind], f"SD 2-style {kind} folder")


def test_load_pipeline_takes_a_path_and_the_clip_pipeline_accepts_any_text(reference):
    from minildm.pretrained import load_pipeline

    root, _ = reference
    ours = load_pipeline(str(root / "pndm"), device="cpu")
    assert ours.sampler_name == "plms"
    text = ["漢字 🙂 don't stop, 3.14!", "café " * 60]                       # CJK, emoji, accents, past 77 tokens
    assert ours.check_prompts(text) == text
    assert ours.text_encoder.encode_prompts(ours.tokenizer, text).shape == (2, 77, TEXT["hidden_size"])


# ----------------------------------------------------------------------------------------- the CompVis single file

OPENCLIP_NAMES = [("embeddings.token_embedding.weight", "token_embedding.weight"),          # keys without text_model.
                  ("embeddings.position_embedding.weight", "positional_embedding"),
                  ("final_layer_norm.", "ln_final."), ("encoder.layers.", "transformer.resblocks."),
                  (".self_attn.out_proj.", ".attn.out_proj."), (".layer_norm1.", ".ln_1."),
                  (".layer_norm2.", ".ln_2."), (".mlp.fc1.", ".mlp.c_fc."), (".mlp.fc2.", ".mlp.c_proj.")]


def to_openclip(text_encoder) -> dict[str, torch.Tensor]:
    """transformers' CLIPTextModel -> SD 2's OpenCLIP layout (cond_stage_model.model.), q, k, v fused, plus the
    24th block SD 2 never reads (a diffusers SD 2 folder drops it; a CompVis file keeps it: here a random one) and
    the projection and temperature only CLIP's training reads."""
    state, out = text_encoder.state_dict(), {}
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    for key, tensor in state.items():
        stem, fused, kind = key.rpartition(".self_attn.q_proj.")
        if fused:                                           # q, k, v -> in_proj (3D, D), as nn.MultiheadAttention
            tensor = torch.cat([state[f"{stem}.self_attn.{n}_proj.{kind}"] for n in "qkv"])
            key = f"{stem}.attn.in_proj_{kind}"
        elif ".self_attn." in key and not key.split(".self_attn.")[1].startswith("out_proj"):
            continue                                                # k_proj, v_proj: fused above
        for old, new in OPENCLIP_NAMES:
            key = key.replace(old, new)
        out[key] = tensor
    depth = text_encoder.config.num_hidden_layers
    generator = torch.Generator().manual_seed(5)
    for key in [k for k in out if k.startswith("transformer.resblocks.0.")]:
        out[key.replace(".resblocks.0.", f".resblocks.{depth}.")] = torch.randn(out[key].shape, generator=generator)
    width = text_encoder.config.hidden_size
    out.update({"text_projection": torch.randn(width, width, generator=generator), "logit_scale": torch.tensor(4.6)})
    return {"cond_stage_model.model." + k: v for k, v in out.items()}


def compvis_file(root, pipe, variant: str = "sd1") -> "os.PathLike":
    from test_unet_compvis import to_compvis as unet_to_compvis  # the tests' own inverse tables
    from test_vae_parity import to_compvis as vae_to_compvis

    state = {**unet_to_compvis(pipe.unet), **vae_to_compvis(pipe.vae.state_dict(), len(VAE["block_out_channels"]))}
    if variant == "sd1":
        state.update({"cond_stage_model.transformer." + k: v for k, v in pipe.text_encoder.state_dict().items()})
    else:
        state.update(to_openclip(pipe.text_encoder))
    path = root / f"{variant}-reduced.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_single_file_makes_the_same_images_as_diffusers(reference):
    root, pipes = reference
    path = compvis_file(root, pipes["ddim"])
    text = TextEncoderConfig(vocab_size=49408, max_length=77, dim=32, depth=2, heads=4, activation="quick_gelu",
                             intermediate_size=37)
    vae = AutoencoderConfig(block_out_channels=VAE["block_out_channels"], layers_per_block=1, norm_num_groups=8)
    ours = LatentDiffusion.from_pretrained(path, device="cpu", vae_config=vae, text_encoder_config=text, heads=8,
                                           norm_num_groups=8)
    assert ours.schedule.prediction_type == "epsilon"
    assert_same_generation(ours, pipes["ddim"], "single file", sampler_name="ddim")


def test_sd2_single_file_with_v_prediction_makes_the_same_images_as_diffusers(reference_sd2):
    root, pipes = reference_sd2
    path = compvis_file(root, pipes["ddim"], "sd2")
    text = TextEncoderConfig(vocab_size=49408, max_length=77, dim=32, depth=3, heads=4, activation="gelu",
                             intermediate_size=37, output_layer=-2)             # the penultimate of 3 blocks
    vae = AutoencoderConfig(block_out_channels=VAE["block_out_channels"], layers_per_block=1, norm_num_groups=8)
    ours = LatentDiffusion.from_pretrained(path, device="cpu", vae_config=vae, text_encoder_config=text,
                                           heads=VARIANTS["sd2"]["unet"]["attention_head_dim"], norm_num_groups=8,
                                           prediction_type="v_prediction")
    assert ours.tokenizer.pad_id == 0, "an SD 2 file should get SD 2's tokenizer, padding with '!'"
    with torch.no_grad():
        cond, uncond = pipes["ddim"].encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=NEGATIVE)
    for prompts, theirs in ((PROMPTS, cond), (NEGATIVE, uncond)):
        err = relative_error(ours.text_encoder.encode_prompts(ours.tokenizer, prompts), theirs)
        assert err <= RTOL, f"SD 2 single-file embeddings of {prompts} differ from diffusers' by {err:.2e}"
    assert_same_generation(ours, pipes["ddim"], "SD 2 single file", sampler_name="ddim")


# ----------------------------------------------------------------------------------------- bad input, one line each

def refused(path, error=(ValueError, FileNotFoundError), **options) -> str:
    with pytest.raises(error) as info:
        LatentDiffusion.from_pretrained(path, device="cpu", **options)
    message = str(info.value)
    assert "\n" not in message, f"not one line: {message!r}"
    return message


def test_a_checkpoint_of_another_model_family_is_one_line(tmp_path):
    path = tmp_path / "classifier.safetensors"
    save_file({"backbone.conv1.weight": torch.randn(4, 3, 3, 3), "head.fc.bias": torch.randn(10)}, str(path))
    assert "not a Stable Diffusion 1/2 checkpoint" in refused(path)


def test_a_truncated_file_is_one_line(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file({"model.diffusion_model.conv_in.weight": torch.randn(64, 64)}, str(path))
    path.write_bytes(path.read_bytes()[:100])
    assert str(path) in refused(path)


def test_a_ckpt_with_a_pickle_payload_does_not_run_and_is_one_line(tmp_path):
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": Payload()}}, str(path))
    assert "refused to load" in refused(path)
    assert not marker.exists(), "the pickle payload ran"


def test_a_diffusers_folder_missing_a_part_is_one_line_naming_it(reference, tmp_path):
    root, _ = reference
    folder = tmp_path / "sd"
    shutil.copytree(root / "ddim", folder)
    shutil.rmtree(folder / "vae")
    assert "vae/" in refused(folder)


def test_an_sdxl_folder_is_one_line(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline", "unet": [], '
                                               '"text_encoder_2": []}')
    assert "not Stable Diffusion 1.x/2.x" in refused(tmp_path)


def test_a_tokenizer_folder_missing_merges_is_one_line(reference, tmp_path):
    root, _ = reference
    folder = tmp_path / "sd"
    shutil.copytree(root / "pndm", folder)
    (folder / "tokenizer" / "merges.txt").unlink()
    assert "merges.txt" in refused(folder)


def test_a_path_of_no_known_layout_is_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert "no pipeline we know" in refused(tmp_path)
    assert "no such path" in refused(tmp_path / "missing")
    assert "no pipeline we know" in refused(tmp_path / "notes.txt")


def test_latents_of_the_wrong_shape_are_one_line(reference):
    root, _ = reference
    ours = LatentDiffusion.from_pretrained(root / "ddim", device="cpu")
    with pytest.raises(ValueError, match="latents must have shape") as info:
        ours.text_to_image(PROMPTS, height=HEIGHT, width=WIDTH, steps=1, latents=torch.randn(2, 4, 8, 8))
    assert "\n" not in str(info.value)
