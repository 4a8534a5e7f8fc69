"""Latent against pixel diffusion, and a DiT against a U-Net, on the 64 x 64 ``scenes`` data.

    python benchmarks/latent.py --out /tmp/latent --minutes 8 --ae-minutes 8

1. An autoencoder (f = 4, 4 latent channels, KL, L1; no discriminator in so short a run) is
   trained on the train split for ``--ae-minutes``; its PSNR is measured on the test split.
2. Three class-conditional diffusion models (cosine schedule, eps-prediction, the same
   optimiser) are trained from the train split:
   - ``pixel U-Net``: on the 64 x 64 images, for ``--minutes`` of wall time;
   - ``latent U-Net``: the same U-Net widths on the 16 x 16 x 4 latents, for ``--minutes``;
   - ``latent DiT``: a DiT on the same latents, trained for the latent U-Net's total training
     FLOPs (PyTorch's FLOP counter on one training step of each), so the two backbones are
     compared at equal compute.
3. Each model draws ``--n`` class-balanced samples with DDIM at 20 steps (timed: images/s,
   decoding included), scored against the held-out test split:
   - FID in the feature space of the built-in ``scenes`` classifier (``difflab eval``'s
     ``builtin`` features, trained on the train split only);
   - attribute accuracy: the share of samples that classifier assigns to the class they were
     drawn for.

Runs are sequential in one process, so the timings are ratios measured under the same load;
each one is kept in ``OUT/runs.json`` (``--only NAME`` re-runs one). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from difflab.config import unflatten
from difflab.data import DataRequest, from_uint8, load_data, to_uint8
from difflab.evaluation import ModuleExtractor, builtin_feature_net, extract, sample_metrics
from difflab.evaluation.builtin import BUILTIN_STEPS
from difflab.evaluation.metrics import feature_stats
from difflab.pipeline import Conditions, Pipeline, load_autoencoder
from difflab.pipeline.output import PipelineOutput
from difflab.recipes import (
    AutoencoderRecipe,
    AutoencoderTrainConfig,
    DiffusionRecipe,
    TrainConfig,
)
from difflab.training.loop import StepContext

sys.path.insert(0, str(Path(__file__).parent))
from readme_section import write_section  # noqa: E402

RES = 64
IMAGES = Path(__file__).resolve().parent.parent / "docs" / "images"
#: the autoencoder: f = 4, 4 latent channels (16 x 16 x 4 latents of the 64 px images)
AE = {"network.block_out_channels": [32, 64, 64], "network.latent_channels": 4,
      "optim.lr": 1e-3, "optim.batch_size": 16, "loss.disc_start": 10**7}
UNET = {"network.unet.base_channels": 32, "network.unet.num_res_blocks": 1}
MODELS = {
    "pixel U-Net": {**UNET, "network.unet.channel_mult": [1, 2, 2, 2]},
    "latent U-Net": {**UNET, "network.unet.channel_mult": [1, 2, 2]},
    "latent DiT": {"network.name": "dit", "network.dit.patch_size": 2,
                   "network.dit.hidden_size": 192, "network.dit.depth": 6,
                   "network.dit.num_heads": 3},
    # the tiny preset: a third of the FLOPs per step, so three times the steps
    "latent DiT-tiny": {"network.name": "dit", "network.dit_size": "tiny",
                        "network.dit.patch_size": 2},
}


def train_autoencoder(out: Path, seconds: float) -> tuple[Path, dict]:
    """An autoencoder on the scenes train split for ``seconds`` of wall time; (its run
    folder, {psnr on the test split, steps, seconds})."""
    run = out / "autoencoder"
    done = run / "bench.json"
    if done.is_file():
        return run, json.loads(done.read_text())
    values = {"data.dataset": "scenes", "data.resolution": RES, **AE,
              "optim.steps": 10**7, "run.out_dir": str(run), "run.sample_every": 0,
              "run.checkpoint_every": 0, "run.log_every": 50}
    recipe = AutoencoderRecipe(AutoencoderTrainConfig.from_dict(
        unflatten(AutoencoderTrainConfig, values)), overwrite=True)
    row = train(recipe, seconds, None)
    row = {**row, "psnr": recipe.held_out_psnr(500)}
    recipe.reconstruction_grid()
    done.write_text(json.dumps(row))
    return run, row


def config_for(name: str, out: Path, ae: Path | None) -> TrainConfig:
    values = {"data.dataset": "scenes", "data.resolution": RES, "optim.steps": 10**7,
              "optim.batch_size": 32, "optim.lr": 1e-3, "optim.warmup_steps": 100,
              "run.out_dir": str(out / name.replace(" ", "_")), "run.sample_every": 0,
              "run.checkpoint_every": 0, "run.log_every": 50, **MODELS[name]}
    if name.startswith("latent"):
        values["latent.autoencoder"] = str(ae)
    return TrainConfig.from_values(values)


def step_flops(recipe: DiffusionRecipe) -> float:
    """FLOPs of one training step's forward and backward pass (the optimiser's elementwise
    work is not counted), on a throwaway generator so the run is unaffected."""
    g = torch.Generator(device=recipe.device).manual_seed(12345)
    batch = recipe.source.batch(0, g)
    ctx = StepContext(0, g, slice(None), recipe.device)
    with FlopCounterMode(display=False) as counter:
        recipe.loss(recipe.net, batch, ctx).mean().backward()
    recipe.net.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def train(recipe: DiffusionRecipe | AutoencoderRecipe, seconds: float | None,
          steps: int | None) -> dict:
    """Train for ``seconds`` of wall time (in chunks of 10 steps) or exactly ``steps``."""
    t0, chunk = time.perf_counter(), 10
    while True:
        target = recipe.step + chunk if steps is None else min(steps, recipe.step + chunk)
        recipe.loop.run(target, progress=False, save_final=False)
        elapsed = time.perf_counter() - t0
        if (steps is not None and recipe.step >= steps) or \
                (steps is None and elapsed >= seconds):
            break
    recipe.save()
    return {"steps": recipe.step, "seconds": elapsed,
            "train_img_s": recipe.step * recipe.config.optim.batch_size / elapsed}


def draw(pipe: Pipeline, n: int, classes: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    labels = torch.arange(n) % classes
    conds = Conditions(n, classes, cond=labels, labels=labels)
    t0 = time.perf_counter()
    out = pipe(cond=conds, sampler="ddim", steps=20, seed=0, batch_size=100)
    return out.samples, labels, n / (time.perf_counter() - t0)


def judge(device: str = "cpu"):
    """The built-in scenes classifier (train split) and the test split's feature stats."""
    net, name = builtin_feature_net("scenes", RES, 3, steps=BUILTIN_STEPS)
    net = net.to(device).eval()
    test = load_data("scenes", DataRequest(RES, 3, split="test"))
    extractor = ModuleExtractor(net, name, device)
    stats = feature_stats(extract(extractor, quantize(test.images)).features)
    return net, extractor, stats


