"""Personalise and control the text-conditioned shapes model: LoRA, DreamBooth, ControlNet and
Prompt-to-Prompt, each scored by the shapes attribute checker on held-out prompts and seeds.

    OMP_NUM_THREADS=1 python benchmarks/finetune_control.py --base RUN [--out DIR]
    OMP_NUM_THREADS=1 python benchmarks/finetune_control.py            # trains the base first
    ... --only lora,dreambooth,controlnet,p2p --images docs/images

The base is the model of ``benchmarks/text_shapes.py`` (16 px shapes, cross-attention to
MiniLM tokens; trained here for ``--base-steps`` when no ``--base`` is given). Every section
samples with DDPM ancestral, 50 steps, classifier-free guidance 3, noise seeds from 1000 on
(never used by any training or class-image draw), and reads the samples with
``ShapeAttributeChecker`` fitted on clean images of every shape and colour, the new ones
included (so it also sees a new shape or colour leaking into the original prompts).

- **LoRA** (Hu et al. 2021): the new colour "purple" (``data.shapes.NEW_COLOURS``) from 256
  captioned images of purple circles and squares; LoRA (rank 4, attention projections)
  against full fine-tuning at equal steps; purple accuracy on the trained shapes and on purple
  triangles (held out of the fine-tuning data), the trained-parameter fraction and the
  adapter's file size against the full model's.
- **DreamBooth** (Ruiz et al. 2023): the new shape "plus" from 5 images bound to the rare
  token "sks"; subject fidelity (share of samples read as a plus) and prior preservation (all
  four attributes right on 48 original prompts, same seeds before and after), without the
  prior-preservation loss, with it on unguided 25-step DDIM class images, and with it on the
  recipe's default class images (DDPM 50 steps, guidance 3: sampled as every sample here).
- **ControlNet** (Zhang et al. 2023): mask controls; IoU between the sample's foreground and
  the control mask on held-out masks (colour x shape pairs the training split never shows,
  centres moved past the training jitter) while the prompt sets the colour.
- **Prompt-to-Prompt** (Hertz et al. 2022): colour and shape word swaps; the target
  attribute's accuracy and what stays (the other attributes, the object's mask, the
  background's PSNR) against re-sampling the target prompt from the same noise.

Prints markdown tables; ``--json`` keeps the numbers (a re-run with ``--only`` updates its
sections there).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from difflab.data import save_labelled_grid
from difflab.data.shapes import (
    ALL_COLOURS,
    ALL_SHAPES,
    COLOURS,
    JITTER,
    caption,
    load_shape_variants,
    load_shapes,
    parse_caption,
    render,
)
from difflab.evaluation.shapes import (
    ShapeAttributeChecker,
    attribute_accuracy,
    foreground,
    mask_iou,
    masked_psnr,
)
from difflab.pipeline import Pipeline

sys.path.insert(0, str(Path(__file__).parent))
from text_shapes import train as train_text_shapes  # noqa: E402

GUIDANCE, STEPS, SAMPLER = 3.0, 50, "ddpm"
SAMPLE_STEPS = [STEPS]  # --sample-steps (a quick smoke run uses fewer)
EVAL_SEED = 1000  # evaluation noise seeds start here
PER_PROMPT = 2  # samples per prompt on the original prompts
MASK_THRESHOLD = 0.3  # the soft foreground's edge: a mask control's (coverage > ~0.25-0.31)
SECTIONS = ("lora", "dreambooth", "controlnet", "p2p")


# -- shared pieces -----------------------------------------------------------------------------
def fit_checker(seed: int = 0) -> ShapeAttributeChecker:
    """The checker, fitted on clean images of every shape and colour (new ones included)."""
    data = load_shape_variants(4000, seed=seed + 1, shapes=ALL_SHAPES,
                               colours=tuple(ALL_COLOURS))
    return ShapeAttributeChecker(seed, palette=ALL_COLOURS).fit(data)


def original_prompts(seed: int = 0) -> list[str]:
    """24 held-out-pair captions and 24 seen ones (as ``text_shapes.py`` picks them)."""
    held = load_shapes(16, "test", 1, seed=seed).class_names
    seen = load_shapes(16, "train", 1, seed=seed).class_names
    pick = torch.randperm(len(seen), generator=torch.Generator().manual_seed(seed))
    return list(held) + [seen[i] for i in pick[:len(held)].tolist()]


def sample(pipe: Pipeline, prompts: list[str], seed: int = EVAL_SEED,
           control: Tensor | None = None) -> Tensor:
    """One sample per prompt, image i from noise seed ``seed + i``."""
    kw: dict[str, Any] = {} if control is None else {"control": control}
    steps_ = SAMPLE_STEPS[0]
    return pipe(len(prompts), prompt=prompts, seed=seed, sampler=SAMPLER, steps=steps_,
                guidance=GUIDANCE, **kw).samples


def targets(prompts: list[str]) -> Tensor:
    return torch.tensor([parse_caption(p) for p in prompts])


def repeat(prompts: list[str], k: int) -> list[str]:
    return [p for p in prompts for _ in range(k)]


def accuracy_on(pipe: Pipeline, checker: ShapeAttributeChecker, prompts: list[str],
                **kw: Any) -> tuple[dict[str, float], Tensor]:
    """Attribute accuracy of ``pipe``'s samples of ``prompts`` (and the samples)."""
    x = sample(pipe, prompts, **kw)
    return attribute_accuracy(checker.predict(x), targets(prompts)), x


