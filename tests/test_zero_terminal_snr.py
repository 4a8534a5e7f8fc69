"""Zero terminal SNR: no NaN or infinity at t = T for any prediction type, loss, weighting,
sampler or CFG rescale (Lin et al. 2024)."""

import pytest
import torch
from torch import nn

from difflab.guidance import ClassifierFreeGuidance
from difflab.objectives import OBJECTIVES, WEIGHTINGS, ObjectiveConfig, build_objective
from difflab.parameterization import PREDICTION_TYPES, Denoiser
from difflab.process import VPSDE, DiscreteProcess, RectifiedFlow, ZeroTerminalSNR
from difflab.samplers import SAMPLERS, time_grid

pytestmark = pytest.mark.usefixtures("one_thread")

PROCESSES = {
    "discrete cosine": lambda: DiscreteProcess("cosine", T=100, zero_terminal_snr=True),
    "discrete linear": lambda: DiscreteProcess("linear", T=100, zero_terminal_snr=True),
    "continuous vpsde": lambda: ZeroTerminalSNR(VPSDE()),
    "rectified flow": RectifiedFlow,  # alpha(1) = 0 by construction
}


class PointNet(nn.Module):
    """net(x, c_noise, cond) on [B, 3] points, with 6 outputs when the variance is learned."""

    def __init__(self, out: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.f = nn.Sequential(nn.Linear(5, 32), nn.SiLU(), nn.Linear(32, out))

    def forward(self, x, c_noise, cond=None):
        c = c_noise.reshape(-1, 1).expand(x.shape[0], 1) / 1000
        return self.f(torch.cat([x, torch.sin(c), torch.cos(c)], 1))


def finite(*xs):
    return all(bool(torch.isfinite(x).all()) for x in xs)


def boundary(prediction):
    """The noise-level range a consistency model carries on its card (the paper's)."""
    return {"sigma_min": 0.002, "sigma_max": 80.0} if prediction == "consistency" else {}


@pytest.mark.parametrize("name", list(PROCESSES))
@pytest.mark.parametrize("prediction", PREDICTION_TYPES)
def test_losses_gradients_and_denoiser_are_finite_at_t_max(name, prediction):
    process = PROCESSES[name]()
    assert float(process.alpha(process.t_max)) == 0.0  # really zero terminal SNR
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 3, generator=g) * 2 - 1
    noise = torch.randn(8, 3, generator=g)
    t = torch.full((8,), process.t_max, dtype=torch.float64)
    objectives = [o for o in OBJECTIVES if (o == "edm") == (prediction == "edm")
                  and (o == "rectified-flow") == (prediction == "flow")
                  and prediction != "consistency"]  # a distilled student's: no loss here
    pred = Denoiser(PointNet(), process, prediction, **boundary(prediction))(noise, t)
    assert finite(pred.x0, pred.eps)
    for objective in objectives:
        if objective in ("vlb", "hybrid") and not process.is_discrete:
            continue
        for weighting in WEIGHTINGS:
            obj = build_objective(ObjectiveConfig(objective, weighting=weighting))
            net = PointNet(6 if obj.learned_variance else 3)
            den = Denoiser(net, process, prediction, learned_variance=obj.learned_variance)
            loss = obj.loss(den, x0, None, t, noise).loss.mean()
            loss.backward()
            grads = [p.grad for p in net.parameters()]
            assert finite(loss, *grads), (objective, weighting)
            pred = den(noise, t)
            assert finite(pred.x0, pred.eps), (objective, weighting)


@pytest.mark.parametrize("name", list(PROCESSES))
@pytest.mark.parametrize("prediction", PREDICTION_TYPES)
def test_every_sampler_and_cfg_rescale_is_finite_from_t_max(name, prediction):
    process = PROCESSES[name]()
    den = Denoiser(PointNet(), process, prediction, **boundary(prediction))
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    ts = time_grid(process, 4)
    assert float(ts[0]) == process.t_max
    labels = torch.zeros(4, dtype=torch.long)
    cfg = ClassifierFreeGuidance(den, 3.0, null_label=1, rescale=0.7)
    out = cfg(x, torch.full((4,), process.t_max, dtype=torch.float64), labels)
    assert finite(out.x0, out.eps)
    for sampler_name, sampler in SAMPLERS.items():
        opts = {"rk45": {"rtol": 1e-3, "atol": 1e-3},  # adaptive ones: fast enough
                "adaptive_sde": {"max_nfe": 16}}.get(sampler_name, {})
        with torch.no_grad():
            y = sampler(cfg, x, ts, torch.Generator().manual_seed(2), cond=labels, **opts)
        assert finite(y), sampler_name
