"""difflab.pipeline: run folders in today's checkpoint format load and sample exactly as the
direct Denoiser + generate computation; save/load round trips; strict model cards.

The run folders here are written by the tests themselves with ``save_checkpoint`` and the
metadata keys the trainer writes (not through the Trainer), so the on-disk format they pin
stays the one existing runs have.
"""

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

from difflab.cli.main import main
from difflab.conditioning import TextCond
from difflab.guidance import ClassifierFreeGuidance
from difflab.networks import MLPConfig, build_network
from difflab.parameterization import ClippedDenoiser, Denoiser
from difflab.pipeline import CARD_FILE, ModelCard, Pipeline, StageCard
from difflab.process import make_process
from difflab.samplers import ddim, ddpm, get_sampler
from difflab.samplers.generate import generate
from difflab.training.checkpoint import save_checkpoint, write_json

UNET = dict(in_channels=1, image_size=8, base_channels=8, channel_mult=[1], num_res_blocks=1,
            attention_resolutions=[], num_heads=1)
CLASSES = ["a", "b", "c"]


def randomized(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter drawn at random: zero-initialised output layers would make every
    network predict eps = 0 and every comparison of samples vacuous."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return net


def write_run(folder, name: str, config: dict, *, class_names=(), data_range=(-1.0, 1.0),
              text_encoder=None, prediction="eps"):
    """A run folder as today's trainer leaves it: checkpoints/step_00000003.{safetensors,json}
    (model.*, ema.*, optimizer and RNG tensors; the meta keys of Trainer.meta()) and
    config.json. Returns (EMA network, raw network, process, meta)."""
    ema = randomized(build_network(name, config), 0)
    raw = randomized(build_network(name, config), 1)
    process = make_process("linear", T=1000)
    meta = {
        "difflab_version": "0.1.0",
        "config": {"dataset": "digits" if name == "unet" else "toy:moons", "resolution": 8,
                   "steps": 3, "prediction": prediction, "schedule": "linear", "T": 1000},
        "network": {"name": name, "config": config},
        "process": process.to_config(), "prediction": prediction, "learned_variance": False,
        "sigma_data": 0.5, "data_range": None if data_range is None else list(data_range),
        "class_names": [] if text_encoder else list(class_names),
        **({"text_encoder": text_encoder, "captions": list(class_names)}
           if text_encoder else {}),
        "ema_updates": 3,
    }
    tensors = {f"model.{k}": v for k, v in raw.state_dict().items()}
    tensors |= {f"ema.{k}": v for k, v in ema.state_dict().items()}
    tensors["optim.0.step"] = torch.tensor(3.0)
    tensors["rng.generator"] = torch.Generator().get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    write_json(folder / "config.json", meta)
    save_checkpoint(folder / "checkpoints", 3, tensors,
                    {**meta, "optimizer": {"param_groups": []}})
    return ema, raw, process, meta


def direct(net, process, meta, guidance=None):
    """The denoiser built by hand, as the sampling code did before pipelines: channels-last
    weights (like the trainer's EMA copy), optional CFG, clipping to the data range."""
    net = net.to(memory_format=torch.channels_last).eval().requires_grad_(False)
    den = Denoiser(net, process, meta["prediction"])
    if guidance is not None:
        den = ClassifierFreeGuidance(den, guidance, null_label=len(meta["class_names"]))
    return ClippedDenoiser(den, *meta["data_range"]) if meta["data_range"] else den


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("runs")
    return {
        "class": (root / "class", *write_run(root / "class", "unet", {**UNET, "num_classes": 3},
                                             class_names=CLASSES)),
        "uncond": (root / "uncond", *write_run(root / "uncond", "unet", dict(UNET))),
        "mlp": (root / "mlp", *write_run(root / "mlp", "mlp",
                                         asdict(MLPConfig(dim=2, hidden=16, depth=2)),
                                         data_range=None)),
    }


# -- (a) today's run folders load and sample exactly as the direct computation ----------------
def test_class_conditional_run_samples_like_the_direct_computation(runs):
    folder, ema, _, process, meta = runs["class"]
    pipe = Pipeline.from_pretrained(folder)
    assert pipe.sample_shape == (1, 8, 8) and pipe.class_names == CLASSES
    assert pipe.card.step == 3 and pipe.card.ema and pipe.stage.conditioning == "class"
    out = pipe(6, labels=[0, "b", 2, "a", 1, 2], steps=3, seed=5)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    ref = generate(direct(ema, process, meta), ddim, (1, 8, 8), range(5, 11), labels=labels,
                   steps=3, progress=False)
    assert torch.equal(out.samples, ref) and torch.equal(out.labels, labels)
    assert out.seeds == list(range(5, 11)) and ref.std() > 0.05  # not a constant image


def test_cfg_samples_like_the_direct_computation(runs):
    folder, ema, _, process, meta = runs["class"]
    out = Pipeline.from_pretrained(folder)(4, labels=1, guidance=2.5, steps=3, seed=0)
    ref = generate(direct(ema, process, meta, guidance=2.5), ddim, (1, 8, 8), range(4),
                   labels=torch.full((4,), 1), steps=3, progress=False)
    assert torch.equal(out.samples, ref)
    plain = Pipeline.from_pretrained(folder)(4, labels=1, steps=3, seed=0)
    assert not torch.equal(plain.samples, ref)  # guidance changed something


def test_unconditional_run_and_raw_weights(runs):
    folder, ema, raw, process, meta = runs["uncond"]
    out = Pipeline.from_pretrained(folder)(3, sampler="ddpm", steps=3, seed=2)
    ref = generate(direct(ema, process, meta), ddpm, (1, 8, 8), [2, 3, 4], steps=3,
                   progress=False)
    assert torch.equal(out.samples, ref) and out.labels is None
    pipe_raw = Pipeline.from_pretrained(folder, ema=False)
    assert not pipe_raw.card.ema
    for k, v in raw.state_dict().items():
        assert torch.equal(pipe_raw.networks[0].state_dict()[k], v), k


def test_2d_mlp_run_samples_like_the_direct_computation(runs):
    folder, ema, _, process, meta = runs["mlp"]
    pipe = Pipeline.from_pretrained(folder)
    assert pipe.sample_shape == (2,) and pipe.stage.data_range is None
    out = pipe(8, sampler="heun", steps=4, sampler_options={"churn": 0.5}, seed=1)
    ref = generate(direct(ema, process, meta), get_sampler("heun"), (2,), range(1, 9),
                   steps=4, progress=False, churn=0.5)
    assert torch.equal(out.samples, ref) and out.images is None


def test_every_path_form_of_a_run_loads_the_same_weights(runs):
    folder, ema, *_ = runs["class"]
    ckpt = folder / "checkpoints" / "step_00000003.json"
    for path in (folder, folder / "checkpoints", ckpt, ckpt.with_suffix(".safetensors")):
        net = Pipeline.from_pretrained(path).networks[0]
        assert all(torch.equal(net.state_dict()[k], v) for k, v in ema.state_dict().items())
    with pytest.raises(FileNotFoundError, match="nothere"):
        Pipeline.from_pretrained(folder / "nothere")


# -- (b) save_pretrained -> from_pretrained --------------------------------------------------
def test_save_pretrained_round_trip_is_exact(runs, tmp_path, capsys):
    folder, *_ = runs["class"]
    pipe = Pipeline.from_pretrained(folder)
    saved = pipe.save_pretrained(tmp_path / "pipe")
    assert sorted(p.name for p in saved.iterdir()) == sorted([CARD_FILE, "diffusion.safetensors"])
    again = Pipeline.from_pretrained(saved)
    for k, v in pipe.networks[0].state_dict().items():
        assert torch.equal(again.networks[0].state_dict()[k], v), k
    a = pipe(6, labels="all", guidance=1.5, steps=3, seed=3)
    b = again(6, labels="all", guidance=1.5, steps=3, seed=3)
    assert torch.equal(a.samples, b.samples)
    st = again.stage
    assert (st.weights, st.weights_prefix) == ("diffusion.safetensors", "")
    assert asdict(st) == {**asdict(pipe.stage), "weights": st.weights, "weights_prefix": ""}
    with pytest.raises(FileExistsError, match="pipe"):
        pipe.save_pretrained(saved)
    pipe.save_pretrained(saved, overwrite=True)
    with pytest.raises(ValueError, match="EMA weights only"):
        Pipeline.from_pretrained(saved, ema=False)
    # the CLI samples a pipeline folder exactly as the run it came from
    for name, src in (("run", folder), ("pipe", saved)):
        assert main(["sample", "--checkpoint", str(src), "--n", "4", "--steps", "2",
                     "--class", "b", "--out", str(tmp_path / f"{name}.png"), "--save-npz",
                     str(tmp_path / f"{name}.npz"), "--no-progress", "--device", "cpu"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "run.npz")["images"],
                                  np.load(tmp_path / "pipe.npz")["images"])


# -- (c) the model card ------------------------------------------------------------------------
def test_model_card_json_round_trip(runs):
    *_, meta = runs["class"]
    card = ModelCard.from_checkpoint_meta({**meta, "step": 3}, weights="w.safetensors")
    back = ModelCard.from_dict(json.loads(card.to_json()))
    assert back == card and isinstance(back.stages[0], StageCard)
    assert back.stages[0].sample_shape == [1, 8, 8] and back.stages[0].dataset == "digits"
    assert back.training["steps"] == 3 and back.step == 3
    nested = {**meta, "config": {"data": {"dataset": "folder:x"}, "optim": {"steps": 3}}}
    assert ModelCard.from_checkpoint_meta(nested).stages[0].dataset == "folder:x"
    mlp = ModelCard.from_checkpoint_meta(runs["mlp"][-1])
    assert mlp.stages[0].sample_shape == [2] and mlp.stages[0].conditioning == "none"


def _bad_card(tmp_path, runs, change):
    saved = Pipeline.from_pretrained(runs["class"][0]).save_pretrained(tmp_path / "p")
    card = json.loads((saved / CARD_FILE).read_text())
    change(card)
    (saved / CARD_FILE).write_text(json.dumps(card))
    return saved


@pytest.mark.parametrize("change,error,words", [
    (lambda c: c["stages"][0].update(colour="red"), ValueError, "stages[0].colour"),
    (lambda c: c["stages"][0].update(sigma_data="big"), ValueError, "stages[0].sigma_data"),
    (lambda c: c["stages"][0].update(sample_shape=[1, 8.5, 8]), ValueError,
     "stages[0].sample_shape[1]"),
    (lambda c: c.update(step=True), ValueError, "step"),
    (lambda c: c["stages"][0].pop("prediction"), ValueError, "prediction"),
    (lambda c: c["stages"][0].update(prediction="noise"), ValueError, "'noise'"),
    (lambda c: c.update(format=99), ValueError, "format 99"),
    (lambda c: c["stages"][0].update(weights="gone.safetensors"), FileNotFoundError,
     "gone.safetensors"),
])
def test_bad_model_cards_are_refused_with_the_file_named(tmp_path, runs, change, error, words):
    folder = _bad_card(tmp_path, runs, change)
    with pytest.raises(error) as info:
        Pipeline.from_pretrained(folder)
    msg = str(info.value)
    assert words in msg and (error is FileNotFoundError or CARD_FILE in msg), msg


# -- (d) seeds ----------------------------------------------------------------------------------
@pytest.mark.parametrize("run", ["class", "mlp"])
def test_image_i_depends_on_its_seed_only(runs, run):
    pipe = Pipeline.from_pretrained(runs[run][0])
    labels = [0, 1, 2, 0, 1, 2] if run == "class" else None
    whole = pipe(6, labels=labels, steps=3, seed=10, batch_size=6)
    for batch_size in (1, 4):
        torch.testing.assert_close(  # batch-size-dependent kernels round differently
            pipe(6, labels=labels, steps=3, seed=10, batch_size=batch_size).samples,
            whole.samples, rtol=1e-5, atol=1e-5)
    part = pipe(seeds=[12, 15], labels=None if labels is None else labels[2:6:3], steps=3,
                batch_size=6)
    torch.testing.assert_close(part.samples, whole.samples[[2, 5]], rtol=1e-5, atol=1e-5)
    assert part.seeds == [12, 15]


# -- conditions, options and outputs -----------------------------------------------------------
def test_labels_all_rows_names_and_errors(runs):
    pipe = Pipeline.from_pretrained(runs["class"][0])
    rows = pipe.condition("all")
    assert (rows.n, rows.nrow) == (30, 10)
    assert rows.labels.tolist() == [k for k in range(3) for _ in range(10)]
    assert pipe.condition("c", n=5).labels.tolist() == [2] * 5
    assert pipe.condition(None).cond is None  # the null label
    with pytest.raises(ValueError, match="unknown --class 'x'"):
        pipe.condition("x")
    with pytest.raises(ValueError, match="disagrees"):
        pipe(3, seeds=[1, 2])
    with pytest.raises(ValueError, match="needs a class-conditional model"):
        Pipeline.from_pretrained(runs["uncond"][0]).denoiser(guidance=2.0)


def test_a_sampler_option_the_sampler_does_not_take_is_refused(runs):
    pipe = Pipeline.from_pretrained(runs["mlp"][0])
    with pytest.raises(ValueError, match="'heun'.*'eta'.*churn"):
        pipe(2, sampler="heun", sampler_options={"eta": 0.5}, steps=2)
    with pytest.raises(ValueError, match="'heun'.*'eta'.*churn"):
        pipe(2, sampler=get_sampler("heun"), sampler_options={"eta": 0.5}, steps=2)
    with pytest.raises(ValueError, match="churn"):
        pipe(2, sampler="heun", sampler_options={"churn": "lots"}, steps=2)


def test_output_images_grid_and_npz(runs, tmp_path):
    out = Pipeline.from_pretrained(runs["class"][0])(4, labels="a", steps=2)
    assert out.images.dtype == np.uint8 and out.images.shape == (4, 8, 8, 1)
    assert out.save_grid(tmp_path / "g.png").is_file()
    arrays = np.load(out.save_npz(tmp_path / "s.npz"))
    np.testing.assert_array_equal(arrays["images"], out.images)
    assert arrays["labels"].tolist() == [0] * 4 and arrays["seeds"].tolist() == [0, 1, 2, 3]


class FakeEncoder:
    """Deterministic token embeddings per prompt (a stand-in for the text extra)."""

    def __init__(self, source, device="cpu"):
        self.dim = 8

    def __call__(self, prompts):
        rows = []
        for p in prompts:
            g = torch.Generator().manual_seed(sum(map(ord, p)) + 7 * len(p))
            rows.append(torch.randn(1, 2 + len(p.split()), self.dim, generator=g))
        return TextCond.cat([TextCond(r, torch.ones(r.shape[:2], dtype=torch.bool))
                             for r in rows])


def test_text_run_prompts_and_negative_prompt(tmp_path, monkeypatch, one_thread):
    monkeypatch.setattr("difflab.text.TextEncoder", FakeEncoder)
    cfg = {**UNET, "context_dim": 8, "attention_resolutions": [8]}
    ema, _, process, meta = write_run(tmp_path, "unet", cfg, class_names=["a dot"],
                                      text_encoder="fake-encoder-for-tests")
    pipe = Pipeline.from_pretrained(tmp_path)
    assert pipe.is_text and pipe.stage.captions == ["a dot"] and pipe.class_names == []
    out = pipe(4, prompt=["red", "a blue one"], guidance=2.0, negative_prompt="green",
               steps=2, seed=0)
    enc = FakeEncoder("x")
    cond = enc(["red", "red", "a blue one", "a blue one"])
    den = ClippedDenoiser(ClassifierFreeGuidance(
        Denoiser(ema.to(memory_format=torch.channels_last).eval(), process, "eps"), 2.0,
        null_cond=enc(["green"])))
    ref = generate(den, ddim, (1, 8, 8), range(4), labels=cond, steps=2, progress=False)
    assert torch.equal(out.samples, ref) and out.nrow == 2 and out.labels is None
    assert out.prompts == ["red", "red", "a blue one", "a blue one"]
    with pytest.raises(ValueError, match="takes --prompt"):
        pipe(2, labels=1)
