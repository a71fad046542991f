"""Training the latent diffusion model: the loss, caption dropout, EMA, exact resume, the stops, and DDP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from minildm.attention import MultiHeadAttention
from minildm.cli import build_parser
from minildm.ema import EMA
from minildm.latent_cache import LATENT_CACHE
from minildm.ldm_export import export_pipeline
from minildm.ldm_recipe import LDMTrainConfig, autocast_dtype, model_configs
from minildm.pipeline import LatentDiffusion
from minildm.pretrained import vae_folder
from minildm.schedule import NoiseSchedule
from minildm.timestep_sampling import timestep_probabilities
from minildm.train_ldm import CHECKPOINT, LDMTrainer, diffusion_loss
from minildm.unet import UNet

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(channels="16,32", norm_num_groups=8, heads=2, text_dim=32, text_depth=1)


def tiny_config(**changes) -> LDMTrainConfig:
    values = dict(steps=6, batch_size=8, num_train_images=64, warmup_steps=2, save_every=3, sample_every=0,
                  log_every=1, lr=1e-3)
    return LDMTrainConfig(**{**values, **changes})


def trainer(tmp_path, name="run", resume=False, models: dict = TINY, **changes) -> LDMTrainer:
    cfg = tiny_config(**changes)
    return LDMTrainer(cfg, tmp_path / name, model_configs(cfg.space, **models), resume=resume, progress=False)


def weights(folder) -> dict:
    return load_file(str(folder / CHECKPOINT / "model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert worst == 0.0, f"weights differ by up to {worst:.3g}"


# ---------------------------------------------------------------------------------------------- the loss

class KnowsTheNoise(torch.nn.Module):
    """A denoiser that inverts z_t exactly, given the z_0 it was built around: its loss must be 0."""

    def __init__(self, schedule, z0):
        super().__init__()
        self.schedule, self.z0 = schedule, z0
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, zt, t, ids):
        a = self.schedule.alpha_bar[t].view(-1, 1, 1, 1).to(zt)
        eps = (zt - a.sqrt() * self.z0) / (1 - a).sqrt()
        kind = self.schedule.prediction_type
        out = {"epsilon": eps, "sample": self.z0, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * self.z0}[kind]
        return out * self.scale


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_the_schedule_trains_the_prediction_type_the_config_names(tmp_path, prediction):
    run = trainer(tmp_path, prediction_type=prediction)
    assert run.models.schedule.prediction_type == prediction


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_a_denoiser_that_knows_the_answer_has_zero_loss_and_a_wrong_scale_does_not(prediction):
    schedule = NoiseSchedule(prediction_type=prediction)
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 250, 500, 750, 999])
    model = KnowsTheNoise(schedule, z0)
    assert diffusion_loss(model, schedule, z0, t, noise, None).item() < 1e-10
    with torch.no_grad():
        model.scale.fill_(1.5)                        # output 1.5 x target: loss = 0.25 * mean(target^2)
    target = schedule.training_target(z0, noise, t)
    loss = diffusion_loss(model, schedule, z0, t, noise, None)
    torch.testing.assert_close(loss, 0.25 * target.pow(2).mean(), rtol=1e-4, atol=0)
    loss.backward()
    assert model.scale.grad is not None and model.scale.grad.item() > 0


def test_the_v_target_is_sqrt_ab_eps_minus_sqrt_one_minus_ab_z0():
    schedule = NoiseSchedule(prediction_type="v_prediction")
    z0, noise, t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.tensor([5, 500, 995])
    ab = schedule.alpha_bar[t].view(-1, 1, 1, 1).float()
    torch.testing.assert_close(schedule.training_target(z0, noise, t), ab.sqrt() * noise - (1 - ab).sqrt() * z0)


def test_autocast_is_off_on_the_cpu_by_default_and_bad_names_are_refused():
    assert autocast_dtype(torch.device("cpu"), "auto") is None
    assert autocast_dtype(torch.device("cpu"), "bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="fp32"):
        autocast_dtype(torch.device("cpu"), "half")


def test_ema_follows_the_ramped_decay():
    model = torch.nn.Linear(2, 1, bias=False)
    ema = EMA(model, decay=0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=0)                         # d = min(0.9, 1 / 10) = 0.1
    torch.testing.assert_close(ema.shadow["weight"], 0.1 * start + 0.9 * (start + 1))
    ema.update(model, step=1000)                      # d = 0.9
    expected = 0.9 * (0.1 * start + 0.9 * (start + 1)) + 0.1 * (start + 1)
    torch.testing.assert_close(ema.shadow["weight"], expected)


# ---------------------------------------------------------------------------------------------- the batch

def test_caption_dropout_replaces_about_the_asked_share_with_the_empty_prompt(tmp_path):
    run = trainer(tmp_path, caption_dropout=0.3, batch_size=64)
    run.prepare()
    empty = run.tokenizer.encode("").ids[0]
    dropped = sum(int((run.batch(step)[1] == empty).all(dim=1).sum()) for step in range(20))
    share = dropped / (20 * 64)
    assert 0.25 < share < 0.35, f"{share:.3f} of captions were dropped, asked for 0.3"


def test_a_batch_is_a_pure_function_of_seed_and_step(tmp_path):
    a, b = trainer(tmp_path, "a"), trainer(tmp_path, "b")
    a.prepare()
    b.prepare()
    for x, y in zip(a.batch(5), b.batch(5)):
        assert torch.equal(x, y)
    assert not torch.equal(a.batch(5)[0], a.batch(6)[0])


def test_latents_are_cached_once_and_have_about_unit_variance(tmp_path):
    run = trainer(tmp_path, num_train_images=128)
    run.prepare()
    assert (tmp_path / "run" / "latents.safetensors").is_file()
    z0 = torch.cat([run.batch(step)[0] for step in range(8)])
    assert z0.shape[1:] == (4, 8, 8)
    assert 0.7 < z0.std().item() < 1.3, f"z_0 has std {z0.std().item():.3f}; the scale factor should make it ~1"


def test_building_a_trainer_joins_no_process_group_and_writes_nothing(tmp_path, monkeypatch):
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1")):   # as torchrun would set them
        monkeypatch.setenv(name, value)
    run = LDMTrainer(tiny_config(), tmp_path / "run", model_configs(**TINY), progress=False, device="cpu")
    assert (run.rank, run.world_size) == (1, 2)
    assert not torch.distributed.is_initialized(), "building a trainer joined the process group"
    written = list((tmp_path / "run").iterdir())               # the run folder itself is made, to fail early
    assert not written, f"building a trainer wrote {written} to --out (the latent cache?)"
    assert run.z_source is None and run.ids is None, "building a trainer loaded the data"


def test_a_recipe_with_the_same_data_settings_shares_the_prepared_data_and_another_is_refused(tmp_path):
    first = trainer(tmp_path, "first")
    first.prepare()
    second = trainer(tmp_path, "second", t_sampling="min_snr", lr=3e-4)   # a different recipe, the same data
    second.prepare(data_from=first)
    assert second.z_source is first.z_source and second.ids is first.ids, "the prepared data was not shared"
    assert not (tmp_path / "second" / "latents.safetensors").exists(), "the sharing run encoded its own cache"
    assert torch.equal(second.batch(3)[0], first.batch(3)[0]), "the same seed and step should draw the same z_0"
    other = trainer(tmp_path, "other", num_train_images=32)
    with pytest.raises(ValueError, match="cannot share data"):
        other.prepare(data_from=first)


def test_the_latent_cache_is_reused_for_the_same_vae_and_data_and_encoded_again_when_they_change(tmp_path, capsys):
    first = trainer(tmp_path, "run")
    first.prepare()
    cache = tmp_path / "run" / LATENT_CACHE
    again = trainer(tmp_path, "run")                                # no checkpoint yet: a new run may start here
    again.prepare()
    assert "encoding the latents again" not in capsys.readouterr().err
    assert torch.equal(first.z_source, again.z_source)

    other_data = trainer(tmp_path, "run", data_seed=1)
    other_data.prepare()
    notice = capsys.readouterr().err
    assert notice.count("\n") == 1 and "data_seed" in notice and str(cache) in notice, notice
    assert not torch.equal(first.z_source, other_data.z_source)

    vae = tmp_path / "retrained-vae"                                  # the same folder layout, other encoder weights
    shutil.copytree(vae_folder("shapes64"), vae)
    tensors = load_file(str(vae / "model.safetensors"))
    name = next(k for k in tensors if k.startswith("encoder."))
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, str(vae / "model.safetensors"))
    other_vae = trainer(tmp_path, "run", data_seed=1, vae=str(vae))
    other_vae.prepare()
    notice = capsys.readouterr().err
    assert "encoder_sha256" in notice and "data_seed" not in notice, notice
    assert not torch.equal(other_data.z_source, other_vae.z_source)


# ---------------------------------------------------------------------------------------------- runs

def test_training_lowers_the_loss(tmp_path):
    run = trainer(tmp_path, steps=40, warmup_steps=5, log_every=10, save_every=100)
    run.run()
    losses = [r["loss"] for r in run.history]
    assert losses[-1] < 0.8 * losses[0], f"loss went {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_stopping_and_resuming_gives_the_same_weights_as_never_stopping(tmp_path):
    straight = trainer(tmp_path, "straight")
    straight.run()
    first = trainer(tmp_path, "resumed")
    assert first.run(stop_after=4)["stopped_early"]
    summary = trainer(tmp_path, "resumed", resume=True).run()
    assert summary["steps"] == 6 and "stopped_early" not in summary
    assert_same_weights(weights(tmp_path / "straight"), weights(tmp_path / "resumed"))
    ema_a = load_file(str(tmp_path / "straight" / CHECKPOINT / "ema.safetensors"))
    ema_b = load_file(str(tmp_path / "resumed" / CHECKPOINT / "ema.safetensors"))
    assert_same_weights(ema_a, ema_b)


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(tmp_path):
    straight = trainer(tmp_path, "straight")
    straight.run()
    run = trainer(tmp_path, "interrupted")
    original = run.train_step

    def step_then_ctrl_c():
        record = original()
        if run.step == 2:
            os.kill(os.getpid(), signal.SIGINT)        # what Ctrl-C sends; the loop must finish this step and save
        return record

    run.train_step = step_then_ctrl_c
    summary = run.run()
    assert summary["interrupted"] and summary["steps"] == 2
    trainer(tmp_path, "interrupted", resume=True).run()
    assert_same_weights(weights(tmp_path / "straight"), weights(tmp_path / "interrupted"))


def test_a_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path):
    run = trainer(tmp_path)
    run.run(stop_after=3)                             # a checkpoint at step 3
    saved = weights(tmp_path / "run")
    run.z_source[:] = float("nan")                     # the cached latents go bad
    with pytest.raises(FloatingPointError, match="at step 3"):
        run.run()
    assert json.loads((tmp_path / "run" / CHECKPOINT / "trainer.json").read_text())["step"] == 3
    assert_same_weights(saved, weights(tmp_path / "run"))


def test_an_inf_gradient_on_a_finite_loss_stops_without_saving_and_does_not_blame_the_lr(tmp_path):
    run = trainer(tmp_path)
    run.run(stop_after=3)                             # a checkpoint at step 3
    saved = weights(tmp_path / "run")
    next(run.model.parameters()).register_hook(lambda grad: torch.full_like(grad, float("inf")))
    with pytest.raises(FloatingPointError, match="gradient became inf at step 3") as err:
        run.run()
    message = str(err.value)
    assert "--lr" not in message and "checkpoint of step 3" in message and "\n" not in message, message
    assert_same_weights(saved, weights(tmp_path / "run"))


def test_weights_with_a_nan_are_never_saved_and_no_checkpoint_is_claimed_when_none_exists(tmp_path):
    run = trainer(tmp_path)
    run.train_step()
    with torch.no_grad():
        next(run.model.parameters()).view(-1)[0] = float("nan")      # what an overflowed update leaves behind
    with pytest.raises(FloatingPointError, match="weights hold NaN or inf after step 1") as err:
        run.save()
    message = str(err.value)
    assert "no checkpoint was written" in message and "last good" not in message and "--lr" not in message, message
    assert not (tmp_path / "run" / CHECKPOINT).exists()


@pytest.mark.parametrize("lr", [1e30, 1e40])
def test_an_absurd_learning_rate_stops_with_a_floating_point_error_that_names_the_lr(tmp_path, lr):
    with pytest.raises(FloatingPointError, match="Lower --lr") as err:
        trainer(tmp_path, lr=lr).run()
    assert "\n" not in str(err.value) and "no checkpoint was written" in str(err.value), str(err.value)
    assert not (tmp_path / "run" / CHECKPOINT).exists()


def test_pixel_space_trains_the_same_recipe_on_3x64x64(tmp_path):
    run = trainer(tmp_path, space="pixel", num_train_images=16, batch_size=2, steps=1)
    run.prepare()
    z0 = run.batch(0)[0]
    assert z0.shape == (2, 3, 64, 64) and z0.min() >= -1 and z0.max() <= 1
    run.run()


def test_the_export_is_a_pipeline_with_the_ema_weights(tmp_path):
    from minildm.pipeline import LatentDiffusion

    run = trainer(tmp_path)
    run.run()
    export_pipeline(tmp_path / "run", tmp_path / "pipe", {"note": "test"})
    pipe = LatentDiffusion.from_folder(tmp_path / "pipe")
    for name, value in pipe.unet.state_dict().items():
        assert torch.equal(value, run.ema.shadow[f"unet.{name}"].to(value.dtype)), name
    record = json.loads((tmp_path / "pipe" / "training.json").read_text())
    assert record["note"] == "test" and record["history"]
    images = pipe.text_to_image(["a small red circle at the top left"], steps=2, seed=0)
    assert images.shape == (1, 3, 64, 64)


# ---------------------------------------------------------------------------------------------- bad input

def test_a_used_folder_needs_resume_and_resume_needs_a_checkpoint(tmp_path):
    trainer(tmp_path).run(stop_after=3)
    with pytest.raises(FileExistsError, match="--resume"):
        trainer(tmp_path)
    with pytest.raises(FileNotFoundError, match="nothing to resume.*drop --resume"):
        trainer(tmp_path, "fresh", resume=True)
    with pytest.raises(ValueError, match="lr"):
        trainer(tmp_path, resume=True, lr=5e-3)


def test_a_checkpoint_saved_before_a_setting_existed_resumes_at_its_default_only(tmp_path):
    trainer(tmp_path).run(stop_after=3)
    state = tmp_path / "run" / CHECKPOINT / "trainer.json"
    saved = json.loads(state.read_text())
    del saved["train_config"]["min_snr_gamma"]            # as a checkpoint written before --min-snr-gamma
    state.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"different settings \(min_snr_gamma\)"):
        trainer(tmp_path, resume=True, min_snr_gamma=1.0)
    assert trainer(tmp_path, resume=True).step == 3


def test_resume_first_restores_a_checkpoint_a_crash_left_beside_its_folder(tmp_path):
    trainer(tmp_path).run(stop_after=3)
    folder = tmp_path / "run" / CHECKPOINT
    folder.rename(folder.with_name(f".{CHECKPOINT}.old-12345"))   # died between the two renames of a save
    assert trainer(tmp_path, resume=True).step == 3
    assert folder.is_dir()


def test_bad_options_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="space"):
        trainer(tmp_path, space="voxels")
    with pytest.raises(ValueError, match="caption_dropout"):
        trainer(tmp_path, caption_dropout=1.0)
    with pytest.raises(ValueError, match="unknown prediction_type 'eps'; choose one of epsilon"):
        LDMTrainConfig(prediction_type="eps")
    with pytest.raises(ValueError, match="precision"):
        LDMTrainConfig(precision="half")
    with pytest.raises(ValueError, match="image size 76x76 is not a multiple of 8"):
        trainer(tmp_path, image_size=76)
    narrow_text = model_configs(**TINY)
    narrow_text.text_encoder = model_configs(**{**TINY, "text_dim": 16}).text_encoder
    with pytest.raises(ValueError, match="context of width 32 but the text encoder makes 16"):
        LDMTrainer(tiny_config(), tmp_path / "narrow", narrow_text, progress=False)
    with pytest.raises(ValueError, match="comma-separated"):
        model_configs(channels="64;128")
    with pytest.raises(ValueError, match="--attention"):
        model_configs(channels="64,128", attention="1")


def test_heads_are_one_count_for_all_levels_or_one_per_level():
    """`--heads 1,4`: one head of 24 channels at 8x8 and four of 12 at 4x4; the text encoder takes the deepest level's.
    One count keeps every level and the text encoder at it, as before."""
    def attention_heads(models):
        unet = UNet(models.unet)
        return {m.to_q.out_features // m.heads: m.heads for m in unet.modules() if isinstance(m, MultiHeadAttention)}

    per_level = model_configs(channels="24,48", attention="1,1", heads="1,4")
    assert per_level.unet.level_heads == (1, 4) and per_level.text_encoder.heads == 4
    assert attention_heads(per_level) == {24: 1, 12: 4}             # head size -> heads: 24 channels in one head
    shared = model_configs(channels="24,48", attention="1,1", heads=2)
    assert shared.unet.level_heads == (2, 2) and shared.text_encoder.heads == 2
    assert model_configs(heads="8").unet.level_heads == (8, 8)
    args = build_parser().parse_args(["train-ldm", "--out", "x", "--heads", "1,4"])
    assert model_configs(heads=args.heads).unet.level_heads == (1, 4)
    with pytest.raises(ValueError, match="--heads has 3 entries for 2 levels"):
        model_configs(heads="1,2,4")
    with pytest.raises(ValueError, match="48 channels do not split into 5 heads"):
        model_configs(heads="1,5")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train-ldm", "--out", "x", "--heads", "1,0"])


# ---------------------------------------------------------------------------------------------- DDP

@pytest.mark.slow
def test_torchrun_with_two_cpu_processes_keeps_replicas_identical_and_lowers_the_loss(tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "minildm", "train-ldm", "--out", str(out), "--steps", "40", "--batch-size", "8",
               "--num-images", "64", "--warmup-steps", "5", "--save-every", "20", "--sample-every", "0",
               "--log-every", "1",
               "--channels", "16,32", "--norm-groups", "8", "--heads", "2", "--text-dim", "32", "--text-depth", "1",
               "--threads", "1", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    trainer_json = json.loads((out / CHECKPOINT / "trainer.json").read_text())
    summary = trainer_json["summary"]
    assert summary["world_size"] == 2 and summary["steps"] == 40
    assert summary["replicas_identical"], "the two ranks ended with different weights"
    losses = [r["loss"] for r in trainer_json["history"]]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, f"loss went {first:.3f} -> {last:.3f}"
    assert done.stdout.count('"replicas_identical"') == 1, "only rank 0 prints the summary"


# ---------------------------------------------------------------------------------------------- faster recipes

def test_the_trainer_draws_timesteps_from_the_configured_sampling(tmp_path):
    uniform = trainer(tmp_path, "u", batch_size=512, t_sampling="uniform")
    min_snr = trainer(tmp_path, "m", batch_size=512, t_sampling="min_snr")
    uniform.prepare()
    min_snr.prepare()
    t_uniform = torch.cat([uniform.batch(step)[2] for step in range(4)])
    t_min_snr = torch.cat([min_snr.batch(step)[2] for step in range(4)])
    # min-SNR draws the nearly clean timesteps (SNR > 5 below t = 147 on SD's schedule) far less often: p(t < 100)
    # is 2.9% instead of 10%
    assert (t_uniform < 100).float().mean() > 0.08
    assert (t_min_snr < 100).float().mean() < 0.04
    choices = "uniform, min_snr, min_snr_eps, lognormal"
    with pytest.raises(ValueError, match=f"unknown t_sampling 'edm'; choose one of {choices}"):
        LDMTrainConfig(t_sampling="edm")


def test_the_trainer_draws_from_min_snr_with_the_configured_gamma(tmp_path):
    low = trainer(tmp_path, "g", batch_size=512, min_snr_gamma=0.25)
    assert torch.equal(low.t_probabilities, timestep_probabilities(low.models.schedule, "min_snr", 0.25))
    low.prepare()
    t_low = torch.cat([low.batch(step)[2] for step in range(4)])
    # gamma 0.25 draws t < 300 with p = 0.033 (gamma 5: 0.236, test_timestep_sampling)
    assert (t_low < 300).float().mean() < 0.06
    with pytest.raises(ValueError, match="min_snr_gamma must be > 0, got 0"):
        LDMTrainConfig(min_snr_gamma=0)
    with pytest.raises(ValueError, match="t_sampling 'lognormal' has none"):
        LDMTrainConfig(t_sampling="lognormal", min_snr_gamma=1.0)


def test_zero_terminal_snr_trains_to_pure_noise_and_its_pipeline_samples_from_there(tmp_path):
    run = trainer(tmp_path, steps=2, prediction_type="v_prediction", zero_terminal_snr=True, t_sampling="min_snr_eps")
    schedule = run.models.schedule
    assert schedule.rescale_betas_zero_snr and schedule.alpha_bar[-1] == 0
    assert torch.equal(schedule.alpha_bar, NoiseSchedule(rescale_betas_zero_snr=True).alpha_bar)
    assert torch.equal(run.t_probabilities, timestep_probabilities(schedule, "min_snr_eps"))
    assert run.t_probabilities[-1] > 0                     # the pure-noise step is practised
    run.run()
    pipe = LatentDiffusion.from_pretrained(export_pipeline(tmp_path / "run", tmp_path / "pipe", {}, steps=4))
    assert pipe.schedule.rescale_betas_zero_snr and pipe.schedule.timestep_spacing == "trailing"
    steps = []
    z0 = pipe.text_to_image("a small red circle at the left", seed=0, output_type="latents", callback=steps.append)
    # "trailing" timesteps: the first model call is at t = T - 1, where training's input was pure noise too
    assert [step.t for step in steps][0] == 999 and len(steps) == 4
    assert torch.isfinite(z0).all()
    # the defaults keep SD's schedule, which leaves sqrt(alpha_bar) = 0.068 of the image at t = 999
    default = trainer(tmp_path, "default").models.schedule
    assert not default.rescale_betas_zero_snr and default.alpha_bar[-1].sqrt().item() == pytest.approx(0.068, abs=1e-3)
    with pytest.raises(ValueError, match="zero_terminal_snr needs a v or z_0 model"):
        LDMTrainConfig(zero_terminal_snr=True)


@pytest.mark.slow
def test_a_compiled_denoiser_trains_as_the_eager_one(tmp_path):
    # attention at the lower level only: every kind of module still compiles (resampling, self- and cross-attention,
    # the mid block, the text encoder) in 196 s of inductor's cold compile on the 2-core CPU instead of 272 s
    models = {**TINY, "attention": "0,1"}
    eager = trainer(tmp_path, "eager", steps=2, models=models)
    compiled = trainer(tmp_path, "compiled", steps=2, compile=True, models=models)
    first = [eager.train_step()["loss"].item(), compiled.train_step()["loss"].item()]
    assert first[1] == pytest.approx(first[0], rel=1e-4)
    second = [eager.train_step()["loss"].item(), compiled.train_step()["loss"].item()]
    assert second[1] == pytest.approx(second[0], rel=1e-4)           # the same update: the same next loss
    assert compiled.trained is not compiled.model                       # it did compile