def quantize(x: torch.Tensor) -> torch.Tensor:
    return from_uint8(to_uint8(x))


def score(judged, x: torch.Tensor, labels: torch.Tensor) -> dict:
    net, extractor, stats = judged
    x = quantize(x)
    with torch.no_grad():
        pred = torch.cat([net(c)[1].argmax(1) for c in x.split(256)])
    feats = extract(extractor, x).features
    fid = sample_metrics(feats, None, metrics=["fid"], real_stats=stats)["fid"]
    return {"fid": float(fid), "accuracy": float((pred == labels).float().mean())}


def table(rows: dict, ae: dict) -> str:
    base = rows.get("pixel U-Net")
    head = ("| model | train img/s | sample img/s (20 steps) | GFLOPs / step | steps | FID | "
            "accuracy | train × pixel | sample × pixel |")
    lines = [head, "|" + "---|" * 9]
    for name, r in rows.items():
        tx = f"{r['train_img_s'] / base['train_img_s']:.1f}" if base else "-"
        sx = f"{r['sample_img_s'] / base['sample_img_s']:.1f}" if base else "-"
        lines.append(f"| {name} | {r['train_img_s']:.1f} | {r['sample_img_s']:.1f} | "
                     f"{r['flops'] / 1e9:.2f} | {r['steps']} | {r['fid']:.2f} | "
                     f"{r['accuracy']:.3f} | {tx} | {sx} |")
    lines.append("")
    floor = ae.get("floor")
    if floor:
        lines.insert(2, f"| autoencoder reconstructions of test images (a latent model's best) "
                        f"| - | - | - | - | {floor['fid']:.2f} | {floor['accuracy']:.3f} | - | - |")
    lines.append(f"Autoencoder: PSNR {ae['psnr']:.2f} dB on 500 test images; trained "
                 f"{ae['steps']} steps in {ae['seconds'] / 60:.1f} min "
                 f"({ae['train_img_s']:.1f} img/s).")
    return "\n".join(lines)


