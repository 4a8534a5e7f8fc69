"""Editing on a digits model: inversion error, SDEdit toward another class, and README pictures.

    python benchmarks/editing_demo.py --checkpoint runs/digits --out docs/images
    python benchmarks/editing_demo.py --checkpoint runs/digits --inversion-only

Reports (markdown): the RMSE of DDIM inversion + reconstruction over held-out digits at several
step counts and with every inversion method (deterministic sampler) at 50 steps, and how often
SDEdit of a digit toward another class is classified as that class by an independent
classifier (benchmarks/digits_accuracy.py). Writes one PNG per kind of edit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from difflab import editing
from difflab.cli.loading import load_denoiser
from difflab.data import load_digits, save_grid
from difflab.samplers import CountingDenoiser, ddpm, time_grid

sys.path.insert(0, str(Path(__file__).parent))
from digits_accuracy import digit_classifier, to_features  # noqa: E402


def digits_of(data, label: int, n: int) -> torch.Tensor:
    return data.images[data.labels == label][:n]


def inversion_table(den, x: torch.Tensor, cond: torch.Tensor, steps: list[int]) -> list[str]:
    rows = ["| DDIM steps | inversion + reconstruction RMSE (range [-1, 1]) |", "|---|---|"]
    for n in steps:
        ts = time_grid(den.process, n)
        rec = editing.reconstruct(den, editing.ddim_invert(den, x, ts, cond=cond), ts, cond=cond)
        rows.append(f"| {n} | {float((rec - x).pow(2).mean().sqrt()):.4f} |")
    return rows


def inversion_methods_table(den, x: torch.Tensor, cond: torch.Tensor, steps: int,
                            spacings: tuple[str | None, ...] = (None, "logsnr")) -> list[str]:
    """One row per inversion method: ``ode_invert`` then ``reconstruct`` with the same sampler
    on the same grid of ``steps`` steps, one column per grid spacing (None: the default);
    NFE counts both directions."""
    names = [sp or "default" for sp in spacings]
    rows = [f"| method ({steps} steps) | " + " | ".join(
                f"{n} grid: NFE, RMSE (range [-1, 1])" for n in names) + " |",
            "|---|" + "---|" * len(names)]
    grids = [time_grid(den.process, steps, sp) for sp in spacings]
    for m in editing.METHODS:
        cells = []
        for ts in grids:
            counted = CountingDenoiser(den)
            z = editing.ode_invert(counted, x, ts, m, cond=cond)
            rec = editing.reconstruct(counted, z, ts, m, cond=cond)
            cells.append(f"{counted.nfe}, {float((rec - x).pow(2).mean().sqrt()):.4f}")
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    return rows


def sdedit_table(den, clf, x: torch.Tensor, target: int, strengths: list[float]) -> list[str]:
    rows = ["| strength | classified as target | classified as source |", "|---|---|---|"]
    source = None
    for s in strengths:
        gens = [torch.Generator().manual_seed(i) for i in range(len(x))]
        out = editing.sdedit(den, x, s, ddpm, 100, gens, cond=torch.full((len(x),), target))
        pred = clf.predict(to_features(out))
        source = source if source is not None else clf.predict(to_features(x))
        rows.append(f"| {s:.1f} | {(pred == target).mean():.2f} | "
                    f"{(pred == source).mean():.2f} |")
    return rows


def pictures(den, test, out: Path) -> None:
    ts = time_grid(den.process, 50)
    three, eight = digits_of(test, 3, 1), digits_of(test, 8, 1)
    scale = 8
    ed = [editing.sdedit(den, three, s, ddpm, 100, torch.Generator().manual_seed(0),
                         cond=torch.tensor([8])) for s in (0.3, 0.5, 0.7, 0.9)]
    save_grid(torch.cat([three, *ed]), out / "sdedit.png", nrow=5, scale=scale)
    mask = torch.zeros_like(three)
    mask[..., :, 4:] = 1  # regenerate the right half
    inp = editing.inpaint(den, three.expand(4, -1, -1, -1), mask, time_grid(den.process, 100),
                          [torch.Generator().manual_seed(i) for i in range(4)],
                          cond=torch.tensor([3, 3, 8, 9]), jump_length=10, jump_n_sample=2)
    save_grid(torch.cat([three, torch.where(mask.bool(), -1.0, three), inp]),
              out / "inpaint.png", nrow=6, scale=scale)
    z = editing.ddim_invert(den, three, ts, cond=torch.tensor([3]))
    rec = editing.reconstruct(den, z, ts, cond=torch.tensor([3]))
    save_grid(torch.cat([three, z.clamp(-1, 1), rec]), out / "invert.png", nrow=3, scale=scale)
    lams = torch.linspace(0, 1, 6)
    a, b = digits_of(test, 0, 1), digits_of(test, 0, 2)[1:]
    itp = editing.interpolate(den, a, b, lams, ts, cond=torch.tensor([0]))
    save_grid(torch.cat([a, itp, b]), out / "interpolate.png", nrow=8, scale=scale)
    var = editing.variations(den, eight, list(range(7)), 0.5, ddpm, 100,
                             cond=torch.tensor([8]))
    save_grid(torch.cat([eight, var]), out / "vary.png", nrow=8, scale=scale)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out", default="docs/images")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--inversion-only", action="store_true",
                    help="only the two inversion tables (no SDEdit table, no pictures)")
    args = ap.parse_args()
    den, meta = load_denoiser(args.checkpoint)
    test = load_digits(meta["config"].get("data", meta["config"])["resolution"], split="test")
    idx = torch.arange(min(args.n, len(test)))
    x, y = test.images[idx].double(), test.labels[idx]
    print("\n".join(inversion_table(den, x, y, [10, 20, 50, 100, 200])))
    print()
    print("\n".join(inversion_methods_table(den, x, y, 50)))
    print()
    if args.inversion_only:
        return
    clf, _ = digit_classifier()
    threes = digits_of(test, 3, args.n).double()
    print(f"SDEdit of {len(threes)} held-out 3s toward class 8 (DDPM, 100-step grid):")
    print("\n".join(sdedit_table(den, clf, threes, 8, [0.3, 0.5, 0.7, 0.9])))
    out = Path(args.out)
    pictures(den, test, out)
    print(f"\npictures: {', '.join(str(p) for p in sorted(out.glob('*.png')))}")


if __name__ == "__main__":
    main()
