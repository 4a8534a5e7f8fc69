"""``difflab moments``: the mean and covariance of a trained model's samples, for
``difflab sample --gaussian-head PATH`` (``difflab.samplers.teleport``).

Above a noise level far beyond the data's spread every model's denoiser is that of the
Gaussian with the data's mean and covariance; ``--gaussian-head`` answers those levels from
these moments at no network evaluation. The moments are estimated from ``--draws`` samples of
the model itself (unconditional branch), with the full covariance up to ``--full-max``
entries per sample and per-entry variances beyond.
"""

from __future__ import annotations

import argparse
import time

from ..samplers.teleport import FULL_MAX, data_moments, skip_level
from .model_draws import (
    add_model_draw_options,
    check_model_draw_options,
    draw_model_samples,
)
from .outputs import add_overwrite_option, check_outputs, output_beside_run


def add_moments_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "moments", help="mean and covariance of a model's samples (for --gaussian-head)",
        description="Estimate the mean and covariance of a trained model's samples, for "
                    "'difflab sample --gaussian-head PATH': noise levels far above the data's "
                    "spread are then answered by that Gaussian, at no network evaluation.")
    add_model_draw_options(p, 1024, "")
    p.add_argument("--out", default=None,
                   help="output safetensors (default: RUN/moments.safetensors beside the run)")
    add_overwrite_option(p)
    p.add_argument("--full-max", type=int, default=FULL_MAX,
                   help="keep the full covariance up to this many entries per sample, "
                        "per-entry variances beyond")
    p.set_defaults(func=run_moments)


def run_moments(args: argparse.Namespace) -> int:
    check_model_draw_options(args)
    if args.full_max < 0:
        raise ValueError(f"--full-max must be >= 0, got {args.full_max}")
    out = output_beside_run(args, "moments.safetensors")
    check_outputs(args, out=out)
    t0 = time.perf_counter()
    _den, x0, _device = draw_model_samples(args, "moments")
    moments = data_moments(x0, full=x0[0].numel() <= args.full_max)
    moments.save(out)
    kind = "full covariance" if moments.eigvecs is not None else "per-entry variances"
    print(f"mean and {kind} of {args.draws} model samples ({time.perf_counter() - t0:.0f} s); "
          f"largest std {moments.scale:.3g}, skip level sigma~ = {skip_level(moments):.3g}\n"
          f"wrote {out}  (use: difflab sample --checkpoint {args.checkpoint} --gaussian-head "
          f"{out})")
    return 0
