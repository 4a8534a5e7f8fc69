"""One :class:`JobRequest` -> images, with progress counted in network evaluations.

Sampling goes through ``pipe(...)``; SDEdit and inpainting through :mod:`difflab.editing`
on the pipeline's denoiser (guidance and clipping included), in the diffusion stage's space
(a latent model encodes the input and decodes the results). Image i of a job uses its own
generator seeded ``seed + i``, so it is the image ``difflab sample``/``pipe(...)`` gives for
that seed, whatever the count.

Progress: a forward hook on the diffusion network counts its calls; the expected count comes
from running the same sampler on the same grid with a network that returns zeros on a 1-pixel
input (cheap; exact for every fixed-step sampler, an estimate for adaptive ones).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .. import editing
from ..parameterization import Denoiser
from ..pipeline import Pipeline, resolve_sampler
from ..samplers import time_grid
from ..samplers.base import CountingDenoiser
from .models import ServedModel
from .requests import JobRequest

#: progress(done, expected): network evaluations so far and the expected total (None: unknown)
Progress = Callable[[int, int | None], None]


class _ZeroNet(nn.Module):
    """A network that outputs zeros of the shape the diffusion stage's network would."""

    def __init__(self, out_factor: int):
        super().__init__()
        self.out_factor = out_factor
        self.anchor = nn.Parameter(torch.zeros(()))  # Denoiser reads the parameters' dtype

    def forward(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return x.new_zeros(x.shape[0], x.shape[1] * self.out_factor, *x.shape[2:])


def expected_nfe(pipe: Pipeline, sampler: str, ts: Tensor) -> int | None:
    """Denoiser calls ``sampler`` makes on the grid ``ts`` (one batch), by a dry run with a
    zero network on one 1x1 pixel; None when the dry run fails (a sampler that needs more of
    the model than a denoiser)."""
    st = pipe.stage
    fake = Denoiser(_ZeroNet(2 if st.learned_variance else 1), pipe.process, st.prediction,
                    learned_variance=st.learned_variance, sigma_data=st.sigma_data,
                    base_prediction=st.base_prediction, sigma_min=st.sigma_min,
                    sigma_max=st.sigma_max)
    counted = CountingDenoiser(fake)
    try:
        fn, options = resolve_sampler(sampler, None)
        x = float(pipe.process.sigma(ts[0])) * torch.randn(1, pipe.sample_shape[0], 1, 1)
        fn(counted, x.to(torch.float32), ts, torch.Generator().manual_seed(0), **options)
    except Exception:  # the estimate is optional; the real run reports its own errors
        return None
    return counted.nfe


def _generators(req: JobRequest, device: torch.device) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(req.seed + i) for i in range(req.count)]


def _cond(req: JobRequest, model: ServedModel) -> Any:
    """One condition per image: the class (None: every class in turn), or the prompt."""
    pipe = model.pipe
    labels = "all" if req.label is None else req.label
    cond = pipe.condition(labels, req.prompt if model.conditioning == "text" else None,
                          req.count)
    if isinstance(cond.cond, Tensor):
        cond.cond = cond.cond.to(pipe.device)
    return cond


def _guidance(req: JobRequest, model: ServedModel) -> dict[str, Any]:
    return {"guidance": req.guidance if model.guided else None,
            "negative_prompt": req.negative_prompt}


def _generate(req: JobRequest, model: ServedModel, report: Progress) -> Tensor:
    pipe = model.pipe
    report(0, expected_nfe(pipe, req.sampler, time_grid(pipe.process, req.steps)))
    out = pipe(req.count, sampler=req.sampler, steps=req.steps, cond=_cond(req, model),
               seed=req.seed, batch_size=req.count, **_guidance(req, model))
    return out.samples


def _edit(req: JobRequest, model: ServedModel, report: Progress) -> Tensor:
    """SDEdit or inpainting of ``req.image``, ``req.count`` times (image i: seed + i)."""
    pipe = model.pipe
    den = pipe.denoiser(**_guidance(req, model))
    x = req.image[None].to(pipe.device)
    z = pipe.encode(x)
    zs = z.expand(req.count, *z.shape[1:]).clone()
    gens = _generators(req, pipe.device)
    cond = _cond(req, model).cond
    if req.mode == "sdedit":
        ts = editing.truncated_grid(pipe.process, req.steps, req.strength)
        report(0, expected_nfe(pipe, req.sampler, ts) if len(ts) > 1 else 0)
        fn, options = resolve_sampler(req.sampler, None)
        out = editing.sdedit(den, zs, req.strength, fn, req.steps, gens, cond=cond, **options)
        return pipe.decode(out).cpu()
    mask = req.mask.to(pipe.device)
    report(0, req.steps)  # inpaint: one evaluation per step (no RePaint jumps here)
    ts = time_grid(pipe.process, req.steps)
    out = editing.inpaint(den, zs, editing.latent_mask(mask, z.shape[-1]), ts, gens,
                          cond=cond, eta=1.0)
    out = pipe.decode(out)
    return torch.where(mask.bool(), out, x).cpu()  # the kept part exactly (latent: re-pasted)


def run_request(req: JobRequest, model: ServedModel, report: Progress) -> Tensor:
    """The images [count, C, H, W] in the data range that ``req`` asks for; ``report`` is
    called with (evaluations done, expected) as the network runs."""
    expected: list[int | None] = [None]
    done = [0]

    def set_expected(d: int, total: int | None) -> None:
        expected[0] = total
        report(d, total)

    def count(*_: Any) -> None:
        done[0] += 1
        report(done[0], expected[0])

    handle = model.pipe.net.register_forward_hook(count)
    try:
        with torch.no_grad():
            work = _generate if req.mode == "generate" else _edit
            return work(req, model, set_expected).float()
    finally:
        handle.remove()
