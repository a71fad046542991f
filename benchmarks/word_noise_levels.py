"""Which noise level decides which word of a caption? (issue 17, chapter 06)

SDEdit as a probe: noise a held-out image's latent to the level of timestep t (`image_to_image`'s strength), then
denoise it towards its caption with one word changed ("a small red circle at the left" -> "... at the right"). If
the model still follows the new word from t, that word was not yet decided at t's noise level; if the image keeps
its old word, it was. The share of edits the judge reads as taken, against t, for each of the four words:

- a word decided late (near the clean end) can be changed from a small t: the edit takes at low strength;
- a word decided early (at high noise) is changed only from a large t.

Training draws its timesteps from p_t (`--t-sampling`, `--min-snr-gamma`); this says which words each part of p_t
teaches. The new value of the edited word is drawn as the data would draw it given the other three words, which stay
as the caption had them (edited_caption).

    python benchmarks/word_noise_levels.py --json benchmarks/results/word-noise-levels.json
    python benchmarks/word_noise_levels.py --pipeline runs/from-scratch/pipeline --images 100
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from minildm.data import COLOURS, EVAL_SEED, SHAPE_KINDS, ShapesDataset, draw_like
from minildm.judge import factor_words, read_words
from minildm.pretrained import load_judge, load_pipeline
from minildm.samplers import make_sampler

WORDS = ("kind", "colour", "size", "position")
EDIT_SEED = 7


def edited_caption(factors: dict, word: str, rng: np.random.Generator,
                   tries: int = 10_000) -> tuple[str, str] | None:
    """(the caption with `word` changed to another of its values, that new value) for a one-object scene, or None if
    `tries` draws found none. The new value is drawn as the data would draw it with the other three words kept:
    kind and colour uniformly among the others (the data draws them so), size and position by drawing the
    generator's own shapes (same kind and colour) until one has the other three words and a new value of this one.
    So a combination the data rarely makes ("a large ... at the top left", whose centre must fall within a few
    pixels of the corner's cell) is asked for as rarely as the model saw it."""
    obj, before = factors["objects"][0], factor_words(factors)
    if word in ("kind", "colour"):
        values = SHAPE_KINDS if word == "kind" else list(COLOURS)
        new = replace(obj, **{word: str(rng.choice([v for v in values if v != before[word]]))})
        return new.describe(), factor_words({**factors, "objects": [new]})[word]
    if word not in WORDS:
        raise ValueError(f"unknown word {word!r}; choose one of {', '.join(WORDS)}")

    def one_word_changed(candidate) -> bool:
        after = factor_words({**factors, "objects": [candidate]})
        return after[word] != before[word] and all(after[w] == before[w] for w in WORDS if w != word)

    new = draw_like(rng, obj, True, one_word_changed, tries)
    return None if new is None else (new.describe(), factor_words({**factors, "objects": [new]})[word])


def strength_grid(steps: int) -> list[float]:
    """Every second step of a `steps`-step run as an img2img strength (2/steps, 4/steps, ...), ending at 1: the whole
    run, from pure noise."""
    return [k / steps for k in range(2, steps + 1, 2)] + [1.0] * (steps % 2 == 1)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", default="shapes64", help="a shipped pipeline name or an exported pipeline folder")
    p.add_argument("--images", type=int, default=100, help="held-out images edited, per word and level")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps of a whole run (strength 1)")
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", help="also write every figure here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe, judge = load_pipeline(args.pipeline), load_judge()
    data = ShapesDataset(args.images, seed=EVAL_SEED)
    scenes = [data.factors(i) for i in range(args.images)]
    images = data.images(0, args.images)                                            # (N, 3, 64, 64)
    sampler = make_sampler("ddim", pipe.schedule, args.steps)
    strengths = strength_grid(args.steps)
    start_t = [int(sampler.timesteps[sampler.start_index(s)]) for s in strengths]
    edited, took, kept = {}, {}, {}
    rng = np.random.default_rng(EDIT_SEED)
    for word in WORDS:
        edits = [edited_caption(scene, word, rng) for scene in scenes]
        chosen = [i for i, edit in enumerate(edits) if edit is not None]           # the scenes this word can change in
        prompts, wanted = [edits[i][0] for i in chosen], [edits[i][1] for i in chosen]
        others = [{w: v for w, v in factor_words(scenes[i]).items() if w in WORDS and w != word} for i in chosen]
        edited[word], took[word], kept[word] = len(chosen), [], []
        for strength, t in zip(strengths, start_t):
            begin = time.time()
            out = torch.cat([pipe.image_to_image(images[chosen[i:i + 100]], prompts[i:i + 100], strength=strength,
                                                 guidance_scale=args.guidance, steps=args.steps, seed=0)
                             for i in range(0, len(chosen), 100)])                 # (n, 3, 64, 64)
            read = read_words(judge, out)
            took[word].append(float(np.mean([r[word] == new for r, new in zip(read, wanted)])))
            kept[word].append(float(np.mean([all(r[w] == v for w, v in o.items()) for r, o in zip(read, others)])))
            print(f"{word:<9} from t = {t:>3}: the edit took in {took[word][-1]:.0%}, the other words kept in "
                  f"{kept[word][-1]:.0%} ({len(chosen)} images, {time.time() - begin:.0f} s)", flush=True)
    snr = pipe.schedule.snr
    print("\n| start t | SNR | " + " | ".join(WORDS) + " |\n|---:|---:|" + "---:|" * len(WORDS))
    for j, t in enumerate(start_t):
        print(f"| {t} | {snr[t].item():.3g} | " + " | ".join(f"{took[w][j]:.0%}" for w in WORDS) + " |")
    record = {"pipeline": args.pipeline, "images": args.images, "eval_seed": EVAL_SEED, "edit_seed": EDIT_SEED,
              "steps": args.steps, "guidance": args.guidance, "strengths": strengths, "start_t": start_t,
              "start_snr": [snr[t].item() for t in start_t], "edited": edited, "took": took, "others_kept": kept}
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    main()
