"""LoRA (Hu et al. 2021): a fresh adapter (B = 0) and scale 0 leave a network bit-identical;
the hooks compute W x + s (alpha / r) B A x; merging gives the same outputs and unmerging the
exact base weights; adapters add; an adapter saved alone loads onto its base; a LoRA made for
another network is refused by layer name. Tiny random networks, no training."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from difflab.cli.main import main
from difflab.conditioning import TextCond
from difflab.config import from_dict, to_dict
from difflab.data import to_uint8
from difflab.networks import NETWORKS, build_network
from difflab.networks.lora import LoRA, LoRAConfig, attention_targets
from difflab.pipeline import CARD_FILE, ModelCard, Pipeline, StageCard
from difflab.pipeline.lora import lora_stage
from difflab.process import make_process
from difflab.training.checkpoint import save_checkpoint

UNET = dict(in_channels=1, image_size=8, base_channels=8, channel_mult=[1, 2],
            num_res_blocks=1, attention_resolutions=[4], num_heads=2)
DIT = dict(in_channels=1, image_size=8, patch_size=2, hidden_size=16, depth=2, num_heads=2)
CLASSES = ["a", "b"]


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def randomized(net: nn.Module, seed: int, std: float = 0.2) -> nn.Module:
    """Every parameter random (zero-initialised layers would make comparisons vacuous)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(std * torch.randn(p.shape, generator=g))
    return net.eval()


def random_b(lora: LoRA, seed: int, std: float = 0.1) -> LoRA:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.layers:
            layer.B.copy_(std * torch.randn(layer.B.shape, generator=g))
    return lora


def text_unet() -> nn.Module:
    return randomized(build_network("unet", {**UNET, "context_dim": 6}), 0)


def text_dit() -> nn.Module:
    return randomized(build_network("dit", {**DIT, "context_dim": 6}), 1)


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ctx = TextCond(torch.randn(2, 3, 6, generator=g),
                   torch.tensor([[True, True, False], [True, True, True]]))
    return torch.randn(2, 1, 8, 8, generator=g), torch.rand(2, generator=g), ctx


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float) -> None:
    """torch.allclose with the largest difference in the message (torch.testing's
    assert_close costs seconds of imports on its first call)."""
    assert torch.allclose(a, b, atol=atol, rtol=rtol), f"max |a - b| = {(a - b).abs().max()}"


def state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


# -- the module ------------------------------------------------------------------------------
@pytest.mark.parametrize("make, conv", [(text_unet, True), (text_dit, False)])
def test_fresh_lora_and_scale_zero_are_bit_identical(make, conv):
    net = make()
    x, t, ctx = inputs()
    with torch.no_grad():
        ref = net(x, t, ctx)
        before = state(net)
        lora = LoRA(LoRAConfig.for_network(net, rank=3, conv=conv))
        assert all(torch.equal(la.B, torch.zeros_like(la.B)) for la in lora.layers)
        handle = lora.attach(net)
        assert torch.equal(net(x, t, ctx), ref)  # B = 0
        random_b(lora, 1)
        assert not torch.allclose(net(x, t, ctx), ref, atol=1e-3)  # the adapter acts
        handle.scale = 0.0
        assert torch.equal(net(x, t, ctx), ref)
    assert list(net.state_dict()) == list(before)  # the base state dict never changes
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


@pytest.mark.parametrize("make, conv", [(text_unet, True), (text_dit, False)])
def test_merged_equals_unmerged_and_unmerge_restores_exactly(make, conv):
    net = make()
    x, t, ctx = inputs()
    before = state(net)
    lora = random_b(LoRA(LoRAConfig.for_network(net, rank=2, alpha=4.0, conv=conv)), 2)
    with torch.no_grad():
        handle = lora.attach(net, scale=0.7)
        hooked = net(x, t, ctx)
        handle.merge()
        assert any(not torch.equal(v, before[k]) for k, v in net.state_dict().items())
        merged = net(x, t, ctx)
        assert_close(merged, hooked, atol=1e-5, rtol=1e-5)
        handle.unmerge()
        assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
        assert torch.equal(net(x, t, ctx), hooked)
        handle.detach()
        assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 7)
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)

    def forward(self, v, x):
        return self.lin(v), self.conv(x)


