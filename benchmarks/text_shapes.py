"""Text conditioning on the shapes data set: does a model trained on CPU follow its prompts?

    python benchmarks/text_shapes.py [--steps 1100] [--out runs/text_shapes]

Trains a text-conditioned tiny U-Net (cross-attention to all-MiniLM-L6-v2 tokens, prompt
dropout 0.1) on 16x16 shapes whose training split never shows the held-out colour x shape
pairs (difflab.data.shapes.HELD_OUT_PAIRS), reporting wall-clock and process CPU time. Then
samples every held-out caption (and as many seen captions) with DDIM and reads the samples
with difflab.evaluation.shapes.ShapeAttributeChecker: accuracy of shape, colour, size and
position against the prompt. Baselines: the empty prompt (the unconditional model) scored
against the same prompts, chance, and the checker on clean held-out images.
"""

from __future__ import annotations

import argparse
import time

import torch

from difflab.data.shapes import CaptionedImageData, load_shapes, parse_caption
from difflab.evaluation.shapes import ATTRIBUTES, ShapeAttributeChecker, attribute_accuracy
from difflab.guidance import ClassifierFreeGuidance
from difflab.parameterization import ClippedDenoiser, Denoiser
from difflab.samplers import ddim
from difflab.samplers.generate import generate
from difflab.training import TrainConfig, Trainer


def train(args: argparse.Namespace) -> tuple[Trainer, float, float]:
    cfg = TrainConfig(dataset="shapes", resolution=16, steps=args.steps,
                      batch_size=args.batch_size, attention_resolutions=[8], lr=2e-3,
                      warmup_steps=100, ema_decay=0.999, sample_every=0, checkpoint_every=0,
                      log_every=250, out_dir=args.out, seed=args.seed)
    wall, cpu = time.perf_counter(), time.process_time()
    trainer = Trainer(cfg)
    trainer.run(progress=False)
    return trainer, time.perf_counter() - wall, time.process_time() - cpu


def fit_checker(seed: int) -> ShapeAttributeChecker:
    parts = [load_shapes(16, "train", 3000, seed=seed + 1), load_shapes(16, "test", 1000,
                                                                         seed=seed + 2)]
    data = CaptionedImageData(torch.cat([p.images for p in parts]),
                              attributes=torch.cat([p.attributes for p in parts]))
    return ShapeAttributeChecker(seed).fit(data)


def sample_rows(trainer: Trainer, encoder, captions: list[str], gamma: float,
                prompt_override: str | None, per_caption: int, steps: int) -> torch.Tensor:
    """``per_caption`` DDIM samples per caption (seeds 0..), CFG ``gamma`` against ""."""
    den = Denoiser(trainer.ema.model, trainer.process, trainer.config.prediction)
    prompts = [prompt_override if prompt_override is not None else c
               for c in captions for _ in range(per_caption)]
    cond = encoder(prompts)
    if gamma != 1.0:
        den = ClassifierFreeGuidance(den, gamma, null_cond=encoder([""]))
    return generate(ClippedDenoiser(den), ddim, (3, 16, 16), list(range(len(prompts))),
                    labels=cond, steps=steps, batch_size=256, progress=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1100)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--per-caption", type=int, default=4)
    ap.add_argument("--sample-steps", type=int, default=30)
    ap.add_argument("--guidance", type=float, nargs="*", default=[1.0, 3.0, 5.0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/text_shapes")
    args = ap.parse_args()
    trainer, wall, cpu = train(args)
    print(f"training: {args.steps} steps x {args.batch_size} images, wall {wall:.0f} s, "
          f"process CPU {cpu:.0f} s, torch threads {torch.get_num_threads()}")
    checker = fit_checker(args.seed)
    encoder = trainer.text_encoder
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
            x = sample_rows(trainer, encoder, caps, gamma, None, args.per_caption,
                            args.sample_steps)
            rows.append((name, f"prompt, gamma={gamma:g}", attribute_accuracy(
                checker.predict(x), target)))
        if name == "held-out":
            x = sample_rows(trainer, encoder, caps, 1.0, "", args.per_caption,
                            args.sample_steps)
            rows.append((name, "empty prompt (unconditional)", attribute_accuracy(
                checker.predict(x), target)))
            clean = load_shapes(16, "test", 500, seed=args.seed + 7)
            rows.append((name, "checker on clean images", attribute_accuracy(
                checker.predict(clean.images), clean.attributes)))
    rows.append(("", "chance", {"shape": 1 / 3, "colour": 1 / 4, "size": 1 / 2,
                                "position": 1 / 4, "all": 1 / 96}))
    print(f"\n| captions | sampling | {' | '.join(ATTRIBUTES)} | all four |")
    print("|---|---|" + "---:|" * (len(ATTRIBUTES) + 1))
    for name, how, acc in rows:
        cells = " | ".join(f"{acc[k]:.2f}" for k in (*ATTRIBUTES, "all"))
        print(f"| {name} | {how} | {cells} |")


if __name__ == "__main__":
    main()
