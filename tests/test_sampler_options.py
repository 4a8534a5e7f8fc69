"""Sampler options as data: declarations match the code, validation and parsing name the sampler
and its options, explicit defaults change nothing, and ``final_order`` means one thing."""

import inspect
import math
import typing

import pytest
import torch

from difflab.analytic import GaussianMixture
from difflab.process import make_process
from difflab.samplers import (
    SAMPLERS,
    SamplerOption,
    check_sampler_options,
    describe_sampler,
    parse_sampler_options,
    sampler_options,
    time_grid,
    unipc,
)
from difflab.samplers.base import final_sigma_step, final_weights
from difflab.samplers.options import declare_options, declared_options

pytestmark = pytest.mark.usefixtures("one_thread")

FINAL_ORDER_SAMPLERS = {"plms", "lms", "heun", "dpmpp_2m", "dpmpp_3m", "unipc_bh1", "unipc_bh2",
                        "dpm_solver_v3"}


def keyword_options(fn) -> dict[str, inspect.Parameter]:
    sig = inspect.signature(fn, eval_str=True)
    return {n: p for n, p in sig.parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and n != "cond"}


def expected(annotation) -> tuple[type, tuple | None]:
    """(type, choices) an annotation stands for: Literal[...] is str with choices, X | None X."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return type(args[0]), tuple(args)
    if args:  # a union with None
        (annotation,) = args
    return annotation, None


@pytest.mark.parametrize("name", [*SAMPLERS, "unipc"])
def test_declarations_equal_the_keyword_parameters(name):
    """Names, defaults, types and Literal choices of every sampler's declaration are those of
    its keyword-only parameters (but cond), so the declarations cannot drift from the code."""
    fn = unipc if name == "unipc" else SAMPLERS[name]
    declared = declared_options(fn)
    params = keyword_options(fn)
    assert list(declared) == list(params)
    for key, opt in declared.items():
        p = params[key]
        assert opt.name == key and opt.help
        assert opt.default == p.default and type(opt.default) is type(p.default)
        kind, choices = expected(p.annotation)
        assert opt.type is kind, key
        if choices is not None:
            assert opt.choices == choices, key
        if opt.choices is not None:
            assert opt.default in opt.choices


def test_a_drifting_declaration_is_refused_at_import():
    def sampler(denoiser, x, ts, generator=None, callback=None, *, cond=None, eta=0.0):
        return x

    with pytest.raises(TypeError, match="do not match"):
        declare_options(SamplerOption("eta", float, 1.0, "noise"))(sampler)
    with pytest.raises(TypeError, match="do not match"):
        declare_options()(sampler)
    with pytest.raises(TypeError, match="not an int >= 1"):
        SamplerOption("order", int, 0, "order", min=1)


def test_an_option_the_sampler_does_not_take_names_its_options():
    with pytest.raises(ValueError) as err:
        check_sampler_options("heun", {"eta": 0.5})
    assert str(err.value) == ("sampler 'heun' does not take option 'eta'; heun's options: "
                              "churn, s_tmin, s_tmax, s_noise, final_order, gaussian_fit")
    with pytest.raises(ValueError, match=r"^sampler 'euler_ode' does not take options 'eta', "
                                         r"'order'; euler_ode takes no options$"):
        check_sampler_options("euler_ode", {"eta": 0.0, "order": 2})
    with pytest.raises(ValueError, match="does not take option 'cond'"):
        check_sampler_options("ddim", {"cond": None})
    with pytest.raises(ValueError, match="unknown sampler 'nope'"):
        check_sampler_options("nope", {})
    with pytest.raises(ValueError, match="heun's options: churn"):
        parse_sampler_options("heun", ["eta=0.5"])


def test_values_are_converted_to_the_declared_types():
    out = check_sampler_options("ddim", {"eta": 1})
    assert out == {"eta": 1.0} and type(out["eta"]) is float
    out = check_sampler_options("lms", {"order": 3.0, "final_order": None})
    assert out == {"order": 3, "final_order": None} and type(out["order"]) is int
    assert check_sampler_options("dpm_solver", {"data_prediction": True}) == {
        "data_prediction": True}
    assert check_sampler_options("heun", {}) == {}


@pytest.mark.parametrize("name,options,message", [
    ("ddim", {"eta": -0.1}, "option 'eta' must be a float >= 0, got -0.1"),
    ("ddim", {"eta": "0.5"}, "option 'eta' must be a float >= 0, got '0.5'"),
    ("ddim", {"eta": None}, "option 'eta' must be a float >= 0, got None"),
    ("ddim", {"eta": math.nan}, "option 'eta' must be a float >= 0"),
    ("ddim", {"eta": True}, "option 'eta' must be a float"),
    ("lms", {"order": 2.5}, "option 'order' must be an int >= 1, got 2.5"),
    ("lms", {"order": True}, "option 'order' must be an int"),
    ("lms", {"final_order": -1}, "option 'final_order' must be an int >= 0 or None, got -1"),
    ("dpm_solver", {"order": 4}, "option 'order' must be one of 1, 2, 3, got 4"),
    ("dpm_solver", {"data_prediction": 1}, "must be true or false, got 1"),
    ("ddpm", {"variance": "beta~"}, "must be one of auto, beta, beta_tilde, got 'beta~'"),
    ("rk45", {"rtol": 0.0}, "option 'rtol' must be a float > 0, got 0.0"),
    ("annealed_langevin", {"n_steps": 0}, "option 'n_steps' must be an int >= 1"),
])
def test_bad_values_name_sampler_option_and_requirement(name, options, message):
    with pytest.raises(ValueError) as err:
        check_sampler_options(name, options)
    assert str(err.value).startswith(f"sampler {name!r}: ") and message in str(err.value)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_parse_round_trips_the_defaults(name):
    """Every default written as text (as describe_sampler shows it) parses back to itself."""
    opts = sampler_options(name)
    items = [f"{k}={o.default}" for k, o in opts.items()]
    assert parse_sampler_options(name, items) == {k: o.default for k, o in opts.items()}
    lines = describe_sampler(name).splitlines()
    assert len(lines) == max(len(opts), 1)
    assert all(line.startswith(f"{k} (") for k, line in zip(opts, lines, strict=False))


def test_parse_values():
    assert parse_sampler_options("unipc_bh2", ["order=3", "final_order = 2"]) == {
        "order": 3, "final_order": 2}
    assert parse_sampler_options("ddim", ["eta=0.5"]) == {"eta": 0.5}
    assert parse_sampler_options("heun", ["s_tmax=inf", "churn=1"]) == {
        "s_tmax": math.inf, "churn": 1.0}
    assert parse_sampler_options("dpm_solver", ["data_prediction=false"]) == {
        "data_prediction": False}
    assert parse_sampler_options("dpm_solver", ["data_prediction=True"]) == {
        "data_prediction": True}
    assert parse_sampler_options("lms", ["final_order=None"]) == {"final_order": None}
    assert parse_sampler_options("rk45", ["method=DOP853"]) == {"method": "DOP853"}
    assert parse_sampler_options("ddim", []) == {}
    for item in ("eta", "=0.5", ""):
        with pytest.raises(ValueError, match=f"malformed sampler option {item!r}"):
            parse_sampler_options("ddim", [item])
    with pytest.raises(ValueError, match="'eta' given twice"):
        parse_sampler_options("ddim", ["eta=0", "eta=1"])
    with pytest.raises(ValueError, match="option 'order' must be an int >= 1, got '2.5'"):
        parse_sampler_options("lms", ["order=2.5"])
    with pytest.raises(ValueError, match="option 'eta' must be a float >= 0, got 'fast'"):
        parse_sampler_options("ddim", ["eta=fast"])
    with pytest.raises(ValueError, match="must be true or false, got 'maybe'"):
        parse_sampler_options("dpm_solver", ["data_prediction=maybe"])


def mixture(name: str = "vpsde"):
    process = make_process(name)
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(2, 3, generator=g, dtype=torch.float64)
    data = GaussianMixture(process, mu, torch.tensor([0.4, 0.6], dtype=torch.float64))
    x_T = torch.randn(4, 3, generator=g, dtype=torch.float64) * process.sigma(process.t_max)
    return process, data, x_T


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_explicit_defaults_give_bit_identical_samples(name):
    process, data, x_T = mixture()
    ts = time_grid(process, 6)
    defaults = {k: o.default for k, o in sampler_options(name).items()}
    plain = SAMPLERS[name](data, x_T, ts, torch.Generator().manual_seed(1))
    given = SAMPLERS[name](data, x_T, ts, torch.Generator().manual_seed(1),
                           **check_sampler_options(name, defaults))
    assert torch.equal(plain, given)


def test_final_order_is_the_one_name_for_the_last_step():
    takes = {n for n in SAMPLERS if "final_order" in sampler_options(n)}
    assert takes == FINAL_ORDER_SAMPLERS
    assert not any(k.startswith("final") and k != "final_order"
                   for n in SAMPLERS for k in sampler_options(n))
    helps = {sampler_options(n)["final_order"].help.split(";")[0] for n in takes}
    assert len(helps) == 1


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_final_weights_integrate_polynomials_exactly(order):
    """The last Adams-Bashforth step integrates eps(sigma~) of degree < order exactly over
    [sigma~_{N-1}, 0] (the definition of its weights)."""
    st = [3.0, 1.7, 0.9, 0.45, 0.2, 0.0]
    (w,) = final_weights(st, order)
    n = len(st) - 2
    for deg in range(order):
        exact = -st[n] ** (deg + 1) / (deg + 1)  # int_{st_n}^0 u^deg du
        assert sum(wj * st[n - j] ** deg for j, wj in enumerate(w)) == pytest.approx(exact)
    assert final_weights([1.0, 0.5, 0.1], order) == []  # t_min still noisy: no such step


class Recorder:
    """The denoiser, recording the input state and eps_hat of every evaluation."""

    def __init__(self, inner):
        self.inner, self.process, self.calls = inner, inner.process, []

    def __call__(self, x, t, cond=None):
        pred = self.inner(x, t, cond)
        self.calls.append((x, pred))
        return pred


@pytest.mark.parametrize("name", ["plms", "lms", "dpmpp_2m", "dpmpp_3m"])
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_final_order_means_the_same_last_step_everywhere(name, k):
    """With final_order = k the result is x0_hat of the last evaluation for k = 1, else the
    Adams-Bashforth step in sigma~ from the last state through the latest k eps_hat, whatever
    the sampler (lms with order 1 keeps k eps_hat for its last step too)."""
    process, data, x_T = mixture("cosine")
    ts = time_grid(process, 7)
    assert float(process.sigma(ts[-1])) == 0
    rec = Recorder(data)
    opts = {"order": 1} if name == "lms" else {}
    out = SAMPLERS[name](rec, x_T, ts, final_order=k, **opts)
    x, pred = rec.calls[-1]
    if k == 1:
        assert torch.equal(out, pred.x0)
        return
    st = (-0.5 * process.log_snr(ts)).exp().tolist()
    eps = [p.eps for _, p in rec.calls[::-1][:k]]
    ref = final_sigma_step(x, float(process.alpha(ts[-2])), st, eps, k)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