def dir_size(path: Path, pattern: str = "*.safetensors") -> int:
    return sum(f.stat().st_size for f in Path(path).rglob(pattern))


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    cpu = time.process_time()
    out = fn()
    return out, time.process_time() - cpu


def finetune(base: str, data: Any, out: Path, steps: int, *, batch_size: int,
             lr: float | None = None, lora_rank: int | None = None,
             instance_prompt: str | None = None, class_prompt: str | None = None,
             prior_weight: float = 1.0, class_images: int = 64,
             class_how: dict[str, Any] | None = None) -> Path:
    """A fine-tuning run (``difflab finetune``'s recipe, in this process) on the in-memory
    captioned ``data`` into ``out``: full, or LoRA of rank ``lora_rank``; DreamBooth's
    prompts and prior preservation when given (``class_how``: class_sampler, class_steps,
    class_guidance of the class images; None: the recipe's defaults). Returns ``out``."""
    from difflab.recipes.finetune import FinetuneRecipe
    from difflab.recipes.finetune_config import FinetuneConfig

    optim: dict[str, Any] = {"steps": steps, "batch_size": batch_size}
    if lr is not None:
        optim["lr"] = lr
    cfg = FinetuneConfig.from_values({
        "model": {"base": base, "data": "shapes variants (given in memory)"},
        "method": {"lora": lora_rank is not None, "lora_rank": lora_rank or 4},
        "dreambooth": {"instance_prompt": instance_prompt, "class_prompt": class_prompt,
                       "prior_weight": prior_weight, "class_images": class_images,
                       **(class_how or {})},
        "optim": optim, "run": {"out_dir": str(out), "seed": 0}})
    FinetuneRecipe(cfg, data, overwrite=True).run(progress=False)
    return out


def weights_bytes(pipe: Pipeline, adapter: bool, where: Path) -> int:
    """Bytes of safetensors ``pipe`` saves: its adapters alone, or the whole model."""
    import shutil

    shutil.rmtree(where, ignore_errors=True)
    if adapter:
        pipe.save_adapters(where)
    else:
        pipe.save_pretrained(where)
    return dir_size(where)


def grid(path: Path, rows: list[Tensor], labels: list[str], caption_text: str) -> None:
    x = torch.cat(rows)
    save_labelled_grid(x, path, nrow=len(rows[0]), scale=4, row_labels=labels,
                       caption=caption_text)