def test_hooks_compute_w_x_plus_scaled_b_a_x_for_a_linear_and_a_conv():
    net = randomized(TwoLayers(), 0)
    cfg = LoRAConfig.for_network(net, rank=2, alpha=3.0, targets=["lin", "conv"])
    assert cfg.targets == ["lin", "conv"] and cfg.shapes == [[7, 5], [4, 3, 3, 3]]
    lora = random_b(LoRA(cfg), 1, std=0.5)
    v, x = torch.randn(6, 5), torch.randn(2, 3, 9, 9)
    s, f = 0.6, 3.0 / 2
    with torch.no_grad():
        lora.attach(net, scale=s)
        out_lin, out_conv = net(v, x)
        A, B = lora.layers[0].A, lora.layers[0].B
        ref_lin = F.linear(v, net.lin.weight, net.lin.bias) + s * f * (v @ A.T @ B.T)
        A, B = lora.layers[1].A, lora.layers[1].B  # A: conv with the layer's kernel/stride
        down = F.conv2d(x, A, stride=2, padding=1)  # [2, r, 5, 5]
        ref_conv = (F.conv2d(x, net.conv.weight, net.conv.bias, stride=2, padding=1)
                    + s * f * F.conv2d(down, B[:, :, None, None]))  # B: a 1x1 conv
    assert_close(out_lin, ref_lin, atol=1e-5, rtol=1e-5)
    assert_close(out_conv, ref_conv, atol=1e-5, rtol=1e-5)


def test_two_adapters_with_weights_add():
    net = text_unet()
    x, t, ctx = inputs()
    one = random_b(LoRA(LoRAConfig.for_network(net, rank=2)), 1)
    two = random_b(LoRA(LoRAConfig.for_network(net, rank=4, alpha=2.0, conv=True)), 2)
    by_hand = copy.deepcopy(net)
    layers = dict(by_hand.named_modules())
    with torch.no_grad():
        for lora, w in ((one, 0.5), (two, -1.5)):
            for i, name in enumerate(lora.config.targets):
                layers[name].weight += w * lora.delta(i)
        h1, h2 = one.attach(net, 0.5), two.attach(net, -1.5)
        assert_close(net(x, t, ctx), by_hand(x, t, ctx), atol=1e-5, rtol=1e-5)
        h1.detach()  # the other one stays
        alone = copy.deepcopy(net)
        h2.detach()
        ref = net(x, t, ctx)
        h2 = two.attach(net, -1.5)
        assert torch.equal(net(x, t, ctx), alone(x, t, ctx))
        assert not torch.equal(net(x, t, ctx), ref)
    with pytest.raises(ValueError, match="already attached"):
        two.attach(net)


def test_training_moves_only_the_lora_and_the_base_stays():
    """Gradients reach A and B through the hooks (the paper's dW = B A, B = 0 at the start:
    dL/dA = 0 and dL/dB != 0 on the first step); the frozen base does not change."""
    net = text_unet().requires_grad_(False)
    x, t, ctx = inputs()
    before = state(net)
    lora = LoRA(LoRAConfig.for_network(net, rank=2, conv=True))
    lora.attach(net)
    for step in range(2):  # plain SGD (torch.optim costs seconds of imports)
        lora.zero_grad()
        net(x, t, ctx).square().mean().backward()
        grads_a = [la.A.grad.abs().max() for la in lora.layers]
        grads_b = [la.B.grad.abs().max() for la in lora.layers]
        if step == 0:
            assert max(grads_a) == 0 and min(grads_b) > 0
        with torch.no_grad():
            for p in lora.parameters():
                p -= 0.1 * p.grad
    assert max(grads_a) > 0
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())


def test_deepcopy_of_an_adapted_network_carries_its_own_hooks():
    """An EMA copy (copy.deepcopy of base + LoRA) adapts the copy, with the copied LoRA."""
    net = text_unet()
    x, t, ctx = inputs()
    lora = random_b(LoRA(LoRAConfig.for_network(net, rank=2, conv=True)), 3)
    with torch.no_grad():
        ref = net(x, t, ctx)
        lora.attach(net)
        adapted = net(x, t, ctx)
        pair = copy.deepcopy(nn.ModuleDict({"net": net, "lora": lora}))
        assert torch.equal(pair["net"](x, t, ctx), adapted)
        pair["lora"].handle.detach()
        assert torch.equal(pair["net"](x, t, ctx), ref)
        assert torch.equal(net(x, t, ctx), adapted)


