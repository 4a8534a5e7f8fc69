"""Conversions between eps, x0 and v predictions round-trip; the Denoiser applies them."""

import pytest
import torch
from torch import nn

from difflab.parameterization import (
    Denoiser,
    Prediction,
    output_from_prediction,
    prediction_from_output,
)
from difflab.process import make_process, q_sample


@pytest.mark.parametrize("kind", ["eps", "x0", "v", "score"])
def test_round_trip(kind):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(
        6, 3, generator=g, dtype=torch.float64)
    p = make_process("cosine")
    t = torch.tensor([1.0, 10, 100, 500, 900, 999], dtype=torch.float64)
    alpha, sigma = p.alpha_sigma(t)
    x_t = q_sample(p, x0, t, eps)
    out = output_from_prediction(Prediction(x0=x0, eps=eps), alpha, sigma, kind)
    pred = prediction_from_output(out, x_t, alpha, sigma, kind)
    torch.testing.assert_close(pred.x0, x0)
    torch.testing.assert_close(pred.eps, eps)
    torch.testing.assert_close(pred.score(sigma), -eps / sigma[:, None])


def test_score_prediction_is_the_exact_score_for_gaussian_data():
    """For data N(0, s0^2 I), q(x_t) = N(0, (alpha^2 s0^2 + sigma^2) I): a 'network' returning
    the analytic score must give the exact denoiser E[x0 | x_t] = alpha s0^2 x_t / var."""
    p, s0 = make_process("cosine"), 0.5
    t = torch.tensor([5.0, 300, 800], dtype=torch.float64)
    alpha, sigma = p.alpha_sigma(t)
    x_t = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    var = (alpha**2 * s0**2 + sigma**2)[:, None]
    pred = prediction_from_output(-x_t / var, x_t, alpha, sigma, "score")
    torch.testing.assert_close(pred.x0, alpha[:, None] * s0**2 * x_t / var)
    torch.testing.assert_close(output_from_prediction(pred, alpha, sigma, "score"), -x_t / var)


def test_score_model_trains_in_eps_space_by_default():
    """simple_loss of a score model is the eps-space MSE (lambda = sigma^2 weighting)."""
    from difflab.objectives import simple_loss

    p = make_process("cosine")
    out = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    den = Denoiser(Const(out), p, "score")
    x0 = torch.zeros(4, 3, dtype=torch.float64)
    noise = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([10.0, 200, 500, 900], dtype=torch.float64)
    loss = simple_loss(den, x0, t=t, noise=noise).loss
    sigma = p.alpha_sigma(t)[1][:, None]
    torch.testing.assert_close(loss, (-sigma * out - noise).pow(2).mean(1))


def test_v_definition():
    a, s = torch.tensor([0.6]), torch.tensor([0.8])
    pred = Prediction(x0=torch.tensor([[2.0]]), eps=torch.tensor([[1.0]]))
    assert float(pred.v(a, s)) == pytest.approx(0.6 * 1.0 - 0.8 * 2.0)


class Const(nn.Module):
    """A 'network' that outputs a fixed tensor and records what it was given."""

    def __init__(self, value):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.value = value

    def forward(self, x, c_noise, labels=None):
        self.seen = (x, c_noise, labels)
        return self.value.to(x.dtype) + 0 * self.w


def test_denoiser_converts_once_and_feeds_c_noise():
    p = make_process("linear")
    x = torch.randn(2, 4, dtype=torch.float64)
    out = torch.randn(2, 4)
    d = Denoiser(Const(out), p, "v")
    pred = d(x, 500.0, cond=torch.tensor([1, 2]))
    a, s = p.alpha_sigma(torch.tensor(500.0))
    torch.testing.assert_close(pred.x0, a * x - s * out.double())
    net = d.net
    assert net.seen[0].dtype == torch.float32 and pred.x0.dtype == torch.float64
    torch.testing.assert_close(net.seen[1], torch.full((2,), 500.0))
    assert net.seen[2].tolist() == [1, 2]
    with pytest.raises(ValueError, match="prediction type"):
        Denoiser(Const(out), p, "score2")