# -- LoRA ------------------------------------------------------------------------------------
def lora_section(args: argparse.Namespace, checker: ShapeAttributeChecker) -> dict[str, Any]:
    """Purple from circles and squares; scored on those and on purple triangles."""
    trained = load_shape_variants(256, seed=11, shapes=("circle", "square"),
                                  colours=("purple",))
    seen = [caption(s, 4, z, p) for s in (0, 1) for z in range(2) for p in range(4)]
    held = [caption(2, 4, z, p) for z in range(2) for p in range(4)]
    originals = repeat(original_prompts(), PER_PROMPT)
    base = Pipeline.from_pretrained(args.base)
    n_base = sum(p.numel() for p in base.net.parameters())
    runs: dict[str, Pipeline] = {"base (no fine-tuning)": base}
    cpu: dict[str, float] = {}
    sizes: dict[str, int] = {}
    sizes["base (no fine-tuning)"] = weights_bytes(base, False, args.out / "saved_base")
    for name, rank in (("LoRA r=4 (attention)", 4), ("full fine-tuning", None)):
        out = args.out / ("lora" if rank else "full")
        _, cpu[name] = timed(lambda o=out, r=rank: finetune(
            args.base, trained, o, args.lora_steps, batch_size=16, lora_rank=r))
        runs[name] = Pipeline.from_pretrained(out)
        sizes[name] = weights_bytes(runs[name], rank is not None, out / "saved")
    rows, pictures = [], []
    show = [caption(s, 4, 1, p) for s, p in ((0, 0), (1, 3), (2, 1), (2, 2))]
    for name, pipe in runs.items():
        acc_seen, _ = accuracy_on(pipe, checker, repeat(seen, 4))
        acc_held, _ = accuracy_on(pipe, checker, repeat(held, 8))
        acc_orig, _ = accuracy_on(pipe, checker, originals)
        trainable = adapter_parameters(pipe) if name.startswith("LoRA") else (
            n_base if name.startswith("full") else 0)
        rows.append({"run": name, "purple_seen": acc_seen["colour"],
                     "all_seen": acc_seen["all"], "purple_held": acc_held["colour"],
                     "all_held": acc_held["all"], "original_all": acc_orig["all"],
                     "trained_fraction": trainable / n_base, "cpu_s": cpu.get(name, 0.0),
                     "file_bytes": sizes[name]})
        pictures.append(sample(pipe, show * 4, seed=EVAL_SEED + 500))
    if args.images:
        grid(args.images / "finetune_lora.png", pictures, list(runs),
             "purple circle / square (trained), purple triangle (held out); 4 seeds")
    return {"rows": rows, "steps": args.lora_steps, "base_parameters": n_base}


def adapter_parameters(pipe: Pipeline) -> int:
    """Parameters of the pipeline's adapter stages (the trained ones of a LoRA run)."""
    from difflab.pipeline.card import ADAPTER_KINDS

    return sum(p.numel() for stage, net in zip(pipe.card.stages, pipe.networks, strict=False)
               if stage.kind in ADAPTER_KINDS for p in net.parameters())


# -- DreamBooth --------------------------------------------------------------------------------
INSTANCE = "a large yellow sks at the top left"
CLASS = "a large yellow shape at the top left"


def dreambooth_section(args: argparse.Namespace, checker: ShapeAttributeChecker
                       ) -> dict[str, Any]:
    """5 images of a large yellow plus at the top left bound to "sks"."""
    subject = load_shape_variants(5, seed=21, shapes=("plus",), colours=("yellow",),
                                  sizes=("large",), positions=("top left",))
    originals = repeat(original_prompts(), PER_PROMPT)
    recontext = [p.replace("yellow", c) for c in ("red", "blue") for p in (INSTANCE,)] + [
        "a large yellow sks at the bottom right", "a small yellow sks at the top left"]
    base = Pipeline.from_pretrained(args.base)
    plus = ALL_SHAPES.index("plus")
    runs: dict[str, Pipeline] = {"base": base}
    cpu: dict[str, float] = {}
    prior = {"class_prompt": CLASS, "prior_weight": 1.0, "class_images": 64}
    unguided = {**prior, "class_how": {"class_sampler": "ddim", "class_steps": 25,
                                       "class_guidance": 1.0}}
    half = args.db_lr / 2
    for name, opts, lr in (
            ("DreamBooth, no prior", {}, args.db_lr),
            ("+ prior, unguided class images (DDIM 25)", unguided, args.db_lr),
            ("+ prior, the recipe's class images (DDPM 50, guidance 3)", prior, args.db_lr),
            (f"+ prior, the recipe's class images, lr {half:g}", prior, half)):
        out = args.out / ("db_plain", "db_prior", "db_prior_guided", "db_prior_half")[
            len(runs) - 1]
        _, cpu[name] = timed(lambda o=out, k=opts, r=lr: finetune(
            args.base, subject, o, args.db_steps, batch_size=4, lr=r, instance_prompt=INSTANCE,
            **k))
        runs[name] = Pipeline.from_pretrained(out)
    rows, pictures = [], []
    for name, pipe in runs.items():
        x = sample(pipe, [INSTANCE] * 32)
        fidelity = float((checker.predict(x)[:, 0] == plus).float().mean())
        xr = sample(pipe, repeat(recontext, 8))
        pr = checker.predict(xr)
        recon = float(((pr[:, 0] == plus) & (pr[:, 1:] == targets(
            [p.replace("sks", "circle") for p in repeat(recontext, 8)])[:, 1:]).all(1)
                       ).float().mean())
        acc, xo = accuracy_on(pipe, checker, originals)
        leak = float((checker.predict(xo)[:, 0] == plus).float().mean())
        rows.append({"run": name, "fidelity": fidelity, "recontext": recon,
                     "original_all": acc["all"], "original_shape": acc["shape"],
                     "plus_on_original": leak, "cpu_s": cpu.get(name, 0.0)})
        pictures.append(torch.cat([x[:6], xo[::16][:6]]))
    base_all = rows[0]["original_all"]
    for r in rows:
        r["drop_points"] = 100 * (base_all - r["original_all"])
    if args.images:
        pictures.insert(0, torch.cat([subject.images, subject.images[:1] * 0 - 1,
                                      load_shapes(16, "train", 6, seed=5).images]))
        grid(args.images / "finetune_dreambooth.png", pictures,
             ["training images | data", *runs],
             f"left: '{INSTANCE}'; right: original prompts (same seeds in every row)")
    return {"rows": rows, "steps": args.db_steps, "lr": args.db_lr}


