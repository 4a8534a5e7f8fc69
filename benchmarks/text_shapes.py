"""Text conditioning on the shapes data set: does a model trained on CPU follow its prompts?

    python benchmarks/text_shapes.py [--steps 1100] [--out runs/text_shapes]
    python benchmarks/text_shapes.py --checkpoint runs/text_shapes   # evaluate a trained run

Trains a text-conditioned tiny U-Net (cross-attention to all-MiniLM-L6-v2 tokens, prompt
dropout 0.1) on 16x16 shapes whose training split never shows the held-out colour x shape
pairs (difflab.data.shapes.HELD_OUT_PAIRS), reporting wall-clock and process CPU time. Then
samples every held-out caption (and as many seen captions) with DDPM ancestral sampling (50
steps; deterministic DDIM leaves visible residual noise on some seeds of this briefly trained
model, which the checker, fitted on clean images, misreads) and reads the samples
with difflab.evaluation.shapes.ShapeAttributeChecker: accuracy of shape, colour, size and
position against the prompt. Baselines: the empty prompt (the unconditional model) scored
against the same prompts, chance, and the checker on clean held-out images (also with a grey
background tint of 0.4 and noise of std 0.1, what imperfect samples look like).
"""

from __future__ import annotations

import argparse
import time

import torch

from difflab.data.shapes import CaptionedImageData, load_shapes, parse_caption
from difflab.evaluation.shapes import ATTRIBUTES, ShapeAttributeChecker, attribute_accuracy
from difflab.guidance import ClassifierFreeGuidance
from difflab.parameterization import ClippedDenoiser, Denoiser
from difflab.pipeline import Pipeline
from difflab.recipes import DiffusionRecipe, TrainConfig
from difflab.samplers import get_sampler
from difflab.samplers.generate import generate


def train(args: argparse.Namespace) -> tuple[DiffusionRecipe, float, float]:
    cfg = TrainConfig.from_values(dict(dataset="shapes", resolution=16, steps=args.steps,
                      batch_size=args.batch_size, attention_resolutions=[8], lr=2e-3,
                      warmup_steps=100, ema_decay=0.999, sample_every=0, checkpoint_every=0,
                      log_every=250, out_dir=args.out, seed=args.seed))
    wall, cpu = time.perf_counter(), time.process_time()
    trainer = DiffusionRecipe(cfg, overwrite=True)  # a re-run retrains
    trainer.run(progress=False)
    return trainer, time.perf_counter() - wall, time.process_time() - cpu


def fit_checker(seed: int) -> ShapeAttributeChecker:
    parts = [load_shapes(16, "train", 3000, seed=seed + 1), load_shapes(16, "test", 1000,
                                                                         seed=seed + 2)]
    data = CaptionedImageData(torch.cat([p.images for p in parts]),
                              attributes=torch.cat([p.attributes for p in parts]))
    return ShapeAttributeChecker(seed).fit(data)


def sample_rows(den, encoder, captions: list[str], gamma: float, prompt_override: str | None,
                args: argparse.Namespace) -> torch.Tensor:
    """``per_caption`` samples per caption (seeds 0..), CFG ``gamma`` against ""."""
    per_caption = args.per_caption
    prompts = [prompt_override if prompt_override is not None else c
               for c in captions for _ in range(per_caption)]
    cond = encoder(prompts)
    if gamma != 1.0:
        den = ClassifierFreeGuidance(den, gamma, null_cond=encoder([""]))
    return generate(ClippedDenoiser(den), get_sampler(args.sampler), (3, 16, 16),
                    list(range(len(prompts))), labels=cond, steps=args.sample_steps,
                    batch_size=256, progress=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1100)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--per-caption", type=int, default=4)
    ap.add_argument("--sampler", default="ddpm")
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, nargs="*", default=[1.0, 3.0])
    ap.add_argument("--checkpoint", default=None, help="evaluate this run instead of training")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/text_shapes")
    args = ap.parse_args()
    if args.checkpoint:
        from difflab.text import TextEncoder

        pipe = Pipeline.from_pretrained(args.checkpoint)
        den = pipe.denoiser(clip=False)
        encoder = TextEncoder(pipe.stage.text_encoder)
    else:
        trainer, wall, cpu = train(args)
        print(f"training: {args.steps} steps x {args.batch_size} images, wall {wall:.0f} s, "
              f"process CPU {cpu:.0f} s, torch threads {torch.get_num_threads()}")
        den = Denoiser(trainer.ema.model, trainer.process, trainer.config.diffusion.prediction)
        encoder = trainer.text_encoder
    checker = fit_checker(args.seed)
    held = load_shapes(16, "test", 1, seed=args.seed)
    seen = load_shapes(16, "train", 1, seed=args.seed)
    g = torch.Generator().manual_seed(args.seed)
    seen_caps = [seen.class_names[i] for i in torch.randperm(len(seen.class_names),
                                                             generator=g)[:len(held.class_names)]]
    rows = []
    for name, caps in (("held-out", held.class_names), ("seen", seen_caps)):
        target = torch.tensor([parse_caption(c) for c in caps]).repeat_interleave(args.per_caption,
                                                                            dim=0)
        for gamma in args.guidance:
            x = sample_rows(den, encoder, caps, gamma, None, args)
            rows.append((name, f"prompt, gamma={gamma:g}", attribute_accuracy(
                checker.predict(x), target)))
        if name == "held-out":
            x = sample_rows(den, encoder, caps, 1.0, "", args)
            rows.append((name, "empty prompt (unconditional)", attribute_accuracy(
                checker.predict(x), target)))
            clean = load_shapes(16, "test", 500, seed=args.seed + 7)
            rows.append((name, "checker on clean images", attribute_accuracy(
                checker.predict(clean.images), clean.attributes)))
            noisy = (clean.images + 0.4 + 0.1 * torch.randn(clean.images.shape, generator=g))
            rows.append((name, "checker on clean images + grey tint + noise",
                         attribute_accuracy(checker.predict(noisy.clamp(-1, 1)),
                                            clean.attributes)))
    rows.append(("", "chance", {"shape": 1 / 3, "colour": 1 / 4, "size": 1 / 2,
                                "position": 1 / 4, "all": 1 / 96}))
    print(f"\n| captions | sampling | {' | '.join(ATTRIBUTES)} | all four |")
    print("|---|---|" + "---:|" * (len(ATTRIBUTES) + 1))
    for name, how, acc in rows:
        cells = " | ".join(f"{acc[k]:.2f}" for k in (*ATTRIBUTES, "all"))
        print(f"| {name} | {how} | {cells} |")


if __name__ == "__main__":
    main()
