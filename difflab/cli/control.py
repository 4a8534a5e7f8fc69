"""The ``--control`` / ``--control-scale`` options of ``difflab sample``: control images and
conditioning scales of a model's ControlNets (``difflab.pipeline.controlnet``)."""

from __future__ import annotations

import argparse

from ..pipeline import Pipeline
from ..pipeline.controlnet import set_control, set_control_scales


def add_control_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ControlNet")
    g.add_argument("--control", action="append", default=None, metavar="IMAGE",
                   help="control image (PNG; resized to the model's resolution) of a model "
                        "with a ControlNet (a train-controlnet run, or one added with "
                        "--adapter); repeat once per ControlNet, in the order they are loaded; "
                        "one control image for all samples")
    g.add_argument("--control-scale", action="append", type=float, default=None,
                   metavar="SCALE",
                   help="conditioning scale of the ControlNet of the same position as the "
                        "--control (default: each ControlNet's own, 1.0; 0: off)")


def apply_control_args(args: argparse.Namespace, pipe: Pipeline) -> None:
    """Set the control images and scales given on the command line (after every adapter is
    loaded); nothing when neither option is given."""
    if args.control_scale:
        set_control_scales(pipe, args.control_scale)
    if args.control:
        set_control(pipe, args.control)