# -- ControlNet --------------------------------------------------------------------------------
def heldout_masks(n: int, jitter: tuple[float, float], seed: int = 31
                  ) -> tuple[Tensor, list[str], Tensor]:
    """Clean images, captions and mask controls [n, 1, 16, 16] of held-out colour x shape
    pairs (never in the training split) with centre offsets in ``jitter``."""
    from difflab.data.control import control_image

    test = load_shapes(16, "test", n, seed=seed)  # held-out pairs: attributes only
    x = render(test.attributes, 16, torch.Generator().manual_seed(seed), jitter)
    return x, [caption(*map(int, a)) for a in test.attributes], control_image(x, "mask")


def other_colour(prompt: str) -> str:
    """The caption with its colour word replaced by the next palette colour."""
    a = list(parse_caption(prompt))
    a[1] = (a[1] + 1) % len(COLOURS)
    return caption(*a)


def controlnet_section(args: argparse.Namespace, checker: ShapeAttributeChecker
                       ) -> dict[str, Any]:
    from difflab.recipes.config import OptimConfig, RunConfig
    from difflab.recipes.controlnet import ControlNetRecipe, ControlNetTrainConfig

    out = args.out / "controlnet"
    cfg = ControlNetTrainConfig(
        base=args.base, control="mask",
        optim=OptimConfig(steps=args.cn_steps, batch_size=32, lr=args.cn_lr, warmup_steps=0,
                          ema_decay=0.99),
        run=RunConfig(out_dir=str(out), sample_every=0, checkpoint_every=0, seed=0))
    _, cpu = timed(lambda: ControlNetRecipe(cfg, overwrite=True).run(progress=False))
    ctrl = Pipeline.from_pretrained(out)
    base = Pipeline.from_pretrained(args.base)
    rows, pictures = [], []
    for where, jitter in (("training jitter", (0.0, JITTER)),
                          ("centres past the training jitter", (JITTER, 0.11))):
        clean, prompts, masks = heldout_masks(args.cn_n, jitter)
        for name, pipe, ps, control in (
                ("base, no control", base, prompts, None),
                ("ControlNet", ctrl, prompts, masks),
                ("ControlNet, prompt with another colour", ctrl,
                 [other_colour(p) for p in prompts], masks),
                ("clean images of the masks (ceiling)", None, prompts, None)):
            x = clean if pipe is None else sample(pipe, ps, control=control)
            acc = attribute_accuracy(checker.predict(x), targets(ps))
            iou = mask_iou(x, masks, MASK_THRESHOLD)
            rows.append({"masks": where, "run": name, "iou": float(iou.mean()),
                         "iou_p10": float(iou.quantile(0.1)), "colour": acc["colour"],
                         "shape": acc["shape"], "all": acc["all"]})
            pictures.append(x[:12])
        pictures.insert(len(pictures) - 4, masks[:12].expand(-1, 3, -1, -1) * 2 - 1)
    if args.images:
        labels = ["control mask", "base, no control", "ControlNet", "ControlNet, other colour",
                  "clean image of the mask"]
        grid(args.images / "controlnet_masks.png", pictures,
             [f"{'A' if i < 5 else 'B'}: {t}" for i, t in enumerate(labels * 2)],
             "held-out colour x shape pairs; A: centres in the training jitter, B: past it; "
             "prompts: the clean images' captions (row 4: colour changed)")
    return {"rows": rows, "steps": args.cn_steps, "cpu_s": cpu, "n": args.cn_n}