def test_parameter_count_targets_and_config_round_trip():
    net = text_dit()
    cfg = LoRAConfig.for_network(net, rank=4)
    d, ctx = DIT["hidden_size"], 6
    # per block: attn.qkv (d -> 3d), attn.proj (d -> d), cross.q, cross.kv (ctx -> 2d), proj
    per_block = 4 * ((d + 3 * d) + (d + d) + (d + d) + (ctx + 2 * d) + (d + d))
    assert cfg.num_parameters == DIT["depth"] * per_block
    lora = LoRA(cfg)
    assert sum(p.numel() for p in lora.parameters() if p.requires_grad) == cfg.num_parameters
    assert attention_targets(net)[:2] == ["blocks.0.attn.qkv", "blocks.0.attn.proj"]
    assert NETWORKS["lora"] == (LoRA, LoRAConfig)
    again = build_network("lora", json.loads(json.dumps(to_dict(cfg))))
    assert again.config == cfg == from_dict(LoRAConfig, to_dict(cfg))
    assert list(again.state_dict()) == list(lora.state_dict())
    assert LoRAConfig.for_network(net, targets=["*.mlp.*"]).targets[:2] == [
        "blocks.0.mlp.0", "blocks.0.mlp.2"]
    with pytest.raises(ValueError, match="match no Linear"):
        LoRAConfig.for_network(net, targets=["nothing.*"])
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(rank=0)


def test_a_lora_for_another_network_is_refused_by_layer_name():
    lora = LoRA(LoRAConfig.for_network(text_unet(), rank=2))
    wider = build_network("unet", {**UNET, "base_channels": 16, "context_dim": 6})
    with pytest.raises(ValueError, match=r"'down\.2\.1\.qkv'.*\[96, 32, 1, 1\].*\[48, 16, 1, 1\]"):
        lora.attach(wider)
    with pytest.raises(ValueError, match="'down.2.1.qkv': DiT has no Linear"):
        lora.attach(text_dit())
    assert lora.handle is None


# -- the pipeline ----------------------------------------------------------------------------
def base_pipeline(folder) -> Pipeline:
    """A class-conditional U-Net with self-attention saved as a pipeline folder."""
    cfg = {**UNET, "num_classes": len(CLASSES)}
    stage = StageCard(name="diffusion", network="unet", network_config=cfg,
                      process=make_process("linear", T=1000).to_config(), prediction="x0",
                      sample_shape=[1, 8, 8], weights="", data_range=[-1.0, 1.0],
                      conditioning="class", class_names=CLASSES)
    net = randomized(build_network("unet", cfg), 0)
    Pipeline(ModelCard(stages=[stage]), net).save_pretrained(folder)
    return Pipeline.from_pretrained(folder)


def random_lora(net: nn.Module, seed: int, scale: float = 1.0, name: str = "lora",
               **kw) -> tuple[StageCard, LoRA]:
    lora = random_b(LoRA(LoRAConfig.for_network(net, **kw)), seed, std=0.5)
    return lora_stage(lora, [1, 8, 8], name, scale), lora


def draw(pipe: Pipeline):
    return pipe(4, labels="all", steps=3, seed=5).samples


@pytest.fixture(scope="module")
def saved(tmp_path_factory, one_thread):
    """A base pipeline folder and an adapter folder (two LoRAs) written by save_adapters."""
    root = tmp_path_factory.mktemp("lora")
    pipe = base_pipeline(root / "base")
    s1, l1 = random_lora(pipe.net, 1, 0.8, rank=2, conv=True)
    s2, l2 = random_lora(pipe.net, 2, 1.0, name="style", rank=3)
    pipe.add_adapter(s1, l1)
    pipe.add_adapter(s2, l2)
    pipe.save_adapters(root / "adapter")
    return root


