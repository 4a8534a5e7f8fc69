"""Latent diffusion as a pipeline stage: the model card's autoencoder stage, Pipeline.encode /
decode, latent training in the diffusion recipe, and every consumer (samplers, edit, save /
load) working on a latent model unchanged.

The autoencoders here are tiny and randomly initialised; they are written as a
``train-autoencoder`` checkpoint (the metadata keys that recipe writes) by the tests
themselves, so the on-disk format is pinned here.
"""

from dataclasses import asdict

import pytest
import torch
from PIL import Image

from difflab.cli.main import main
from difflab.data import ImageData
from difflab.networks import build_network
from difflab.pipeline import ModelCard, Pipeline, StageCard, load_autoencoder
from difflab.recipes import DiffusionRecipe, TrainConfig
from difflab.recipes.latent import AUTOENCODER_WEIGHTS
from difflab.training.checkpoint import save_checkpoint

AE = dict(in_channels=3, block_out_channels=[8, 8], layers_per_block=1, latent_channels=2,
          norm_num_groups=4, mid_attention=False)
SCALE, SHIFT = 1.7, 0.1


def write_autoencoder(folder, seed: int = 0, **changes):
    """A train-autoencoder run folder with one checkpoint; returns (folder, network)."""
    torch.manual_seed(seed)
    net = build_network("autoencoder", {**AE, **changes})
    with torch.no_grad():  # a non-trivial posterior: every weight random
        g = torch.Generator().manual_seed(seed)
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    tensors = {f"{w}.autoencoder.{k}": v.clone() for w in ("ema", "model")
               for k, v in net.state_dict().items()}
    meta = {"config": {}, "dataset": "shapes", "autoencoder": {
        "network": "autoencoder", "network_config": asdict(net.config) | AE | changes,
        "sample_shape": [3, 16, 16], "data_range": [-1.0, 1.0], "scale_factor": SCALE,
        "shift_factor": SHIFT, "weights_prefix": "autoencoder"}}
    save_checkpoint(folder / "checkpoints", 5, tensors, meta)
    return folder, net.eval()


def images(n: int = 24, seed: int = 0) -> ImageData:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 16, 16, generator=g) * 2 - 1
    return ImageData(x, torch.arange(n) % 3, ["a", "b", "c"])