# -- Prompt-to-Prompt --------------------------------------------------------------------------
def swaps(kind: str, n: int, seed: int = 41) -> list[tuple[str, str]]:
    """(source, target) caption pairs of seen combinations: the colour or the shape word
    replaced by the next one."""
    seen = load_shapes(16, "train", n, seed=seed)
    pairs = []
    for s, c, z, p in seen.attributes.tolist():
        src = caption(s, c, z, p)
        tgt = caption(s, (c + 1) % 4, z, p) if kind == "colour" else caption((s + 1) % 3, c,
                                                                             z, p)
        pairs.append((src, tgt))
    return pairs


def p2p_section(args: argparse.Namespace, checker: ShapeAttributeChecker) -> dict[str, Any]:
    from difflab.editing.prompt2prompt import prompt_to_prompt

    pipe = Pipeline.from_pretrained(args.base)
    rows, pictures = [], []
    for kind, attr in (("colour", 1), ("shape", 0)):
        pairs = swaps(kind, args.p2p_n)
        seeds = [EVAL_SEED + i for i in range(len(pairs))]
        opts = dict(guidance=GUIDANCE, steps=SAMPLE_STEPS[0], sampler=SAMPLER,
                    cross_steps=args.cross_steps, self_steps=args.self_steps)
        both = [prompt_to_prompt(pipe, s, t, seed=seed, **opts)
                for (s, t), seed in zip(pairs, seeds, strict=True)]
        src = torch.stack([b[0] for b in both])
        edit = torch.stack([b[1] for b in both])
        # the target sampled from the same initial noise and the same per-step noise (the
        # uncontrolled source row of an edit of the target into itself; DDPM's per-step noise
        # of pipe(prompt=..., seed=...) is drawn differently)
        resample = torch.stack([prompt_to_prompt(pipe, t, t, seed=seed, **opts)[0]
                                for (_, t), seed in zip(pairs, seeds, strict=True)])
        want = targets([t for _, t in pairs])
        p_src = checker.predict(src)
        for name, x in (("Prompt-to-Prompt", edit), ("re-sample target, same noise", resample)):
            rows.append({"edit": kind, "method": name, **edit_scores(x, src, p_src, want, attr,
                                                                      checker)})
        pictures += [src[:10], edit[:10], resample[:10]]
    if args.images:
        grid(args.images / "prompt2prompt_shapes.png", pictures,
             ["source", "P2P colour swap", "re-sampled", "source", "P2P shape swap",
              "re-sampled"], "same noise per column; edit: next colour / next shape word")
    return {"rows": rows, "n": args.p2p_n, "cross_steps": args.cross_steps,
            "self_steps": args.self_steps}


def edit_scores(x: Tensor, src: Tensor, p_src: Tensor, want: Tensor, attr: int,
                checker: ShapeAttributeChecker) -> dict[str, float]:
    """Target attribute accuracy; the other attributes' agreement with the source's reading;
    IoU of the object masks (colour swaps: the same object) and the PSNR outside both."""
    pred = checker.predict(x)
    others = [i for i in range(4) if i != attr]
    fg_x, fg_s = foreground(x) > MASK_THRESHOLD, foreground(src) > MASK_THRESHOLD
    outside = ~(fg_x | fg_s)
    psnr = masked_psnr(x, src, outside).clamp(max=60)
    return {"target": float((pred[:, attr] == want[:, attr]).float().mean()),
            "kept": float((pred[:, others] == p_src[:, others]).all(1).float().mean()),
            "mask_iou": float(mask_iou(x, fg_s.float(), MASK_THRESHOLD).mean()),
            "bg_psnr": float(psnr.mean())}


