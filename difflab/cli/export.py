"""``difflab export --format diffusers RUN OUT``: a difflab model as a diffusers folder.

The diffusion stage's U-Net becomes ``UNet2DModel`` and its process ``DDPMScheduler``
(:mod:`difflab.pipeline.diffusers_out`), so ``DDPMPipeline.from_pretrained(OUT)`` loads it.
Models that do not map (another network, a continuous-time process, an EDM or learned-variance
parameterisation, ...) are refused in one line naming the field; OUT is then not touched.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..io import OutputExistsError
from ..pipeline import Pipeline
from ..pipeline.diffusers_out import export_diffusers, write_diffusers

FORMATS = ("diffusers",)


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="write a trained model in another library's format (diffusers)",
        description="Export a difflab model: --format diffusers writes a DDPMPipeline folder "
                    "(unet/ as UNet2DModel, scheduler/ as DDPMScheduler, model_index.json) "
                    "that diffusers' DDPMPipeline.from_pretrained(OUT) loads.")
    p.add_argument("run", metavar="RUN",
                   help="run folder, pipeline folder or checkpoint (as Pipeline.from_pretrained "
                        "takes)")
    p.add_argument("out", metavar="OUT", help="output folder (must be new or empty)")
    p.add_argument("--format", choices=FORMATS, required=True, help="output format")
    p.add_argument("--force", "--overwrite", dest="overwrite", action="store_true",
                   help="replace a non-empty OUT (it is replaced only once the export is "
                        "complete)")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights of a "
                   "training checkpoint, not the EMA")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise OutputExistsError(f"OUT {out} exists and is not empty; pass --force to "
                                "replace it")
    pipe = Pipeline.from_pretrained(args.run, ema=False if args.no_ema else None,
                                    channels_last=False)
    export = export_diffusers(pipe)
    write_diffusers(export, out, overwrite=args.overwrite)
    for note in export.notes:
        print(f"note: {note}")
    print(f"wrote {out} (load: DDPMPipeline.from_pretrained({str(out)!r}))")
    return 0
