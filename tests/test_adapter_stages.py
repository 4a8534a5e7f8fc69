"""Adapter stages in the model card: a card with a base joins its base on load, adapters are
applied through the ADAPTERS registry, and a saved adapter loads like base + load_adapter.

A stand-in adapter (an MLP whose output, times the stage's scale, is added to the network's)
tests the mechanics without depending on any one adapter kind.
"""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
from test_pipeline import randomized, write_run
from torch import nn

from difflab.networks import MLPConfig, build_network
from difflab.pipeline import CARD_FILE, ModelCard, Pipeline, StageCard
from difflab.pipeline import adapters as adapter_registry
from difflab.pipeline.loading import write_stage_weights
from difflab.training.checkpoint import write_json

MLP = asdict(MLPConfig(dim=2, hidden=8, depth=1))


class Offset(nn.Module):
    """net(x, t, y) + scale * adapter(x, t, y): what the stand-in adapter does."""

    def __init__(self, net: nn.Module, adapter: nn.Module, scale: float):
        super().__init__()
        self.inner, self.adapter, self.scale = net, adapter, scale

    def forward(self, x, t, y=None):
        return self.inner(x, t, y) + self.scale * self.adapter(x, t, y)


def apply_offset(pipe, stage, module):
    pipe.net = Offset(pipe.net, module, stage.scale)


@pytest.fixture
def offset_kind(monkeypatch):
    monkeypatch.setitem(adapter_registry.ADAPTERS, "lora", apply_offset)


def write_adapter(folder, base, scale=1.0, seed=5):
    module = randomized(build_network("mlp", MLP), seed)
    write_stage_weights(module, folder / "adapter.safetensors")
    stage = StageCard(name="adapter", kind="lora", network="mlp", network_config=MLP,
                      sample_shape=[2], weights="adapter.safetensors", scale=scale)
    write_json(folder / CARD_FILE, ModelCard(stages=[stage], base=str(base)).to_dict())
    return module


def samples(pipe):
    return pipe(4, sampler="ddim", steps=5, seed=3).samples


def test_a_saved_adapter_loads_as_base_plus_load_adapter(tmp_path, offset_kind, one_thread):
    write_run(tmp_path / "base", "mlp", MLP, data_range=None)
    write_adapter(tmp_path / "ad", "../base")  # relative to the adapter card's folder
    joined = Pipeline.from_pretrained(tmp_path / "ad")
    assert [s.kind for s in joined.card.stages] == ["diffusion", "lora"]
    assert joined.card.base is None
    base = Pipeline.from_pretrained(tmp_path / "base")
    plain = samples(base)
    base.load_adapter(tmp_path / "ad")
    assert torch.equal(samples(joined), samples(base))
    assert not torch.allclose(samples(joined), plain)
    # a second copy gets a new name, and a scale 0 copy changes nothing
    again = Pipeline.from_pretrained(tmp_path / "ad")
    before = samples(again)
    added = again.load_adapter(tmp_path / "ad", scale=0.0)
    assert [s.name for s in added] == ["adapter_2"]
    assert torch.equal(samples(again), before)


def test_saved_joined_pipeline_is_complete(tmp_path, offset_kind, one_thread):
    write_run(tmp_path / "base", "mlp", MLP, data_range=None)
    write_adapter(tmp_path / "ad", (tmp_path / "base").resolve(), scale=0.5)
    pipe = Pipeline.from_pretrained(tmp_path / "ad")
    pipe.save_pretrained(tmp_path / "all")
    card = ModelCard.load(tmp_path / "all" / CARD_FILE)
    assert card.base is None and [s.scale for s in card.adapters] == [0.5]
    assert torch.equal(samples(Pipeline.from_pretrained(tmp_path / "all")), samples(pipe))


def test_cards_with_a_base_hold_adapters_only():
    diffusion = StageCard(name="diffusion", network="mlp", network_config=MLP, sample_shape=[2],
                          weights="w.safetensors", process={"kind": "x"}, prediction="eps")
    with pytest.raises(ValueError, match="adapter stages only"):
        ModelCard(stages=[diffusion], base="elsewhere")
    lora = StageCard(name="l", kind="lora", network="mlp", network_config=MLP,
                     sample_shape=[2], weights="l.safetensors")
    with pytest.raises(ValueError, match="one diffusion stage"):
        ModelCard(stages=[lora])
    with pytest.raises(ValueError, match="takes no process"):
        StageCard(name="l", kind="lora", network="mlp", network_config=MLP, sample_shape=[2],
                  weights="l.safetensors", prediction="eps")
    with pytest.raises(ValueError, match="finite"):
        StageCard(name="l", kind="lora", network="mlp", network_config=MLP, sample_shape=[2],
                  weights="l.safetensors", scale=float("nan"))


def test_checkpoint_adapters_metadata_makes_the_card():
    stage = dict(name="l", kind="lora", network="mlp", network_config=MLP, sample_shape=[2],
                 weights="", weights_prefix="lora")
    card = ModelCard.from_checkpoint_meta({"adapters": {"base": "/runs/base", "stages": [stage]},
                                           "step": 7}, weights="step_7.safetensors")
    assert card.base == "/runs/base" and card.step == 7
    assert card.stages[0].weights == "step_7.safetensors"
    assert card.stages[0].weights_prefix == "ema.lora"


def test_a_missing_base_and_an_unknown_kind_are_named(tmp_path, monkeypatch, one_thread):
    write_adapter(tmp_path / "ad", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="base model of"):
        Pipeline.from_pretrained(tmp_path / "ad")
    write_run(tmp_path / "base", "mlp", MLP, data_range=None)
    write_adapter(tmp_path / "ad2", tmp_path / "base")
    monkeypatch.delitem(adapter_registry.ADAPTERS, "lora", raising=False)
    with pytest.raises(ValueError, match="cannot apply 'lora'"):
        Pipeline.from_pretrained(tmp_path / "ad2")
