"""Latent against pixel diffusion, and a DiT against a U-Net, on the 64 x 64 ``scenes`` data.

    python benchmarks/latent.py --out /tmp/latent --minutes 8 --ae-minutes 8

1. An autoencoder (f = 4, 4 latent channels) is trained on the train split for
   ``--ae-minutes``; its PSNR is measured on the test split.
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
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from difflab.data import DataRequest, from_uint8, load_data, to_uint8
from difflab.evaluation import ModuleExtractor, builtin_feature_net, extract, sample_metrics
from difflab.evaluation.builtin import BUILTIN_STEPS
from difflab.evaluation.metrics import feature_stats
from difflab.pipeline import Conditions, Pipeline
from difflab.recipes import DiffusionRecipe, TrainConfig
from difflab.training.loop import StepContext

RES = 64
UNET = {"network.unet.base_channels": 32, "network.unet.num_res_blocks": 1}
MODELS = {
    "pixel U-Net": {**UNET, "network.unet.channel_mult": [1, 2, 2, 2]},
    "latent U-Net": {**UNET, "network.unet.channel_mult": [1, 2, 2]},
    "latent DiT": {"network.name": "dit", "network.dit.patch_size": 2,
                   "network.dit.hidden_size": 192, "network.dit.depth": 6,
                   "network.dit.num_heads": 3},
}


def train_autoencoder(out: Path, minutes: float, quick: bool) -> Path:
    """``difflab train-autoencoder`` on the scenes train split; returns its run folder."""
    run = out / "autoencoder"
    if (run / "checkpoints").is_dir():
        return run
    steps = 20 if quick else max(1, int(minutes * 60 / AE_SECONDS_PER_STEP))
    cmd = [sys.executable, "-m", "difflab", "train-autoencoder", "--dataset", "scenes",
           "--resolution", str(RES), "--block-out-channels", "32,64,64",
           "--latent-channels", "4", "--steps", str(steps), "--out-dir", str(run),
           "--no-progress"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    (run / "bench_time.json").write_text(json.dumps({"seconds": time.perf_counter() - t0,
                                                     "steps": steps}))
    return run


#: a measured cost of one autoencoder step (batch 32, 64 px) on the 2-core machine
AE_SECONDS_PER_STEP = 0.45


def config_for(name: str, out: Path, ae: Path | None, quick: bool) -> TrainConfig:
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


def train(recipe: DiffusionRecipe, seconds: float | None, steps: int | None) -> dict:
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


def ae_psnr(ae_run: Path) -> float:
    pipe_ae = __import__("difflab.pipeline", fromlist=["load_autoencoder"])
    stage, net = pipe_ae.load_autoencoder(ae_run)
    test = load_data("scenes", DataRequest(RES, 3, split="test")).images[:500]
    with torch.no_grad():
        rec = torch.cat([net.decode(net.encode(c).mode()).clamp(-1, 1) for c in test.split(50)])
    mse = float((rec - test).pow(2).mean())
    return 10 * torch.log10(torch.tensor(4.0 / mse)).item()


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
    lines.append(f"Autoencoder: PSNR {ae['psnr']:.2f} dB on 500 test images; trained "
                 f"{ae['steps']} steps in {ae['seconds'] / 60:.1f} min.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--ae-minutes", type=float, default=8.0)
    ap.add_argument("--n", type=int, default=600, help="samples per model")
    ap.add_argument("--only", default=None, choices=list(MODELS))
    ap.add_argument("--quick", action="store_true", help="a smoke run: seconds, not minutes")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    ae_run = train_autoencoder(args.out, args.ae_minutes, args.quick)
    ae = {"psnr": ae_psnr(ae_run), **json.loads((ae_run / "bench_time.json").read_text())}
    results = args.out / "runs.json"
    rows = json.loads(results.read_text()) if results.exists() else {}
    judged = judge()
    seconds = 20 if args.quick else args.minutes * 60
    for name in MODELS:
        if args.only not in (None, name):
            continue
        recipe = DiffusionRecipe(config_for(name, args.out, ae_run, args.quick))
        flops = step_flops(recipe)
        if name == "latent DiT":  # the latent U-Net's training compute
            unet = rows["latent U-Net"]
            budget = unet["flops"] * unet["steps"]
            row = train(recipe, None, max(1, round(budget / flops)))
        else:
            row = train(recipe, seconds, None)
        pipe = Pipeline.from_pretrained(recipe.out_dir)
        x, labels, img_s = draw(pipe, 50 if args.quick else args.n, recipe.num_classes)
        grid = Path(__file__).resolve().parent.parent / "docs" / "images" / \
            f"latent_{name.split()[0]}_{name.split()[1].lower().replace('-', '')}.png"
        if not args.quick:
            from difflab.pipeline.output import PipelineOutput
            k = recipe.num_classes
            idx = torch.arange(k * 8).view(8, k).t().reshape(-1)  # 8 per class, a row each
            PipelineOutput(x[idx], list(range(len(idx))), 8, labels[idx]).save_grid(
                grid, labelled=True, class_names=list(recipe.data.class_names),
                caption=f"{name}, {row['steps']} steps, DDIM 20")
        rows[name] = {**row, "flops": flops, "sample_img_s": img_s, **score(judged, x, labels)}
        results.write_text(json.dumps(rows, indent=2))
        print(name, rows[name], flush=True)
    print(table(rows, ae))


if __name__ == "__main__":
    main()