# -- tables ------------------------------------------------------------------------------------
def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|---|" + "---:|" * (len(header) - 1)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def print_tables(res: dict[str, Any]) -> None:
    f2 = "{:.2f}".format
    if "lora" in res:
        r = res["lora"]
        print(f"\n**LoRA: the new colour purple** ({r['steps']} steps of 16 images, "
              f"base {r['base_parameters']:,} parameters)\n")
        print(table(["run", "purple (trained shapes)", "all four (trained)",
                     "purple (triangles, held out)", "all four (held out)",
                     "original prompts, all four", "trained params", "weights file",
                     "CPU s"],
                    [[x["run"], f2(x["purple_seen"]), f2(x["all_seen"]), f2(x["purple_held"]),
                      f2(x["all_held"]), f2(x["original_all"]),
                      f"{100 * x['trained_fraction']:.2f}%", f"{x['file_bytes'] / 1024:.0f} KiB",
                      f"{x['cpu_s']:.0f}"] for x in r["rows"]]))
    if "dreambooth" in res:
        r = res["dreambooth"]
        print(f"\n**DreamBooth: a plus bound to 'sks' from 5 images** ({r['steps']} steps, "
              f"lr {r['lr']:g})\n")
        print(table(["run", "plus for the instance prompt", "plus + context right (other "
                     "colour/size/position)", "original prompts, all four", "drop (points)",
                     "plus on original prompts", "CPU s"],
                    [[x["run"], f2(x["fidelity"]), f2(x["recontext"]), f2(x["original_all"]),
                      f"{x['drop_points']:+.1f}", f2(x["plus_on_original"]),
                      f"{x['cpu_s']:.0f}"] for x in r["rows"]]))
    if "controlnet" in res:
        r = res["controlnet"]
        print(f"\n**ControlNet: mask control** ({r['steps']} steps, CPU {r['cpu_s']:.0f} s; "
              f"{r['n']} held-out masks)\n")
        print(table(["held-out masks", "run", "mask IoU (mean)", "IoU 10th pct", "colour",
                     "shape", "all four"],
                    [[x["masks"], x["run"], f2(x["iou"]), f2(x["iou_p10"]), f2(x["colour"]),
                      f2(x["shape"]), f2(x["all"])] for x in r["rows"]]))
    if "p2p" in res:
        r = res["p2p"]
        print(f"\n**Prompt-to-Prompt** ({r['n']} edits per kind, cross-attention replaced for "
              f"{r['cross_steps']:.0%} of the steps, self-attention {r['self_steps']:.0%})\n")
        print(table(["edit", "method", "target attribute", "other attributes kept",
                     "object mask IoU with source", "background PSNR (dB)"],
                    [[x["edit"], x["method"], f2(x["target"]), f2(x["kept"]),
                      f2(x["mask_iou"]), f"{x['bg_psnr']:.1f}"] for x in r["rows"]]))


# -- main --------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default=None, help="the text shapes run (default: train one)")
    ap.add_argument("--base-steps", type=int, default=1500)
    ap.add_argument("--out", type=Path, default=Path("runs/finetune_control"))
    ap.add_argument("--only", default=",".join(SECTIONS))
    ap.add_argument("--images", type=Path, default=None, help="write the grids here")
    ap.add_argument("--json", type=Path, default=None, help="results file (merged)")
    ap.add_argument("--lora-steps", type=int, default=300)
    ap.add_argument("--db-steps", type=int, default=300)
    ap.add_argument("--db-lr", type=float, default=2e-4)
    ap.add_argument("--cn-steps", type=int, default=2000)
    ap.add_argument("--cn-lr", type=float, default=1e-3)
    ap.add_argument("--cn-n", type=int, default=96)
    ap.add_argument("--p2p-n", type=int, default=48)
    ap.add_argument("--sample-steps", type=int, default=STEPS, help="sampler steps (smoke runs)")
    ap.add_argument("--cross-steps", type=float, default=0.8)
    ap.add_argument("--self-steps", type=float, default=0.3)
    args = ap.parse_args()
    only = [s for s in args.only.split(",") if s]
    if unknown := set(only) - set(SECTIONS):
        raise SystemExit(f"--only: unknown sections {sorted(unknown)} (know {SECTIONS})")
    args.out.mkdir(parents=True, exist_ok=True)
    SAMPLE_STEPS[0] = args.sample_steps
    if args.base is None:
        ns = argparse.Namespace(steps=args.base_steps, batch_size=64, seed=0,
                                out=str(args.out / "base"))
        _, wall, cpu = train_text_shapes(ns)
        print(f"base: {args.base_steps} steps, wall {wall:.0f} s, process CPU {cpu:.0f} s")
        args.base = str(args.out / "base")
    checker = fit_checker()
    res = json.loads(args.json.read_text()) if args.json and args.json.exists() else {}
    sections = {"lora": lora_section, "dreambooth": dreambooth_section,
                "controlnet": controlnet_section, "p2p": p2p_section}
    for name in only:
        (res[name], cpu) = timed(lambda n=name: sections[n](args, checker))
        res[name]["section_cpu_s"] = cpu
        print(f"{name}: process CPU {cpu:.0f} s", flush=True)
        if args.json:
            args.json.write_text(json.dumps(res, indent=1))
    print_tables(res)


if __name__ == "__main__":
    main()
