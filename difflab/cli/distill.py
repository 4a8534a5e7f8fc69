"""``difflab distill METHOD --teacher RUN``: one sub-command per registered distillation
method (``difflab.recipes.distill.DISTILL_METHODS``), options generated from its config."""

from __future__ import annotations

import argparse

from ..config import from_dict
from ..recipes.distill import DISTILL_METHODS, DistillMethod
from .options import add_config_options, changed_options, given_options


def add_distill_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="distil a trained model into a few-step student",
                       description="Distil a trained model (the teacher) into a student that "
                                   "samples in 1-8 network evaluations. The student is saved "
                                   "as an ordinary run folder: 'difflab sample --checkpoint "
                                   "RUN' uses its own sampler and steps.")
    methods = p.add_subparsers(dest="method", metavar="METHOD", required=True)
    for name, method in DISTILL_METHODS.items():
        m = methods.add_parser(name, help=method.help, description=method.help)
        m.add_argument("--no-progress", action="store_true", help="hide the progress bar")
        m.add_argument("--overwrite", action="store_true",
                       help="start afresh even if --out-dir holds another run (deleting its "
                            "files)")
        add_config_options(m, method.config)
        m.set_defaults(func=run_distill, distill_method=method)


def run_distill(args: argparse.Namespace) -> int:
    method: DistillMethod = args.distill_method
    # from_dict fills the groups' gaps from the method's own optim/run defaults
    config = from_dict(method.config, given_options(args, method.config),
                       where="command line")
    recipe = method.build(config, args.overwrite)  # errors before anything is printed
    changed = " ".join(changed_options(config, method.config))
    print(f"config: {changed} (full config: {config.run.out_dir}/config.json)", flush=True)
    result = recipe.run(progress=not args.no_progress)
    print(f"student: {result['out_dir']}\n  checkpoint: {result['checkpoint']}\n"
          f"  sample with: difflab sample --checkpoint {result['out_dir']}")
    return 0
