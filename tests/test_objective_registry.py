"""The objective registry and its typed config: names, defaults, errors, EDM's settable
log-normal noise levels, the JSON round trip, and that losses load no evaluation code."""

import inspect
import json
import subprocess
import sys
import typing
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import torch

from difflab.objectives import (
    DEFAULT_TIMES,
    OBJECTIVES,
    RECIPE_OBJECTIVES,
    EDMObjective,
    Objective,
    ObjectiveConfig,
    ObjectiveName,
    SimpleObjective,
    build_objective,
)
from difflab.process import VPSDE, DiscreteProcess, VEProcess


def test_registry_names_match_the_config_choices_and_the_classes():
    assert set(typing.get_args(ObjectiveName)) == set(OBJECTIVES) | set(RECIPE_OBJECTIVES)
    for name, cls in OBJECTIVES.items():
        obj = build_objective(ObjectiveConfig(name=name))
        assert type(obj) is cls and obj.name == name and isinstance(obj, Objective)
        assert obj.times == DEFAULT_TIMES[name] == cls.default_times
    assert {n for n, c in OBJECTIVES.items() if c.learned_variance} == {"vlb", "hybrid"}
    config_fields = {f.name for f in fields(ObjectiveConfig)}
    for cls in OBJECTIVES.values():  # what build_objective passes: config fields it accepts
        params = set(inspect.signature(cls).parameters)
        assert set(cls.options) <= config_fields and set(cls.options) == params, cls


def test_unknown_names_and_bad_values_are_refused_naming_the_option():
    with pytest.raises(ValueError, match=r"unknown objective 'l1'; choose from \('simple', "):
        build_objective(ObjectiveConfig(name="l1"))
    bad = [({"weighting": "snr2"}, "unknown weighting 'snr2'"),
           ({"time_sampling": "beta"}, "unknown time sampling 'beta'"),
           ({"loss_space": "score"}, "unknown loss space 'score'"),
           ({"p_std": -1.0}, "p_std"),
           ({"p_mean": float("nan")}, "p_mean"),
           ({"min_snr_gamma": 0.0}, "min_snr_gamma"),
           ({"name": "hybrid", "vlb_lambda": -0.1}, "vlb_lambda")]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            build_objective(ObjectiveConfig(**kwargs))


def test_weighting_defaults_to_the_objectives_own():
    assert SimpleObjective().weighting == "constant"
    assert build_objective(ObjectiveConfig("hybrid")).weighting == "constant"
    # EDM's loss is lambda(sigma)-weighted; "constant" (the value saved by older runs) too
    assert EDMObjective().weighting == EDMObjective("constant").weighting == "edm"
    assert EDMObjective("min_snr").weighting == "min_snr"


@pytest.mark.parametrize("process", [VEProcess(80.0), VPSDE(), DiscreteProcess("cosine", T=1000)],
                         ids=["ve", "vpsde", "cosine"])
def test_p_mean_and_p_std_set_the_log_normal_noise_levels(process):
    """t = t(lambda) with lambda = -2 ln s and ln s = P_mean + P_std z for the z drawn."""
    n = 512
    for p_mean, p_std in [(-1.2, 1.2), (0.4, 0.3)]:
        obj = build_objective(ObjectiveConfig("edm", p_mean=p_mean, p_std=p_std))
        t, w = obj.sample_t(process, n, torch.Generator().manual_seed(3), "cpu")
        z = torch.randn(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        floor = process.t_min + 1e-5 * (process.t_max - process.t_min)
        expect = process.t_from_log_snr(-2 * (p_mean + p_std * z)).clamp(min=floor)
        assert w is None and torch.equal(t, expect)
        # and the noise level of those times is that log-normal draw where no range clamps
        ln_s = -0.5 * process.log_snr(t)
        inside = (t > floor) & (t < process.t_max)
        assert int(inside.sum()) > n // 2
        torch.testing.assert_close(ln_s[inside], (p_mean + p_std * z)[inside],
                                   rtol=1e-6, atol=1e-6)
    # any objective with log-normal times uses the configured P_mean, P_std
    simple = build_objective(ObjectiveConfig("simple", time_sampling="lognormal", p_mean=0.4,
                                             p_std=0.3))
    edm = EDMObjective(p_mean=0.4, p_std=0.3)
    a = simple.sample_t(process, 8, torch.Generator().manual_seed(5), "cpu")[0]
    b = edm.sample_t(process, 8, torch.Generator().manual_seed(5), "cpu")[0]
    assert torch.equal(a, b)


def test_objective_config_round_trips_through_json():
    config = ObjectiveConfig(name="edm", weighting="min_snr", min_snr_gamma=3.0,
                             loss_space="x0", vlb_lambda=0.01, time_sampling="continuous",
                             p_mean=-0.5, p_std=0.8)
    back = ObjectiveConfig(**json.loads(json.dumps(asdict(config))))
    assert back == config and repr(build_objective(back)) == repr(build_objective(config))
    assert ObjectiveConfig(**json.loads(json.dumps(asdict(ObjectiveConfig())))) == \
        ObjectiveConfig()
    for f in fields(ObjectiveConfig):
        assert f.metadata["help"] and f.metadata["resume"] is False, f.name


def test_importing_the_objectives_loads_no_evaluation_code():
    code = ("import sys, difflab.objectives; "
            "print([m for m in sys.modules if m.startswith('difflab.evaluation')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parents[1])
    assert out.stdout.strip() == "[]"
