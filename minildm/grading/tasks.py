"""The exercises: one entry per task id that the package marks with `# BEGIN SOLUTION <id>`.

The hint is what a stuck student reads, in the workbook's stub and in the grade report: the idea and the
convention the tests hold them to, not the code. `section` is a heading of the chapter, so the hint can send them
to the right page. Points live with the tests (`@pytest.mark.points`), which is where they are earned.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    id: str              # "ch02.gaussian_kl": the chapter, then a name
    title: str           # what the student builds, in a few words
    hint: str            # the idea and the conventions the tests check
    section: str         # a heading of the chapter, word for word

    @property
    def chapter(self) -> str:
        return self.id.split(".")[0]                  # "ch02"

    @property
    def number(self) -> str:
        return self.chapter[2:]                       # "02"

    def message(self) -> str:
        """The text of the workbook's NotImplementedError (after the task id)."""
        return f"{self.hint} (see chapter {self.number}, section: {self.section})"


TASKS: dict[str, Task] = {t.id: t for t in [
    Task("ch01.latent_shape", "latent shape arithmetic",
         "return (C, H / f, W / f) with f = config.downsampling_factor and C = config.latent_channels; raise a "
         "ValueError that names a size that works when f does not divide both sides (or a side is not positive)",
         "The shapes, in code"),
    Task("ch01.twonn", "the TwoNN intrinsic dimension",
         "after drop_duplicates, take each point's two nearest distances (nearest_distances), mu = r2 / r1 sorted; "
         "fit -log(1 - i/N) = d log mu through the origin on all but the largest discard_fraction (and always the "
         "last) ratios, and give the MLE (N - 1) / sum(log mu) too",
         "2. TwoNN: the ratio of the two nearest distances"),
    Task("ch02.psnr", "PSNR per image",
         "map both images from [-1, 1] to [0, 1] (clamped), take the mean squared error per image, floor it at "
         "1e-10, and return 10 log10(1 / MSE) as a (B,) tensor",
         "The claim"),
    Task("ch02.resblock", "a ResBlock forward pass",
         "two steps of GroupNorm -> SiLU -> 3x3 conv (norm1/conv1, then norm2/dropout/conv2), and the input "
         "added back through self.skip",
         "ResBlock"),
    Task("ch02.reparameterize", "the reparameterisation trick",
         "z = mean + std * eps, with eps ~ N(0, I) of mean's shape drawn in float32 from `generator` and then "
         "moved to mean's device and dtype, so that gradients reach mean and logvar",
         "The diagonal Gaussian and the reparameterisation trick"),
    Task("ch02.gaussian_kl", "the KL to N(0, I)",
         "KL = 1/2 (mean^2 + var - 1 - logvar) for each latent number, summed over (C, h, w): one value per item",
         "The KL to N(0, I), in closed form"),
    Task("ch02.scale_factor", "measuring the scale factor",
         "encode the first `count` images in batches of 256, draw one posterior sample per image with "
         "step_generator(seed, start, 9), and return 1 / std of all the samples together, as a float",
         "The scale factor"),
    Task("ch03.q_sample", "the forward process in one jump",
         "self.coefficients(t, z0) gives sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t), already shaped (B, 1, 1, 1) "
         "(two numbers for one t); "
         "scale the clean latent by the first and the given noise by the second and add them (draw no noise of "
         "your own), for one t or one t per item",
         "Jumping to step t in one go"),
    Task("ch03.eps_to_z0", "z_0 from the noise",
         "solve z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps for z_0, with the two square roots from "
         "self.coefficients(t, zt); it must undo the forward process exactly wherever alpha_bar_t > 0, for one t "
         "or one t per item",
         "What the model predicts: eps, z_0 or v"),
    Task("ch04.naive_attention", "attention, the formula as written",
         "S = (q * scale) k^T over the last dims (one row of scores per query, one column per key), apply_mask(S, "
         "mask), softmax over the keys taken in softmax_dtype(S.dtype) (float32 for half inputs) and cast back to "
         "v's dtype, then P v; no fused kernel (scaled_dot_product_attention) and no other backend",
         "1. The formula, and the matrix that does not fit"),
    Task("ch04.online_softmax", "one step of the online softmax",
         "m_new = max(m_old, the chunk's row max); subtract m_new (0 where it is still -inf, so exp gives 0, not "
         "NaN) and exponentiate: p; rescale the old sum and acc by exp(m_old - m_new), add p's row sum and p v; "
         "return OnlineSoftmax(m_new, l_new, acc_new) in the state's dtype",
         "3. The online softmax, step by step"),
    Task("ch05.timestep_embedding", "the sinusoidal timestep embedding",
         "half = dim // 2 frequencies omega_i = exp(-ln(10000) i / (half - freq_shift)), i = 0 .. half-1, from 1 "
         "down to about 1/10,000, made on t's device; angles t omega_i in float32, one row per timestep (fractional "
         "t too); return cos and sin of the angles side by side, [cos, sin] when flip_sin_to_cos and [sin, cos] "
         "otherwise: (B, dim), float32",
         "1. The timestep, as a vector"),
    Task("ch05.resblock", "a ResBlock that hears the timestep",
         "chapter 02's ResBlock written out again (super().forward cannot take the time in the middle): norm1 -> "
         "SiLU -> conv1, then add time_proj(SiLU(time)) as one shift per channel and item, the same at every "
         "position, then norm2 -> SiLU -> dropout -> conv2, and the input added back through self.skip",
         "2. ResBlock: the VAE's, told the time"),
    Task("ch05.cross_attention_block", "self-attention, cross-attention, feed-forward",
         "three steps in this order, each reading a LayerNorm of x and adding its answer back to x: attn1 (the "
         "positions attend to each other, norm1), attn2 (queries from the positions, keys and values from the "
         "prompt's tokens, norm2), then ff (norm3); the prompt enters through attn2 only, and un-normalised",
         "3. Cross-attention: where the prompt comes in"),
    Task("ch07.ddim_step", "one DDIM step, with eta",
         "you are given z0_hat (z0) and eps_hat (eps) at t, and ab_t, ab_prev (alpha_bar here and at the next "
         "timestep); sigma_t^2 = eta^2 (1 - ab_prev) / (1 - ab_t) (1 - ab_t / ab_prev); move to sqrt(ab_prev) z0_hat "
         "+ sqrt(1 - ab_prev - sigma_t^2) eps_hat, add sigma_t times randn(z.shape, generator, z.device, z.dtype) "
         "only when eta > 0 (eta = 0 draws nothing), and return (z_prev, z0_hat)",
         "DDIM: the same marginals, a deterministic path"),
    Task("ch07.euler_step", "one Euler step in sigma space",
         "x = z_0 + sigma eps; get z0_hat from self.denoised(x, output, sigma) (it knows the prediction type), the "
         "ODE's slope is (x - z0_hat) / sigma, move x by the slope times (sigma_next - sigma) and return "
         "(x_next, z0_hat)",
         "Euler: one step of the ODE"),
    Task("ch06.training_loss", "the training loss of one step",
         "build z_t from the clean latents with schedule.q_sample and the noise you are given (draw none of your "
         "own), ask the denoiser about (z_t, t, ids), and take the mean over the batch and every element of the "
         "squared difference to schedule.training_target (eps, z_0 or v, as schedule.prediction_type says); "
         "compute it in float32 even when the model answers in bfloat16 or float16, and keep the graph so "
         "gradients reach the "
         "denoiser: one scalar",
         "The training step, in one line of math"),
    Task("ch08.cfg_combine", "classifier-free guidance",
         "start from the empty prompt's answer and move w times the step from it to the prompt's answer: w = 0 gives "
         "uncond, w = 1 gives cond, w > 1 goes past cond; elementwise, in the inputs' dtype",
         "Classifier-free guidance"),
    Task("ch08.img2img_start", "where image to image starts",
         "strength 1: evaluation 0 and the given noise times sampler.init_noise_sigma, as with no image; otherwise "
         "start at sampler.start_index(strength) (it skips the first (1 - strength) of the steps and refuses what "
         "the sampler cannot do); if no evaluation is left there, return that index and a copy of z_0, else z_0 "
         "noised to evaluation start's level with sampler.add_noise and the given noise (draw none of your own)",
         "Image to image: starting part-way"),
    Task("ch09.bpe_merge", "CLIP's byte-pair merges",
         "`symbols` is the word's symbols with </w> on the last; while two neighbours form a pair in self.ranks, "
         "take the pair with the lowest rank among all neighbouring pairs (learned earliest, not the most frequent "
         "or the leftmost), merge every occurrence of it left to right without overlap, and look again; stop when "
         "no neighbouring pair has a rank or one symbol is left, and leave the result in `symbols`",
         "2. The tokenizer: bytes, then merges"),
]}


def chapters() -> list[str]:
    return sorted({t.chapter for t in TASKS.values()})


def select(patterns: list[str] | None) -> list[Task]:
    """Tasks named by ids, chapters ("ch02") or globs ("ch02.*"), in registry order; none given means all.

    A pattern that matches nothing is a ValueError that lists the known chapters and tasks.
    """
    if not patterns:
        return list(TASKS.values())
    chosen = set()
    for pattern in patterns:
        for part in filter(None, pattern.split(",")):
            matched = {i for i in TASKS if i == part or TASKS[i].chapter == part or fnmatch.fnmatchcase(i, part)}
            if not matched:
                raise ValueError(f"unknown chapter or task {part!r}; known chapters: {', '.join(chapters())}; "
                                 f"known tasks: {', '.join(TASKS)}")
            chosen |= matched
    return [t for i, t in TASKS.items() if i in chosen]


def chapter_ids(names: list[str] | None) -> list[str]:
    """Validate chapter ids such as "ch02" (for --use-reference-for); unknown ones are a ValueError."""
    known = chapters()
    for name in names or []:
        if name not in known:
            raise ValueError(f"unknown chapter {name!r} for --use-reference-for; "
                             f"chapters with tasks: {', '.join(known)}")
    return list(names or [])