def goals(rows: dict) -> list[str]:
    """The issue's goals, each with the figures that decide it and whether it is met."""
    px, lu = rows.get("pixel U-Net"), rows.get("latent U-Net")
    out = []
    if px and lu:
        tr, sa = lu["train_img_s"] / px["train_img_s"], lu["sample_img_s"] / px["sample_img_s"]
        ok = tr >= 4 and sa >= 4 and lu["fid"] <= px["fid"]
        out.append(f"- latent U-Net vs pixel U-Net: trains {tr:.1f}x and samples {sa:.1f}x "
                   f"faster per image, FID {lu['fid']:.2f} vs {px['fid']:.2f} (goal >= 4x, "
                   f">= 4x, equal or better FID): {'met' if ok else 'NOT met'}")
    for name, dit in rows.items():
        if not (lu and name.startswith("latent DiT")):
            continue
        rel = dit["fid"] / lu["fid"] - 1
        out.append(f"- {name} vs latent U-Net at equal training FLOPs "
                   f"({dit['flops'] * dit['steps'] / 1e12:.1f} vs "
                   f"{lu['flops'] * lu['steps'] / 1e12:.1f} TFLOPs): FID {dit['fid']:.2f} vs "
                   f"{lu['fid']:.2f} ({rel:+.0%}; goal within +10%): "
                   f"{'met' if rel <= 0.10 else 'NOT met'}")
    return out


def run_model(name: str, args: argparse.Namespace, ae_run: Path, rows: dict, judged) -> dict:
    """Train, sample and score one model; its grid goes to docs/images/latent_*.png."""
    recipe = DiffusionRecipe(config_for(name, args.out, ae_run), overwrite=True)
    flops = step_flops(recipe)
    if name.startswith("latent DiT"):  # the latent U-Net's training compute
        unet = rows["latent U-Net"]
        row = train(recipe, None, max(1, round(unet["flops"] * unet["steps"] / flops)))
    else:
        row = train(recipe, 20 if args.quick else args.minutes * 60, None)
    pipe = Pipeline.from_pretrained(recipe.out_dir)
    x, labels, img_s = draw(pipe, 50 if args.quick else args.n, recipe.num_classes)
    if not args.quick:
        k = recipe.num_classes
        idx = torch.arange(k * 8).view(8, k).t().reshape(-1)  # 8 per class, a row each
        slug = name.lower().replace(" ", "_").replace("-", "")
        PipelineOutput(x[idx], list(range(len(idx))), 8, labels[idx]).save_grid(
            IMAGES / f"latent_{slug}.png", labelled=True,
            class_names=list(recipe.data.class_names),
            caption=f"{name}, {row['steps']} steps, DDIM 20")
    return {**row, "flops": flops, "sample_img_s": img_s, **score(judged, x, labels)}