def latent_config(tmp_path, ae, **changes) -> TrainConfig:
    values = {"data.resolution": 16, "data.channels": 3, "latent.autoencoder": str(ae),
              "network.unet.base_channels": 8, "network.unet.channel_mult": [1, 2],
              "network.unet.attention_resolutions": [], "optim.steps": 3,
              "optim.batch_size": 4, "optim.warmup_steps": 0, "run.out_dir": str(tmp_path / "run"),
              "run.sample_every": 0, "run.checkpoint_every": 0, "run.sample_steps": 2,
              "speed.channels_last": False, **changes}
    return TrainConfig.from_values(values)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A latent class-conditional model trained for 3 steps; (run folder, AE network)."""
    tmp = tmp_path_factory.mktemp("latent")
    ae, net = write_autoencoder(tmp / "ae")
    recipe = DiffusionRecipe(latent_config(tmp, ae), data=images())
    recipe.run(progress=False)
    return recipe.out_dir, net


def test_autoencoder_stage_checks():
    base = dict(name="autoencoder", kind="autoencoder", network="autoencoder",
                network_config=AE, sample_shape=[3, 16, 16], weights="ae.safetensors")
    StageCard(**base)
    with pytest.raises(ValueError, match="no process or prediction"):
        StageCard(**base, prediction="eps")
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        StageCard(**{**base, "sample_shape": [2]})
    with pytest.raises(ValueError, match="scale_factor"):
        StageCard(**base, scale_factor=0.0)
    with pytest.raises(ValueError, match="needs process and prediction"):
        StageCard(**{**base, "kind": "diffusion"})
    with pytest.raises(ValueError, match="one diffusion stage"):
        ModelCard(stages=[StageCard(**base)])


def test_load_autoencoder_from_a_run(tmp_path):
    ae, net = write_autoencoder(tmp_path / "ae")
    stage, loaded = load_autoencoder(ae)
    assert (stage.kind, stage.scale_factor, stage.shift_factor) == ("autoencoder", SCALE, SHIFT)
    x = images(4).images
    assert torch.equal(loaded.encode(x).mean, net.encode(x).mean)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_autoencoder(tmp_path / "nowhere")


def test_encode_decode_are_the_scaled_autoencoder(trained):
    run, net = trained
    pipe = Pipeline.from_pretrained(run)
    assert pipe.is_latent and pipe.image_shape == (3, 16, 16)
    assert pipe.sample_shape == (2, 8, 8)  # f = 2, latent_channels = 2
    x = images(5).images
    z = pipe.encode(x, batch_size=2)
    # (mean - shift) * scale, and decode inverts the scaling before the decoder (to float
    # tolerance: the loaded copy computes in channels-last order)
    assert torch.allclose(z, (net.encode(x).mean - SHIFT) * SCALE, atol=1e-5)
    assert torch.allclose(pipe.decode(z), net.decode(z / SCALE + SHIFT).clamp(-1, 1),
                          atol=1e-5)
    drawn = pipe.encode(x, sample=True, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(drawn, z)


def test_recipe_trains_on_the_encoded_data(tmp_path):
    ae, net = write_autoencoder(tmp_path / "ae")
    data = images(8)
    for posterior in ("mean", "sample"):
        recipe = DiffusionRecipe(latent_config(tmp_path / posterior, ae,
                                               **{"latent.posterior": posterior}), data=data)
        post = net.encode(data.images)
        assert torch.allclose(recipe.latent.mean, (post.mean - SHIFT) * SCALE, atol=1e-6)
        x0 = recipe.batch(0)[0]
        idx = recipe.source.inner.indices(0)
        exact = torch.equal(x0, recipe.latent.mean[idx])
        assert exact == (posterior == "mean")
        if posterior == "sample":  # mean + std * n: within a few posterior stds
            std = (0.5 * post.logvar).exp()[idx] * SCALE
            assert ((x0 - recipe.latent.mean[idx]) / std).abs().max() < 6


def test_latent_x0_is_clipped_to_the_latents_range(trained):
    """The latent stage's data_range spans the training latents (mean +- 3 posterior std),
    and the pipeline's denoiser clips x0_hat to it as it clips pixels to [-1, 1]."""
    run, net = trained
    pipe = Pipeline.from_pretrained(run)
    lo, hi = pipe.stage.data_range
    post = net.encode(images().images)
    std = (0.5 * post.logvar).exp()
    z_lo = ((post.mean - 3 * std - SHIFT) * SCALE).min()
    z_hi = ((post.mean + 3 * std - SHIFT) * SCALE).max()
    assert abs(lo - z_lo) < 1e-4 and abs(hi - z_hi) < 1e-4
    x0 = pipe.denoiser()(100 * torch.randn(2, *pipe.sample_shape), torch.full((2,), 999.0),
                         torch.tensor([0, 1])).x0
    assert x0.min() >= lo - 1e-6 and x0.max() <= hi + 1e-6


def test_checkpoint_carries_the_autoencoder(trained):
    run, net = trained
    ckpts = run / "checkpoints"
    assert (ckpts / AUTOENCODER_WEIGHTS).is_file()
    pipe = Pipeline.from_pretrained(run)
    for k, v in net.state_dict().items():
        assert torch.equal(pipe.autoencoder.state_dict()[k], v), k


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "euler_maruyama", "heun", "dpm_solver",
                                     "dpmpp_2m", "unipc_bh1", "pc", "rk45"])