def test_an_adapter_saved_alone_loads_onto_its_base(saved):
    card = json.loads((saved / "adapter" / CARD_FILE).read_text())
    assert card["base"] == str((saved / "base").resolve())
    assert [s["kind"] for s in card["stages"]] == ["lora", "lora"]
    assert sorted(p.name for p in (saved / "adapter").iterdir()) == sorted([
        CARD_FILE, "lora.safetensors", "style.safetensors"])
    joined = Pipeline.from_pretrained(saved / "adapter")
    assert joined.base_source == (saved / "base").resolve()
    base = Pipeline.from_pretrained(saved / "base")
    plain = draw(base)
    added = base.load_adapter(saved / "adapter")
    assert [s.name for s in added] == ["lora", "style"]
    assert torch.equal(draw(joined), draw(base))
    assert (draw(base) - plain).abs().max() > 1e-2  # not vacuous
    base.load_adapter(saved / "adapter", scale=0.0)  # a third and fourth LoRA at scale 0
    assert [s.name for s in base.card.adapters] == ["lora", "style", "lora_2", "style_2"]
    assert torch.equal(draw(joined), draw(base))


def test_merged_sampling_equals_unmerged_and_save_pretrained_never_doubles(saved, tmp_path):
    pipe = Pipeline.from_pretrained(saved / "adapter")
    hooked = draw(pipe)
    base_weights = state(pipe.networks[0])
    assert pipe.merge_adapters() == ["lora", "style"]
    assert_close(draw(pipe), hooked, atol=1e-4, rtol=1e-4)
    pipe.save_pretrained(tmp_path / "full")  # while merged
    full = Pipeline.from_pretrained(tmp_path / "full")
    assert [s.kind for s in full.card.stages] == ["diffusion", "lora", "lora"]
    assert all(torch.equal(v, base_weights[k]) for k, v in full.networks[0].state_dict().items())
    assert torch.equal(draw(full), hooked)
    assert pipe.unmerge_adapters() == ["lora", "style"]
    assert all(torch.equal(v, base_weights[k]) for k, v in pipe.networks[0].state_dict().items())
    assert torch.equal(draw(pipe), hooked)
    # the full folder is itself a base: its own LoRAs are not saved again as adapters
    with pytest.raises(ValueError, match="no adapter stages"):
        full.save_adapters(tmp_path / "none")


def test_save_adapters_writes_the_scale_set_and_needs_a_base(saved, tmp_path):
    pipe = Pipeline.from_pretrained(saved / "base")
    pipe.load_adapter(saved / "adapter")
    pipe.networks[1].handle.scale = 0.25
    pipe.save_adapters(tmp_path / "again")
    card = ModelCard.load(tmp_path / "again" / CARD_FILE)
    assert [s.scale for s in card.stages] == [0.25, 1.0]
    again = Pipeline.from_pretrained(tmp_path / "again")
    assert torch.equal(draw(again), draw(pipe))
    memory = Pipeline(ModelCard(stages=[pipe.stage]), pipe.networks[0])
    with pytest.raises(ValueError, match="give save_adapters a base"):
        memory.save_adapters(tmp_path / "x")


def test_a_mismatched_adapter_is_refused_with_stage_and_layer(saved, tmp_path):
    other = Pipeline.from_pretrained(saved / "base")
    dit = randomized(build_network("dit", DIT), 0)
    stage, lora = random_lora(dit, 1)
    dit_pipe = Pipeline(ModelCard(stages=[StageCard(**{**vars(other.stage), "network": "dit",
                                                       "network_config": DIT})]), dit)
    dit_pipe.add_adapter(stage, lora)
    dit_pipe.save_adapters(tmp_path / "dit_lora", base=str(saved / "base"))
    with pytest.raises(ValueError, match=r"lora stage 'lora' .*'blocks\.0\.attn\.qkv'"):
        other.load_adapter(tmp_path / "dit_lora")
    with pytest.raises(ValueError, match="blocks.0.attn.qkv"):
        Pipeline.from_pretrained(tmp_path / "dit_lora")


