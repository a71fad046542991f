"""Training the VAE: exact resume, safe stops, the scale factor, the GAN path and decoder fine-tuning."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from minildm.autoencoder import (
    AutoencoderConfig,
    AutoencoderKL,
    save_decoder_file,
    scale_equivariance_loss,
    swap_decoder,
)
from minildm.checkpoint import load_weights_into, read_config
from minildm.discriminator import PatchDiscriminator, adaptive_weight, generator_loss, hinge_d_loss
from minildm.train_vae import VAETrainConfig, VAETrainer, export_model, learning_rate, measure_scale_factor

TINY = AutoencoderConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, scale_factor=1.0)


def tiny_cfg(**overrides) -> VAETrainConfig:
    base = dict(steps=4, batch_size=4, lr=1e-3, warmup_steps=2, num_train_images=16, image_size=16,
                save_every=2, eval_images=8, scale_images=16, seed=3)
    base.update(overrides)
    return VAETrainConfig(**base)


def weights(folder) -> dict:
    return load_file(str(folder / "model.safetensors"))


def test_resume_from_a_midway_checkpoint_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    straight = VAETrainer(tiny_cfg(steps=6), tmp_path / "straight", TINY, progress=False)
    straight.run()

    first = VAETrainer(tiny_cfg(steps=6), tmp_path / "split", TINY, progress=False)
    assert first.run(stop_after=3)["stopped_early"]
    second = VAETrainer(tiny_cfg(steps=6), tmp_path / "split", TINY, resume=True, progress=False)
    assert second.step == 3, "resume must start from the saved step"
    second.run()

    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume: max abs {(a[key] - b[key]).abs().max():.3g}"


def test_training_lowers_the_loss_and_saves_a_loadable_model_with_a_measured_scale_factor(tmp_path):
    trainer = VAETrainer(tiny_cfg(steps=30, lr=3e-3, save_every=100), tmp_path / "run", TINY, progress=False)
    first = trainer.train_step()["loss"]
    summary = trainer.run()
    last = trainer.history[-1]["loss"]
    assert last < first, f"loss did not fall: {first:.1f} -> {last:.1f}"
    config = AutoencoderConfig.from_dict(read_config(tmp_path / "run"))
    assert config.scale_factor == pytest.approx(summary["scale_factor"])
    assert config.scale_factor != 1.0 and math.isfinite(config.scale_factor)
    vae = load_weights_into(AutoencoderKL(config), tmp_path / "run")
    # the saved scale factor is exactly 1 / std of posterior samples of the training images
    s = measure_scale_factor(vae, trainer.pixels, 16, seed=3)
    assert s == pytest.approx(config.scale_factor, rel=1e-6)


def test_existing_output_folder_is_never_overwritten_without_resume(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--resume"):
        VAETrainer(tiny_cfg(), out, TINY, progress=False)
    assert (out / "precious.txt").read_text() == "keep me"


def test_resume_with_changed_settings_is_refused(tmp_path):
    VAETrainer(tiny_cfg(steps=2), tmp_path / "run", TINY, progress=False).run()
    with pytest.raises(ValueError, match="lr"):
        VAETrainer(tiny_cfg(steps=4, lr=5e-3), tmp_path / "run", TINY, resume=True, progress=False)


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    trainer = VAETrainer(tiny_cfg(steps=10, save_every=2), tmp_path / "run", TINY, progress=False)
    for _ in range(2):
        trainer.train_step()
    trainer.save()
    good = weights(tmp_path / "run")
    with torch.no_grad():
        trainer.vae.decoder.conv_out.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="step 2"):
        trainer.run()
    after = weights(tmp_path / "run")
    assert all(torch.equal(good[k], after[k]) for k in good), "the good checkpoint was replaced"
    assert json.loads((tmp_path / "run" / "trainer.json").read_text())["step"] == 2


def test_resume_without_a_checkpoint_is_a_one_line_error_that_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing to resume.*drop --resume") as err:
        VAETrainer(tiny_cfg(), tmp_path / "new", TINY, resume=True, progress=False)
    assert "\n" not in str(err.value)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FileNotFoundError, match="trainer.json does not exist"):
        VAETrainer(tiny_cfg(), mine, TINY, resume=True, progress=False)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"


def test_resume_first_restores_a_checkpoint_a_crash_left_beside_its_folder(tmp_path):
    VAETrainer(tiny_cfg(steps=4), tmp_path / "run", TINY, progress=False).run(stop_after=2)
    (tmp_path / "run").rename(tmp_path / ".run.old-12345")      # died between the two renames of a save
    assert VAETrainer(tiny_cfg(steps=4), tmp_path / "run", TINY, resume=True, progress=False).step == 2


def test_an_inf_gradient_on_a_finite_loss_stops_before_the_update_and_does_not_blame_the_lr(tmp_path):
    trainer = VAETrainer(tiny_cfg(steps=6), tmp_path / "run", TINY, progress=False)
    trainer.run(stop_after=2)
    good = weights(tmp_path / "run")
    trainer.vae.decoder.conv_out.bias.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    with pytest.raises(FloatingPointError, match="gradient became NaN or inf at step 2") as err:
        trainer.run()
    message = str(err.value)
    assert "--lr" not in message and "checkpoint of step 2" in message and "\n" not in message, message
    assert torch.isfinite(trainer.vae.decoder.conv_out.bias).all(), "the update ran with the inf gradient"
    after = weights(tmp_path / "run")
    assert all(torch.equal(good[k], after[k]) for k in good)


def test_weights_with_a_nan_are_never_saved_and_no_checkpoint_is_claimed_when_none_exists(tmp_path):
    trainer = VAETrainer(tiny_cfg(), tmp_path / "run", TINY, progress=False)
    trainer.train_step()
    with torch.no_grad():
        trainer.vae.decoder.conv_out.bias[0] = float("nan")
    with pytest.raises(FloatingPointError, match="weights hold NaN or inf after step 1") as err:
        trainer.save()
    assert "no checkpoint was written" in str(err.value) and "--lr" not in str(err.value), str(err.value)
    assert not any((tmp_path / "run").iterdir()), "a checkpoint was written"


def test_an_update_too_large_for_float32_is_a_floating_point_error_that_names_the_lr(tmp_path):
    trainer = VAETrainer(tiny_cfg(lr=1e40, warmup_steps=1), tmp_path / "run", TINY, progress=False)
    with pytest.raises(FloatingPointError, match="overflowed float32.*Lower --lr"):
        trainer.run()
    assert not any((tmp_path / "run").iterdir()), "a checkpoint was written"


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    cfg = tiny_cfg(steps=100, lr=1.0, warmup_steps=10, min_lr_fraction=0.1)
    assert learning_rate(cfg, 0) == pytest.approx(0.1)
    assert learning_rate(cfg, 9) == pytest.approx(1.0)
    assert learning_rate(cfg, 10) == pytest.approx(1.0)
    assert learning_rate(cfg, 55) == pytest.approx(0.1 + 0.9 * 0.5)
    assert learning_rate(cfg, 100) == pytest.approx(0.1)


def test_hinge_losses_match_their_definitions():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.5])
    # L_D = 1/2 (mean(relu(1 - real)) + mean(relu(1 + fake)))
    expected = 0.5 * ((0 + 0.5 + 2.0) / 3 + (0 + 1.0 + 2.5) / 3)
    assert hinge_d_loss(real, fake).item() == pytest.approx(expected)
    assert generator_loss(fake).item() == pytest.approx(-(-2.0 + 0.0 + 1.5) / 3)


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer():
    torch.manual_seed(0)
    w = torch.randn(3, 3, requires_grad=True)
    x = torch.randn(5, 3)
    rec = (x @ w).pow(2).sum()
    g = (x @ w).sum() * 0.01
    weight = adaptive_weight(rec, g, w)
    rec_norm = torch.autograd.grad(rec, w, retain_graph=True)[0].norm()
    g_norm = torch.autograd.grad(g, w)[0].norm()
    assert weight.item() == pytest.approx((rec_norm / (g_norm + 1e-4)).item(), rel=1e-6)


def test_gan_on_images_too_small_for_the_patch_discriminator_is_refused(tmp_path):
    with pytest.raises(ValueError, match="at least 32x32"):
        VAETrainer(tiny_cfg(gan=True, image_size=16), tmp_path / "run", TINY, progress=False)


def test_patch_discriminator_outputs_one_logit_per_patch():
    logits = PatchDiscriminator(3, width=8, num_layers=3)(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 1, 6, 6)


def test_gan_training_adds_both_adversarial_terms_after_disc_start_and_resumes_exactly(tmp_path):
    gan = dict(gan=True, disc_start=1, save_every=2, image_size=32)
    straight = VAETrainer(tiny_cfg(**gan, steps=4), tmp_path / "straight", TINY, progress=False)
    before_start = straight.train_step()
    after_start = straight.train_step()
    assert "d_loss" not in before_start, "the discriminator must stay off before disc_start"
    assert {"d_loss", "g_loss"} <= set(after_start), f"GAN terms missing from {sorted(after_start)}"
    straight.run()

    VAETrainer(tiny_cfg(**gan, steps=2), tmp_path / "split", TINY, progress=False).run()
    VAETrainer(tiny_cfg(**gan, steps=4), tmp_path / "split", TINY, resume=True, progress=False).run()
    for name in ("model.safetensors", "discriminator.safetensors"):
        a = load_file(str(tmp_path / "straight" / name))
        b = load_file(str(tmp_path / "split" / name))
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}:{key} differs after resume"


def test_finetuning_the_decoder_freezes_the_encoder_and_writes_a_swappable_vae_file(tmp_path):
    base = tmp_path / "base"
    VAETrainer(tiny_cfg(steps=4), base, TINY, progress=False).run()
    before = weights(base)
    tuned = tmp_path / "tuned"
    cfg = tiny_cfg(steps=6, finetune_decoder=str(base), recon_loss="mse")
    summary = VAETrainer(cfg, tuned, progress=False).run()
    from minildm.train_vae import evaluate_psnr, held_out_images

    base_psnr = evaluate_psnr(AutoencoderKL.from_folder(base), held_out_images(cfg))
    assert summary["heldout_psnr_before"] == pytest.approx(base_psnr, abs=1e-3)
    assert summary["gain_db"] == pytest.approx(summary["heldout_psnr"] - summary["heldout_psnr_before"], abs=2e-3)
    after = weights(tuned)
    for key in before:
        same = torch.equal(before[key], after[key])
        if key.startswith(("encoder.", "quant_conv.")):
            assert same, f"encoder weight {key} changed during decoder fine-tuning"
    decoder = [k for k in before if k.startswith("decoder.")]
    assert any(not torch.equal(before[k], after[k]) for k in decoder), "decoder did not train"

    vae = load_weights_into(AutoencoderKL(AutoencoderConfig.from_dict(read_config(base))), base)
    swap_decoder(vae, tuned / "decoder.safetensors")
    for key, value in vae.state_dict().items():
        assert torch.equal(value, after[key]), f"{key} after swap differs from the fine-tuned model"


def test_swap_decoder_refuses_a_different_latent_space_and_non_decoder_files(tmp_path):
    other = AutoencoderKL(AutoencoderConfig(block_out_channels=(8, 16), latent_channels=3, norm_num_groups=4))
    save_decoder_file(other, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="latent channels"):
        swap_decoder(AutoencoderKL(TINY), tmp_path / "other.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a minildm VAE decoder file"):
        swap_decoder(AutoencoderKL(TINY), tmp_path / "plain.safetensors")


def test_export_writes_only_the_model_and_the_training_record(tmp_path):
    VAETrainer(tiny_cfg(steps=2), tmp_path / "run", TINY, progress=False).run()
    export_model(tmp_path / "run", tmp_path / "export", {"command": "minildm train-vae ...", "seed": 3})
    names = sorted(p.name for p in (tmp_path / "export").iterdir())
    assert names == ["config.json", "model.safetensors", "training.json"]
    key = "encoder.conv_in.weight"
    assert torch.equal(weights(tmp_path / "export")[key], weights(tmp_path / "run")[key])


def test_half_precision_export_stores_float16_that_loads_into_a_float32_model(tmp_path):
    VAETrainer(tiny_cfg(steps=2), tmp_path / "run", TINY, progress=False).run()
    export_model(tmp_path / "run", tmp_path / "export", {"seed": 3}, half=True)
    stored = weights(tmp_path / "export")
    assert all(v.dtype == torch.float16 for v in stored.values() if v.is_floating_point())
    vae = load_weights_into(AutoencoderKL(TINY), tmp_path / "export")
    full = weights(tmp_path / "run")["decoder.conv_out.weight"]
    assert vae.decoder.conv_out.weight.dtype == torch.float32
    assert torch.equal(vae.decoder.conv_out.weight.data, full.half().float())
    assert json.loads((tmp_path / "export" / "training.json").read_text())["weights_dtype"] == "float16"


def test_exporting_a_fine_tuned_decoder_run_ships_a_half_precision_vae_file_that_swaps_in(tmp_path):
    base, tuned, export = tmp_path / "base", tmp_path / "tuned", tmp_path / "export"
    VAETrainer(tiny_cfg(steps=2), base, TINY, progress=False).run()
    VAETrainer(tiny_cfg(steps=2, finetune_decoder=str(base)), tuned, progress=False).run()
    export_model(tuned, export, {"seed": 3}, half=True)
    vae = load_weights_into(AutoencoderKL(AutoencoderConfig.from_dict(read_config(base))), base)
    swap_decoder(vae, export / "decoder.safetensors")
    expected = weights(tuned)["decoder.conv_out.weight"].half().float()
    assert torch.equal(vae.decoder.conv_out.weight.data, expected)


def test_training_on_an_image_folder_keeps_every_tenth_image_out_and_measures_psnr_on_them(tmp_path):
    import numpy as np
    from PIL import Image

    from minildm.train_vae import held_out_images, training_pixels

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(30):  # image i is a flat grey of level 8 * i: each one is recognisable after loading
        Image.fromarray(np.full((20, 24, 3), 8 * i, dtype=np.uint8)).save(folder / f"img_{i:02d}.png")
    cfg = tiny_cfg(data_dir=str(folder), eval_images=8)
    train_levels = sorted(int(v) for v in training_pixels(cfg)[:, 0, 0, 0])
    held_levels = sorted(int(v) for v in ((held_out_images(cfg)[:, 0, 0, 0] + 1) * 127.5).round())
    assert held_levels == [8 * 9, 8 * 19, 8 * 29], held_levels
    assert len(train_levels) == 27 and not set(train_levels) & set(held_levels)
    summary = VAETrainer(tiny_cfg(data_dir=str(folder), steps=2), tmp_path / "run", TINY, progress=False).run()
    assert summary["heldout_psnr"] > 0


def test_the_trainer_puts_the_model_and_the_resumed_optimizer_state_on_its_device(tmp_path, monkeypatch):
    monkeypatch.setenv("MINILDM_DEVICE", "cpu")  # the default device comes from the same place as everywhere else
    VAETrainer(tiny_cfg(steps=4), tmp_path / "run", TINY, progress=False).run(stop_after=2)
    resumed = VAETrainer(tiny_cfg(steps=4), tmp_path / "run", TINY, resume=True, progress=False, device="cpu")
    assert resumed.device == torch.device("cpu")
    assert {p.device for p in resumed.vae.parameters()} == {torch.device("cpu")}
    moments = [v for slots in resumed.opt.state.values() for v in slots.values() if torch.is_tensor(v) and v.ndim]
    assert moments and {v.device for v in moments} == {torch.device("cpu")}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_on_cuda_resumes_exactly(tmp_path):
    VAETrainer(tiny_cfg(steps=4), tmp_path / "a", TINY, progress=False, device="cuda").run()
    VAETrainer(tiny_cfg(steps=4), tmp_path / "b", TINY, progress=False, device="cuda").run(stop_after=2)
    VAETrainer(tiny_cfg(steps=4), tmp_path / "b", TINY, resume=True, progress=False, device="cuda").run()
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), f"{key} differs after a CUDA resume"


def test_scale_equivariance_loss_is_the_reconstruction_of_the_pooled_latent_against_the_pooled_image():
    torch.manual_seed(0)
    vae = AutoencoderKL(TINY).eval()
    z, x = torch.randn(2, 4, 8, 8), torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        got = scale_equivariance_loss(vae, z, x, "l1+mse")
        # 2x average pooling written out: the mean of each 2x2 block
        pooled_z = z.reshape(2, 4, 4, 2, 4, 2).mean(dim=(3, 5))             # (2, 4, 4, 4)
        pooled_x = x.reshape(2, 3, 8, 2, 8, 2).mean(dim=(3, 5))             # (2, 3, 8, 8)
        diff = vae.decode(pooled_z) - pooled_x
        want = (diff.abs() + diff.pow(2)).sum(dim=(1, 2, 3)).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert got.item() > 0


def test_a_decoder_that_commutes_with_pooling_pays_no_scale_equivariance_loss():
    # a per-pixel linear "decoder" (a 1x1 conv) commutes with average pooling: D(pool z) = pool D(z) exactly
    class PerPixelDecoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = torch.nn.Conv2d(4, 3, 1)

        def decode(self, z):
            return self.mix(z)

    torch.manual_seed(0)
    decoder, z = PerPixelDecoder(), torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        assert scale_equivariance_loss(decoder, z, decoder.decode(z), "l1+mse").item() == pytest.approx(0, abs=1e-4)
        assert scale_equivariance_loss(decoder, z, decoder.decode(z.flip(-1).roll(1, -2)), "l1+mse").item() > 1


def test_the_scale_equivariance_weight_adds_its_loss_to_the_step_and_an_odd_latent_is_refused(tmp_path):
    plain = VAETrainer(tiny_cfg(), tmp_path / "plain", TINY, progress=False).train_step()
    assert "se" not in plain, "the loss must be off by default"
    record = VAETrainer(tiny_cfg(scale_equivariance=0.5), tmp_path / "se", TINY, progress=False).train_step()
    # L = rec + beta * KL + lambda_SE * L_SE, and the reconstruction part is the plain run's (same seed, same batch)
    assert record["loss"] == pytest.approx(record["rec"] + 1e-6 * record["kl"] + 0.5 * record["se"], rel=1e-5)
    assert record["rec"] == pytest.approx(plain["rec"], rel=1e-6) and record["se"] > 0
    with pytest.raises(ValueError, match="halves the latent, which is 9x9"):
        VAETrainer(tiny_cfg(scale_equivariance=1.0, image_size=18), tmp_path / "odd", TINY, progress=False)
