"""Chapter 06: a finished training run becomes a pipeline folder (chapter 08) that `minildm sample` can use."""

from __future__ import annotations

from pathlib import Path

from minildm.checkpoint import load_weights_into, read_config
from minildm.ldm_recipe import ModelConfigs
from minildm.pipeline import LatentDiffusion, save_pipeline
from minildm.pixel_space import PixelSpace
from minildm.pretrained import load_vae_folder
from minildm.saving import read_json
from minildm.text import SPECIAL_TOKENS, Tokenizer
from minildm.train_ldm import CHECKPOINT, TRAINER_NAME


def export_pipeline(run_folder: str | Path, export_to: str | Path, notes: dict, guidance_scale: float = 7.5,
                    steps: int = 50) -> Path:
    """Write the run's EMA weights as a pipeline folder with a training record (training.json) and the sampling
    defaults (guidance_scale, DDIM steps) pipeline.json will hold. A VAE folder beside the export (the shipped
    assets/shapes64-vae next to assets/shapes64-ldm) is referenced; any other is copied in."""
    folder, export_to = Path(run_folder) / CHECKPOINT, Path(export_to)
    config = read_config(folder)
    models = ModelConfigs.from_dict(config)
    model = models.denoiser()
    load_weights_into(model, folder, "ema.safetensors")
    latent = config["space"] == "latent"
    autoencoder = load_vae_folder(config["vae"], "cpu") if latent else PixelSpace(config["image_size"])
    words = config["tokenizer_words"][len(SPECIAL_TOKENS):]
    tokenizer = Tokenizer(words=words, max_length=models.text_encoder.max_length)
    pipe = LatentDiffusion(autoencoder, model.unet.eval(), model.text_encoder.eval(), tokenizer, models.schedule,
                           device="cpu", guidance_scale=guidance_scale, steps=steps)
    trainer = read_json(folder / TRAINER_NAME)
    record = {**notes, "train_config": trainer["train_config"], "history": trainer["history"]}
    vae_dir = Path(config["vae"]).resolve() if latent else None
    beside = vae_dir is not None and vae_dir.parent == export_to.resolve().parent
    return save_pipeline(export_to, pipe, vae_folder_name=f"../{vae_dir.name}" if beside else None,
                         extra_files={"training.json": record})