def test_a_fine_tuning_checkpoint_loads_as_an_adapter(saved, tmp_path):
    """The checkpoint metadata of a LoRA fine-tuning run ("adapters": base + stages, weights
    under ema.<prefix>) gives the same model as the adapter folder."""
    src = Pipeline.from_pretrained(saved / "adapter")
    stage, lora = src.card.stages[1], src.networks[1]
    tensors = {f"ema.lora.{k}": v for k, v in lora.state_dict().items()}
    tensors |= {f"model.lora.{k}": torch.zeros_like(v) for k, v in lora.state_dict().items()}
    st = {**to_dict(stage), "weights_prefix": "lora"}
    del st["weights"]
    save_checkpoint(tmp_path / "run" / "checkpoints", 7, tensors,
                    {"adapters": {"base": str(saved / "base"), "stages": [st]}, "step": 7})
    base = Pipeline.from_pretrained(saved / "base")
    base.load_adapter(saved / "adapter")
    base.networks[2].handle.scale = 0.0  # only the first LoRA
    assert torch.equal(draw(Pipeline.from_pretrained(tmp_path / "run")), draw(base))
    onto = Pipeline.from_pretrained(saved / "base")
    onto.load_adapter(tmp_path / "run" / "checkpoints")  # what --adapter RUN does
    assert torch.equal(draw(onto), draw(base))


def test_a_card_with_a_base_holds_adapter_stages_only(saved):
    stages = ModelCard.load(saved / "adapter" / CARD_FILE).stages
    diffusion = ModelCard.load(saved / "base" / CARD_FILE).stages[0]
    with pytest.raises(ValueError, match="adapter stages only"):
        ModelCard(stages=[diffusion, *stages], base="../base")
    with pytest.raises(ValueError, match="one diffusion stage"):
        ModelCard(stages=stages)  # adapters without a base
    with pytest.raises(ValueError, match="takes no process"):
        StageCard(**{**vars(stages[0]), "process": diffusion.process})


# -- the CLI ---------------------------------------------------------------------------------
def test_sample_with_adapters_and_bad_adapter_options(saved, tmp_path, capsys):
    def sample(*extra):
        return main(["sample", "--checkpoint", str(saved / "base"), "--n", "2", "--steps", "2",
                     "--class", "b", "--no-progress", "--device", "cpu", "--overwrite",
                     "--out", str(tmp_path / "s.png"), "--save-npz", str(tmp_path / "s.npz"),
                     *extra])

    assert sample("--adapter", f"{saved / 'adapter'}:0.5") == 0
    ours = np.load(tmp_path / "s.npz")["images"]
    assert main(["sample", "--checkpoint", str(saved / "adapter"), "--n", "2", "--steps", "2",
                 "--class", "b", "--no-progress", "--device", "cpu", "--overwrite", "--out",
                 str(tmp_path / "s.png"), "--save-npz", str(tmp_path / "j.npz")]) == 0
    pipe = Pipeline.from_pretrained(saved / "base")
    pipe.load_adapter(saved / "adapter", scale=0.5)
    ref = pipe(2, labels="b", steps=2).samples
    np.testing.assert_array_equal(ours, to_uint8(ref).permute(0, 2, 3, 1).numpy())
    assert not np.array_equal(ours, np.load(tmp_path / "j.npz")["images"])  # scale 0.5 acts
    capsys.readouterr()
    for spec, words in ((f"{saved / 'adapter'}:strong", "is not a number"),
                        (str(tmp_path / "missing"), "no adapter at"),
                        (str(saved / "base"), "holds no adapter stages")):
        assert sample("--adapter", spec) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err


def test_edit_takes_adapters_like_the_joined_model(saved, tmp_path, capsys):
    Image.fromarray((np.arange(64).reshape(8, 8) * 4).astype(np.uint8)).save(tmp_path / "in.png")

    def edit(checkpoint, out, *extra):
        return main(["edit", "sdedit", "--checkpoint", str(checkpoint), "--input",
                     str(tmp_path / "in.png"), "--steps", "2", "--class", "a", "--no-progress",
                     "--device", "cpu", "--out", str(tmp_path / out), *extra])

    assert edit(saved / "base", "a.png", "--adapter", str(saved / "adapter")) == 0
    assert edit(saved / "adapter", "b.png") == 0
    assert edit(saved / "base", "c.png") == 0
    a, b, c = (np.asarray(Image.open(tmp_path / f)) for f in ("a.png", "b.png", "c.png"))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    capsys.readouterr()
    assert edit(saved / "base", "d.png", "--adapter", f"{saved / 'adapter'}:inf") == 2
    assert "finite" in capsys.readouterr().err