def reconstruction_floor(ae_run: Path, n: int, judged) -> dict:
    """FID and accuracy of the autoencoder's reconstructions of ``n`` test images: what a
    latent model could reach at best with this autoencoder."""
    _, net = load_autoencoder(ae_run)
    test = load_data("scenes", DataRequest(RES, 3, split="test"))
    x, labels = test.images[:n], test.labels[:n]
    with torch.no_grad():
        rec = torch.cat([net.decode(net.encode(c).mode()).clamp(-1, 1) for c in x.split(64)])
    return score(judged, rec, labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--ae-minutes", type=float, default=8.0)
    ap.add_argument("--n", type=int, default=360, help="samples per model (class-balanced)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's own; use 1 on a shared machine: "
                         "oversubscribed threads make small convolutions many times slower)")
    ap.add_argument("--only", default=None, choices=list(MODELS))
    ap.add_argument("--report", action="store_true",
                    help="train nothing: the table of the runs in OUT/runs.json")
    ap.add_argument("--quick", action="store_true", help="a smoke run: seconds, not minutes")
    ap.add_argument("--readme", action="store_true",
                    help="write the table into benchmarks/README.md")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ae_run, ae = train_autoencoder(args.out, 20 if args.quick else args.ae_minutes * 60)
    results = args.out / "runs.json"
    rows = json.loads(results.read_text()) if results.exists() else {}
    judged = judge()
    for name in [] if args.report else MODELS:
        if args.only in (None, name):
            rows[name] = run_model(name, args, ae_run, rows, judged)
            results.write_text(json.dumps(rows, indent=2))
            print(name, rows[name], flush=True)
    ae["floor"] = reconstruction_floor(ae_run, 50 if args.quick else args.n, judged)
    body = "\n".join([table(rows, ae), "", *goals(rows)])
    print(body)
    if args.readme and not args.quick:
        write_section(Path(__file__).parent / "README.md", HEADING, README_INTRO + body,
                      INDEX_ROW, "latent.py")


HEADING = "Latent diffusion (`benchmarks/latent.py`)"
INDEX_ROW = ("| `python benchmarks/latent.py --out OUT --readme` | pixel U-Net, latent U-Net and "
             "latent DiT on the 64 px scenes at equal CPU time (DiT: equal FLOPs): images/s, "
             "FID, class accuracy, autoencoder PSNR | [Latent diffusion]"
             "(#latent-diffusion-benchmarkslatentpy) |")
README_INTRO = """`OMP_NUM_THREADS=1 python benchmarks/latent.py --out OUT --minutes 10
--ae-minutes 10 --threads 1 --readme`. Class-conditional models of the 64 x 64 `scenes` (12
classes, 5998 training images), eps-prediction, batch 32, AdamW at 1e-3; the pixel U-Net on the
cosine schedule with x0_hat clipped to [-1, 1], the latent models on latent diffusion's
defaults (`scaled_linear`, x0_hat clipped to the training latents' range). The pixel and latent
U-Net (the same widths: 32 channels, one res block per level) train for the same wall time;
each DiT (patch 2 on the 16 x 16 x 4 latents; hidden 192 / depth 6, and the tiny preset, hidden
128 / depth 4) for the latent U-Net's total FLOPs (PyTorch's FLOP counter on one training
step). One after the other in one process each, one thread each (the machine was shared: two
threads on one free core made the small latent convolutions 14x slower). Samples: DDIM 20
steps, no guidance, 30 per class; FID in the feature space of the built-in scenes classifier
(trained on the train split; test accuracy 1.0) against the 1502 held-out test images;
accuracy: the share of samples that classifier puts in the class they were drawn for. Sampling
img/s includes decoding. Grids: `docs/images/latent_*.png`.

"""


if __name__ == "__main__":
    main()