def test_every_sampler_family_gives_images(trained, sampler):
    pipe = Pipeline.from_pretrained(trained[0])
    out = pipe(2, sampler=sampler, steps=3, labels=[0, 1])
    assert out.samples.shape == (2, 3, 16, 16)
    assert out.samples.isfinite().all() and out.samples.abs().max() <= 1


def test_save_pretrained_round_trip(trained, tmp_path):
    pipe = Pipeline.from_pretrained(trained[0])
    folder = pipe.save_pretrained(tmp_path / "pipe")
    again = Pipeline.from_pretrained(folder)
    assert [s.kind for s in again.card.stages] == ["diffusion", "autoencoder"]
    a = pipe(2, steps=4, labels=[0, 2], seed=3).samples
    b = again(2, steps=4, labels=[0, 2], seed=3).samples
    assert torch.equal(a, b)
    stage, _ = load_autoencoder(folder)  # a saved latent model's autoencoder, reused
    assert stage.scale_factor == SCALE


def _png(path, seed: int, mask: bool = False):
    g = torch.Generator().manual_seed(seed)
    if mask:
        arr = torch.zeros(16, 16, 3, dtype=torch.uint8)
        arr[4:9, 5:12] = 255
    else:
        arr = torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8)
    Image.fromarray(arr.numpy()).save(path)
    return str(path)


@pytest.mark.parametrize("kind", ["sdedit", "inpaint", "invert", "interpolate"])
def test_edit_commands_on_a_latent_model(trained, tmp_path, kind, capsys):
    img, img2 = _png(tmp_path / "a.png", 0), _png(tmp_path / "b.png", 1)
    extra = {"inpaint": ["--mask", _png(tmp_path / "m.png", 0, mask=True)],
             "interpolate": ["--input2", img2, "--n", "3"]}.get(kind, [])
    out = tmp_path / f"{kind}.png"
    rc = main(["edit", kind, "--checkpoint", str(trained[0]), "--input", img, "--steps", "3",
               "--out", str(out), "--no-progress", "--device", "cpu", *extra])
    assert rc == 0 and out.is_file()
    if kind == "invert":
        assert "through the autoencoder" in capsys.readouterr().out


def test_inpainting_keeps_the_unmasked_pixels(trained, tmp_path):
    """The latent mask covers every regenerated pixel, and the kept pixels are the input's."""
    from difflab.cli.edit import _run_kind
    from difflab.cli.main import build_parser
    img, mask = _png(tmp_path / "a.png", 0), _png(tmp_path / "m.png", 0, mask=True)
    args = build_parser().parse_args(["edit", "inpaint", "--checkpoint", str(trained[0]),
                                      "--input", img, "--mask", mask, "--steps", "3"])
    pipe = Pipeline.from_pretrained(trained[0])
    shown, out = _run_kind(args, pipe, pipe.denoiser(), torch.device("cpu"))
    keep = shown[1] > -1  # the "kept part" column: -1 where regenerated
    assert torch.equal(out[0][keep], shown[0][keep])


def test_latent_mask_is_conservative():
    from difflab.editing import latent_mask
    m = torch.zeros(1, 1, 16, 16)
    m[..., 5, 9] = 1  # one pixel
    lat = latent_mask(m, 4)
    assert lat.sum() == 1 and lat[0, 0, 1, 2] == 1


def test_nll_refuses_a_latent_model(trained, capsys):
    rc = main(["nll", "--checkpoint", str(trained[0]), "--data", "shapes:test"])
    assert rc == 2
    assert "latent model" in capsys.readouterr().err


def test_a_dit_trains_and_samples_in_latent_space(tmp_path):
    """The transformer on latents: its size follows the latents (8 x 8 x 2, patch 2)."""
    ae, _ = write_autoencoder(tmp_path / "ae")
    config = latent_config(tmp_path, ae, **{"network.name": "dit", "optim.steps": 2})
    recipe = DiffusionRecipe(config, data=images(8))
    assert (recipe.net_config.image_size, recipe.net_config.in_channels) == (8, 2)
    recipe.run(progress=False)
    out = Pipeline.from_pretrained(recipe.out_dir)(2, steps=2, labels=[0, 1])
    assert out.samples.shape == (2, 3, 16, 16)


def test_a_diffusers_autoencoder_as_the_latent_space(tmp_path):
    """--autoencoder takes a diffusers AutoencoderKL folder: its scaling_factor is the
    stage's, and the trained latent model samples images through it."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 8), layers_per_block=1,
                                  norm_num_groups=4, latent_channels=2, sample_size=16,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2,
                                  scaling_factor=0.5).eval()
    vae.save_pretrained(tmp_path / "vae")
    recipe = DiffusionRecipe(latent_config(tmp_path, tmp_path / "vae", **{
        "latent.posterior": "mean", "optim.steps": 1}), data=images(8))
    x = images(8).images
    with torch.no_grad():
        want = vae.encode(x).latent_dist.mean * 0.5
    assert torch.allclose(recipe.latent.mean, want, atol=1e-5)
    recipe.run(progress=False)
    pipe = Pipeline.from_pretrained(recipe.out_dir)
    assert pipe.autoencoder_stage.scale_factor == 0.5
    assert pipe(1, steps=2, labels=[1]).samples.shape == (1, 3, 16, 16)


def test_guidance_and_the_sample_command_on_a_latent_model(trained, tmp_path):
    """Classifier-free guidance wraps the latent denoiser; `difflab sample --save-npz` writes
    decoded 8-bit images, which is all `difflab eval` reads."""
    import numpy as np

    pipe = Pipeline.from_pretrained(trained[0])
    plain = pipe(2, steps=3, labels=[0, 1], seed=1).samples
    guided = pipe(2, steps=3, labels=[0, 1], seed=1, guidance=3.0).samples
    assert guided.shape == plain.shape and not torch.equal(guided, plain)
    npz = tmp_path / "s.npz"
    rc = main(["sample", "--checkpoint", str(trained[0]), "--n", "3", "--steps", "2",
               "--save-npz", str(npz), "--out", str(tmp_path / "g.png"), "--no-progress",
               "--device", "cpu"])
    assert rc == 0
    images = np.load(npz)["images"]
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8


def test_derived_sizes_are_the_latents(tmp_path):
    """Without --attention-resolutions the U-Net attends at a size of the latents (here
    8 x 8 latents of 16 px images attend at 4), not of the pixels."""
    ae, _ = write_autoencoder(tmp_path / "ae")
    config = TrainConfig.from_values({"data.resolution": 16, "latent.autoencoder": str(ae),
                                      "network.unet.channel_mult": [1, 2]})
    assert config.network.unet.image_size == 8
    assert config.network.unet.attention_resolutions == (4,)
    assert config.diffusion.schedule == "scaled_linear"  # latent diffusion's, unless given
    dit = TrainConfig.from_values({"data.resolution": 16, "latent.autoencoder": str(ae),
                                   "network.name": "dit"})
    assert dit.network.dit.image_size == 8


def test_a_vq_latent_model_decodes_codebook_vectors(tmp_path):
    """Sampled latents of a VQ autoencoder are snapped to the codebook before decoding."""
    ae, net = write_autoencoder(tmp_path / "ae", regularizer="vq", codebook_size=16)
    recipe = DiffusionRecipe(latent_config(tmp_path, ae, **{"optim.steps": 1}), data=images(8))
    recipe.run(progress=False)
    pipe = Pipeline.from_pretrained(recipe.out_dir, channels_last=False)  # same numerics
    z = torch.randn(2, *pipe.sample_shape)
    want = net.decode(net.quantize(z / SCALE + SHIFT)).clamp(-1, 1)
    assert torch.allclose(pipe.decode(z), want, atol=1e-5)
